"""Part 2 - dynamic int8 quantization of the fine-tuned ViT (PyTorch, CPU).

The nn.Linear layers (about 98 % of a ViT's weights) get int8 weights; activations are quantized on the
fly at each call, so no calibration data is needed. The fp32 and int8 models are compared on the
checkpoint's saved test split: size on disk, batch-1 latency, throughput, accuracy/F1/AUROC, prediction
agreement; then the business objectives (size < 30 MB, accuracy > 95 %, accuracy loss < 1 pt) are checked.

    python quantization_demo.py --category bottle --model-path model_cpu_bottle.pth

Writes modeles/model_quantized.pth (reloads with torch.load(weights_only=True), see
load_quantized_checkpoint), resultats/quantization_results.csv and resultats/quantization_comparison.png.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lab_io import (UserError, append_csv_rows, atomic_write, cpu_name, environment_columns, format_table,
                    keep_previous, library_versions, run_cli, run_id, save_figure, size_on_disk_mb)
from lab_targets import (CPU_PRICE, QUANTIZATION, TARGET_MAX_LOSS_PT, TARGET_MAX_SIZE_MB, TARGET_MIN_ACCURACY,
                         describe_flips, format_accuracy, guard_columns, judge_variant, measured_columns,
                         variant_passes)
from load_model_hf import (checkpoint_threshold, count_parameters, model_from_checkpoint, model_skeleton,
                           read_checkpoint, resolve_model_path)
from mvtec_dataset import make_loaders, split_from_manifest
from train_utils import (benchmark_torch_model, classification_metrics, model_logits, predict_logits, set_seed,
                         set_threads)

QUANT_METHOD = "dynamic-int8"
ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_quantization_warnings():
    """torch.ao.quantization still works in torch 2.14 but warns on every call that it is deprecated (in favour
    of torchao's quantize_, which is far slower on CPUs without AVX-512/VNNI); loading qint8 tensors also warns
    about TypedStorage. Silence exactly those three warnings, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"torch\.quantize_per_tensor, torch\.quantize_per_channel", UserWarning)
        warnings.filterwarnings("ignore", r"TypedStorage is deprecated", UserWarning)
        yield


def default_engine() -> str:
    """The quantized kernels to use: qnnpack on ARM, x86 (fbgemm + oneDNN) or fbgemm on Intel/AMD."""
    supported = torch.backends.quantized.supported_engines
    is_arm = platform.machine().lower().startswith(("arm", "aarch64"))
    for engine in (("qnnpack",) if is_arm else ()) + ("x86", "fbgemm", "qnnpack"):
        if engine in supported:
            return engine
    raise UserError(f"this PyTorch build has no quantized engine (supported: {supported}).")


def select_engine(engine: str | None = "auto") -> str:
    """Validate and activate a quantized engine ('auto' = default_engine()); returns its name."""
    engine = default_engine() if engine in (None, "", "auto") else engine
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise UserError(f"quantized engine '{engine}' is not available in this PyTorch build "
                        f"(available: {', '.join(e for e in supported if e != 'none')}); use --engine auto.")
    torch.backends.quantized.engine = engine
    return engine


def quantize_dynamic_int8(model, engine: str | None = "auto", per_channel: bool = False):
    """A copy of `model` whose nn.Linear layers have int8 weights (dynamic quantization); `model` is untouched.

    The weights are packed for the active engine, so the engine is selected first."""
    select_engine(engine)
    with quiet_quantization_warnings():
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def quantization_info(engine: str, per_channel: bool = False) -> dict:
    return {"method": QUANT_METHOD, "modules": ["Linear"], "engine": engine, "dtype": "qint8",
            "qscheme": "per_channel" if per_channel else "per_tensor"}


def linear_share(model) -> float:
    """Share of the parameters that sit in nn.Linear layers (what dynamic quantization turns into int8)."""
    n_linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    return n_linear / max(1, count_parameters(model))


