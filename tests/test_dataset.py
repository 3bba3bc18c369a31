"""mvtec_dataset.py: indexing, the shared split, image conversion, error paths, CLI."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mvtec_dataset import (SYNTHETIC_DEFECTS, MVTecDataset, image_to_tensor, index_category,
                           open_dataset_image, make_split, make_synthetic_mvtec, prepare_split, save_manifest,
                           split_from_manifest)
from lab_io import UserError

PRE = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def test_index_counts_labels_and_masks(synthetic_root):
    samples = index_category(synthetic_root, "bottle")
    assert len(samples) == 60 + 15 + 15 * len(SYNTHETIC_DEFECTS)
    assert sum(s.label == 0 for s in samples) == 75
    anomalies = [s for s in samples if s.label == 1]
    assert {s.defect_type for s in anomalies} == set(SYNTHETIC_DEFECTS)
    assert all(s.mask_path and (synthetic_root / "bottle" / s.mask_path).is_file() for s in anomalies)
    assert all(s.mask_path is None for s in samples if s.label == 0)


def test_split_is_disjoint_complete_stratified_and_deterministic(synthetic_root):
    samples = index_category(synthetic_root, "bottle")
    split = make_split(samples, seed=3)
    paths = {name: {s.path for s in part} for name, part in split.items()}
    assert not paths["train"] & paths["val"] and not paths["train"] & paths["test"] and not paths["val"] & paths["test"]
    assert set.union(*paths.values()) == {s.path for s in samples}
    assert {s.defect_type for s in split["test"]} == {"good", *SYNTHETIC_DEFECTS}
    assert {s.defect_type for s in split["train"]} == {"good", *SYNTHETIC_DEFECTS}
    # test holds about 25 % of every group
    for defect in SYNTHETIC_DEFECTS:
        assert sum(s.defect_type == defect for s in split["test"]) == 4  # round(15 * 0.25)
    assert make_split(samples, seed=3) == split
    assert make_split(samples, seed=4) != split


def test_every_defect_type_in_test_even_when_rare(tmp_path):
    make_synthetic_mvtec(tmp_path, "bottle", n_train_good=5, n_test_good=1, n_per_defect=1, image_size=32)
    split = make_split(index_category(tmp_path, "bottle"), seed=0)
    assert {s.defect_type for s in split["test"]} == {"good", *SYNTHETIC_DEFECTS}
    # but a tree that small leaves no defective image to learn from or to choose the threshold on: refused
    with pytest.raises(UserError, match=r"too few images to split: no defective image in train \(train 3 good / 0 def"):
        prepare_split(tmp_path, "bottle")


def test_manifest_round_trip(synthetic_root, tmp_path):
    split, manifest = prepare_split(synthetic_root, "bottle", seed=1)
    path = save_manifest(tmp_path / "split.json", manifest)
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert split_from_manifest(loaded) == split
    assert loaded["counts"] == {k: len(v) for k, v in split.items()}
    with pytest.raises(UserError, match="not one written by this lab"):
        split_from_manifest({"hello": 1})


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_images_of_any_mode_become_rgb_tensors(tmp_path, mode):
    arr = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 256)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    img.save(path)
    assert open_dataset_image(path).mode == "RGB"
    tensor = image_to_tensor(path, PRE)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0


def test_corrupt_image_is_named(tmp_path):
    root = tmp_path / "data"
    folder = make_synthetic_mvtec(root, "bottle", n_train_good=4, n_test_good=2, n_per_defect=2, image_size=32)
    broken = folder / "test" / "crack" / "001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    samples = index_category(root, "bottle")
    with pytest.raises(UserError, match="001.png"):
        MVTecDataset(folder, samples, PRE)


def test_missing_and_broken_trees(tmp_path):
    with pytest.raises(UserError, match="download_mvtec.py"):
        index_category(tmp_path / "nothing", "bottle")
    with pytest.raises(UserError, match="not an MVTec AD category"):
        index_category(tmp_path, "bottel")
    folder = make_synthetic_mvtec(tmp_path, "bottle", n_train_good=3, n_test_good=2, n_per_defect=2, image_size=32)
    for defect in SYNTHETIC_DEFECTS:
        shutil.rmtree(folder / "test" / defect)
    with pytest.raises(UserError, match="no defect folder"):
        index_category(tmp_path, "bottle")
    shutil.rmtree(folder / "train" / "good")
    with pytest.raises(UserError, match="train/good"):
        index_category(tmp_path, "bottle")


def test_cli_summary_and_errors(synthetic_root, tmp_path, cli):
    result = cli("mvtec_dataset.py", "--data-dir", synthetic_root, "--category", "bottle",
                 "--save-manifest", tmp_path / "split.json")
    assert result.returncode == 0, result.stderr
    assert "TOTAL" in result.stdout and "contamination" in result.stdout
    assert json.loads((tmp_path / "split.json").read_text(encoding="utf-8"))["category"] == "bottle"

    broken_root = tmp_path / "broken"
    folder = make_synthetic_mvtec(broken_root, "bottle", n_train_good=8, n_test_good=4, n_per_defect=8, image_size=32)
    (folder / "test" / "crack" / "001.png").write_bytes(b"not an image at all")
    result = cli("mvtec_dataset.py", "--data-dir", broken_root, "--category", "bottle")
    assert result.returncode == 2 and "test/crack/001.png" in result.stderr and "Traceback" not in result.stderr

    result = cli("mvtec_dataset.py", "--data-dir", tmp_path / "empty", "--category", "bottle")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_synthetic_tree_never_written_over_a_dataset_nor_left_half_done(tmp_path, monkeypatch, cli):
    """Real MVTec images have the synthetic names (000.png...): an existing category folder is refused, bytes
    untouched; a tree interrupted while drawn leaves nothing, so the demo never reuses half a tree."""
    import mvtec_dataset

    real = tmp_path / "mvtec" / "bottle" / "train" / "good"
    real.mkdir(parents=True)
    (real / "000.png").write_bytes(b"a real photo")
    result = cli("mvtec_dataset.py", "--make-synthetic", tmp_path / "mvtec", "--image-size", "32")
    assert result.returncode == 2 and "already exists" in result.stderr and result.stderr.count("\n") == 1
    assert (real / "000.png").read_bytes() == b"a real photo"
    assert sorted(p.name for p in (tmp_path / "mvtec").iterdir()) == ["bottle"]

    drawn = []

    def draw_then_stop(rng, size):
        if len(drawn) == 7:
            raise KeyboardInterrupt
        drawn.append(size)
        return real_draw(rng, size)

    real_draw = mvtec_dataset._draw_part
    monkeypatch.setattr(mvtec_dataset, "_draw_part", draw_then_stop)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_mvtec(tmp_path / "demo", "bottle", n_train_good=5, n_test_good=2, n_per_defect=2,
                             image_size=32)
    assert list((tmp_path / "demo").iterdir()) == []
    monkeypatch.setattr(mvtec_dataset, "_draw_part", real_draw)
    folder = make_synthetic_mvtec(tmp_path / "demo", "bottle", n_train_good=5, n_test_good=2, n_per_defect=2,
                                  image_size=32)
    assert len(list(folder.glob("t*/*/*.png"))) == 5 + 2 + 2 * len(SYNTHETIC_DEFECTS)
