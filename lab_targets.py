"""The lab's decisions in one place, and the statistics they are judged with. No torch: numpy only.

- Business targets (-80 % time, -70 % cost, < 30 MB, > 95 % accuracy, < 1 pt quantization loss, ONNX parity).
- The decision threshold rule (chosen on the validation split, never on test).
- Statistics that a test split of ~100 images supports: Wilson 95 % intervals, image-by-image flips between two
  variants and the exact McNemar test.
- One guard, `judge_variant`, used by quantization_demo.py, onnx_optimization.py and the pipeline, so that the
  three can never disagree on whether a variant is acceptable:
    * a *conversion* (same weights, fp32 graph: ONNX export, ORT fusion) must give the same predictions:
      agreement >= 99.5 % and |accuracy difference| < 0.5 pt (the lab's "ONNX within 0.5 %");
    * a *quantization* (int8 weights) may change a few predictions; it is judged by its accuracy loss vs fp32:
      < 1 pt (the lab's "quantization loss < 1 pt"). Flips are counted and tested (McNemar) and reported.
"""
from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------
TARGET_TIME_REDUCTION_PCT = 80.0   # -80 % inference time vs the baseline (batch 1, median)
TARGET_COST_REDUCTION_PCT = 70.0   # -70 % cost per 1000 images
TARGET_MAX_SIZE_MB = 30.0          # model file < 30 MB (10^6 bytes)
TARGET_MIN_ACCURACY = 0.95         # test accuracy > 95 %
TARGET_MAX_LOSS_PT = 1.0           # accuracy loss of a quantized model vs its fp32 source < 1 point
PARITY_MIN_AGREEMENT = 0.995       # a converted fp32 graph agrees with PyTorch on >= 99.5 % of the test images
PARITY_MAX_ACCURACY_DIFF_PT = 0.5  # ... and its accuracy differs by < 0.5 point

LAB_EPOCHS = 3                     # the lab's command: benchmark_gpu.py --epochs 3 (pretrained models)

# Prices: Azure pay-as-you-go Linux VMs, region East US, list prices as of 2024.
PRICE_URL = "https://azure.microsoft.com/pricing/details/virtual-machines/linux/"
CPU_VM, CPU_PRICE = "Azure Standard_D4s_v5 (4 vCPU, 16 GiB), East US", 0.192
GPU_VM, GPU_PRICE = "Azure Standard_NC4as_T4_v3 (1x NVIDIA T4), East US", 0.526
PRICE_NOTE = f"pay-as-you-go Linux list prices as of 2024, check {PRICE_URL}"

CONVERSION, QUANTIZATION = "conversion", "quantization"
THRESHOLD_RULE = "best balanced accuracy on the validation split (midpoint between neighbouring scores)"


# --------------------------------------------------------------------------------------------------
# Scores, threshold, predictions
# --------------------------------------------------------------------------------------------------
def anomaly_scores(logits) -> np.ndarray:
    """P(anomaly) = softmax(logits)[:, 1], computed stably from a [N, 2] array of logits."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"expected logits of shape [N, 2], got {logits.shape}")
    return 1.0 / (1.0 + np.exp(-(logits[:, 1] - logits[:, 0])))


def predict_labels(logits, threshold: float = 0.5) -> np.ndarray:
    """1 (anomaly) where P(anomaly) >= threshold, else 0 (good)."""
    return (anomaly_scores(logits) >= threshold).astype(np.int64)


def choose_threshold(scores, labels) -> float:
    """The decision threshold on P(anomaly) that maximises balanced accuracy on `scores` (the validation split).

    Candidates are the midpoints between neighbouring distinct scores (plus 0.5); among equally good ones the
    closest to 0.5 is kept, so that a perfectly separated split does not push the threshold to an extreme.
    Without both classes the usual 0.5 is returned."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(scores) == 0 or len(np.unique(labels)) < 2:
        return 0.5
    distinct = np.unique(scores)
    candidates = np.unique(np.concatenate([(distinct[:-1] + distinct[1:]) / 2, [0.5]]))
    pos, neg = labels == 1, labels == 0
    best, best_key = 0.5, None
    for t in candidates:
        pred = scores >= t
        bacc = 0.5 * (pred[pos].mean() + (~pred[neg]).mean())
        key = (round(float(bacc), 12), -abs(float(t) - 0.5))
        if best_key is None or key > best_key:
            best, best_key = float(t), key
    return best


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n (good coverage at n ~ 100, unlike k/n +- 1.96 se)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else low), (1.0 if k == n else high)  # exact at the bounds, no 0.9999999


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b and c are the discordant pairs (reference right / variant wrong, and
    the reverse). Under 'no difference' b ~ Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def accuracy_with_interval(preds, labels) -> dict:
    preds, labels = np.asarray(preds), np.asarray(labels)
    n, k = len(labels), int((preds == labels).sum())
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "correct": k, "n": n, "ci_low": low, "ci_high": high,
            "one_image_pt": 100.0 / n if n else float("nan")}


