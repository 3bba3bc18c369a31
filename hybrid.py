"""The hybrid classifier for small defects: the fine-tuned classifier's own pass gives its head logit and, from two
of its blocks, patch features; their distances to a memory bank of the train split's good patches give a patch
score; a logistic regression fitted on train fuses [head logit, log patch score] into one P(anomaly). It is one
nn.Module returning [N, 2] logits like the classifier, so it is exported, quantized, judged and served as any
variant (onnx_optimization.py builds it; lab_targets.hybrid_wins says when it replaces the plain head)."""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from detector import greedy_coreset, patch_features
from inference import IMAGE_SCORE_TOP, image_scores, nearest_distances
from lab_io import UserError
from lab_targets import HYBRID_PREFIX, auroc_no_gain_share, choose_threshold, hybrid_wins
from train_utils import base_model_of, linear_log_loss, pool_tokens

HYBRID_CORESET = 0.1          # share of the good train patches kept in the bank (PatchCore's 10 %)
HYBRID_BANK_PATCHES = 4096    # at most, both half-banks together: 4096 x 768 float32 = 12.6 MB in the graph
FUSION_C_GRID = (0.001, 0.01, 0.1, 1.0)
DISTANCE_FLOOR = 1e-6         # log(distance): a patch identical to a bank patch is at distance 0


