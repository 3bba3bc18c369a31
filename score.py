"""Azure ML scoring script (init() / run() contract) serving modeles/model_final.* with ONNX Runtime or OpenVINO.

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
Maps (optional): when the model folder also holds the good-only detector of the same category
(detector_<category>.safetensors + its backbone, from anomaly_detector.py; deploy_azure.py --detector ships them),
a request with ?maps=1 (or "maps": true in the JSON) gets, per image, "detector": {"label", "anomaly_score",
"threshold", "anomaly_map": {"grid": [h, w], "values": [[...]]}} (patch distances on the patch grid) and
"detector_ms"; without a detector such a request is a 400 "no_detector". A hybrid classifier (model_final of a
hybrid-* variant: its sidecar says "anomaly_map") gives its own map, from the same pass: "anomaly_map" per prediction,
no detector needed.
GET /score: the model's (and detector's) description and these limits. Bad requests get
{"error": {"status", "code", "message"}} with a 4xx status (400 unreadable input, 413 too large, 415 unsupported Content-Type), never a 500.
Limits (environment variables): TP4_MAX_BODY_MB (10), TP4_MAX_IMAGES (16 per request), TP4_MAX_PIXELS (25e6 per
image), TP4_MAX_REQUEST_PIXELS (64e6 per request: checked on the images' headers before any is decoded; the images
are then decoded, resized and released one at a time, so a worker's memory is bounded whatever the request holds);
TP4_ORT_THREADS sets ONNX Runtime's intra-op threads (default: ONNX Runtime's choice).

Only numpy, Pillow and onnxruntime or openvino are needed (no torch in the deployment image): the sidecar's "engine"
says which (ONNX Runtime on model_final.onnx, or OpenVINO on an ONNX file or an IR .xml + .bin, with its precision
hint f32 / bf16). The model, its sidecar and the
image preprocessing come from inference.py (the very functions the training loaders use); deploy_azure.py ships
score.py with inference.py, lab_io.py and lab_targets.py.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

# azmlinfsrv (locally and on Azure) loads this file by its path: its sibling modules are not importable otherwise
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_PIXELS, ImageError, Classifier, PatchDetector, \
    env_number, find_sidecar, serving_model_dir, serving_threads, image_header, load_rgb, preprocess  # noqa: E402

from lab_io import UserError, entry_script_only  # noqa: E402

SERVER_MODULE = "azureml_inference_server_http.server.user_script"  # loaded only by the server that runs init()

try:  # inside azmlinfsrv these names are mapped onto the server's own module
    from azureml.contrib.services.aml_request import rawhttp
    from azureml.contrib.services.aml_response import AMLResponse
except ImportError:  # imported outside the server (deploy_azure.py, tests)
    from azureml_inference_server_http.api.aml_request import rawhttp
    from azureml_inference_server_http.api.aml_response import AMLResponse

JSON_TYPES = ("application/json", "text/json")
SNIFF_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")  # e.g. curl --data-binary without -H

logger = logging.getLogger("azmlinfsrv.score")
_model: Classifier | None = None
_detector: PatchDetector | None = None  # the good-only detector of the same category, when shipped: maps


def limits() -> dict:
    return {"max_body_bytes": int(env_number("TP4_MAX_BODY_MB", 10) * 1_000_000),
            "max_images": int(env_number("TP4_MAX_IMAGES", 16)),
            "max_pixels": int(env_number("TP4_MAX_PIXELS", DEFAULT_MAX_PIXELS)),
            "max_request_pixels": int(env_number("TP4_MAX_REQUEST_PIXELS", DEFAULT_MAX_REQUEST_PIXELS))}


def _read_image(read, data: bytes, what: str, max_pixels: int):
    try:
        return read(data, what, max_pixels)
    except ImageError as exc:
        code = "image_too_large" if exc.too_large else "empty_image" if not data else "not_an_image"
        raise RequestError(413 if exc.too_large else 400, code, str(exc)) from None


def decode_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image, exactly as the training loaders read files (inference.load_rgb)."""
    return _read_image(load_rgb, data, what, max_pixels)


