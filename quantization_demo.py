"""Part 2 - int8 quantization of the fine-tuned ViT in PyTorch (CPU).

Two int8 models, compared with fp32 on the checkpoint's saved test split (size on disk, batch-1 latency,
throughput, accuracy/F1/AUROC, decisions changed image by image), then the business objectives (size < 30 MB,
accuracy > 95 %, accuracy loss < 1 pt):
- pytorch-int8-dynamic: the lab's lesson, torch.ao quantize_dynamic of every nn.Linear (int8 weights,
  activations quantized on the fly with one scale per batch tensor, no calibration);
- pytorch-int8-smoothquant: the fix (quantize.quantize_smooth_int8): SmoothQuant calibrated on training images, the
  full 8-bit activation range where this CPU's kernel is exact, one activation scale per image, the head's offset
  corrected and the most sensitive layers kept fp32, all chosen by label-free rules on train + val.

    python quantization_demo.py --category bottle --model-path model_cpu_bottle.pth

Writes modeles/model_quantized.pth and modeles/model_quantized_smoothquant.pth (both reload with
torch.load(weights_only=True), see quantize.load_quantized_checkpoint), resultats/quantization_results.csv and
resultats/quantization_comparison.png.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lab_io import (ArgumentParser, UserError, append_csv_rows, benchmark_rounds, cpu_name, environment_columns,
                    format_table, output_dir, output_file, positive_int, run_cli, run_id, save_figure, size_on_disk_mb)
from lab_targets import (CPU_PRICE, QUANTIZATION, SELECTION_SPLIT, TARGET_MAX_LOSS_PT, TARGET_MAX_SIZE_MB,
                         TARGET_MIN_ACCURACY, compare_logits, describe_flips, describe_guard, format_accuracy,
                         judge_selection, variant_passes, variant_row)
from load_model_hf import checkpoint_threshold, count_parameters, model_from_checkpoint, read_checkpoint, \
    resolve_model_path
from mvtec_dataset import make_loaders, selection_loader, split_from_manifest
from quantize import (ENGINES, SMOOTH_CALIBRATION_IMAGES, linear_share,
                      load_quantized_checkpoint, quantization_info, quantize_dynamic_int8, quantize_smooth_int8,
                      quiet_quantization_warnings, save_quantized_checkpoint, select_engine)
from train_utils import (benchmark_batch, classification_metrics, model_logits, predict_logits, set_seed, set_threads,
                         torch_job)

FP32, DYNAMIC, SMOOTH = "pytorch-fp32", "pytorch-int8-dynamic", "pytorch-int8-smoothquant"
METHODS = {FP32: "eager", DYNAMIC: "torch.ao quantize_dynamic (nn.Linear)",
           SMOOTH: "int8 SmoothQuant, per image, mixed precision (quantize.py)"}
OUTPUT_NAMES = {DYNAMIC: "model_quantized.pth", SMOOTH: "model_quantized_smoothquant.pth"}


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def compare_models(models: dict, test_loader, selection_loader, *, bench_batch_size: int = 8, warmup: int = 5,
                   runs: int = 30, threshold: float = 0.5) -> dict:
    """Evaluate every model (the first one is the fp32 reference) on the selection images (train + val, for the
    guard) and on the test loader (the report), at the decision threshold of the checkpoint, and time them on the
    same inputs (batch 1 and bench_batch_size, every model in each round so that drift of the machine hits all alike).

    Returns {name: metrics ("accuracy", "f1", ...) + "b1"/"bn" benchmark dicts + for the int8 ones "guard"
    (lab_targets.judge_selection on train + val), "test" (lab_targets.compare_logits: flips, McNemar),
    "agreement", "max_abs_logit_diff", "speedup", "throughput_ratio", "<metric>_delta_pt" (int8 - fp32)},
    "n_test": N}."""
    dataset = test_loader.dataset
    result, logits, selection = {}, {}, {}
    for name, model in models.items():
        selection[name], _ = predict_logits(model.eval(), selection_loader, "cpu", desc=f"{name} {SELECTION_SPLIT}")
        logits[name], labels = predict_logits(model.eval(), test_loader, "cpu", desc=f"{name} test")
        result[name] = classification_metrics(labels, logits[name], dataset.defect_types, threshold=threshold)
    batch = benchmark_batch(dataset, bench_batch_size)
    for key, example in (("b1", batch[:1]), ("bn", batch)):
        timed = benchmark_rounds({name: torch_job(model, example, "cpu") for name, model in models.items()},
                                 warmup=warmup, runs=runs, desc=f"timing at batch {example.shape[0]}")
        for name in models:
            result[name][key] = timed[name]
    ref_name, n = next(iter(models)), len(labels)
    ref = result[ref_name]
    for name in list(models)[1:]:
        r = result[name]
        r["guard"] = judge_selection(QUANTIZATION, selection[ref_name], selection[name], threshold=threshold,
                                     reference=ref_name)
        r["test"] = compare_logits(logits[ref_name], logits[name], labels, threshold=threshold)
        r.update(agreement=r["test"]["agreement"], max_abs_logit_diff=r["test"]["max_abs_logit_diff"],
                 speedup=ref["b1"]["latency_median_ms"] / r["b1"]["latency_median_ms"],
                 throughput_ratio=r["bn"]["throughput_img_s"] / ref["bn"]["throughput_img_s"],
                 **{f"{m}_delta_pt": (r[m] - ref[m]) * 100 for m in ("accuracy", "f1", "auroc")})
    result["n_test"] = n
    return result


def _num(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


LOSS_ADVICE = {
    DYNAMIC: f"one 7-bit activation scale (x86) for a whole batch tensor, and channels with large activations, are "
             f"too coarse for this model, and an image's result depends on the other images of the batch: see the "
             f"{SMOOTH} row (SmoothQuant, 8 bits, one scale per image, sensitive layers kept fp32).",
    SMOOTH: "decisions still moved: the images sit close to the threshold for this model (compare its AUROC); the "
            "OpenVINO NNCF int8 of part 3 (onnx_optimization.py) keeps more of them, or keep more layers fp32.",
}


def check_objectives(name: str, fp32: dict, int8: dict, sizes: tuple[float, float], *, n_params: int,
                     linear_pct: float, model_name: str, bench_batch_size: int) -> list[dict]:
    """The lab's business objectives on the int8 model `name`: [{"name", "status" PASS/FAIL/INFO, "text",
    "advice"}]. sizes = (fp32 MB, int8 MB)."""
    checks = []
    ok = sizes[1] < TARGET_MAX_SIZE_MB
    checks.append({"name": "target_size_30mb", "status": "PASS" if ok else "FAIL",
                   "text": f"size < {TARGET_MAX_SIZE_MB:g} MB: int8 {sizes[1]:.2f} MB (fp32 {sizes[0]:.2f} MB, "
                           f"{sizes[0] / sizes[1]:.2f}x smaller)",
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

    loss_ok = -int8["accuracy_delta_pt"] < TARGET_MAX_LOSS_PT
    checks.append({"name": "target_loss_1pt", "status": "PASS" if loss_ok else "FAIL",
                   "text": f"accuracy loss < {TARGET_MAX_LOSS_PT:g} pt on test: {-int8['accuracy_delta_pt'] + 0.0:.2f} "
                           f"pt; {describe_flips(int8['test'])}; max |dlogit| {int8['max_abs_logit_diff']:.3g}",
                   "advice": "" if loss_ok else LOSS_ADVICE[name]})

    b1, bn = (fp32["b1"], int8["b1"]), (fp32["bn"], int8["bn"])
    checks.append({"name": "speed-up", "status": "INFO",
                   "text": f"speed-up (for information): batch 1 x{int8['speedup']:.2f} (median "
                           f"{_num(b1[0]['latency_median_ms'])} -> {_num(b1[1]['latency_median_ms'])} ms), batch "
                           f"{bench_batch_size} throughput x{int8['throughput_ratio']:.2f} "
                           f"({_num(bn[0]['throughput_img_s'])} -> {_num(bn[1]['throughput_img_s'])} img/s)",
                   "advice": "" if int8["speedup"] > 1 else
                   "int8 is not faster here: with small layers the on-the-fly activation quantization costs as "
                   "much as it saves; ONNX Runtime's int8 kernels are usually faster on CPU."})
    return checks


def plot_comparison(result: dict, sizes: dict, title: str, bench_batch_size: int, path, overwrite: bool = False):
    """Four panels (size, batch-1 latency with its p95, throughput, accuracy), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = list(sizes)
    colors = ["tab:blue", "tab:orange", "tab:green"][:len(names)]
    short = {FP32: "fp32", DYNAMIC: "int8 dynamic", SMOOTH: "int8 SmoothQuant"}
    labels = [short.get(n, n) for n in names]
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
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    for ax, (panel_title, unit, values, target, target_label) in zip(axes, panels):
        # latency whiskers go up to the p95, so that the jitter is visible next to the median
        p95 = [result[n]["b1"]["latency_p95_ms"] - v for n, v in zip(names, values)] if "Latency" in panel_title \
            else None
        bars = ax.bar(labels, values, color=colors, yerr=[[0] * len(names), p95] if p95 else None, capsize=6)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values], padding=2,
                     label_type="center" if p95 else "edge")
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--")
            ax.text(len(names) - 0.55, target, target_label, color="tab:red", ha="right", va="bottom", fontsize=8,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
        if unit == "%":
            ax.set_ylim(0, 105)
        else:
            ax.set_ylim(0, max(values + [target or 0] + [v + e for v, e in zip(values, p95 or [0] * len(names))])
                        * 1.18)
        ax.set_title(panel_title)
        ax.set_ylabel(unit)
        ax.set_xlabel("variant")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title)
    fig.legend(handles=[Patch(color=c, label=f"{short.get(n, n)}: {METHODS.get(n, n)}") for n, c in zip(names, colors)]
               + [Line2D([], [], color="tab:red", linestyle="--", label="business objective")],
               loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.14), fontsize=8)
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
    p = ArgumentParser(description="int8 quantization of a fine-tuned checkpoint in PyTorch: the plain "
                                   "torch.ao quantize_dynamic and the SmoothQuant fix; fp32 vs "
                                   "int8 on its saved test split.")
    p.add_argument("--category", default="bottle", help="MVTec AD category the checkpoint was trained on (bottle)")
    p.add_argument("--data-dir", default="./data/mvtec", help="folder holding the category folders (./data/mvtec)")
    p.add_argument("--model-path", default=None, help="fp32 checkpoint to quantize; a bare name is looked for in "
                                                      "--models-dir (default: model_cpu_CATEGORY.pth)")
    p.add_argument("--models-dir", type=output_dir, default="modeles",
                   help="folder of the checkpoints (default: modeles)")
    p.add_argument("--output", type=output_file, default=None, help="plain dynamic int8 checkpoint to write (default: "
                                                  "MODELS_DIR/model_quantized.pth; the fix goes beside it as "
                                                  "model_quantized_smoothquant.pth)")
    p.add_argument("--results-dir", type=output_dir, default="resultats",
                   help="folder of the CSV and the plot (default: resultats)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size of the test-set evaluation (16)")
    p.add_argument("--bench-batch-size", type=positive_int, default=8,
                   help="batch size of the throughput measurement (8)")
    p.add_argument("--seed", type=int, default=42, help="random seed (42)")
    p.add_argument("--num-threads", type=positive_int, default=None,
                   help="PyTorch CPU threads (default: torch's default)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per measurement (5)")
    p.add_argument("--runs", type=positive_int, default=30,
                   help="timed runs per measurement, stopped after 60 s (30)")
    p.add_argument("--engine", default="auto", choices=("auto",) + ENGINES,
                   help="quantized kernels of the plain dynamic int8: auto = x86/fbgemm on Intel/AMD, qnnpack on "
                        "ARM (default: auto)")
    p.add_argument("--per-channel", action="store_true",
                   help="plain dynamic int8: quantize the weights per output channel (finer scales)")
    p.add_argument("--no-smoothquant", action="store_true",
                   help=f"skip the {SMOOTH} variant (the fix; it needs the train and val images)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier outputs instead of keeping them with a timestamp")
    args = p.parse_args(argv)
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0.")
    return args


