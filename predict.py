"""Inspect a folder of part images end to end, as the factory would every day: which parts are defective?

    python predict.py --input data/mvtec/bottle/test --output resultats/predictions.csv
    python predict.py --input "photos/2026-11-27/*.png" other.jpg --benchmark   # + end-to-end speed vs naive

Model (--model, default modeles/): a folder holding model_final.json, a sidecar .json, or a model file with its
sidecar beside it. ONNX Runtime or OpenVINO, as the sidecar says (inference.Classifier: sha256 checked, decision
threshold chosen on the validation split). Or the good-only detector of anomaly_detector.py,
modeles/detector_<category>.safetensors (inference.PatchDetector): its score is a patch distance, and it says where
the defect is (--heatmaps). Inputs: folders (searched recursively, hidden files skipped), glob
patterns or files. Any PNG/JPEG/BMP/TIFF of any size, converted exactly as in training and in score.py
(inference.load_rgb + inference.preprocess: grayscale and palette -> RGB, RGBA composited on black, 16-bit scaled to
8 bits, the whole image resized bilinear to the model's input, normalised).

Pipeline: read + decode + resize + normalise in parallel workers (threads by default: Pillow and numpy release the
GIL), a bounded window of prepared images, the model called on batches with the engine's own threads, so that it
waits on no single image. Results come back in input order.

Output (--output, default resultats/predictions.csv): one row per image (path, label, anomaly_probability (a
classifier) or anomaly_score (a detector), threshold, variant, model_sha256, error...). An unreadable file gets its
error in its row and the run goes on. The CSV is rewritten atomically every --save-every images and at the end:
an interrupted run (Ctrl+C, SIGTERM, crash) leaves the last complete version, and the same command resumes: images
already scored by the same model (same path, size and modification time) are skipped, failed ones are tried again. An output written by another model
(variant or sha256) is kept under a timestamped name and every image is scored again (a note says so).

Exit codes: 0 every image scored; 3 some images could not be read (their row has an "error"); 2 bad usage (no
image, no model, --heatmaps with a model that gives no map...); 130 interrupted (rows done so far are saved: run
the same command again to resume); 1 unexpected error.

--benchmark: end-to-end images/s of this pipeline vs the naive baseline (PIL decode + the fine-tuned PyTorch fp32
checkpoint, batch 1, one image after the other), measured in the same run on the same images, alternately, after a
warm-up; rows appended to resultats/end_to_end.csv. benchmark_end_to_end() is the function the pipeline calls.

Imports numpy, Pillow and the engine only (no torch: --help starts in well under a second); --benchmark imports
PyTorch inside the naive baseline only.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import glob
import heapq
import math
import os
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from inference import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, Classifier, ImageError, PatchDetector, find_sidecar,
                       is_detector_file, is_image_file, load_rgb, normalize, ort_threads, preprocess, resize_uint8)
from lab_io import (ArgumentParser, UserError, append_csv_rows, atomic_write, cpu_flags, cpu_name, csv_lock,
                    environment_columns, format_table, keep_previous, positive_int, run_cli, run_id)
from lab_targets import END_TO_END_IMAGES, END_TO_END_REPEATS, TARGET_END_TO_END_SPEEDUP, check_result_columns

PREDICTION_COLUMNS = ("path", "label", "anomaly_probability", "anomaly_score", "threshold", "variant", "model_sha256",
                      "weights_sha256", "error", "image_width", "image_height", "file_bytes", "file_mtime_ns",
                      "scored_at", "run_id")
EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130
NAIVE_VARIANT = "naive-pytorch-fp32"
SAVE_SECONDS = 30.0  # the CSV is also rewritten at least this often while images are scored
OTHER_CPU_LIMIT = 0.10  # other processes using more than 10 % of the CPUs during --benchmark: not reliable


# --------------------------------------------------------------------------------------------------
# The model and the images
# --------------------------------------------------------------------------------------------------
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
    """What really runs (as onnx_optimization.variant_precision): int8 weights, else the engine's precision."""
    bf16 = model.runner.precision == "bf16"
    if "int8" in str(model.info.get("variant")):
        return "int8" + ("+bf16" if bf16 else "")
    return "bf16" if bf16 else "fp32"


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


# --------------------------------------------------------------------------------------------------
# The pipeline: parallel decode, batched model calls
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# The predictions CSV: one row per image, rewritten atomically, resumable
# --------------------------------------------------------------------------------------------------
def model_identity(model: Classifier) -> dict:
    return {"variant": model.info["variant"], "model_sha256": model.meta["sha256"],
            "weights_sha256": model.meta.get("weights_sha256") or ""}


