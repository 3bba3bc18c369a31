"""PyTorch int8 of the lab (part 2 and the pipeline): the plain torch.ao dynamic quantization of nn.Linear (the
lesson), the measured fix (SmoothQuant int8 with the full 8-bit activation range, image by image, its strength, head
offset and mixed precision chosen without labels), and the int8 checkpoint (written with plain tensors, reloaded
with torch.load(weights_only=True)).

Nothing here parses command-line arguments; quantization_demo.py is the script.
"""
from __future__ import annotations

import contextlib
import copy
import platform
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lab_io import UserError, atomic_write, library_versions
from load_model_hf import count_parameters, model_skeleton, read_checkpoint, resolve_model_path

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
    with quiet_quantization_warnings():
        return atomic_write(path, lambda p: torch.save(ckpt, p), overwrite)


def load_quantized_checkpoint(path: str | Path, expected_category: str | None = None,
                              models_dir: str | Path = "modeles", engine: str | None = None):
    """Reload model_quantized.pth safely: weights_only=True, architecture rebuilt from the config, the same
    quantize_dynamic applied, then the int8 state_dict loaded. Returns (int8 model in eval mode, checkpoint).

    `engine`: None = the one it was saved with when available here, else the default one."""
    path = resolve_model_path(path, models_dir)
    with quiet_quantization_warnings():
        ckpt = read_checkpoint(path, expected_category)
    quant = ckpt.get("quantization")
    if not isinstance(quant, dict) or quant.get("method") not in (QUANT_METHOD, SMOOTH_METHOD, *LEGACY_SMOOTH_METHODS):
        raise UserError(f"{path} is not an int8 checkpoint of this lab (no '{QUANT_METHOD}' or '{SMOOTH_METHOD}' "
                        f"quantization entry): quantize it first with `python quantization_demo.py --model-path "
                        f"{path.name}`.")
    if quant["method"] != QUANT_METHOD:
        qmodel = int8_skeleton(model_skeleton(ckpt, path), quant)
    else:
        if engine is None:
            engine = quant.get("engine") if quant.get("engine") in torch.backends.quantized.supported_engines \
                else "auto"
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
# The measured fix: SmoothQuant int8 at the full 8-bit range, image by image; mixed precision chosen without labels
# --------------------------------------------------------------------------------------------------
SMOOTH_METHOD = "smoothquant-int8"
LEGACY_SMOOTH_METHODS = ("per-token-int8-smoothquant",)  # earlier checkpoints of the fix: the same tensors
SMOOTH_ALPHAS = (0.5, 0.6, 0.7, 0.8)  # SmoothQuant migration strengths tried (0.5: Xiao et al. 2023's default)
SMOOTH_CALIBRATION_IMAGES = 32
MAX_FP32_LINEARS = (0, 2, 4, 8)  # candidates: that many of the most sensitive nn.Linear stay fp32
KERNEL_FUSED, KERNEL_PER_TOKEN = "fused-uint8-per-image", "int8-per-token"
# int8 weight codes: the full range, and the largest code that a saturating kernel (fbgemm on AVX2 without VNNI adds
# pairs of uint8 x int8 products in int16) multiplies exactly with 8-bit activations: 2 x 255 x 64 < 2^15
WEIGHT_CODE_FULL, WEIGHT_CODE_SATURATION_SAFE = 127, 64

_KERNEL_PROBES: dict[tuple, bool | None] = {}


def _probe_fused_kernel(weight_code: int) -> bool | None:
    """Whether the active engine's fused dynamic int8 Linear (torch.ops.quantized.linear_dynamic, 8-bit activations)
    is exact with weights up to `weight_code`; None where the engine has no per-channel dynamic Linear.

    Measured, not guessed from CPU flags: every activation and weight at its largest code, where a saturating kernel
    returns about half of the exact sum. VNNI kernels (AVX-512 VNNI, AVX-VNNI) and the ARM ones accumulate in int32."""
    key = (torch.backends.quantized.engine, weight_code)
    if key not in _KERNEL_PROBES:
        k = 256
        try:
            with quiet_quantization_warnings():
                weight = torch._make_per_channel_quantized_tensor(
                    torch.full((4, k), weight_code, dtype=torch.int8), torch.ones(4, dtype=torch.double),
                    torch.zeros(4, dtype=torch.long), 0)
                out = torch.ops.quantized.linear_dynamic(torch.ones(2, k),
                                                         torch.ops.quantized.linear_prepack(weight, None), False)
            _KERNEL_PROBES[key] = bool(torch.allclose(out, torch.full_like(out, float(weight_code * k)), rtol=1e-3))
        except (RuntimeError, NotImplementedError):
            _KERNEL_PROBES[key] = None
    return _KERNEL_PROBES[key]


