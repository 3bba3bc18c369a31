"""Hugging Face image classifiers for the lab: presets, loading from the hub or a local folder with a fresh
2-label head (good / anomaly), an offline ViT built from a config, and the lab's checkpoint format.

    python load_model_hf.py --model-name vit-base             # google/vit-base-patch16-224-in21k
    python load_model_hf.py --model-name ./my_local_model     # any AutoModelForImageClassification folder
    python load_model_hf.py --model-name offline-vit-tiny     # no download, random init
    python load_model_hf.py --checkpoint modeles/model_cpu_bottle.pth

Checkpoint = a plain dict saved with torch.save and read back with torch.load(weights_only=True): model type
and config (JSON), weights (state_dict), preprocessing, labels, category, split manifest, training metrics,
library versions. No pickled model object: the model is rebuilt from its config, with no network.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
from pathlib import Path

import torch

from lab_io import UserError, atomic_write, library_versions, run_cli, size_on_disk_mb
from lab_targets import LABELS, THRESHOLD_RULE
from train_utils import model_logits

CHECKPOINT_FORMAT = "tp4-checkpoint"
CHECKPOINT_VERSION = 1
ID2LABEL = {i: name for i, name in enumerate(LABELS)}
LABEL2ID = {name: i for i, name in ID2LABEL.items()}

HUB_PRESETS = {
    "vit-base": "google/vit-base-patch16-224-in21k",   # the lab's baseline (86 M parameters)
    "deit-small": "facebook/deit-small-patch16-224",   # student, 22 M
    "deit-tiny": "facebook/deit-tiny-patch16-224",     # student, 5.7 M
}
# Small ViTs built from a config, random init: no download at all (tests, offline demo). They use the DINOv2
# flavour of the ViT (same encoder blocks; the head reads the CLS token *and* the mean of the patch tokens) because
# a plain CLS-token ViT trained from scratch on ~100 images barely beats chance, while this head learns the
# synthetic defects (measured: test AUROC ~0.95 vs ~0.75 on the synthetic tree).
OFFLINE_PRESETS = {
    "offline-vit-small": dict(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=6,
                              num_attention_heads=3, mlp_ratio=4),
    "offline-vit-tiny": dict(image_size=64, patch_size=8, hidden_size=96, num_hidden_layers=4,
                             num_attention_heads=3, mlp_ratio=4),
}
OFFLINE_HINT = ("Without network, set HF_HUB_OFFLINE=1 to use a model already in the Hugging Face cache, pass a "
                "local folder (config.json + weights, e.g. from save_pretrained or `hf download`) to --model-name, "
                f"or use an offline preset ({', '.join(OFFLINE_PRESETS)}).")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def preprocessing_from_processor(processor, config) -> dict:
    """The model's input size, mean and std, from its image processor (whole image resized, no crop)."""
    def hw(value):  # dict, transformers' SizeDict, int or (h, w)
        if value is None:
            return None
        if isinstance(value, int):
            return [value, value]
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        get = value.get if isinstance(value, dict) else lambda key: getattr(value, key, None)
        if get("height") and get("width"):
            return [int(get("height")), int(get("width"))]
        if get("shortest_edge"):
            return [int(get("shortest_edge"))] * 2
        return None

    size = hw(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    size = size or hw(getattr(processor, "size", None)) or [int(getattr(config, "image_size", 224))] * 2
    mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
    std = getattr(processor, "image_std", None) or [0.5, 0.5, 0.5]
    return {"image_size": size, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def load_pretrained(model_name: str, seed: int = 0):
    """Build the classifier for `model_name` (preset, hub id or local folder) with a fresh good/anomaly head.

    Returns (model, preprocessing dict, info dict with source / pretrained flag)."""
    _quiet_transformers()
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Dinov2Config, \
        Dinov2ForImageClassification

    if model_name in OFFLINE_PRESETS:
        torch.manual_seed(seed)
        config = Dinov2Config(**OFFLINE_PRESETS[model_name], num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID)
        model = Dinov2ForImageClassification(config)
        preprocessing = {"image_size": [config.image_size] * 2, "mean": [0.5] * 3, "std": [0.5] * 3}
        print(f"model '{model_name}': small ViT (DINOv2 flavour) built from a config, RANDOM INIT (no pretrained weights, no download)")
        return model, preprocessing, {"model_name": model_name, "source": "offline-config", "pretrained": False}

    source_id = HUB_PRESETS.get(model_name, model_name)
    is_local = Path(source_id).expanduser().is_dir()
    if not is_local and (source_id.startswith((".", "/", "~")) or os.sep in source_id and source_id.count("/") > 1):
        raise UserError(f"model folder {source_id} does not exist.")
    try:
        model = AutoModelForImageClassification.from_pretrained(
            os.path.expanduser(source_id), num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID,
            ignore_mismatched_sizes=True)
    except Exception as exc:  # hub/network/cache errors come in many types: report them as one line
        where = f"local folder {source_id}" if is_local else f"'{source_id}' from the Hugging Face hub"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"could not load {where} ({type(exc).__name__}: {first}). {OFFLINE_HINT}") from None
    try:
        processor = AutoImageProcessor.from_pretrained(os.path.expanduser(source_id))
    except Exception:  # a folder without preprocessor_config.json: fall back on the config
        processor = None
        print(f"note: no image processor found for {source_id}; using the config's image size and mean/std 0.5")
    preprocessing = preprocessing_from_processor(processor, model.config)
    print(f"model '{model_name}' ({model.config.model_type}) loaded from {'folder' if is_local else 'hub'} "
          f"{source_id}; classification head newly initialised for 2 labels (good, anomaly)")
    return model, preprocessing, {"model_name": model_name, "source": source_id if is_local else "hub",
                                  "hub_id": None if is_local else source_id, "pretrained": True}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def state_dict_size_mb(model) -> float:
    """Bytes on disk of the model's state_dict saved with torch.save, / 10^6."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        torch.save(model.state_dict(), path)
        return size_on_disk_mb(path)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def resolve_model_path(path: str | Path, models_dir: str | Path = "modeles") -> Path:
    """A bare file name such as `model_cpu_bottle.pth` is looked for as given, then in `models_dir`."""
    path = Path(path).expanduser()
    for candidate in (path, Path(models_dir) / path.name):
        if candidate.is_file():
            return candidate
    raise UserError(f"checkpoint {path} not found (looked in . and {models_dir}/): train one first with "
                    f"`python benchmark_gpu.py --category CATEGORY`, or give the right --model-path.")


def save_checkpoint(path: str | Path, model, *, model_name: str, preprocessing: dict, category: str,
                    split_manifest: dict, metrics: dict | None = None, train_args: dict | None = None,
                    extra: dict | None = None, threshold: float | None = None, overwrite: bool = False) -> Path:
    """Write the lab's checkpoint atomically; an earlier file of the same name is kept (see keep_previous).

    `threshold`: the decision threshold on P(anomaly) chosen on the validation split (lab_targets.THRESHOLD_RULE),
    used by every script that reads the checkpoint and copied into the ONNX sidecar."""
    ckpt = {
        "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
        "model_name": model_name, "model_type": model.config.model_type, "model_class": type(model).__name__,
        "config_json": model.config.to_json_string(use_diff=False),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "preprocessing": preprocessing, "id2label": {str(k): v for k, v in ID2LABEL.items()},
        "category": category, "split": split_manifest, "metrics": metrics or {}, "train_args": train_args or {},
        "threshold": float(threshold if threshold is not None else 0.5),
        "threshold_rule": THRESHOLD_RULE if threshold is not None else "argmax (0.5), no threshold chosen",
        "versions": library_versions(), **(extra or {}),
    }
    return atomic_write(path, lambda p: torch.save(ckpt, p), overwrite)


def checkpoint_threshold(ckpt: dict) -> float:
    """The decision threshold stored in a checkpoint (0.5 = argmax for checkpoints written before it existed)."""
    value = ckpt.get("threshold", 0.5)
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"the checkpoint's decision threshold {value!r} is not a probability in [0, 1].")
    return float(value)


# what every script reads of a checkpoint (save_checkpoint and quantize.save_quantized_checkpoint write them all)
CHECKPOINT_KEYS = ("model_type", "config_json", "state_dict", "preprocessing", "category", "split")


def read_checkpoint(path: str | Path, expected_category: str | None = None) -> dict:
    """torch.load(weights_only=True) + format and category checks; raises UserError with a clear reason."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found.") from None
    except Exception as exc:  # truncated file, not a torch file, pickled object refused by weights_only...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "Weights only load failed" in first:  # torch's long explanation helps nobody here
            first = "not a torch.save file, or it holds pickled objects that safe loading refuses"
        elif "central directory" in first or "PytorchStreamReader" in first:
            first = "the file is truncated or damaged: was its copy or download interrupted?"
        raise UserError(f"{path} is not a readable checkpoint of this lab "
                        f"({textwrap.shorten(first, 200, placeholder=' ...')}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this lab (no '{CHECKPOINT_FORMAT}' format field): "
                        f"train one with benchmark_gpu.py.")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it was not written by this lab's save_checkpoint; "
                        "train one with benchmark_gpu.py.")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by a newer version of this lab (format "
                        f"{ckpt['format_version']} > {CHECKPOINT_VERSION}).")
    if expected_category and ckpt.get("category") != expected_category:
        raise UserError(f"{path} was trained on category '{ckpt.get('category')}', not '{expected_category}': "
                        f"pass --category {ckpt.get('category')} or the checkpoint of '{expected_category}'.")
    return ckpt


