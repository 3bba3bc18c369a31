"""Training helpers of the lab (PyTorch): seeding and device choice, the LP-FT recipe, the fine-tuning loop,
evaluation metrics and the PyTorch side of the inference benchmark.

Plain input/output (errors, atomic files, CSV, tables, the timed loop) is in lab_io.py, the lab's decisions and
statistics in lab_targets.py; nothing here parses command-line arguments.
"""
from __future__ import annotations

import copy
import math
import random
import time
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lab_io import UserError, benchmark, cpu_name
from lab_targets import accuracy_with_interval, anomaly_scores, choose_threshold, predict_labels

PRETRAINED_DEFAULT_LR = 1e-6    # fine-tuning a pretrained ViT after the linear probe (LP-FT), top block (Adam moves
# every weight by ~lr per step whatever its gradient: at 1e-5 the first epoch undid the probe on real screw, see docs/guide.md)
PRETRAINED_LAYER_DECAY = 0.75   # block i of L fine-tunes at lr * 0.75^(L - i): the early, generic blocks move least
OFFLINE_DEFAULT_LR = 1e-3       # the offline presets start from random weights and need a larger step
OFFLINE_DEFAULT_EPOCHS = 30     # ... and more epochs than the lab's 3 (used by tests and the demo)


def default_lr(pretrained: bool) -> float:
    return PRETRAINED_DEFAULT_LR if pretrained else OFFLINE_DEFAULT_LR


def training_recipe(pretrained: bool) -> dict:
    """How a model is fine-tuned; one recipe for benchmark_gpu.py and the pipeline (baseline and student).

    Pretrained backbone (LP-FT): linear probe on frozen features first (head init + depth, see
    linear_probe_init), then a gentle full fine-tune (lr 1e-6 at the top block, layer-wise decay 0.75) on the very
    images the probe was fitted on, without augmentation: a mirror is not a good part seen another way for every
    category (a mirrored screw has a left-hand thread, a mirrored capsule a reversed imprint, and faulty_imprint is
    one of its defects), and rotations and colour jitter move the frozen features the head was fitted on. The probe
    itself is kept when no epoch beats it on val.
    Random init (offline presets): plain training, larger lr, light augmentation, no probe."""
    if pretrained:
        return {"probe": True, "layer_decay": PRETRAINED_LAYER_DECAY, "head_lr_mult": 1.0, "keep_initial": True,
                "augment": "none"}
    return {"probe": False, "layer_decay": 1.0, "head_lr_mult": 1.0, "keep_initial": False, "augment": "light"}


# --------------------------------------------------------------------------------------------------
# Reproducibility, device, environment
# --------------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu. Asking for a device that is absent is a user error."""
    requested = (requested or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available here "
                        "(use --device cpu, or install the CUDA build of PyTorch).")
    if requested == "mps" and not has_mps:
        raise UserError("--device mps was asked for but Apple's MPS backend is not available here.")
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise UserError(f"unknown --device {requested!r}: use auto, cpu, cuda or mps.")
    return torch.device(requested)


def set_threads(num_threads: int | None) -> int:
    """Set PyTorch's intra-op threads (None = leave the default) and return the number in use."""
    if num_threads:
        if num_threads < 1:
            raise UserError("--num-threads must be >= 1.")
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_name()
    return device.type


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def class_weights(labels: Iterable[int], num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency ("balanced") weights, 1 per sample on average, so that the rarer anomaly class is not ignored."""
    counts = np.bincount(np.asarray(list(labels), dtype=int), minlength=num_classes).astype(float)
    counts[counts == 0] = 1.0
    weights = counts.sum() / (num_classes * counts)
    return torch.tensor(weights, dtype=torch.float32)


def warmup_cosine(optimizer, total_steps: int, warmup_frac: float = 0.1):
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of a Hugging Face image classifier (or of any module returning a tensor)."""
    out = model(pixel_values=pixel_values) if _is_hf(model) else model(pixel_values)
    return out.logits if hasattr(out, "logits") else out


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def base_model_of(model):
    """The backbone of a Hugging Face ViT-family classifier (.dinov2, .vit, .deit) and how its head pools the
    tokens: 'cls+mean' (DINOv2: CLS token and mean of the patch tokens) or 'cls'. (None, None) otherwise."""
    for attr, pooling in (("dinov2", "cls+mean"), ("vit", "cls"), ("deit", "cls")):
        base = getattr(model, attr, None)
        if base is not None and hasattr(base, "encoder") and hasattr(base.encoder, "layer"):
            head = getattr(model, "classifier", None)
            if isinstance(head, torch.nn.Linear) and head.out_features == 2:
                return base, pooling
    return None, None


def pool_tokens(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """The head's input from a block's (layer-normed) tokens, as base_model_of's `pooling` says."""
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], 1) if pooling == "cls+mean" else hidden[:, 0]


