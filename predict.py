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
8 bits, a photo stored sideways turned upright (EXIF orientation), the whole image resized bilinear to the model's
input, normalised).

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
warm-up; rows appended to resultats/end_to_end.csv (end_to_end.benchmark_end_to_end, which the pipeline calls too).

Imports numpy, Pillow and the engine only (no torch: --help starts in well under a second); --benchmark imports
PyTorch inside the naive baseline only.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from end_to_end import benchmark_end_to_end
from heatmaps import HeatmapWriter, gives_maps
from image_pipeline import Timing, default_workers, find_images, load_model, model_precision, score_stream
from inference import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, Classifier, ort_threads
from lab_io import ArgumentParser, UserError, append_csv_rows, finite_float, output_dir, positive_int, run_cli, run_id
from lab_targets import END_TO_END_IMAGES, END_TO_END_REPEATS
from prediction_store import SAVE_SECONDS, PredictionStore, model_identity, prediction_row

EXIT_OK, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 3, 130  # 2: bad usage (lab_io.run_cli), 1: unexpected error


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
    p.add_argument("--max-pixels", type=finite_float, default=DEFAULT_MAX_PIXELS,
                   help=f"larger images are refused in their row (default: {DEFAULT_MAX_PIXELS:.3g}, as score.py)")
    p.add_argument("--save-every", type=positive_int, default=256,
                   help=f"rewrite the CSV after this many images (and at least every {SAVE_SECONDS:g} s; default: "
                        "%(default)s)")
    p.add_argument("--rescore", action="store_true",
                   help="score every image again (the earlier CSV is kept under a timestamped name)")
    p.add_argument("--top", type=int, default=10, help="most anomalous files listed in the summary (default: 10)")
    p.add_argument("--heatmaps", default=None, metavar="DIR",
                   help="write an overlay PNG per anomalous image and contact_sheet.png in DIR (a model that gives "
                        "anomaly maps: the detector of anomaly_detector.py or a hybrid-* model_final; a plain "
                        "classifier gives none: exit code 2)")
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
    p.add_argument("--results-dir", type=output_dir, default="resultats",
                   help="where end_to_end.csv goes (default: %(default)s)")
    args = p.parse_args(argv)
    for flag, value in (("--top", args.top), ("--workers", 0 if args.workers is None else args.workers)):
        if value < 0:
            raise UserError(f"{flag} must be >= 0.")
    if not args.max_pixels > 0:
        raise UserError("--max-pixels must be > 0.")
    return args


# Ctrl+C and SIGTERM. From the start of the scoring loop to its last save, the first signal only sets "flag" and the
# loop stops after the image it is on: a KeyboardInterrupt raised at an arbitrary point can land in a finalizer
# (filelock's, run as each save releases its lock; a weakref callback), where Python prints a traceback and drops it.
# Before the loop (loading the model), or at a second signal, it is raised at once.
STOP_REQUESTED = {"flag": False, "in_loop": False}


def _request_stop(signum, frame):
    first_in_loop = STOP_REQUESTED["in_loop"] and not STOP_REQUESTED["flag"]
    STOP_REQUESTED["flag"] = True
    if not first_in_loop:
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
    STOP_REQUESTED.update(flag=False, in_loop=False)
    try:  # from the start: loading the model takes seconds
        previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # main() called from another thread: signals are the main thread's business
        return _main(args)
    try:
        return _main(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_inputs(args, model) -> tuple[list[Path], Path]:
    """The model suits the flags, there are images, the output folder is writable: (images, output)."""
    if args.heatmaps and not gives_maps(model):
        raise UserError(f"--heatmaps: {_shown(model.meta['model_path'])} ({model.info['variant']}) is a good/anomaly "
                        "classifier and gives no anomaly map, so there is nothing to draw: use the good-only "
                        "detector, --model modeles/detector_<category>.safetensors (written by anomaly_detector.py), "
                        "a hybrid-* model_final (onnx_optimization.py --hybrid), or run without --heatmaps.")
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
    return images, output


def score_all(args, model, todo: list[Path], store: PredictionStore, workers: int, rid: str, timing: Timing,
              heatmaps: HeatmapWriter | None) -> int | None:
    """Scores `todo`, puts each row in the store (saved every --save-every rows or SAVE_SECONDS, and at the end
    whatever happens) and each map in `heatmaps`. Returns EXIT_INTERRUPTED on Ctrl+C / SIGTERM, else None."""
    from tqdm.auto import tqdm

    identity = store.identity
    bar = tqdm(total=len(todo), desc="predict", unit="img", leave=False)
    last_save = t0 = time.perf_counter()
    n_put = 0
    STOP_REQUESTED["in_loop"] = True
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
            if STOP_REQUESTED["flag"]:  # Ctrl+C / SIGTERM during this image
                raise KeyboardInterrupt
        timing.wall_s = time.perf_counter() - t0
    except KeyboardInterrupt:
        bar.close()
        store.save()
        if heatmaps:
            heatmaps.close()  # the overlays written so far stay; the sheet shows their most anomalous
        print(f"error: interrupted: {n_put} of the {len(todo)} images to score were saved in {_shown(store.path)}; "
              "run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bar.close()
        store.save()  # rows done before any error are never lost
        STOP_REQUESTED["in_loop"] = False
    return None


def _main(args) -> int:
    threads = ort_threads(args.num_threads)
    workers = default_workers() if args.workers is None else args.workers
    model = load_model(args.model, threads)
    images, output = check_inputs(args, model)
    identity = model_identity(model)
    store = PredictionStore(output, identity, rescore=args.rescore)
    if store.note:
        print(store.note)
    states = {path: store.status(path) for path in images}
    status = Counter(states.values())
    todo = [path for path in images if states[path] != "done"]
    print(f"model {_shown(model.meta['model_path'])}: {identity['variant']} ({model.meta['engine']}, "
          f"{model_precision(model)}, sha256 {identity['model_sha256'][:12]}...), threshold {model.threshold:.4g}, "
          f"input {model.preprocessing['image_size']}; {threads or 'default'} engine threads, "
          f"{_workers_text(workers, args.pool)}, batch {args.batch_size}")
    print(f"{len(images)} images: {len(todo)} to score ({status['new']} new, {status['failed']} failed before, "
          f"{status['changed']} changed since scored), {status['done']} already in {_shown(output)} (skipped)")

    rid, timing = run_id(), Timing()
    heatmaps = HeatmapWriter(args.heatmaps, model.map_reference) if args.heatmaps else None
    interrupted = score_all(args, model, todo, store, workers, rid, timing, heatmaps)
    if interrupted is not None:
        return interrupted
    failed = print_summary(images, store, timing, args, workers)
    if heatmaps:
        sheet = heatmaps.close()
        print(f"heat maps: {heatmaps.written} overlay(s) in {args.heatmaps}, colours from "
              f"{heatmaps.scale[0]:.3g} to {heatmaps.scale[1]:.3g} (red = patch distance {model.map_reference:.3g}: "
              f"{'the 95th percentile of its val good images' if isinstance(model, Classifier) else 'the threshold'})"
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


def print_summary(images: list[Path], store: PredictionStore, timing: Timing, args, workers: int) -> int:
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
        print(f"  ... and {len(errors) - 10} more errors (column 'error' of {_shown(store.path)})")
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
    print(f"predictions: {_shown(store.path)} ({len(store.rows)} rows)")
    return len(errors)


if __name__ == "__main__":
    run_cli(main)
