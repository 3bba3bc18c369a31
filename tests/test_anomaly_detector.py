"""anomaly_detector.py: the good-only patch detector on the synthetic tree (which has masks), its outputs, the saved
bank, the coreset and the error paths."""
import csv
import shutil

import numpy as np
import pytest
import torch

import detector as ad
from inference import read_detector
from lab_io import UserError


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic_root):
    """One run with a classifier checkpoint to compare with (offline ViT-tiny, untrained, the project's split)."""
    from conftest import run_script, save_untrained_checkpoint

    cwd = tmp_path_factory.mktemp("detector")
    manifest = save_untrained_checkpoint(cwd, synthetic_root)
    result = run_script("anomaly_detector.py", "--data-dir", synthetic_root, "--model-name", "offline-vit-small",
                        "--num-threads", "1", "--overlays", "1", "--compare-checkpoint",
                        "modeles/model_cpu_bottle.pth", cwd=cwd)
    return cwd, result, manifest


def test_fit_evaluate_and_outputs(fitted):
    cwd, result, manifest = fitted
    assert result.returncode == 0, result.stderr[-3000:]
    with open(cwd / "resultats" / "detector_results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["defect_type"] for r in rows] == ["all", "broken_large", "contamination", "crack",
                                                "common test images: classifier", "common test images: detector"]
    # the comparison uses the images neither model trained on: the classifier's test split within test/
    common = [s for s in manifest["splits"]["test"] if s["path"].startswith("test/")]
    assert int(rows[-1]["n_test"]) == int(rows[-2]["n_test"]) == len(common) > 0
    assert rows[-2]["model_name"] == "offline-vit-tiny" and rows[-2]["accuracy_ci_low"] != ""
    overall = rows[0]
    assert {"category", "image_auroc", "pixel_auroc", "fit_seconds", "export_seconds", "end_to_end_ms_per_img",
            "batch_size", "size_mb", "bank_patches", "threshold", "cpu_flags"} <= set(overall)
    # even a random-init ViT's patch tokens find the synthetic defects, and where they are
    assert float(overall["image_auroc"]) > 0.75 and float(overall["pixel_auroc"]) > 0.75
    # the threshold comes from the classifier's validation split, whose images leave the bank and the test images
    val = manifest["splits"]["val"]
    val_test = [s for s in val if s["path"].startswith("test/")]
    val_train = [s for s in val if s["path"].startswith("train/")]
    assert val_test and val_train and {s["label"] for s in val} == {0, 1}
    assert int(overall["n_test"]) == 60 - len(val_test) and int(overall["n_train_good"]) == 60 - len(val_train)
    assert int(overall["n_holdout_good"]) == 0 and overall["threshold_rule"].startswith("best balanced accuracy")
    assert int(overall["n_threshold_good"]) + int(overall["n_threshold_defective"]) == len(val)
    assert 0 <= float(overall["threshold_image_auroc"]) <= 1
    assert "best balanced accuracy on the %d validation images" % len(val) in result.stdout
    assert (cwd / "resultats" / "detector_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overlays = sorted(p.name for p in (cwd / "resultats" / "detector_overlays" / "bottle").glob("*.png"))
    assert len(overlays) == 4 and any(n.startswith("good_") for n in overlays)  # one per test folder

    bank, config = read_detector(cwd / "modeles" / "detector_bottle.safetensors")
    assert bank.dtype == np.float16 and bank.shape[0] == int(overall["bank_patches"])
    assert config["threshold"] == pytest.approx(float(overall["threshold"]), rel=1e-5)  # the CSV keeps 6 digits
    assert config["threshold_rule"] == overall["threshold_rule"]
    assert config["threshold_images"] == {"good": int(overall["n_threshold_good"]),
                                          "defective": int(overall["n_threshold_defective"])}
    assert config["layers"] == [2, 4] and config["preprocessing"]["image_size"] == [64, 64]  # an offline preset: its own


def test_without_masks_gives_image_metrics_only(tmp_path, synthetic_root, cli):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "bottle", data / "bottle", ignore=shutil.ignore_patterns("ground_truth"))
    result = cli("anomaly_detector.py", "--data-dir", data, "--model-name", "offline-vit-tiny", "--num-threads", "1",
                 "--overlays", "0", "--threshold-from", "good", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("image metrics only") == 1
    rows = list(csv.DictReader(open(tmp_path / "resultats" / "detector_results.csv", encoding="utf-8")))
    assert rows[0]["image_auroc"] and rows[0].get("pixel_auroc", "") == ""
    # the good-only rule: no defect used, every official test image evaluated
    assert int(rows[0]["n_test"]) == 60 and int(rows[0]["n_threshold_defective"]) == 0
    assert int(rows[0]["n_holdout_good"]) == int(rows[0]["n_threshold_good"]) == 6
    assert "highest score of 6 held-out good images" in result.stdout


@pytest.mark.parametrize("remove, message", [("train/good", "train/good is missing or holds no image"),
                                             ("test", "test/good is missing or holds no image")])
def test_incomplete_category_is_one_line(tmp_path, synthetic_root, cli, remove, message):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "bottle", data / "bottle")
    shutil.rmtree(data / "bottle" / remove)
    result = cli("anomaly_detector.py", "--data-dir", data, "--model-name", "offline-vit-tiny", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and message in result.stderr


def test_coreset_takes_the_farthest_points():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [10.0, 0.0], [9.9, 0.0]])
    chosen = set(ad.greedy_coreset(points, 3, projection_dim=2).tolist())
    assert len(chosen) == 3 and 2 in chosen and chosen & {0, 1} and chosen & {3, 4}
    assert ad.greedy_coreset(points, 10).tolist() == [0, 1, 2, 3, 4]


def test_a_foreign_file_is_not_a_detector(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a detector"):
        read_detector(bad)
    with pytest.raises(UserError, match="not found"):
        read_detector(tmp_path / "missing.safetensors")


def test_default_input_is_24_patches_for_a_pretrained_backbone():
    assert ad.default_image_size("/models/dinov2-small", {"image_size": [224, 224]}, 14) == 336
    assert ad.default_image_size("google/vit-base-patch16-224-in21k", {"image_size": [224, 224]}, 16) == 384
    assert ad.default_image_size("offline-vit-tiny", {"image_size": [64, 64]}, 8) == 64  # random init: its own


def test_detector_options_are_the_flags_defaults():
    """The pipeline's detector_options() and anomaly_detector.py's flags share one table of defaults and one check."""
    import anomaly_detector

    assert vars(anomaly_detector.parse_args([])) == ad.DETECTOR_DEFAULTS
    assert vars(ad.detector_options(category="screw", seed=3)) == {**ad.DETECTOR_DEFAULTS, "category": "screw", "seed": 3}
    with pytest.raises(TypeError, match="unknown detector option"):
        ad.detector_options(categroy="screw")
    with pytest.raises(UserError, match="--coreset"):
        ad.detector_options(coreset=0)
