"""Part 3: export the fine-tuned classifier to ONNX and serve it with ONNX Runtime (fp32, fused fp32, int8).

    python onnx_optimization.py --category bottle --model-path model_cpu_bottle.pth

Steps: export with a dynamic batch axis (opset 17, TorchScript exporter; the torch.export-based exporter is
the fallback) and onnx.checker; ORT sessions with every graph optimisation (ORT_ENABLE_ALL); ORT's transformer
fusion (optimize_model, model_type 'vit'); dynamic int8 (QInt8 weights) of the plain export, measured as the
fastest variant on a 2-core AVX2 CPU. Every variant is compared with PyTorch fp32 on the whole saved test split
(guard: >= 99.5 % identical predictions and < 0.5 point of accuracy difference) and timed in the same run at
batch 1 and at --bench-batch-size. The fastest variant at batch 1 that passes the guard is saved as
modeles/model_final.onnx, with modeles/model_final.json describing the input it expects (for the Azure scoring
script). Kept too: modeles/model_fp32.onnx, model_fp32_optimized.onnx, model_int8.onnx.
Outputs: resultats/onnx_results.csv (one row per variant and batch size), resultats/onnx_comparison.png.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lab_targets import (CONVERSION, CPU_PRICE, CPU_VM, PARITY_MAX_ACCURACY_DIFF_PT, PARITY_MIN_AGREEMENT, QUANTIZATION, TARGET_MAX_LOSS_PT,
                         describe_flips, format_accuracy, judge_variant, predict_labels)
from load_model_hf import checkpoint_threshold, load_checkpoint, resolve_model_path, state_dict_size_mb
from mvtec_dataset import make_loaders, split_from_manifest
from train_utils import (LABELS, UserError, append_csv_rows, atomic_write, atomic_write_text, benchmark,
                         benchmark_torch_model,
                         classification_metrics, cost_per_1000_images, cpu_name, format_table, keep_previous,
                         library_versions, model_logits, predict_logits, run_cli, run_id, save_figure,
                         set_threads, sha256_file, size_on_disk_mb)

SIDECAR_FORMAT = "tp4-onnx-sidecar-v1"
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
DEFAULT_OPSET = 17
DEFAULT_PRICE_PER_HOUR = CPU_PRICE  # defined in lab_targets.py
MIN_AGREEMENT = PARITY_MIN_AGREEMENT          # defined in lab_targets.py
MAX_ACCURACY_DIFF_PT = PARITY_MAX_ACCURACY_DIFF_PT
FILES = {"ort-fp32": "model_fp32.onnx", "ort-fp32-optimized": "model_fp32_optimized.onnx",
         "ort-int8-dynamic": "model_int8.onnx"}
FINAL_ONNX, FINAL_SIDECAR = "model_final.onnx", "model_final.json"


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
class _LogitsOnly(torch.nn.Module):
    """pixel_values -> logits tensor: one named input, one named output in the ONNX graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return model_logits(self.model, pixel_values)