# --------------------------------------------------------------------------------------------------
# The int8 checkpoint
# --------------------------------------------------------------------------------------------------
def _checkpoint_dict(source_ckpt: dict, state_dict: dict, **entries) -> dict:
    """The lab's checkpoint layout (same keys as load_model_hf.save_checkpoint) around another state_dict."""
    ckpt = {k: v for k, v in source_ckpt.items() if k != "state_dict"}
    # the state_dict object itself: its _metadata holds the module versions that the quantized Linear's
    # _load_from_state_dict needs to read the packed int8 format
    ckpt.update(state_dict=state_dict, versions=library_versions(), **entries)
    return ckpt


def save_quantized_checkpoint(path: str | Path, qmodel, source_ckpt: dict, *, quantization: dict,
                              metrics: dict | None = None, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the int8 model as a lab checkpoint (config, preprocessing, category, split... of `source_ckpt`)
    plus its "quantization" entry. Plain tensors and containers only: reloads with weights_only=True."""
    ckpt = _checkpoint_dict(source_ckpt, qmodel.state_dict(), quantization=quantization,
                            metrics=metrics if metrics is not None else {},
                            source_metrics=source_ckpt.get("metrics", {}), **(extra or {}))
    keep_previous(path, overwrite)
    with quiet_quantization_warnings():
        return atomic_write(path, lambda p: torch.save(ckpt, p))


def checkpoint_size_mb(source_ckpt: dict, state_dict: dict, **entries) -> float:
    """Bytes on disk / 10^6 of a checkpoint holding `state_dict`, written exactly like the int8 one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        with quiet_quantization_warnings():
            torch.save(_checkpoint_dict(source_ckpt, state_dict, **entries), path)
        return size_on_disk_mb(path)


def load_quantized_checkpoint(path: str | Path, expected_category: str | None = None,
                              models_dir: str | Path = "modeles", engine: str | None = None):
    """Reload model_quantized.pth safely: weights_only=True, architecture rebuilt from the config, the same
    quantize_dynamic applied, then the int8 state_dict loaded. Returns (int8 model in eval mode, checkpoint).

    `engine`: None = the one it was saved with when available here, else the default one."""
    path = resolve_model_path(path, models_dir)
    with quiet_quantization_warnings():
        ckpt = read_checkpoint(path, expected_category)
    quant = ckpt.get("quantization")
    if not isinstance(quant, dict) or quant.get("method") != QUANT_METHOD:
        raise UserError(f"{path} is not an int8 checkpoint of this lab (no '{QUANT_METHOD}' quantization entry): "
                        f"quantize it first with `python quantization_demo.py --model-path {path.name}`.")
    if engine is None:
        engine = quant.get("engine") if quant.get("engine") in torch.backends.quantized.supported_engines else "auto"
    qmodel = quantize_dynamic_int8(model_skeleton(ckpt, path), engine, quant.get("qscheme") == "per_channel")
    expected, state = qmodel.state_dict(), ckpt["state_dict"]
    if getattr(state, "_metadata", None) is None:  # module versions lost (e.g. re-saved as a plain dict)
        state = OrderedDict(state)
        state._metadata = expected._metadata
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path}: int8 weights do not match the model ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, e.g. {(missing + unexpected)[0]}).")
    try:
        with quiet_quantization_warnings():
            qmodel.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: int8 weights do not match the model ({str(exc).splitlines()[0]}).") from None
    return qmodel.eval(), ckpt


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------
def benchmark_batch(dataset, batch_size: int) -> torch.Tensor:
    """A fixed batch of real test images (repeated when the split is smaller than the batch)."""
    if len(dataset) == 0:
        raise UserError("the saved test split is empty: nothing to evaluate.")
    return torch.stack([dataset[i % len(dataset)][0] for i in range(batch_size)])


