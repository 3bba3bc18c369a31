"""The good-only detector served without PyTorch (inference.PatchDetector): same scores and maps as
anomaly_detector.py's own PyTorch path, predict.py --heatmaps on it, its files checked like a model's."""
import csv
import shutil

import numpy as np
import pytest
import torch

import detector as ad
from inference import MAP_SIZE, PatchDetector, load_rgb, preprocess, read_detector
from lab_io import UserError


@pytest.fixture(scope="module")
def test_paths(synthetic_root):
    return sorted((synthetic_root / "bottle" / "test").rglob("*.png"))


def test_served_detector_equals_the_pytorch_one(detector_files, test_paths):
    """The ONNX backbone + numpy scoring that predict.py and score.py use give the scores and maps of the PyTorch
    feature extractor anomaly_detector.py fitted the bank with."""
    served = PatchDetector(detector_files / "detector_bottle.safetensors", threads=1)
    bank, config = read_detector(detector_files / "detector_bottle.safetensors")
    model, pre, _ = ad.load_backbone(config["model_name"], 0)
    pre = {**pre, **config["preprocessing"]}  # the input size the detector was fitted at
    reference = ad.Detector(model, pre, config["model_name"], config["layers"], bank=torch.from_numpy(bank),
                            threshold=config["threshold"])
    reference.score_top = config["image_score_top"]
    ref_scores, ref_maps = reference.score_features(ad.extract(reference.extractor, test_paths, pre, 16, "ref"))

    batch = np.stack([preprocess(load_rgb(p), served.preprocessing) for p in test_paths])
    scores, maps = served.score(batch)
    assert maps.shape == (len(test_paths), MAP_SIZE, MAP_SIZE)
    assert np.abs(scores - ref_scores).max() < 1e-3 * max(1.0, float(ref_scores.max()))
    assert np.abs(maps - ref_maps).max() < 1e-3 * max(1.0, float(ref_maps.max()))
    assert [served.label_for(s) for s in scores] == ["anomaly" if s >= served.threshold else "good"
                                                    for s in ref_scores]
    # the defects of the synthetic tree are where the map is highest more often than not
    defective = [i for i, p in enumerate(test_paths) if p.parent.name != "good"]
    assert np.mean(scores[defective]) > np.mean(np.delete(scores, defective))


def test_predict_heatmaps_with_the_detector(detector_files, synthetic_root, cli, tmp_path):
    folder = synthetic_root / "bottle" / "test"
    out, maps = tmp_path / "pred.csv", tmp_path / "maps"
    res = cli("predict.py", "--input", folder, "--output", out, "--model",
              detector_files / "detector_bottle.safetensors", "--heatmaps", maps, "--num-threads", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == 60 and all(r["anomaly_probability"] == "" and r["anomaly_score"] for r in rows)
    threshold = read_detector(detector_files / "detector_bottle.safetensors")[1]["threshold"]
    assert all((r["label"] == "anomaly") == (float(r["anomaly_score"]) >= threshold) for r in rows)
    anomalous = [r for r in rows if r["label"] == "anomaly"]
    overlays = sorted(maps.glob("*_heatmap.png"))
    assert len(overlays) == len(anomalous) > 0 and {r["variant"] for r in rows} == {"detector-fp32"}
    assert (maps / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resumable like any model; --benchmark needs a classifier and says so in one line
    res = cli("predict.py", "--input", folder, "--output", out, "--model",
              detector_files / "detector_bottle.safetensors", "--num-threads", "1", cwd=tmp_path)
    assert res.returncode == 0 and "60 already in" in res.stdout
    res = cli("predict.py", "--input", folder, "--output", tmp_path / "b.csv", "--model",
              detector_files / "detector_bottle.safetensors", "--benchmark", cwd=tmp_path)
    assert res.returncode == 2 and "classifier" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_detector_files_are_checked(detector_files, tmp_path):
    folder = tmp_path / "modeles"
    shutil.copytree(detector_files, folder)
    det = folder / "detector_bottle.safetensors"
    backbone = folder / "detector_bottle_backbone.onnx"
    PatchDetector(det)  # intact: loads
    backbone.write_bytes(backbone.read_bytes() + b"\0")  # a later run replaced the backbone
    with pytest.raises(UserError, match="not the backbone"):
        PatchDetector(det)
    backbone.unlink()
    with pytest.raises(UserError, match="not beside it"):
        PatchDetector(det)
    with pytest.raises(UserError, match="not found"):
        PatchDetector(folder / "missing.safetensors")


def test_numpy_maps_equal_torch_upsampling_and_blur():
    """inference.anomaly_maps (one matrix per axis) = bilinear interpolate + reflected Gaussian blur in PyTorch."""
    import math

    import torch.nn.functional as F

    from inference import SIGMA_PATCHES, anomaly_maps, nearest_distances

    g = torch.Generator().manual_seed(0)
    for grid in ((16, 16), (4, 6)):
        scores = torch.rand(3, grid[0] * grid[1], generator=g)
        up = F.interpolate(scores.reshape(-1, 1, *grid), size=(MAP_SIZE, MAP_SIZE), mode="bilinear",
                           align_corners=False)
        for axis, n in ((3, grid[1]), (2, grid[0])):
            sigma = SIGMA_PATCHES * MAP_SIZE / n
            r = int(math.ceil(3 * sigma))
            x = torch.arange(-r, r + 1, dtype=torch.float32)
            k = torch.exp(-x ** 2 / (2 * sigma ** 2))
            k = k / k.sum()
            pad = (r, r, 0, 0) if axis == 3 else (0, 0, r, r)
            up = F.conv2d(F.pad(up, pad, mode="reflect"), k.view(1, 1, 1, -1) if axis == 3 else k.view(1, 1, -1, 1))
        assert np.abs(anomaly_maps(scores.numpy(), grid) - up[:, 0].numpy()).max() < 1e-5
    feats, bank = torch.randn(2, 10, 8, generator=g), torch.randn(50, 8, generator=g)
    expected = torch.cdist(feats.reshape(-1, 8), bank).min(1).values.reshape(2, 10)
    assert np.abs(nearest_distances(feats.numpy(), bank.numpy()) - expected.numpy()).max() < 1e-5


def test_openvino_nearest_patches_equal_numpy():
    from inference import NearestPatches, nearest_distances

    rng = np.random.default_rng(0)
    bank = rng.standard_normal((300, 24)).astype(np.float32)
    feats = rng.standard_normal((3, 20, 24)).astype(np.float32)
    nearest = NearestPatches(bank, threads=1)
    assert nearest.engine == "openvino"
    got = nearest(feats)
    assert got.shape == (3, 20) and np.abs(got - nearest_distances(feats, bank)).max() < 1e-4
    assert nearest(feats[:1]).shape == (1, 20)  # any batch
