"""Azure ML scoring script (init() / run() contract) serving modeles/model_final.onnx with ONNX Runtime.

Runs unchanged on a managed online endpoint and locally on Azure ML's own inference server:

    azmlinfsrv --entry_script score.py --model_dir modeles --port 5001

Model: the folder in AZUREML_MODEL_DIR (set by Azure, or by --model_dir), searched recursively for the sidecar
`model_final.json` (Azure puts a registered folder in a subfolder); without AZUREML_MODEL_DIR, ./modeles.
The sidecar ("tp4-onnx-sidecar-v1", written by onnx_optimization.py) gives the ONNX file, labels and preprocessing;
init() refuses to serve an ONNX file whose sha256 differs from the sidecar's.

Requests (POST /score), one or several images:
  * raw image bytes, Content-Type image/png, image/jpeg (any format Pillow reads) or application/octet-stream;
  * JSON, Content-Type application/json: {"images": ["<base64>", ...]} (a "data:image/...;base64," prefix is allowed).
Reply 200: {"predictions": [{"index", "label", "anomaly_probability", "probabilities": {label: p}}...],
            "n_images", "model": {"variant", "sha256", "created", "category", ...}, "inference_ms", "preprocess_ms",
            "total_ms"}.
GET /score: the model's description and these limits. Bad requests get {"error": {"status", "code", "message"}}
with a 4xx status (400 unreadable input, 413 too large, 415 unsupported Content-Type), never a 500.
Limits (environment variables): TP4_MAX_BODY_MB (10), TP4_MAX_IMAGES (16 per request), TP4_MAX_PIXELS (40e6 per
image); TP4_ORT_THREADS sets ONNX Runtime's intra-op threads (default: ONNX Runtime's choice).

Only numpy, Pillow and onnxruntime are needed (no torch in the deployment image); the preprocessing is
mvtec_dataset.image_to_tensor's, rewritten in numpy (tests check both give the same tensor).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

try:  # inside azmlinfsrv these names are mapped onto the server's own module
    from azureml.contrib.services.aml_request import rawhttp
    from azureml.contrib.services.aml_response import AMLResponse
except ImportError:  # imported outside the server (deploy_azure.py, tests)
    from azureml_inference_server_http.api.aml_request import rawhttp
    from azureml_inference_server_http.api.aml_response import AMLResponse

SIDECAR_FORMAT = "tp4-onnx-sidecar-v1"
SIDECAR_NAME = "model_final.json"
REQUIRED_KEYS = ("format", "model_file", "variant", "category", "labels", "input_name", "output_name",
                 "preprocessing", "sha256")
JSON_TYPES = ("application/json", "text/json")
SNIFF_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")  # e.g. curl --data-binary without -H

logger = logging.getLogger("azmlinfsrv.score")
_model: "OnnxClassifier | None" = None


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {os.environ[name]!r}") from None
    if value <= 0:
        raise ValueError(f"environment variable {name} must be > 0")
    return value


def limits() -> dict:
    return {"max_body_bytes": int(_env_number("TP4_MAX_BODY_MB", 10) * 1_000_000),
            "max_images": int(_env_number("TP4_MAX_IMAGES", 16)),
            "max_pixels": int(_env_number("TP4_MAX_PIXELS", 40e6))}


# --------------------------------------------------------------------------------------------------
# Model: sidecar, integrity check, preprocessing, inference
# --------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    # Same as train_utils.sha256_file, kept here because only score.py is shipped to Azure (no torch there).
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_sidecar(model_dir: str | Path) -> Path:
    """The sidecar in `model_dir` or below it: model_final.json first, else the only tp4 sidecar there."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    if (model_dir / SIDECAR_NAME).is_file():
        return model_dir / SIDECAR_NAME
    named = sorted(model_dir.rglob(SIDECAR_NAME))
    if len(named) == 1:
        return named[0]
    candidates = named or [p for p in sorted(model_dir.rglob("*.json"))
                           if p.stat().st_size < 1_000_000 and _is_sidecar(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"no {SIDECAR_NAME} (ONNX sidecar) in {model_dir} or its subfolders: "
                                "run onnx_optimization.py first")
    raise ValueError(f"several ONNX sidecars under {model_dir}: {', '.join(map(str, candidates))}; keep one")


def _is_sidecar(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == SIDECAR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_sidecar(path: str | Path, verify_sha256: bool = True) -> dict:
    """Load and check a sidecar; returns it with "onnx_path" added. Raises ValueError/FileNotFoundError."""
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
    if not (isinstance(labels, list) and len(labels) >= 2 and "anomaly" in labels):
        raise ValueError(f"sidecar {path}: labels must list the classes with 'anomaly' among them, got {labels!r}")
    pre = meta["preprocessing"]
    if not isinstance(pre, dict):
        raise ValueError(f"sidecar {path}: preprocessing must be an object")
    expected = {"resize": "bilinear", "crop": None, "color": "RGB", "layout": "NCHW", "dtype": "float32"}
    for key, value in expected.items():
        if pre.get(key, value) != value:
            raise ValueError(f"sidecar {path}: preprocessing {key}={pre.get(key)!r} is not supported "
                             f"(expected {value!r})")
    size = pre.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"sidecar {path}: preprocessing image_size must be [height, width], got {size!r}")
    if len(pre.get("mean", [])) != 3 or len(pre.get("std", [])) != 3 or min(pre["std"]) <= 0:
        raise ValueError(f"sidecar {path}: preprocessing mean and std must have 3 values (std > 0)")
    onnx_path = path.parent / meta["model_file"]
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} named by {path} does not exist")
    if verify_sha256:
        actual = sha256_file(onnx_path)
        if actual != meta["sha256"]:
            raise ValueError(f"sha256 of {onnx_path} ({actual[:12]}...) differs from its sidecar's "
                             f"({str(meta['sha256'])[:12]}...): the ONNX file was changed or the sidecar is stale; "
                             "re-run onnx_optimization.py")
    threshold = meta.get("threshold", 0.5)  # sidecars written before the threshold existed: argmax
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"sidecar {path}: threshold must be a probability in [0, 1], got {threshold!r}")
    return {**meta, "threshold": float(threshold), "onnx_path": str(onnx_path)}