@contextmanager
def _quiet_export():
    """Silence the exporters' known noise, and nothing else.

    The legacy exporter announces its own deprecation twice. The tracer warns about Python checks in
    transformers on tensor shapes (channel count, image size, sdpa's is_causal): they are constant for a fixed
    H x W, only the batch axis is dynamic, and export_onnx checks the graph against PyTorch at two batch sizes.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=r"You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The feature will be removed",
                                module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"transformers\.")
        yield


def onnx_opset(path: str | Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check_against_torch(model, path: Path, image_size, threads: int | None = None) -> float:
    """Max |logit difference| between the ONNX file in ORT and PyTorch, at batch sizes 1 and 3 (the export
    traced batch 2, so both prove the batch axis is really dynamic). Raises if the graph is wrong."""
    session = make_session(path, threads)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, 3, *image_size, generator=gen)
        with torch.inference_mode():
            ref = model_logits(model, x).float().numpy()
        out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        diff = float(np.abs(out - ref).max())
        if out.shape != ref.shape or not diff <= 1e-3 * max(1.0, float(np.abs(ref).max())):
            raise RuntimeError(f"ONNX output differs from PyTorch at batch {batch} (shape {out.shape}, "
                               f"max |diff| {diff:.3g})")
        worst = max(worst, diff)
    return worst


def export_onnx(model, path: str | Path, preprocessing: dict, opset: int = DEFAULT_OPSET, *,
                exporter: str = "auto", overwrite: bool = False) -> dict:
    """Export `model` (pixel_values [batch, 3, H, W] -> logits [batch, 2]) to `path` with a dynamic batch axis.

    exporter 'torchscript' = torch.onnx.export(dynamo=False): quick, opset 17, the graph ORT's transformer
    fusion knows. 'dynamo' = the torch.export-based exporter (opset >= 18). 'auto' tries torchscript, then
    dynamo if the export fails or disagrees with PyTorch. Each export passes onnx.checker and a numerical check
    in ORT before it replaces `path` (atomic; an earlier file is kept unless overwrite).
    Returns {"path", "exporter", "opset", "export_seconds", "check_max_abs_diff", "fallback_reason"}.
    """
    import onnx

    path = Path(path)
    model = model.eval().cpu()
    image_size = [int(v) for v in preprocessing["image_size"]]
    example = torch.randn(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
    wrapped = _LogitsOnly(model).eval()
    tries = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"], "dynamo": ["dynamo"]}[exporter]
    failures = []
    for name in tries:
        info = {}

        def write(tmp: Path) -> None:
            t0 = time.perf_counter()
            with _quiet_export(), torch.inference_mode(False), torch.no_grad():
                if name == "torchscript":
                    torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
                                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
                else:
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    torch.onnx.export(wrapped, (example,), str(tmp), dynamo=True, opset_version=max(opset, 18),
                                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
                                      dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False)
            info["export_seconds"] = time.perf_counter() - t0
            onnx.checker.check_model(str(tmp))
            info["check_max_abs_diff"] = _check_against_torch(model, tmp, image_size)
            info["opset"] = onnx_opset(tmp)
            keep_previous(path, overwrite)

        try:
            atomic_write(path, write)
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other one, report both
            failures.append(f"{name}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
            continue
        reason = "; ".join(failures) or None
        if reason:
            print(f"note: ONNX export fell back to the '{name}' exporter ({reason})")
        return {"path": str(path), "exporter": name, "fallback_reason": reason, **info}
    raise UserError(f"ONNX export of {type(model).__name__} failed: {' | '.join(failures)}")


# --------------------------------------------------------------------------------------------------
# Graph optimisation and int8
# --------------------------------------------------------------------------------------------------
def optimize_onnx(src: str | Path, dst: str | Path, config, *, overwrite: bool = False) -> dict:
    """ORT's transformer fusion (optimize_model, model_type 'vit': LayerNorm/SkipLayerNorm, Gelu/BiasGelu,
    Attention when the pattern matches; ORT's own graph optimisations run later, in the session).

    Returns {"applied": bool, "reason": str|None, "fused": {op: count}, "seconds"}. Architectures without an
    integer hidden_size / num_attention_heads (CNNs...) or whose graph the fuser rejects are skipped, not fatal.
    """
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        return {"applied": False, "reason": f"model type '{getattr(config, 'model_type', '?')}' is not a "
                                            f"transformer encoder the fuser supports", "fused": {}}
    from onnxruntime.transformers.optimizer import optimize_model

    t0 = time.perf_counter()
    try:
        with _quiet_logs():
            optimized = optimize_model(str(src), model_type="vit", num_heads=heads, hidden_size=hidden,
                                       opt_level=0, use_gpu=False)  # opt_level 0: keep the file portable
        fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    except Exception as exc:  # noqa: BLE001 - the fuser raises many types on graphs it does not know
        return {"applied": False, "reason": f"ORT transformer optimizer failed ({type(exc).__name__}: "
                                            f"{(str(exc).splitlines() or [''])[0][:150]})", "fused": {}}

    def write(tmp: Path) -> None:
        optimized.save_model_to_file(str(tmp))
        keep_previous(dst, overwrite)

    atomic_write(dst, write)
    return {"applied": True, "reason": None, "fused": fused, "seconds": time.perf_counter() - t0}


def quantize_onnx_int8(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> dict:
    """Dynamic int8: weights of MatMul/Gemm stored as QInt8, activations quantized on the fly (no calibration).
    DefaultTensorType lets it also process graphs with fused contrib ops of unknown output type."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()

    def write(tmp: Path) -> None:
        with _quiet_logs():
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        onnx.checker.check_model(str(tmp))
        keep_previous(dst, overwrite)

    atomic_write(dst, write)
    return {"seconds": time.perf_counter() - t0}