def fused_kernel_exact(weight_code: int = WEIGHT_CODE_FULL) -> bool:
    """Whether the fused kernel is exact with 8-bit activations and weights up to `weight_code` (else it saturates
    on the rare pairs of large products, or is missing)."""
    return bool(_probe_fused_kernel(weight_code))


def weight_codes() -> tuple[int, ...]:
    """The int8 weight ranges the fix tries on this engine: the full range, and where the fused kernel saturates with
    it, also weights within +-64, which it multiplies exactly. Which one keeps the margins closer to fp32 is measured
    on the model (quantize_smooth_int8): saturation is rare, weight rounding is everywhere."""
    return (WEIGHT_CODE_FULL,) if fused_kernel_exact() else (WEIGHT_CODE_FULL, WEIGHT_CODE_SATURATION_SAFE)


def int8_kernel() -> str:
    """The kernel Int8Linear runs on here: the fused per-image kernel with 8-bit activations, or, on an engine without
    it, the per-token product."""
    return KERNEL_PER_TOKEN if _probe_fused_kernel(WEIGHT_CODE_FULL) is None else KERNEL_FUSED


def smoothing_factors(weight: torch.Tensor, input_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (Xiao et al. 2023): x / s
    and W * s give the same product, with the activations' large channels moved into the weights."""
    w = weight.detach().float()
    s = input_absmax.clamp(min=1e-5).pow(alpha) / w.abs().amax(0).clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


class SmoothedLinear(torch.nn.Linear):
    """nn.Linear computing (x / s) @ (W * s)^T + b: the same function in float, SmoothQuant's factors made explicit,
    so that an int8 of its exported graph (ONNX Runtime's dynamic int8, one weight scale per output channel)
    quantizes the smoothed activations and weights. The graph keeps the layer's node names (.../fc1/MatMul)."""

    def __init__(self, linear: torch.nn.Linear, input_absmax: torch.Tensor, alpha: float):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None)
        s = smoothing_factors(linear.weight, input_absmax, alpha)
        with torch.no_grad():
            self.weight.copy_(linear.weight.detach().float() * s[None])
            if linear.bias is not None:
                self.bias.copy_(linear.bias.detach())
        self.register_buffer("inv_smooth", 1.0 / s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x * self.inv_smooth, self.weight, self.bias)


def smoothed_copy(model, absmax: dict, alpha: float):
    """A copy of `model` whose backbone nn.Linear layers are SmoothedLinear (same outputs in float); `model` is
    untouched."""
    smoothed = copy.deepcopy(model).eval()
    _replace(smoothed, backbone_linears(smoothed), lambda n, lin: SmoothedLinear(lin, absmax[n], alpha))
    return smoothed