@torch.inference_mode()
def frozen_features(model, loader, device, desc: str = "features",
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled head inputs at every depth of the frozen backbone: ([N, depth, dim], labels [N]). The loader's
    augmentation is switched off while the features are computed; batch_size: the loader's unless given."""
    base, pooling = base_model_of(model)
    dataset = loader.dataset
    augment, dataset.augment = getattr(dataset, "augment", None), None
    feats, labels = [], []
    try:
        model.eval().to(device)
        step = batch_size or loader.batch_size
        for i in tqdm(range(0, len(dataset), step), desc=desc, leave=False, unit="batch"):
            items = [dataset[j] for j in range(i, min(len(dataset), i + step))]
            pixels = torch.stack([x for x, _ in items]).to(device)
            hidden = base(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]
            feats.append(torch.stack([pool_tokens(base.layernorm(h), pooling) for h in hidden], 1).float().cpu())
            labels += [int(y) for _, y in items]
    finally:
        dataset.augment = augment
    return torch.cat(feats).numpy(), np.asarray(labels, dtype=np.int64)


def truncate_backbone(model, depth: int) -> None:
    """Keep the first `depth` transformer blocks (the final layer norm and the head stay)."""
    keep_blocks(model, range(depth))


def keep_blocks(model, blocks) -> None:
    """Keep these transformer blocks, in this order (the embeddings, the final layer norm and the head stay). The
    config says so, so a checkpoint rebuilds the same, shorter model."""
    base, _ = base_model_of(model)
    base.encoder.layer = torch.nn.ModuleList([base.encoder.layer[i] for i in blocks])
    config = model.config
    config.num_hidden_layers = depth = len(base.encoder.layer)
    if getattr(config, "stage_names", None):  # DINOv2's backbone fields must name existing stages
        config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, depth + 1)]
        config.set_output_features_output_indices(out_features=[f"stage{depth}"], out_indices=None)


# STUDENT_FROM_BASELINE (lab_targets): every other block of the fine-tuned baseline (blocks 0, 2, 4, ..., as
# DistilBERT is made from BERT), trained to reproduce the baseline's logits, so that its guard (agreement with the
# baseline) can pass; measured in docs/guide.md.
STUDENT_FROM_BASELINE_LR = 1e-4  # measured on the demo: 3e-4 moved 4x more of the baseline's decisions


def half_depth_copy(model):
    """A copy of `model` with every other transformer block, starting from the first (STUDENT_FROM_BASELINE)."""
    student = copy.deepcopy(model)
    base, _ = base_model_of(student)
    keep_blocks(student, range(0, len(base.encoder.layer), 2))
    return student


PROBE_C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
PROBE_SCALINGS = ("raw", "standardised")


def _log_loss(proba: np.ndarray, labels: np.ndarray) -> float:
    proba = proba.clip(1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(labels == 1, np.log(proba), np.log(1 - proba))))


def int8_perturbed_copy(model):
    """A copy of `model` whose backbone has the plain dynamic int8 of part 2 (the classifier stays fp32): the
    strongest perturbation of the features that a shipped variant applies, used to choose a head that survives it."""
    import copy

    from quantize import quantize_dynamic_int8  # here, not at the top: quantize -> load_model_hf -> train_utils

    base, _ = base_model_of(model)
    perturbed = copy.deepcopy(model)
    for attr in ("dinov2", "vit", "deit"):
        if getattr(model, attr, None) is base:
            setattr(perturbed, attr, quantize_dynamic_int8(base))
    return perturbed.eval()


PROBE_FOLDS = 5