def check_pixels(images: list[tuple[str, bytes]], lim: dict) -> int:
    """Every image's size from its header, nothing decoded: 400 for a broken one, 413 past TP4_MAX_PIXELS or when
    the request's images hold more than TP4_MAX_REQUEST_PIXELS together. Returns the total."""
    total = 0
    for what, data in images:
        width, height = _read_image(image_header, data, what, lim["max_pixels"])
        total += width * height
    if total > lim["max_request_pixels"]:
        raise RequestError(413, "request_too_large", f"the {len(images)} image(s) hold {total} pixels together, "
                                                     f"more than the limit of {lim['max_request_pixels']} pixels "
                                                     "per request (TP4_MAX_REQUEST_PIXELS): send fewer or smaller "
                                                     "images per request")
    return total


def model_inputs(images: list[tuple[str, bytes]], preprocessings: list[dict], lim: dict) -> list[np.ndarray]:
    """The request's images as one float32 [N, 3, H, W] batch per preprocessing (the classifier's, and the
    detector's when it differs). Each image is decoded, resized and released before the next is decoded."""
    check_pixels(images, lim)
    batches = [[] for _ in preprocessings]
    for what, data in images:
        img = decode_image(data, what, lim["max_pixels"])
        for batch, pre in zip(batches, preprocessings):
            batch.append(preprocess(img, pre))
        del img  # the full-size pixels go before the next image is decoded
    return [np.stack(batch) for batch in batches]


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


def parse_images(body: bytes, mimetype: str, lim: dict) -> tuple[list[tuple[str, bytes]], bool]:
    """([(name, encoded image bytes)] of the request, not decoded yet; whether its JSON asks for maps: "maps":
    true)."""
    mimetype = (mimetype or "").lower()
    if mimetype in SNIFF_TYPES:  # no usable Content-Type: JSON if it looks like JSON, else image bytes
        mimetype = "application/json" if body.lstrip()[:1] == b"{" else "application/octet-stream"
    if mimetype in JSON_TYPES or mimetype.endswith("+json"):
        return _images_from_json(body, lim)
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        if not body:
            raise RequestError(400, "empty_body", "the request body is empty: send the image bytes")
        return [("the request body", body)], False
    raise RequestError(415, "unsupported_media_type",
                       f"Content-Type {mimetype!r} is not supported: send image bytes (image/png, image/jpeg) or "
                       'JSON (application/json) {"images": ["<base64>", ...]}')


def _images_from_json(body: bytes, lim: dict) -> tuple[list[tuple[str, bytes]], bool]:
    if not body.strip():
        raise RequestError(400, "empty_body", 'the request body is empty: send {"images": ["<base64>", ...]}')
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # thousands of nested [ or {: Python's parser gives up, the request is still the client's
        raise RequestError(400, "invalid_json", "the body is JSON nested too deeply") from None
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
        decoded.append((f"images[{i}]", data))
    return decoded, doc.get("maps") is True


def map_reply(patches: np.ndarray, grid) -> dict:
    """A map at the patch grid (rows top to bottom; upsample it to the image for display, as predict.py --heatmaps
    does)."""
    gh, gw = grid
    return {"grid": [gh, gw], "unit": "patch distance", "values": np.round(patches.reshape(gh, gw), 5).tolist()}


def detector_reply(patches: np.ndarray) -> dict:
    """One image's answer of the good-only detector: its decision, score and map."""
    score = float(_detector.image_scores(patches[None])[0])
    return {"label": _detector.label_for(score), "anomaly_score": score, "threshold": _detector.threshold,
            "anomaly_map": map_reply(patches, _detector.grid)}


# --------------------------------------------------------------------------------------------------
# Azure ML contract
# --------------------------------------------------------------------------------------------------
def init() -> None:
    """Called once per worker: find, verify and load the model. Any error stops the server from starting; under
    azmlinfsrv, a deployment problem (no model, a tampered or mismatched one) does so in one line (_stop_server)."""
    try:
        _load_models()
    except (OSError, ValueError, UserError) as exc:
        if SERVER_MODULE in sys.modules:
            _stop_server(exc)
        raise


def _stop_server(exc: Exception) -> None:
    """The server would log a traceback of its own and of ours, then exit 3; the same exit, with one line that says
    what to fix."""
    logger.error("error: %s; the server does not start", exc)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(3)