class PredictionStore:
    """The rows of the predictions CSV keyed by resolved image path. save() merges the rows put since the last save
    with the file as it is now, under its lock (lab_io.csv_lock: another run may write to the same --output), and
    replaces it atomically (lab_io.atomic_write): a crash or Ctrl+C never leaves it half-written, and two runs keep
    every row of both (one row per image: the last saved). Rows of another model are not mixed in: that file is kept
    under a timestamped name (lab_io.keep_previous) at the first save."""

    def __init__(self, path: str | Path, identity: dict, rescore: bool = False):
        self.path, self.identity = Path(path), identity
        self.rows: dict[str, dict] = {}
        self.unsaved: dict[str, dict] = {}  # rows put since the last save, merged into the file by save()
        self.columns = list(PREDICTION_COLUMNS)
        self.replace_file = False  # keep the existing file aside before the first save
        self.stat_read = None  # (size, mtime) of the file as read here: replace_file applies to that file only
        self.dirty = 0
        self.note = ""
        if self.path.is_dir():
            raise UserError(f"--output {self.path} is a folder: give a CSV file name, e.g. {self.path}/predictions.csv")
        if not self.path.exists():
            return
        self.stat_read = self._stat()
        header, rows = self._read()
        others = self._others(rows)
        if rescore or others:
            self.replace_file = True
            why = "--rescore" if rescore else \
                "it holds predictions of another model (" + ", ".join(
                    f"{v or '?'} sha256 {s[:12]}... x{n}" for (v, s), n in others.most_common(3)) + ")"
            self.note = (f"note: {self.path}: {why}; it will be kept under a timestamped name and every image is "
                         f"scored again with {identity['variant']} (sha256 {identity['model_sha256'][:12]}...)")
            return
        self.columns += [c for c in header if c not in self.columns]
        self.rows = {r["path"]: r for r in rows}

    def _stat(self):
        try:
            st = self.path.stat()
            return st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def _read(self) -> tuple[list[str], list[dict]]:
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"--output {self.path} cannot be read as a CSV ({exc}): choose another --output") from None
        if not {"path", "label", "model_sha256"} <= set(header):
            raise UserError(f"--output {self.path} is not a predictions file of predict.py (no path / label / "
                            "model_sha256 columns): choose another --output")
        return header, rows

    def _others(self, rows: list[dict]) -> Counter:
        """(variant, model_sha256) -> rows of a model other than this one."""
        mine = (self.identity["variant"], self.identity["model_sha256"], self.identity["weights_sha256"])
        return Counter((r.get("variant", ""), r.get("model_sha256", "")) for r in rows
                       if (r.get("variant", ""), r.get("model_sha256", ""), r.get("weights_sha256") or "") != mine)

    def status(self, path: Path) -> str:
        """'done' (scored by this model, file unchanged), 'changed' (scored, but the file changed since), 'failed'
        (an error last time: tried again) or 'new'."""
        row = self.rows.get(str(path))
        if row is None:
            return "new"
        if row.get("error") or not row.get("label"):
            return "failed"
        try:
            st = path.stat()
        except OSError:
            return "changed"
        same = row.get("file_bytes") == str(st.st_size) and row.get("file_mtime_ns") == str(st.st_mtime_ns)
        return "done" if same else "changed"

    def put(self, row: dict) -> None:
        for rows in (self.rows, self.unsaved):
            rows.pop(row["path"], None)  # a re-scored image moves to the end, in the order of this run
            rows[row["path"]] = row
        self.dirty += 1

    def save(self) -> None:
        if not self.dirty:
            return
        with csv_lock(self.path):  # read, merge and replace as one step: rows another run saved meanwhile stay
            header, on_disk = self._read() if self.path.exists() else ([], [])
            # set the file aside when it is the one read at the start (--rescore, another model), or when another
            # model's run wrote it since; one of this model's runs may have replaced it already: merge with that
            if on_disk and (self._others(on_disk) or (self.replace_file and self._stat() == self.stat_read)):
                keep_previous(self.path)
                header, on_disk = [], []
            self.replace_file = False
            rows = {r["path"]: r for r in on_disk}
            for path, row in self.unsaved.items():
                rows.pop(path, None)
                rows[path] = row
            columns = self.columns + [c for c in header if c not in self.columns]
            check_result_columns(dict.fromkeys(columns))

            def write(tmp: Path) -> None:
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(rows.values())
                    f.flush()
                    os.fsync(f.fileno())

            atomic_write(self.path, write)
        self.rows, self.columns, self.unsaved, self.dirty = rows, columns, {}, 0