@torch.inference_mode()
def compare_models(fp32_model, int8_model, test_loader, *, bench_batch_size: int = 8, warmup: int = 5,
                   runs: int = 30, threshold: float = 0.5) -> dict:
    """Evaluate both models on the test loader (decision threshold of the checkpoint) and time them on the same
    inputs (batch 1 and bench_batch_size, measured alternately so that drift of the machine hits both alike).

    Returns {"fp32": {...}, "int8": {...}, "guard" (lab_targets.judge_variant: flips, McNemar, pass/fail),
    "agreement" (fraction), "max_abs_logit_diff", "n_test", "accuracy_delta_pt" (int8 - fp32, negative = loss)...};
    each variant dict holds its metrics
    ("accuracy", "f1", ...), "b1" and "bn" benchmark dicts."""
    dataset = test_loader.dataset
    models = {"fp32": fp32_model.eval(), "int8": int8_model.eval()}
    result = {}
    logits = {}
    for name, model in models.items():
        logits[name], labels = predict_logits(model, test_loader, "cpu", desc=f"evaluating {name}")
        result[name] = classification_metrics(labels, logits[name], dataset.defect_types, threshold=threshold)
    guard = judge_variant(QUANTIZATION, result["fp32"]["predictions"], result["int8"]["predictions"], labels)
    batch = benchmark_batch(dataset, bench_batch_size)
    for key, example in (("b1", batch[:1]), ("bn", batch)):
        for name, model in models.items():
            result[name][key] = benchmark_torch_model(model, example, "cpu", warmup=warmup, runs=runs,
                                                      desc=f"{name} batch {example.shape[0]}")
    fp32, int8 = result["fp32"], result["int8"]
    n = len(labels)
    result.update(
        n_test=n, guard=guard, threshold=threshold,
        agreement=guard["agreement"],
        max_abs_logit_diff=float(np.abs(logits["fp32"] - logits["int8"]).max()) if n else float("nan"),
        speedup=fp32["b1"]["latency_median_ms"] / int8["b1"]["latency_median_ms"],
        throughput_ratio=int8["bn"]["throughput_img_s"] / fp32["bn"]["throughput_img_s"],
        **{f"{m}_delta_pt": (int8[m] - fp32[m]) * 100 for m in ("accuracy", "f1", "auroc")})
    return result