class Int8Linear(torch.nn.Module):
    """nn.Linear with int8 weights (one scale per output channel) and int8 activations quantized at each call, image
    by image: an image's result never depends on the other images of its batch. `smooth` (SmoothQuant) divides each
    input channel by a factor calibrated on training images and multiplies the weights by it, so that the few
    channels with large activations are rounded on the weights' side, where one scale per output channel absorbs
    them.

    The kernel (int8_kernel) is torch.ops.quantized.linear_dynamic with one uint8 scale and zero point per image:
    quantization, product, dequantization and bias fused in one call, as fast as the plain dynamic int8, with twice its
    activation resolution (exact, or rarely saturating on AVX2 without VNNI: weight_codes). An engine without it gets
    one int8 scale per token and torch._int_mm (float32 where this build has no CPU kernel for it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("smooth", torch.ones(in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None  # the weights packed for the fused kernel, built at the first call
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_packed", None))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, input_absmax: torch.Tensor | None = None,
                    alpha: float = SMOOTH_ALPHAS[0], weight_code: int = WEIGHT_CODE_FULL) -> "Int8Linear":
        out = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()
        if input_absmax is not None:
            s = smoothing_factors(w, input_absmax, alpha)
            w = w * s[None]
            out.smooth.copy_(1.0 / s)
        scale = w.abs().amax(1).clamp(min=1e-12) / weight_code
        out.weight_int8.copy_((w / scale[:, None]).round().clamp(-weight_code, weight_code).to(torch.int8).t())
        out.weight_scale.copy_(scale)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # [images, tokens, features]; a 2-D input is one row per image
        images = x.reshape(shape[0], -1, shape[-1]) if x.dim() > 2 else x.reshape(-1, 1, shape[-1])
        images = images.float() * self.smooth
        if int8_kernel() == KERNEL_FUSED:
            packed = self._packed_weights()
            y = [torch.ops.quantized.linear_dynamic(image, packed, False) for image in images]
            y = y[0] if len(y) == 1 else torch.stack(y)  # batch 1: no copy
        else:
            y = self._per_token(images.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _packed_weights(self):
        if self._packed is None:
            with quiet_quantization_warnings():
                weight = torch._make_per_channel_quantized_tensor(
                    self.weight_int8.t().contiguous(), self.weight_scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(weight, self.bias)
        return self._packed

    def _per_token(self, rows: torch.Tensor) -> torch.Tensor:
        # in place where it can be: a fresh [tokens, out] float tensor per step costs more than the int8 product
        scale = rows.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127)
        q = (rows / scale).round_().clamp_(-127, 127).to(torch.int8)
        y = _int8_matmul(q, self.weight_int8).float().mul_(scale).mul_(self.weight_scale)
        return y.add_(self.bias) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {int8_kernel()}"


_INT_MM_OK: bool | None = None


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    global _INT_MM_OK
    if _INT_MM_OK is not False:
        try:
            out = torch._int_mm(a, b)
            _INT_MM_OK = True
            return out
        except (RuntimeError, NotImplementedError):
            _INT_MM_OK = False
    return a.float() @ b.float()


def backbone_linears(model) -> list[str]:
    """Names of the nn.Linear layers the fix quantizes: all but the classifier heads (2 x hidden weights, where the
    decision is made: kept fp32)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and not n.split(".")[-1].endswith("classifier")]


def _replace(model, names, make) -> None:
    modules = dict(model.named_modules())
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, make(name, modules[name]))


@torch.inference_mode()
def _watch_linears(model, images: torch.Tensor, names: list[str], record) -> None:
    """Run `model` on each image alone, calling record(name, layer input, layer output) for each named layer."""
    from train_utils import model_logits  # here: train_utils -> quantize (lazily) for the probe's perturbation

    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda _m, inputs, output, n=n: record(n, inputs[0], output))
             for n in names]
    try:
        for i in range(len(images)):
            model_logits(model.eval(), images[i:i + 1])
    finally:
        for h in hooks:
            h.remove()


