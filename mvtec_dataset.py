"""MVTec AD as a supervised good/anomaly dataset: indexing, the shared train/val/test split, preprocessing,
and a small synthetic MVTec-like tree for tests and the offline demo.

MVTec AD's train/ folder holds only good parts. A classifier needs defects in training too, so all labelled
images of a category (train/good, test/good, test/<defect>) are pooled and split once, seeded and
stratified by defect type, into train / val / test. Every defect type appears in test. The split is saved
as a JSON manifest (and inside every checkpoint) so that all scripts evaluate on exactly the same images.

    python mvtec_dataset.py --data-dir ./data/mvtec --category bottle      # summary of a category
    python mvtec_dataset.py --make-synthetic ./data/synthetic               # write the synthetic tree
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import inference
from inference import image_files
from lab_io import (ArgumentParser, UserError, atomic_write_text, finite_float, format_table,
                    output_file, positive_int, run_cli)

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
              "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
SPLIT_FORMAT = "tp4-mvtec-split-v1"
GET_DATA_HINT = ("to get the data: `python download_mvtec.py --category {category} --output {data_dir}`, "
                 "or a synthetic tree: `python mvtec_dataset.py --make-synthetic DIR` (then --data-dir DIR)")


@dataclass(frozen=True)
class Sample:
    path: str          # relative to the category folder, e.g. "test/broken_large/000.png"
    label: int         # 0 = good, 1 = anomaly
    defect_type: str   # "good" or the MVTec defect folder name
    mask_path: str | None = None  # relative ground-truth mask, anomalies only


# --------------------------------------------------------------------------------------------------
# Indexing
# --------------------------------------------------------------------------------------------------
def category_dir(data_dir: str | Path, category: str) -> Path:
    if not category or "/" in category or "\\" in category or category.startswith("."):
        raise UserError(f"invalid category name {category!r}; MVTec AD has: {', '.join(CATEGORIES)}.")
    root = Path(data_dir)
    folder = root / category
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        known = f" (found there: {', '.join(found)})" if found else ""
        if category not in CATEGORIES:
            raise UserError(f"no dataset folder {folder}{known}: '{category}' is not an MVTec AD category "
                            f"({', '.join(CATEGORIES)}).")
        raise UserError(f"no dataset folder {folder}{known}; "
                        + GET_DATA_HINT.format(category=category, data_dir=data_dir))
    return folder


def index_category(data_dir: str | Path, category: str) -> list[Sample]:
    """Every labelled image of ROOT/CATEGORY with its label, defect type and mask (MVTec AD layout)."""
    folder = category_dir(data_dir, category)
    hint = GET_DATA_HINT.format(category=category, data_dir=data_dir)
    for sub in ("train/good", "test/good"):
        if not (folder / sub).is_dir() or not image_files(folder / sub):
            raise UserError(f"{folder / sub} is missing or holds no image: {folder} is not a complete MVTec AD "
                            f"category; {hint}")
    samples = [Sample(p.relative_to(folder).as_posix(), 0, "good") for p in image_files(folder / "train/good")]
    samples += [Sample(p.relative_to(folder).as_posix(), 0, "good") for p in image_files(folder / "test/good")]
    defects = sorted(d.name for d in (folder / "test").iterdir()
                     if d.is_dir() and d.name != "good" and not d.name.startswith("."))
    if not defects:
        raise UserError(f"{folder / 'test'} has no defect folder (e.g. test/broken_large): "
                        f"an anomaly classifier needs defective examples; {hint}")
    for defect in defects:
        images = image_files(folder / "test" / defect)
        if not images:
            raise UserError(f"{folder / 'test' / defect} holds no image; {hint}")
        for p in images:
            mask = folder / "ground_truth" / defect / f"{p.stem}_mask.png"
            samples.append(Sample(p.relative_to(folder).as_posix(), 1, defect,
                                  mask.relative_to(folder).as_posix() if mask.is_file() else None))
    return samples


def count_table(samples: list[Sample], split: dict[str, list[Sample]] | None = None) -> str:
    """Images per defect type (and per split when given), as a printable table."""
    groups = sorted({s.defect_type for s in samples}, key=lambda d: (d != "good", d))
    parts = split or {"all": samples}
    rows = []
    for defect in groups:
        row = {"defect_type": defect, "label": "good" if defect == "good" else "anomaly"}
        for name, items in parts.items():
            row[name] = sum(s.defect_type == defect for s in items)
        rows.append(row)
    total = {"defect_type": "TOTAL", "label": ""}
    for name, items in parts.items():
        total[name] = len(items)
    rows.append(total)
    return format_table(rows, ["defect_type", "label", *parts.keys()])


# --------------------------------------------------------------------------------------------------
# The shared split
# --------------------------------------------------------------------------------------------------
def make_split(samples: list[Sample], seed: int = 42, val_frac: float = 0.15, test_frac: float = 0.25
               ) -> dict[str, list[Sample]]:
    """Seeded split stratified by defect type ('good' is one group): no image in two splits, every defect
    type in test (and in train when it has >= 2 images). Deterministic for the same files and seed."""
    if not (0 <= val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise UserError("split fractions must satisfy 0 <= val < 1, 0 < test < 1 and val + test < 1.")
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": [], "test": []}
    for defect in sorted({s.defect_type for s in samples}):
        group = sorted((s for s in samples if s.defect_type == defect), key=lambda s: s.path)
        order = rng.permutation(len(group))
        n = len(group)
        n_test = max(1, round(n * test_frac))
        n_val = round(n * val_frac) if n - n_test >= 2 else 0
        n_val = min(n_val, max(0, n - n_test - 1))
        picked = [group[i] for i in order]
        split["test"] += picked[:n_test]
        split["val"] += picked[n_test:n_test + n_val]
        split["train"] += picked[n_test + n_val:]
    for name in split:
        split[name].sort(key=lambda s: s.path)
    return split


def split_manifest(category: str, split: dict[str, list[Sample]], seed: int, val_frac: float,
                   test_frac: float) -> dict:
    """The JSON-able description of a split, embedded in checkpoints and written next to the models."""
    return {"format": SPLIT_FORMAT, "category": category, "seed": seed,
            "fractions": {"val": val_frac, "test": test_frac},
            "counts": {k: len(v) for k, v in split.items()},
            "splits": {k: [asdict(s) for s in v] for k, v in split.items()}}


def split_from_manifest(manifest: dict) -> dict[str, list[Sample]]:
    if not isinstance(manifest, dict) or manifest.get("format") != SPLIT_FORMAT:
        raise UserError("the split manifest is not one written by this lab (format field missing or unknown).")
    return {k: [Sample(**s) for s in v] for k, v in manifest["splits"].items()}


def save_manifest(path: str | Path, manifest: dict, overwrite: bool | None = None) -> Path:
    return atomic_write_text(path, json.dumps(manifest, indent=1), overwrite)


def write_manifest(path: str | Path, manifest: dict, overwrite: bool = False) -> None:
    """Save the split next to the models; an earlier, different split is kept with its timestamp."""
    path = Path(path)
    if path.exists():
        try:
            if json.loads(path.read_text(encoding="utf-8")) == manifest:
                return
        except (OSError, ValueError):
            pass
    save_manifest(path, manifest, overwrite)


def prepare_split(data_dir, category: str, seed: int = 42, val_frac: float = 0.15, test_frac: float = 0.25):
    """Index a category and split it. Returns (split dict, manifest dict)."""
    samples = index_category(data_dir, category)
    split = make_split(samples, seed, val_frac, test_frac)
    check_split_classes(category, split)
    return split, split_manifest(category, split, seed, val_frac, test_frac)


def check_split_classes(category: str, split: dict) -> None:
    """Each part needs a good and a defective image: train to learn both, val to choose the threshold, test to
    measure; a folder with a handful of images would otherwise train and report numbers that mean nothing."""
    counts = {name: (sum(not s.label for s in part), sum(s.label for s in part)) for name, part in split.items()}
    empty = [f"{'defective' if good else 'good'} image in {name}" for name, (good, bad) in counts.items()
             if not good or not bad]
    if empty:
        shown = ", ".join(f"{name} {good} good / {bad} defective" for name, (good, bad) in counts.items())
        raise UserError(f"category '{category}' has too few images to split: no {empty[0]} ({shown}); MVTec AD "
                        "has 100 to 400 good training images and dozens of defective ones per category")


# --------------------------------------------------------------------------------------------------
# Images and preprocessing
# --------------------------------------------------------------------------------------------------
def open_dataset_image(path: str | Path) -> Image.Image:
    """Open any image as 3-channel RGB (inference.load_rgb: grayscale, palette, RGBA, 16-bit); a broken file is a
    UserError naming it."""
    try:
        return inference.load_rgb(path)
    except inference.ImageError as exc:
        if not Path(path).exists():
            raise UserError(f"image {path} not found (the dataset changed since the split was made?).") from None
        raise UserError(f"cannot read image: {exc}. Replace or delete this file.") from None


def preprocess_image(img: Image.Image, preprocessing: dict) -> torch.Tensor:
    """PIL RGB -> uint8 tensor [3, H, W] at the model's input size (inference.resize_uint8)."""
    return torch.from_numpy(inference.resize_uint8(img, preprocessing))