def _fit_probe(x: np.ndarray, x_int8: np.ndarray, y: np.ndarray, scaling: str, c: float) -> tuple[np.ndarray, float]:
    """Logistic regression on the fp32 and int8-backbone features of the same images, the scaling folded in:
    P(anomaly) = sigmoid(features @ weight + bias) in raw feature units."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_std=scaling == "standardised").fit(x)
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
    clf.fit(scaler.transform(np.concatenate([x, x_int8])), np.concatenate([y, y]))
    weight = clf.coef_[0] / (scaler.scale_ if scaler.scale_ is not None else 1.0)
    return weight, float(clf.intercept_[0] - (weight * scaler.mean_).sum())


def linear_log_loss(weight, bias, x, y) -> float:
    """Log-loss of P = sigmoid(x @ weight + bias) on labels y (a linear probe's, or the hybrid's fusion)."""
    return _log_loss(1 / (1 + np.exp(-(x @ weight + bias))), y)


def _cross_validated_key(x, x_int8, y, folds, scaling: str, c: float) -> tuple[float, float]:
    """Out-of-fold log-loss of a candidate on fp32 and on int8-backbone features (mean over the folds)."""
    nll, nll_int8 = [], []
    for fit_idx, held_idx in folds:
        weight, bias = _fit_probe(x[fit_idx], x_int8[fit_idx], y[fit_idx], scaling, c)
        nll.append(linear_log_loss(weight, bias, x[held_idx], y[held_idx]))
        nll_int8.append(linear_log_loss(weight, bias, x_int8[held_idx], y[held_idx]))
    return float(np.mean(nll)), float(np.mean(nll_int8))


def linear_probe_init(model, train_loader, val_loader, device, *, depth: str | int = "auto",
                      desc: str = "probe") -> dict:
    """LP of LP-FT (Kumar et al. 2022): fit a logistic regression on the frozen features of the train split and
    copy it into the new head, so that fine-tuning starts from a good classifier instead of a random one (a
    random head sends large, wrong gradients into the pretrained backbone for the first steps).

    depth='auto' also chooses how many transformer blocks to keep (upper half of the blocks): small local defects
    are often better described by intermediate blocks than by the last one.

    The head must survive what comes after it: int8 rounding of the backbone and fine-tuning steps both move the
    features a little, and a head that leans on directions where the images barely differ flips its decisions.
    So every head is fitted on the same images twice, through the fp32 backbone and through the plain dynamic-int8
    one (image by image: the strongest perturbation a shipped variant applies), and each candidate (depth, feature
    scaling: raw units or standardised, C) is judged by the worse of its two out-of-fold log-losses, on fp32 and
    on int8 features, in a stratified 5-fold cross-validation over train + val: a choice among ~80 candidates
    made on the 15 % of val alone follows its noise. The winner is refitted on train only (val stays out of
    sample for the threshold and the epochs); test is never seen. Returns what was chosen and measured, or
    {"applied": False, "reason"} for an architecture it does not know."""
    from sklearn.model_selection import StratifiedKFold

    base, _ = base_model_of(model)
    if base is None:
        return {"applied": False, "reason": f"no linear-probe support for {type(model).__name__}"}
    if isinstance(getattr(model, "cls_classifier", None), torch.nn.Module):
        return {"applied": False, "reason": "two-head distilled DeiT: head left at its init"}
    n_layers = len(base.encoder.layer)  # checked before a minute of feature extraction
    if depth == "auto":
        depths = list(range(max(1, (n_layers + 1) // 2), n_layers + 1))
    else:
        depths = [n_layers if depth in ("full", None) else int(depth)]
        if not 1 <= depths[0] <= n_layers:
            raise UserError(f"--depth {depth}: the model has {n_layers} blocks.")
    t0 = time.perf_counter()
    x_train, y_train = frozen_features(model, train_loader, device, desc=f"{desc} train features")
    x_val, y_val = frozen_features(model, val_loader, device, desc=f"{desc} val features")
    if len(np.unique(y_train)) < 2:
        return {"applied": False, "reason": "the train split has a single class"}
    perturbed = int8_perturbed_copy(model.cpu())  # image by image: dynamic int8 scales over the whole batch
    x_train_int8 = frozen_features(perturbed, train_loader, "cpu", batch_size=1,
                                   desc=f"{desc} train features, int8 backbone")[0]
    x_val_int8 = frozen_features(perturbed, val_loader, "cpu", batch_size=1,
                                 desc=f"{desc} val features, int8 backbone")[0] if len(y_val) else x_val
    x_pool, x_pool_int8 = np.concatenate([x_train, x_val]), np.concatenate([x_train_int8, x_val_int8])
    y_pool = np.concatenate([y_train, y_val])
    n_folds = min(PROBE_FOLDS, int(np.bincount(y_pool).min()))
    folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=0).split(y_pool, y_pool)) \
        if n_folds >= 2 else []
    best = None
    for d in tqdm(depths, desc=f"{desc}: choosing depth, scaling, C ({n_folds}-fold)", leave=False, unit="depth"):
        for scaling in PROBE_SCALINGS:
            for c in PROBE_C_GRID:
                if folds:
                    nll, nll_int8 = _cross_validated_key(x_pool[:, d - 1], x_pool_int8[:, d - 1], y_pool, folds,
                                                         scaling, c)
                else:  # too few images of a class to cross-validate: full depth, raw units, C = 0.1
                    nll = nll_int8 = 0.0 if (d, scaling, c) == (depths[-1], "raw", 0.1) else 1.0
                if best is None or max(nll, nll_int8) < best["key"]:
                    best = dict(key=max(nll, nll_int8), nll=nll, nll_int8=nll_int8, depth=d, scaling=scaling, C=c)
    d = best["depth"]
    weight, bias = _fit_probe(x_train[:, d - 1], x_train_int8[:, d - 1], y_train, best["scaling"], best["C"])
    flips = int(((x_val[:, d - 1] @ weight + bias >= 0) != (x_val_int8[:, d - 1] @ weight + bias >= 0)).sum())
    if d < n_layers:
        truncate_backbone(model, d)
    with torch.no_grad():  # logits [-z/2, z/2]: softmax gives P(anomaly) = sigmoid(z), the probe's probability
        model.classifier.weight.copy_(torch.tensor(np.stack([-weight / 2, weight / 2]), dtype=torch.float32))
        model.classifier.bias.copy_(torch.tensor([-bias / 2, bias / 2], dtype=torch.float32))
    nan = float("nan")
    info = {"applied": True, "depth": d, "depth_of": n_layers, "C": best["C"], "scaling": best["scaling"],
            "folds": n_folds, "cv_log_loss": best["nll"], "cv_log_loss_int8": best["nll_int8"],
            "val_log_loss": linear_log_loss(weight, bias, x_val[:, d - 1], y_val) if len(y_val) else nan,
            "val_log_loss_int8": linear_log_loss(weight, bias, x_val_int8[:, d - 1], y_val) if len(y_val) else nan,
            "val_flips_int8": flips, "train_log_loss": linear_log_loss(weight, bias, x_train[:, d - 1], y_train),
            "depths_tried": depths, "seconds": time.perf_counter() - t0}
    print(f"[{desc}] linear probe on frozen features: kept {d}/{n_layers} blocks, {best['scaling']} features, "
          f"C={best['C']} ({n_folds}-fold log-loss on train + val {best['nll']:.3f} fp32 / {best['nll_int8']:.3f} "
          f"through an int8 backbone; val {info['val_log_loss']:.3f} / {info['val_log_loss_int8']:.3f}, "
          f"{flips}/{len(y_val)} val decisions moved at P=0.5), head initialised ({info['seconds']:.1f} s)")
    return info


def param_groups(model, lr: float, *, weight_decay: float, layer_decay: float = 1.0, head_lr_mult: float = 1.0):
    """AdamW groups: layer-wise lr decay (block i of L gets lr * layer_decay^(L - i), embeddings the smallest),
    head at lr * head_lr_mult, no weight decay on biases, norms and embeddings."""
    base, _ = base_model_of(model)
    n_layers = len(base.encoder.layer) if base is not None else 0
    groups: dict = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if base is None:
            mult = 1.0
        elif ".encoder.layer." in name:
            block = int(name.split(".encoder.layer.")[1].split(".")[0])
            mult = layer_decay ** (n_layers - block)
        elif ".embeddings." in name:
            mult = layer_decay ** (n_layers + 1)
        elif name.startswith(("classifier", "cls_classifier", "distillation_classifier")):
            mult = head_lr_mult
        else:  # final layer norm
            mult = 1.0
        no_decay = param.ndim <= 1 or "token" in name or "position_embeddings" in name
        groups.setdefault((mult, no_decay), []).append(param)
    return [{"params": params, "lr": lr * mult, "weight_decay": 0.0 if no_decay else weight_decay}
            for (mult, no_decay), params in groups.items()]


DISTILL_LOSSES = ("kl", "mse")


def distillation_term(logits, teacher_logits, kind: str = "kl", temperature: float = 2.0) -> torch.Tensor:
    """kl: the KL divergence to the teacher's softened logits (Hinton et al. 2015), scaled by T^2 so that its
    gradients keep their size. mse: the mean squared difference of the logits themselves (Kim et al. 2021), for a
    student that must reproduce the teacher's decisions at the teacher's threshold."""
    if kind == "mse":
        return F.mse_loss(logits.float(), teacher_logits.float())
    t = temperature
    return F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean") * t * t


def training_loss(model, pixels, labels, weight, teacher=None, distill_alpha: float = 0.5,
                  distill_temperature: float = 2.0, distill_loss: str = "kl") -> torch.Tensor:
    """Weighted cross-entropy; with `teacher`, mixed with a distillation term (distillation_term)."""
    logits = model_logits(model, pixels)
    loss = F.cross_entropy(logits.float(), labels, weight=weight)
    if teacher is None:
        return loss
    with torch.no_grad():
        teacher_logits = model_logits(teacher, pixels).float()
    kd = distillation_term(logits, teacher_logits, distill_loss, distill_temperature)
    return (1 - distill_alpha) * loss + distill_alpha * kd


def train_model(model, train_loader, val_loader, *, epochs: int, lr: float, device: torch.device,
                weight_decay: float = 0.05, warmup_frac: float = 0.1, loss_weights: torch.Tensor | None = None,
                grad_clip: float = 1.0, amp: bool = True, teacher=None, distill_alpha: float = 0.5,
                distill_temperature: float = 2.0, distill_loss: str = "kl", teacher_threshold: float | None = None,
                layer_decay: float = 1.0, head_lr_mult: float = 1.0, keep_initial: bool = False,
                desc: str = "train") -> dict:
    """Fine-tune `model` (AdamW with layer-wise lr decay, warm-up + cosine, weighted cross-entropy, gradient
    clipping, AMP on CUDA).

    The weights of the epoch with the best validation score are restored at the end: balanced accuracy at the
    threshold that is best on val, then lower val log-loss. keep_initial=True makes the starting weights a
    candidate too (epoch 0: after a linear probe, fine-tuning is kept only if it does better on val). With
    `teacher`, the loss mixes cross-entropy and a distillation term (distillation_term, `distill_loss`). With `teacher_threshold` too (a student that reproduces its teacher's logits,
    distill_loss="mse"), the student keeps the teacher's threshold and the kept epoch is the one whose val logits are
    closest to the teacher's (no label): what its guard measures is agreement with the teacher. Returns {"history",
    "best_epoch", "train_seconds", "epoch_seconds", "threshold" (chosen on val for the kept weights)}.
    """
    if epochs < 1:
        raise UserError("--epochs must be >= 1.")
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.AdamW(param_groups(model, lr, weight_decay=weight_decay, layer_decay=layer_decay,
                                               head_lr_mult=head_lr_mult))
    scheduler = warmup_cosine(optimizer, epochs * max(1, len(train_loader)), warmup_frac)
    use_amp = amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    weight = loss_weights.to(device) if loss_weights is not None else None

    history, epoch_seconds = [], []
    best = {"key": None, "state": None, "epoch": 0, "threshold": 0.5}

    teacher_val = None  # a mimicking student is judged against the teacher's val logits
    if teacher is not None and teacher_threshold is not None:
        teacher_val, _ = predict_logits(teacher, val_loader, device, desc=f"{desc} teacher val")

    def validate(epoch: int, train_loss: float, seconds: float) -> None:
        row, key, text = validation_row(model, val_loader, device, epoch=epoch, train_loss=train_loss,
                                        seconds=seconds, teacher_val=teacher_val, teacher_threshold=teacher_threshold,
                                        desc=f"{desc} val")
        history.append(row)
        print(f"[{desc}] epoch {epoch}/{epochs}: {text}")
        if best["key"] is None or key > best["key"]:
            best.update(key=key, epoch=epoch, threshold=row["val_threshold"],
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    if keep_initial:  # epoch 0 = the starting weights, with their loss on the (augmented) train batches
        validate(0, loader_loss(model, train_loader, device, weight, desc=f"{desc} epoch 0 train"), 0.0)
    def step(pixels, labels) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss = training_loss(model, pixels, labels, weight, teacher, distill_alpha, distill_temperature,
                                 distill_loss)
        if torch.isfinite(loss):  # else diverged: no update, the caller stops with the best epoch kept
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        return loss

    for epoch in range(1, epochs + 1):
        sync(device)
        t0 = time.perf_counter()
        train_loss = run_epoch(model, train_loader, device, step, desc=f"{desc} epoch {epoch}/{epochs}")
        sync(device)
        epoch_seconds.append(time.perf_counter() - t0)
        if train_loss is None:
            stop_diverged(desc, epoch, lr, best)
            break
        validate(epoch, train_loss, epoch_seconds[-1])
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"history": history, "best_epoch": best["epoch"], "train_seconds": float(sum(epoch_seconds)),
            "epoch_seconds": epoch_seconds, "threshold": best["threshold"]}


def run_epoch(model, loader, device, step, desc: str) -> float | None:
    """One pass of `step(pixels, labels) -> loss` over the loader in train mode: the mean loss, or None as soon as a
    loss is nan or inf (the training diverged)."""
    model.train()
    running, seen = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, unit="batch")
    for pixels, labels in bar:
        loss = step(pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        if not torch.isfinite(loss):
            bar.close()
            return None
        running += loss.item() * labels.size(0)
        seen += labels.size(0)
        bar.set_postfix(loss=f"{running / seen:.4f}")
    return running / max(1, seen)


def stop_diverged(desc: str, epoch: int, lr: float, best: dict) -> None:
    """The loss became nan or inf in `epoch`: an error if no epoch before it can be kept, else say which is."""
    if best["state"] is None:
        raise UserError(f"[{desc}] training diverged in epoch {epoch} (loss nan or inf): the learning rate {lr:g} "
                        "is too high for this model; lower --lr (e.g. 10 times)")
    print(f"[{desc}] warning: training diverged in epoch {epoch} (loss nan or inf, learning rate {lr:g}): stopped; "
          f"epoch {best['epoch']} is kept, the best on val before it")


def validation_row(model, val_loader, device, *, epoch: int, train_loss: float, seconds: float,
                   teacher_val=None, teacher_threshold: float | None = None,
                   desc: str = "val") -> tuple[dict, tuple, str]:
    """One epoch's val metrics (history row), its selection key (higher is better) and its printed line:
    balanced accuracy at the threshold best on val, then lower val log-loss; for a student that mimics its teacher
    (`teacher_val` = the teacher's val logits), at the teacher's threshold, the smaller squared difference of the
    val logits (no label)."""
    val_logits, val_labels = predict_logits(model, val_loader, device, desc=desc)
    if teacher_val is not None:
        threshold = teacher_threshold
    else:
        threshold = choose_threshold(anomaly_scores(val_logits), val_labels) if len(val_labels) else 0.5
    val = classification_metrics(val_labels, val_logits, threshold=threshold)
    val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_labels)).item()) \
        if len(val_labels) else float("nan")
    row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val["accuracy"],
           "val_balanced_accuracy": val["balanced_accuracy"], "val_f1": val["f1"], "val_auroc": val["auroc"],
           "val_threshold": threshold, "epoch_seconds": seconds}
    mimic_text = ""
    if teacher_val is not None:
        row["val_distill_loss"] = float(distillation_term(torch.from_numpy(val_logits), torch.from_numpy(teacher_val),
                                                          "mse"))
        same = float((predict_labels(val_logits, threshold) == predict_labels(teacher_val, threshold)).mean())
        mimic_text = f", val logits vs the teacher's: MSE {row['val_distill_loss']:.4f}, same decision {same:.3f}"
        key = (-row["val_distill_loss"],)
    else:
        key = (val["balanced_accuracy"] if math.isfinite(val["balanced_accuracy"]) else 0.0,
               -val_loss if math.isfinite(val_loss) else 0.0)
    text = (f"train loss {train_loss:.4f}, val loss {val_loss:.4f}, val acc {val['accuracy']:.3f} (balanced "
            f"{val['balanced_accuracy']:.3f} at threshold {threshold:.3f}), val AUROC {val['auroc']:.3f}{mimic_text} "
            f"({seconds:.1f} s)")
    return row, key, text


@torch.inference_mode()
def loader_loss(model, loader, device, weight=None, desc: str = "loss") -> float:
    """Mean weighted cross-entropy of `model` (eval mode) over a loader, the loss the training epochs print."""
    model.eval()
    total, seen = 0.0, 0
    for pixels, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
        logits = model_logits(model, pixels.to(device)).float()
        total += float(F.cross_entropy(logits, labels.to(device), weight=weight).item()) * labels.size(0)
        seen += labels.size(0)
    return total / max(1, seen)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_logits(model, loader, device: torch.device | str = "cpu", desc: str = "predict"):
    """Run `model` over a loader of (pixels, labels); return (logits float32 [N, 2], labels int64 [N])."""
    device = torch.device(device)
    model.eval()
    all_logits, all_labels = [], []
    for pixels, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
        logits = model_logits(model, pixels.to(device))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    if not all_logits:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy().astype(np.int64)


def classification_metrics(labels, logits, defect_types=None, threshold: float = 0.5) -> dict:
    """Accuracy (with its 95 % Wilson interval), balanced accuracy, precision, recall, F1 (anomaly = positive
    class), AUROC, confusion matrix, recall per defect type.

    `logits` is [N, 2]; score = softmax probability of 'anomaly'; prediction = score >= `threshold` (the
    threshold chosen on the validation split and stored with the model; 0.5 = argmax)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    if len(labels) == 0:
        nan = float("nan")
        return {"n": 0, "accuracy": nan, "accuracy_ci_low": nan, "accuracy_ci_high": nan, "balanced_accuracy": nan,
                "precision": nan, "recall": nan, "f1": nan, "auroc": nan, "threshold": threshold,
                "confusion_matrix": [[0, 0], [0, 0]], "recall_per_defect": {}, "predictions": []}
    scores = anomaly_scores(logits)
    preds = predict_labels(logits, threshold)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, average="binary", pos_label=1,
                                                               zero_division=0)
    two_classes = len(np.unique(labels)) == 2
    auroc = float(roc_auc_score(labels, scores)) if two_classes else float("nan")
    acc = accuracy_with_interval(preds, labels)
    per_class = [float((preds[labels == c] == c).mean()) for c in (0, 1) if (labels == c).any()]
    result = {"n": int(len(labels)), "accuracy": acc["accuracy"], "accuracy_ci_low": acc["ci_low"],
              "accuracy_ci_high": acc["ci_high"], "correct": acc["correct"],
              "balanced_accuracy": float(np.mean(per_class)), "precision": float(precision),
              "recall": float(recall), "f1": float(f1), "auroc": auroc, "threshold": float(threshold),
              "confusion_matrix": confusion_matrix(labels, preds, labels=[0, 1]).tolist(),
              "recall_per_defect": {}, "predictions": preds.tolist()}
    if defect_types is not None:
        defect_types = np.asarray(defect_types)
        for defect in sorted(set(defect_types.tolist())):
            mask = defect_types == defect
            # for 'good' this is the share of good parts recognised as good (specificity)
            result["recall_per_defect"][defect] = float((preds[mask] == labels[mask]).mean())
    return result


