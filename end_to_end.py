"""The end-to-end benchmark: image files -> labels through the deployable model's pipeline vs the naive baseline (PIL
decode + the fine-tuned PyTorch fp32 checkpoint, batch 1), same images, same run, alternately, after a warm-up."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from image_pipeline import Timing, default_workers, load_model, model_precision, score_stream
from inference import Classifier, ImageError, load_rgb, ort_threads, preprocess
from lab_io import UserError, cpu_flags, cpu_name, environment_columns, format_table, run_id
from lab_targets import END_TO_END_IMAGES, END_TO_END_REPEATS, TARGET_END_TO_END_SPEEDUP, check_result_columns


NAIVE_VARIANT = "naive-pytorch-fp32"


OTHER_CPU_LIMIT = 0.10  # other processes using more than 10 % of the CPUs during --benchmark: not reliable


def baseline_checkpoint_path(model: Classifier, explicit: str | Path | None = None) -> Path:
    """The fine-tuned PyTorch fp32 checkpoint of the naive baseline: `explicit`, else model_cpu_<category>.pth
    beside the sidecar (the lab's baseline), else the checkpoint the served model was made from (sidecar's
    source_checkpoint, as written or relative to the sidecar's folder or its parent)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"--baseline-checkpoint {path} not found")
        return path
    folder = Path(model.meta["model_path"]).parent
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
        measured = _timed_repeats(naive, model, paths, batch_size=batch_size, workers=workers, pool=pool,
                                  repeats=repeats)
    finally:
        naive.close()
    naive_row, pipe_row = _end_to_end_rows(measured, model, naive, checkpoint, paths, batch_size=batch_size,
                                           workers=workers, pool=pool, repeats=repeats, load=load,
                                           category=category, rid=rid)
    for row in (naive_row, pipe_row):
        check_result_columns(row)
    if verbose:
        print_benchmark([naive_row, pipe_row], measured["runs"])
    return [naive_row, pipe_row]


def _timed_repeats(naive, model, paths: list[Path], *, batch_size: int, workers: int, pool: str,
                   repeats: int) -> dict:
    """Warm-up (every file read once, both paths run), then `repeats` alternate timed passes of the naive baseline
    and of the pipeline over `paths`: images/s per pass, the time split, the naive per-image latencies, the last
    labels of each, and the share of the CPUs other processes used meanwhile."""
    from tqdm.auto import tqdm

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
    return {"runs": runs, "timings": timings, "latencies": latencies, "naive_labels": naive_labels,
            "pipe_labels": pipe_labels, "warm": len(warm), "naive_warm": len(naive_warm), "during": meter.fraction()}


def _end_to_end_rows(measured: dict, model, naive, checkpoint: Path, paths: list[Path], *, batch_size: int,
                     workers: int, pool: str, repeats: int, load, category, rid) -> tuple[dict, dict]:
    """The naive and pipeline rows (lab_targets.RESULT_COLUMNS) of a measurement by _timed_repeats."""
    try:
        import importlib.metadata as md

        ov_version = md.version("openvino")
    except Exception:  # noqa: BLE001 - not installed
        ov_version = ""
    runs, timings, during = measured["runs"], measured["timings"], measured["during"]
    common = {"run_id": rid or run_id(), "script": "predict.py", "category": category or model.info.get("category"),
              "device": "cpu", "device_name": cpu_name(), "n_images": len(paths), "runs": repeats,
              "cpu_load_1min": load, "other_cpu_pct": None if during is None else 100 * during,
              **environment_columns(), "openvino_version": ov_version}
    naive_img_s = float(np.median(runs["naive"]))
    pipe_img_s = float(np.median(runs["pipeline"]))
    speedup = pipe_img_s / naive_img_s
    lat = np.asarray(measured["latencies"])
    naive_row = {**common, "variant": NAIVE_VARIANT, "role": "baseline", "backend": "pytorch", "precision": "fp32",
                 "file": str(checkpoint), "warmup": measured["naive_warm"], "batch_size": 1, "threads": naive.threads,
                 "decode_workers": 0, "decode_pool": "none", "latency_median_ms": float(np.median(lat)),
                 "latency_p95_ms": float(np.percentile(lat, 95)), "end_to_end_img_s": naive_img_s,
                 "end_to_end_speedup": 1.0, **timings["naive"].per_image_ms()}
    agreement = float(np.mean(np.asarray(measured["naive_labels"]) == np.asarray(measured["pipe_labels"])))
    pipe_row = {**common, "variant": model.info["variant"], "backend": model.meta["engine"],
                "precision": model_precision(model), "file": model.meta["model_path"],
                "model_sha256": model.meta["sha256"], "weights_sha256": model.meta.get("weights_sha256") or "",
                "threshold": model.threshold, "warmup": measured["warm"], "batch_size": batch_size,
                "threads": model.runner.threads, "decode_workers": workers,
                "decode_pool": pool if workers else "none", "end_to_end_img_s": pipe_img_s,
                "end_to_end_speedup": speedup,
                # not judged when other processes shared the cores: the naive baseline suffers most, flattering it
                "target_end_to_end_8x": speedup >= TARGET_END_TO_END_SPEEDUP if reliable(during) else None,
                "guard_reference": NAIVE_VARIANT, "agreement": agreement, **timings["pipeline"].per_image_ms()}
    return naive_row, pipe_row


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