def load_fp32(args):
    """The fp32 checkpoint (fails fast on a wrong file) and its saved splits: test, and train + val for the fix."""
    src_path = resolve_model_path(args.model_path or f"model_cpu_{args.category}.pth", args.models_dir)
    with quiet_quantization_warnings():
        ckpt = read_checkpoint(src_path, args.category)
    if ckpt.get("quantization"):
        raise UserError(f"{src_path} is already an int8 checkpoint: pass the fp32 one "
                        f"(e.g. --model-path model_cpu_{args.category}.pth).")
    loaders = make_loaders(args.data_dir, args.category, split_from_manifest(ckpt["split"]), ckpt["preprocessing"],
                           args.batch_size, names=("test", "train", "val"), seed=args.seed, augment="none")
    return model_from_checkpoint(ckpt, src_path), ckpt, src_path, loaders


def smooth_int8(fp32_model, loaders, threshold: float):
    """The fix, calibrated on training images and checked on train + val (never test)."""
    train, val = loaders["train"].dataset, loaders["val"].dataset
    if len(train) == 0:
        raise UserError("the saved train split is empty: nothing to calibrate the int8 model on.")
    calibration = torch.stack([train[i][0] for i in range(min(SMOOTH_CALIBRATION_IMAGES, len(train)))])
    agreement = torch.stack([ds[i][0] for ds in (train, val) for i in range(len(ds))])
    qmodel, info = quantize_smooth_int8(fp32_model, calibration, agreement, threshold)
    alphas = ", ".join(f"{a:g}: {rms:.3f}" for a, rms in info["alphas_tried"])
    if len(info["weight_codes_tried"]) > 1:  # a kernel that saturates with full-range weights: +-64 tried too
        alphas += "; best RMS with weights within " + ", ".join(f"+-{c}: {rms:.3f}" for c, rms in
                                                                 info["weight_codes_tried"])
    tried = ", ".join(f"{k} fp32: {a * 100:.1f} %" for k, a in info["tried"])
    exact = "exact" if info["kernel_exact"] else "saturates on rare pairs of large products"
    print(f"{SMOOTH}: kernel {info['kernel']} (engine '{info['engine']}', weights within +-{info['weight_code']}: "
          f"{exact}), calibrated on {info['calibration_images']} train images; SmoothQuant alpha {info['alpha']:g} "
          f"(RMS logit deviation from fp32 on {info['agreement_images']} train+val images: {alphas}); head offset {info['logit_shift']:+.3f} "
          f"(mean on the calibration images); decisions agreeing with fp32 on train+val: {tried} -> "
          f"{len(info['fp32_linears'])} of {info['int8_linears'] + len(info['fp32_linears'])} nn.Linear kept fp32 "
          f"(more fp32 layers than fit under {TARGET_MAX_SIZE_MB:g} MB not tried; {info['seconds']:.0f} s)")
    return qmodel, info


