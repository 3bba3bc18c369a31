"""Part 1 of the lab: fine-tune the same Vision Transformer, from the same initial weights, on the CPU and on
the GPU, then compare training time, inference latency / throughput, test metrics and cloud cost.

    python benchmark_gpu.py --category bottle --epochs 3
    python benchmark_gpu.py --devices cpu --model-name offline-vit-tiny --data-dir DIR   # offline demo

Both runs use the same split (saved as modeles/split_<category>.json), the same hyper-parameters and the same
initial weights (a copy of the state_dict taken before the first run). Outputs:
modeles/model_cpu_<category>.pth, modeles/model_gpu_<category>.pth (when a GPU is present),
resultats/benchmark_cpu_gpu.csv (one row per device, appended) and resultats/benchmark_cpu_gpu.png.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch

from lab_io import (ArgumentParser, UserError, append_csv_rows, environment_columns, finite_float, format_table,
                    output_dir, positive_int, run_cli, run_id, save_figure, size_on_disk_mb)
from lab_targets import (CPU_PRICE, CPU_VM, GPU_PRICE, GPU_VM, LAB_EPOCHS, PRICE_NOTE, format_accuracy,
                         measurement_columns)
from load_model_hf import HUB_PRESETS, OFFLINE_PRESETS, load_pretrained, save_checkpoint
from mvtec_dataset import make_loaders, prepare_split, write_manifest
from train_utils import (OFFLINE_DEFAULT_EPOCHS, benchmark_torch_model, class_weights, classification_metrics,
                         default_lr, device_name, linear_probe_init, pick_device, predict_logits, set_seed,
                         set_threads, train_model, training_recipe)

NO_GPU = "no CUDA/MPS GPU found: GPU part not measured"


def parse_args(argv=None):
    p = ArgumentParser(
        description="Fine-tune the same model from the same initial weights on CPU and GPU, then compare training "
                    "time, inference latency/throughput, test metrics and cloud cost.",
        epilog=f"Default prices: CPU = {CPU_VM} at {CPU_PRICE} USD/h, GPU = {GPU_VM} at {GPU_PRICE} USD/h "
               f"({PRICE_NOTE}). Costs = time measured on THIS machine x the VM's hourly price: an estimate.")
    p.add_argument("--category", default="bottle", help="MVTec AD category (default: bottle)")
    p.add_argument("--data-dir", default="./data/mvtec", help="folder holding the category folders "
                   "(default: ./data/mvtec)")
    p.add_argument("--model-name", default="vit-base",
                   help="preset (" + ", ".join([*HUB_PRESETS, *OFFLINE_PRESETS]) + "), hub id or local folder "
                        "(default: vit-base = google/vit-base-patch16-224-in21k)")
    p.add_argument("--devices", default="cpu,gpu",
                   help="comma-separated devices to run: cpu, gpu (= cuda, or mps on Apple), cuda, mps "
                        "(default: cpu,gpu; a missing GPU is then reported as not measured)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"training epochs (default: {LAB_EPOCHS} for a pretrained model, {OFFLINE_DEFAULT_EPOCHS} "
                        "for the random-init offline presets)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="training / evaluation batch size (default: 16)")
    p.add_argument("--lr", type=finite_float, default=None,
                   help="AdamW learning rate of the top block (default: 1e-6 for a pretrained model, with layer-wise "
                        "decay 0.75 below it; 1e-3 for offline presets)")
    p.add_argument("--depth", default="auto",
                   help="pretrained models: transformer blocks to keep, 'auto' = chosen with the linear probe by its "
                        "5-fold cross-validated log-loss on train + val among the upper half of the blocks, "
                        "'full' = all, or a number (default: auto)")
    p.add_argument("--seed", type=int, default=42, help="seed of the split, the initial head and the shuffling "
                   "(default: 42)")
    p.add_argument("--num-threads", type=positive_int, default=None,
                   help="PyTorch CPU threads (default: torch's default)")
    p.add_argument("--bench-batch-size", type=positive_int, default=8, help="batch size of the throughput measurement "
                   "(default: 8); latency is measured at batch 1")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs before each measurement (default: 5)")
    p.add_argument("--runs", type=positive_int, default=30, help="timed runs per measurement (default: 30)")
    p.add_argument("--max-bench-seconds", type=finite_float, default=60.0,
                   help="stop a measurement early after this many seconds, once 5 runs are done (default: 60)")
    p.add_argument("--cpu-price-per-hour", type=finite_float, default=CPU_PRICE,
                   help=f"USD per hour of the CPU machine (default: {CPU_PRICE} = {CPU_VM}; {PRICE_NOTE})")
    p.add_argument("--gpu-price-per-hour", type=finite_float, default=GPU_PRICE,
                   help=f"USD per hour of the GPU machine (default: {GPU_PRICE} = {GPU_VM}; {PRICE_NOTE})")
    p.add_argument("--models-dir", type=output_dir, default="modeles",
                   help="where checkpoints and the split go (default: modeles)")
    p.add_argument("--results-dir", type=output_dir, default="resultats",
                   help="where the CSV and the PNG go (default: resultats)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier checkpoints / plot instead of keeping them with a timestamp")
    args = p.parse_args(argv)
    if args.depth not in ("auto", "full") and not (args.depth.isdigit() and int(args.depth) >= 1):
        raise UserError(f"--depth takes auto, full or a number of blocks >= 1, not {args.depth!r}.")
    if args.warmup < 0 or args.max_bench_seconds <= 0 or (args.lr is not None and args.lr <= 0):
        raise UserError("--warmup must be >= 0, --max-bench-seconds and --lr must be > 0.")
    if args.cpu_price_per_hour < 0 or args.gpu_price_per_hour < 0:
        raise UserError("prices per hour must be >= 0.")
    return args


def resolve_devices(spec: str) -> tuple[dict[str, torch.device], str | None]:
    """{'cpu': device, 'gpu': device} to run, and why the GPU is not measured (None when it is)."""
    wanted = [t.strip().lower() for t in spec.split(",") if t.strip()]
    bad = [t for t in wanted if t not in ("cpu", "gpu", "cuda", "mps")]
    if not wanted or bad:
        raise UserError(f"--devices takes cpu and/or gpu (or cuda, mps), comma-separated; got {spec!r}.")
    devices, gpu_note = {}, "GPU not requested (--devices): not measured"
    if "cpu" in wanted:
        devices["cpu"] = torch.device("cpu")
    for token in wanted:
        if token in ("cuda", "mps"):
            devices["gpu"] = pick_device(token)  # UserError when that backend is absent
        elif token == "gpu":
            device = pick_device("auto")
            if device.type != "cpu":
                devices["gpu"] = device
            elif "cpu" in wanted:
                gpu_note = NO_GPU
            else:
                raise UserError(f"--devices gpu: {NO_GPU.split(':')[0]} here (install the CUDA build of PyTorch "
                                "on a machine with an NVIDIA GPU, or use --devices cpu).")
    if "gpu" in devices:
        gpu_note = None
    return devices, gpu_note


def bench_inputs(dataset, n: int) -> torch.Tensor:
    """The first n real test images (repeated when the test set is smaller) as one batch."""
    images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    return images.repeat((math.ceil(n / len(images)), 1, 1, 1))[:n]


def run_device(role, device, model, initial_state, loaders, args, common, rid) -> dict:
    """Train from the initial weights on `device`, evaluate on the test split, time inference, save the model."""
    name = device_name(device)
    print(f"\n=== {role.upper()}: fine-tuning on {name} ({device.type}) ===")
    # Same starting point for every device: initial weights, shuffling order, augmentation draws.
    set_seed(args.seed)
    loaders["train"].generator.manual_seed(args.seed)
    model.to("cpu").load_state_dict(initial_state)
    recipe = common["recipe"]
    train = train_model(model, loaders["train"], loaders["val"], epochs=args.epochs, lr=args.lr, device=device,
                        loss_weights=common["loss_weights"], layer_decay=recipe["layer_decay"],
                        head_lr_mult=recipe["head_lr_mult"], keep_initial=recipe["keep_initial"], desc=role)
    threshold = train["threshold"]
    logits, labels = predict_logits(model, loaders["test"], device, desc=f"{role} test")
    metrics = classification_metrics(labels, logits, loaders["test"].dataset.defect_types, threshold=threshold)
    print(f"[{role}] test accuracy {format_accuracy(metrics)}, AUROC {metrics['auroc']:.3f}, threshold {threshold:.3f} "
          f"(chosen on val), kept epoch {train['best_epoch']}" + (" (= the linear probe)" if train["best_epoch"] == 0
                                                                   else "")
          + " (the best balanced val accuracy at its val threshold, ties broken by the lower val log-loss)")
    bench = {}
    for key, batch in (("b1", common["inputs"][:1]), ("bn", common["inputs"])):
        bench[key] = benchmark_torch_model(model, batch, device, warmup=args.warmup, runs=args.runs,
                                           max_seconds=args.max_bench_seconds,
                                           desc=f"{role} inference batch {batch.shape[0]}")
    amp = "fp32" if device.type != "cuda" else \
        ("amp-bf16" if torch.cuda.is_bf16_supported() else "amp-fp16")
    train_args = {"script": "benchmark_gpu.py", "device": device.type, "device_name": name, "role": role,
                  "model_name": args.model_name, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                  "seed": args.seed, "threads": torch.get_num_threads(), "train_precision": amp,
                  "data_dir": str(args.data_dir), "history": train["history"], "epoch_seconds": train["epoch_seconds"],
                  "train_seconds": train["train_seconds"], "best_epoch": train["best_epoch"],
                  "recipe": recipe, "linear_probe": common["probe"], "probe_seconds": common["probe"].get("seconds", 0.0)}
    path = Path(args.models_dir) / f"model_{role}_{args.category}.pth"
    save_checkpoint(path, model, model_name=args.model_name, preprocessing=common["preprocessing"],
                    category=args.category, split_manifest=common["manifest"], metrics=metrics,
                    train_args=train_args, extra={"benchmark": bench}, threshold=threshold, overwrite=args.overwrite)
    print(f"[{role}] checkpoint written to {path}")
    price = args.cpu_price_per_hour if role == "cpu" else args.gpu_price_per_hour
    return {**common["row"], "run_id": rid, "variant": f"fine-tuned on {role}", "device": role,
            "torch_device": device.type, "device_name": name, "measured": "yes", "note": "",
            "size_mb": size_on_disk_mb(path),
            **measurement_columns(metrics, bench["b1"], bench["bn"], price_per_hour=price),
            "depth": model.config.num_hidden_layers, "probe_seconds": common["probe"].get("seconds", 0.0),
            "train_precision": amp, "best_epoch": train["best_epoch"], "train_seconds": train["train_seconds"],
            "epoch_seconds_mean": float(np.mean(train["epoch_seconds"])), "price_source": price_source(role, price),
            "training_cost_usd": price * train["train_seconds"] / 3600.0, "checkpoint": str(path)}


def price_source(role: str, price: float) -> str:
    vm, default = (CPU_VM, CPU_PRICE) if role == "cpu" else (GPU_VM, GPU_PRICE)
    return f"{vm}, list price 2024" if price == default else f"--{role}-price-per-hour"


def not_measured_row(common, rid, args, note) -> dict:
    """The GPU row when there is no GPU: settings and price only, every measurement left empty."""
    return {**common["row"], "run_id": rid, "variant": "fine-tuned on gpu", "device": "gpu", "torch_device": "",
            "device_name": "", "measured": "no", "note": note, "batch_size": 1,
            "threads": torch.get_num_threads(), "throughput_batch_size": args.bench_batch_size,
            "price_per_hour": args.gpu_price_per_hour, "price_source": price_source("gpu", args.gpu_price_per_hour)}


def add_speedups(rows: dict) -> None:
    """GPU/CPU ratios on the GPU row when both were measured; the columns always exist (empty otherwise)."""
    for row in rows.values():
        row.update(dict.fromkeys(("gpu_speedup_train", "gpu_speedup_latency_b1", "gpu_speedup_throughput")))
    cpu, gpu = rows.get("cpu"), rows.get("gpu")
    if cpu and gpu and cpu["measured"] == gpu["measured"] == "yes":
        gpu["gpu_speedup_train"] = cpu["train_seconds"] / gpu["train_seconds"]
        gpu["gpu_speedup_latency_b1"] = cpu["latency_median_ms"] / gpu["latency_median_ms"]
        gpu["gpu_speedup_throughput"] = gpu["throughput_img_s"] / cpu["throughput_img_s"]


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _usd(v: float) -> str:
    """Two significant digits without scientific notation: $0.000096, not $9.6e-05."""
    return "$" + np.format_float_positional(v, precision=2, unique=False, fractional=False, trim="-")


def plot(rows: list[dict], path: Path, args, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = args.bench_batch_size
    fig, axes = plt.subplots(1, 4, figsize=(19, 5.2))
    x = np.arange(len(rows))
    names = [f"{r['device'].upper()}\n" + textwrap.fill(r["device_name"] or "not measured", 22) for r in rows]
    colors = ["tab:blue" if r["device"] == "cpu" else "tab:green" for r in rows]
    panels = [("Training time", f"seconds ({args.epochs} epochs, total)", "train_seconds", "gpu_speedup_train"),
              ("Inference latency, batch 1", "ms per image (median; whisker = p95)", "latency_median_ms",
               "gpu_speedup_latency_b1"),
              (f"Inference throughput, batch {n}", "images per second", "throughput_img_s",
               "gpu_speedup_throughput")]

    def mark_missing(ax, i):
        ax.axvspan(i - 0.4, i + 0.4, fill=False, hatch="//", edgecolor="lightgray")
        ax.text(i, 0.5, "not measured", transform=ax.get_xaxis_transform(), ha="center", va="center",
                rotation=90, color="dimgray", fontsize=11)

    for ax, (title, unit, key, speedup) in zip(axes, panels):
        measured = [r["measured"] == "yes" for r in rows]
        values = [r[key] if ok else 0.0 for r, ok in zip(rows, measured)]
        ax.bar(x, values, color=colors, width=0.6)
        tops = values
        if key == "latency_median_ms":  # whisker up to p95; the label goes above it
            tops = [r["latency_p95_ms"] if ok else 0.0 for r, ok in zip(rows, measured)]
            ax.errorbar(x, values, yerr=[[0] * len(rows), np.subtract(tops, values)], fmt="none",
                        ecolor="black", capsize=4)
        for i, (r, v, top) in enumerate(zip(rows, values, tops)):
            if measured[i]:
                label = f"{v:.3g} s\n({r['epoch_seconds_mean']:.3g} s/epoch, {_usd(r['training_cost_usd'])})" \
                    if key == "train_seconds" else _num(v)
                ax.annotate(label, (i, top), xytext=(0, 3), textcoords="offset points", ha="center",
                            va="bottom", fontsize=9)
        gain = next((r[speedup] for r in rows if r[speedup]), None)
        ax.set(title=title + (f" (GPU speedup x{gain:.3g})" if gain else ""), ylabel=unit, xticks=x,
               xticklabels=names)
        ax.margins(y=0.25)
    ax, w = axes[3], 0.38
    for j, (key, label, hatch) in enumerate((("cost_per_1000_images_usd", "batch 1", ""),
                                             ("cost_per_1000_images_batch_usd", f"batch {n}", ".."))):
        values = [r.get(key) if r["measured"] == "yes" else 0.0 for r in rows]
        bars = ax.bar(x + (j - 0.5) * w, values, width=w, color=colors, hatch=hatch, edgecolor="black", label=label)
        ax.bar_label(bars, labels=[_usd(v) if r["measured"] == "yes" else "" for r, v in zip(rows, values)],
                     padding=2, fontsize=8)
    ax.set(title="Cost per 1 000 images", ylabel="USD per 1 000 images", xticks=x, xticklabels=names)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", label="batch 1"),
                       Patch(facecolor="white", edgecolor="black", hatch="..", label=f"batch {n}")],
              title="inference at", loc="upper right", fontsize=8)
    ax.margins(y=0.25)
    for ax in axes:
        for i, r in enumerate(rows):
            if r["measured"] != "yes":
                mark_missing(ax, i)
    prices = ", ".join(f"{r['device'].upper()} {r['price_per_hour']:.3g} USD/h" for r in rows)
    fig.suptitle(f"CPU vs GPU: {args.model_name} fine-tuned on MVTec AD '{args.category}', batch "
                 f"{args.batch_size}, lr {args.lr:g}, {rows[0]['threads']} CPU threads; cost = measured time x "
                 f"price ({prices}; Azure East US list prices 2024)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, overwrite)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    devices, gpu_note = resolve_devices(args.devices)  # fail fast, before loading anything
    threads = set_threads(args.num_threads)
    split, manifest = prepare_split(args.data_dir, args.category, args.seed)
    model, preprocessing, info = load_pretrained(args.model_name, seed=args.seed)
    args.epochs = args.epochs or (LAB_EPOCHS if info["pretrained"] else OFFLINE_DEFAULT_EPOCHS)
    args.lr = args.lr or default_lr(info["pretrained"])
    recipe = training_recipe(info["pretrained"])
    write_manifest(Path(args.models_dir) / f"split_{args.category}.json", manifest, args.overwrite)
    loaders = make_loaders(args.data_dir, args.category, split, preprocessing, batch_size=args.batch_size,
                           seed=args.seed, augment=recipe["augment"])
    # LP of LP-FT, once, before the per-device runs: every device fine-tunes from the same probed weights
    probe = {"applied": False, "reason": "random-init model: trained from scratch"}
    if recipe["probe"]:
        probe = linear_probe_init(model, loaders["train"], loaders["val"], next(iter(devices.values())),
                                  depth=args.depth, desc="probe")
        model.cpu()
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(f"category '{args.category}': train {len(split['train'])}, val {len(split['val'])}, test "
          f"{len(split['test'])} images; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, "
          f"{threads} CPU threads; devices: {', '.join(f'{k}={v}' for k, v in devices.items())}")
    if gpu_note:
        print(gpu_note)

    common = {"preprocessing": preprocessing, "manifest": manifest, "recipe": recipe, "probe": probe,
              "loss_weights": class_weights([s.label for s in split["train"]]),
              "inputs": bench_inputs(loaders["test"].dataset, args.bench_batch_size),
              "row": {"script": "benchmark_gpu.py", "category": args.category, "model_name": args.model_name,
                      "backend": "pytorch", "precision": "fp32", "epochs": args.epochs,
                      "train_batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                      **environment_columns(), "cuda_version": torch.version.cuda or ""}}
    rid = run_id()
    rows = {role: run_device(role, device, model, initial_state, loaders, args, common, rid)
            for role, device in devices.items()}
    if "gpu" not in rows:
        rows["gpu"] = not_measured_row(common, rid, args, gpu_note)
    add_speedups(rows)
    ordered = [rows[k] for k in ("cpu", "gpu") if k in rows]

    results = Path(args.results_dir)
    csv_path = append_csv_rows(results / "benchmark_cpu_gpu.csv", ordered)
    plot(ordered, results / "benchmark_cpu_gpu.png", args, args.overwrite)

    print(f"\nSummary ({args.model_name}, category '{args.category}', test split {ordered[0].get('n_test') or '?'}"
          f" images; inference fp32; empty = not measured):")
    shown = [{**r, "device_name": r["device_name"] or "not measured"} for r in ordered]
    print(format_table(shown, ["device", "device_name", "train_seconds", "epoch_seconds_mean", "latency_median_ms",
                                 "latency_p95_ms", "latency_p99_ms", "throughput_img_s", "accuracy",
                                 "accuracy_ci_low", "accuracy_ci_high", "f1", "auroc", "threshold"]))
    print(f"accuracy with its 95 % Wilson interval; one test image = {ordered[0].get('one_image_pt') or 0:.2f} pt; "
          f"threshold on P(anomaly) chosen on the validation split (best balanced accuracy)")
    print(format_table(shown, ["device", "price_per_hour", "training_cost_usd", "cost_per_1000_images_usd",
                                 "cost_per_1000_images_batch_usd"], floatfmt=".3g"))
    gpu = rows["gpu"]
    if gpu.get("gpu_speedup_train"):
        print(f"GPU/CPU speedup: training x{gpu['gpu_speedup_train']:.2f}, batch-1 latency "
              f"x{gpu['gpu_speedup_latency_b1']:.2f}, throughput at batch {args.bench_batch_size} "
              f"x{gpu['gpu_speedup_throughput']:.2f}")
    else:
        print(f"GPU/CPU speedup: not measured ({gpu['note'] or 'CPU not run'})")
    print(f"throughput = images/s at batch {args.bench_batch_size}; costs = time measured on this machine x hourly "
          f"price ({CPU_VM} / {GPU_VM}, {PRICE_NOTE}): an estimate, this machine is not that VM.")
    print(f"results appended to {csv_path}, plot {results / 'benchmark_cpu_gpu.png'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