def model_skeleton(ckpt: dict, path: str | Path = "checkpoint"):
    """The architecture rebuilt offline from the config stored in a checkpoint (weights left at their init)."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config_dict = json.loads(ckpt["config_json"])
        config_dict.pop("model_type", None)
        config = AutoConfig.for_model(ckpt["model_type"], **config_dict)
        if not config.architectures and ckpt.get("model_class"):  # picks e.g. DeiT's class among several
            config.architectures = [ckpt["model_class"]]
        return AutoModelForImageClassification.from_config(config).eval()
    except Exception as exc:
        raise UserError(f"{path}: cannot rebuild model type '{ckpt.get('model_type')}' from its config "
                        f"({type(exc).__name__}: {exc}).") from None


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint"):
    """Rebuild the Hugging Face model from the config stored in a checkpoint, offline, and load its weights."""
    if ckpt.get("quantization"):
        raise UserError(f"{path} holds an int8 model: load it with quantize.load_quantized_checkpoint "
                        f"(or pass the fp32 checkpoint, e.g. model_cpu_<category>.pth).")
    model = model_skeleton(ckpt, path)
    expected = model.state_dict()
    missing, unexpected = _compare_keys(expected, ckpt["state_dict"])
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, e.g. {(missing + unexpected)[0]}).")
    resized = next((k for k, v in ckpt["state_dict"].items() if tuple(v.shape) != tuple(expected[k].shape)), None)
    if resized is not None:
        raise UserError(f"{path}: weights do not match the model ({resized} is "
                        f"{tuple(ckpt['state_dict'][resized].shape)} in the checkpoint, "
                        f"{tuple(expected[resized].shape)} in the model its config describes).")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not match the model ({str(exc).splitlines()[0]}).") from None
    return model.eval()


def _compare_keys(expected: dict, given: dict):
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def load_checkpoint(path: str | Path, expected_category: str | None = None, models_dir: str | Path = "modeles"):
    """resolve + read + rebuild. Returns (model in eval mode on CPU, checkpoint dict)."""
    path = resolve_model_path(path, models_dir)
    ckpt = read_checkpoint(path, expected_category)
    return model_from_checkpoint(ckpt, path), ckpt


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def describe(model, preprocessing: dict) -> None:
    n_params = count_parameters(model)
    print(f"architecture     : {type(model).__name__} ({model.config.model_type})")
    print(f"parameters       : {n_params:,} ({n_params / 1e6:.2f} M)")
    print(f"fp32 size on disk: {state_dict_size_mb(model):.2f} MB (state_dict, 1 MB = 10^6 bytes)")
    print(f"preprocessing    : input {preprocessing['image_size'][0]}x{preprocessing['image_size'][1]}, "
          f"mean {preprocessing['mean']}, std {preprocessing['std']}")
    torch.manual_seed(0)
    dummy = torch.randn(1, 3, *preprocessing["image_size"])
    with torch.inference_mode():
        logits = model_logits(model.eval(), dummy)
    probs = torch.softmax(logits.float(), dim=-1)[0]
    print(f"dummy forward    : logits {[round(v, 4) for v in logits[0].tolist()]}, "
          f"P(good)={probs[0]:.3f}, P(anomaly)={probs[1]:.3f} (labels: {model.config.id2label})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Load a Hugging Face image classifier with a good/anomaly head "
                                                 "(or a lab checkpoint) and describe it.")
    parser.add_argument("--model-name", default="vit-base",
                        help="preset (" + ", ".join([*HUB_PRESETS, *OFFLINE_PRESETS]) + "), hub id or local "
                             "folder (default: vit-base = google/vit-base-patch16-224-in21k)")
    parser.add_argument("--checkpoint", help="describe a checkpoint written by the lab instead")
    args = parser.parse_args(argv)

    if args.checkpoint:
        model, ckpt = load_checkpoint(args.checkpoint)
        print(f"checkpoint       : {args.checkpoint} (category '{ckpt['category']}', base model "
              f"'{ckpt['model_name']}', test split {ckpt['split']['counts'].get('test')} images)")
        if ckpt.get("metrics"):
            print(f"saved metrics    : { {k: v for k, v in ckpt['metrics'].items() if not isinstance(v, dict)} }")
        describe(model, ckpt["preprocessing"])
        return 0
    model, preprocessing, _ = load_pretrained(args.model_name)
    describe(model, preprocessing)
    return 0


if __name__ == "__main__":
    run_cli(main)