def main(argv=None) -> int:
    args = parse_args(argv)
    set_seed(args.seed)
    threads = set_threads(args.num_threads)
    engine = select_engine(args.engine)
    outputs = {DYNAMIC: Path(args.output or Path(args.models_dir) / OUTPUT_NAMES[DYNAMIC])}
    if not args.no_smoothquant:
        outputs[SMOOTH] = outputs[DYNAMIC].with_name(OUTPUT_NAMES[SMOOTH])

    # 1. the fp32 checkpoint and its saved splits
    fp32_model, ckpt, src_path, loaders = load_fp32(args)
    if any(p.resolve() == src_path.resolve() for p in outputs.values()):
        raise UserError(f"--output would replace the fp32 checkpoint {src_path} it is made from.")
    test_loader = loaders["test"]
    n_params, linear_pct = count_parameters(fp32_model), linear_share(fp32_model) * 100
    threshold = checkpoint_threshold(ckpt)
    print(f"fp32 model: {src_path} ('{ckpt['model_name']}', {n_params / 1e6:.2f} M parameters, "
          f"{linear_pct:.1f} % in nn.Linear), test split: {len(test_loader.dataset)} images; decision threshold on "
          f"P(anomaly) {threshold:.3f} ({ckpt.get('threshold_rule', 'argmax')}), the same for every variant")

    # 2. quantize (the lesson, then the fix), save, reload
    models, quant = {FP32: fp32_model}, {}
    models[DYNAMIC] = quantize_dynamic_int8(fp32_model, engine, args.per_channel)
    quant[DYNAMIC] = quantization_info(engine, args.per_channel)
    print(f"{DYNAMIC}: torch.ao quantize_dynamic, nn.Linear -> int8 ({quant[DYNAMIC]['qscheme']} weights), engine "
          f"'{engine}', {threads} thread(s), {cpu_name()}")
    if SMOOTH in outputs:
        models[SMOOTH], quant[SMOOTH] = smooth_int8(fp32_model, loaders, threshold)
    result = compare_models(models, test_loader, selection_loader(loaders, args.batch_size),
                            bench_batch_size=args.bench_batch_size, warmup=args.warmup,
                            runs=args.runs, threshold=threshold)
    sizes, roundtrip = {}, {}
    example = benchmark_batch(test_loader.dataset, args.bench_batch_size)
    for name, path in outputs.items():
        metrics = {k: result[name][k] for k in ("n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "precision",
                                                "recall", "f1", "auroc", "threshold", "confusion_matrix",
                                                "recall_per_defect")}
        save_quantized_checkpoint(path, models[name], ckpt, quantization=quant[name], metrics=metrics,
                                  extra={"source_checkpoint": src_path.name}, overwrite=args.overwrite)
        sizes[name] = size_on_disk_mb(path)
        reloaded, _ = load_quantized_checkpoint(path, args.category)  # the file must give back the same model
        with torch.inference_mode():
            roundtrip[name] = float((model_logits(models[name], example) - model_logits(reloaded, example))
                                    .abs().max())
        print(f"int8 checkpoint written: {path} ({sizes[name]:.2f} MB); reloaded with weights_only=True, max "
              f"|dlogit| vs the in-memory model: {roundtrip[name]:.3g}")
    sizes = {FP32: size_on_disk_mb(src_path), **sizes}  # every size: the file that ships

    # 3. report
    checks = {name: check_objectives(name, result[FP32], result[name], (sizes[FP32], sizes[name]), n_params=n_params,
                                     linear_pct=linear_pct, model_name=ckpt["model_name"],
                                     bench_batch_size=args.bench_batch_size) for name in outputs}
    rid, rows, environment = run_id(), [], environment_columns()
    for name in models:
        r, is_int8 = result[name], name != FP32
        identity = {"run_id": rid, "script": "quantization_demo.py", "category": args.category, "variant": name,
                    "backend": "pytorch", "precision": "int8" if is_int8 else "fp32", "device": "cpu",
                    "device_name": cpu_name(), "model_name": ckpt["model_name"], "size_mb": sizes[name],
                    "file": str(outputs.get(name, src_path))}
        row = variant_row(identity=identity, metrics=r, b1=r["b1"], bn=r["bn"], reference=rows[0] if rows else None,
                          price_per_hour=CPU_PRICE, environment=environment, graph_columns=False,
                          judged=r["guard"] if is_int8 else None, test=r["test"] if is_int8 else None)
        row.update({"method": METHODS[name], "engine": engine if name == DYNAMIC else "",
                    "qscheme": quant[name]["qscheme"] if is_int8 else "",
                    "roundtrip_max_abs_diff": roundtrip[name] if is_int8 else ""})
        row["guards_passed"] = variant_passes(r["guard"]["passed"] if is_int8 else None)
        if is_int8:
            row.update({c["name"]: c["status"] == "PASS" for c in checks[name] if c["status"] != "INFO"})
        rows.append(row)
    csv_path = append_csv_rows(Path(args.results_dir) / "quantization_results.csv", rows)
    title = (f"fp32 vs int8 in PyTorch - {ckpt['model_name']} on '{args.category}' ({result['n_test']} test images), "
             f"CPU {threads} thread(s)")
    png_path = plot_comparison(result, sizes, title, args.bench_batch_size,
                               Path(args.results_dir) / "quantization_comparison.png", args.overwrite)
    print_summary(rows, result, checks, sizes, args)
    print(f"\nresults appended to {csv_path}; plot: {png_path}; int8 models: "
          + ", ".join(str(p) for p in outputs.values()))
    return 0


