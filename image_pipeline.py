"""The images of a folder and the model that scores them: finding image files, decoding and preprocessing them in
parallel workers, batched model calls, results in input order (predict.py and the end-to-end benchmark)."""
from __future__ import annotations

import glob
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from inference import (DEFAULT_MAX_PIXELS, Classifier, ImageError, PatchDetector, find_sidecar, is_detector_file,
                       is_image_file, load_rgb, normalize, numeric_precision, resize_uint8)
from lab_io import UserError


def resolve_sidecar(model: str | Path) -> Path:
    """--model: a folder (model_final.json in it or below it), a sidecar .json, or a model file with its .json."""
    path = Path(model).expanduser()
    if path.is_dir():
        try:
            return find_sidecar(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"--model {path}: {exc}") from None
    if path.is_file():
        sidecar = path if path.suffix.lower() == ".json" else path.with_suffix(".json")
        if sidecar.is_file():
            return sidecar
        raise UserError(f"{path} has no sidecar {sidecar.name} beside it (it says which input, labels and threshold "
                        "the model expects): export the model with onnx_optimization.py")
    raise UserError(f"model {path} not found: export one with `python onnx_optimization.py` (it writes "
                    "modeles/model_final.* and model_final.json), or pass --model")


def load_model(model: str | Path, threads: int | None = None) -> Classifier | PatchDetector:
    """The classifier of a sidecar, or a good-only detector of anomaly_detector.py (a .safetensors file)."""
    if is_detector_file(model):
        return PatchDetector(Path(model).expanduser(), threads=threads or 0)
    sidecar = resolve_sidecar(model)
    try:
        return Classifier(sidecar, threads=threads or 0)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None


def model_precision(model: Classifier) -> str:
    """What really runs (inference.numeric_precision of the served variant)."""
    return numeric_precision(str(model.info.get("variant")), model.runner.precision)


