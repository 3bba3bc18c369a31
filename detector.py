"""The good-only patch detector (the PatchCore / AnomalyDINO family) on the lab's ViT: the official split, patch
features of two blocks, the coreset memory bank, the threshold rule, fit -> evaluate -> save, metrics, ROC curves
and overlays. anomaly_detector.py is its command line; the pipeline calls evaluate(detector_options(...))."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engines import model_size_mb, save_openvino_ir
from inference import (DETECTOR_FORMAT, IMAGE_SCORE_TOP, MAP_SIZE, SIGMA_PATCHES, NearestPatches, anomaly_maps,
                       files_sha256, image_scores)
from lab_io import (UserError, append_csv_rows, atomic_write, cpu_name, environment_columns, format_table,
                    run_id, save_figure, size_on_disk_mb)
from lab_targets import DETECTOR_GOOD_THRESHOLD_RULE, DETECTOR_THRESHOLD_RULE, choose_threshold
from load_model_hf import OFFLINE_PRESETS, load_checkpoint, load_pretrained, read_checkpoint
from mvtec_dataset import (category_dir, image_to_tensor, index_category, open_dataset_image, prepare_split,
                           split_from_manifest)
from train_utils import base_model_of, set_seed, set_threads, truncate_backbone


# Every option of the detector with its default: anomaly_detector.py's flags, and what the pipeline passes.
DETECTOR_DEFAULTS = dict(category="bottle", data_dir="./data/mvtec", model_name="vit-base", layers="auto",
                         image_size=None, coreset=0.1, score_top=IMAGE_SCORE_TOP, max_bank=20000, threshold_from="val",
                         split_seed=42, holdout=0.1, engine="openvino", batch_size=16, compare_checkpoint=None,
                         overlays=3, num_threads=None, models_dir="modeles", results_dir="resultats", seed=0,
                         overwrite=False)


MAX_IMAGE_SIDE = 1024  # 73 x 73 DINOv2 patches per image, 10 times the default's: a larger side is a typo


def check_detector_options(options):
    """The options' ranges (UserError past them); returns the options."""
    if not 0 < options.coreset <= 1 or not 0 < options.holdout < 1 or not 0 <= options.score_top < 1:
        raise UserError("--coreset must be in (0, 1], --holdout in (0, 1) and --score-top in [0, 1).")
    if options.overlays < 0:
        raise UserError("--overlays must be >= 0.")
    return options


