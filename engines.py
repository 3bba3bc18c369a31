"""Export and inference engines of the fine-tuned classifier: ONNX export checked against PyTorch, ONNX Runtime
fusion and int8 (dynamic, and mixed precision by a label-free agreement rule), OpenVINO fp32 / bf16 and NNCF int8,
IR saving and on-disk sizes. Used by onnx_optimization.py (part 3), the pipeline and the good-only detector."""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from inference import (ENGINE_ORT, ENGINE_OV, INPUT_NAME, MAP_OUTPUT_NAME, OUTPUT_NAME, Runner, cpu_supports,
                       make_session, numeric_precision, onnx_opset)
from lab_io import (DiskFullError, UserError, atomic_write, check_replaceable, is_fresh, keep_previous, rename,
                    size_on_disk_mb, working_folder)
from lab_targets import predict_labels
from quantize import choose_fp32_layers
from train_utils import model_logits

DEFAULT_OPSET = 17
FILES = {"ort-fp32": "model_fp32.onnx", "ort-fp32-optimized": "model_fp32_optimized.onnx",
         "ort-int8-dynamic": "model_int8.onnx", "ort-int8-mixed": "model_int8_mixed.onnx",
         "ov-int8-nncf": "model_int8_nncf.xml", "ov-int8-weights": "model_int8_weights.xml"}


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