def hybrid_layers(depth: int) -> list[int]:
    """The blocks whose patch tokens are compared with the bank: the middle and the last kept block (the classifier's
    truncated backbone already ends where its head reads)."""
    return sorted({max(1, depth // 2), depth})


class HybridClassifier(torch.nn.Module):
    """pixel_values [N, 3, H, W] -> logits [N, 2] = [-f/2, f/2], f = w_logit * head logit + w_distance *
    log(patch score) + bias, so that softmax gives P(anomaly) = sigmoid(f) as for the classifier. The patch score
    is the mean over the two half-banks of the mean of the top `score_top` share of the patch distances (the
    detector's image score, inference.image_scores)."""

    def __init__(self, model, layers: list[int], bank_a: torch.Tensor, bank_b: torch.Tensor, fusion,
                 score_top: float = IMAGE_SCORE_TOP):
        super().__init__()
        base, self.pooling = base_model_of(model)
        if base is None:
            raise UserError(f"{type(model).__name__} is not a ViT / DeiT / DINOv2 classifier: no hybrid.")
        self.model, self.layers, self.score_top = model.eval(), list(layers), float(score_top)
        self.patch_size = int(getattr(model.config, "patch_size", 16))
        self.register_buffer("bank_a", bank_a.float().contiguous())
        self.register_buffer("bank_b", bank_b.float().contiguous())
        # |b|^2 once, here: computed in the graph it would keep a float32 copy of the bank beside the MatMul's
        self.register_buffer("bank_sq_a", (self.bank_a * self.bank_a).sum(-1))
        self.register_buffer("bank_sq_b", (self.bank_b * self.bank_b).sum(-1))
        self.register_buffer("fusion", torch.tensor([float(v) for v in fusion], dtype=torch.float32))

    @staticmethod
    def _nearest(feats: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor) -> torch.Tensor:
        """[N, P] distance of each patch to its nearest bank patch."""
        d2 = (feats * feats).sum(-1, keepdim=True) - 2.0 * feats @ bank.T + bank_sq
        return d2.min(-1).values.clamp(min=0.0).sqrt()

    def _top_mean(self, nearest: torch.Tensor) -> torch.Tensor:
        k = max(1, int(self.score_top * nearest.shape[1]))
        return nearest.topk(k, dim=1).values.mean(1)

    def evidence(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head logit z = l1 - l0 [N], patch features [N, P, D]) of one backbone pass."""
        base, _ = base_model_of(self.model)
        out = base(pixel_values=pixel_values, output_hidden_states=True)
        logits = self.model.classifier(pool_tokens(out.last_hidden_state, self.pooling))
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        return logits[:, 1] - logits[:, 0], patch_features(out.hidden_states, self.layers, grid)

    def logits_and_map(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, 2], patch distances [N, P]: the mean of the two half-banks' nearest distances, on the patch
        grid, row by row: where the defect is)."""
        z, feats = self.evidence(pixel_values)
        near_a = self._nearest(feats, self.bank_a, self.bank_sq_a)
        near_b = self._nearest(feats, self.bank_b, self.bank_sq_b)
        score = 0.5 * (self._top_mean(near_a) + self._top_mean(near_b))
        f = self.fusion[0] * z + self.fusion[1] * torch.log(score.clamp(min=DISTANCE_FLOOR)) + self.fusion[2]
        return torch.stack([-f / 2, f / 2], 1), 0.5 * (near_a + near_b)

    def forward(self, pixel_values, with_map: bool = False):
        """logits [N, 2], or (logits, patch distances) with_map (the exported graph's two outputs)."""
        logits, patch_map = self.logits_and_map(pixel_values)
        return (logits, patch_map) if with_map else logits

    def grid(self, image_size) -> list[int]:
        return [int(image_size[0]) // self.patch_size, int(image_size[1]) // self.patch_size]


@torch.inference_mode()
def _evidence(hybrid: HybridClassifier, dataset, batch_size: int, desc: str):
    """(head logits [N], patch features [N, P, D] float32, labels [N]) of a dataset, in its order."""
    zs, feats, labels = [], [], []
    for i in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", leave=False):
        items = [dataset[j] for j in range(i, min(len(dataset), i + batch_size))]
        z, f = hybrid.evidence(torch.stack([x for x, _ in items]))
        zs.append(z.float().numpy())
        feats.append(f.float().numpy())
        labels += [int(y) for _, y in items]
    return np.concatenate(zs), np.concatenate(feats), np.asarray(labels, dtype=np.int64)


def _scores(feats: np.ndarray, bank: np.ndarray, top: float) -> np.ndarray:
    return image_scores(nearest_distances(feats, bank), top)


def _bank(feats: np.ndarray, n: int, seed: int) -> np.ndarray:
    flat = torch.from_numpy(feats.reshape(-1, feats.shape[-1]))
    return flat[greedy_coreset(flat, n, seed=seed)].numpy()


def _fit_fusion(x_train, y_train, x_val, y_val) -> tuple[np.ndarray, float, float]:
    """Logistic regression on [head logit, log patch score], standardised on train, fitted on train (balanced),
    C chosen by val log-loss. Returns (weights in raw units, bias, C)."""
    from sklearn.linear_model import LogisticRegression

    mean, std = x_train.mean(0), x_train.std(0) + 1e-12
    best = None
    for c in FUSION_C_GRID:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        clf.fit((x_train - mean) / std, y_train)
        weight = clf.coef_[0] / std
        bias = float(clf.intercept_[0] - (weight * mean).sum())
        nll = linear_log_loss(weight, bias, x_val, y_val)
        if best is None or nll < best[0]:
            best = (nll, weight, bias, c)
    return best[1], best[2], best[3]


def _val_summary(scores: np.ndarray, labels: np.ndarray, decisions: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    pos, neg = labels == 1, labels == 0
    return {"auroc": float(roc_auc_score(labels, scores)),
            "balanced_accuracy": float(0.5 * (decisions[pos].mean() + (1 - decisions[neg]).mean())),
            "accuracy": float((decisions == labels).mean())}


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def fit_hybrid(model, datasets: dict, threshold: float, *, batch_size: int = 16, seed: int = 0,
               score_top: float = IMAGE_SCORE_TOP) -> tuple[HybridClassifier, dict]:
    """The hybrid of `model` (the fine-tuned fp32 classifier), from its train and val datasets (not augmented) and
    its decision threshold. The bank holds the train split's good images only, as two half-banks (greedy coreset
    of each half): a train good image is scored by the half that does not hold it, every other image by the mean
    of both, so that train, val and test scores share one scale. The fusion is fitted on train, its C and its
    threshold chosen on val; the bias is shifted so that the classifier's `threshold` gives the hybrid's own
    val-chosen decisions (one threshold for every variant). Returns (hybrid, info); info["use"] = hybrid_wins on
    val (never the test split)."""
    import time

    t0 = time.perf_counter()
    if base_model_of(model)[0] is None:
        raise UserError(f"{type(model).__name__} is not a ViT / DeiT / DINOv2 classifier with a 2-class head")
    depth = len(base_model_of(model)[0].encoder.layer)
    layers = hybrid_layers(depth)
    probe = HybridClassifier(model, layers, torch.zeros(1, 1), torch.zeros(1, 1), (1, 0, 0), score_top)
    z_tr, f_tr, y_tr = _evidence(probe, datasets["train"], batch_size, "hybrid: train evidence")
    z_va, f_va, y_va = _evidence(probe, datasets["val"], batch_size, "hybrid: val evidence")
    good = np.flatnonzero(y_tr == 0)
    if len(good) < 2 or len(np.unique(y_tr)) < 2 or len(np.unique(y_va)) < 2:
        raise UserError("the hybrid needs good and defective images in train and val (at least 2 good in train).")
    half_a, half_b = good[0::2], good[1::2]
    per_half = max(1, min(int(HYBRID_CORESET * len(half_b) * f_tr.shape[1]), HYBRID_BANK_PATCHES // 2))
    bank_a, bank_b = _bank(f_tr[half_a], per_half, seed), _bank(f_tr[half_b], per_half, seed + 1)
    s_tr = 0.5 * (_scores(f_tr, bank_a, score_top) + _scores(f_tr, bank_b, score_top))
    s_tr[half_a] = _scores(f_tr[half_a], bank_b, score_top)  # never scored by a bank that holds the image
    s_tr[half_b] = _scores(f_tr[half_b], bank_a, score_top)
    s_va = 0.5 * (_scores(f_va, bank_a, score_top) + _scores(f_va, bank_b, score_top))
    x_tr = np.stack([z_tr, np.log(np.maximum(s_tr, DISTANCE_FLOOR))], 1)
    x_va = np.stack([z_va, np.log(np.maximum(s_va, DISTANCE_FLOOR))], 1)
    weight, bias, c = _fit_fusion(x_tr, y_tr, x_va, y_va)
    fused_va = x_va @ weight + bias
    own_threshold = choose_threshold(1 / (1 + np.exp(-fused_va)), y_va)
    head = _val_summary(z_va, y_va, (1 / (1 + np.exp(-z_va)) >= threshold).astype(np.int64))
    fused = _val_summary(fused_va, y_va, (fused_va >= _logit(own_threshold)).astype(np.int64))
    fused["no_gain_share"] = auroc_no_gain_share(y_va, z_va, fused_va, seed=seed)
    shifted = bias + _logit(threshold) - _logit(own_threshold)
    hybrid = HybridClassifier(model, layers, torch.from_numpy(bank_a), torch.from_numpy(bank_b),
                              (weight[0], weight[1], shifted), score_top).eval()
    info = {"use": hybrid_wins(head, fused), "layers": layers, "bank_patches": int(len(bank_a) + len(bank_b)),
            "bank_train_indices": [int(i) for i in good],
            "bank_mb": (bank_a.nbytes + bank_b.nbytes) / 1e6, "bank_images": int(len(good)), "C": c,
            "w_logit": float(weight[0]), "w_log_distance": float(weight[1]), "bias": shifted,
            "own_threshold": float(own_threshold), "val_head": head, "val_fused": fused,
            # the colour scale of its maps (red = this distance): the 95th percentile of the val good images' scores
            "map_reference": float(np.quantile(s_va[y_va == 0], 0.95)),
            "seconds": time.perf_counter() - t0}
    return hybrid, info


def fit_for_mode(model, datasets: dict, threshold: float, mode: str, batch_size: int = 16, indent: str = ""):
    """fit_hybrid for --hybrid `mode`: (hybrid, info) when its variants are to be built (hybrid_verdict), else
    (None, info or None); the line that says which and why is printed. With auto, a model or a split the hybrid cannot
    use (not a ViT, no defect in train or val) is a note, not an error; with on, it is the error."""
    if mode == "off":
        return None, None
    try:
        hybrid, info = fit_hybrid(model, datasets, threshold, batch_size=batch_size)
    except UserError as exc:
        if mode == "on":
            raise
        print(f"{indent}note: the hybrid classifier was not fitted: {exc}")
        return None, None
    print(indent + describe_hybrid(info, mode))
    return (hybrid, info) if hybrid_verdict(info, mode) else (None, info)


def describe_hybrid(info: dict, mode: str = "auto") -> str:
    head, fused = info["val_head"], info["val_fused"]
    verdict = "used (lab_targets.hybrid_wins)" if info["use"] else "it does not beat the head on val: " + (
        "built anyway (--hybrid on)" if mode == "on" else "not used")
    return (f"hybrid head logit + patch distances (blocks {'+'.join(map(str, info['layers']))}, bank of "
            f"{info['bank_patches']} good train patches from {info['bank_images']} images, {info['bank_mb']:.1f} MB; "
            f"fusion C={info['C']}, {info['w_logit']:.3g} x logit + {info['w_log_distance']:.3g} x log distance): "
            f"val AUROC {head['auroc']:.3f} -> {fused['auroc']:.3f} (no gain in {fused['no_gain_share'] * 100:.1f} % "
            f"of the bootstrap resamples), val balanced accuracy "
            f"{head['balanced_accuracy']:.3f} -> {fused['balanced_accuracy']:.3f}: {verdict} ({info['seconds']:.0f} s)")


HYBRID_ONNX = "model_hybrid_fp32.onnx"
HYBRID_CHOICES = ("auto", "on", "off")
HYBRID_HELP = ("the hybrid classifier (head logit + patch distances to the train split's good patches, one graph): "
               "auto = fitted, its variants built and chosen among when it beats the head on val "
               "(lab_targets.hybrid_wins); on = always; off = not fitted (default: auto)")


def hybrid_verdict(info: dict, mode: str) -> bool:
    """Whether the hybrid's variants are built: its val verdict (auto), or --hybrid on."""
    return info["use"] or mode == "on"


def guard_mask(info: dict, n_train: int, n_val: int) -> np.ndarray:
    """Which of the guard's images (train then val, lab_targets.SELECTION_SPLITS) judge the hybrid's variants: all
    but the bank's own images. A train good image is in the bank, so its patch distance is near 0 in every variant
    and its decision never moves: counted, it would make any int8 look faithful."""
    mask = np.ones(n_train + n_val, dtype=bool)
    mask[info["bank_train_indices"]] = False
    return mask


def guard_datasets(datasets: dict, info: dict) -> dict:
    """The train (minus the bank's images) and val datasets: what the hybrid's int8 must agree on (guard_mask)."""
    from torch.utils.data import Subset

    bank = set(info["bank_train_indices"])
    kept = [i for i in range(len(datasets["train"])) if i not in bank]
    return {"train": Subset(datasets["train"], kept), "val": datasets["val"]}


def hybrid_variants(hybrid: HybridClassifier, models_dir, datasets: dict, info: dict, threshold: float,
                    preprocessing: dict, opset: int, n_calibration: int, overwrite: bool) -> tuple[dict, dict]:
    """The hybrid as one graph: exported to ONNX (checked against PyTorch), run by OpenVINO in fp32 / bf16, and
    NNCF int8 by the classifier's route (engines.openvino_variants: calibrated on train images, mixed precision by
    the label-free agreement rule against the PyTorch hybrid's decisions on the guard's images, guard_datasets), its
    fp32 constants (the bank) stored in fp16: half the bytes, distances to ~1e-3. Returns (export info,
    {hybrid-<variant>: spec})."""
    from pathlib import Path

    from engines import agreement_images, export_onnx, openvino_variants, ranked_linear_nodes

    models_dir = Path(models_dir)
    onnx_file = models_dir / HYBRID_ONNX
    export = export_onnx(hybrid, onnx_file, preprocessing, opset, overwrite=overwrite, map_output=True)
    print(f"exported the hybrid to {export['path']} ({export['exporter']}, opset {export['opset']}, "
          f"{export['export_seconds']:.1f} s); max |logit diff| vs PyTorch on random input "
          f"{export['check_max_abs_diff']:.2g}")
    order, nodes = ranked_linear_nodes(onnx_file, hybrid, datasets["train"])
    images, reference = agreement_images(hybrid, guard_datasets(datasets, info), threshold)
    specs = openvino_variants(onnx_file, models_dir, hybrid, datasets, threshold, n_calibration, overwrite,
                              prefix="model_hybrid_", fp16_constants=True,
                              basis={"order": order, "nodes": nodes, "images": images, "reference": reference})
    return export, {HYBRID_PREFIX + name: spec for name, spec in specs.items()}