def normalize_tensor(pixels_uint8: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """uint8 [.., 3, H, W] -> float32 normalised with the model's mean/std (inference.normalize)."""
    return torch.from_numpy(inference.normalize(pixels_uint8.numpy(), preprocessing))


def image_to_tensor(path_or_image, preprocessing: dict) -> torch.Tensor:
    """One image file (or PIL image) -> normalised float tensor [3, H, W], exactly as in evaluation and serving."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else open_dataset_image(path_or_image)
    return torch.from_numpy(inference.preprocess(img, preprocessing))


def train_augmentation(kind: str = "light"):
    """'light': augmentations that keep defects visible (flips, small rotation, small colour changes; for models
    trained from scratch); 'flips': flips only; 'none' (fine-tuning from a linear probe)."""
    from torchvision.transforms import v2

    if kind == "none":
        return None
    if kind == "flips":
        return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                       v2.RandomApply([v2.RandomRotation(10)], p=0.3),
                       v2.ColorJitter(brightness=0.1, contrast=0.1)])


class MVTecDataset(Dataset):
    """(normalised pixels, label) for a list of samples. Images are decoded and resized once, up front,
    and kept in memory as uint8, so an epoch does not decode 900x900 PNGs again."""

    def __init__(self, category_root: str | Path, samples: list[Sample], preprocessing: dict,
                 train: bool = False, desc: str = "decoding images", augment: str = "light"):
        self.root = Path(category_root)
        self.samples = list(samples)
        self.preprocessing = preprocessing
        self.augment = train_augmentation(augment) if train else None
        self.images = [preprocess_image(open_dataset_image(self.root / s.path), preprocessing)
                       for s in tqdm(self.samples, desc=desc, unit="img", leave=False)]
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        pixels = self.images[i]
        if self.augment is not None:
            pixels = self.augment(pixels)
        return normalize_tensor(pixels, self.preprocessing), self.labels[i]

    @property
    def defect_types(self) -> list[str]:
        return [s.defect_type for s in self.samples]


def make_loaders(data_dir, category: str, split: dict[str, list[Sample]], preprocessing: dict,
                 batch_size: int = 16, names=("train", "val", "test"), seed: int = 42,
                 augment: str = "light") -> dict:
    """DataLoaders for the requested splits (train shuffled and augmented). Checks that every image of the
    manifest exists before decoding anything."""
    root = category_dir(data_dir, category)
    missing = [s.path for name in names for s in split[name] if not (root / s.path).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the saved split are missing under {root} "
                        f"(first: {missing[0]}): use the same --data-dir as when the model was trained.")
    loaders = {}
    for name in names:
        dataset = MVTecDataset(root, split[name], preprocessing, train=(name == "train"),
                               desc=f"decoding {name} images", augment=augment)
        generator = torch.Generator().manual_seed(seed)
        loaders[name] = DataLoader(dataset, batch_size=batch_size, shuffle=(name == "train"), generator=generator,
                                   drop_last=False, num_workers=0)
    return loaders


def selection_loader(loaders: dict, batch_size: int = 16) -> DataLoader:
    """The train + val images of `loaders` (lab_targets.SELECTION_SPLITS) in one fixed order, not augmented: what
    every guard compares a variant with its reference on. Never the test split."""
    from torch.utils.data import ConcatDataset

    from lab_targets import SELECTION_SPLITS

    datasets = [loaders[name].dataset for name in SELECTION_SPLITS]
    if any(ds.augment is not None for ds in datasets):
        raise ValueError("selection images must not be augmented: build the loaders with augment='none'")
    return DataLoader(ConcatDataset(datasets), batch_size=batch_size, shuffle=False, num_workers=0)


# --------------------------------------------------------------------------------------------------
# Synthetic MVTec-like tree (tests, offline demo)
# --------------------------------------------------------------------------------------------------
SYNTHETIC_DEFECTS = ("broken_large", "contamination", "crack")


def _draw_part(rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[float, float, float]]:
    """A bottle seen from above: dark background, bright ring with a shaded neck, small random pose."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(8, 24, 3)))
    draw = ImageDraw.Draw(img)
    cx, cy = size / 2 + rng.normal(0, size * 0.02, 2)
    r = size * rng.uniform(0.33, 0.37)
    base = rng.integers(150, 175)
    for k in range(12):  # radial shading of the body
        rk = r * (1 - k / 12)
        shade = int(base - 6 * k)
        draw.ellipse([cx - rk, cy - rk, cx + rk, cy + rk], fill=(shade, shade - 10, shade - 30))
    rn = r * 0.45
    draw.ellipse([cx - rn, cy - rn, cx + rn, cy + rn], fill=(40, 35, 30), outline=(200, 190, 160), width=2)
    noise = rng.normal(0, 4, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr), (cx, cy, r)


def _draw_defect(img: Image.Image, defect: str, geom, rng: np.random.Generator) -> Image.Image:
    """Paint one visible defect and return its binary mask (255 = defect)."""
    cx, cy, r = geom
    size = img.size[0]
    mask = Image.new("L", img.size, 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    angle = rng.uniform(0, 2 * math.pi)
    if defect == "broken_large":  # a dark wedge bitten out of the rim
        start = math.degrees(angle)
        box = [cx - r * 1.02, cy - r * 1.02, cx + r * 1.02, cy + r * 1.02]
        draw.pieslice(box, start, start + rng.uniform(35, 60), fill=(12, 12, 12))
        mdraw.pieslice(box, start, start + 60, fill=255)
        draw.ellipse([cx - r * 0.45, cy - r * 0.45, cx + r * 0.45, cy + r * 0.45], fill=(40, 35, 30))
    elif defect == "contamination":  # a reddish-brown blob on the body
        d = r * rng.uniform(0.55, 0.8)
        px, py = cx + d * math.cos(angle), cy + d * math.sin(angle)
        rb = size * rng.uniform(0.09, 0.12)
        draw.ellipse([px - rb, py - rb, px + rb, py + rb], fill=(150, 40, 30))
        mdraw.ellipse([px - rb, py - rb, px + rb, py + rb], fill=255)
    elif defect == "crack":  # a thin dark zig-zag across the body
        points, d = [], r * 0.5
        for k in range(6):
            a = angle + rng.normal(0, 0.15)
            points.append((cx + (d + k * r * 0.09) * math.cos(a), cy + (d + k * r * 0.09) * math.sin(a)))
            angle += rng.normal(0, 0.2)
        draw.line(points, fill=(10, 10, 10), width=max(3, size // 20))
        mdraw.line(points, fill=255, width=max(3, size // 20) + 2)
    else:
        raise ValueError(defect)
    return mask.filter(ImageFilter.MaxFilter(3))


def make_synthetic_mvtec(root: str | Path, category: str = "bottle", n_train_good: int = 60, n_test_good: int = 15,
                         n_per_defect: int = 15, image_size: int = 128, defects=SYNTHETIC_DEFECTS,
                         seed: int = 0) -> Path:
    """Write a small, deterministic MVTec-like tree ROOT/CATEGORY/{train/good, test/<type>, ground_truth/<type>}.

    Parts are bottle-like rings seen from above; defects (broken rim, contamination, crack) are clearly
    visible, with their masks. Returns the category folder. The tree is written beside it and renamed into place
    when complete: an interrupted run leaves no half tree, and an existing CATEGORY folder (real MVTec images have
    the same names) is refused, never written over."""
    folder = Path(root) / category
    if folder.exists():
        raise UserError(f"{folder} already exists: synthetic images are never written over a dataset; choose "
                        f"another folder, or delete {folder} to write a new synthetic tree")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{category}.partial-", dir=folder.parent))
    try:
        _draw_tree(partial, category, n_train_good, n_test_good, n_per_defect, image_size, defects, seed)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def _draw_tree(folder: Path, category: str, n_train_good: int, n_test_good: int, n_per_defect: int,
               image_size: int, defects, seed: int) -> None:
    rng = np.random.default_rng(seed)
    plan = [("train/good", None, n_train_good), ("test/good", None, n_test_good)]
    plan += [(f"test/{d}", d, n_per_defect) for d in defects]
    total = sum(n for *_, n in plan)
    with tqdm(total=total, desc=f"synthetic {category}", unit="img", leave=False) as bar:
        for sub, defect, count in plan:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            if defect:
                (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img, geom = _draw_part(rng, image_size)
                if defect:
                    mask = _draw_defect(img, defect, geom, rng)
                    mask.save(folder / "ground_truth" / defect / f"{i:03d}_mask.png")
                img.save(folder / sub / f"{i:03d}.png")
                bar.update()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = ArgumentParser(description="Summarise an MVTec AD category and its train/val/test split, "
                                        "or write a synthetic MVTec-like tree.")
    parser.add_argument("--data-dir", default="./data/mvtec", help="folder holding the category folders "
                        "(default: ./data/mvtec)")
    parser.add_argument("--category", default="bottle", help="MVTec AD category (default: bottle)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/val/test split (default: 42)")
    parser.add_argument("--val-frac", type=finite_float, default=0.15, help="share of each defect type in val (0.15)")
    parser.add_argument("--test-frac", type=finite_float, default=0.25, help="share of each defect type in test (0.25)")
    parser.add_argument("--save-manifest", type=output_file, metavar="JSON",
                        help="also write the split manifest to this file")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="do not decode every image (by default each one is opened, so a corrupt file is named)")
    parser.add_argument("--make-synthetic", metavar="DIR", help="write a synthetic tree DIR/CATEGORY and exit")
    parser.add_argument("--image-size", type=positive_int, default=128,
                        help="side of synthetic images in pixels (128)")
    args = parser.parse_args(argv)

    if args.make_synthetic:
        folder = make_synthetic_mvtec(args.make_synthetic, args.category, image_size=args.image_size,
                                      seed=args.seed)
        print(f"synthetic category written to {folder}")
        args.data_dir = args.make_synthetic
    split, manifest = prepare_split(args.data_dir, args.category, args.seed, args.val_frac, args.test_frac)
    root = category_dir(args.data_dir, args.category)
    if not args.skip_image_check:
        for s in tqdm([s for part in split.values() for s in part], desc="checking images", unit="img"):
            open_dataset_image(root / s.path)
    all_samples = [s for part in split.values() for s in part]
    n_masks = sum(s.mask_path is not None for s in all_samples)
    print(f"MVTec AD category '{args.category}' in {root}: {len(all_samples)} labelled images, "
          f"{sum(s.label for s in all_samples)} anomalies, {n_masks} masks; split seed {args.seed}")
    print(count_table(all_samples, split))
    if args.save_manifest:
        save_manifest(args.save_manifest, manifest)
        print(f"split manifest written to {args.save_manifest}")
    return 0


if __name__ == "__main__":
    run_cli(main)