def format_accuracy(acc: dict) -> str:
    """'97.50 % [95 % CI 92.9-99.1] (117/120)': the accuracy, its Wilson interval and the counts. Takes
    accuracy_with_interval()'s dict or a metrics dict (accuracy_ci_low / accuracy_ci_high / correct / n)."""
    n = acc.get("n") or 0
    if not n:
        return "n/a (no test image)"
    low, high = acc.get("ci_low", acc.get("accuracy_ci_low")), acc.get("ci_high", acc.get("accuracy_ci_high"))
    correct = acc.get("correct", round(acc["accuracy"] * n))
    return f"{acc['accuracy'] * 100:.2f} % [95 % CI {low * 100:.1f}-{high * 100:.1f}] ({correct}/{n})"


def compare_predictions(reference_preds, preds, labels) -> dict:
    """Image-by-image comparison of a variant with its reference on the same test images."""
    ref, pred, labels = (np.asarray(a, dtype=np.int64) for a in (reference_preds, preds, labels))
    n = len(labels)
    flipped = ref != pred
    good_to_anomaly = int((flipped & (ref == 0)).sum())
    anomaly_to_good = int((flipped & (ref == 1)).sum())
    ref_right, var_right = ref == labels, pred == labels
    b = int((ref_right & ~var_right).sum())   # the variant broke a right answer
    c = int((~ref_right & var_right).sum())   # the variant fixed a wrong answer
    return {"n": n, "flips": int(flipped.sum()), "good_to_anomaly": good_to_anomaly,
            "anomaly_to_good": anomaly_to_good, "flips_to_wrong": b, "flips_to_right": c,
            "agreement": float((~flipped).mean()) if n else float("nan"),
            "accuracy_diff_pt": 100.0 * (var_right.mean() - ref_right.mean()) if n else float("nan"),
            "mcnemar_p": mcnemar_exact_p(b, c), "one_image_pt": 100.0 / n if n else float("nan")}


def describe_flips(cmp: dict) -> str:
    """'2 of 120 predictions flipped (good -> anomaly 1, anomaly -> good 1; 1 now wrong, 1 now right),
    exact McNemar p = 1.00; one image = 0.83 pt'."""
    return (f"{cmp['flips']} of {cmp['n']} predictions flipped (good -> anomaly {cmp['good_to_anomaly']}, "
            f"anomaly -> good {cmp['anomaly_to_good']}; {cmp['flips_to_wrong']} now wrong, {cmp['flips_to_right']} "
            f"now right), exact McNemar p = {cmp['mcnemar_p']:.2f}; one image = {cmp['one_image_pt']:.2f} pt")


# --------------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------------
def judge_variant(kind: str, reference_preds, preds, labels) -> dict:
    """Is a variant acceptable next to its reference (same test images, same threshold)?

    kind = CONVERSION (fp32 graph of the same weights) or QUANTIZATION (int8 weights); see the module doc.
    Returns the comparison (flips, McNemar...) plus "kind", "rule" (text), "passed" (bool)."""
    cmp = compare_predictions(reference_preds, preds, labels)
    if kind == CONVERSION:
        passed = cmp["agreement"] >= PARITY_MIN_AGREEMENT and abs(cmp["accuracy_diff_pt"]) < PARITY_MAX_ACCURACY_DIFF_PT
        rule = (f"conversion parity: agreement >= {PARITY_MIN_AGREEMENT * 100:g} % and |accuracy difference| < "
                f"{PARITY_MAX_ACCURACY_DIFF_PT:g} pt")
    elif kind == QUANTIZATION:
        passed = -cmp["accuracy_diff_pt"] < TARGET_MAX_LOSS_PT
        rule = f"quantization loss: accuracy loss vs fp32 < {TARGET_MAX_LOSS_PT:g} pt"
    else:
        raise ValueError(f"unknown guard kind {kind!r}")
    if not cmp["n"]:
        passed = False
    return {**cmp, "kind": kind, "rule": rule, "passed": bool(passed)}