class _LogitsAndMap(torch.nn.Module):
    """pixel_values -> (logits, patch distances): the hybrid's graph, its map as a second named output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values, with_map=True)  # through the module call: node names keep its scope


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
        # the hybrid's top-k count comes from the patch count: constant for a fixed H x W, like the checks above
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"hybrid")
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
                exporter: str = "auto", overwrite: bool = False, map_output: bool = False) -> dict:
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
    wrapped = (_LogitsAndMap(model) if map_output else _LogitsOnly(model)).eval()
    outputs = [OUTPUT_NAME, MAP_OUTPUT_NAME] if map_output else [OUTPUT_NAME]
    tries = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"], "dynamo": ["dynamo"]}[exporter]
    failures = []
    for name in tries:
        info = {}

        def write(tmp: Path) -> None:
            t0 = time.perf_counter()
            with _quiet_export(), torch.inference_mode(False), torch.no_grad():
                if name == "torchscript":
                    torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
                                      input_names=[INPUT_NAME], output_names=outputs,
                                      dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}})
                else:
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    torch.onnx.export(wrapped, (example,), str(tmp), dynamo=True, opset_version=max(opset, 18),
                                      input_names=[INPUT_NAME], output_names=outputs, verbose=False,
                                      dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False)
            info["export_seconds"] = time.perf_counter() - t0
            onnx.checker.check_model(str(tmp))
            info["check_max_abs_diff"] = _check_against_torch(model, tmp, image_size)
            info["opset"] = onnx_opset(tmp)

        try:
            atomic_write(path, write, overwrite)
        except DiskFullError:  # no other exporter can help
            raise
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

    atomic_write(dst, write, overwrite)
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

    atomic_write(dst, write, overwrite)
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
    graph_nodes = onnx_linear_nodes(src)
    nodes = {}
    for n in names:  # the tracer may drop a wrapper's level ('model.dinov2...' -> '/model/dinov2/...')
        parts = n.split(".")
        key = next((k for k in (".".join(parts[i:]) for i in range(len(parts))) if k in graph_nodes), None)
        if key is not None:  # the longest suffix of the name that the graph has
            nodes[n] = graph_nodes[key]
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
    images, logits = agreement_logits(model, datasets, reference_logits)
    return images, predict_labels(logits, threshold)


def agreement_logits(model, datasets: dict, reference_logits: np.ndarray | None = None) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """(train + val images as one float32 array, the fp32 model's logits on them); see agreement_images."""
    images = np.stack([ds[i][0].numpy() for ds in (datasets["train"], datasets["val"]) for i in range(len(ds))])
    if reference_logits is None:
        with torch.inference_mode():
            reference_logits = np.concatenate([model_logits(model.eval(), torch.from_numpy(images[i:i + 16]))
                                               .float().numpy() for i in range(0, len(images), 16)])
    if len(reference_logits) != len(images):
        raise ValueError(f"{len(reference_logits)} reference logits for {len(images)} train + val images")
    return images, np.asarray(reference_logits)


def mixed_precision_basis(src: Path, model, datasets: dict, threshold: float,
                          reference_logits: np.ndarray | None = None) -> dict:
    """What the ORT and OpenVINO mixed precision both start from, computed once: the ranked layers and their nodes
    (ranked_linear_nodes), the train + val images and the fp32 logits and decisions on them (agreement_logits)."""
    order, nodes = ranked_linear_nodes(src, model, datasets["train"])
    images, logits = agreement_logits(model, datasets, reference_logits)
    return {"order": order, "nodes": nodes, "images": images, "logits": logits,
            "reference": predict_labels(logits, threshold)}


def _ort_int8(src: Path, dst: Path, exclude: list[str]) -> None:
    """ONNX Runtime dynamic int8 of the MatMul with constant weights (one int8 scale per output channel), but the
    nodes in `exclude`; the attention's activation x activation products and the patch convolution stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_logs():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})


def _shift_onnx_head(path: Path, shift: float) -> bool:
    """Add `shift` to the anomaly-vs-good logit margin of an ONNX file's 2-class head(s), in place: the bias
    correction of quantize.head_logit_shift, on the graph (the exporter names the head's bias initializer after its
    parameter, '...classifier.bias'). False when there is no such initializer (nothing changed)."""
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(path))
    biases = [t for t in graph_model.graph.initializer if t.name.endswith("classifier.bias") and list(t.dims) == [2]]
    for bias in biases:
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.array([-shift / 2, shift / 2],
                                                                                   np.float32), bias.name))
    if biases:
        onnx.save(graph_model, str(path))
    return bool(biases)


def _head_nodes(nodes: dict[str, list[str]]) -> list[str]:
    """The 2-class head's nodes, left out of the int8 (fp32, as in PyTorch). ORT rewrites a Gemm as '<name>_MatMul'
    before it quantizes it: both names."""
    return [y for n, xs in nodes.items() if n.split(".")[-1].endswith("classifier") for x in xs
            for y in (x, f"{x}_MatMul")]


def _export_smoothed(smoothed, path: Path, names: list[str], preprocessing: dict, opset: int):
    """Export a quantize.smoothed_copy and map its nn.Linear to their MatMul nodes (onnx_linear_nodes); a layer with
    no node (the exporter's names changed) is an error, not a silent int8. Returns (path, nodes)."""
    export_onnx(smoothed, path, preprocessing, opset, overwrite=True)
    nodes = onnx_linear_nodes(path)
    unmatched = [n for n in names if n not in nodes]
    if unmatched:
        raise UserError(f"{len(unmatched)} nn.Linear layer(s) have no MatMul node in the exported graph (e.g. "
                        f"{unmatched[0]}): the exporter's node names changed, mixed precision cannot be applied.")
    return path, nodes


def quantize_onnx_int8_mixed(model, dst: Path, datasets: dict, threshold: float, preprocessing: dict, *,
                             opset: int = DEFAULT_OPSET, overwrite: bool = False, runner_threads: int | None = None,
                             basis: dict | None = None) -> dict:
    """ONNX Runtime dynamic int8 that keeps the decisions, by the rules of the PyTorch fix (quantize.py), label-free
    throughout: the fp32 model exported with SmoothQuant's factors explicit (quantize.smoothed_copy), for each alpha
    of quantize.SMOOTH_ALPHAS; int8 weights per output channel on the constant MatMul only (_ort_int8; the head
    stays fp32); the head's bias corrected by the mean margin offset on the calibration images (_shift_onnx_head);
    the alpha whose logit margins stay closest to fp32's on train + val (RMS); then the most sensitive nn.Linear
    kept fp32 by quantize.choose_fp32_layers. Never the test split. Decisions are taken one image per call: ORT's
    dynamic int8 takes one activation scale per batch tensor. `basis`: mixed_precision_basis(...) when the caller
    has it (its images and fp32 logits are reused)."""
    import onnx

    from lab_targets import TARGET_MAX_SIZE_MB
    from quantize import (SMOOTH_ALPHAS, SMOOTH_CALIBRATION_IMAGES, Int8Linear, backbone_linears, linear_input_absmax,
                          linear_sensitivity, logit_margin, margin_rms, smoothed_copy)

    t0 = time.perf_counter()
    train = datasets["train"]
    if len(train) == 0:
        raise UserError("no training image to calibrate the int8 quantization.")
    images, logits = (basis["images"], basis["logits"]) if basis else agreement_logits(model, datasets)
    reference, margins = predict_labels(logits, threshold), logit_margin(logits)
    calibration = torch.stack([train[i][0] for i in range(min(SMOOTH_CALIBRATION_IMAGES, len(train)))])
    names = backbone_linears(model)
    absmax = linear_input_absmax(model, calibration, names)
    with torch.inference_mode():
        calibration_margins = logit_margin(model_logits(model.eval(), calibration).float().numpy())

    def run(path: Path, x: np.ndarray) -> np.ndarray:  # one image per call (Runner: DynamicQuantizeLinear)
        return Runner(path, ENGINE_ORT, runner_threads).run(x)

    with working_folder(dst.parent, ".int8-mixed-") as tmp:
        def build(src: Path, nodes: dict, fp32_layers, name: str):
            path = Path(tmp) / name
            _ort_int8(src, path, _head_nodes(nodes) + [x for n in fp32_layers for x in nodes[n]])
            shift = float(np.mean(calibration_margins - logit_margin(run(path, calibration.numpy()))))
            return path, shift if _shift_onnx_head(path, shift) else 0.0

        deviations, best = [], None
        for alpha in SMOOTH_ALPHAS:
            src, nodes = _export_smoothed(smoothed_copy(model, absmax, alpha), Path(tmp) / f"smoothed-{alpha:g}.onnx",
                                          names, preprocessing, opset)
            path, shift = build(src, nodes, (), f"a{alpha:g}-k0.onnx")
            out = run(path, images)
            deviations.append((alpha, margin_rms(out, margins)))
            if best is None or deviations[-1][1] < best["rms"]:
                best = {"alpha": alpha, "rms": deviations[-1][1], "src": src, "nodes": nodes,
                        "k0": (predict_labels(out, threshold), (path, shift))}
        alpha = best["alpha"]
        sensitivity = linear_sensitivity(model, calibration, names,
                                         lambda n, lin: Int8Linear.from_linear(lin, absmax[n], alpha))
        order = sorted(names, key=lambda n: -sensitivity[n])

        def candidate(fp32_layers):
            if not fp32_layers:
                return best["k0"]
            path, shift = build(best["src"], best["nodes"], fp32_layers, f"a{alpha:g}-k{len(fp32_layers)}.onnx")
            if model_size_mb(path) >= TARGET_MAX_SIZE_MB:
                return None
            return predict_labels(run(path, images), threshold), (path, shift)

        chosen, tried = choose_fp32_layers(order, reference, candidate)

        def write(tmp_dst: Path) -> None:
            shutil.copyfile(chosen[2][0], tmp_dst)
            onnx.checker.check_model(str(tmp_dst))

        atomic_write(dst, write, overwrite)
    return {"alpha": alpha, "alphas_tried": deviations, "logit_shift": chosen[2][1],
            "fp32_linears": order[:chosen[0]], "agreement": chosen[1], "agreement_images": len(images),
            "tried": tried, "seconds": time.perf_counter() - t0}


def describe_ort_int8_mixed(info: dict) -> str:
    """One line on what quantize_onnx_int8_mixed chose and why (for part 3 and the pipeline)."""
    alphas = ", ".join(f"{a:g}: {rms:.3f}" for a, rms in info["alphas_tried"])
    tried = ", ".join(f"{k} fp32: {a * 100:.1f} %" for k, a in info["tried"])
    return (f"alpha {info['alpha']:g} (RMS logit deviation from fp32 on {info['agreement_images']} train+val images: "
            f"{alphas}), head offset {info['logit_shift']:+.3f}; decisions agreeing with fp32: {tried} -> "
            f"{len(info['fp32_linears'])} nn.Linear kept fp32 ({info['seconds']:.0f} s)")


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
def openvino_int8_path(models_dir: Path, prefix: str = "model_", variant: str = "ov-int8-nncf") -> Path:
    """The int8 IR (.xml, its .bin beside it) of `variant` (NNCF static int8, or int8 weights) of the model whose
    files start with `prefix`."""
    return Path(models_dir) / FILES[variant].replace("model_", prefix, 1)


def openvino_variants(fp32_onnx: Path, models_dir: Path, model, datasets: dict, threshold: float,
                      n_calibration: int, overwrite: bool, prefix: str = "model_", basis: dict | None = None,
                      fp16_constants: bool = False, reuse_int8: bool = False) -> dict:
    """{variant: (file, engine, precision hint)}: OpenVINO fp32 on the exported ONNX file, bf16 where the CPU has
    it, and NNCF int8 (quantize_openvino_int8; rest f32 and, where the CPU has it, bf16). `model`: the PyTorch fp32
    model the file was exported from; `datasets`: its "train" and "val" datasets (no augmentation). reuse_int8: the
    int8 IR already on disk is used as it is (the caller checked it is newer than fp32_onnx)."""
    bf16 = cpu_supports("bf16")
    out = {"ov-fp32": (fp32_onnx, ENGINE_OV, "f32")}
    if bf16:
        out["ov-bf16"] = (fp32_onnx, ENGINE_OV, "bf16")
    xml = openvino_int8_path(models_dir, prefix)
    if reuse_int8:
        print(f"OpenVINO int8: reusing {xml} (newer than {fp32_onnx.name})")
    else:
        info = quantize_openvino_int8(fp32_onnx, xml, model, datasets, threshold, n_calibration, overwrite=overwrite,
                                      basis=basis, fp16_constants=fp16_constants)
        tried = ", ".join(f"{n} fp32: {a * 100:.1f} %" for n, a in info["tried"])
        print(f"OpenVINO int8 (NNCF post-training quantization, ModelType.TRANSFORMER, {info['calibration']} "
              f"training images for calibration): decisions agreeing with fp32 on {info['agreement_images']} "
              f"train+val images {tried} -> {len(info['fp32_linears'])} nn.Linear kept fp32 ({info['seconds']:.0f} s)"
              f" -> {xml} (+ .bin); bf16 on this CPU: {'yes' if bf16 else 'no'}")
    out["ov-int8-nncf"] = (xml, ENGINE_OV, "f32")
    if bf16:
        out["ov-int8-nncf-bf16"] = (xml, ENGINE_OV, "bf16")
    weights_xml = openvino_int8_path(models_dir, prefix, "ov-int8-weights")
    if reuse_int8 and all(is_fresh(f, fp32_onnx) for f in (weights_xml, weights_xml.with_suffix(".bin"))):
        print(f"OpenVINO int8 weights: reusing {weights_xml}")
    else:
        info = compress_openvino_int8_weights(fp32_onnx, weights_xml, overwrite, fp16_constants=fp16_constants)
        print(f"OpenVINO int8 weights (nncf.compress_weights INT8_ASYM, per output channel, float activations): "
              f"{info['layers']} weight matrices in int8 ({info['seconds']:.0f} s) -> {weights_xml} (+ .bin)")
    out["ov-int8-weights"] = (weights_xml, ENGINE_OV, "f32")
    return out


def compress_openvino_int8_weights(src: Path, dst_xml: Path, overwrite: bool, fp16_constants: bool = False) -> dict:
    """The weights of every MatMul / convolution of an ONNX file in int8 (nncf.compress_weights INT8_ASYM: one scale
    and zero point per output channel), saved as OpenVINO IR. No calibration, and the activations stay float: the IR
    carries DYNAMIC_QUANTIZATION_GROUP_SIZE 0 (its runtime_options), else OpenVINO quantizes them on the fly on CPUs
    with VNNI / AMX, faster but noisier (docs/guide.md, part 3). So the int8 noise is that of the weights alone, on
    every CPU. Measured on the screw: the variant that keeps the decisions under 30 MB where static int8 does not."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    t0 = time.perf_counter()
    model = ov.Core().read_model(str(src))
    with _quiet_logs():
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    layers = sum(1 for op in compressed.get_ops() if op.get_type_name() == "Constant"  # not their zero points (a
                 and op.get_output_element_type(0).get_type_name() in ("u8", "i8")  # vector: one dimension > 1)
                 and sum(d > 1 for d in op.get_output_shape(0)) >= 2)
    compressed.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    save_openvino_ir(compressed, dst_xml, overwrite, fp16_constants=fp16_constants)
    return {"layers": layers, "seconds": time.perf_counter() - t0}


def quantize_openvino_int8(src: Path, dst_xml: Path, model, datasets: dict, threshold: float, n_calibration: int,
                           *, overwrite: bool = False, basis: dict | None = None, fp16_constants: bool = False) -> dict:
    """NNCF post-training int8 of an ONNX file read by OpenVINO, calibrated on the first `n_calibration` training
    images, saved as OpenVINO IR (dst .xml + .bin, fp32 weights where not int8; stored fp16 with fp16_constants,
    judged so).

    Mixed precision by the label-free rule of the ORT int8 (mixed_precision_basis, quantize.choose_fp32_layers): the
    most sensitive nn.Linear layers are left out of NNCF's quantization (an IgnoredScope of their node names, checked by
    NNCF) until the decisions agree with the fp32 model's on train + val; never the test split (measurements:
    docs/guide.md, part 3)."""
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
    with working_folder(dst_xml.parent, ".int8-nncf-") as tmp:
        def candidate(fp32_layers):
            scope = nncf.IgnoredScope(names=[x for n in fp32_layers for x in nodes[n]]) if fp32_layers else None
            with _quiet_logs():
                quantized = nncf.quantize(ov.Core().read_model(str(src)), nncf.Dataset(calibration),
                                          subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                          ignored_scope=scope)
            if fp32_layers:  # the size of the IR as it will be saved
                probe = Path(tmp) / f"k{len(fp32_layers)}.xml"
                ov.save_model(quantized, str(probe), compress_to_fp16=fp16_constants)
                if model_size_mb(probe) >= TARGET_MAX_SIZE_MB:
                    return None
            judged = quantized
            if fp16_constants:  # judged as it will be saved: its fp32 constants rounded to fp16
                probe = Path(tmp) / f"c{len(fp32_layers)}.xml"
                ov.save_model(quantized, str(probe), compress_to_fp16=True)
                judged = ov.Core().read_model(str(probe))
            compiled = ov.Core().compile_model(judged, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            return predict_labels(np.concatenate([compiled(images[i:i + 16])[0]
                                                  for i in range(0, len(images), 16)]), threshold), quantized

        best, tried = choose_fp32_layers(order, reference, candidate)
    save_openvino_ir(best[2], dst_xml, overwrite, fp16_constants=fp16_constants)
    return {"calibration": len(calibration), "agreement_images": len(images), "fp32_linears": order[:best[0]],
            "agreement": best[1], "tried": tried, "seconds": time.perf_counter() - t0}


def save_openvino_ir(model, dst_xml: Path, overwrite: bool, fp16_constants: bool = False) -> Path:
    """An OpenVINO model saved as IR (dst .xml + .bin, fp32 weights kept fp32 unless fp16_constants: then stored fp16,
    computed fp32), atomically: both files are written in a temporary folder beside them, then moved in, the weights
    first (the .xml never points at missing weights)."""
    import openvino as ov

    dst_xml.parent.mkdir(parents=True, exist_ok=True)
    with working_folder(dst_xml.parent, ".ir-") as tmp:
        tmp_xml = Path(tmp) / dst_xml.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=fp16_constants)
        check_replaceable(dst_xml.with_suffix(".bin"), dst_xml)  # both or neither: never a new .xml on old weights
        for suffix in (".bin", ".xml"):
            keep_previous(dst_xml.with_suffix(suffix), overwrite)
            rename(tmp_xml.with_suffix(suffix), dst_xml.with_suffix(suffix))
    return dst_xml


def model_size_mb(path: str | Path) -> float:
    """Bytes on disk / 10^6 of a model: an ONNX file, or an OpenVINO IR .xml with its .bin."""
    path = Path(path)
    return size_on_disk_mb(path) + (size_on_disk_mb(path.with_suffix(".bin")) if path.suffix == ".xml" else 0.0)


def variant_precision(name: str, runner: Runner) -> str:
    """The real numeric format of a variant run by `runner` (inference.numeric_precision)."""
    return numeric_precision(name, runner.precision)