def decode_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image, as mvtec_dataset.load_rgb does (transparency composited on black)."""
    if not data:
        raise RequestError(400, "empty_image", f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise RequestError(413, "image_too_large", f"{what} is {img.width}x{img.height} pixels, more than "
                                                       f"the limit of {max_pixels} pixels")
        img.load()
        if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (0, 0, 0))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise RequestError(413, "image_too_large", f"{what}: {exc}") from None
    except UnidentifiedImageError:
        raise RequestError(400, "not_an_image", f"{what} is not an image Pillow can read (PNG, JPEG, BMP...)") \
            from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt file
        raise RequestError(400, "not_an_image", f"{what} is a broken image: {type(exc).__name__}: "
                                               f"{str(exc)[:200]}") from None


def preprocess(img: Image.Image, pre: dict) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W]: whole image resized (bilinear), /scale, (x - mean) / std."""
    height, width = pre["image_size"]
    x = np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)
    x = x / np.float32(pre.get("scale", 255.0))
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class OnnxClassifier:
    def __init__(self, sidecar_path: str | Path, threads: int = 0):
        self.meta = read_sidecar(sidecar_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.meta["onnx_path"], options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if self.meta["input_name"] not in inputs or self.meta["output_name"] not in outputs:
            raise ValueError(f"{self.meta['onnx_path']} has inputs {list(inputs)} and outputs {outputs}, the sidecar "
                             f"names {self.meta['input_name']!r} -> {self.meta['output_name']!r}")
        batch_dim = inputs[self.meta["input_name"]].shape[0]
        self.max_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None  # None = dynamic
        self.labels = list(self.meta["labels"])
        self.anomaly_index = self.labels.index("anomaly")
        self.threshold = self.meta["threshold"]
        self.info = {k: self.meta.get(k) for k in ("variant", "sha256", "created", "category", "model_file",
                                                  "base_model", "opset", "threshold")}
        self.info["labels"] = self.labels
        self.info["input_size"] = self.meta["preprocessing"]["image_size"]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> probabilities [N, n_labels] (float64)."""
        step = self.max_batch or len(batch)
        logits = np.concatenate([self.session.run([self.meta["output_name"]],
                                                  {self.meta["input_name"]: batch[i:i + step]})[0]
                                 for i in range(0, len(batch), step)]).astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def model_dir() -> Path:
    """AZUREML_MODEL_DIR (Azure, or azmlinfsrv --model_dir), else ./modeles."""
    return Path(os.environ.get("AZUREML_MODEL_DIR") or "modeles")


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _reply(status: int, body: dict, headers: dict | None = None) -> AMLResponse:
    response = AMLResponse(body, status, json_str=True)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def read_body(request, max_bytes: int) -> bytes:
    """The request body, refusing more than max_bytes (413) without holding it in memory."""
    length = request.content_length
    stream = request.stream
    if length is not None and length > max_bytes:
        _drain(stream, 4 * max_bytes)
        raise RequestError(413, "payload_too_large", f"request body of {length} bytes exceeds the limit of "
                                                     f"{max_bytes} bytes (TP4_MAX_BODY_MB)")
    chunks, size = [], 0
    while True:
        chunk = stream.read(min(1 << 20, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            _drain(stream, 4 * max_bytes)
            raise RequestError(413, "payload_too_large", f"request body exceeds the limit of {max_bytes} bytes "
                                                         "(TP4_MAX_BODY_MB)")
    return b"".join(chunks)


def _drain(stream, max_bytes: int) -> None:
    # Reading (and dropping) what the client still sends lets it receive the 413 instead of a reset connection.
    read = 0
    while read < max_bytes:
        chunk = stream.read(1 << 20)
        if not chunk:
            return
        read += len(chunk)


def parse_images(body: bytes, mimetype: str, lim: dict) -> list[Image.Image]:
    mimetype = (mimetype or "").lower()
    if mimetype in SNIFF_TYPES:  # no usable Content-Type: JSON if it looks like JSON, else image bytes
        mimetype = "application/json" if body.lstrip()[:1] == b"{" else "application/octet-stream"
    if mimetype in JSON_TYPES or mimetype.endswith("+json"):
        return _images_from_json(body, lim)
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        if not body:
            raise RequestError(400, "empty_body", "the request body is empty: send the image bytes")
        return [decode_image(body, "the request body", lim["max_pixels"])]
    raise RequestError(415, "unsupported_media_type",
                       f"Content-Type {mimetype!r} is not supported: send image bytes (image/png, image/jpeg) or "
                       'JSON (application/json) {"images": ["<base64>", ...]}')


def _images_from_json(body: bytes, lim: dict) -> list[Image.Image]:
    if not body.strip():
        raise RequestError(400, "empty_body", 'the request body is empty: send {"images": ["<base64>", ...]}')
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise RequestError(400, "missing_images", 'the JSON body must be an object {"images": ["<base64>", ...]}')
    images = doc["images"]
    if not isinstance(images, list) or not images:
        raise RequestError(400, "invalid_images", '"images" must be a non-empty list of base64 strings')
    if len(images) > lim["max_images"]:
        raise RequestError(413, "too_many_images", f"{len(images)} images in one request, the limit is "
                                                   f"{lim['max_images']} (TP4_MAX_IMAGES)")
    decoded = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise RequestError(400, "invalid_images", f"images[{i}] is a {type(item).__name__}, not a base64 string")
        if item.startswith("data:") and "," in item:
            item = item.split(",", 1)[1]
        try:
            data = base64.b64decode("".join(item.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "invalid_base64", f"images[{i}] is not valid base64") from None
        decoded.append(decode_image(data, f"images[{i}]", lim["max_pixels"]))
    return decoded


# --------------------------------------------------------------------------------------------------
# Azure ML contract
# --------------------------------------------------------------------------------------------------
def init() -> None:
    """Called once per worker: find, verify and load the model. Any error stops the server from starting."""
    global _model
    lim = limits()
    sidecar = find_sidecar(model_dir())
    threads = int(os.environ.get("TP4_ORT_THREADS", "0") or 0)
    _model = OnnxClassifier(sidecar, threads=threads)
    logger.info("model %s loaded (variant %s, sha256 %s..., category %s, input %s, labels %s); limits %s",
                _model.meta["onnx_path"], _model.info["variant"], str(_model.info["sha256"])[:12],
                _model.info["category"], _model.info["input_size"], _model.labels, lim)


@rawhttp
def run(request):
    """POST: classify the image(s) of the request; GET: describe the model. Always a JSON reply."""
    t0 = time.perf_counter()
    try:
        if _model is None:
            return _reply(503, {"error": {"status": 503, "code": "not_ready", "message": "init() has not run"}})
        lim = limits()
        if request.method == "GET":
            return _reply(200, {"model": _model.info, "limits": lim,
                                "usage": "POST image bytes (Content-Type image/png|image/jpeg) or JSON "
                                         '{"images": ["<base64>", ...]} to this URL'})
        if request.method == "OPTIONS":
            return _reply(200, {}, {"Allow": "GET, POST, OPTIONS"})
        if request.method != "POST":
            raise RequestError(405, "method_not_allowed", f"method {request.method} is not allowed: use POST")
        images = parse_images(read_body(request, lim["max_body_bytes"]), request.mimetype, lim)
        batch = np.stack([preprocess(img, _model.meta["preprocessing"]) for img in images])
        t1 = time.perf_counter()
        probs = _model.predict(batch)
        t2 = time.perf_counter()
        predictions = []
        for i, p in enumerate(probs):
            # the decision threshold chosen on the validation split, stored in the sidecar (not argmax)
            is_anomaly = p[_model.anomaly_index] >= _model.threshold
            label = "anomaly" if is_anomaly else next(n for n in _model.labels if n != "anomaly")
            predictions.append({"index": i, "label": label, "threshold": _model.threshold,
                                "anomaly_probability": float(p[_model.anomaly_index]),
                                "probabilities": {name: float(v) for name, v in zip(_model.labels, p)}})
        return _reply(200, {"predictions": predictions, "n_images": len(predictions), "model": _model.info,
                            "preprocess_ms": (t1 - t0) * 1000.0, "inference_ms": (t2 - t1) * 1000.0,
                            "total_ms": (time.perf_counter() - t0) * 1000.0})
    except RequestError as exc:
        logger.info("rejected request: %s %s", exc.status, exc.message)
        return _reply(exc.status, {"error": {"status": exc.status, "code": exc.code, "message": exc.message}})
    except Exception as exc:  # noqa: BLE001 - a bug of ours: logged, answered as JSON, the server keeps serving
        logger.exception("scoring failed")
        return _reply(500, {"error": {"status": 500, "code": "internal_error",
                                      "message": f"{type(exc).__name__}: {str(exc)[:200]}"}})
