"""Load test of the scoring endpoint: latency percentiles and throughput at several concurrency levels.

    azmlinfsrv --entry_script score.py --model_dir modeles --port 5001          # server, in another terminal
    python load_test.py --url http://127.0.0.1:5001/score --images data/mvtec/bottle/test --concurrency 1,2,4,8
    python load_test.py --url https://NAME.REGION.inference.ml.azure.com/score --key KEY   # deployed endpoint

Each level runs CONCURRENCY client threads (one requests.Session each) that send the images in turn, until
--requests-per-level requests were sent or --max-seconds-per-level elapsed (a request already sent still finishes,
within --timeout). Latency = request sent -> whole reply read; its percentiles are over successful requests.
Errors (HTTP status >= 400, refused connection, timeout, reply without one prediction per image) are counted per
level, never fatal. If no request of a level could even connect (server not started, wrong port), the next levels
are skipped: what was measured is written, then one error line and exit code 2.
Writes resultats/load_test.csv (one row per level; rows accumulate across runs) and resultats/load_test.png.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests
from tqdm.auto import tqdm

from image_pipeline import find_images as find_image_files
from inference import IMAGE_EXTENSIONS
from lab_io import (ArgumentParser, UserError, append_csv_rows, finite_float, format_table, latency_columns, output_dir,
                    positive_int, run_cli, run_id, save_figure)

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:5001/score", help="scoring URL (POST)")
    p.add_argument("--key", default=os.environ.get("AZUREML_ENDPOINT_KEY"),
                   help="endpoint key, sent as 'Authorization: Bearer KEY' (default: $AZUREML_ENDPOINT_KEY)")
    p.add_argument("--deployment", default=None,
                   help="send to this deployment of the endpoint (header azureml-model-deployment)")
    p.add_argument("--images", default=None,
                   help="folder of images to send, searched recursively (default: DATA_DIR/CATEGORY/test)")
    p.add_argument("--data-dir", default="data/mvtec", help="MVTec root, used when --images is not given")
    p.add_argument("--category", default="bottle", help="MVTec category, used when --images is not given")
    p.add_argument("--synthetic", action="store_true",
                   help="send images of a small generated MVTec-like tree instead (no dataset needed)")
    p.add_argument("--max-images", type=positive_int, default=64, help="use at most this many different images")
    p.add_argument("--mode", choices=("raw", "json"), default="raw",
                   help="raw: image bytes with Content-Type image/png|jpeg; json: {\"images\": [base64, ...]}")
    p.add_argument("--images-per-request", type=positive_int, default=1, help="images per request (json mode)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests-per-level", type=positive_int, default=50,
                   help="requests sent at each concurrency level")
    p.add_argument("--max-seconds-per-level", type=finite_float, default=30.0,
                   help="stop sending new requests at a level after this many seconds")
    p.add_argument("--timeout", type=finite_float, default=30.0, help="timeout of one request, in seconds")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not measured) before the first level")
    p.add_argument("--results-dir", type=output_dir, default="resultats",
                   help="where load_test.csv and load_test.png go")
    p.add_argument("--overwrite", action="store_true", help="replace load_test.png instead of keeping the old one")
    args = p.parse_args(argv)
    args.levels = parse_levels(args.concurrency)
    if urlsplit(args.url).scheme not in ("http", "https") or not urlsplit(args.url).hostname:
        raise UserError(f"--url {args.url!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:5001/score")
    if args.max_seconds_per_level <= 0 or args.timeout <= 0 or args.warmup < 0:
        raise UserError("--max-seconds-per-level and --timeout must be > 0, --warmup >= 0.")
    if args.mode == "raw" and args.images_per_request != 1:
        raise UserError("--images-per-request > 1 needs --mode json (a raw request carries one image).")
    return args


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--concurrency {text!r} must be comma-separated integers, e.g. 1,2,4,8") from None
    if not levels or min(levels) < 1 or max(levels) > 256:
        raise UserError(f"--concurrency {text!r}: levels must be between 1 and 256.")
    return levels


# --------------------------------------------------------------------------------------------------
# Images and request bodies
# --------------------------------------------------------------------------------------------------
def find_images(folder: Path, limit: int) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found: pass --images DIR, or --synthetic.")
    root = folder.resolve()
    paths = [p for p in find_image_files([str(folder)])  # recursive, sorted, hidden files skipped (as predict.py)
             if "ground_truth" not in p.relative_to(root).parts]  # MVTec masks are not test images
    if not paths:
        raise UserError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) in {folder}.")
    # spread the choice over every subfolder (good and each defect type), deterministically
    step = max(1, len(paths) // limit)
    return paths[::step][:limit]


def build_bodies(paths: list[Path], mode: str, per_request: int) -> list[tuple[bytes, str]]:
    """(body, Content-Type) of each distinct request, prepared once so that the client adds no work."""
    raw = [p.read_bytes() for p in paths]
    if mode == "raw":
        return [(data, CONTENT_TYPES.get(p.suffix.lower(), "application/octet-stream"))
                for data, p in zip(raw, paths)]
    bodies = []
    for start in range(len(raw)):
        group = [raw[(start + k) % len(raw)] for k in range(per_request)]
        doc = {"images": [base64.b64encode(b).decode("ascii") for b in group]}
        bodies.append((json.dumps(doc).encode("utf-8"), "application/json"))
    return bodies


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
def new_session(url: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = urlsplit(url).hostname not in LOOPBACK  # never send loopback traffic to a proxy
    return session


def send(session: requests.Session, url: str, body: bytes, content_type: str, headers: dict, timeout: float,
         expected: int) -> dict:
    """One request: latency in ms, HTTP status (None when no reply), error kind (None when it succeeded)."""
    t0 = time.perf_counter()
    status, kind, reply = None, None, None
    try:
        response = session.post(url, data=body, headers={**headers, "Content-Type": content_type},
                                timeout=timeout)
        status = response.status_code
        content = response.content
        if not 200 <= status < 300:
            kind = f"http_{status}"
        else:
            try:
                reply = json.loads(content)
                if len(reply.get("predictions", [])) != expected:
                    kind = "bad_reply"
            except (ValueError, AttributeError, TypeError):
                kind = "bad_reply"
    except requests.exceptions.ConnectionError as exc:  # refused, DNS, reset; ConnectTimeout too
        kind = "connect_timeout" if isinstance(exc, requests.exceptions.ConnectTimeout) else "connection"
    except requests.exceptions.Timeout:
        kind = "timeout"
    except requests.exceptions.RequestException as exc:
        kind = type(exc).__name__
    return {"ms": (time.perf_counter() - t0) * 1000.0, "status": status, "kind": kind,
            "model": reply.get("model") if isinstance(reply, dict) and kind is None else None}


def run_level(concurrency: int, args, bodies, headers: dict) -> tuple[list[dict], float, str]:
    """Send up to --requests-per-level requests from `concurrency` threads; returns (results, seconds, stop)."""
    lock = threading.Lock()
    sent = [0]
    results: list[dict] = []
    deadline = time.perf_counter() + args.max_seconds_per_level
    bar = tqdm(total=args.requests_per_level, desc=f"concurrency {concurrency}", unit="req", leave=False)

    def worker() -> None:
        session = new_session(args.url)
        try:
            while True:
                with lock:
                    if sent[0] >= args.requests_per_level or time.perf_counter() >= deadline:
                        return
                    index = sent[0]
                    sent[0] += 1
                body, content_type = bodies[index % len(bodies)]
                result = send(session, args.url, body, content_type, headers, args.timeout,
                              args.images_per_request)
                with lock:
                    results.append(result)
                    bar.update()
        finally:
            session.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - start
    bar.close()
    return results, seconds, "requests" if len(results) >= args.requests_per_level else "time"


def summarize(results: list[dict], seconds: float, concurrency: int, args) -> dict:
    ok = [r for r in results if r["kind"] is None]
    ms = np.asarray([r["ms"] for r in ok], dtype=float)
    kinds = Counter(r["kind"] for r in results if r["kind"] is not None)
    model = next((r["model"] for r in ok if r["model"]), None) or {}
    return {"concurrency": concurrency, "requests": len(results), "ok": len(ok),
            "errors": len(results) - len(ok), "error_rate": (len(results) - len(ok)) / max(1, len(results)),
            "error_kinds": "; ".join(f"{k}:{v}" for k, v in sorted(kinds.items())),
            **latency_columns(ms),
            "throughput_req_s": len(ok) / seconds if seconds > 0 else float("nan"),
            "throughput_img_s": len(ok) * args.images_per_request / seconds if seconds > 0 else float("nan"),
            "duration_s": seconds,
            "variant": model.get("variant", ""), "category": model.get("category", ""),
            "model_sha256": str(model.get("sha256") or ""),
            "unreachable": bool(results) and all(r["kind"] in ("connection", "connect_timeout") for r in results)}


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------
def plot(rows: list[dict], args, path: Path) -> Path | None:
    rows = [r for r in rows if r["ok"] > 0]
    if not rows:
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    x = [r["concurrency"] for r in rows]
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("latency_median_ms", "p50", "o-"), ("latency_p95_ms", "p95", "s--"),
                              ("latency_p99_ms", "p99 (>= 100 requests)", "^:"), ("latency_max_ms", "max", "x-.")):
        if any(r[key] is not None for r in rows):
            ax_lat.plot(x, [float("nan") if r[key] is None else r[key] for r in rows], style, label=label)
    ax_lat.set(xlabel="concurrent clients", ylabel="latency per request (ms)", title="Latency")
    ax_thr.plot(x, [r["throughput_req_s"] for r in rows], "o-", color="tab:green", label="successful requests/s")
    if args.images_per_request > 1:
        ax_thr.plot(x, [r["throughput_img_s"] for r in rows], "s--", color="tab:olive", label="images/s")
    for r in rows:
        if r["errors"]:
            ax_thr.annotate(f"{100 * r['error_rate']:.0f}% errors", (r["concurrency"], r["throughput_req_s"]),
                            textcoords="offset points", xytext=(0, 8), ha="center", color="tab:red", fontsize=8)
    ax_thr.set(xlabel="concurrent clients", ylabel="throughput (requests/s)", title="Throughput")
    ax_lat.set_ylim(bottom=0)
    ax_thr.set_ylim(0, 1.2 * max(max(r["throughput_req_s"], r["throughput_img_s"]) for r in rows))
    for ax in (ax_lat, ax_thr):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    model = rows[0]["variant"] or "model ?"
    fig.suptitle(f"Load test of {urlsplit(args.url).netloc}{urlsplit(args.url).path} ({model}, {args.mode}, "
                 f"{args.images_per_request} image(s)/request, {rows[0]['requests']} requests/level)")
    fig.tight_layout()
    saved = save_figure(fig, path, overwrite=args.overwrite)
    plt.close(fig)
    return saved


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = None
    try:
        if args.synthetic:
            from mvtec_dataset import make_synthetic_mvtec  # noqa: PLC0415 - imports torch, only when asked

            tmp = Path(tempfile.mkdtemp(prefix="load_test_"))
            folder = make_synthetic_mvtec(tmp, args.category, n_train_good=0, n_test_good=8, n_per_defect=4,
                                          image_size=256, seed=0) / "test"
        else:
            folder = Path(args.images) if args.images else Path(args.data_dir) / args.category / "test"
        paths = find_images(folder, args.max_images)
        bodies = build_bodies(paths, args.mode, args.images_per_request)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    headers = {}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    if args.deployment:
        headers["azureml-model-deployment"] = args.deployment
    source = "a generated MVTec-like tree" if args.synthetic else folder
    print(f"target {args.url}: {len(paths)} images from {source}, {args.mode} mode, {args.images_per_request} "
          f"image(s)/request, levels {args.levels}, <= {args.requests_per_level} requests and "
          f"{args.max_seconds_per_level:g} s per level, timeout {args.timeout:g} s")

    if args.warmup:
        session = new_session(args.url)
        warm = [send(session, args.url, *bodies[i % len(bodies)], headers, args.timeout, args.images_per_request)
                for i in range(args.warmup)]
        session.close()
        failed = [w["kind"] for w in warm if w["kind"]]
        if failed:
            print(f"note: {len(failed)}/{len(warm)} warm-up requests failed ({', '.join(sorted(set(failed)))})")

    rid, rows, unreachable = run_id(), [], None
    for concurrency in args.levels:
        results, seconds, stopped_by = run_level(concurrency, args, bodies, headers)
        row = summarize(results, seconds, concurrency, args)
        row.update(stopped_by=stopped_by)
        rows.append(row)
        if row["unreachable"]:
            unreachable = row
            break

    out_dir = Path(args.results_dir)
    csv_rows = [{"run_id": rid, "script": "load_test", "url": args.url, "request_mode": args.mode,
                 "batch_size": args.images_per_request, "n_images": len(paths), "timeout_s": args.timeout,
                 "requests_per_level": args.requests_per_level, "max_seconds_per_level": args.max_seconds_per_level,
                 **{k: v for k, v in r.items() if k != "unreachable"}} for r in rows]
    csv_path = append_csv_rows(out_dir / "load_test.csv", csv_rows)
    png_path = plot(rows, args, out_dir / "load_test.png")
    print(format_table(rows, ["concurrency", "requests", "errors", "error_rate", "latency_median_ms",
                              "latency_p95_ms", "latency_p99_ms", "latency_mean_ms", "throughput_req_s",
                              "duration_s", "stopped_by"]))
    print("(latency percentiles over successful requests; throughput = successful requests / level duration)")
    print(f"results appended to {csv_path}" + (f", figure {png_path}" if png_path else
                                               ", no figure (no successful request)"))
    if unreachable:
        skipped = args.levels[len(rows):]
        raise UserError(f"no request reached {args.url} at concurrency {unreachable['concurrency']} "
                        f"({unreachable['error_kinds']}): is the server started (azmlinfsrv ... --port) and the URL "
                        f"right?" + (f" Levels {skipped} skipped." if skipped else ""))
    if all(r["errors"] == r["requests"] for r in rows):  # the server answered, but never with a result
        kinds = "; ".join(sorted({r["error_kinds"] for r in rows}))
        raise UserError(f"every request to {args.url} failed ({kinds}): the server answers but refuses them; check "
                        "the URL's path (/score), the images (--images) and --mode")
    return 0


if __name__ == "__main__":
    run_cli(main)
