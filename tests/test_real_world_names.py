"""A category folder as a student's disk really looks: real-world names, mixed formats and junk files.

The tree is built once per module from a small synthetic MVTec tree (48 px images), renamed and re-encoded:
folder names with capitals, spaces and parentheses (`test/Defective`, `test/broken large (2)`), file names with
spaces, parentheses, accents and upper-case extensions (`IMG 001 (copy).PNG`, `défaut_01.png`, real JPEG `.JPG`,
`.BMP`), grayscale / RGBA / 16-bit (I;16) PNGs, masks for those stems, and the junk a real disk carries
(`.DS_Store`, `Thumbs.db`, `desktop.ini`, `notes.txt`, a macOS AppleDouble `._IMG 001.png`).
"""
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from load_test import find_images
from mvtec_dataset import (index_category, make_loaders, make_synthetic_mvtec, prepare_split,
                           preprocess_image, split_from_manifest, split_manifest, write_manifest)
from lab_io import UserError

CATEGORY = "bottle"
PRE = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
APPLEDOUBLE = "train/good/._IMG 001.png"
REAL_DEFECTS = {"Defective", "broken large (2)", "contamination"}
SIXTEEN_BIT = ("train/good/scan16 07.png", "test/good/16bit ok 4.png", "test/broken large (2)/scan16 broken.png")

# (source in the synthetic tree, destination in the real-world tree, how to re-encode it, destination mask)
# encodings: png (as is), L (grayscale PNG), RGBA (PNG with alpha), I16 (16-bit grayscale PNG), JPEG, BMP
PLAN = [
    ("train/good/000.png", "train/good/IMG 001.png", "png", None),
    ("train/good/001.png", "train/good/IMG 001 (copy).PNG", "png", None),
    ("train/good/002.png", "train/good/IMG_0003.JPG", "JPEG", None),
    ("train/good/003.png", "train/good/photo été 4.png", "png", None),
    ("train/good/004.png", "train/good/Scan 0005.BMP", "BMP", None),
    ("train/good/005.png", "train/good/gray 06.png", "L", None),
    ("train/good/006.png", "train/good/scan16 07.png", "I16", None),
    ("train/good/007.png", "train/good/rgba 08.png", "RGBA", None),
    ("train/good/008.png", "train/good/09.jpeg", "JPEG", None),
    ("train/good/009.png", "train/good/0010.png", "png", None),
    ("train/good/010.png", "train/good/0011.png", "png", None),
    ("train/good/011.png", "train/good/0012.png", "png", None),
    ("test/good/000.png", "test/good/OK (1).png", "png", None),
    ("test/good/001.png", "test/good/ok 2.PNG", "png", None),
    ("test/good/002.png", "test/good/rgba_ok_3.png", "RGBA", None),
    ("test/good/003.png", "test/good/16bit ok 4.png", "I16", None),
    # a merged defect folder with a capital, as students rename it
    ("test/crack/000.png", "test/Defective/IMG 001 (copy).PNG", "png", "ground_truth/Defective/IMG 001 (copy)_mask.png"),
    ("test/crack/001.png", "test/Defective/défaut_01.png", "png", "ground_truth/Defective/défaut_01_mask.png"),
    ("test/crack/002.png", "test/Defective/DSC 0042.JPG", "JPEG", "ground_truth/Defective/DSC 0042_mask.png"),
    ("test/crack/003.png", "test/Defective/rayure grise.png", "L", None),  # no mask on disk: mask_path None
    ("test/broken_large/000.png", "test/broken large (2)/000.png", "png", "ground_truth/broken large (2)/000_mask.png"),
    ("test/broken_large/001.png", "test/broken large (2)/001 (1).png", "png",
     "ground_truth/broken large (2)/001 (1)_mask.png"),
    ("test/broken_large/002.png", "test/broken large (2)/Cassé Épais.BMP", "BMP",
     "ground_truth/broken large (2)/Cassé Épais_mask.png"),
    ("test/broken_large/003.png", "test/broken large (2)/scan16 broken.png", "I16",
     "ground_truth/broken large (2)/scan16 broken_mask.png"),
    *[(f"test/contamination/00{i}.png", f"test/contamination/00{i}.png", "png",
       f"ground_truth/contamination/00{i}_mask.png") for i in range(4)],
]
JUNK = [".DS_Store", "notes.txt", "train/good/.DS_Store", "train/good/Thumbs.db", "train/good/desktop.ini",
        "test/.DS_Store", "test/desktop.ini", "test/good/notes.txt", "test/Defective/Thumbs.db",
        "ground_truth/.DS_Store", "ground_truth/Defective/.DS_Store", "ground_truth/Defective/Thumbs.db"]


