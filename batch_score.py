"""Azure ML batch-deployment scoring script (init() / run(mini_batch)): the daily backlog of part images, scored by
modeles/model_final.* on a compute cluster (deploy_azure.py --batch builds the endpoint and the deployment).

Model: found, verified and loaded exactly as score.py does it: the sidecar model_final.json in AZUREML_MODEL_DIR
(or below it; without AZUREML_MODEL_DIR, ./modeles), the ONNX/IR file refused when its sha256 differs from the
sidecar's, ONNX Runtime or OpenVINO as the sidecar says, TP4_ORT_THREADS intra-op threads.

run(mini_batch) gets a list of file paths and returns one CSV line per file, in the order received (Azure's
append_row output action writes each returned element as one line of output_file_name; lines of different
mini-batches are not ordered, hence the path in each):

    path,label,anomaly_probability,threshold,model_sha256,error          (BATCH_COLUMNS, no header line)

A file that is not a usable image (missing, truncated, not an image, larger than TP4_MAX_PIXELS: default 25e6, as
score.py) gets its line with an empty label and the reason in `error`; the mini-batch goes on. Grayscale,
palette, RGBA and 16-bit images are converted as in training and in score.py (inference.load_rgb). Memory stays
bounded: images are decoded one at a time and only their preprocessed tensors are kept, for one model batch at a
time (the model's fixed batch size, else TP4_BATCH_SIZE, default 16). The label is inference.Classifier's
decision (the sidecar's threshold on P(anomaly)), the one predict.py and score.py use.

Only numpy, Pillow and onnxruntime or openvino are needed (no torch, no HTTP server).
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import numpy as np

# Azure's batch runtime loads this file by its path: its sibling modules are not importable otherwise
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import DEFAULT_MAX_PIXELS, Classifier, ImageError, env_number, find_sidecar, load_rgb, preprocess, \
    serving_model_dir, serving_threads  # noqa: E402
from lab_io import entry_script_only  # noqa: E402
from lab_targets import BATCH_COLUMNS  # noqa: E402


logger = logging.getLogger("batch_score")
_model: Classifier | None = None


def init() -> None:
    """Called once per worker process: find, verify (sha256) and load the model. Any error fails the job early."""
    global _model
    threads = serving_threads()
    _model = Classifier(find_sidecar(serving_model_dir()), threads=threads)
    logger.info("model %s loaded (variant %s, sha256 %s..., engine %s, batch %s, %s threads)",
                _model.meta["model_path"], _model.info["variant"], _model.meta["sha256"][:12], _model.info["engine"],
                batch_size(), threads or "default")


def batch_size() -> int:
    """Images per model call: the exported graph's fixed batch, else TP4_BATCH_SIZE (16, as predict.py)."""
    return _model.max_batch or int(env_number("TP4_BATCH_SIZE", 16))


def _prepared(path: str, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """(the model's input float32 [3, H, W], "") or (None, why not): never raises for a bad file. The decoded
    image is dropped on return: only the small tensor is kept."""
    name = Path(path).name
    try:
        return preprocess(load_rgb(path, name, max_pixels), _model.preprocessing), ""
    except ImageError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one odd file (decoder bug, MemoryError) must not fail the mini-batch
        return None, f"{name} cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}"


def score_files(paths: list[str]) -> list[dict]:
    """One row per path, in order: {column: value} with BATCH_COLUMNS."""
    max_pixels, step = int(env_number("TP4_MAX_PIXELS", DEFAULT_MAX_PIXELS)), batch_size()
    rows, pending, ready = [], [], []  # pending: rows waiting for their batch; ready: (row, tensor)

    def flush() -> None:
        if ready:
            probabilities = _model.predict(np.stack([x for _, x in ready]))
            for (row, _), p in zip(ready, probabilities):
                row["label"] = _model.label_of(p)
                row["anomaly_probability"] = f"{p[_model.anomaly_index]:.6f}"
        rows.extend(pending)
        pending.clear()
        ready.clear()

    for path in paths:
        x, error = _prepared(str(path), max_pixels)
        row = {"path": str(path), "label": "", "anomaly_probability": "", "threshold": f"{_model.threshold:.6g}",
               "model_sha256": _model.meta["sha256"], "error": error}
        pending.append(row)
        if x is not None:
            ready.append((row, x))
            if len(ready) >= step:
                flush()
    flush()
    return rows


def csv_line(row: dict) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([row[c] for c in BATCH_COLUMNS])
    return buffer.getvalue()


def run(mini_batch) -> list[str]:
    """Azure's call for each mini-batch: a list of file paths -> one CSV line per file (BATCH_COLUMNS)."""
    if _model is None:
        raise RuntimeError("init() has not run")
    rows = score_files([str(p) for p in mini_batch])
    failed = sum(bool(r["error"]) for r in rows)
    logger.info("mini-batch of %d files scored, %d unreadable", len(rows), failed)
    return [csv_line(r) for r in rows]


if __name__ == "__main__":
    entry_script_only("batch_score.py is the entry script of an Azure ML batch endpoint (init() / run(mini_batch)), "
                      "not a command: deploy it with `python deploy_azure.py --batch`; to score a folder of images "
                      "here, `python predict.py --input FOLDER`")
