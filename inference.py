"""Serving a fine-tuned model without PyTorch: images in, P(anomaly) out.

- Images: any file or bytes Pillow reads -> RGB (grayscale, palette, RGBA composited on black, 16-bit scaled to
  8 bits) -> resized to the model's input -> normalised float32 NCHW. ONE implementation: the training loaders
  (mvtec_dataset.py), score.py and predict.py all call it, so serving sees exactly what training saw.
- The model's sidecar (`model_final.json`, format tp4-onnx-sidecar-v1): what file, input, labels, preprocessing,
  decision threshold and sha256; written by onnx_optimization.py and the pipeline, read by score.py.
- ONNX Runtime sessions: creation with explicit threads, prediction over a loader, timing jobs
  (lab_io.benchmark_rounds).
- The good-only detector of anomaly_detector.py (PatchDetector): its bank (safetensors) and exported backbone,
  nearest-patch distances and anomaly maps in numpy, the very functions the detector is fitted and evaluated with.

Imports numpy and Pillow; onnxruntime, openvino, onnx and safetensors only inside the functions that need them.
"""
from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lab_io import UserError, atomic_write, atomic_write_text, check_replaceable, json_safe, keep_previous, \
    library_versions, physical_cores, sha256_file
from lab_targets import DETECTOR_GOOD_THRESHOLD_RULE, LABELS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # what the lab reads as images
SIDECAR_FORMAT = "tp4-onnx-sidecar-v1"
ENGINE_ORT, ENGINE_OV = "onnxruntime", "openvino"
FINAL_ONNX, FINAL_SIDECAR = "model_final.onnx", "model_final.json"
FINAL_STEM = "model_final"  # model_final.onnx, or .xml + .bin; its sidecar model_final.json
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
MAP_OUTPUT_NAME = "patch_distances"  # the hybrid classifier's second output: [N, gh * gw], where the defect is
REQUIRED_KEYS = ("format", "model_file", "variant", "category", "labels", "input_name", "output_name",
                 "preprocessing", "sha256")
THRESHOLD_TEXT = "P(anomaly) = softmax(logits)[1] >= threshold; threshold chosen on the validation split"


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def is_image_file(path: str | Path) -> bool:
    """An image by its name: a known extension, not hidden (macOS writes '._name.png' resource forks beside images)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: str | Path) -> list[Path]:
    """The image files of one folder (not recursive), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p))


class ImageError(ValueError):
    """An input that is not a usable image; `too_large` tells a size limit from a broken file."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


DEFAULT_MAX_PIXELS = 25_000_000          # per image: a 6000x4000 camera frame; MVTec's largest is 1024x1024
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000  # per request (score.py) or batch: decoded one image at a time anyway
# The most memory one decode takes: an RGBA image at the limit holds its 4 bytes/pixel, the RGB background (3) and
# the alpha mask (1) at once: 8 x 25e6 = 200 MB on top of the server's ~250 MB.


def env_number(name: str, default: float) -> float:
    """A positive number from the environment (score.py's and batch_score.py's limits), default when unset."""
    text = os.environ.get(name) or str(default)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):  # nan passes `value <= 0`
        raise ValueError(f"environment variable {name} must be a finite number > 0, got {text!r}")
    return value


def serving_threads() -> int:
    """TP4_ORT_THREADS, the engine's intra-op threads for the Azure entry scripts (0 or unset: the engine's choice)."""
    text = os.environ.get("TP4_ORT_THREADS") or "0"
    if not text.isdigit():
        raise ValueError(f"environment variable TP4_ORT_THREADS must be a whole number >= 0, got {text!r}")
    return int(text)


def serving_model_dir() -> Path:
    """Where the Azure entry scripts (score.py, batch_score.py) find the model: AZUREML_MODEL_DIR (Azure, or
    azmlinfsrv --model_dir), else ./modeles."""
    return Path(os.environ.get("AZUREML_MODEL_DIR") or "modeles")


def image_header(source, what: str | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) read from the image's header, nothing decoded: lets a caller refuse a request whose images
    are too large in total before decoding any. Raises ImageError as load_rgb does."""
    return _open_checked(source, what, max_pixels, decode=False)