@contextmanager
def _quiet_logs():
    """quantize_dynamic and the fuser log advice on the root logger ('consider pre-processing'): hide it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------------------------------
# ONNX Runtime sessions, prediction, benchmark
# --------------------------------------------------------------------------------------------------
def physical_cores() -> int | None:
    """Physical cores (what ORT uses by default for intra-op threads); None when it cannot be read."""
    try:
        cores = set()
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            phys = "0"
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    cores.add((phys, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    try:
        import psutil  # not a requirement: used when present (Windows, macOS)

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def ort_threads(requested: int | None) -> int | None:
    """Intra-op threads for ORT: the requested number, else the physical cores (ORT's own default, made explicit
    so it can be recorded), else None (ORT decides)."""
    if requested is not None and requested < 1:
        raise UserError("--num-threads must be >= 1.")
    return requested or physical_cores()


def make_session(path: str | Path, threads: int | None = None):
    """CPU InferenceSession: all graph optimisations, `threads` intra-op threads (None = ORT's default),
    one inter-op thread, sequential execution (one image stream, as in the scoring service)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        raise UserError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:200]}).") from None


def ort_predict_logits(session, loader, desc: str = "onnxruntime"):
    """ORT counterpart of train_utils.predict_logits: (logits float32 [N, 2], labels int64 [N])."""
    from tqdm.auto import tqdm

    input_name = session.get_inputs()[0].name
    logits, labels = [], []
    for pixels, y in tqdm(loader, desc=desc, leave=False, unit="batch"):
        logits.append(session.run(None, {input_name: pixels.numpy().astype(np.float32, copy=False)})[0])
        labels.append(y.numpy())
    if not logits:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(logits).astype(np.float32), np.concatenate(labels).astype(np.int64)


def benchmark_session(session, inputs: np.ndarray, *, threads: int | None, warmup: int = 5, runs: int = 30,
                      max_seconds: float | None = 60.0, desc: str = "onnxruntime") -> dict:
    """train_utils.benchmark on session.run with a fixed numpy batch (prepared once, outside the timing)."""
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(inputs, dtype=np.float32)}
    result = benchmark(lambda: session.run(None, feed), batch_size=int(inputs.shape[0]), device="cpu",
                       warmup=warmup, runs=runs, max_seconds=max_seconds, desc=desc)
    result["threads"] = threads  # benchmark() records torch's threads; ORT has its own pool
    return result


def parity(reference_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5,
           kind: str = CONVERSION, reference: str = "pytorch-fp32") -> dict:
    """A variant next to its PyTorch reference on the same images and threshold, judged by lab_targets'
    one guard: CONVERSION (fp32 graph: same predictions) or QUANTIZATION (int8: accuracy loss < 1 pt)."""
    labels = np.asarray(labels)
    judged = judge_variant(kind, predict_labels(reference_logits, threshold), predict_labels(logits, threshold),
                           labels)
    return {"reference": reference, "n_test": int(len(labels)), "threshold": float(threshold),
            "max_abs_logit_diff": float(np.abs(logits - reference_logits).max()) if len(labels) else float("nan"),
            "prediction_agreement": judged["agreement"], **judged}