def _walk(folder: Path):
    """Image files under a folder, recursively; hidden files and folders (.git, macOS '._x.png') are skipped."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image_file(Path(name)):
                yield Path(root) / name


def find_images(inputs: list[str], exclude: tuple = ()) -> list[Path]:
    """Folders (recursive), glob patterns (`**` allowed) and files -> resolved image paths, without duplicates,
    in the order given (sorted within a folder or a pattern). A file named explicitly is taken whatever its
    extension; a folder or a pattern contributes image extensions only. Paths under `exclude` are left out."""
    found, seen = [], set()
    excluded = [Path(e).resolve() for e in exclude if e]

    def add(path: Path) -> None:
        resolved = path.resolve()
        if resolved not in seen and not any(resolved.is_relative_to(e) for e in excluded):
            seen.add(resolved)
            found.append(resolved)

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            for p in _walk(path):
                add(p)
        elif path.is_file():
            add(path)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise UserError(f"--input {item!r} matches no file")
            for m in map(Path, matches):
                if m.is_dir():
                    for p in _walk(m):
                        add(p)
                elif m.is_file() and is_image_file(m):
                    add(m)
        else:
            raise UserError(f"--input {item} does not exist (give folders, glob patterns or image files)")
    return found


def prepare_image(path: str | Path, preprocessing: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  keep_uint8: bool = False) -> dict:
    """One image file -> the model's input float32 [3, H, W] (inference.load_rgb + resize_uint8 + normalize, i.e.
    inference.preprocess), with the time spent reading, decoding and resizing. Never raises for a bad file: the
    reason is in "error". Runs in the decode workers (a top-level function: a process pool can call it too)."""
    path = Path(path)
    out = {"path": str(path), "pixels": None, "uint8": None, "error": "", "width": "", "height": "",
           "read_s": 0.0, "decode_s": 0.0, "resize_s": 0.0}
    t0 = time.perf_counter()
    try:
        data = path.read_bytes()
    except OSError as exc:
        out["error"] = f"cannot read {path.name}: {exc.strerror or type(exc).__name__}"
        return out
    t1 = time.perf_counter()
    out["read_s"] = t1 - t0
    try:
        img = load_rgb(data, path.name, max_pixels)
    except ImageError as exc:
        out["error"] = str(exc)
        return out
    except Exception as exc:  # noqa: BLE001 - one odd file (decoder bug, MemoryError) must not stop the run
        out["error"] = f"{path.name} cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}"
        return out
    finally:
        out["decode_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    out["width"], out["height"] = img.size
    pixels = resize_uint8(img, preprocessing)
    out["pixels"] = normalize(pixels, preprocessing)  # resize_uint8 + normalize = inference.preprocess
    if keep_uint8:
        out["uint8"] = pixels
    out["resize_s"] = time.perf_counter() - t2
    return out


class Timing:
    """Where the time of a pass went. Worker times (read, decode, resize) are summed over workers: with N workers
    running at once they can add up to more than the wall time."""

    def __init__(self):
        self.read_s = self.decode_s = self.resize_s = self.model_s = self.wait_s = self.wall_s = 0.0
        self.images = self.scored = self.batches = 0

    def add_prepared(self, item: dict) -> None:
        self.read_s += item["read_s"]
        self.decode_s += item["decode_s"]
        self.resize_s += item["resize_s"]
        self.images += 1

    def per_image_ms(self) -> dict:
        n = max(self.images, 1)
        return {"read_ms_per_img": 1000 * self.read_s / n, "decode_ms_per_img": 1000 * self.decode_s / n,
                "resize_ms_per_img": 1000 * self.resize_s / n,
                "model_ms_per_img": 1000 * self.model_s / max(self.scored, 1),
                "model_busy_pct": 100 * self.model_s / self.wall_s if self.wall_s else float("nan")}


def _ignore_sigint() -> None:  # process-pool workers: Ctrl+C is the main process's business
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _prepared(paths, job, workers: int, pool: str, timing: Timing):
    """job(path) for every path, in order, `workers` at a time, at most a bounded window ahead of the consumer."""
    if workers <= 0:  # in the main loop, one after the other
        for p in paths:
            t0 = time.perf_counter()
            item = job(p)
            timing.wait_s += time.perf_counter() - t0
            yield item
        return
    if pool == "process":
        import multiprocessing

        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_ignore_sigint)
    else:
        executor = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    window = deque()
    todo = iter(paths)
    try:
        for p in todo:
            window.append(executor.submit(job, p))
            if len(window) >= 4 * workers + 32:
                break
        while window:
            t0 = time.perf_counter()
            item = window.popleft().result()
            timing.wait_s += time.perf_counter() - t0
            nxt = next(todo, None)
            if nxt is not None:
                window.append(executor.submit(job, nxt))
            yield item
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def score_stream(paths, model: Classifier, *, batch_size: int = 16, workers: int | None = None,
                 pool: str = "thread", max_pixels: int | None = DEFAULT_MAX_PIXELS, timing: Timing | None = None,
                 keep_uint8: bool = False):
    """Yield one result per path, in input order: {"path", "label", "score", "map", "error", "width", "height",
    ["uint8"]}. Decode + resize in parallel workers, the model on batches of `batch_size` readable images."""
    timing = timing if timing is not None else Timing()
    workers = default_workers() if workers is None else workers
    job = partial(prepare_image, preprocessing=model.preprocessing, max_pixels=max_pixels, keep_uint8=keep_uint8)
    pending, ready = [], 0
    for item in _prepared(paths, job, workers, pool, timing):
        timing.add_prepared(item)
        pending.append(item)
        ready += item["pixels"] is not None
        if ready >= batch_size:
            yield from _run_batch(pending, model, timing)
            pending, ready = [], 0
    if pending:
        yield from _run_batch(pending, model, timing)


def _run_batch(items: list[dict], model: Classifier, timing: Timing):
    ok = [r for r in items if r["pixels"] is not None]
    if ok:
        batch = np.stack([r["pixels"] for r in ok])
        t0 = time.perf_counter()
        scores, maps = model.score(batch)  # P(anomaly) of a classifier, patch distance of a detector (+ its maps)
        timing.model_s += time.perf_counter() - t0
        timing.scored += len(ok)
        timing.batches += 1
        for i, (r, s) in enumerate(zip(ok, scores)):
            r["score"], r["label"] = float(s), model.label_for(s)
            r["map"] = maps[i] if maps is not None else None
    for r in items:
        r.pop("pixels", None)
        yield r