# --------------------------------------------------------------------------------------------------
# Inference benchmark (in the spirit of timm's benchmark.py)
# --------------------------------------------------------------------------------------------------
def sync(device) -> None:
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def benchmark_batch(dataset, batch_size: int) -> torch.Tensor:
    """A fixed batch of real test images (repeated when the split is smaller than the batch)."""
    if len(dataset) == 0:
        raise UserError("the saved test split is empty: nothing to evaluate.")
    return torch.stack([dataset[i % len(dataset)][0] for i in range(batch_size)])


def torch_job(model, example: torch.Tensor, device="cpu") -> dict:
    """A PyTorch model on a fixed input batch, under inference_mode, as a lab_io.benchmark_rounds job."""
    device = torch.device(device)
    model.eval().to(device)
    example = example.to(device)

    @torch.inference_mode()
    def run():
        return model_logits(model, example)

    return {"run": run, "batch_size": example.shape[0], "device": device.type, "threads": torch.get_num_threads(),
            "sync": lambda: sync(device)}


def benchmark_torch_model(model, example: torch.Tensor, device="cpu", **kwargs) -> dict:
    """benchmark() applied to a PyTorch model on a fixed input batch, under inference_mode."""
    job = torch_job(model, example, device)
    return benchmark(job["run"], batch_size=job["batch_size"], device=job["device"], threads=job["threads"],
                     sync=job["sync"], **kwargs)