def guard_kind(variant: str) -> str:
    """int8 variants are judged as quantizations, every fp32 graph as a conversion."""
    return QUANTIZATION if "int8" in variant else CONVERSION


# --------------------------------------------------------------------------------------------------
# Final model + sidecar
# --------------------------------------------------------------------------------------------------
def sidecar_preprocessing(preprocessing: dict) -> dict:
    """What mvtec_dataset.image_to_tensor does, spelled out for a scoring script without this repository:
    RGB, whole image resized (bilinear) to image_size, no crop, /255, (x - mean) / std, NCHW float32."""
    return {"image_size": [int(v) for v in preprocessing["image_size"]],
            "mean": [float(v) for v in preprocessing["mean"]], "std": [float(v) for v in preprocessing["std"]],
            "resize": "bilinear", "crop": None, "color": "RGB", "scale": 255.0, "layout": "NCHW",
            "dtype": "float32"}


def write_sidecar(onnx_path: str | Path, *, variant: str, category: str, preprocessing: dict, exporter: str,
                  source_checkpoint: str | Path, base_model: str, parity_result: dict, metrics: dict,
                  threshold: float = 0.5, sidecar_path: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write `<onnx stem>.json` next to the model (format tp4-onnx-sidecar-v1), atomically. Returns it."""
    onnx_path = Path(onnx_path)
    sidecar_path = Path(sidecar_path) if sidecar_path else onnx_path.with_suffix(".json")
    sidecar = {"format": SIDECAR_FORMAT, "model_file": onnx_path.name, "variant": variant, "category": category,
               "labels": list(LABELS), "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
               "threshold": float(threshold), "threshold_rule": "P(anomaly) = softmax(logits)[1] >= threshold; "
                                                                 "threshold chosen on the validation split",
               "preprocessing": sidecar_preprocessing(preprocessing), "opset": onnx_opset(onnx_path),
               "exporter": exporter, "source_checkpoint": str(source_checkpoint), "base_model": base_model,
               "parity": _json_safe(parity_result), "metrics": _json_safe(metrics),
               "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "versions": library_versions(), "sha256": sha256_file(onnx_path)}
    keep_previous(sidecar_path, overwrite)
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=1, allow_nan=False) + "\n")
    return sidecar


def _json_safe(value):
    """NaN (e.g. AUROC with one class) is not valid JSON: write null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def save_final(src: str | Path, models_dir: Path, overwrite: bool) -> Path:
    final = models_dir / FINAL_ONNX

    def write(tmp: Path) -> None:
        shutil.copyfile(src, tmp)
        keep_previous(final, overwrite)

    return atomic_write(final, write)


def choose_final(variants: list[dict]) -> dict | None:
    """The fastest ORT variant at batch 1 (median) among those that pass their guard (lab_targets.judge_variant)."""
    passing = [v for v in variants if v["backend"] == "onnxruntime" and v["parity"]["passed"]]
    return min(passing, key=lambda v: v["b1"]["latency_median_ms"]) if passing else None


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
def plot_comparison(variants: list[dict], path: Path, *, title: str, bench_batch: int, selected: str | None,
                    overwrite: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["variant"] for v in variants]
    colors = ["tab:gray" if v["backend"] == "pytorch" else "tab:orange" if v["precision"] == "int8"
              else "tab:blue" for v in variants]
    panels = [
        ("Latency at batch 1 (median, bar = p95)", "ms per image", [v["b1"]["latency_median_ms"] for v in variants],
         [v["b1"]["latency_p95_ms"] - v["b1"]["latency_median_ms"] for v in variants], "{:.1f}"),
        (f"Throughput at batch {bench_batch}", "images / s", [v["bn"]["throughput_img_s"] for v in variants], None,
         "{:.1f}"),
        ("Size on disk", "MB (10^6 bytes)", [v["size_mb"] for v in variants], None, "{:.1f}"),
        ("Accuracy on the saved test split", "accuracy (%)", [100 * v["metrics"]["accuracy"] for v in variants],
         None, "{:.1f}"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (name, unit, values, err, fmt) in zip(axes.flat, panels):
        bars = ax.bar(names, values, color=colors, yerr=[[0] * len(err), err] if err else None, capsize=4)
        for i, (bar, value, v) in enumerate(zip(bars, values, variants)):
            label = fmt.format(value) + (" *" if v["variant"] == selected else "")
            top = value + (err[i] if err else 0)  # above the p95 whisker
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom", fontsize=9,
                        xytext=(0, 2), textcoords="offset points")
        if err and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")  # PyTorch and int8 ORT can differ by orders of magnitude on small models
            unit += ", log scale"
        ax.set_title(name)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=15)
        ax.margins(y=0.15)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="tab:gray", label="PyTorch fp32 (reference)"),
                        Patch(color="tab:blue", label="ONNX Runtime fp32"),
                        Patch(color="tab:orange", label="ONNX Runtime int8 (dynamic)")],
               loc="lower center", ncol=3, title=f"* = saved as {FINAL_ONNX}" if selected else None)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    saved = save_figure(fig, path, overwrite)
    plt.close(fig)
    return saved


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def _csv_rows(variants, *, args, rid, ckpt, ckpt_path, export_info, threads_torch, selected, load):
    import onnx
    import onnxruntime as ort

    versions = library_versions()
    rows = []
    for v in variants:
        for key in ("b1", "bn"):
            b = v[key]
            m, p = v["metrics"], v["parity"]
            rows.append({
                "run_id": rid, "script": "onnx_optimization.py", "category": args.category, "variant": v["variant"],
                "backend": v["backend"], "precision": v["precision"], "device": "cpu", "device_name": cpu_name(),
                "batch_size": b["batch_size"], "threads": b["threads"], "size_mb": v["size_mb"],
                "latency_median_ms": b["latency_median_ms"], "latency_p95_ms": b["latency_p95_ms"],
                "latency_p99_ms": b["latency_p99_ms"], "throughput_img_s": b["throughput_img_s"],
                "runs": b["runs"], "warmup": b["warmup"], "cpu_load_1min": load,
                "accuracy": m["accuracy"], "precision_score": m["precision"], "recall": m["recall"], "f1": m["f1"],
                "auroc": m["auroc"], "n_test": m["n"], "accuracy_ci_low": m["accuracy_ci_low"],
                "accuracy_ci_high": m["accuracy_ci_high"], "threshold": m["threshold"],
                "one_image_pt": p["one_image_pt"],
                "max_abs_logit_diff": p["max_abs_logit_diff"], "prediction_agreement": p["prediction_agreement"],
                "accuracy_diff_pt": p["accuracy_diff_pt"], "parity_passed": p["passed"], "guard": p["rule"],
                "flips": p["flips"], "flips_good_to_anomaly": p["good_to_anomaly"],
                "flips_anomaly_to_good": p["anomaly_to_good"], "mcnemar_p": p["mcnemar_p"],
                "cost_per_1000_images_usd": b["cost_per_1000_images_usd"], "savings_pct": b["savings_pct"],
                "price_per_hour_usd": args.price_per_hour, "selected_final": v["variant"] == selected,
                "file": v["file"], "exporter": export_info["exporter"] if v["backend"] == "onnxruntime" else "",
                "opset": v.get("opset", ""), "fused_ops": v.get("fused", ""), "base_model": ckpt["model_name"],
                "source_checkpoint": str(ckpt_path), "torch_threads": threads_torch,
                "torch_version": versions["torch"], "onnx_version": onnx.__version__,
                "onnxruntime_version": ort.__version__, "transformers_version": versions["transformers"],
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export the fine-tuned model to ONNX, optimise it for ONNX Runtime "
                                                 "(fp32, transformer fusion, dynamic int8), check parity with PyTorch "
                                                 "on the saved test split, benchmark, save modeles/model_final.onnx.")
    parser.add_argument("--category", default="bottle", help="MVTec AD category of the checkpoint (default: bottle)")
    parser.add_argument("--data-dir", default="./data/mvtec", help="folder holding the category folders "
                        "(default: ./data/mvtec)")
    parser.add_argument("--model-path", default=None,
                        help="checkpoint to export; a bare name is looked for in --models-dir "
                             "(default: model_cpu_<category>.pth)")
    parser.add_argument("--models-dir", default="modeles", help="where checkpoints are read and ONNX files "
                        "written (default: modeles)")
    parser.add_argument("--results-dir", default="resultats", help="where the CSV and the plot go (default: resultats)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the test-split evaluation (16)")
    parser.add_argument("--bench-batch-size", type=int, default=8,
                        help="the larger batch of the benchmark, next to batch 1 (default: 8)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset of the export (default: {DEFAULT_OPSET}, TorchScript exporter; the "
                             f"fallback exporter needs >= 18 and uses max(opset, 18))")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="intra-op threads of ONNX Runtime and PyTorch (default: ORT uses the physical cores, "
                             "PyTorch its own default; both recorded)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per measurement (default: 5)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per measurement (default: 30)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop a measurement's timed runs after this many seconds, >= 5 runs (default: 60)")
    parser.add_argument("--price-per-hour", type=float, default=DEFAULT_PRICE_PER_HOUR,
                        help=f"price of the serving machine in USD/h for the cost per 1000 images (default: {CPU_PRICE} "
                             f"= {CPU_VM}, pay-as-you-go Linux list price 2024)")
    parser.add_argument("--no-fusion", action="store_true", help="skip ORT's transformer fusion variant")
    parser.add_argument("--no-int8", action="store_true", help="skip the dynamic int8 variant")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier ONNX files, sidecar and plot instead of keeping them with a timestamp")
    args = parser.parse_args(argv)

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--bench-batch-size", args.bench_batch_size, 1),
                             ("--runs", args.runs, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}.")
    if not 7 <= args.opset <= 23:
        raise UserError(f"--opset {args.opset} is not a valid ONNX opset for this export (use 17, or 18-23).")
    if args.price_per_hour <= 0:
        raise UserError("--price-per-hour must be > 0.")
    threads_torch = set_threads(args.num_threads)
    threads_ort = ort_threads(args.num_threads)

    args.model_path = args.model_path or f"model_cpu_{args.category}.pth"
    model, ckpt = load_checkpoint(args.model_path, args.category, args.models_dir)
    ckpt_path = resolve_model_path(args.model_path, args.models_dir)
    preprocessing = ckpt["preprocessing"]
    split = split_from_manifest(ckpt["split"])
    loader = make_loaders(args.data_dir, args.category, split, preprocessing, args.batch_size, names=("test",))["test"]
    dataset = loader.dataset
    models_dir = Path(args.models_dir)
    print(f"checkpoint {ckpt_path} ({ckpt['model_name']}, {ckpt['model_type']}), category '{args.category}', "
          f"test split {len(dataset)} images; threads: ORT {threads_ort or 'ORT default'}, torch {threads_torch}")

    # 1. Files: plain export, fused graph, int8
    export_info = export_onnx(model, models_dir / FILES["ort-fp32"], preprocessing, args.opset,
                              overwrite=args.overwrite)
    print(f"exported {export_info['path']} with the {export_info['exporter']} exporter, opset {export_info['opset']}, "
          f"{export_info['export_seconds']:.1f} s; onnx.checker OK; max |logit diff| vs PyTorch on random input "
          f"{export_info['check_max_abs_diff']:.2g}")
    files = {"ort-fp32": models_dir / FILES["ort-fp32"]}
    fusion = {"applied": False, "reason": "--no-fusion", "fused": {}}
    if not args.no_fusion:
        fusion = optimize_onnx(files["ort-fp32"], models_dir / FILES["ort-fp32-optimized"], model.config,
                               overwrite=args.overwrite)
    if fusion["applied"]:
        files["ort-fp32-optimized"] = models_dir / FILES["ort-fp32-optimized"]
        print(f"transformer fusion: {fusion['fused'] or 'no pattern matched'} -> {files['ort-fp32-optimized']}")
    else:
        print(f"note: transformer fusion skipped: {fusion['reason']}")
    if not args.no_int8:
        # int8 of the plain export: measured fastest on AVX2 (quantizing the fused graph was not faster).
        quantize_onnx_int8(files["ort-fp32"], models_dir / FILES["ort-int8-dynamic"], overwrite=args.overwrite)
        files["ort-int8-dynamic"] = models_dir / FILES["ort-int8-dynamic"]
        print(f"dynamic int8 (QInt8 weights) -> {files['ort-int8-dynamic']}")

    # 2. Predictions on the whole test split, PyTorch fp32 as the reference
    threshold = checkpoint_threshold(ckpt)
    print(f"decision threshold on P(anomaly): {threshold:.3f} ({ckpt.get('threshold_rule', 'argmax')}), the same "
          f"for every variant")
    ref_logits, labels = predict_logits(model, loader, "cpu", desc="PyTorch fp32 test")
    variants = [{"variant": "pytorch-fp32", "backend": "pytorch", "precision": "fp32", "file": str(ckpt_path),
                 "size_mb": state_dict_size_mb(model), "logits": ref_logits,
                 "parity": parity(ref_logits, ref_logits, labels, threshold=threshold)}]
    sessions = {}
    for name, path in files.items():
        sessions[name] = make_session(path, threads_ort)
        logits, _ = ort_predict_logits(sessions[name], loader, desc=f"{name} test")
        variants.append({"variant": name, "backend": "onnxruntime", "precision": "int8" if "int8" in name else "fp32",
                         "file": str(path), "size_mb": size_on_disk_mb(path), "logits": logits,
                         "opset": onnx_opset(path),
                         "parity": parity(ref_logits, logits, labels, threshold=threshold, kind=guard_kind(name)),
                         "fused": ";".join(f"{k}={n}" for k, n in fusion["fused"].items())
                         if name == "ort-fp32-optimized" else ""})
    for v in variants:
        v["metrics"] = classification_metrics(labels, v["logits"], dataset.defect_types, threshold=threshold)

    # 3. Latency, same run, same input images (numpy prepared once)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and load > 1.5 * (os.cpu_count() or 1):  # this script alone stays near 1x
        print(f"note: the CPU is busy (load average {load:.1f} on {os.cpu_count()} CPUs): timings will be slower "
              f"and noisier than on an idle machine.")

    def batch_of(n):
        return np.stack([dataset[i % len(dataset)][0].numpy() for i in range(n)]).astype(np.float32)

    bench = dict(warmup=args.warmup, runs=args.runs, max_seconds=args.max_seconds)
    for key, n in (("b1", 1), ("bn", args.bench_batch_size)):
        x = batch_of(n)
        for v in variants:
            desc = f"{v['variant']} batch {n}"
            if v["backend"] == "pytorch":
                v[key] = benchmark_torch_model(model, torch.from_numpy(x), "cpu", desc=desc, **bench)
            else:
                v[key] = benchmark_session(sessions[v["variant"]], x, threads=threads_ort, desc=desc, **bench)
            v[key]["cost_per_1000_images_usd"] = cost_per_1000_images(args.price_per_hour,
                                                                      v[key]["latency_median_ms"], n)
        ref_cost = variants[0][key]["cost_per_1000_images_usd"]
        for v in variants:
            v[key]["savings_pct"] = 100.0 * (1.0 - v[key]["cost_per_1000_images_usd"] / ref_cost)

    # 4. Choose, save, report
    final = choose_final(variants)
    selected = final["variant"] if final else None
    rid = run_id()
    results_dir = Path(args.results_dir)
    csv_path = append_csv_rows(results_dir / "onnx_results.csv",
                               _csv_rows(variants, args=args, rid=rid, ckpt=ckpt, ckpt_path=ckpt_path,
                                         export_info=export_info, threads_torch=threads_torch, selected=selected,
                                         load=load))
    png = plot_comparison(variants, results_dir / "onnx_comparison.png", bench_batch=args.bench_batch_size,
                          selected=selected, overwrite=args.overwrite,
                          title=f"PyTorch vs ONNX Runtime on CPU - {args.category}, {ckpt['model_name']} "
                                f"({cpu_name()}, ORT threads {threads_ort or 'default'})")

    table = []
    for v in variants:
        p = v["parity"]
        table.append({"variant": v["variant"], "size MB": v["size_mb"], "b1 median ms": v["b1"]["latency_median_ms"],
                      "b1 p95 ms": v["b1"]["latency_p95_ms"],
                      f"b{args.bench_batch_size} img/s": v["bn"]["throughput_img_s"],
                      "accuracy": v["metrics"]["accuracy"], "agreement": p["prediction_agreement"],
                      "max|dlogit|": p["max_abs_logit_diff"], "dacc pt": p["accuracy_diff_pt"],
                      "guard": "reference" if v["backend"] == "pytorch" else "PASS" if p["passed"] else "FAIL",
                      "USD/1000 img b1": v["b1"]["cost_per_1000_images_usd"],
                      "savings b1 %": v["b1"]["savings_pct"]})
    print()
    print(format_table(table, list(table[0])))
    print(f"accuracy of PyTorch fp32 on the {len(labels)} test images: {format_accuracy(variants[0]['metrics'])} "
          f"(threshold {threshold:.3f}); one image = {100 / max(1, len(labels)):.2f} pt")
    print(f"guard: one rule for every variant vs PyTorch fp32 (lab_targets.judge_variant): fp32 graphs = conversion parity (agreement >= "
          f"{100 * MIN_AGREEMENT:g} %, |accuracy difference| < {MAX_ACCURACY_DIFF_PT:g} pt); int8 = quantization loss "
          f"< {TARGET_MAX_LOSS_PT:g} pt")
    for v in variants[1:]:
        p = v["parity"]
        print(f"  {v['variant']:<20} {'PASS' if p['passed'] else 'FAIL'} ({p['kind']}): accuracy "
              f"{format_accuracy(v['metrics'])}, difference {p['accuracy_diff_pt']:+.2f} pt; {describe_flips(p)}; "
              f"max |logit diff| {p['max_abs_logit_diff']:.3g}")
    print(f"cost: {args.price_per_hour} USD/h; results appended to {csv_path} (run_id {rid}), plot {png}")
    if final is None:
        print(f"error: no ONNX variant passed its guard: {FINAL_ONNX} was not written "
              f"(see the guard lines above and {csv_path}).")
        return 1

    final_path = save_final(final["file"], models_dir, args.overwrite)
    sidecar = write_sidecar(final_path, variant=selected, category=args.category, preprocessing=preprocessing,
                            exporter=export_info["exporter"], source_checkpoint=ckpt_path,
                            base_model=ckpt["model_name"], parity_result=final["parity"], metrics=final["metrics"],
                            threshold=threshold, overwrite=args.overwrite)
    print(f"saved {final_path} = {selected}: the fastest variant at batch 1 "
          f"({final['b1']['latency_median_ms']:.1f} ms vs {variants[0]['b1']['latency_median_ms']:.1f} ms for "
          f"PyTorch fp32) among those passing the guard; sidecar {final_path.with_suffix('.json')} "
          f"(sha256 {sidecar['sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    run_cli(main)