def linear_input_absmax(model, images: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Largest |input| of each input channel of the named nn.Linear over `images` (one image per call)."""
    absmax = {}

    def record(name, x, _output):
        x = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        absmax[name] = torch.maximum(absmax[name], x) if name in absmax else x

    _watch_linears(model, images, names, record)
    return absmax


def linear_sensitivity(model, images: torch.Tensor, names: list[str], make_int8) -> dict[str, float]:
    """Relative output error of each nn.Linear when it alone is int8 (make_int8(name, linear) -> its int8 form,
    run on the layer's fp32 inputs), averaged over images: the order in which layers are kept fp32. One fp32
    pass; no label."""
    modules = dict(model.named_modules())
    quantized = {n: make_int8(n, modules[n]) for n in names}
    errors = {n: 0.0 for n in names}

    def record(name, x, output):
        errors[name] += float((quantized[name](x) - output).norm() / output.norm().clamp(min=1e-12))

    _watch_linears(model, images, names, record)
    return {n: e / max(1, len(images)) for n, e in errors.items()}


def quantize_linears_int8(model, absmax: dict, keep_fp32=(), alpha: float = SMOOTH_ALPHAS[0],
                          weight_code: int = WEIGHT_CODE_FULL):
    """A copy of `model` whose backbone nn.Linear layers are Int8Linear (SmoothQuant factors from `absmax`, weights
    within +-weight_code), but those named in keep_fp32; `model` is untouched."""
    qmodel = copy.deepcopy(model).eval()
    names = [n for n in backbone_linears(qmodel) if n not in set(keep_fp32)]
    _replace(qmodel, names, lambda n, lin: Int8Linear.from_linear(lin, absmax[n], alpha, weight_code))
    return qmodel


def int8_skeleton(model, quant: dict):
    """`model` with empty Int8Linear layers where the saved int8 model has them (weights loaded next)."""
    keep = set(quant.get("fp32_linears", []))
    names = [n for n in backbone_linears(model) if n not in keep]
    _replace(model, names, lambda n, lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None))
    return model.eval()


def smooth_quant_info(keep_fp32, n_linears: int, weight_code: int = WEIGHT_CODE_FULL, **measured) -> dict:
    kernel = int8_kernel()
    per = "token" if kernel == KERNEL_PER_TOKEN else "image"
    return {"method": SMOOTH_METHOD, "modules": ["Linear"], "dtype": "qint8", "qscheme": f"per_channel_w/per_{per}_act",
            "kernel": kernel, "weight_code": weight_code, "kernel_exact": fused_kernel_exact(weight_code),
            "engine": torch.backends.quantized.engine,
            "fp32_linears": list(keep_fp32), "int8_linears": n_linears - len(keep_fp32), **measured}


def choose_fp32_layers(order: list[str], reference, candidate) -> tuple[tuple, list]:
    """The label-free mixed-precision rule of every int8 of the lab (PyTorch, ONNX Runtime, OpenVINO):
    candidate(fp32 layers) builds an int8 model keeping those layers fp32 and returns (its decisions on the train +
    val images, the model), or None when it would exceed lab_targets.TARGET_MAX_SIZE_MB (no larger candidate is
    tried). The MAX_FP32_LINEARS most sensitive layers of `order` are tried until the decisions agree with
    `reference` (the fp32 model's) on lab_targets.INT8_MIN_AGREEMENT of the images, else the most agreeing is kept
    (within one image: fewer fp32 layers, it is faster). Returns ((k, agreement, model), [(k, agreement) tried])."""
    from lab_targets import INT8_MIN_AGREEMENT

    best, tried = None, []
    for k in MAX_FP32_LINEARS:
        if k >= len(order):
            break
        built = candidate(order[:k])
        if built is None:
            break
        preds, artefact = built
        agreement = float((preds == reference).mean())
        tried.append((k, agreement))
        if best is None or agreement > best[1] + 1.0 / len(reference):
            best = (k, agreement, artefact)
        if agreement >= INT8_MIN_AGREEMENT:
            break
    return best, tried


def head_logit_shift(qmodel, shift: float) -> bool:
    """Add `shift` to the anomaly-vs-good logit margin of the model's 2-class head(s) (kept fp32): bias correction
    (Nagel et al. 2019) at the head, where int8 rounding leaves a systematic offset. False when there is no such
    head (nothing changed)."""
    heads = [m for n, m in qmodel.named_modules() if n.split(".")[-1].endswith("classifier")
             and isinstance(m, torch.nn.Linear) and m.out_features == 2 and m.bias is not None]
    with torch.no_grad():
        for head in heads:  # a two-head DeiT averages its heads: the same shift on each
            head.bias.add_(torch.tensor([-shift / 2, shift / 2], dtype=head.bias.dtype))
    return bool(heads)


def logit_margin(logits) -> np.ndarray:
    """logit(anomaly) - logit(good) of [N, 2] logits: P(anomaly) = sigmoid of it."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[:, 1] - logits[:, 0]


def margin_rms(logits, reference_margins: np.ndarray) -> float:
    """RMS distance of an int8 model's logit margins from the fp32 ones on the same images: what picks SmoothQuant's
    alpha, in PyTorch and in ONNX Runtime (no label)."""
    return float(np.sqrt(np.mean((logit_margin(logits) - reference_margins) ** 2)))


def quantize_smooth_int8(model, calibration: torch.Tensor, agreement_images: torch.Tensor, threshold: float,
                         *, batch_size: int = 16, desc: str = "int8 SmoothQuant") -> tuple[torch.nn.Module, dict]:
    """The fix of part 2, label-free throughout: Int8Linear layers with SmoothQuant factors from `calibration`
    (training images); the migration strength alpha of SMOOTH_ALPHAS (and, where the kernel saturates, the weight
    range of weight_codes) whose int8 model's logit margins stay closest to fp32's on `agreement_images` (train +
    val; RMS); the head's bias corrected by the mean margin offset on the calibration images (head_logit_shift);
    then mixed precision: the 0, 2, 4, 8 nn.Linear with the largest int8 error (linear_sensitivity) stay fp32, and
    the first candidate whose decisions (at `threshold`) agree with the fp32 model's on
    lab_targets.INT8_MIN_AGREEMENT of `agreement_images` is kept, else the one that agrees most (within one image:
    fewer fp32 layers, it is faster). A candidate whose weights would exceed
    lab_targets.TARGET_MAX_SIZE_MB is not tried (each fp32 layer costs 4x its int8 bytes). Returns (int8 model,
    info)."""
    import time

    from tqdm.auto import tqdm

    from lab_targets import TARGET_MAX_SIZE_MB, predict_labels
    from train_utils import model_logits

    t0 = time.perf_counter()
    model = model.eval()
    names = backbone_linears(model)
    absmax = linear_input_absmax(model, calibration, names)

    @torch.inference_mode()
    def logits_of(m, images, label):
        return np.concatenate([model_logits(m, images[i:i + batch_size]).float().numpy()
                               for i in tqdm(range(0, len(images), batch_size), desc=label, leave=False,
                                             unit="batch")])

    reference_logits = logits_of(model, agreement_images, f"{desc}: fp32 logits")
    reference, reference_margins = predict_labels(reference_logits, threshold), logit_margin(reference_logits)
    calibration_margin = logit_margin(logits_of(model, calibration, f"{desc}: fp32 calibration logits"))

    def build(alpha, fp32_layers, code):
        qmodel = quantize_linears_int8(model, absmax, fp32_layers, alpha, code)
        shift = float(np.mean(calibration_margin - logit_margin(logits_of(qmodel, calibration, f"{desc}: offset"))))
        return qmodel, shift if head_logit_shift(qmodel, shift) else 0.0

    deviations, built = {}, {}
    for code in weight_codes():
        for alpha in SMOOTH_ALPHAS:
            qmodel, shift = build(alpha, (), code)
            logits = logits_of(qmodel, agreement_images, f"{desc}: alpha {alpha}, weights +-{code}")
            deviations[code, alpha] = margin_rms(logits, reference_margins)
            if deviations[code, alpha] == min(deviations.values()):
                built = {"alpha": alpha, "code": code, "shift": shift, "model": qmodel,
                         "decisions": predict_labels(logits, threshold)}
    alpha, code = built["alpha"], built["code"]
    sensitivity = linear_sensitivity(model, calibration, names,
                                     lambda n, lin: Int8Linear.from_linear(lin, absmax[n], alpha, code))
    order = sorted(names, key=lambda n: -sensitivity[n])
    shifts = {0: built["shift"]}

    def candidate(fp32_layers):
        if not fp32_layers:
            return built["decisions"], built["model"]
        qmodel, shifts[len(fp32_layers)] = build(alpha, fp32_layers, code)
        if state_dict_bytes(qmodel) / 1e6 >= TARGET_MAX_SIZE_MB:
            return None
        return predict_labels(logits_of(qmodel, agreement_images, f"{desc}: {len(fp32_layers)} fp32 layer(s)"),
                              threshold), qmodel

    best, tried = choose_fp32_layers(order, reference, candidate)
    k, agreement, qmodel = best
    info = smooth_quant_info(order[:k], len(names), code, alpha=alpha,
                             alphas_tried=[[a, deviations[code, a]] for a in SMOOTH_ALPHAS],
                             weight_codes_tried=[[c, min(d for (c2, _), d in deviations.items() if c2 == c)]
                                                 for c in weight_codes()],
                             logit_shift=shifts[k], agreement=agreement, agreement_images=len(reference),
                             calibration_images=len(calibration), tried=[list(t) for t in tried],
                             seconds=time.perf_counter() - t0)
    return qmodel, info


def state_dict_bytes(model) -> int:
    """Bytes of the tensors a checkpoint of `model` holds (its file adds a few kB of config and metadata)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def dynamic_int8_linear(_name: str, linear: torch.nn.Linear):
    """One nn.Linear as the plain dynamic int8 quantizes it (one activation scale per tensor): the error model of
    ONNX Runtime's dynamic int8 too, to rank its layers."""
    with quiet_quantization_warnings():
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(torch.nn.Sequential(copy.deepcopy(linear)), {torch.nn.Linear}, dtype=torch.qint8)[0]