def _num(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def check_objectives(result: dict, sizes: dict, *, n_params: int, linear_pct: float, model_name: str,
                     per_channel: bool, bench_batch_size: int) -> list[dict]:
    """The lab's business objectives on the int8 model: [{"name", "status" PASS/FAIL/INFO, "text", "advice"}]."""
    fp32, int8 = result["fp32"], result["int8"]
    checks = []

    ok = sizes["int8"] < TARGET_MAX_SIZE_MB
    checks.append({"name": "target_size_30mb", "status": "PASS" if ok else "FAIL",
                   "text": f"size < {TARGET_MAX_SIZE_MB:g} MB: int8 {sizes['int8']:.2f} MB "
                           f"(fp32 {sizes['fp32']:.2f} MB, "
                           f"{sizes['fp32'] / sizes['int8']:.2f}x smaller)",
                   "advice": "" if ok else
                   f"the model has {n_params / 1e6:.1f} M parameters; {linear_pct:.0f} % of them (nn.Linear) are now "
                   f"1 byte each, the rest stays fp32, so int8 cannot go much below ~{n_params / 1e6:.0f} MB. "
                   f"Fix: distil it into a smaller student (DeiT-Small ~22 M or DeiT-Tiny ~5.7 M parameters, "
                   f"the lab's distillation part), then quantize the student."})

    acc_ok = int8["accuracy"] > TARGET_MIN_ACCURACY
    if acc_ok:
        advice = ""
    elif fp32["accuracy"] <= TARGET_MIN_ACCURACY:
        advice = (f"the fp32 model itself only reaches {fp32['accuracy'] * 100:.1f} %: quantization is not the cause. "
                  f"Fix: fine-tune longer (more epochs)"
                  + (f"; '{model_name}' starts from RANDOM weights: fine-tune a real pretrained model "
                     f"(vit-base, deit-small) instead" if model_name.startswith("offline-") else
                     ", with class weights / more anomaly examples"))
    else:
        advice = "int8 lost the accuracy the fp32 model had: see the accuracy-loss criterion."
    checks.append({"name": "target_accuracy_95", "status": "PASS" if acc_ok else "FAIL",
                   "text": f"accuracy > {TARGET_MIN_ACCURACY * 100:g} %: int8 {format_accuracy(int8)}, fp32 "
                           f"{format_accuracy(fp32)}", "advice": advice})

    loss = -result["accuracy_delta_pt"]
    guard = result["guard"]
    loss_ok = guard["passed"]
    checks.append({"name": "target_loss_1pt", "status": "PASS" if loss_ok else "FAIL",
                   "text": f"accuracy loss < {TARGET_MAX_LOSS_PT:g} pt: {loss + 0.0:.2f} pt; "
                           f"{describe_flips(guard)}; "
                           f"max |dlogit| {result['max_abs_logit_diff']:.3g}",
                   "advice": "" if loss_ok else
                   "Fix: " + ("quantize the weights per output channel (--per-channel), " if not per_channel else "")
                   + "keep the most sensitive layers (classifier head, last blocks) in fp32, or use static "
                     "quantization with calibration images / quantization-aware training."})

    b1, bn = (fp32["b1"], int8["b1"]), (fp32["bn"], int8["bn"])
    checks.append({"name": "speed-up", "status": "INFO",
                   "text": f"speed-up (for information): batch 1 x{result['speedup']:.2f} (median "
                           f"{_num(b1[0]['latency_median_ms'])} -> {_num(b1[1]['latency_median_ms'])} ms), batch "
                           f"{bench_batch_size} throughput x{result['throughput_ratio']:.2f} "
                           f"({_num(bn[0]['throughput_img_s'])} -> {_num(bn[1]['throughput_img_s'])} img/s)",
                   "advice": "" if result["speedup"] > 1 else
                   "int8 is not faster here: with small layers the on-the-fly activation quantization costs as "
                   "much as it saves; ONNX Runtime's int8 kernels are usually faster on CPU."})
    return checks


def plot_comparison(result: dict, sizes: dict, title: str, bench_batch_size: int, path, overwrite: bool = False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names, colors = ("fp32", "int8"), ("tab:blue", "tab:orange")
    panels = [
        ("Size on disk", "MB (10^6 bytes)", [sizes[n] for n in names], TARGET_MAX_SIZE_MB,
         f"objective < {TARGET_MAX_SIZE_MB:g} MB"),
        ("Latency, batch 1 (median, whisker = p95)", "ms per image",
         [result[n]["b1"]["latency_median_ms"] for n in names], None, None),
        (f"Throughput, batch {bench_batch_size}", "images / s",
         [result[n]["bn"]["throughput_img_s"] for n in names], None, None),
        ("Accuracy (test split)", "%", [result[n]["accuracy"] * 100 for n in names], TARGET_MIN_ACCURACY * 100,
         f"objective > {TARGET_MIN_ACCURACY * 100:g} %"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    for ax, (panel_title, unit, values, target, target_label) in zip(axes, panels):
        # latency whiskers go up to the p95, so that the jitter is visible next to the median
        p95 = [result[n]["b1"]["latency_p95_ms"] - v for n, v in zip(names, values)] if "Latency" in panel_title \
            else None
        bars = ax.bar(names, values, color=colors, yerr=[[0, 0], p95] if p95 else None, capsize=6)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values], padding=2,
                     label_type="center" if p95 else "edge")
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--")
            ax.text(1.45, target, target_label, color="tab:red", ha="right", va="bottom", fontsize=8,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
        if unit == "%":
            ax.set_ylim(0, 105)
        else:
            ax.set_ylim(0, max(values + [target or 0] + [v + e for v, e in zip(values, p95 or [0, 0])]) * 1.18)
        ax.set_title(panel_title)
        ax.set_ylabel(unit)
        ax.set_xlabel("variant")
    fig.suptitle(title)
    fig.legend(handles=[Patch(color=c, label=f"{n} ({'PyTorch eager' if n == 'fp32' else 'torch.ao dynamic int8'})")
                        for n, c in zip(names, colors)]
               + [Line2D([], [], color="tab:red", linestyle="--", label="business objective")],
               loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    out = save_figure(fig, path, overwrite)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _delta(delta_pt: float) -> str:
    """A change int8 - fp32 in points, signed (no '-0.00')."""
    return f"{delta_pt + 0.0:+.2f}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Dynamic int8 quantization (torch.ao quantize_dynamic, nn.Linear) of a "
                                            "fine-tuned checkpoint; fp32 vs int8 on its saved test split.")
    p.add_argument("--category", default="bottle", help="MVTec AD category the checkpoint was trained on (bottle)")
    p.add_argument("--data-dir", default="./data/mvtec", help="folder holding the category folders (./data/mvtec)")
    p.add_argument("--model-path", default=None, help="fp32 checkpoint to quantize; a bare name is looked for in "
                                                      "--models-dir (default: model_cpu_CATEGORY.pth)")
    p.add_argument("--models-dir", default="modeles", help="folder of the checkpoints (default: modeles)")
    p.add_argument("--output", default=None, help="int8 checkpoint to write (default: MODELS_DIR/model_quantized.pth)")
    p.add_argument("--results-dir", default="resultats", help="folder of the CSV and the plot (default: resultats)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the test-set evaluation (16)")
    p.add_argument("--bench-batch-size", type=int, default=8, help="batch size of the throughput measurement (8)")
    p.add_argument("--seed", type=int, default=42, help="random seed (42)")
    p.add_argument("--num-threads", type=int, default=None, help="PyTorch CPU threads (default: torch's default)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per measurement (5)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per measurement, stopped after 60 s (30)")
    p.add_argument("--engine", default="auto", choices=("auto",) + ENGINES,
                   help="quantized kernels: auto = x86/fbgemm on Intel/AMD, qnnpack on ARM (default: auto)")
    p.add_argument("--per-channel", action="store_true",
                   help="quantize the weights per output channel (finer scales, usually less accuracy loss)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier outputs instead of keeping them with a timestamp")
    args = p.parse_args(argv)
    for name in ("batch_size", "bench_batch_size", "runs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1.")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_seed(args.seed)
    threads = set_threads(args.num_threads)
    engine = select_engine(args.engine)
    output = Path(args.output or Path(args.models_dir) / "model_quantized.pth")

    # 1. the fp32 checkpoint (fails fast on a wrong file), then its saved test split
    src_path = resolve_model_path(args.model_path or f"model_cpu_{args.category}.pth", args.models_dir)
    with quiet_quantization_warnings():
        ckpt = read_checkpoint(src_path, args.category)
    if ckpt.get("quantization"):
        raise UserError(f"{src_path} is already an int8 checkpoint: pass the fp32 one "
                        f"(e.g. --model-path model_cpu_{args.category}.pth).")
    if output.resolve() == src_path.resolve():
        raise UserError(f"--output {output} would replace the fp32 checkpoint it is made from.")
    fp32_model = model_from_checkpoint(ckpt, src_path)
    split = split_from_manifest(ckpt["split"])
    test_loader = make_loaders(args.data_dir, args.category, split, ckpt["preprocessing"], args.batch_size,
                               names=("test",), seed=args.seed)["test"]
    n_params, linear_pct = count_parameters(fp32_model), linear_share(fp32_model) * 100
    print(f"fp32 model: {src_path} ('{ckpt['model_name']}', {n_params / 1e6:.2f} M parameters, "
          f"{linear_pct:.1f} % in nn.Linear), test split: {len(test_loader.dataset)} images")

    # 2. quantize, compare, save
    int8_model = quantize_dynamic_int8(fp32_model, engine, args.per_channel)
    quant = quantization_info(engine, args.per_channel)
    print(f"quantized: torch.ao quantize_dynamic, nn.Linear -> int8 ({quant['qscheme']} weights), engine '{engine}', "
          f"{threads} thread(s), {cpu_name()}")
    threshold = checkpoint_threshold(ckpt)
    print(f"decision threshold on P(anomaly): {threshold:.3f} ({ckpt.get('threshold_rule', 'argmax')}), "
          f"the same for fp32 and int8")
    result = compare_models(fp32_model, int8_model, test_loader, bench_batch_size=args.bench_batch_size,
                            warmup=args.warmup, runs=args.runs, threshold=threshold)
    metrics = {k: result["int8"][k] for k in ("n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "precision",
                                             "recall", "f1", "auroc", "threshold", "confusion_matrix",
                                             "recall_per_defect")}
    save_quantized_checkpoint(output, int8_model, ckpt, quantization=quant, metrics=metrics,
                              extra={"source_checkpoint": src_path.name}, overwrite=args.overwrite)
    sizes = {"int8": size_on_disk_mb(output),
             "fp32": checkpoint_size_mb(ckpt, fp32_model.state_dict(), metrics=metrics,
                                        source_checkpoint=src_path.name)}

    # 3. the saved file must give back the very same model
    reloaded, _ = load_quantized_checkpoint(output, args.category)
    example = benchmark_batch(test_loader.dataset, args.bench_batch_size)
    with torch.inference_mode():
        roundtrip_diff = float((model_logits(int8_model, example) - model_logits(reloaded, example)).abs().max())
    print(f"int8 checkpoint written: {output} ({sizes['int8']:.2f} MB); reloaded with weights_only=True, "
          f"max |dlogit| vs the in-memory int8 model: {roundtrip_diff:.3g}")

    # 4. report
    checks = check_objectives(result, sizes, n_params=n_params, linear_pct=linear_pct, model_name=ckpt["model_name"],
                              per_channel=args.per_channel, bench_batch_size=args.bench_batch_size)
    rid, rows = run_id(), []
    for name in ("fp32", "int8"):
        r = result[name]
        is_int8 = name == "int8"
        row = {"run_id": rid, "script": "quantization_demo.py", "category": args.category,
               "variant": "pytorch-int8-dynamic" if is_int8 else "pytorch-fp32", "backend": "pytorch",
               "method": "torch.ao quantize_dynamic (nn.Linear)" if is_int8 else "eager", "precision": name,
               "model_name": ckpt["model_name"], "file": str(output if is_int8 else src_path),
               "engine": engine if is_int8 else "", "qscheme": quant["qscheme"] if is_int8 else "", "device": "cpu",
               "device_name": cpu_name(), "size_mb": sizes[name], "size_ratio": sizes["fp32"] / sizes[name],
               **measured_columns(r, r["b1"], r["bn"], reference=rows[0] if rows else None,
                                  price_per_hour=CPU_PRICE),
               **guard_columns({**result["guard"], "reference": "pytorch-fp32",
                                "max_abs_logit_diff": result["max_abs_logit_diff"]} if is_int8 else None),
               "roundtrip_max_abs_diff": roundtrip_diff if is_int8 else "",
               **environment_columns()}
        row["guards_passed"] = variant_passes(row["accuracy_delta_pt"], result["guard"]["passed"] if is_int8 else None)
        if is_int8:
            row.update({c["name"]: c["status"] == "PASS" for c in checks if c["status"] != "INFO"})
        rows.append(row)
    csv_path = append_csv_rows(Path(args.results_dir) / "quantization_results.csv", rows)
    title = (f"fp32 vs dynamic int8 - {ckpt['model_name']} on '{args.category}' ({result['n_test']} test images), "
             f"CPU {threads} thread(s), engine {engine}")
    png_path = plot_comparison(result, sizes, title, args.bench_batch_size,
                               Path(args.results_dir) / "quantization_comparison.png", args.overwrite)

    print()
    print(format_table(rows, ["variant", "size_mb", "latency_median_ms", "latency_p95_ms", "latency_p99_ms",
                              "throughput_img_s", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1", "auroc",
                              "accuracy_delta_pt", "guards_passed", "threads"]))
    print(f"latency: batch 1, ms; throughput: batch {args.bench_batch_size}, images/s; size: checkpoint bytes on "
          f"disk / 10^6; metrics on the saved test split ({result['n_test']} images)")
    print(f"int8 vs fp32: {sizes['fp32'] / sizes['int8']:.2f}x smaller, batch-1 speed-up x{result['speedup']:.2f}, "
          f"throughput x{result['throughput_ratio']:.2f}, accuracy {_delta(result['accuracy_delta_pt'])} pt, "
          f"F1 {_delta(result['f1_delta_pt'])} pt, AUROC {_delta(result['auroc_delta_pt'])} pt, "
          f"agreement {result['agreement'] * 100:.1f} %, max |dlogit| {result['max_abs_logit_diff']:.3g}")
    print(f"int8 vs fp32, image by image: {describe_flips(result['guard'])}")
    print("\nBusiness objectives (int8 model):")
    for c in checks:
        print(f"  [{c['status']}] {c['text']}")
        if c["advice"]:
            print(f"         {'note' if c['status'] == 'INFO' else 'why / fix'}: {c['advice']}")
    print(f"\nresults appended to {csv_path}; plot: {png_path}; int8 model: {output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