def print_summary(rows, result, checks, sizes, args) -> None:
    print()
    print(format_table(rows, ["variant", "size_mb", "latency_median_ms", "latency_p95_ms", "latency_p99_ms",
                              "throughput_img_s", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1", "auroc",
                              "accuracy_delta_pt", "guards_passed", "threads"]))
    print(f"latency: batch 1, ms; throughput: batch {args.bench_batch_size}, images/s; size: checkpoint bytes on "
          f"disk / 10^6; metrics on the saved test split ({result['n_test']} images)")
    for name, name_checks in checks.items():
        r = result[name]
        print(f"\n{name} vs {FP32}: {sizes[FP32] / sizes[name]:.2f}x smaller, batch-1 speed-up x{r['speedup']:.2f}, "
              f"throughput x{r['throughput_ratio']:.2f}, accuracy {_delta(r['accuracy_delta_pt'])} pt, "
              f"F1 {_delta(r['f1_delta_pt'])} pt, AUROC {_delta(r['auroc_delta_pt'])} pt, test agreement "
              f"{r['agreement'] * 100:.1f} %, max |dlogit| {r['max_abs_logit_diff']:.3g}")
        print(f"  guard (decides, {SELECTION_SPLIT}): {describe_guard(r['guard'])}")
        print(f"  image by image on test (reported, no choice reads it): {describe_flips(r['test'])}")
        print("  business objectives:")
        for c in name_checks:
            print(f"    [{c['status']}] {c['text']}")
            if c["advice"]:
                print(f"           {'note' if c['status'] == 'INFO' else 'why / fix'}: {c['advice']}")


if __name__ == "__main__":
    run_cli(main)