def load_rgb(source, what: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """A path or bytes -> 3-channel RGB PIL image. Grayscale and palette images are converted, transparency is
    composited on black, 16-bit images are scaled to 8 bits (not clipped to white), a photo stored sideways is turned
    upright (EXIF orientation). Raises ImageError naming `what` (default: the path) for an empty, broken, unknown or
    too large (> max_pixels) image. At most one copy of the decoded pixels is made besides the RGB result (none for
    an upright RGB file)."""
    return _open_checked(source, what, max_pixels, decode=True)


def _open_checked(source, what, max_pixels, decode: bool):
    what = what or str(source if not isinstance(source, (bytes, bytearray)) else "the image")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(f"{what} is empty")
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageError(f"{what} is {img.width}x{img.height} pixels, more than the limit of {max_pixels} "
                                 "pixels", too_large=True)
            if not decode:
                return img.size
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what}: {exc}", too_large=True) from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image Pillow can read (PNG, JPEG, BMP, TIFF...)") from None
    except FileNotFoundError:
        raise ImageError(f"{what} not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt file
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{what} is a broken image: {type(exc).__name__}: {str(exc)[:200]}") from None


EXIF_ORIENTATION = 0x0112  # how a camera stored the pixels: 1 = as shown, 2-8 = mirrored and/or turned


def _upright(img: Image.Image) -> Image.Image:
    """A photo stored sideways (EXIF orientation 2-8) turned as every viewer shows it, and as transformers'
    load_image reads it; an image without EXIF (every MVTec PNG) is not looked at. (Pillow turns a TIFF itself.)"""
    if "exif" in img.info and img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return ImageOps.exif_transpose(img)
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    img = _upright(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16/32-bit grayscale: scale, don't clip
        img = _wide_gray_to_l(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def _wide_gray_to_l(img: Image.Image, rows: int = 256) -> Image.Image:
    """16/32-bit grayscale -> 8-bit "L", scaled (65535 or, for wider values, 255 = white), a band of rows at a
    time: a float64 copy of a whole 25 Mpx frame would take 200 MB."""
    arr = np.asarray(img)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    out = np.empty(arr.shape, np.uint8)
    for i in range(0, arr.shape[0], rows):
        band = arr[i:i + rows].astype(np.float64)
        out[i:i + rows] = np.clip(np.rint(band * (255.0 / top)), 0, 255)
    return Image.fromarray(out)  # uint8 [H, W]: mode "L"


def resize_uint8(img: Image.Image, preprocessing: dict) -> np.ndarray:
    """RGB PIL image -> uint8 [3, H, W] at the model's input size. The whole image is resized (bilinear), not
    cropped: a defect near the border must stay visible."""
    height, width = preprocessing["image_size"]
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    arr = np.asarray(rgb.resize((width, height), Image.BILINEAR), dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def normalize(pixels_uint8: np.ndarray, preprocessing: dict) -> np.ndarray:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std with the model's mean and std."""
    mean = np.asarray(preprocessing["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocessing["std"], np.float32).reshape(-1, 1, 1)
    return (pixels_uint8.astype(np.float32) / np.float32(255.0) - mean) / std


def preprocess(img: Image.Image, preprocessing: dict) -> np.ndarray:
    """RGB PIL image -> the model's input, float32 [3, H, W]."""
    return normalize(resize_uint8(img, preprocessing), preprocessing)


# --------------------------------------------------------------------------------------------------
# The sidecar
# --------------------------------------------------------------------------------------------------
def sidecar_preprocessing(preprocessing: dict) -> dict:
    """The preprocessing above, spelled out for a reader without this repository."""
    return {"image_size": [int(v) for v in preprocessing["image_size"]],
            "mean": [float(v) for v in preprocessing["mean"]], "std": [float(v) for v in preprocessing["std"]],
            "resize": "bilinear", "crop": None, "color": "RGB", "scale": 255.0, "layout": "NCHW",
            "dtype": "float32"}


def onnx_opset(path: str | Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def write_sidecar(model_path: str | Path, *, variant: str, category: str, preprocessing: dict, exporter: str,
                  source_checkpoint: str | Path, base_model: str, parity_result: dict, metrics: dict,
                  threshold: float = 0.5, engine: str = ENGINE_ORT, precision_hint: str = "f32",
                  sidecar_path: str | Path | None = None, overwrite: bool = False,
                  map_grid: list[int] | None = None, map_reference: float | None = None) -> dict:
    """Write `<model stem>.json` next to the model (format tp4-onnx-sidecar-v1), atomically. Returns it.

    The model is an ONNX file (engine onnxruntime or openvino) or an OpenVINO IR .xml with its .bin weights
    (engine openvino); `precision_hint` is OpenVINO's INFERENCE_PRECISION_HINT (f32 or bf16)."""
    model_path = Path(model_path)
    sidecar_path = Path(sidecar_path) if sidecar_path else model_path.with_suffix(".json")
    weights = model_path.with_suffix(".bin") if model_path.suffix == ".xml" else None
    sidecar = {"format": SIDECAR_FORMAT, "model_file": model_path.name, "engine": engine,
               "precision_hint": precision_hint, "variant": variant, "category": category,
               "labels": list(LABELS), "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
               "threshold": float(threshold), "threshold_rule": THRESHOLD_TEXT,
               "preprocessing": sidecar_preprocessing(preprocessing),
               "opset": onnx_opset(model_path) if model_path.suffix == ".onnx" else None,
               "exporter": exporter, "source_checkpoint": str(source_checkpoint), "base_model": base_model,
               "parity": json_safe(parity_result), "metrics": json_safe(metrics),
               "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "versions": library_versions(), "sha256": sha256_file(model_path)}
    if weights is not None:
        sidecar.update(weights_file=weights.name, weights_sha256=sha256_file(weights))
    if map_grid:  # a hybrid classifier: its second output is the patch map on this grid
        sidecar.update(anomaly_map=True, map_output=MAP_OUTPUT_NAME, map_grid=[int(v) for v in map_grid],
                       map_reference=float(map_reference))
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=1, allow_nan=False) + "\n", overwrite)
    return sidecar


def find_sidecar(model_dir: str | Path) -> Path:
    """The sidecar in `model_dir` or below it: model_final.json first, else the only tp4 sidecar there."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    if (model_dir / FINAL_SIDECAR).is_file():
        return model_dir / FINAL_SIDECAR
    named = sorted(model_dir.rglob(FINAL_SIDECAR))
    if len(named) == 1:
        return named[0]
    candidates = named or [p for p in sorted(model_dir.rglob("*.json"))
                           if p.stat().st_size < 1_000_000 and _is_sidecar(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"no {FINAL_SIDECAR} (ONNX sidecar) in {model_dir} or its subfolders: "
                                "run onnx_optimization.py first")
    raise ValueError(f"several ONNX sidecars under {model_dir}: {', '.join(map(str, candidates))}; keep one")


def _is_sidecar(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == SIDECAR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _three_numbers(values) -> bool:
    return isinstance(values, list) and len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def read_sidecar(path: str | Path, verify_sha256: bool = True) -> dict:
    """Load and check a sidecar; returns it with "model_path" added. Raises ValueError/FileNotFoundError."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not a {SIDECAR_FORMAT} sidecar (format={found!r})")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"sidecar {path} lacks {', '.join(missing)}")
    labels = meta["labels"]
    if labels != list(LABELS):  # the order of the model's two outputs, as every export of this lab writes it
        raise ValueError(f"sidecar {path}: labels must be {list(LABELS)!r} (the model's outputs in order), "
                         f"got {labels!r}")
    if not (isinstance(meta["model_file"], str) and meta["model_file"] and Path(meta["model_file"]).name ==
            meta["model_file"]):
        raise ValueError(f"sidecar {path}: model_file must be a file name beside it, got {meta['model_file']!r}")
    pre = meta["preprocessing"]
    if not isinstance(pre, dict):
        raise ValueError(f"sidecar {path}: preprocessing must be an object")
    expected = {"resize": "bilinear", "crop": None, "color": "RGB", "layout": "NCHW", "dtype": "float32",
                "scale": 255.0}
    for key, value in expected.items():
        if pre.get(key, value) != value:
            raise ValueError(f"sidecar {path}: preprocessing {key}={pre.get(key)!r} is not supported "
                             f"(expected {value!r})")
    size = pre.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"sidecar {path}: preprocessing image_size must be [height, width], got {size!r}")
    if not all(_three_numbers(pre.get(k)) for k in ("mean", "std")) or min(pre["std"]) <= 0:
        raise ValueError(f"sidecar {path}: preprocessing mean and std must be lists of 3 numbers (std > 0), got "
                         f"{pre.get('mean')!r} and {pre.get('std')!r}")
    model_path = path.parent / meta["model_file"]
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} named by {path} does not exist")
    if verify_sha256:
        actual = sha256_file(model_path)
        if actual != meta["sha256"]:
            raise ValueError(f"sha256 of {model_path} ({actual[:12]}...) differs from its sidecar's "
                             f"({str(meta['sha256'])[:12]}...): the ONNX file was changed or the sidecar is stale; "
                             "re-run onnx_optimization.py")
    engine = meta.setdefault("engine", ENGINE_ORT)  # sidecars written before OpenVINO: ONNX Runtime
    precision = meta.setdefault("precision_hint", "f32")
    if engine not in (ENGINE_ORT, ENGINE_OV) or precision not in ("f32", "bf16") or \
            (engine == ENGINE_ORT and precision != "f32"):
        raise ValueError(f"sidecar {path}: engine {engine!r} with precision {precision!r} is not supported "
                         f"({ENGINE_ORT} f32, or {ENGINE_OV} f32/bf16)")
    if meta.get("weights_file"):
        weights = path.parent / meta["weights_file"]
        if not weights.is_file():
            raise FileNotFoundError(f"weights file {weights} named by {path} does not exist")
        if verify_sha256 and sha256_file(weights) != meta.get("weights_sha256"):
            raise ValueError(f"sha256 of {weights} differs from its sidecar's: the weights were changed or the "
                             "sidecar is stale; re-run onnx_optimization.py")
    threshold = meta.get("threshold", 0.5)  # sidecars written before the threshold existed: argmax
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"sidecar {path}: threshold must be a probability in [0, 1], got {threshold!r}")
    return {**meta, "threshold": float(threshold), "model_path": str(model_path)}


def final_path(src: str | Path, models_dir: str | Path) -> Path:
    """Where save_final() copies a model: model_final.onnx, or model_final.xml (+ .bin) for an OpenVINO IR."""
    return Path(models_dir) / f"{FINAL_STEM}{Path(src).suffix}"


def save_final(src: str | Path, models_dir: str | Path, overwrite: bool) -> Path:
    """Copy the chosen model file to models_dir/model_final.onnx, or an OpenVINO IR to model_final.xml + .bin
    (atomic, earlier ones kept). Returns the model file written."""
    import shutil

    src = Path(src)
    final = final_path(src, models_dir)
    pairs = [(src, final)] + ([(src.with_suffix(".bin"), final.with_suffix(".bin"))] if src.suffix == ".xml" else [])
    # the set in place is replaced whole or not at all: a served model's weights may be held (OpenVINO maps them)
    check_replaceable(*(Path(models_dir) / f"{FINAL_STEM}{ext}" for ext in (".onnx", ".xml", ".bin", ".json")))
    pending = not overwrite  # the set in place goes aside once, when the first new file is ready to replace it
    for source, target in reversed(pairs):  # the weights first: a model file never points at missing weights
        def write(tmp: Path, source=source) -> None:
            nonlocal pending
            shutil.copyfile(source, tmp)
            if pending:
                keep_previous_final(Path(models_dir))
                pending = False

        atomic_write(target, write)
    return final


def keep_previous_final(models_dir: Path) -> None:
    """Set the deployable model in place aside as one set (lab_io.keep_previous): its model file, its weights and its
    sidecar under one timestamp, the kept sidecar naming the kept files, so that it still serves
    (predict.py --model modeles/model_final.<stamp>.json)."""
    sidecar = models_dir / f"{FINAL_STEM}.json"
    files = [p for p in (models_dir / f"{FINAL_STEM}{ext}" for ext in (".onnx", ".xml", ".bin")) if p.exists()]
    if not files:
        return
    kept_sidecar = keep_previous(sidecar) if sidecar.is_file() else None
    stamp = kept_sidecar.stem[len(FINAL_STEM) + 1:] if kept_sidecar else None
    kept = {p.name: keep_previous(p, stamp=stamp).name for p in files}
    if kept_sidecar is None:
        return
    try:
        meta = json.loads(kept_sidecar.read_text(encoding="utf-8"))
        meta.update({k: kept[meta[k]] for k in ("model_file", "weights_file") if meta.get(k) in kept})
    except (ValueError, AttributeError, TypeError, KeyError):
        return  # not a sidecar this lab can read: kept as it was
    atomic_write_text(kept_sidecar, json.dumps(meta, indent=1, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------------
def make_session(path: str | Path, threads: int | None = None):
    """CPU InferenceSession: all graph optimisations, `threads` intra-op threads (None/0 = ORT's default),
    one inter-op thread, sequential execution (one image stream, as in the scoring service). Its threads spin while
    a run lasts, and stop as soon as it returns."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    # ORT's idle threads otherwise spin on after each run: in the timed rounds they slowed the variants timed next
    # (measured on the demo: p95 of 9-15 ms instead of 4-7 ms for ORT int8); in the service they burn CPU between
    # requests
    options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        raise UserError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:200]}).") from None


class Runner:
    """One model compiled for the CPU by one engine: run(float32 [N, 3, H, W]) -> logits float32 [N, 2]; run_all ->
    every output, in the graph's order (the hybrid's: logits, patch distances). A graph whose activation scales span
    the batch (scales_span_the_batch) is run one image per call.

    engine 'onnxruntime' (an ONNX file) or 'openvino' (an ONNX file or an IR .xml); `precision` is OpenVINO's
    INFERENCE_PRECISION_HINT, always set explicitly ('f32' or 'bf16': on a CPU with BF16, OpenVINO's silent default
    is bf16). `threads`: intra-op threads (None = the engine's default)."""

    def __init__(self, path: str | Path, engine: str = ENGINE_ORT, threads: int | None = None,
                 precision: str = "f32"):
        self.path, self.engine, self.threads, self.precision = Path(path), engine, threads, precision
        if engine == ENGINE_ORT:
            if precision != "f32":
                raise ValueError(f"ONNX Runtime on CPU runs the graph's own precision, not {precision!r}")
            session = make_session(path, threads)
            feed_name = session.get_inputs()[0].name

            def run_all(x):
                return session.run(None, {feed_name: np.ascontiguousarray(x, dtype=np.float32)})

            def run_each(x):  # one image per call: its result never depends on the other images of the batch
                if len(x) <= 1:
                    return run_all(x)
                return [np.concatenate(outs) for outs in zip(*(run_all(x[i:i + 1]) for i in range(len(x))))]

            self.per_image = scales_span_the_batch(path)
            self.run_all = run_each if self.per_image else run_all
            self.run = lambda x: self.run_all(x)[0]
            self.session = session
        elif engine == ENGINE_OV:
            self.per_image = False  # OpenVINO's int8 (NNCF) has static scales, calibrated once
            request, self.precision = _openvino_request(path, threads, precision)
            self.request = request
            self.run_all = lambda x: [v.copy() for v in request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
                                      .to_tuple()]
            self.run = lambda x: request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[0].copy()
        else:
            raise ValueError(f"unknown engine {engine!r}: use {ENGINE_ORT} or {ENGINE_OV}")


    def input_size(self) -> list[int] | None:
        """[height, width] of the graph's input where both are fixed (this lab's exports: only the batch varies)."""
        if self.engine == ENGINE_ORT:
            dims = list(self.session.get_inputs()[0].shape[2:])
        else:
            dims = [d.get_length() if d.is_static else None for d in
                    list(self.request.model_inputs[0].get_partial_shape())[2:]]
        return dims if len(dims) == 2 and all(isinstance(d, int) and d > 0 for d in dims) else None


def scales_span_the_batch(path: str | Path) -> bool:
    """Whether an ONNX file quantizes activations on the fly with one scale per input tensor (ONNX Runtime's dynamic
    int8: DynamicQuantizeLinear), so that an image's result would depend on the other images of its batch. Op types
    are plain strings in the file: found without the onnx package (not in the scoring image)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(b"DynamicQuantizeLinear") >= 0


def cpu_supports(precision: str) -> bool:
    """Whether OpenVINO can run `precision` natively on this CPU ('f32' always; 'bf16' with AVX-512 BF16 or AMX)."""
    if precision == "f32":
        return True
    try:
        import openvino as ov
    except ImportError:
        return False
    return precision.upper() in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _openvino_request(path, threads, precision):
    try:
        import openvino as ov
    except ImportError:
        raise UserError("openvino is not installed: pip install -r requirements.txt") from None
    if not cpu_supports(precision):
        raise UserError(f"this CPU cannot run OpenVINO in {precision} (it lacks AVX-512 BF16 / AMX)")
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with a long log
        # its first lines only name OpenVINO's own source files; the cause is the last line
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
        raise UserError(f"OpenVINO cannot load {path} ({type(exc).__name__}: {(lines or [''])[-1][:200]}); if "
                        f"the file is damaged or partly written, make it again (an IR needs its .bin beside the "
                        f".xml).") from None
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what really runs: 'f32', 'bf16'
    return compiled.create_infer_request(), actual


def runner_predict_logits(runner: Runner, loader, desc: str = "predict"):
    """Run a Runner over a loader of (pixels, labels): (logits float32 [N, 2], labels int64 [N])."""
    from tqdm.auto import tqdm

    logits, labels = [], []
    for pixels, y in tqdm(loader, desc=desc, leave=False, unit="batch"):
        logits.append(runner.run(np.asarray(pixels, dtype=np.float32)))
        labels.append(np.asarray(y))
    if not logits:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(logits).astype(np.float32), np.concatenate(labels).astype(np.int64)


def runner_job(runner: Runner, inputs: np.ndarray) -> dict:
    """runner.run on a fixed numpy batch (prepared once, outside the timing), as a lab_io.benchmark_rounds job."""
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    return {"run": lambda: runner.run(x), "batch_size": int(x.shape[0]), "device": "cpu", "threads": runner.threads}


def numeric_precision(variant: str, engine_precision: str) -> str:
    """The real numeric format of a variant: int8 weights (its name says int8), else what the engine computes in
    (OpenVINO reports bf16 or f32); "int8+bf16" for int8 weights with the rest in bf16."""
    bf16 = engine_precision == "bf16"
    if "int8" in variant:
        return "int8" + ("+bf16" if bf16 else "")
    return "bf16" if bf16 else "fp32"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Logits [N, K] -> probabilities [N, K], in float64 (stable: the row maximum is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Classifier:
    """The model a sidecar describes (ONNX Runtime or OpenVINO), ready to score preprocessed batches."""

    score_kind = "probability"

    def __init__(self, sidecar_path: str | Path, threads: int = 0):
        self.meta = read_sidecar(sidecar_path)
        self.runner = Runner(self.meta["model_path"], self.meta["engine"], threads or None,
                             self.meta["precision_hint"])
        self.max_batch = None
        if self.meta["engine"] == ENGINE_ORT:
            inputs = {i.name: i for i in self.runner.session.get_inputs()}
            outputs = [o.name for o in self.runner.session.get_outputs()]
            if self.meta["input_name"] not in inputs or self.meta["output_name"] not in outputs:
                raise ValueError(f"{self.meta['model_path']} has inputs {list(inputs)} and outputs {outputs}, the "
                                 f"sidecar names {self.meta['input_name']!r} -> {self.meta['output_name']!r}")
            batch_dim = inputs[self.meta["input_name"]].shape[0]
            self.max_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None  # None = dynamic
        graph_size = self.runner.input_size()
        if graph_size is not None and graph_size != self.meta["preprocessing"]["image_size"]:
            raise ValueError(f"{self.meta['model_path']} takes {graph_size[0]}x{graph_size[1]} images, the sidecar's "
                             f"preprocessing image_size says {self.meta['preprocessing']['image_size']}: the sidecar "
                             "was edited or belongs to another model; re-run onnx_optimization.py")
        self.labels = list(self.meta["labels"])
        self.anomaly_index = self.labels.index("anomaly")
        self.threshold = self.meta["threshold"]
        self.preprocessing = self.meta["preprocessing"]
        self.info = {k: self.meta.get(k) for k in ("variant", "sha256", "created", "category", "model_file",
                                                  "engine", "base_model", "opset", "threshold")}
        self.info["precision"] = self.runner.precision
        self.info["labels"] = self.labels
        self.info["input_size"] = self.preprocessing["image_size"]
        self.map_grid = tuple(self.meta["map_grid"]) if self.meta.get("anomaly_map") else None
        self.map_reference = self.meta.get("map_reference")  # the patch distance drawn red (predict.py --heatmaps)
        if self.map_grid:
            self.info["map_grid"] = list(self.map_grid)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> probabilities [N, n_labels] (float64)."""
        step = self.max_batch or len(batch)
        return softmax(np.concatenate([self.runner.run(batch[i:i + step]) for i in range(0, len(batch), step)]))

    def label_of(self, probabilities: np.ndarray) -> str:
        """The decision threshold chosen on the validation split, stored in the sidecar (not argmax)."""
        return self.label_for(probabilities[self.anomaly_index])

    def label_for(self, score: float) -> str:
        return decide(score, self.threshold, self.labels)

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(P(anomaly) [N], anomaly maps [N, MAP_SIZE, MAP_SIZE] of a hybrid classifier, else None): the interface
        PatchDetector shares."""
        if not self.map_grid:
            return self.predict(batch)[:, self.anomaly_index], None
        probabilities, patches = self.predict_with_map(batch)
        return probabilities[:, self.anomaly_index], anomaly_maps(patches, self.map_grid)

    def predict_with_map(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A hybrid classifier (sidecar "anomaly_map"): (probabilities [N, n_labels], patch distances [N, gh * gw])."""
        step = self.max_batch or len(batch)
        outs = [self.runner.run_all(batch[i:i + step]) for i in range(0, len(batch), step)]
        return softmax(np.concatenate([o[0] for o in outs])), np.concatenate([o[1] for o in outs])


def decide(score: float, threshold: float, labels: list[str]) -> str:
    """'anomaly' at or above the threshold, else the other label: the one decision rule of the classifier and the
    detector."""
    return "anomaly" if score >= threshold else next(n for n in labels if n != "anomaly")


def ort_threads(requested: int | None) -> int | None:
    """Intra-op threads for ORT: the requested number, else the physical cores (ORT's own default, made explicit
    so it can be recorded), else None (ORT decides)."""
    if requested is not None and requested < 1:
        raise UserError("--num-threads must be >= 1.")
    return requested or physical_cores()


# --------------------------------------------------------------------------------------------------
# The good-only patch detector of anomaly_detector.py, served without PyTorch
# --------------------------------------------------------------------------------------------------
DETECTOR_FORMAT = "tp4-patch-detector-v1"
DETECTOR_SCORE_TEXT = "image score = mean of the largest patch distances to the nearest good patch (the top share " \
                      "image_score_top, 0 = the largest alone) >= threshold"
IMAGE_SCORE_TOP = 0.01   # image score = mean of the top 1 % patch distances (AnomalyDINO's rule)
SIGMA_PATCHES = 0.5      # Gaussian smoothing of the map, in patches (PatchCore: sigma 4 px at 224 px / 8 px patches)
MAP_SIZE = 256           # anomaly maps (and the masks they are judged against) are 256 x 256


def nearest_distances(features: np.ndarray, bank: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distance of every patch [N, P, D] to its nearest bank patch [M, D]: [N, P] float32.
    |a - b|^2 = |a|^2 - 2 a.b + |b|^2: one matrix product per chunk of patches (as torch.cdist does)."""
    flat = np.ascontiguousarray(features.reshape(-1, features.shape[-1]), dtype=np.float32)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    bank_sq = (bank * bank).sum(1)
    best = np.empty(len(flat), np.float32)
    for i in range(0, len(flat), chunk):
        part = flat[i:i + chunk]
        d2 = (part * part).sum(1, keepdims=True) - 2.0 * (part @ bank.T) + bank_sq
        best[i:i + chunk] = d2.min(1)
    return np.sqrt(np.maximum(best, 0.0)).reshape(features.shape[:2])


class NearestPatches:
    """Distance of every patch [N, P, D] to its nearest bank patch, [N, P] float32: an OpenVINO graph holding the
    bank (f32, explicit: faster than numpy, the same distances to 1e-5), or nearest_distances in numpy where OpenVINO
    is not installed."""

    def __init__(self, bank: np.ndarray, threads: int | None = None):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.engine = ENGINE_OV if _has_openvino() else "numpy"
        if self.engine == ENGINE_OV:
            import openvino as ov

            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            self._request = ov.Core().compile_model(_nearest_graph(self.bank), "CPU", config).create_infer_request()

    def __call__(self, features: np.ndarray) -> np.ndarray:
        if self.engine != ENGINE_OV or not len(features):
            return nearest_distances(features, self.bank)
        x = np.ascontiguousarray(features, dtype=np.float32)
        per = max(1, self.CHUNK_ROWS // x.shape[1])  # images per call: the distance matrix stays small
        return np.concatenate([self._request.infer({0: x[i:i + per]})[0].copy() for i in range(0, len(x), per)])

    CHUNK_ROWS = 4096  # patches per call: a [4096, bank] float32 distance matrix (~270 MB at 16 589 patches)


def _nearest_graph(bank: np.ndarray):
    """features [N, P, D] -> sqrt(min_b |a|^2 - 2 a.b + |b|^2) [N, P], the bank as a constant."""
    import openvino as ov
    import openvino.opset13 as ops

    d = bank.shape[1]
    features = ops.parameter([-1, -1, d], np.float32, name="features")
    flat = ops.reshape(features, ops.constant(np.array([-1, d], np.int64)), special_zero=False)
    dots = ops.matmul(flat, ops.constant(np.ascontiguousarray(bank.T)), False, False)
    axis = ops.constant(np.array([1], np.int64))
    a_sq = ops.reduce_sum(ops.multiply(flat, flat), axis, keep_dims=True)
    b_sq = ops.constant((bank * bank).sum(1, dtype=np.float32)[None, :])
    d2 = ops.add(ops.add(ops.multiply(dots, ops.constant(np.float32(-2.0))), b_sq), a_sq)
    best = ops.sqrt(ops.maximum(ops.reduce_min(d2, axis, keep_dims=False), ops.constant(np.float32(0.0))))
    grid = ops.slice(ops.shape_of(features), np.array([0]), np.array([2]), np.array([1]))
    return ov.Model([ops.reshape(best, grid, special_zero=False)], [features], "nearest_patches")


def image_scores(patch_distances: np.ndarray, top: float = IMAGE_SCORE_TOP) -> np.ndarray:
    """[N, P] -> [N]: the mean of the `top` share of the largest patch distances (at least one patch; 0 = the
    largest alone). Averaging a few patches is steadier than the single largest one at fine grids."""
    k = max(1, int(top * patch_distances.shape[1]))
    return np.sort(patch_distances, axis=1)[:, -k:].mean(axis=1)


@functools.lru_cache(maxsize=8)  # a handful of (grid, size) per process: built once, not per batch
def _map_matrix(n_in: int, n_out: int, sigma: float) -> np.ndarray:
    """[n_out, n_in]: bilinear upsampling (align_corners=False, as torch's interpolate) then a Gaussian blur of
    `sigma` output pixels with reflected borders, as one matrix: map = Ay @ grid @ Ax.T."""
    up = np.zeros((n_out, n_in), np.float64)
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    np.add.at(up, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(up, (np.arange(n_out), hi), frac)
    radius = min(max(1, int(np.ceil(3 * sigma))), n_out - 1)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    blur = np.zeros((n_out, n_out), np.float64)
    for k, w in zip(offsets, kernel):
        j = np.arange(n_out) + k
        j = np.where(j < 0, -j, np.where(j >= n_out, 2 * (n_out - 1) - j, j))  # reflect, edge not repeated
        np.add.at(blur, (np.arange(n_out), j), w)
    return (blur @ up).astype(np.float32)


def anomaly_maps(patch_distances: np.ndarray, grid: tuple[int, int], size: int = MAP_SIZE,
                 sigma_patches: float = SIGMA_PATCHES) -> np.ndarray:
    """Patch distances [N, gh * gw] -> smoothed anomaly maps [N, size, size] (upsampled, Gaussian blur)."""
    gh, gw = grid
    ay = _map_matrix(gh, size, sigma_patches * size / gh)
    ax = _map_matrix(gw, size, sigma_patches * size / gw)
    return np.einsum("yi,nij,xj->nyx", ay, patch_distances.reshape(-1, gh, gw).astype(np.float32), ax,
                     optimize=True)


def read_detector(path: str | Path) -> tuple[np.ndarray, dict]:
    """(bank float16 [M, D], config) of a detector saved by anomaly_detector.py (safetensors: tensors and JSON text,
    nothing executable); anything else is a UserError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"detector {path} not found: run anomaly_detector.py first.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
            bank = f.get_tensor("bank")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a foreign file
        raise UserError(f"{path} is not a detector saved by anomaly_detector.py ({type(exc).__name__}).") from None
    if config.get("format") != DETECTOR_FORMAT:
        raise UserError(f"{path} is not a {DETECTOR_FORMAT} detector.")
    return bank, config


def files_sha256(path: str | Path) -> str:
    """sha256 of a model file; of an OpenVINO IR, of its .xml AND its .bin (the weights) together."""
    path = Path(path)
    if path.suffix.lower() != ".xml":
        return sha256_file(path)
    import hashlib

    return hashlib.sha256((sha256_file(path) + sha256_file(path.with_suffix(".bin"))).encode()).hexdigest()


def is_detector_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".safetensors"


class PatchDetector:
    """A detector of anomaly_detector.py (bank + configuration + its exported backbone), run by ONNX Runtime or
    OpenVINO: the same scoring interface as Classifier, plus a map per image that says where the defect is."""

    score_kind = "patch distance"

    def __init__(self, path: str | Path, threads: int = 0):
        path = Path(path)
        bank, self.config = read_detector(path)
        backbone = self.config.get("backbone_file")
        if not backbone or not (path.parent / backbone).is_file():
            raise UserError(f"{path}: its backbone {backbone or '(none recorded)'} is not beside it: keep the files "
                            "anomaly_detector.py wrote in modeles/ together.")
        backbone_path = path.parent / backbone
        backbone_sha = files_sha256(backbone_path)
        if self.config.get("backbone_sha256") not in (None, backbone_sha):
            raise UserError(f"{backbone_path} is not the backbone {path.name} was fitted with (sha256 differs): "
                            "a later anomaly_detector.py run replaced it; use that run's detector or refit.")
        # an IR (.xml, e.g. NNCF int8) needs OpenVINO; an ONNX backbone runs on OpenVINO where it is installed
        # (faster than ONNX Runtime on a DINOv2-S), else on ONNX Runtime
        engine = ENGINE_OV if backbone_path.suffix == ".xml" or _has_openvino() else ENGINE_ORT
        self.runner = Runner(backbone_path, engine, threads or None)
        self.nearest = NearestPatches(bank.astype(np.float32), threads or None)
        self.grid = tuple(self.config["grid"])
        self.threshold = float(self.config["threshold"])
        self.map_reference = self.threshold  # its score is a patch distance: the threshold is drawn red
        self.score_top = float(self.config.get("image_score_top", 0.0))  # detectors saved before it: the maximum
        self.preprocessing = self.config["preprocessing"]
        self.labels = list(LABELS)
        detector_sha = sha256_file(path)
        self.meta = {"model_path": str(path), "engine": self.runner.engine, "sha256": detector_sha,
                     "weights_sha256": backbone_sha, "anomaly_map": True,
                     "precision_hint": self.runner.precision, "backbone_path": str(backbone_path)}
        variant = "detector-int8" if "int8" in str(self.config.get("engine")) else "detector-fp32"
        self.info = {"variant": variant, "sha256": detector_sha, "category": self.config.get("category"),
                     "model_file": path.name, "engine": self.runner.engine, "base_model": self.config.get("model_name"),
                     "threshold": self.threshold, "precision": self.runner.precision, "labels": self.labels,
                     # detectors saved before the rule was stored had the good-only one
                     "threshold_rule": self.config.get("threshold_rule") or DETECTOR_GOOD_THRESHOLD_RULE,
                     "input_size": self.preprocessing["image_size"], "score": DETECTOR_SCORE_TEXT,
                     "map_grid": list(self.grid)}

    def patch_distances(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> [N, gh * gw] distance of each patch to the nearest good patch."""
        return self.nearest(self.runner.run(batch))

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image scores [N] (image_scores), anomaly maps [N, MAP_SIZE, MAP_SIZE])."""
        patches = self.patch_distances(batch)
        return self.image_scores(patches), anomaly_maps(patches, self.grid, self.config.get("map_size", MAP_SIZE),
                                            self.config.get("sigma_patches", SIGMA_PATCHES))

    def image_scores(self, patch_distances: np.ndarray) -> np.ndarray:
        return image_scores(patch_distances, self.score_top)

    def label_for(self, score: float) -> str:
        return decide(score, self.threshold, self.labels)


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True