def detector_options(**given) -> SimpleNamespace:
    """DETECTOR_DEFAULTS with `given` (names of DETECTOR_DEFAULTS only), checked: what evaluate() takes."""
    unknown = set(given) - set(DETECTOR_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown detector option(s): {', '.join(sorted(unknown))}")
    return check_detector_options(SimpleNamespace(**{**DETECTOR_DEFAULTS, **given}))


# --------------------------------------------------------------------------------------------------
# Data: the official split
# --------------------------------------------------------------------------------------------------
def official_split(data_dir, category: str) -> dict:
    """MVTec AD's own split of the category (mvtec_dataset.index_category): {"train": [good paths of train/good],
    "test": [(path, label, defect_type, mask path or None) of test/], "has_masks": bool, "root": the folder}."""
    root = category_dir(data_dir, category)
    samples = index_category(data_dir, category)
    train = [root / s.path for s in samples if s.path.startswith("train/")]
    test = [(root / s.path, s.label, s.defect_type, root / s.mask_path if s.mask_path else None)
            for s in samples if s.path.startswith("test/")]
    return {"train": train, "test": test, "has_masks": any(t[3] is not None for t in test), "root": root}


def validation_images(args, root: Path, classifier: dict | None) -> list[tuple]:
    """The validation split of the lab's split as official_split's test tuples (path, label, defect type, mask):
    the one of the --compare-checkpoint `classifier`, else mvtec_dataset.prepare_split with --split-seed (the split
    benchmark_gpu.py makes with the same seed)."""
    if classifier is not None:
        samples = split_from_manifest(classifier["split"])["val"]
    else:
        samples = prepare_split(args.data_dir, args.category, args.split_seed)[0]["val"]
    val = [(root / s.path, s.label, s.defect_type, root / s.mask_path if s.mask_path else None) for s in samples]
    if len({t[1] for t in val}) < 2:
        raise UserError(f"the validation split holds {len(val)} image(s) but not good AND defective ones: nothing to "
                        f"choose the threshold on; use --threshold-from good.")
    return val


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------
class PatchFeatures(torch.nn.Module):
    """pixels [N, 3, H, W] -> L2-normalised patch features [N, gh * gw, D] from `layers` (1-based block indices,
    each block's tokens L2-normalised first: the deeper block's larger norm would otherwise outweigh the other),
    optionally averaged over a neighbourhood x neighbourhood window of the patch grid (1 = none: measured better on
    the dev kit's small screw defects, 0.848 vs 0.688 image AUROC with blocks 6+9)."""

    def __init__(self, model, layers: list[int], patch_size: int, neighbourhood: int = 1):
        super().__init__()
        self.neighbourhood = neighbourhood
        self.base, _ = base_model_of(model)
        if self.base is None:
            raise UserError(f"{type(model).__name__} is not a ViT / DeiT / DINOv2 classifier: no patch tokens.")
        self.layers, self.patch_size = list(layers), patch_size
        self.extra_tokens = 2 if hasattr(self.base.embeddings, "distillation_token") else 1  # DeiT distilled: 2

    def forward(self, pixels):
        hidden = self.base(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True) \
            if self._interpolates else self.base(pixel_values=pixels, output_hidden_states=True)
        gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        return patch_features(hidden.hidden_states, self.layers, (gh, gw), self.neighbourhood)

    @property
    def _interpolates(self) -> bool:
        return getattr(self.base.config, "model_type", "") != "dinov2"  # DINOv2 always interpolates


def patch_features(hidden_states, layers: list[int], grid: tuple[int, int], neighbourhood: int = 1) -> torch.Tensor:
    """The hidden states of a ViT pass -> L2-normalised patch features [N, gh * gw, D] of `layers` (PatchFeatures'
    rule; the hybrid classifier applies it to its own pass)."""
    gh, gw = grid
    maps = []
    for layer in layers:
        tokens = hidden_states[layer][:, -gh * gw:]  # patch tokens (after CLS / distillation tokens)
        grid_map = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)  # batch axis stays dynamic
        if neighbourhood > 1:  # PatchCore's local averaging: it blurs defects of a patch or two away
            grid_map = F.avg_pool2d(grid_map, neighbourhood, stride=1, padding=neighbourhood // 2,
                                    count_include_pad=False)
        maps.append(F.normalize(grid_map, dim=1))
    feats = torch.cat(maps, 1).flatten(2).transpose(1, 2)
    return F.normalize(feats, dim=-1)


