"""Part 3: export the fine-tuned classifier to ONNX and serve it with ONNX Runtime and OpenVINO.

    python onnx_optimization.py --category bottle --model-path model_cpu_bottle.pth

Steps: export with a dynamic batch axis (opset 17, TorchScript exporter; the torch.export-based exporter is
the fallback) and onnx.checker; ONNX Runtime fp32 (ORT_ENABLE_ALL), fp32 after ORT's transformer fusion and
dynamic int8 (QInt8 weights); OpenVINO fp32 and bf16 (where the CPU has it) on the same file, and int8 by NNCF
post-training quantization with the most sensitive layers kept fp32 by a label-free agreement rule
(engines.quantize_openvino_int8).
Every variant's guard compares its decisions with PyTorch fp32's on the saved train + val images, without labels, at
the checkpoint's threshold (lab_targets.judge_selection: fp32 graphs agree on >= 99.5 % of them, int8 / bf16 on
>= 99 %); its test accuracy and flips are measured once and reported, read by no choice. Every variant is timed in
the same run at batch 1 and at --bench-batch-size. lab_targets.choose_deployable picks model_final:
modeles/model_final.onnx or model_final.xml + .bin, with modeles/model_final.json (engine, precision, input,
threshold, sha256) for the Azure scoring script. Kept too: model_fp32.onnx, model_fp32_optimized.onnx,
model_int8.onnx, model_int8_nncf.xml, model_int8_weights.xml.
The hybrid (hybrid.py: the head logit and the patch distances to the train split's good patches, fused, in one
graph) is fitted on train; when it beats the head on val (lab_targets.hybrid_wins) its OpenVINO fp32 / bf16 / NNCF
int8 / int8-weights variants get their own rows (guards against the PyTorch hybrid) and model_final is chosen among
them.
Outputs: resultats/onnx_results.csv (one row per variant), resultats/onnx_comparison.png.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engines import (DEFAULT_OPSET, FILES, export_onnx, mixed_precision_basis, model_size_mb, openvino_variants,
                     optimize_onnx, quantize_onnx_int8, quantize_onnx_int8_mixed, variant_precision,
                     describe_ort_int8_mixed)
from hybrid import HYBRID_CHOICES, HYBRID_HELP, fit_for_mode, guard_mask, hybrid_variants
from inference import (ENGINE_ORT, ENGINE_OV, FINAL_ONNX, Runner, final_path, onnx_opset, ort_threads,
                       runner_job, runner_predict_logits, save_final, write_sidecar)
from lab_io import (ArgumentParser, UserError, append_csv_rows, benchmark_rounds, cpu_flags, cpu_name,
                    environment_columns, finite_float, format_table, output_dir, positive_int, run_cli, run_id,
                    save_figure, size_on_disk_mb)
from lab_targets import (BANK_EXCLUDED, CPU_PRICE, CPU_VM, HYBRID_PREFIX, SELECTION_SPLIT, choose_deployable,
                         compare_logits, describe_flips, describe_guard, format_accuracy, guard_kind,
                         judge_selection, recommend, selection_candidates, variant_passes, variant_row)
from load_model_hf import checkpoint_threshold, load_checkpoint, resolve_model_path
from mvtec_dataset import make_loaders, selection_loader, split_from_manifest
from train_utils import benchmark_batch, classification_metrics, predict_logits, set_threads, torch_job


def plot_comparison(variants: list[dict], path: Path, *, title: str, bench_batch: int, selected: str | None,
                    overwrite: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["variant"] for v in variants]
    palette = {("pytorch", False): "tab:gray", ("onnxruntime", False): "tab:blue", ("onnxruntime", True): "tab:orange",
               ("openvino", False): "tab:cyan", ("openvino", True): "tab:green"}
    colors = [palette[(v["backend"], v["precision"] != "fp32")] for v in variants]
    panels = [
        ("Latency at batch 1 (median, bar = p95)", "ms per image", [v["b1"]["latency_median_ms"] for v in variants],
         [v["b1"]["latency_p95_ms"] - v["b1"]["latency_median_ms"] for v in variants], "{:.1f}".format),
        (f"Throughput at batch {bench_batch}", "images / s", [v["bn"]["throughput_img_s"] for v in variants], None,
         lambda x: f"{x:.0f}" if x >= 100 else f"{x:.3g}"),
        ("Size on disk", "MB (10^6 bytes)", [v["size_mb"] for v in variants], None, "{:.1f}".format),
        ("Accuracy on the saved test split", "accuracy (%)", [100 * v["metrics"]["accuracy"] for v in variants],
         None, "{:.1f}".format),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    label_size = 9 if len(names) <= 10 else 7.5  # a dozen bars with the hybrid's rows: labels must not touch
    for ax, (name, unit, values, err, fmt) in zip(axes.flat, panels):
        bars = ax.bar(names, values, color=colors, yerr=[[0] * len(err), err] if err else None, capsize=4,
                      hatch=[("//" if n.startswith(HYBRID_PREFIX) else "") for n in names])
        for i, (bar, value, v) in enumerate(zip(bars, values, variants)):
            label = fmt(value) + (" *" if v["variant"] == selected else "")
            top = value + (err[i] if err else 0)  # above the p95 whisker
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                        fontsize=label_size, xytext=(0, 2), textcoords="offset points")
        if err and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")  # PyTorch and int8 ORT can differ by orders of magnitude on small models
            unit += ", log scale"
        ax.set_title(name)
        ax.set_ylabel(unit)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")  # each name under its bar
        ax.margins(y=0.15)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="tab:gray", label="PyTorch fp32 (reference)"),
                        Patch(color="tab:blue", label="ONNX Runtime fp32"),
                        Patch(color="tab:orange", label="ONNX Runtime int8 (dynamic)"),
                        Patch(color="tab:cyan", label="OpenVINO fp32"),
                        Patch(color="tab:green", label="OpenVINO bf16 / int8 (NNCF)"),
                        *([Patch(facecolor="white", edgecolor="black", hatch="//",
                                 label="hybrid: head + patch distances")] if any(
                            n.startswith(HYBRID_PREFIX) for n in names) else [])],
               loc="lower center", ncol=6, title="* = saved as modeles/model_final" if selected else None)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    saved = save_figure(fig, path, overwrite)
    plt.close(fig)
    return saved


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def result_rows(variants, *, args, rid, ckpt, ckpt_path, export_info, threads_torch, load, models_dir) -> list[dict]:
    """One row per variant (lab_targets.RESULT_COLUMNS); the recommendation and model_final use lab_targets' rules."""
    reference, rows, environment = None, [], environment_columns()
    graphs = {v["variant"]: v for v in variants}
    for v in variants:
        judged = v.get("judged")
        # an ONNX variant is also judged by the conversion of the fp32 graph it runs or was quantized from (as in
        # the pipeline): int8 comes from model_fp32.onnx
        prefix = HYBRID_PREFIX if v["variant"].startswith(HYBRID_PREFIX) else ""  # its own fp32 graph
        graph = v if v["precision"] == "fp32" else \
            graphs.get(prefix + ("ov-fp32" if v["backend"] == ENGINE_OV else "ort-fp32"))
        conversion = graph.get("judged") if v["backend"] != "pytorch" and graph else None
        identity = {"run_id": rid, "script": "onnx_optimization.py", "category": args.category,
                    "variant": v["variant"], "backend": v["backend"], "precision": v["precision"], "device": "cpu",
                    "device_name": cpu_name(), "model_name": ckpt["model_name"], "size_mb": v["size_mb"],
                    "file": v["file"]}
        row = variant_row(identity=identity, metrics=v["metrics"], b1=v["b1"], bn=v["bn"], reference=reference,
                          price_per_hour=args.price_per_hour, environment=environment, judged=judged,
                          test=v.get("test"),
                          conversion=(conversion, graph["test"], Path(graph["file"]).name) if conversion else None)
        row.update({"cpu_load_1min": load,
                    "exporter": export_info["exporter"] if v["backend"] == "onnxruntime" else "",
                    "opset": v.get("opset", ""), "fused_ops": v.get("fused", ""), "source_checkpoint": str(ckpt_path),
                    "torch_threads": threads_torch,
                    "flips_vs_classifier": v["vs_classifier"]["flips"] if "vs_classifier" in v else "",
                    "bank_mb": v.get("bank_mb", "")})
        reference = reference or row
        row["guards_passed"] = variant_passes(judged["passed"] if judged else None,
                                              conversion["passed"] if conversion else None)
        rows.append(row)
    candidates = selection_candidates(rows)
    best, final = recommend(candidates), choose_deployable(candidates)
    for row in rows:
        row["recommended"] = row is best
        row["deployed_as"] = str(final_path(row["file"], models_dir)) if row is final else ""
    return rows