def _load_models() -> None:
    global _model, _detector
    lim = limits()
    sidecar = find_sidecar(serving_model_dir())
    threads = serving_threads()
    _model = Classifier(sidecar, threads=threads)
    logger.info("model %s loaded (variant %s, sha256 %s..., category %s, input %s, labels %s); limits %s",
                _model.meta["model_path"], _model.info["variant"], str(_model.info["sha256"])[:12],
                _model.info["category"], _model.info["input_size"], _model.labels, lim)
    _detector = None
    found = sorted(serving_model_dir().rglob(f"detector_{_model.info['category']}.safetensors"))
    if found:  # optional: shipped by deploy_azure.py --detector; a broken one stops the server like the model
        _detector = PatchDetector(found[0], threads=threads)
        logger.info("detector %s loaded (%s, sha256 %s..., grid %s): maps on request", found[0],
                    _detector.info["variant"], _detector.info["sha256"][:12], _detector.info["map_grid"])


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
                                "detector": _detector.info if _detector else None,
                                "usage": "POST image bytes (Content-Type image/png|image/jpeg) or JSON "
                                         '{"images": ["<base64>", ...]} to this URL; add ?maps=1 (or "maps": true '
                                         "in the JSON) for the good-only detector's anomaly maps"})
        if request.method == "OPTIONS":
            return _reply(200, {}, {"Allow": "GET, POST, OPTIONS"})
        if request.method != "POST":
            raise RequestError(405, "method_not_allowed", f"method {request.method} is not allowed: use POST")
        images, json_maps = parse_images(read_body(request, lim["max_body_bytes"]), request.mimetype, lim)
        want_maps = json_maps or request.args.get("maps", "").lower() in ("1", "true", "yes")  # or ?maps=1
        own_maps = want_maps and bool(_model.map_grid)  # a hybrid classifier: its own graph gives the map
        if want_maps and not own_maps and _detector is None:
            raise RequestError(400, "no_detector", "maps were requested but this deployment ships no good-only "
                                                   "detector (deploy_azure.py --detector modeles/detector_<category>"
                                                   ".safetensors)")
        preprocessings = [_model.preprocessing]
        if want_maps and not own_maps and _detector.preprocessing != _model.preprocessing:
            preprocessings.append(_detector.preprocessing)
        batches = model_inputs(images, preprocessings, lim)
        del images
        batch = batches[0]
        t1 = time.perf_counter()
        probs, patches = _model.predict_with_map(batch) if own_maps else (_model.predict(batch), None)
        t2 = time.perf_counter()
        predictions = []
        for i, p in enumerate(probs):
            predictions.append({"index": i, "label": _model.label_of(p), "threshold": _model.threshold,
                                "anomaly_probability": float(p[_model.anomaly_index]),
                                "probabilities": {name: float(v) for name, v in zip(_model.labels, p)}})
        reply = {"predictions": predictions, "n_images": len(predictions), "model": _model.info,
                 "preprocess_ms": (t1 - t0) * 1000.0, "inference_ms": (t2 - t1) * 1000.0}
        if own_maps:
            for pred, image_patches in zip(predictions, patches):
                pred["anomaly_map"] = map_reply(image_patches, _model.map_grid)
        elif want_maps:
            t3 = time.perf_counter()
            for pred, patches in zip(predictions, _detector.patch_distances(batches[-1])):
                pred["detector"] = detector_reply(patches)
            reply["detector_ms"] = (time.perf_counter() - t3) * 1000.0
        return _reply(200, {**reply, "total_ms": (time.perf_counter() - t0) * 1000.0})
    except RequestError as exc:
        logger.info("rejected request: %s %s", exc.status, exc.message)
        return _reply(exc.status, {"error": {"status": exc.status, "code": exc.code, "message": exc.message}})
    except Exception as exc:  # noqa: BLE001 - a bug of ours: logged, answered as JSON, the server keeps serving
        logger.exception("scoring failed")
        return _reply(500, {"error": {"status": 500, "code": "internal_error",
                                      "message": f"{type(exc).__name__}: {str(exc)[:200]}"}})


if __name__ == "__main__":
    entry_script_only("score.py is Azure ML's entry script (init() / run()), not a command: serve it here with "
                      "`azmlinfsrv --entry_script score.py --model_dir modeles --port 5001`, or deploy it with "
                      "`python deploy_azure.py`")