def resolve_layers(spec: str, depth: int) -> list[int]:
    """'auto' = the blocks at 1/3 and 2/3 of the depth (mid-level features, PatchCore's choice for CNNs; measured in
    docs/guide.md, section 11); or a comma-separated list of 1-based block indices."""
    if spec == "auto":
        return sorted({max(1, depth // 3), max(1, (2 * depth) // 3)})
    try:
        layers = sorted({int(v) for v in spec.split(",")})
    except ValueError:
        raise UserError(f"--layers takes auto or block numbers like 6,9, not {spec!r}.") from None
    if not layers or min(layers) < 1 or max(layers) > depth:
        raise UserError(f"--layers {spec}: blocks must be between 1 and {depth} for this model.")
    return layers


@torch.inference_mode()
def extract(extractor, paths: list[Path], pre: dict, batch_size: int, desc: str) -> torch.Tensor:
    """[len(paths), patches, D] float32 features of image files (one preprocessing: inference.preprocess).
    `extractor`: the PyTorch PatchFeatures, or an inference.Runner of its ONNX / OpenVINO export."""
    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False):
        batch = torch.stack([image_to_tensor(open_dataset_image(p), pre) for p in paths[i:i + batch_size]])
        if isinstance(extractor, torch.nn.Module):
            out.append(extractor(batch).float())
        else:
            out.append(torch.from_numpy(extractor.run(batch.numpy())).float())
    return torch.cat(out)


ENGINES = ("torch", "openvino", "openvino-int8")


# Patches per side of the input by default: a ViT's 16 x 16 grid at 224 px is coarser than PatchCore's 28 x 28 CNN
# grid, and one patch covers ~62 px of a 1000-px MVTec image, more than many defects (docs/guide.md, section 11).
GRID_PATCHES = 24


def compile_backbone(extractor: PatchFeatures, pre: dict, engine: str, path: Path, calibration: list[Path],
                     threads: int | None, overwrite: bool):
    """The feature extractor for `engine`: itself (torch), or exported to ONNX (engines.export_onnx, checked
    against PyTorch) and run by OpenVINO in fp32, or int8 by NNCF (calibrated on good training images) saved as IR.
    Returns (runner or module, file or None)."""
    if engine == "torch":
        return extractor, None
    from inference import Runner
    from engines import export_onnx

    onnx_path = path.with_suffix(".onnx")
    export_onnx(extractor, onnx_path, pre, overwrite=overwrite)
    if engine == "openvino":
        return Runner(onnx_path, "openvino", threads, "f32"), onnx_path
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    items = [image_to_tensor(open_dataset_image(p), pre).numpy()[None] for p in calibration]
    quantized = nncf.quantize(ov.Core().read_model(str(onnx_path)), nncf.Dataset(items), subset_size=len(items),
                              model_type=nncf.ModelType.TRANSFORMER)
    xml = save_openvino_ir(quantized, path.with_suffix(".xml"), overwrite)
    return Runner(xml, "openvino", threads, "f32"), xml


# --------------------------------------------------------------------------------------------------
# Memory bank, scoring, maps
# --------------------------------------------------------------------------------------------------
def greedy_coreset(features: torch.Tensor, n: int, seed: int = 0, projection_dim: int = 128) -> torch.Tensor:
    """Indices of `n` rows chosen by greedy k-center selection (each new row is the one farthest from those already
    chosen), computed in a random projection of `projection_dim` dimensions as PatchCore does."""
    if n >= len(features):
        return torch.arange(len(features))
    gen = torch.Generator().manual_seed(seed)
    proj = features.float() @ torch.randn(features.shape[1], min(projection_dim, features.shape[1]), generator=gen)
    norms = (proj * proj).sum(1)

    def squared_distances(i: int) -> torch.Tensor:  # |a|^2 - 2 a.b + |b|^2: one matrix-vector product, 15x cdist
        return (norms - 2.0 * (proj @ proj[i]) + norms[i]).clamp_(min=0.0)

    chosen = [int(torch.randint(len(features), (1,), generator=gen))]
    dist = squared_distances(chosen[0])
    for _ in tqdm(range(n - 1), desc="coreset", unit="patch", leave=False, mininterval=1.0):
        idx = int(dist.argmax())
        chosen.append(idx)
        dist = torch.minimum(dist, squared_distances(idx))
    return torch.tensor(chosen)


# --------------------------------------------------------------------------------------------------
# The detector: fit, score, save, load
# --------------------------------------------------------------------------------------------------
class Detector:
    def __init__(self, model, pre: dict, model_name: str, layers: list[int], bank: torch.Tensor | None = None,
                 threshold: float | None = None):
        self.pre, self.model_name, self.layers = pre, model_name, layers
        patch = int(getattr(model.config, "patch_size", 16))
        self.extractor = PatchFeatures(model, layers, patch).eval()
        self.grid = (pre["image_size"][0] // patch, pre["image_size"][1] // patch)
        self.bank, self.threshold, self.threshold_rule = bank, threshold, None
        self.runner, self.engine, self.backbone_file = None, "torch", None
        self.score_top = IMAGE_SCORE_TOP
        self._nearest = None  # (bank, inference.NearestPatches of it), built at the first scoring

    def features(self, paths, batch_size, desc):
        return extract(self.runner or self.extractor, paths, self.pre, batch_size, desc)

    def score_features(self, feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(image scores = mean of the top `score_top` share of patch distances, smoothed anomaly maps for
        localisation): inference.py's functions, the very ones inference.PatchDetector serves with."""
        if self._nearest is None or self._nearest[0] is not self.bank:  # built once per bank
            self._nearest = (self.bank, NearestPatches(self.bank.float().numpy(), torch.get_num_threads()))
        patches = self._nearest[1](feats.numpy())
        return image_scores(patches, self.score_top), anomaly_maps(patches, self.grid)

    def config(self) -> dict:
        return {"format": DETECTOR_FORMAT, "model_name": self.model_name, "layers": self.layers,
                "preprocessing": {k: self.pre[k] for k in ("image_size", "mean", "std")}, "grid": list(self.grid),
                "threshold": self.threshold, "threshold_rule": self.threshold_rule, "image_score_top": self.score_top,
                "features": "each block's patch tokens L2-normalised, concatenated, L2-normalised",
                "sigma_patches": SIGMA_PATCHES,
                "map_size": MAP_SIZE, "bank_patches": int(len(self.bank)), "bank_dtype": str(self.bank.dtype),
                "engine": self.engine, "backbone_file": self.backbone_file.name if self.backbone_file else None,
                "backbone_sha256": files_sha256(self.backbone_file) if self.backbone_file else None}

    def save(self, path: Path, extra: dict, overwrite: bool) -> Path:
        """Bank (float16) + configuration in one safetensors file: tensors and JSON text, nothing executable."""
        from safetensors.torch import save_file

        meta = {"config": json.dumps({**self.config(), **extra})}

        def write(tmp: Path) -> None:
            save_file({"bank": self.bank.contiguous()}, str(tmp), metadata=meta)

        return atomic_write(path, write, overwrite)


def default_image_size(model_name: str, pre: dict, patch: int) -> int:
    """GRID_PATCHES patches per side for a pretrained backbone; the offline presets (random init, the demo's 96-px
    synthetic images) keep their own input size: no pretrained feature is there to resolve finer defects."""
    if model_name in OFFLINE_PRESETS:
        return int(pre["image_size"][0])
    return GRID_PATCHES * patch


def load_backbone(model_name: str, seed: int):
    """A hub id / local folder / preset (load_pretrained), or a fine-tuned checkpoint of this lab (.pth)."""
    if model_name.endswith(".pth"):
        model, ckpt = load_checkpoint(model_name)
        return model, ckpt["preprocessing"], ckpt["model_name"]
    model, pre, _ = load_pretrained(model_name, seed=seed)
    return model, pre, model_name


# --------------------------------------------------------------------------------------------------
# Metrics, figures
# --------------------------------------------------------------------------------------------------
def load_masks(test: list, size: int = MAP_SIZE) -> np.ndarray:
    """Binary masks [N, size, size] (all zero for good images and defects without a mask file)."""
    from PIL import Image

    masks = np.zeros((len(test), size, size), dtype=bool)
    for i, (_, _, _, mask) in enumerate(test):
        if mask is not None:
            with Image.open(mask) as m:
                masks[i] = np.asarray(m.convert("L").resize((size, size), Image.NEAREST)) > 127
    return masks


def metrics(test, scores: np.ndarray, maps: np.ndarray | None, masks: np.ndarray | None, threshold: float) -> list:
    """Rows: all defect types together, then each defect type against the good test images."""
    from sklearn.metrics import roc_auc_score

    labels = np.array([t[1] for t in test])
    types = np.array([t[2] for t in test])
    rows = []
    for defect in ["all", *sorted({t for t in types if t != "good"})]:
        keep = np.ones(len(test), bool) if defect == "all" else (types == "good") | (types == defect)
        y, s = labels[keep], scores[keep]
        pred = s >= threshold
        row = {"defect_type": defect, "n_test": int(keep.sum()), "image_auroc": float(roc_auc_score(y, s)),
               "accuracy": float((pred == y).mean()), "recall": float(pred[y == 1].mean()),
               "false_alarm_rate": float(pred[y == 0].mean()) if (y == 0).any() else float("nan")}
        if masks is not None and masks[keep].any():
            m = maps[keep].ravel()
            row["pixel_auroc"] = float(roc_auc_score(masks[keep].ravel(), m))
        rows.append(row)
    return rows


def plot_roc(test, scores, maps, masks, path: Path, title: str, overwrite: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.array([t[1] for t in test])
    panels = [("image", labels, scores)]
    if masks is not None and masks.any():
        step = max(1, masks.size // 2_000_000)  # a 2-million-pixel sample draws the same curve
        panels.append(("pixel", masks.ravel()[::step], maps.ravel()[::step]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.2), squeeze=False)
    for ax, (name, y, s) in zip(axes[0], panels):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"AUROC {roc_auc_score(y, s):.3f}")
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
        ax.set_title(f"{name}-level ROC ({'test images' if name == 'image' else 'pixels of the test images'})")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, path, overwrite)
    plt.close(fig)
    return out


def save_overlays(test, scores, maps, threshold: float, folder: Path, per_type: int, vmax: float) -> list[Path]:
    """For up to `per_type` images of each test folder: the image, its anomaly map in colour and the mask contour
    (red); the title gives the score, the threshold and the decision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    seen, written = {}, []
    for i, (path, label, defect, mask) in enumerate(test):
        if seen.get(defect, 0) >= per_type:
            continue
        seen[defect] = seen.get(defect, 0) + 1
        img = np.asarray(open_dataset_image(path).resize((MAP_SIZE, MAP_SIZE), Image.BILINEAR))
        fig, ax = plt.subplots(figsize=(4.2, 4.6))
        ax.imshow(img)
        im = ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=threshold * 0.8, vmax=vmax)
        if mask is not None:
            with Image.open(mask) as m:
                ax.contour(np.asarray(m.convert("L").resize((MAP_SIZE, MAP_SIZE), Image.NEAREST)) > 127,
                           levels=[0.5], colors="red", linewidths=1.2)
        decision = "anomaly" if scores[i] >= threshold else "good"
        ax.set_title(f"{defect}/{path.name}\nscore {scores[i]:.3f} vs threshold {threshold:.3f}: {decision}"
                     + ("\n(red: true defect mask)" if mask is not None else ""), fontsize=8)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="anomaly (patch distance)")
        out = folder / f"{defect}_{path.stem}.png"
        save_figure(fig, out, overwrite=True)  # a folder of samples, rewritten by each run
        plt.close(fig)
        written.append(out)
    return written


# --------------------------------------------------------------------------------------------------
# The supervised classifier and the detector on the images neither trained on
# --------------------------------------------------------------------------------------------------
def threshold_choice(detector, val: list, held: list, batch_size: int) -> dict:
    """The detector's threshold: on the validation images (lab_targets.DETECTOR_THRESHOLD_RULE) when `val` holds
    some, else the highest score of the held-out good images. Returns "threshold", "rule", "text" (printed),
    "counts" {good, defective} of the images it used and "auroc" (validation only, else empty)."""
    from sklearn.metrics import roc_auc_score

    if val:
        scores, _ = detector.score_features(detector.features([t[0] for t in val], batch_size, "validation images"))
        labels = np.array([t[1] for t in val])
        threshold = choose_threshold(scores, labels, neutral=None)
        pred = scores >= threshold
        counts = {"good": int((labels == 0).sum()), "defective": int((labels == 1).sum())}
        auroc = float(roc_auc_score(labels, scores))
        return {"threshold": threshold, "rule": DETECTOR_THRESHOLD_RULE, "counts": counts, "auroc": auroc,
                "text": f"best balanced accuracy on the {len(val)} validation images ({counts['good']} good, "
                        f"{counts['defective']} defective; there: recall {pred[labels == 1].mean():.3f}, false "
                        f"alarms {pred[labels == 0].mean():.3f}, image AUROC {auroc:.3f})"}
    scores, _ = detector.score_features(detector.features(held, batch_size, "held-out good"))
    return {"threshold": float(scores.max()), "rule": DETECTOR_GOOD_THRESHOLD_RULE, "auroc": "",
            "counts": {"good": len(held), "defective": 0},
            "text": f"highest score of {len(held)} held-out good images"}


def compare_with_classifier(checkpoint: str, test: list, scores: np.ndarray, threshold: float, root: Path) -> list:
    """Rows for the supervised classifier of this lab (a checkpoint of benchmark_gpu.py / the pipeline) and this
    detector on the same images: the classifier's own test split (never trained on, nor used for its threshold)
    restricted to MVTec's test/ folders (the detector fitted on train/good only). Accuracy with its Wilson interval at
    each model's own threshold, and AUROC of each one's score."""
    from sklearn.metrics import roc_auc_score

    from lab_targets import accuracy_with_interval, anomaly_scores
    from train_utils import model_logits

    model, ckpt = load_checkpoint(checkpoint)
    held = {s["path"] for s in ckpt["split"]["splits"]["test"]}
    common = [i for i, t in enumerate(test) if t[0].relative_to(root).as_posix() in held]
    if not common or len({test[i][1] for i in common}) < 2:
        raise UserError(f"{checkpoint}'s test split shares no good AND defective images with {root / 'test'}: "
                        "same category and data folder?")
    labels = np.array([test[i][1] for i in common])
    with torch.inference_mode():
        x = torch.stack([image_to_tensor(open_dataset_image(test[i][0]), ckpt["preprocessing"]) for i in common])
        probs = np.concatenate([anomaly_scores(model_logits(model.eval(), x[j:j + 16]).float().numpy())
                                for j in range(0, len(x), 16)])
    from load_model_hf import checkpoint_threshold

    rows = []
    for name, score, thr in (("classifier", probs, checkpoint_threshold(ckpt)), ("detector", scores[common], threshold)):
        acc = accuracy_with_interval((score >= thr).astype(int), labels)
        rows.append({"defect_type": f"common test images: {name}", "n_test": len(common),
                     "image_auroc": float(roc_auc_score(labels, score)), "accuracy": acc["accuracy"],
                     "accuracy_ci_low": acc["ci_low"], "accuracy_ci_high": acc["ci_high"],
                     "recall": float((score[labels == 1] >= thr).mean()),
                     "false_alarm_rate": float((score[labels == 0] >= thr).mean()), "threshold": thr,
                     "model_name": ckpt["model_name"] if name == "classifier" else None})
    return rows


# --------------------------------------------------------------------------------------------------
# Fit, evaluate, save: what anomaly_detector.py and the pipeline run
# --------------------------------------------------------------------------------------------------
def build_detector(args) -> Detector:
    """The frozen backbone at the detector's input size, cut above its last feature block (no bank yet)."""
    model, pre, model_name = load_backbone(args.model_name, args.seed)
    patch = int(getattr(model.config, "patch_size", 16))
    side = args.image_size or default_image_size(model_name, pre, patch)
    if side % patch or side > MAX_IMAGE_SIDE:
        raise UserError(f"--image-size {side} must be a multiple of the patch size {patch}, at most {MAX_IMAGE_SIDE} "
                        "(the patch tokens' memory grows with its square).")
    pre = {**pre, "image_size": [side, side]}
    base, _ = base_model_of(model)
    layers = resolve_layers(args.layers, len(base.encoder.layer) if base is not None else 1)
    if base is not None and max(layers) < len(base.encoder.layer):
        truncate_backbone(model, max(layers))  # the blocks above the last one used would be computed for nothing
    detector = Detector(model, pre, model_name, layers)
    detector.score_top = args.score_top
    return detector


def split_images(args, split: dict, classifier: dict | None) -> tuple[list, list, list]:
    """(val, held, fit): the images that set the threshold (the lab's validation split, or good training images
    held out of the bank) and the good images the bank is fitted on. With val, its images leave split["test"]."""
    if args.threshold_from == "val":
        val = validation_images(args, split["root"], classifier)
        kept_out = {t[0] for t in val}
        split["test"] = [t for t in split["test"] if t[0] not in kept_out]
        if len({t[1] for t in split["test"]}) < 2:
            raise UserError(f"{split['root'] / 'test'} holds too few images beside the validation split to test the "
                            f"detector on good AND defective ones.")
        held, fit = [], [p for p in split["train"] if p not in kept_out]
    else:
        val = []
        order = np.random.default_rng(args.seed).permutation(len(split["train"]))
        n_hold = max(2, int(round(args.holdout * len(order))))
        held = [split["train"][i] for i in sorted(order[:n_hold])]
        fit = [split["train"][i] for i in sorted(order[n_hold:])]
    if len(fit) < 1:
        raise UserError(f"{len(split['train'])} good training image(s): too few to keep {len(held) or len(val)} out "
                        f"and fit a bank.")
    return val, held, fit


def fit_detector(args, detector: Detector, fit: list, val: list, held: list, threads: int) -> dict:
    """The backbone compiled for --engine, the coreset bank of the good images' patches, the threshold. Returns
    the threshold choice with the fit's timings and patch count."""
    t0 = time.perf_counter()
    detector.runner, detector.backbone_file = compile_backbone(
        detector.extractor, detector.pre, args.engine,
        Path(args.models_dir) / f"detector_{args.category}_backbone", fit[:128], threads, args.overwrite)
    export_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
    if detector.runner is detector.extractor:
        detector.runner = None
    detector.engine = args.engine
    feats = detector.features(fit, args.batch_size, "good patches")
    feats = feats.reshape(-1, feats.shape[-1])
    n_bank = min(args.max_bank, max(1, int(round(args.coreset * len(feats)))))
    detector.bank = feats[greedy_coreset(feats, n_bank, args.seed)].half()
    chooser = threshold_choice(detector, val, held, args.batch_size)
    detector.threshold, detector.threshold_rule = chooser["threshold"], chooser["rule"]
    fit_seconds = time.perf_counter() - t0
    print(f"bank: {len(detector.bank)} patches (coreset {args.coreset:g} of {len(feats)} from {len(fit)} good images, "
          f"blocks {detector.layers}, grid {detector.grid}); threshold {detector.threshold:.4f} = {chooser['text']} "
          f"({fit_seconds:.0f} s)")
    return {**chooser, "fit_seconds": fit_seconds, "export_seconds": export_seconds}


def save_detector(args, detector: Detector, fit: list, held: list, chooser: dict) -> Path:
    """The detector file (bank + configuration) and its backbone, exported to ONNX when PyTorch ran it: the saved
    detector is served without PyTorch (inference.PatchDetector)."""
    if detector.backbone_file is None:
        from engines import export_onnx

        onnx_path = Path(args.models_dir) / f"detector_{args.category}_backbone.onnx"
        export_onnx(detector.extractor, onnx_path, detector.pre, overwrite=args.overwrite)
        detector.backbone_file = onnx_path
    return detector.save(Path(args.models_dir) / f"detector_{args.category}.safetensors",
                         {"category": args.category, "fit_images": len(fit), "held_out_images": len(held),
                          "threshold_images": chooser["counts"]}, args.overwrite)


def evaluate(args, rid: str | None = None) -> dict:
    """Fit on train/good, evaluate on the official test split, save the detector, append the CSV rows, draw the ROC
    curves and overlays, print the table. `args`: detector_options(...) or anomaly_detector.py's parsed flags.
    Returns {"rows": the CSV rows, "detector": its file, "backbone": its backbone file}."""
    threads = set_threads(args.num_threads)
    set_seed(args.seed)
    split = official_split(args.data_dir, args.category)
    classifier = read_checkpoint(args.compare_checkpoint, args.category) if args.compare_checkpoint else None
    if classifier is not None and classifier.get("quantization"):  # fail now, not after the fit
        raise UserError(f"{args.compare_checkpoint} is an int8 checkpoint: --compare-checkpoint needs the fp32 one "
                        f"(e.g. modeles/model_cpu_{args.category}.pth).")
    detector = build_detector(args)
    if not split["has_masks"]:
        print(f"note: no ground_truth masks under {split['root']}: image metrics only (no pixel AUROC).")
    val, held, fit = split_images(args, split, classifier)
    chooser = fit_detector(args, detector, fit, val, held, threads)

    # the official test split (without the validation images)
    paths = [t[0] for t in split["test"]]
    t1 = time.perf_counter()
    scores, maps = detector.score_features(detector.features(paths, args.batch_size, "test images"))
    per_image_ms = (time.perf_counter() - t1) * 1000 / len(paths)
    masks = load_masks(split["test"]) if split["has_masks"] else None
    rows = metrics(split["test"], scores, maps, masks, detector.threshold)
    if args.compare_checkpoint:
        rows += compare_with_classifier(args.compare_checkpoint, split["test"], scores, detector.threshold,
                                        split["root"])

    rid = rid or run_id()
    path = save_detector(args, detector, fit, held, chooser)
    backbone_mb = model_size_mb(detector.backbone_file) if detector.backbone_file else 0.0
    layers, model_name = detector.layers, detector.model_name
    common = {"run_id": rid, "script": "anomaly_detector.py", "category": args.category, "model_name": model_name,
              "backend": args.engine, "backbone_mb": backbone_mb,
              "feature_layers": ",".join(map(str, layers)), "image_size": detector.pre["image_size"][0],
              "bank_patches": len(detector.bank), "coreset_ratio": args.coreset, "n_train_good": len(fit),
              "n_holdout_good": len(held), "threshold": detector.threshold, "threshold_rule": detector.threshold_rule,
              "n_threshold_good": chooser["counts"]["good"], "n_threshold_defective": chooser["counts"]["defective"],
              "threshold_image_auroc": chooser["auroc"], "fit_seconds": chooser["fit_seconds"],
              "export_seconds": chooser["export_seconds"], "end_to_end_ms_per_img": per_image_ms,
              "batch_size": args.batch_size, "threads": threads, "size_mb": size_on_disk_mb(path),
              "file": str(path), "device_name": cpu_name(), **environment_columns()}
    csv_rows = [{**common, **{k: v for k, v in r.items() if v is not None}} for r in rows]
    results = Path(args.results_dir)
    csv_path = append_csv_rows(results / "detector_results.csv", csv_rows)
    roc = plot_roc(split["test"], scores, maps, masks, results / "detector_roc.png",
                   f"Good-only patch detector - {args.category}, {model_name} blocks {layers}", args.overwrite)
    overlays = save_overlays(split["test"], scores, maps, detector.threshold,
                             results / "detector_overlays" / args.category,
                             args.overlays, float(np.quantile(maps, 0.999))) if args.overlays else []

    print()
    print(format_table(rows, ["defect_type", "n_test", "image_auroc", "pixel_auroc", "accuracy", "recall",
                              "false_alarm_rate"]))
    print(f"one image: {per_image_ms:.1f} ms (decode + preprocess + backbone ({args.engine}) + nearest patches + map, "
          f"batch {args.batch_size}, {threads} threads, {cpu_name()}); detector {path} ({size_on_disk_mb(path):.2f} MB"
          + (f", backbone {detector.backbone_file} {backbone_mb:.2f} MB)" if detector.backbone_file else ")"))
    print(f"results appended to {csv_path} (run_id {rid}); ROC {roc}; {len(overlays)} overlays in "
          f"{results / 'detector_overlays' / args.category}")
    return {"rows": csv_rows, "detector": path, "backbone": detector.backbone_file}