def parse_args(argv=None):
    parser = ArgumentParser(description="Export the fine-tuned model to ONNX, optimise it for ONNX Runtime "
                                        "(fp32, transformer fusion, dynamic int8), check parity with PyTorch "
                                        "on the saved test split, benchmark, save modeles/model_final.onnx.")
    parser.add_argument("--category", default="bottle", help="MVTec AD category of the checkpoint (default: bottle)")
    parser.add_argument("--data-dir", default="./data/mvtec", help="folder holding the category folders "
                        "(default: ./data/mvtec)")
    parser.add_argument("--model-path", default=None,
                        help="checkpoint to export; a bare name is looked for in --models-dir "
                             "(default: model_cpu_<category>.pth)")
    parser.add_argument("--models-dir", type=output_dir, default="modeles",
                        help="where checkpoints are read and ONNX files written (default: modeles)")
    parser.add_argument("--results-dir", type=output_dir, default="resultats",
                        help="where the CSV and the plot go (default: resultats)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="batch size of the test-split evaluation (16)")
    parser.add_argument("--bench-batch-size", type=positive_int, default=8,
                        help="the larger batch of the benchmark, next to batch 1 (default: 8)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset of the export (default: {DEFAULT_OPSET}, TorchScript exporter; the "
                             f"fallback exporter needs >= 18 and uses max(opset, 18))")
    parser.add_argument("--num-threads", type=positive_int, default=None,
                        help="intra-op threads of ONNX Runtime and PyTorch (default: ORT uses the physical cores, "
                             "PyTorch its own default; both recorded)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per measurement (default: 5)")
    parser.add_argument("--runs", type=positive_int, default=30, help="timed runs per measurement (default: 30)")
    parser.add_argument("--max-bench-seconds", "--max-seconds", dest="max_seconds", type=finite_float, default=60.0,
                        metavar="SECONDS",
                        help="stop a measurement's timed runs after this many seconds, >= 5 runs (default: 60; "
                             "--max-seconds is the older name)")
    parser.add_argument("--price-per-hour", type=finite_float, default=CPU_PRICE,
                        help=f"price of the serving machine in USD/h for the cost per 1000 images (default: {CPU_PRICE} "
                             f"= {CPU_VM}, pay-as-you-go Linux list price 2024)")
    parser.add_argument("--no-fusion", action="store_true", help="skip ORT's transformer fusion variant")
    parser.add_argument("--no-int8", action="store_true", help="skip the dynamic int8 variant")
    parser.add_argument("--no-openvino", action="store_true",
                        help="skip the OpenVINO variants (fp32, bf16 where the CPU has it, NNCF int8)")
    parser.add_argument("--calibration-images", type=positive_int, default=128,
                        help="training images that calibrate NNCF's int8 quantization (default: 128)")
    parser.add_argument("--hybrid", choices=HYBRID_CHOICES, default="auto", help=HYBRID_HELP)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier ONNX files, sidecar and plot instead of keeping them with a timestamp")
    args = parser.parse_args(argv)

    if args.warmup < 0 or args.max_seconds <= 0:
        raise UserError("--warmup must be >= 0 and --max-bench-seconds > 0.")
    if not 7 <= args.opset <= 23:
        raise UserError(f"--opset {args.opset} is not a valid ONNX opset for this export (use 17, or 18-23).")
    if args.price_per_hour <= 0:
        raise UserError("--price-per-hour must be > 0.")
    args.model_path = args.model_path or f"model_cpu_{args.category}.pth"
    return args


def load_inputs(args) -> dict:
    """The checkpoint, its saved split (test, train, val loaders) and the fp32 decisions on train + val, computed
    once: every guard and both mixed-precision rules compare with them."""
    model, ckpt = load_checkpoint(args.model_path, args.category, args.models_dir)
    loaders = make_loaders(args.data_dir, args.category, split_from_manifest(ckpt["split"]), ckpt["preprocessing"],
                           args.batch_size, names=("test", "train", "val"), augment="none")
    selection = selection_loader(loaders, args.batch_size)
    ref_selection, _ = predict_logits(model, selection, "cpu", desc=f"PyTorch fp32 {SELECTION_SPLIT}")
    return {"model": model, "ckpt": ckpt, "ckpt_path": resolve_model_path(args.model_path, args.models_dir),
            "loaders": loaders, "selection": selection, "ref_selection": ref_selection,
            "threshold": checkpoint_threshold(ckpt), "train_val": {n: loaders[n].dataset for n in ("train", "val")}}


def build_variants(args, inputs: dict, threads_ort: int | None) -> tuple[dict, dict, dict]:
    """1. The files: plain export, fused graph, ORT int8 (dynamic, mixed), OpenVINO fp32 / bf16 / NNCF int8.
    Returns (export info, fusion info, {variant: (file, engine, OpenVINO precision hint)})."""
    model, models_dir, threshold = inputs["model"], Path(args.models_dir), inputs["threshold"]
    export_info = export_onnx(model, models_dir / FILES["ort-fp32"], inputs["ckpt"]["preprocessing"], args.opset,
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
    # the train + val images and one ranking of the layers: the mixed precision of ORT and OpenVINO int8
    train_val = inputs["train_val"]
    basis = None if args.no_int8 and args.no_openvino else \
        mixed_precision_basis(files["ort-fp32"], model, train_val, threshold, inputs["ref_selection"])
    if not args.no_int8:
        # int8 of the plain export: measured fastest on AVX2 (quantizing the fused graph was not faster).
        quantize_onnx_int8(files["ort-fp32"], models_dir / FILES["ort-int8-dynamic"], overwrite=args.overwrite)
        files["ort-int8-dynamic"] = models_dir / FILES["ort-int8-dynamic"]
        print(f"dynamic int8 (QInt8 weights) -> {files['ort-int8-dynamic']}")
        files["ort-int8-mixed"] = models_dir / FILES["ort-int8-mixed"]
        mixed = quantize_onnx_int8_mixed(model, files["ort-int8-mixed"], train_val, threshold,
                                         inputs["ckpt"]["preprocessing"], opset=args.opset, overwrite=args.overwrite,
                                         runner_threads=threads_ort, basis=basis)
        print(f"dynamic int8, SmoothQuant + mixed precision: {describe_ort_int8_mixed(mixed)} -> "
              f"{files['ort-int8-mixed']}")
    specs = {name: (path, ENGINE_ORT, "f32") for name, path in files.items()}
    if not args.no_openvino:
        specs.update(openvino_variants(files["ort-fp32"], models_dir, model, train_val, threshold,
                                       args.calibration_images, args.overwrite, basis=basis))
    return export_info, fusion, specs


def _judge(specs: dict, reference: dict, inputs: dict, fusion: dict, threads_ort, runners: dict) -> list[dict]:
    """The variants of `specs` judged against `reference` ({"name", "selection": logits on train + val, "test": logits,
    "labels"}): guard on train + val (no label), report on test."""
    threshold, selection, loader = inputs["threshold"], inputs["selection"], inputs["loaders"]["test"]
    variants = []
    for name, (path, engine, precision) in specs.items():
        runners[name] = Runner(path, engine, threads_ort, precision)
        chosen_on, _ = runner_predict_logits(runners[name], selection, desc=f"{name} {SELECTION_SPLIT}")
        logits, _ = runner_predict_logits(runners[name], loader, desc=f"{name} test")
        variants.append({"variant": name, "backend": engine, "precision": variant_precision(name, runners[name]),
                         "file": str(path), "size_mb": model_size_mb(path), "logits": logits,
                         "opset": onnx_opset(path) if Path(path).suffix == ".onnx" else "",
                         "judged": judge_selection(guard_kind(name), reference["selection"], chosen_on,
                                                   threshold=threshold, reference=reference["name"],
                                                   mask=reference.get("mask")),
                         "test": compare_logits(reference["test"], logits, reference["labels"], threshold=threshold),
                         "fused": ";".join(f"{k}={n}" for k, n in fusion["fused"].items())
                         if name == "ort-fp32-optimized" else ""})
    return variants


def build_hybrid(args, inputs: dict) -> dict | None:
    """The hybrid (hybrid.fit_hybrid on train, chosen on val) and, when used, its one-graph variants."""
    if args.hybrid == "off":
        return None
    if args.no_openvino:
        print("note: the hybrid classifier was not fitted: its variants run in OpenVINO (--no-openvino)")
        return None
    model, info = fit_for_mode(inputs["model"], inputs["train_val"], inputs["threshold"], args.hybrid,
                               batch_size=args.batch_size)
    if model is None:
        return None
    export, specs = hybrid_variants(model, args.models_dir, inputs["train_val"], info, inputs["threshold"],
                                    inputs["ckpt"]["preprocessing"], args.opset, args.calibration_images,
                                    args.overwrite)
    return {"model": model, "info": info, "specs": specs, "export": export}


def judge_variants(inputs: dict, specs: dict, fusion: dict, threads_ort: int | None,
                   hybrid: dict | None = None) -> tuple[list[dict], dict]:
    """2. Decisions on train + val (the guards, no label) and on the whole test split (the report), PyTorch fp32 as
    the reference; the hybrid's variants against the PyTorch hybrid, their flips vs the classifier reported too.
    Returns (variants, {variant: its Runner})."""
    model, threshold, loader = inputs["model"], inputs["threshold"], inputs["loaders"]["test"]
    print(f"decision threshold on P(anomaly): {threshold:.3f} ({inputs['ckpt'].get('threshold_rule', 'argmax')}), "
          f"the same for every variant")
    ref_logits, labels = predict_logits(model, loader, "cpu", desc="PyTorch fp32 test")
    variants = [{"variant": "pytorch-fp32", "backend": "pytorch", "precision": "fp32", "file": str(inputs["ckpt_path"]),
                 "size_mb": size_on_disk_mb(inputs["ckpt_path"]), "logits": ref_logits, "judged": None, "test": None}]
    runners = {}
    plain = {"name": "pytorch-fp32", "selection": inputs["ref_selection"], "test": ref_logits, "labels": labels}
    variants += _judge(specs, plain, inputs, fusion, threads_ort, runners)
    if hybrid is not None:
        reference = {"name": "pytorch-hybrid-fp32", "labels": labels,
                     "mask": guard_mask(hybrid["info"], *(len(inputs["train_val"][n]) for n in ("train", "val"))),
                     "selection": predict_logits(hybrid["model"], inputs["selection"], "cpu",
                                                 desc=f"PyTorch hybrid {SELECTION_SPLIT}")[0],
                     "test": predict_logits(hybrid["model"], loader, "cpu", desc="PyTorch hybrid test")[0]}
        for v in _judge(hybrid["specs"], reference, inputs, fusion, threads_ort, runners):
            v["vs_classifier"] = compare_logits(ref_logits, v["logits"], labels, threshold=threshold)
            v["bank_mb"] = hybrid["info"]["bank_mb"]
            variants.append(v)
    for v in variants:
        v["metrics"] = classification_metrics(labels, v["logits"], loader.dataset.defect_types, threshold=threshold)
        v["labels"] = labels
    return variants, runners


def time_variants(args, inputs: dict, variants: list[dict], runners: dict) -> float | None:
    """3. Latency, same run, same input images (numpy prepared once), at batch 1 and --bench-batch-size. Returns the
    1-min load average before timing (None where the OS has none)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and load > 1.5 * (os.cpu_count() or 1):  # this script alone stays near 1x
        print(f"note: the CPU is busy (load average {load:.1f} on {os.cpu_count()} CPUs): timings will be slower "
              f"and noisier than on an idle machine.")
    dataset = inputs["loaders"]["test"].dataset
    bench = dict(warmup=args.warmup, runs=args.runs, max_seconds=args.max_seconds)
    for key, n in (("b1", 1), ("bn", args.bench_batch_size)):
        x = benchmark_batch(dataset, n).numpy().astype(np.float32)
        jobs = {v["variant"]: torch_job(inputs["model"], torch.from_numpy(x), "cpu") if v["backend"] == "pytorch"
                else runner_job(runners[v["variant"]], x) for v in variants}
        timed = benchmark_rounds(jobs, desc=f"timing {len(jobs)} variants at batch {n}", **bench)
        for v in variants:
            v[key] = timed[v["variant"]]
    return load


def print_summary(args, inputs: dict, variants: list[dict], rows: list[dict]) -> None:
    labels, threshold = variants[0]["labels"], inputs["threshold"]
    print()
    print(format_table(rows, ["variant", "size_mb", "latency_median_ms", "latency_p95_ms", "throughput_img_s",
                              "accuracy", "guard_agreement", "guard_passed", "agreement", "flips",
                              "max_abs_logit_diff", "cost_per_1000_images_usd", "cost_reduction_pct",
                              "recommended"]))
    print(f"latency: batch 1, ms; throughput: batch {args.bench_batch_size}, images/s; cost: USD per 1000 images at "
          f"batch 1 ({args.price_per_hour} USD/h); CPU {cpu_name()} [{cpu_flags() or 'flags unknown'}]")
    print(f"accuracy of PyTorch fp32 on the {len(labels)} test images: {format_accuracy(variants[0]['metrics'])} "
          f"(threshold {threshold:.3f}); one image = {100 / max(1, len(labels)):.2f} pt")
    print(f"guard (lab_targets.judge_selection, it alone decides what may be recommended or deployed): decisions "
          f"vs PyTorch fp32 on the {len(inputs['ref_selection'])} {SELECTION_SPLIT} images, no label; test "
          f"(agreement, flips) is measured once and reported, no choice reads it")
    if any("vs_classifier" in v for v in variants):
        print(f"hybrid-* variants: guard vs the PyTorch hybrid on the {SELECTION_SPLIT} images but its bank's "
              f"({SELECTION_SPLIT}{BANK_EXCLUDED}), test differences vs the PyTorch hybrid, then vs the plain "
              f"classifier")
    for v in variants[1:]:
        t = v["test"]
        print(f"  {v['variant']:<20} {describe_guard(v['judged'])}; test: accuracy {format_accuracy(v['metrics'])}, "
              f"difference {t['accuracy_diff_pt']:+.2f} pt; {describe_flips(t)}; max |logit diff| "
              f"{t['max_abs_logit_diff']:.3g}" + (f"; vs the plain classifier: {describe_flips(v['vs_classifier'])}"
                                                   if "vs_classifier" in v else ""))


def deploy_final(args, inputs: dict, final: dict, reference: dict, specs: dict, export_info: dict,
                 hybrid: dict | None) -> None:
    """model_final.* + its sidecar (engine, precision, input, threshold, guard, sha256; a hybrid's map grid) for
    score.py."""
    ckpt = inputs["ckpt"]
    map_grid = hybrid["model"].grid(ckpt["preprocessing"]["image_size"]) \
        if hybrid and final["variant"].startswith(HYBRID_PREFIX) else None
    final_path = save_final(final["file"], Path(args.models_dir), args.overwrite)
    sidecar = write_sidecar(final_path, variant=final["variant"], category=args.category,
                            preprocessing=ckpt["preprocessing"], exporter=export_info["exporter"],
                            source_checkpoint=inputs["ckpt_path"], base_model=ckpt["model_name"],
                            parity_result={**final["judged"], "test": final["test"]}, metrics=final["metrics"],
                            threshold=inputs["threshold"], engine=final["backend"],
                            precision_hint=specs[final["variant"]][2], overwrite=args.overwrite,
                            map_grid=map_grid, map_reference=hybrid["info"]["map_reference"] if map_grid else None)
    print(f"saved {final_path} = {final['variant']} (lab_targets.choose_deployable: the recommended variant, or the "
          f"servable one lab_targets.recommend prefers; {final['b1']['latency_median_ms']:.1f} ms vs "
          f"{reference['b1']['latency_median_ms']:.1f} ms for PyTorch fp32); sidecar "
          f"{final_path.with_suffix('.json')} (sha256 {sidecar['sha256'][:12]}...)")


def main(argv=None) -> int:
    args = parse_args(argv)
    threads_torch = set_threads(args.num_threads)
    threads_ort = ort_threads(args.num_threads)
    inputs = load_inputs(args)
    ckpt = inputs["ckpt"]
    print(f"checkpoint {inputs['ckpt_path']} ({ckpt['model_name']}, {ckpt['model_type']}), category "
          f"'{args.category}', test split {len(inputs['loaders']['test'].dataset)} images; threads: ORT "
          f"{threads_ort or 'ORT default'}, torch {threads_torch}")
    export_info, fusion, specs = build_variants(args, inputs, threads_ort)
    hybrid = build_hybrid(args, inputs)
    variants, runners = judge_variants(inputs, specs, fusion, threads_ort, hybrid)
    load = time_variants(args, inputs, variants, runners)

    # 4. Rows, the rules of lab_targets (recommend, choose_deployable), save, report
    rid = run_id()
    rows = result_rows(variants, args=args, rid=rid, ckpt=ckpt, ckpt_path=inputs["ckpt_path"],
                       export_info=export_info, threads_torch=threads_torch, load=load,
                       models_dir=Path(args.models_dir))
    final = next((v for v, r in zip(variants, rows) if r["deployed_as"]), None)
    results_dir = Path(args.results_dir)
    csv_path = append_csv_rows(results_dir / "onnx_results.csv", rows)
    png = plot_comparison(variants, results_dir / "onnx_comparison.png", bench_batch=args.bench_batch_size,
                          selected=final["variant"] if final else None, overwrite=args.overwrite,
                          title=f"PyTorch vs ONNX Runtime on CPU - {args.category}, {ckpt['model_name']} "
                                f"({cpu_name()}, ORT threads {threads_ort or 'default'})")
    print_summary(args, inputs, variants, rows)
    print(f"results appended to {csv_path} (run_id {rid}), plot {png}")
    if final is None:
        print(f"error: no ONNX variant passed its guard: {FINAL_ONNX} was not written "
              f"(see the guard lines above and {csv_path}).")
        return 1
    deploy_final(args, inputs, final, variants[0], {**specs, **(hybrid["specs"] if hybrid else {})}, export_info,
                 hybrid)
    return 0


if __name__ == "__main__":
    run_cli(main)