def _appledouble_bytes() -> bytes:
    """A macOS AppleDouble resource-fork file (what Finder writes as `._NAME` on FAT/exFAT/SMB/zip): not an image."""
    header = struct.pack(">II16sH", 0x00051607, 0x00020000, b"Mac OS X        ", 2)
    entries = struct.pack(">III", 9, 50, 32) + struct.pack(">III", 2, 82, 4014)  # Finder info, resource fork
    body = header + entries
    return body + b"\x00" * (4096 - len(body))


def _save(src: Path, dst: Path, encoding: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    img = Image.open(src).convert("RGB")
    if encoding == "png":
        shutil.copyfile(src, dst)
    elif encoding == "L":
        img.convert("L").save(dst, format="PNG")
    elif encoding == "RGBA":
        rgba = img.convert("RGBA")
        alpha = np.full(img.size[::-1], 255, dtype=np.uint8)
        alpha[:, : img.size[0] // 4] = 0  # a transparent band, as in a cut-out photo
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(dst, format="PNG")
    elif encoding == "I16":  # a 16-bit grayscale scan: the 8-bit gray levels spread over 0..65535
        gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(dst, format="PNG")
    else:
        img.save(dst, format=encoding)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """DATA/bottle with real-world names; returns (data_dir, category folder, synthetic source folder)."""
    base = tmp_path_factory.mktemp("real_world")
    src = make_synthetic_mvtec(base / "src", CATEGORY, n_train_good=12, n_test_good=4, n_per_defect=4,
                               image_size=48, seed=0)
    data = base / "DATA"
    folder = data / CATEGORY
    for source, dest, encoding, mask in PLAN:
        _save(src / source, folder / dest, encoding)
        if mask:
            defect = Path(source).parent.name
            (folder / mask).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "ground_truth" / defect / f"{Path(source).stem}_mask.png", folder / mask)
    for junk in JUNK:
        (folder / junk).write_bytes(b"\x00\x00\x00\x01Bud1" if junk.endswith(".DS_Store") else b"[.ShellClassInfo]\r\n")
    (data / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / APPLEDOUBLE).write_bytes(_appledouble_bytes())
    return data, folder, src


def _not_appledouble(paths):
    return {p for p in paths if not Path(p).name.startswith("._")}


def restored_mask(split, path):
    return next(s.mask_path for part in split.values() for s in part if s.path == path)


def _clean_split(split):
    """The split without the AppleDouble file, so that decoding tests check decoding only
    (the `._` file itself is covered by the tests named *appledouble*)."""
    return {k: [s for s in v if not Path(s.path).name.startswith("._")] for k, v in split.items()}


@pytest.fixture(scope="module")
def loaders(tree):
    data, _, _ = tree
    split, _ = prepare_split(data, CATEGORY, seed=0)
    split = _clean_split(split)
    return split, make_loaders(data, CATEGORY, split, PRE, batch_size=8, seed=0)


# --------------------------------------------------------------------------------------------------
# The tree is what it claims to be
# --------------------------------------------------------------------------------------------------
def test_tree_has_the_real_world_formats(tree):
    _, folder, _ = tree
    modes = {dest: Image.open(folder / dest).mode for _, dest, _, _ in PLAN}
    formats = {dest: Image.open(folder / dest).format for _, dest, _, _ in PLAN}
    assert all(modes[p] == "I;16" for p in SIXTEEN_BIT)
    assert modes["train/good/gray 06.png"] == "L" and modes["test/good/rgba_ok_3.png"] == "RGBA"
    assert formats["train/good/IMG_0003.JPG"] == "JPEG" and formats["test/Defective/DSC 0042.JPG"] == "JPEG"
    assert formats["train/good/Scan 0005.BMP"] == "BMP"
    with pytest.raises(Exception):
        Image.open(folder / APPLEDOUBLE)


# --------------------------------------------------------------------------------------------------
# Indexing
# --------------------------------------------------------------------------------------------------
def test_index_labels_real_defect_names_and_masks(tree):
    data, folder, _ = tree
    samples = {s.path: s for s in index_category(data, CATEGORY)}
    expected = {dest: (source, mask) for source, dest, _, mask in PLAN}
    assert _not_appledouble(samples) == set(expected)  # no .DS_Store / Thumbs.db / desktop.ini / notes.txt
    for path, (source, mask) in expected.items():
        s = samples[path]
        good = path.startswith(("train/good/", "test/good/"))
        assert s.label == (0 if good else 1), path
        assert s.defect_type == ("good" if good else Path(path).parent.name), path
        assert s.mask_path == mask, path
        if mask:
            assert (folder / s.mask_path).is_file()
    assert {s.defect_type for s in samples.values() if s.label == 1} == REAL_DEFECTS  # names kept as on disk
    assert samples["test/Defective/IMG 001 (copy).PNG"].mask_path == "ground_truth/Defective/IMG 001 (copy)_mask.png"
    assert samples["test/broken large (2)/Cassé Épais.BMP"].mask_path.endswith("Cassé Épais_mask.png")


def test_index_ignores_appledouble_file(tree):
    data, _, _ = tree
    paths = {s.path for s in index_category(data, CATEGORY)}
    assert APPLEDOUBLE not in paths
    assert paths == {dest for _, dest, _, _ in PLAN}


def test_appledouble_file_is_ignored_or_reported_clearly(tree):
    """Current behaviour at worst: the `._` file is indexed, then decoding it is a UserError naming it
    (one clear line from the CLI), never a raw exception."""
    data, _, _ = tree
    split, _ = prepare_split(data, CATEGORY, seed=0)
    if any(Path(s.path).name.startswith("._") for part in split.values() for s in part):
        with pytest.raises(UserError, match=r"\._IMG 001\.png"):
            make_loaders(data, CATEGORY, split, PRE, batch_size=8, seed=0)


# --------------------------------------------------------------------------------------------------
# The split and its manifest
# --------------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_every_real_defect_is_in_test(tree):
    data, _, _ = tree
    split, manifest = prepare_split(data, CATEGORY, seed=7)
    again, manifest_again = prepare_split(data, CATEGORY, seed=7)
    assert again == split and manifest_again == manifest
    assert {s.defect_type for s in split["test"]} == {"good", *REAL_DEFECTS}
    assert {s.defect_type for s in split["train"]} == {"good", *REAL_DEFECTS}
    paths = [s.path for part in split.values() for s in part]
    assert len(paths) == len(set(paths))
    assert _not_appledouble(paths) == {dest for _, dest, _, _ in PLAN}


def test_manifest_round_trips_through_json_with_real_names(tree, tmp_path):
    data, folder, _ = tree
    split, manifest = prepare_split(data, CATEGORY, seed=3)
    assert split_from_manifest(json.loads(json.dumps(split_manifest(CATEGORY, split, 3, 0.15, 0.25)))) == split
    path = tmp_path / "dossier modèles (v2)" / "split.json"
    write_manifest(path, manifest)
    write_manifest(path, manifest)  # same split again: kept as is, no backup
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == manifest
    restored = split_from_manifest(loaded)
    assert restored == split
    names = {s.path for part in restored.values() for s in part}
    assert {"test/Defective/défaut_01.png", "test/broken large (2)/001 (1).png", "train/good/IMG 001 (copy).PNG"} <= names
    assert all((folder / s.path).is_file() for part in restored.values() for s in part)
    assert restored_mask(restored, "test/Defective/IMG 001 (copy).PNG") == "ground_truth/Defective/IMG 001 (copy)_mask.png"


# --------------------------------------------------------------------------------------------------
# Decoding and loaders
# --------------------------------------------------------------------------------------------------
def test_loaders_yield_rgb_tensors_for_every_image(loaders):
    split, built = loaders
    h, w = PRE["image_size"]
    seen = 0
    for name, loader in built.items():
        dataset = loader.dataset
        assert [s.path for s in dataset.samples] == [s.path for s in split[name]]
        for sample, pixels in zip(dataset.samples, dataset.images):
            assert pixels.shape == (3, h, w) and pixels.dtype == torch.uint8, sample.path
        n = 0
        for x, y in loader:
            assert x.shape[1:] == (3, h, w) and x.dtype == torch.float32 and torch.isfinite(x).all()
            assert y.dtype == torch.long and set(y.tolist()) <= {0, 1}
            n += len(y)
        assert n == len(split[name])
        seen += n
    assert seen == len(PLAN)


def test_grayscale_and_rgba_images_become_plausible_rgb(loaders):
    _, built = loaders
    pixels = {s.path: img for loader in built.values() for s, img in zip(loader.dataset.samples, loader.dataset.images)}
    gray = pixels["train/good/gray 06.png"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and gray.float().std() > 10
    rgba = pixels["test/good/rgba_ok_3.png"].float()
    assert rgba[:, :, :6].max() == 0  # transparent band composited on black
    assert rgba[:, :, 12:].std() > 10


def test_sixteen_bit_png_keeps_its_contrast(tree, loaders):
    _, folder, src = tree
    _, built = loaders
    pixels = {s.path: img for loader in built.values() for s, img in zip(loader.dataset.samples, loader.dataset.images)}
    sources = {dest: source for source, dest, _, _ in PLAN}
    for path in SIXTEEN_BIT:
        got = pixels[path].float() / 255.0
        assert got.shape == (3, *PRE["image_size"])
        saturated, std = float((got >= 254 / 255).float().mean()), float(got.std())
        assert saturated < 0.5, f"{path}: {saturated:.0%} of the pixels are saturated white"
        assert std > 0.05, f"{path}: no contrast left (std {std:.3f})"
        reference = preprocess_image(Image.open(src / sources[path]).convert("L").convert("RGB"), PRE).float()
        corr = np.corrcoef(got[0].flatten().numpy(), reference[0].flatten().numpy())[0, 1]
        assert corr > 0.9, f"{path}: not the picture that was saved (correlation {corr:.2f})"


# --------------------------------------------------------------------------------------------------
# load_test.find_images
# --------------------------------------------------------------------------------------------------
def test_find_images_returns_images_only(tree):
    _, folder, _ = tree
    found = find_images(folder, limit=1000)
    rel = {p.relative_to(folder).as_posix() for p in found}
    assert _not_appledouble(rel) == {dest for _, dest, _, _ in PLAN}  # no masks, no .DS_Store/Thumbs.db/notes.txt
    assert not any("ground_truth" in p for p in rel)
    test_only = {p.relative_to(folder / "test").as_posix() for p in find_images(folder / "test", limit=1000)}
    assert test_only == {dest[len("test/"):] for _, dest, _, _ in PLAN if dest.startswith("test/")}


def test_find_images_ignores_appledouble_file(tree):
    _, folder, _ = tree
    rel = {p.relative_to(folder).as_posix() for p in find_images(folder, limit=1000)}
    assert APPLEDOUBLE not in rel


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def test_cli_summary_prints_real_defect_names(tree, cli):
    data, _, _ = tree
    result = cli("mvtec_dataset.py", "--data-dir", data, "--category", CATEGORY)
    assert result.returncode == 0, result.stderr
    for defect in REAL_DEFECTS:
        assert defect in result.stdout
    assert f"{len(PLAN)} labelled images" in result.stdout
