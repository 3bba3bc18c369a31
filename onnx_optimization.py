"""Part 3: export the fine-tuned classifier to ONNX and serve it with ONNX Runtime and OpenVINO.

    python onnx_optimization.py --category bottle --model-path model_cpu_bottle.pth

Steps: export with a dynamic batch axis (opset 17, TorchScript exporter; the torch.export-based exporter is
the fallback) and onnx.checker; ONNX Runtime fp32 (ORT_ENABLE_ALL), fp32 after ORT's transformer fusion and
dynamic int8 (QInt8 weights); OpenVINO fp32 and bf16 (where the CPU has it) on the same file, and int8 by NNCF
post-training quantization with the most sensitive layers kept fp32 by a label-free agreement rule
(quantize_openvino_int8).
Every variant's guard compares its decisions with PyTorch fp32's on the saved train + val images, without labels, at
the checkpoint's threshold (lab_targets.judge_selection: fp32 graphs agree on >= 99.5 % of them, int8 / bf16 on
>= 99 %); its test accuracy and flips are measured once and reported, read by no choice. Every variant is timed in
the same run at batch 1 and at --bench-batch-size. lab_targets.choose_deployable picks model_final:
modeles/model_final.onnx or model_final.xml + .bin, with modeles/model_final.json (engine, precision, input,
threshold, sha256) for the Azure scoring script. Kept too: model_fp32.onnx, model_fp32_optimized.onnx,
model_int8.onnx, model_int8_nncf.xml.
Outputs: resultats/onnx_results.csv (one row per variant), resultats/onnx_comparison.png.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from inference import (ENGINE_ORT, ENGINE_OV, FINAL_ONNX, INPUT_NAME, OUTPUT_NAME, Runner, benchmark_runner,
                       cpu_supports, final_path, make_session, onnx_opset, ort_threads, runner_predict_logits,
                       save_final, write_sidecar)
from lab_io import (ArgumentParser, UserError, append_csv_rows, atomic_write, cpu_flags, cpu_name,
                    environment_columns, format_table, keep_previous, positive_int, run_cli, run_id, save_figure,
                    size_on_disk_mb)
from lab_targets import (CPU_PRICE, CPU_VM, SELECTION_SPLIT, choose_deployable, compare_logits, describe_flips,
                         describe_guard, format_accuracy, guard_columns, guard_kind, judge_selection,
                         measured_columns, predict_labels, recommend, variant_passes)
from load_model_hf import checkpoint_threshold, load_checkpoint, resolve_model_path
from mvtec_dataset import make_loaders, selection_loader, split_from_manifest
from quantize import choose_fp32_layers
from train_utils import benchmark_torch_model, classification_metrics, model_logits, predict_logits, set_threads

DEFAULT_OPSET = 17
FILES = {"ort-fp32": "model_fp32.onnx", "ort-fp32-optimized": "model_fp32_optimized.onnx",
         "ort-int8-dynamic": "model_int8.onnx", "ort-int8-mixed": "model_int8_mixed.onnx",
         "ov-int8-nncf": "model_int8_nncf.xml"}


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


def onnx_linear_nodes(path: str | Path) -> dict[str, list[str]]:
    """{PyTorch nn.Linear name: names of its MatMul/Gemm nodes} in a TorchScript export of this lab (node
    '/model/dinov2/encoder/layer.2/mlp/fc2/MatMul' <- module 'dinov2.encoder.layer.2.mlp.fc2')."""
    import onnx

    nodes: dict[str, list[str]] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.name.startswith("/model/"):
            nodes.setdefault(".".join(node.name[len("/model/"):].split("/")[:-1]), []).append(node.name)
    return nodes


def ranked_linear_nodes(src: Path, model, train) -> tuple[list[str], dict[str, list[str]]]:
    """The backbone nn.Linear layers of `model`, most sensitive to int8 first (quantize.linear_sensitivity with one
    activation scale per tensor, as ORT's dynamic and NNCF's static int8 quantize, on training images; no label),
    and {layer: its MatMul/Gemm node names in the ONNX file `src`}. A layer that matches no node is an error, not a
    silent int8."""
    from quantize import SMOOTH_CALIBRATION_IMAGES, backbone_linears, dynamic_int8_linear, linear_sensitivity

    if len(train) == 0:
        raise UserError("no training image to rank the layers for the mixed-precision int8.")
    names = backbone_linears(model)
    nodes = onnx_linear_nodes(src)
    unmatched = [n for n in names if n not in nodes]
    if unmatched:
        raise UserError(f"{src}: {len(unmatched)} nn.Linear layer(s) have no MatMul node in the graph (e.g. "
                        f"{unmatched[0]}): the exporter's node names changed, mixed precision cannot be applied.")
    calibration = torch.stack([train[i][0] for i in range(min(SMOOTH_CALIBRATION_IMAGES, len(train)))])
    sensitivity = linear_sensitivity(model, calibration, names, dynamic_int8_linear)
    return sorted(names, key=lambda n: -sensitivity[n]), nodes


def agreement_images(model, datasets: dict, threshold: float,
                     reference_logits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train + val images as one float32 array, the fp32 model's decisions on them at `threshold`): what every
    mixed-precision candidate is compared with (no label). `reference_logits`: the fp32 logits of these images in
    this order (the guard's, mvtec_dataset.selection_loader) when the caller has them already."""
    images = np.stack([ds[i][0].numpy() for ds in (datasets["train"], datasets["val"]) for i in range(len(ds))])
    if reference_logits is None:
        with torch.inference_mode():
            reference_logits = np.concatenate([model_logits(model.eval(), torch.from_numpy(images[i:i + 16]))
                                               .float().numpy() for i in range(0, len(images), 16)])
    if len(reference_logits) != len(images):
        raise ValueError(f"{len(reference_logits)} reference logits for {len(images)} train + val images")
    return images, predict_labels(reference_logits, threshold)