def prediction_row(result: dict, model: Classifier, identity: dict, rid: str) -> dict:
    path = Path(result["path"])
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = ""
    score = result.get("score")
    value = f"{score:.6f}" if score is not None and not result["error"] else ""
    column = "anomaly_probability" if model.score_kind == "probability" else "anomaly_score"
    return {"path": str(path), "label": result.get("label", "") if not result["error"] else "", column: value,
            "threshold": f"{model.threshold:.6g}", **identity, "error": result["error"],
            "image_width": result["width"], "image_height": result["height"], "file_bytes": size,
            "file_mtime_ns": mtime, "scored_at": _dt.datetime.now().isoformat(timespec="seconds"), "run_id": rid}


# --------------------------------------------------------------------------------------------------
# Heat maps (the good-only detector of anomaly_detector.py): overlays and a contact sheet
# --------------------------------------------------------------------------------------------------
def gives_maps(model) -> bool:
    """A model says where the defect is when its score() returns maps [N, h, w] (higher = more anomalous) and it
    declares "anomaly_map": the good-only detector (inference.PatchDetector) does, the supervised classifier not."""
    return bool(getattr(model, "meta", {}).get("anomaly_map"))


def _colormap(values: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> uint8 [h, w, 3], dark blue -> red -> yellow (readable on grey parts)."""
    stops = np.array([[0, 0, 80], [0, 60, 200], [230, 30, 30], [255, 230, 0]], np.float32)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.minimum(pos.astype(int), len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def overlay(pixels_uint8: np.ndarray, amap: np.ndarray, scale: tuple[float, float], size: int = 320):
    """The model's input image (uint8 [3, H, W]) with its anomaly map (scaled by `scale` = (low, high)) on top."""
    from PIL import Image

    base = Image.fromarray(np.ascontiguousarray(pixels_uint8.transpose(1, 2, 0))).resize((size, size),
                                                                                          Image.BILINEAR)
    low, high = scale
    norm = (np.asarray(amap, np.float32) - low) / max(high - low, 1e-12)
    heat = Image.fromarray(_colormap(norm)).resize((size, size), Image.BILINEAR)
    alpha = Image.fromarray((np.clip(norm, 0, 1) * 150 + 40).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    out = base.convert("RGB")
    out.paste(heat, mask=alpha)
    return out


def contact_sheet(tiles: list[tuple[object, str]], columns: int = 6):
    """[(PIL image, caption)] -> one PNG-ready sheet, captions under each tile."""
    from PIL import Image, ImageDraw

    size = tiles[0][0].size[0]
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + 28)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(tiles):
        x, y = (i % columns) * size, (i // columns) * (size + 28)
        sheet.paste(img, (x, y))
        draw.text((x + 4, y + size + 4), caption[:48], fill=(0, 0, 0))
    return sheet


HEATMAP_SCALE = (0.0, 1.5)  # overlay colours in multiples of the detector's threshold: red = the threshold


class HeatmapWriter:
    """--heatmaps, streamed: the overlay PNG of each anomalous image (folder/<name>_<hash>_heatmap.png) is written as
    soon as the image is scored, and contact_sheet.png of the max_tiles most anomalous at the end: only those tiles
    are kept in memory, whatever the number of images. One colour scale for the whole run, fixed by the detector's
    threshold (HEATMAP_SCALE), so that two overlays can be compared and none waits for the last image."""

    def __init__(self, folder: str | Path, threshold: float, max_tiles: int = 48):
        self.folder, self.max_tiles = Path(folder), max_tiles
        self.scale = (HEATMAP_SCALE[0] * threshold, HEATMAP_SCALE[1] * threshold)
        self.written = 0
        self._top: list[tuple[float, int, object, str]] = []  # min-heap on the score: the weakest goes first

    def add(self, result: dict) -> None:
        if result.get("label") != "anomaly" or result.get("map") is None:
            return
        img = overlay(result["uint8"], result["map"], self.scale)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{Path(result['path']).stem}_{_short_hash(result['path'])}_heatmap.png"
        keep_previous(target)
        atomic_write(target, lambda p: img.save(p, format="PNG"))
        self.written += 1
        tile = (float(result["score"]), -self.written, img, f"{Path(result['path']).name} {result['score']:.3g}")
        (heapq.heappush if len(self._top) < self.max_tiles else heapq.heappushpop)(self._top, tile)

    def close(self) -> Path | None:
        """Writes contact_sheet.png (most anomalous first); None when no image was anomalous."""
        if not self._top:
            return None
        tiles = [(img, caption) for _, _, img, caption in sorted(self._top, reverse=True)]
        sheet = contact_sheet(tiles)
        sheet_path = self.folder / "contact_sheet.png"
        keep_previous(sheet_path)
        atomic_write(sheet_path, lambda p: sheet.save(p, format="PNG"))
        self._top = []
        return sheet_path


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]  # two folders may hold the same file name


# --------------------------------------------------------------------------------------------------
# The benchmark: this pipeline vs the naive baseline, same images, same run
# --------------------------------------------------------------------------------------------------
def baseline_checkpoint_path(model: Classifier, explicit: str | Path | None = None) -> Path:
    """The fine-tuned PyTorch fp32 checkpoint of the naive baseline: `explicit`, else model_cpu_<category>.pth
    beside the sidecar (the lab's baseline), else the checkpoint the served model was made from (sidecar's
    source_checkpoint, as written or relative to the sidecar's folder or its parent)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"--baseline-checkpoint {path} not found")
        return path
    folder = Path(model.meta["onnx_path"]).parent
    source = Path(str(model.meta.get("source_checkpoint") or ""))
    candidates = [folder / f"model_cpu_{model.info.get('category')}.pth"]
    if str(source) not in ("", "."):
        candidates += [source, folder.parent / source, folder / source.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"--benchmark needs the fine-tuned PyTorch fp32 checkpoint for the naive baseline: none of "
                    f"{', '.join(map(str, candidates))} exists; pass --baseline-checkpoint")


class _NaiveBaseline:
    """PIL decode + the fine-tuned PyTorch fp32 model, batch 1, one image after the other (torch imported here)."""

    def __init__(self, checkpoint: Path, preprocessing: dict, threads: int | None):
        import torch

        from load_model_hf import checkpoint_threshold, load_checkpoint
        from train_utils import model_logits

        self.torch, self.model_logits = torch, model_logits
        self.net, ckpt = load_checkpoint(checkpoint, None, checkpoint.parent)
        self.pre, self.threshold = ckpt["preprocessing"], checkpoint_threshold(ckpt)
        for key in ("image_size", "mean", "std"):
            if [float(v) for v in self.pre[key]] != [float(v) for v in preprocessing[key]]:
                raise UserError(f"{checkpoint} expects {key} {list(self.pre[key])}, the served model "
                                f"{list(preprocessing[key])}: pass the checkpoint it was made from "
                                "(--baseline-checkpoint)")
        self.saved_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()

    def close(self) -> None:
        self.torch.set_num_threads(self.saved_threads)

    def run(self, paths, timing: Timing, latencies: list | None = None, desc: str = "naive") -> list[int]:
        from tqdm.auto import tqdm

        labels = []
        with self.torch.inference_mode():
            for path in tqdm(paths, desc=desc, unit="img", leave=False):
                t0 = time.perf_counter()
                data = Path(path).read_bytes()
                t1 = time.perf_counter()
                try:
                    img = load_rgb(data, Path(path).name)
                except ImageError as exc:
                    raise UserError(f"--benchmark needs readable images: {exc}") from None
                t2 = time.perf_counter()
                x = self.torch.from_numpy(preprocess(img, self.pre)).unsqueeze(0)
                t3 = time.perf_counter()
                logits = self.model_logits(self.net, x).float()
                p = float(self.torch.softmax(logits, dim=1)[0, 1])
                t4 = time.perf_counter()
                timing.read_s, timing.decode_s = timing.read_s + t1 - t0, timing.decode_s + t2 - t1
                timing.resize_s, timing.model_s = timing.resize_s + t3 - t2, timing.model_s + t4 - t3
                timing.images += 1
                timing.scored += 1
                labels.append(int(p >= self.threshold))
                if latencies is not None:
                    latencies.append((t4 - t0) * 1000.0)
        return labels


def benchmark_end_to_end(model, images, *, baseline_checkpoint: str | Path | None = None, batch_size: int = 16,
                         workers: int | None = None, pool: str = "thread", threads: int | None = None,
                         repeats: int = END_TO_END_REPEATS, max_images: int | None = END_TO_END_IMAGES,
                         category: str | None = None, rid: str | None = None, verbose: bool = True) -> list[dict]:
    """End-to-end images/s (image file -> label) of the served model through this pipeline vs the naive baseline
    (PIL decode + the fine-tuned PyTorch fp32 checkpoint, batch 1, one image after the other).

    `model`: an inference.Classifier or what --model accepts (folder, sidecar). `images`: image files (readable
    ones; at most `max_images` are used). Both paths run in this process on the same images, alternately
    (naive, pipeline) `repeats` times, after a warm-up that also reads every file once (both then read from the
    OS cache). Returns [naive_row, pipeline_row] with lab_targets.RESULT_COLUMNS names (append them with
    lab_io.append_csv_rows): end_to_end_img_s (median over repeats), the per-image time split, and on the pipeline
    row end_to_end_speedup (its images/s / the naive one's) and target_end_to_end_8x."""
    from tqdm.auto import tqdm

    if not isinstance(model, Classifier):
        model = load_model(model, ort_threads(threads))
    paths = [Path(p) for p in images][:max_images or None]
    if not paths:
        raise UserError("--benchmark: no readable image to time")
    if repeats < 1:
        raise UserError("--benchmark-repeats must be >= 1")
    workers = default_workers() if workers is None else workers
    checkpoint = baseline_checkpoint_path(model, baseline_checkpoint)
    naive = _NaiveBaseline(checkpoint, model.preprocessing, model.runner.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy = others_cpu_fraction()
    if verbose and busy is not None and busy > OTHER_CPU_LIMIT:
        print(f"warning: other processes use {busy * 100:.0f} % of the CPUs right now: they share the cores with "
              "this benchmark, its timings will not be reliable (PyTorch's threads suffer most)")
    try:
        for p in paths:  # the OS file cache: both paths read the same warm files
            p.read_bytes()
        warm = paths[:max(2, min(len(paths), 2 * batch_size))]
        naive_warm = warm[:3]
        naive.run(naive_warm, Timing(), desc="naive warm-up")
        for _ in score_stream(warm, model, batch_size=batch_size, workers=workers, pool=pool):
            pass
        runs = {"naive": [], "pipeline": []}
        timings = {"naive": Timing(), "pipeline": Timing()}
        latencies, naive_labels, pipe_labels = [], [], []
        meter = OtherCpu()
        for i in tqdm(range(repeats), desc="benchmark repeats", unit="repeat", leave=False):
            t = Timing()
            t0 = time.perf_counter()
            naive_labels = naive.run(paths, t, latencies, desc=f"naive {i + 1}/{repeats}")
            t.wall_s = time.perf_counter() - t0
            runs["naive"].append(len(paths) / t.wall_s)
            _merge(timings["naive"], t)
            t = Timing()
            t0 = time.perf_counter()
            results = list(tqdm(score_stream(paths, model, batch_size=batch_size, workers=workers, pool=pool,
                                             timing=t), total=len(paths), desc=f"pipeline {i + 1}/{repeats}",
                                unit="img", leave=False))
            t.wall_s = time.perf_counter() - t0
            runs["pipeline"].append(len(paths) / t.wall_s)
            _merge(timings["pipeline"], t)
            pipe_labels = [int(r.get("label") == "anomaly") for r in results]
            if any(r["error"] for r in results):
                raise UserError(f"--benchmark: {next(r for r in results if r['error'])['error']}")
        during = meter.fraction()
    finally:
        naive.close()
    try:
        import importlib.metadata as md

        ov_version = md.version("openvino")
    except Exception:  # noqa: BLE001 - not installed
        ov_version = ""
    common = {"run_id": rid or run_id(), "script": "predict.py", "category": category or model.info.get("category"),
              "device": "cpu", "device_name": cpu_name(), "n_images": len(paths), "runs": repeats,
              "cpu_load_1min": load, "other_cpu_pct": None if during is None else 100 * during,
              **environment_columns(), "openvino_version": ov_version}
    naive_img_s = float(np.median(runs["naive"]))
    pipe_img_s = float(np.median(runs["pipeline"]))
    speedup = pipe_img_s / naive_img_s
    lat = np.asarray(latencies)
    naive_row = {**common, "variant": NAIVE_VARIANT, "role": "baseline", "backend": "pytorch", "precision": "fp32",
                 "file": str(checkpoint), "warmup": len(naive_warm), "batch_size": 1, "threads": naive.threads,
                 "decode_workers": 0,
                 "decode_pool": "none", "latency_median_ms": float(np.median(lat)),
                 "latency_p95_ms": float(np.percentile(lat, 95)), "end_to_end_img_s": naive_img_s,
                 "end_to_end_speedup": 1.0, **timings["naive"].per_image_ms()}
    agreement = float(np.mean(np.asarray(naive_labels) == np.asarray(pipe_labels)))
    pipe_row = {**common, "variant": model.info["variant"], "backend": model.meta["engine"],
                "precision": model_precision(model), "file": model.meta["onnx_path"],
                "model_sha256": model.meta["sha256"], "weights_sha256": model.meta.get("weights_sha256") or "",
                "threshold": model.threshold, "warmup": len(warm), "batch_size": batch_size,
                "threads": model.runner.threads,
                "decode_workers": workers, "decode_pool": pool if workers else "none",
                "end_to_end_img_s": pipe_img_s, "end_to_end_speedup": speedup,
                # not judged when other processes shared the cores: the naive baseline suffers most, flattering it
                "target_end_to_end_8x": speedup >= TARGET_END_TO_END_SPEEDUP if reliable(during) else None,
                "guard_reference": NAIVE_VARIANT, "agreement": agreement, **timings["pipeline"].per_image_ms()}
    for row in (naive_row, pipe_row):
        check_result_columns(row)
    if verbose:
        print_benchmark([naive_row, pipe_row], runs)
    return [naive_row, pipe_row]


def reliable(other_cpu: float | None) -> bool:
    return other_cpu is None or other_cpu <= OTHER_CPU_LIMIT


class OtherCpu:
    """CPU time used by OTHER processes since creation, as a share of all CPUs: system-wide busy time (/proc/stat)
    minus this process's own (all its threads and reaped children). Linux only (fraction() is None elsewhere).
    Another job on the same cores slows PyTorch's threads most, so it would flatter the speed-up."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                values = [int(v) for v in f.readline().split()[1:9]]  # user..steal (guest is inside user)
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError):
            return None
        busy = (sum(values) - values[3] - values[4]) / hz  # all but idle and iowait
        own = os.times()
        return busy, own.user + own.system + own.children_user + own.children_system, time.monotonic()

    def fraction(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, min(1.0, (busy - own) / (wall * (os.cpu_count() or 1))))


def others_cpu_fraction(seconds: float = 0.5) -> float | None:
    """Share of all CPUs used by other processes during the next `seconds` (None where it cannot be read)."""
    meter = OtherCpu()
    time.sleep(seconds)
    return meter.fraction()


def _merge(total: Timing, t: Timing) -> None:
    for key in ("read_s", "decode_s", "resize_s", "model_s", "wait_s", "wall_s", "images", "scored", "batches"):
        setattr(total, key, getattr(total, key) + getattr(t, key))


def print_benchmark(rows: list[dict], runs: dict | None = None) -> None:
    naive, pipe = rows
    print(f"\nend-to-end benchmark: {naive['n_images']} image files -> labels, both paths in this run, alternately, "
          f"{naive['runs']} repeat(s) after a warm-up; CPU {naive['device_name']} [{cpu_flags()}], "
          f"{naive['cpu_logical']} logical CPUs, other processes used {naive['other_cpu_pct'] or 0:.0f} % of them "
          "during the timing")
    table = [{**r, "workers": f"{r['decode_workers']} {r['decode_pool']}"} for r in rows]
    print(format_table(table, ["variant", "backend", "precision", "batch_size", "threads", "workers",
                               "end_to_end_img_s", "read_ms_per_img", "decode_ms_per_img", "resize_ms_per_img",
                               "model_ms_per_img", "model_busy_pct"], floatfmt=".3g"), end="")
    if runs:
        print("images/s of each repeat: naive " + ", ".join(f"{v:.1f}" for v in runs["naive"]) + "; pipeline "
              + ", ".join(f"{v:.1f}" for v in runs["pipeline"]))
    print("read / decode / resize: ms of worker time per image (summed over the parallel workers); model: ms of "
          "model call per image; naive per-image latency median "
          f"{naive['latency_median_ms']:.1f} ms, p95 {naive['latency_p95_ms']:.1f} ms")
    reached = {True: "reached", False: "NOT reached", None: "not judged"}[pipe["target_end_to_end_8x"]]
    print(f"end to end: {pipe['variant']} {pipe['end_to_end_img_s']:.1f} images/s vs naive baseline "
          f"{naive['end_to_end_img_s']:.1f} images/s = {pipe['end_to_end_speedup']:.2f}x (goal >= "
          f"{TARGET_END_TO_END_SPEEDUP:g}x: {reached}); same labels on {pipe['agreement'] * 100:.1f} % of the images")
    if pipe["target_end_to_end_8x"] is None:
        print(f"warning: NOT RELIABLE: other processes used {pipe['other_cpu_pct']:.0f} % of the CPUs during the "
              "timing (> 10 %); rerun on an idle machine")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image folders (searched recursively), glob patterns (quote them: 'dir/**/*.png') or files")
    p.add_argument("--output", default="resultats/predictions.csv",
                   help="predictions CSV, one row per image; an existing one is resumed (default: %(default)s)")
    p.add_argument("--model", default="modeles",
                   help="model folder (its model_final.json), sidecar .json, model file with its sidecar, or a "
                        "good-only detector modeles/detector_<category>.safetensors (gives maps) (default: "
                        "%(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per model call (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel decode workers; 0 = decode in the main loop (default: the logical CPUs, at most 8)")
    p.add_argument("--pool", choices=("thread", "process"), default="thread",
                   help="decode workers as threads (default: Pillow releases the GIL; measured faster on 2 cores) "
                        "or processes")
    p.add_argument("--num-threads", type=positive_int, default=None,
                   help="intra-op threads of the engine (default: the physical cores)")
    p.add_argument("--max-pixels", type=float, default=DEFAULT_MAX_PIXELS,
                   help=f"larger images are refused in their row (default: {DEFAULT_MAX_PIXELS:.3g}, as score.py)")
    p.add_argument("--save-every", type=positive_int, default=256,
                   help=f"rewrite the CSV after this many images (and at least every {SAVE_SECONDS:g} s; default: "
                        "%(default)s)")
    p.add_argument("--rescore", action="store_true",
                   help="score every image again (the earlier CSV is kept under a timestamped name)")
    p.add_argument("--top", type=int, default=10, help="most anomalous files listed in the summary (default: 10)")
    p.add_argument("--heatmaps", default=None, metavar="DIR",
                   help="write an overlay PNG per anomalous image and contact_sheet.png in DIR (a model that gives "
                        "anomaly maps: the detector of anomaly_detector.py; a classifier gives none: exit code 2)")
    p.add_argument("--benchmark", action="store_true",
                   help="also time this pipeline against the naive baseline (PIL + PyTorch fp32, batch 1) on the same "
                        "images; rows appended to RESULTS_DIR/end_to_end.csv")
    p.add_argument("--benchmark-images", type=positive_int, default=END_TO_END_IMAGES,
                   help="readable images of the input used by --benchmark (default: %(default)s)")
    p.add_argument("--benchmark-repeats", type=positive_int, default=END_TO_END_REPEATS,
                   help="timed passes of each path, alternately (default: %(default)s)")
    p.add_argument("--baseline-checkpoint", default=None,
                   help="PyTorch checkpoint of the naive baseline (default: model_cpu_<category>.pth beside the "
                        "model, else the sidecar's source_checkpoint)")
    p.add_argument("--results-dir", default="resultats", help="where end_to_end.csv goes (default: %(default)s)")
    args = p.parse_args(argv)
    for flag, value in (("--top", args.top), ("--workers", 0 if args.workers is None else args.workers)):
        if value < 0:
            raise UserError(f"{flag} must be >= 0.")
    if not args.max_pixels > 0:
        raise UserError("--max-pixels must be > 0.")
    return args


def _raise_interrupt(signum, frame):  # SIGTERM (kill, a scheduler stopping the job) is handled as Ctrl+C
    raise KeyboardInterrupt


def _workers_text(workers: int, pool: str) -> str:
    if not workers:
        return "decode in the main loop"
    return f"{workers} decode {pool}{('es' if pool == 'process' else 's') if workers > 1 else ''}"


def _shown(path: str | Path) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # from the start: loading the model takes seconds
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # main() called from another thread: signals are the main thread's business
        return _main(args)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _main(args) -> int:
    threads = ort_threads(args.num_threads)
    workers = default_workers() if args.workers is None else args.workers
    model = load_model(args.model, threads)
    if args.heatmaps and not gives_maps(model):
        raise UserError(f"--heatmaps: {_shown(model.meta['onnx_path'])} ({model.info['variant']}) is a good/anomaly "
                        "classifier and gives no anomaly map, so there is nothing to draw: use the good-only "
                        "detector, --model modeles/detector_<category>.safetensors (written by anomaly_detector.py), "
                        "or run without --heatmaps.")
    if args.benchmark and not isinstance(model, Classifier):
        raise UserError("--benchmark compares the fine-tuned classifier with its naive PyTorch baseline; a detector "
                        "has none (anomaly_detector.py measures its own latency): run it with a classifier --model.")
    images = find_images(args.input, exclude=(args.heatmaps,))
    if not images:
        raise UserError(f"no image in {' '.join(args.input)} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                        "recursively, hidden files skipped)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(output.parent, os.W_OK):
        raise UserError(f"cannot write in {output.parent}: choose another --output")
    identity = model_identity(model)
    store = PredictionStore(output, identity, rescore=args.rescore)
    if store.note:
        print(store.note)
    status = Counter()
    todo = []
    for path in images:
        state = store.status(path)
        status[state] += 1
        if state != "done":
            todo.append(path)
    print(f"model {_shown(model.meta['onnx_path'])}: {identity['variant']} ({model.meta['engine']}, "
          f"{model_precision(model)}, sha256 {identity['model_sha256'][:12]}...), threshold {model.threshold:.4g}, "
          f"input {model.preprocessing['image_size']}; {threads or 'default'} engine threads, "
          f"{_workers_text(workers, args.pool)}, batch {args.batch_size}")
    print(f"{len(images)} images: {len(todo)} to score ({status['new']} new, {status['failed']} failed before, "
          f"{status['changed']} changed since scored), {status['done']} already in {_shown(output)} (skipped)")

    rid = run_id()
    timing = Timing()
    heatmaps = HeatmapWriter(args.heatmaps, model.threshold) if args.heatmaps else None
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="predict", unit="img", leave=False)
    last_save = t0 = time.perf_counter()
    n_put = 0
    try:
        for result in score_stream(todo, model, batch_size=args.batch_size, workers=workers, pool=args.pool,
                                   max_pixels=int(args.max_pixels), timing=timing, keep_uint8=bool(args.heatmaps)):
            store.put(prediction_row(result, model, identity, rid))
            n_put += 1
            if heatmaps:
                heatmaps.add(result)
            bar.update()
            if store.dirty >= args.save_every or time.perf_counter() - last_save > SAVE_SECONDS:
                store.save()
                last_save = time.perf_counter()
        timing.wall_s = time.perf_counter() - t0
    except KeyboardInterrupt:
        bar.close()
        store.save()
        if heatmaps:
            heatmaps.close()  # the overlays written so far stay; the sheet shows their most anomalous
        print(f"error: interrupted: {n_put} of the {len(todo)} images to score were saved in {_shown(output)}; "
              "run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bar.close()
        store.save()  # rows done before any error are never lost

    failed = print_summary(images, store, timing, args, output, workers)
    if heatmaps:
        sheet = heatmaps.close()
        print(f"heat maps: {heatmaps.written} overlay(s) in {args.heatmaps}, colours from "
              f"{heatmaps.scale[0]:.3g} to {heatmaps.scale[1]:.3g} (red = the threshold {model.threshold:.3g})"
              + (f", contact sheet {sheet}" if sheet else ""))
    if args.benchmark:
        readable = [p for p in images if store.rows.get(str(p), {}).get("label")]
        rows = benchmark_end_to_end(model, readable, baseline_checkpoint=args.baseline_checkpoint,
                                    batch_size=args.batch_size, workers=workers, pool=args.pool,
                                    repeats=args.benchmark_repeats, max_images=args.benchmark_images, rid=rid)
        csv_path = append_csv_rows(Path(args.results_dir) / "end_to_end.csv", rows)
        print(f"rows appended to {_shown(csv_path)} (run_id {rid})")
    if failed:
        print(f"exit code {EXIT_SOME_FAILED}: {failed} image(s) could not be read (see their 'error' column)",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def row_score(row: dict) -> float:
    """What the row's threshold applies to: P(anomaly) of a classifier, or the detector's patch distance."""
    return float(row.get("anomaly_probability") or row.get("anomaly_score"))


def print_summary(images: list[Path], store: PredictionStore, timing: Timing, args, output: Path,
                  workers: int) -> int:
    """Counts per label over the input, the most anomalous files, the errors, this run's throughput. Returns the
    number of images of the input that could not be read."""
    rows = [store.rows[str(p)] for p in images if str(p) in store.rows]
    counts = Counter(r["label"] or "error" for r in rows)
    print(f"\nlabels of the {len(images)} input images: " + ", ".join(
        f"{name} {counts.get(name, 0)}" for name in ("good", "anomaly", "error")))
    scored = sorted((r for r in rows if r["label"]), key=lambda r: -row_score(r))
    if scored and args.top:
        print(f"most anomalous (threshold {scored[0]['threshold']}):")
        for r in scored[:args.top]:
            print(f"  {row_score(r):.4f}  {r['label']:<7}  {_shown(r['path'])}")
    errors = [r for r in rows if not r["label"]]
    for r in errors[:10]:
        print(f"  error  {_shown(r['path'])}: {r['error']}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more errors (column 'error' of {_shown(output)})")
    if timing.images and not timing.scored:
        print(f"this run: {timing.images} image(s) tried, none readable ({timing.wall_s:.2f} s)")
    elif timing.images:
        ms = timing.per_image_ms()
        print(f"this run, end to end: {timing.images} images ({timing.scored} scored) in {timing.wall_s:.2f} s = "
              f"{timing.images / timing.wall_s:.1f} images/s ({_workers_text(workers, args.pool)}, batch "
              f"{args.batch_size}); per image: read {ms['read_ms_per_img']:.2f} + decode "
              f"{ms['decode_ms_per_img']:.2f} + resize/normalise {ms['resize_ms_per_img']:.2f} ms of worker time "
              f"(overlapped) vs model {ms['model_ms_per_img']:.2f} ms; the model computed "
              f"{ms['model_busy_pct']:.0f} % of the wall time, waited {timing.wait_s:.2f} s for images")
    else:
        print("this run: nothing new to score")
    print(f"predictions: {_shown(output)} ({len(store.rows)} rows)")
    return len(errors)


if __name__ == "__main__":
    run_cli(main)