def mixed_precision_basis(src: Path, model, datasets: dict, threshold: float,
                          reference_logits: np.ndarray | None = None) -> dict:
    """What the ORT and OpenVINO mixed precision both start from, computed once: the ranked layers and their nodes
    (ranked_linear_nodes), the train + val images and the fp32 decisions on them (agreement_images)."""
    order, nodes = ranked_linear_nodes(src, model, datasets["train"])
    images, reference = agreement_images(model, datasets, threshold, reference_logits)
    return {"order": order, "nodes": nodes, "images": images, "reference": reference}


def quantize_onnx_int8_mixed(src: Path, dst: Path, model, datasets: dict, threshold: float, *,
                             overwrite: bool = False, runner_threads: int | None = None,
                             basis: dict | None = None) -> dict:
    """ONNX Runtime dynamic int8 with the most sensitive nn.Linear kept fp32 (nodes_to_exclude), layers ranked by
    ranked_linear_nodes and chosen by quantize.choose_fp32_layers (agreement with fp32 on train + val, never the test
    split). `basis`: mixed_precision_basis(...) when the caller already has it.
    Decisions are taken one image per call: ORT's dynamic int8 takes one activation scale per batch tensor."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lab_targets import TARGET_MAX_SIZE_MB

    t0 = time.perf_counter()
    basis = basis or mixed_precision_basis(src, model, datasets, threshold)
    order, nodes, images, reference = (basis[k] for k in ("order", "nodes", "images", "reference"))
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-mixed-") as tmp:
        def candidate(fp32_layers):
            path = Path(tmp) / f"k{len(fp32_layers)}.onnx"
            with _quiet_logs():
                quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8,
                                 nodes_to_exclude=[x for n in fp32_layers for x in nodes[n]],
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            if fp32_layers and model_size_mb(path) >= TARGET_MAX_SIZE_MB:
                return None
            runner = Runner(path, ENGINE_ORT, runner_threads)
            return predict_labels(np.concatenate([runner.run(images[i:i + 1]) for i in range(len(images))]),
                                  threshold), path

        best, tried = choose_fp32_layers(order, reference, candidate)

        def write(tmp_dst: Path) -> None:
            shutil.copyfile(best[2], tmp_dst)
            onnx.checker.check_model(str(tmp_dst))
            keep_previous(dst, overwrite)

        atomic_write(dst, write)
    return {"fp32_linears": order[:best[0]], "agreement": best[1], "agreement_images": len(images),
            "tried": tried, "seconds": time.perf_counter() - t0}


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
# OpenVINO: the same ONNX file in fp32 / bf16, and int8 by NNCF post-training quantization
# --------------------------------------------------------------------------------------------------
def openvino_variants(fp32_onnx: Path, models_dir: Path, model, datasets: dict, threshold: float,
                      n_calibration: int, overwrite: bool, prefix: str = "model_", basis: dict | None = None) -> dict:
    """{variant: (file, engine, precision hint)}: OpenVINO fp32 on the exported ONNX file, bf16 where the CPU has
    it, and NNCF int8 (quantize_openvino_int8; rest f32 and, where the CPU has it, bf16). `model`: the PyTorch fp32
    model the file was exported from; `datasets`: its "train" and "val" datasets (no augmentation)."""
    bf16 = cpu_supports("bf16")
    out = {"ov-fp32": (fp32_onnx, ENGINE_OV, "f32")}
    if bf16:
        out["ov-bf16"] = (fp32_onnx, ENGINE_OV, "bf16")
    xml = models_dir / FILES["ov-int8-nncf"].replace("model_", prefix, 1)
    info = quantize_openvino_int8(fp32_onnx, xml, model, datasets, threshold, n_calibration, overwrite=overwrite,
                                  basis=basis)
    tried = ", ".join(f"{n} fp32: {a * 100:.1f} %" for n, a in info["tried"])
    print(f"OpenVINO int8 (NNCF post-training quantization, ModelType.TRANSFORMER, {info['calibration']} training "
          f"images for calibration): decisions agreeing with fp32 on {info['agreement_images']} train+val images "
          f"{tried} -> {len(info['fp32_linears'])} nn.Linear kept fp32 ({info['seconds']:.0f} s) -> {xml} (+ .bin); "
          f"bf16 on this CPU: {'yes' if bf16 else 'no'}")
    out["ov-int8-nncf"] = (xml, ENGINE_OV, "f32")
    if bf16:
        out["ov-int8-nncf-bf16"] = (xml, ENGINE_OV, "bf16")
    return out


def quantize_openvino_int8(src: Path, dst_xml: Path, model, datasets: dict, threshold: float, n_calibration: int,
                           *, overwrite: bool = False, basis: dict | None = None) -> dict:
    """NNCF post-training int8 of an ONNX file read by OpenVINO, calibrated on the first `n_calibration` training
    images, saved as OpenVINO IR (dst .xml + .bin, fp32 weights where not int8).

    Mixed precision by the label-free rule of the ORT int8 (mixed_precision_basis, quantize.choose_fp32_layers): the
    most sensitive nn.Linear layers are left out of NNCF's quantization (an IgnoredScope of their node names, checked by
    NNCF) until the decisions agree with the fp32 model's on train + val; never the test split. On real MVTec screw
    (DINOv2-S, 8 blocks) the most sensitive layers are the MLP output projections (fc2, whose inputs follow a GELU):
    keeping the last blocks fp32 instead left the agreement at 95.6-95.8 %."""
    import tempfile

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" when nncf loads
    import nncf
    import openvino as ov

    from lab_targets import TARGET_MAX_SIZE_MB

    nncf.set_log_level(logging.ERROR)  # its per-layer INFO lines; the progress bars stay
    if len(datasets["train"]) == 0:
        raise UserError("no training image to calibrate the int8 quantization.")
    t0 = time.perf_counter()
    calibration = [datasets["train"][i][0].numpy()[None] for i in range(min(n_calibration, len(datasets["train"])))]
    basis = basis or mixed_precision_basis(src, model, datasets, threshold)
    order, nodes, images, reference = (basis[k] for k in ("order", "nodes", "images", "reference"))
    with tempfile.TemporaryDirectory(dir=dst_xml.parent, prefix=".int8-nncf-") as tmp:
        def candidate(fp32_layers):
            scope = nncf.IgnoredScope(names=[x for n in fp32_layers for x in nodes[n]]) if fp32_layers else None
            with _quiet_logs():
                quantized = nncf.quantize(ov.Core().read_model(str(src)), nncf.Dataset(calibration),
                                          subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                          ignored_scope=scope)
            if fp32_layers:  # the size of the IR as it would be saved (fp32 weights stay fp32)
                probe = Path(tmp) / f"k{len(fp32_layers)}.xml"
                ov.save_model(quantized, str(probe), compress_to_fp16=False)
                if model_size_mb(probe) >= TARGET_MAX_SIZE_MB:
                    return None
            compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            return predict_labels(np.concatenate([compiled(images[i:i + 16])[0]
                                                  for i in range(0, len(images), 16)]), threshold), quantized

        best, tried = choose_fp32_layers(order, reference, candidate)
    save_openvino_ir(best[2], dst_xml, overwrite)
    return {"calibration": len(calibration), "agreement_images": len(images), "fp32_linears": order[:best[0]],
            "agreement": best[1], "tried": tried, "seconds": time.perf_counter() - t0}


def save_openvino_ir(model, dst_xml: Path, overwrite: bool) -> Path:
    """An OpenVINO model saved as IR (dst .xml + .bin, fp32 weights kept fp32), atomically: both files are written in a
    temporary folder beside them, then moved in, the weights first (the .xml never points at missing weights)."""
    import tempfile

    import openvino as ov

    dst_xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst_xml.parent, prefix=".ir-") as tmp:
        tmp_xml = Path(tmp) / dst_xml.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            keep_previous(dst_xml.with_suffix(suffix), overwrite)
            os.replace(tmp_xml.with_suffix(suffix), dst_xml.with_suffix(suffix))
    return dst_xml


def model_size_mb(path: str | Path) -> float:
    """Bytes on disk / 10^6 of a model: an ONNX file, or an OpenVINO IR .xml with its .bin."""
    path = Path(path)
    return size_on_disk_mb(path) + (size_on_disk_mb(path.with_suffix(".bin")) if path.suffix == ".xml" else 0.0)


def variant_precision(name: str, runner: Runner) -> str:
    """The real numeric format: int8 weights, else what the engine really computes in (OpenVINO reports it)."""
    if "int8" in name:
        return "int8" + ("+bf16" if runner.precision == "bf16" else "")
    return "bf16" if runner.precision == "bf16" else "fp32"


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
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
         [v["b1"]["latency_p95_ms"] - v["b1"]["latency_median_ms"] for v in variants], "{:.1f}"),
        (f"Throughput at batch {bench_batch}", "images / s", [v["bn"]["throughput_img_s"] for v in variants], None,
         "{:.1f}"),
        ("Size on disk", "MB (10^6 bytes)", [v["size_mb"] for v in variants], None, "{:.1f}"),
        ("Accuracy on the saved test split", "accuracy (%)", [100 * v["metrics"]["accuracy"] for v in variants],
         None, "{:.1f}"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
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
        ax.tick_params(axis="x", labelrotation=25)
        ax.margins(y=0.15)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="tab:gray", label="PyTorch fp32 (reference)"),
                        Patch(color="tab:blue", label="ONNX Runtime fp32"),
                        Patch(color="tab:orange", label="ONNX Runtime int8 (dynamic)"),
                        Patch(color="tab:cyan", label="OpenVINO fp32"),
                        Patch(color="tab:green", label="OpenVINO bf16 / int8 (NNCF)")],
               loc="lower center", ncol=5, title="* = saved as modeles/model_final" if selected else None)
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
    reference, rows = None, []
    graphs = {v["variant"]: v for v in variants}
    for v in variants:
        judged = v.get("judged")
        # an ONNX variant is also judged by the conversion of the fp32 graph it runs or was quantized from (as in
        # the pipeline): int8 comes from model_fp32.onnx
        graph = v if v["precision"] == "fp32" else graphs.get("ov-fp32" if v["backend"] == ENGINE_OV else "ort-fp32")
        conversion = graph.get("judged") if v["backend"] != "pytorch" and graph else None
        row = {"run_id": rid, "script": "onnx_optimization.py", "category": args.category, "variant": v["variant"],
               "backend": v["backend"], "precision": v["precision"], "device": "cpu", "device_name": cpu_name(),
               "size_mb": v["size_mb"],
               **measured_columns(v["metrics"], v["b1"], v["bn"], reference=reference,
                                  price_per_hour=args.price_per_hour),
               "cpu_load_1min": load, **guard_columns(judged, v.get("test")),
               "file": v["file"], "exporter": export_info["exporter"] if v["backend"] == "onnxruntime" else "",
               "opset": v.get("opset", ""), "fused_ops": v.get("fused", ""), "model_name": ckpt["model_name"],
               "source_checkpoint": str(ckpt_path), "torch_threads": threads_torch, **environment_columns(),
               "onnx_graph_checked": Path(graph["file"]).name if conversion else "",
               "onnx_graph_agreement": conversion["agreement"] if conversion else "",
               "onnx_graph_accuracy_delta_pt": graph["test"]["accuracy_diff_pt"] if conversion else "",
               "onnx_graph_passed": conversion["passed"] if conversion else ""}
        reference = reference or row
        row["size_ratio"] = reference["size_mb"] / row["size_mb"]
        row["guards_passed"] = variant_passes(judged["passed"] if judged else None,
                                              conversion["passed"] if conversion else None)
        rows.append(row)
    best, final = recommend(rows), choose_deployable(rows)
    for row in rows:
        row["recommended"] = row is best
        row["deployed_as"] = str(final_path(row["file"], models_dir)) if row is final else ""
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser(description="Export the fine-tuned model to ONNX, optimise it for ONNX Runtime "
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
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop a measurement's timed runs after this many seconds, >= 5 runs (default: 60)")
    parser.add_argument("--price-per-hour", type=float, default=CPU_PRICE,
                        help=f"price of the serving machine in USD/h for the cost per 1000 images (default: {CPU_PRICE} "
                             f"= {CPU_VM}, pay-as-you-go Linux list price 2024)")
    parser.add_argument("--no-fusion", action="store_true", help="skip ORT's transformer fusion variant")
    parser.add_argument("--no-int8", action="store_true", help="skip the dynamic int8 variant")
    parser.add_argument("--no-openvino", action="store_true",
                        help="skip the OpenVINO variants (fp32, bf16 where the CPU has it, NNCF int8)")
    parser.add_argument("--calibration-images", type=positive_int, default=128,
                        help="training images that calibrate NNCF's int8 quantization (default: 128)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier ONNX files, sidecar and plot instead of keeping them with a timestamp")
    args = parser.parse_args(argv)

    if args.warmup < 0:
        raise UserError("--warmup must be >= 0.")
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
    # train + val images: every guard (no label), NNCF's calibration and the mixed-precision rules
    loaders = make_loaders(args.data_dir, args.category, split, preprocessing, args.batch_size,
                           names=("test", "train", "val"), augment="none")
    loader = loaders["test"]
    dataset = loader.dataset
    models_dir = Path(args.models_dir)
    # the fp32 decisions on train + val, once: every guard and both mixed-precision rules compare with them
    threshold = checkpoint_threshold(ckpt)
    selection = selection_loader(loaders, args.batch_size)
    ref_selection, _ = predict_logits(model, selection, "cpu", desc=f"PyTorch fp32 {SELECTION_SPLIT}")
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
    # the train + val images and one ranking of the layers: the mixed precision of ORT and OpenVINO int8
    train_val = {n: loaders[n].dataset for n in ("train", "val")}
    basis = None if args.no_int8 and args.no_openvino else \
        mixed_precision_basis(files["ort-fp32"], model, train_val, threshold, ref_selection)
    if not args.no_int8:
        # int8 of the plain export: measured fastest on AVX2 (quantizing the fused graph was not faster).
        quantize_onnx_int8(files["ort-fp32"], models_dir / FILES["ort-int8-dynamic"], overwrite=args.overwrite)
        files["ort-int8-dynamic"] = models_dir / FILES["ort-int8-dynamic"]
        print(f"dynamic int8 (QInt8 weights) -> {files['ort-int8-dynamic']}")
        files["ort-int8-mixed"] = models_dir / FILES["ort-int8-mixed"]
        mixed = quantize_onnx_int8_mixed(files["ort-fp32"], files["ort-int8-mixed"], model, train_val,
                                         threshold, overwrite=args.overwrite,
                                         runner_threads=threads_ort, basis=basis)
        tried = ", ".join(f"{k} fp32: {a * 100:.1f} %" for k, a in mixed["tried"])
        print(f"dynamic int8, mixed precision: decisions agreeing with fp32 on {mixed['agreement_images']} train+val "
              f"images {tried} -> {len(mixed['fp32_linears'])} nn.Linear kept fp32 ({mixed['seconds']:.0f} s) -> "
              f"{files['ort-int8-mixed']}")
    # variant -> (file, engine, OpenVINO precision hint)
    specs = {name: (path, ENGINE_ORT, "f32") for name, path in files.items()}
    if not args.no_openvino:
        specs.update(openvino_variants(files["ort-fp32"], models_dir, model, train_val, threshold,
                                       args.calibration_images, args.overwrite, basis=basis))

    # 2. Decisions on train + val (the guards, no label) and on the whole test split (the report), PyTorch fp32 as
    # the reference
    print(f"decision threshold on P(anomaly): {threshold:.3f} ({ckpt.get('threshold_rule', 'argmax')}), the same "
          f"for every variant")
    ref_logits, labels = predict_logits(model, loader, "cpu", desc="PyTorch fp32 test")
    variants = [{"variant": "pytorch-fp32", "backend": "pytorch", "precision": "fp32", "file": str(ckpt_path),
                 "size_mb": size_on_disk_mb(ckpt_path), "logits": ref_logits, "judged": None, "test": None}]
    runners = {}
    for name, (path, engine, precision) in specs.items():
        runners[name] = Runner(path, engine, threads_ort, precision)
        chosen_on, _ = runner_predict_logits(runners[name], selection, desc=f"{name} {SELECTION_SPLIT}")
        logits, _ = runner_predict_logits(runners[name], loader, desc=f"{name} test")
        variants.append({"variant": name, "backend": engine, "precision": variant_precision(name, runners[name]),
                         "file": str(path), "size_mb": model_size_mb(path), "logits": logits,
                         "opset": onnx_opset(path) if Path(path).suffix == ".onnx" else "",
                         "judged": judge_selection(guard_kind(name), ref_selection, chosen_on, threshold=threshold),
                         "test": compare_logits(ref_logits, logits, labels, threshold=threshold),
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
                v[key] = benchmark_runner(runners[v["variant"]], x, desc=desc, **bench)

    # 4. Rows, the rules of lab_targets (recommend, choose_deployable), save, report
    rid = run_id()
    rows = result_rows(variants, args=args, rid=rid, ckpt=ckpt, ckpt_path=ckpt_path, export_info=export_info,
                       threads_torch=threads_torch, load=load, models_dir=models_dir)
    final = next((v for v, r in zip(variants, rows) if r["deployed_as"]), None)
    selected = final["variant"] if final else None
    results_dir = Path(args.results_dir)
    csv_path = append_csv_rows(results_dir / "onnx_results.csv", rows)
    png = plot_comparison(variants, results_dir / "onnx_comparison.png", bench_batch=args.bench_batch_size,
                          selected=selected, overwrite=args.overwrite,
                          title=f"PyTorch vs ONNX Runtime on CPU - {args.category}, {ckpt['model_name']} "
                                f"({cpu_name()}, ORT threads {threads_ort or 'default'})")

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
          f"vs PyTorch fp32 on the {len(ref_selection)} {SELECTION_SPLIT} images, no label; test (agreement, flips) "
          f"is measured once and reported, no choice reads it")
    for v in variants[1:]:
        t = v["test"]
        print(f"  {v['variant']:<20} {describe_guard(v['judged'])}; test: accuracy {format_accuracy(v['metrics'])}, "
              f"difference {t['accuracy_diff_pt']:+.2f} pt; {describe_flips(t)}; max |logit diff| "
              f"{t['max_abs_logit_diff']:.3g}")
    print(f"results appended to {csv_path} (run_id {rid}), plot {png}")
    if final is None:
        print(f"error: no ONNX variant passed its guard: {FINAL_ONNX} was not written "
              f"(see the guard lines above and {csv_path}).")
        return 1

    final_path = save_final(final["file"], models_dir, args.overwrite)
    sidecar = write_sidecar(final_path, variant=selected, category=args.category, preprocessing=preprocessing,
                            exporter=export_info["exporter"], source_checkpoint=ckpt_path,
                            base_model=ckpt["model_name"], parity_result={**final["judged"], "test": final["test"]},
                            metrics=final["metrics"],
                            threshold=threshold, engine=final["backend"], precision_hint=specs[selected][2],
                            overwrite=args.overwrite)
    print(f"saved {final_path} = {selected} (lab_targets.choose_deployable: the recommended variant, or the fastest "
          f"servable one passing its guards; {final['b1']['latency_median_ms']:.1f} ms vs "
          f"{variants[0]['b1']['latency_median_ms']:.1f} ms for PyTorch fp32); sidecar "
          f"{final_path.with_suffix('.json')} (sha256 {sidecar['sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    run_cli(main)
