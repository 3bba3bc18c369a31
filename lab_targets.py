"""The lab's decisions in one place, and the statistics they are judged with. No torch: numpy only.

- Business targets (-80 % time, -70 % cost, < 30 MB, > 95 % accuracy, < 1 pt quantization loss, ONNX parity).
- The decision threshold rule (chosen on the validation split, never on test).
- Statistics that a test split of ~100 images supports: Wilson 95 % intervals, image-by-image flips between two
  variants and the exact McNemar test.
- One guard, `judge_selection`, used by quantization_demo.py, onnx_optimization.py and the pipeline, so that the
  three can never disagree on whether a variant is acceptable. It compares a variant's decisions with those of the
  model it was made from on the train + val images, without their labels; the test split is never read by a choice
  (the guard, the recommendation, model_final), it is measured once per variant and reported (`compare_logits`):
    * a *conversion* (same weights, fp32 graph: ONNX export, ORT fusion) must give the same decisions on
      >= 99.5 % of those images (the lab's "ONNX within 0.5 %");
    * a *quantization* (int8 / bf16) or a *distillation* (a smaller student) may move <= 1 % of them: then it cannot
      lose 1 pt or more of accuracy on them (the lab's "quantization loss < 1 pt").
"""
from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------
LABELS = ("good", "anomaly")       # class index 0 = normal part, 1 = defective part (the positive class)
TARGET_TIME_REDUCTION_PCT = 80.0   # -80 % inference time vs the baseline (batch 1, median)
TARGET_COST_REDUCTION_PCT = 70.0   # -70 % cost per 1000 images
TARGET_MAX_SIZE_MB = 30.0          # model file < 30 MB (10^6 bytes)
TARGET_MIN_ACCURACY = 0.95         # test accuracy > 95 %
TARGET_MAX_LOSS_PT = 1.0           # accuracy loss of a quantized model vs its fp32 source < 1 point
TARGET_END_TO_END_SPEEDUP = 8.0    # predict.py: image files -> labels >= 8x faster than the naive baseline (issue 10)
END_TO_END_IMAGES, END_TO_END_REPEATS = 200, 3  # how the end-to-end speed is measured (predict.py, pipeline)
PARITY_MIN_AGREEMENT = 0.995       # a converted fp32 graph agrees with PyTorch on >= 99.5 % of the selection images
# An int8 model whose decisions differ from fp32 on <= 1 % of images cannot lose more than 1 pt on them: the guard of
# quantizations and distillations, and the aim of the mixed-precision rule (quantize.choose_fp32_layers)
INT8_MIN_AGREEMENT = 1.0 - TARGET_MAX_LOSS_PT / 100.0
# What every choice is measured on: the saved train + val images, without their labels (never the test split)
SELECTION_SPLITS = ("train", "val")
SELECTION_SPLIT = "+".join(SELECTION_SPLITS)
BANK_EXCLUDED = "-bank"  # the hybrid's guard: the selection images but its memory bank's (train good) ones

LAB_EPOCHS = 3                     # the lab's command: benchmark_gpu.py --epochs 3 (pretrained models)
STUDENT_FROM_BASELINE = "baseline-half"  # a student made of every other block of the baseline (train_utils)

# Prices: Azure pay-as-you-go Linux VMs, region East US, list prices as of 2024.
PRICE_URL = "https://azure.microsoft.com/pricing/details/virtual-machines/linux/"
CPU_VM, CPU_PRICE = "Azure Standard_D4s_v5 (4 vCPU, 16 GiB), East US", 0.192
GPU_VM, GPU_PRICE = "Azure Standard_NC4as_T4_v3 (1x NVIDIA T4), East US", 0.526
PRICE_NOTE = f"pay-as-you-go Linux list prices as of 2024, check {PRICE_URL}"

# What the lab asks students to hand in (the archive of optimization_pipeline.py --package), and what makes each;
# "a|b": either file (the deployable model is model_final.onnx, or model_final.xml + .bin for OpenVINO IR)
LAB_DELIVERABLES = {
    "resultats/benchmark_cpu_gpu.csv": "part 1: python benchmark_gpu.py",
    "resultats/benchmark_cpu_gpu.png": "part 1: python benchmark_gpu.py",
    "resultats/quantization_results.csv": "part 2: python quantization_demo.py",
    "resultats/quantization_comparison.png": "part 2: python quantization_demo.py",
    "resultats/onnx_results.csv": "part 3: python onnx_optimization.py",
    "resultats/onnx_comparison.png": "part 3: python onnx_optimization.py",
    "resultats/load_test.csv": "part 5: python load_test.py against azmlinfsrv or the endpoint",
    "resultats/load_test.png": "part 5: python load_test.py",
    "resultats/optimization_report.csv": "python optimization_pipeline.py",
    "resultats/optimization_complete.png": "python optimization_pipeline.py",
    "modeles/model_cpu.pth": "part 1 or the pipeline (fp32 baseline)",
    "modeles/model_quantized.pth": "part 2 or the pipeline without --skip-torch-int8",
    "modeles/model_final.onnx|modeles/model_final.xml": "part 3 or the pipeline without --skip-onnx",
    "modeles/model_final.json": "part 3 or the pipeline without --skip-onnx",
    "rapport.md": "python optimization_pipeline.py (or python rapport.py)",
}

CONVERSION, QUANTIZATION, DISTILLATION = "conversion", "quantization", "distillation"
DEPLOYABLE_BACKENDS = ("onnxruntime", "openvino")  # what score.py can serve (model_final + its sidecar)
THRESHOLD_RULE = "best balanced accuracy on the validation split (midpoint between neighbouring scores)"
DETECTOR_THRESHOLD_RULE = ("best balanced accuracy of the image scores on the validation split of the lab's split "
                           "(its good and defective images, kept out of the memory bank and of the test images)")
DETECTOR_GOOD_THRESHOLD_RULE = "highest score of good training images held out of the memory bank (no defect used)"


# --------------------------------------------------------------------------------------------------
# Scores, threshold, predictions
# --------------------------------------------------------------------------------------------------
# one line per file of the batch endpoint's output (batch_score.py), named as predict.py's columns
BATCH_COLUMNS = ("path", "label", "anomaly_probability", "threshold", "model_sha256", "error")


def anomaly_scores(logits) -> np.ndarray:
    """P(anomaly) = softmax(logits)[:, 1], computed stably from a [N, 2] array of logits."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"expected logits of shape [N, 2], got {logits.shape}")
    return 1.0 / (1.0 + np.exp(-(logits[:, 1] - logits[:, 0])))


def predict_labels(logits, threshold: float = 0.5) -> np.ndarray:
    """1 (anomaly) where P(anomaly) >= threshold, else 0 (good)."""
    return (anomaly_scores(logits) >= threshold).astype(np.int64)


def choose_threshold(scores, labels, neutral: float | None = 0.5) -> float:
    """The decision threshold on `scores` that maximises balanced accuracy on the validation split.

    Candidates are the midpoints between neighbouring distinct scores (plus `neutral`); among equally good ones the
    closest to `neutral` is kept (P(anomaly): 0.5), so that a perfectly separated split does not push the threshold to
    an extreme; neutral=None (scores with no natural middle, e.g. patch distances): the middle one of the equally good
    candidates. Without both classes `neutral` is returned (None: an error)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(scores) == 0 or len(np.unique(labels)) < 2:
        if neutral is None:
            raise ValueError("a threshold needs good and defective validation scores")
        return neutral
    distinct = np.unique(scores)
    candidates = np.unique(np.concatenate([(distinct[:-1] + distinct[1:]) / 2, [] if neutral is None else [neutral]]))
    pos, neg = labels == 1, labels == 0
    bacc = np.array([0.5 * ((scores[pos] >= t).mean() + (scores[neg] < t).mean()) for t in candidates])
    best = candidates[np.round(bacc, 12) == np.round(bacc.max(), 12)]
    if neutral is None:
        return float(best[(len(best) - 1) // 2])
    return float(best[np.argmin(np.abs(best - neutral))])


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
# The guard (on train + val, no label) and the test report
# --------------------------------------------------------------------------------------------------
GUARD_MIN_AGREEMENT = {CONVERSION: PARITY_MIN_AGREEMENT, QUANTIZATION: INT8_MIN_AGREEMENT,
                       DISTILLATION: INT8_MIN_AGREEMENT}


def judge_selection(kind: str, reference_logits, logits, *, threshold: float = 0.5,
                    reference: str = "pytorch-fp32", reference_threshold: float | None = None, mask=None) -> dict:
    """THE guard: may this variant be recommended or deployed? Its decisions (at `threshold`) vs those of
    `reference` (the model it was made from, at `reference_threshold`, default the same) on the same selection
    images (SELECTION_SPLITS, in the same order), without labels. kind = CONVERSION, QUANTIZATION or DISTILLATION
    (see the module doc). `mask`: which selection images count (the hybrid's variants leave out the images of its
    memory bank, whose decisions cannot move: hybrid.guard_mask); split then reads SELECTION_SPLIT + BANK_EXCLUDED.
    Returns "kind", "rule" (text), "split", "n", "changed", "agreement", "passed", "reference", "threshold"."""
    if kind not in GUARD_MIN_AGREEMENT:
        raise ValueError(f"unknown guard kind {kind!r}")
    ref = predict_labels(reference_logits, threshold if reference_threshold is None else reference_threshold)
    pred = predict_labels(logits, threshold)
    if ref.shape != pred.shape:
        raise ValueError(f"the variant was run on {len(pred)} selection images, its reference on {len(ref)}")
    split = SELECTION_SPLIT
    if mask is not None:
        ref, pred, split = ref[np.asarray(mask, dtype=bool)], pred[np.asarray(mask, dtype=bool)], split + BANK_EXCLUDED
    n, changed = len(ref), int((ref != pred).sum())
    agreement = 1.0 - changed / n if n else float("nan")
    minimum = GUARD_MIN_AGREEMENT[kind]
    return {"kind": kind, "rule": f"{kind}: decisions identical to {reference} on >= {minimum * 100:g} % of the "
                                  f"{split} images (no label, the test split is not read)",
            "split": split, "n": n, "changed": changed, "agreement": agreement,
            "passed": bool(n and agreement >= minimum), "reference": reference, "threshold": float(threshold)}


def guard_kind(variant: str) -> str:
    """int8 and bf16 variants (fewer bits than the fp32 model) are judged as quantizations, every fp32 graph as a
    conversion."""
    return QUANTIZATION if "int8" in variant or "bf16" in variant else CONVERSION


def compare_logits(reference_logits, logits, labels, *, threshold: float = 0.5,
                   reference_threshold: float | None = None) -> dict:
    """The test report of a variant vs its reference (compare_predictions at `threshold`, the reference at
    `reference_threshold`, default the same; plus the largest |logit difference|): measured once, read by no
    choice."""
    reference_logits, logits, labels = np.asarray(reference_logits), np.asarray(logits), np.asarray(labels)
    ref_threshold = threshold if reference_threshold is None else reference_threshold
    cmp = compare_predictions(predict_labels(reference_logits, ref_threshold), predict_labels(logits, threshold),
                              labels)
    cmp["max_abs_logit_diff"] = float(np.abs(logits - reference_logits).max()) if len(labels) else float("nan")
    return cmp


def describe_guard(judged: dict) -> str:
    """'PASS (quantization): 357 of 360 train+val decisions identical to pytorch-fp32 (99.2 %, >= 99 %)'."""
    return (f"{'PASS' if judged['passed'] else 'FAIL'} ({judged['kind']}): {judged['n'] - judged['changed']} of "
            f"{judged['n']} {judged['split']} decisions identical to {judged['reference']} "
            f"({judged['agreement'] * 100:.1f} %, needs >= {GUARD_MIN_AGREEMENT[judged['kind']] * 100:g} %)")


def guard_columns(judged: dict | None, test: dict | None) -> dict:
    """A variant's guard (judge_selection) and its test report (compare_logits) as result-row columns
    (RESULT_COLUMNS); empty for the reference itself."""
    guard = ("guard_reference", "guard", "guard_split", "guard_images", "guard_agreement", "guard_passed")
    report = ("agreement", "reference_accuracy_delta_pt", "flips", "flips_good_to_anomaly", "flips_anomaly_to_good",
              "mcnemar_p", "max_abs_logit_diff")
    row = dict.fromkeys(guard + report, "")
    if judged is not None:
        row.update(guard_reference=judged["reference"], guard=judged["rule"], guard_split=judged["split"],
                   guard_images=judged["n"], guard_agreement=judged["agreement"], guard_passed=judged["passed"])
    if test is not None:
        row.update(agreement=test["agreement"], reference_accuracy_delta_pt=test["accuracy_diff_pt"],
                   flips=test["flips"], flips_good_to_anomaly=test["good_to_anomaly"],
                   flips_anomaly_to_good=test["anomaly_to_good"], mcnemar_p=test["mcnemar_p"],
                   max_abs_logit_diff=test.get("max_abs_logit_diff", ""))
    return row


# --------------------------------------------------------------------------------------------------
# Cost, the guards of a variant, the recommendation and the deployable model
# --------------------------------------------------------------------------------------------------
def cost_per_1000_images(price_per_hour: float, latency_ms_per_batch: float, batch_size: int) -> float:
    """USD to classify 1 000 images on a machine billed `price_per_hour`, at the measured latency of one batch."""
    seconds_per_image = latency_ms_per_batch / 1000.0 / batch_size
    return price_per_hour * seconds_per_image * 1000.0 / 3600.0


def variant_passes(*verdicts: bool | None) -> bool:
    """A variant is acceptable when every guard on its way from the baseline passed: its own (judge_selection vs the
    model it was made from), that model's own, and the conversion of the fp32 graph it runs; None = no such guard
    (the baseline, no exported graph). All of them on the selection images: no test label."""
    return all(v in (True, None) for v in verdicts)


HYBRID_BOOTSTRAP = 2000   # paired, stratified resamples of the val images
HYBRID_MAX_P = 0.05       # at most 5 % of them may show no AUROC gain


def auroc_no_gain_share(labels, base_scores, new_scores, resamples: int = HYBRID_BOOTSTRAP, seed: int = 0) -> float:
    """Share of paired bootstrap resamples of the images (good and defective resampled apart, so that each resample
    has both) in which `new_scores` rank no better than `base_scores` (AUROC gain <= 0): how often a val gain this size
    is noise. 1.0 without both classes."""
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not len(pos) or not len(neg):
        return 1.0

    def pair_wins(scores):  # AUROC = mean over (defective, good) pairs of [ranked higher] + 0.5 [tie] (Mann-Whitney)
        scores = np.asarray(scores, dtype=np.float64)
        return (scores[pos][:, None] > scores[neg][None]) + 0.5 * (scores[pos][:, None] == scores[neg][None])

    base, new = pair_wins(base_scores), pair_wins(new_scores)
    rng = np.random.default_rng(seed)
    worse = 0
    for _ in range(resamples):
        cell = np.ix_(rng.choice(len(pos), len(pos)), rng.choice(len(neg), len(neg)))
        worse += new[cell].mean() <= base[cell].mean()
    return worse / resamples


def hybrid_wins(head: dict, fused: dict) -> bool:
    """THE rule that puts the hybrid (head logit + patch distances) in place of the plain head, on the validation
    split only: it ranks better (AUROC), the gain is not noise (fused["no_gain_share"] = auroc_no_gain_share <
    HYBRID_MAX_P) and it decides no worse (balanced accuracy, each at its own val-chosen threshold). A head that is
    already near perfect on val keeps its place: a gain of an image or two is noise, and the bank has a cost."""
    return (fused["auroc"] > head["auroc"] and fused["no_gain_share"] < HYBRID_MAX_P
            and fused["balanced_accuracy"] >= head["balanced_accuracy"])


HYBRID_PREFIX = "hybrid-"  # the variants of the hybrid classifier (hybrid.py)


def selection_candidates(rows: list[dict]) -> list[dict]:
    """The rows recommend() and choose_deployable() choose among: the hybrid's when it was built (it replaced the plain
    head on val: lab_targets.hybrid_wins, or --hybrid on) and one of them can be deployed, else every row. The plain
    classifier's rows stay in the CSV, for the lesson and the comparison."""
    hybrid = [r for r in rows if r["variant"].startswith(HYBRID_PREFIX)]
    return hybrid if hybrid and choose_deployable(hybrid) else rows


def recommend(rows: list[dict]) -> dict | None:
    """THE recommendation rule: the fastest CPU variant at batch 1 (median latency) among those whose
    `guards_passed` is true and that meet the size target (< TARGET_MAX_SIZE_MB, the lab's "model < 30 MB"); the
    fastest that passes its guards when none is small enough. Rows need "device", "guards_passed",
    "latency_median_ms" and "size_mb" (a number or the CSV's text; a row without a size counts as too large)."""
    passing = [r for r in rows if r["device"] == "cpu" and r["guards_passed"]]
    small = [r for r in passing if _size_mb(r) < TARGET_MAX_SIZE_MB]
    return min(small or passing, key=lambda r: r["latency_median_ms"]) if passing else None


def _size_mb(row: dict) -> float:
    try:
        return float(row.get("size_mb"))
    except (TypeError, ValueError):
        return math.inf


def choose_deployable(rows: list[dict]) -> dict | None:
    """What becomes model_final: the recommended variant when score.py can serve it (DEPLOYABLE_BACKENDS), else the
    servable variant the same rule prefers; None when there is none."""
    best = recommend(rows)
    if best is not None and best["backend"] in DEPLOYABLE_BACKENDS:
        return best
    return recommend([r for r in rows if r["backend"] in DEPLOYABLE_BACKENDS])


def targets_met(row: dict) -> dict:
    """The lab's business targets for one result row (None = does not apply)."""
    return {"target_time_80": row["time_reduction_pct"] >= TARGET_TIME_REDUCTION_PCT,
            "target_cost_70": row["cost_reduction_pct"] >= TARGET_COST_REDUCTION_PCT,
            "target_size_30mb": row["size_mb"] < TARGET_MAX_SIZE_MB,
            "target_accuracy_95": row["accuracy"] > TARGET_MIN_ACCURACY,
            "target_loss_1pt": -row["accuracy_delta_pt"] < TARGET_MAX_LOSS_PT,
            "target_onnx_parity": row.get("onnx_graph_passed")}


TARGETS = ("target_time_80", "target_cost_70", "target_size_30mb", "target_accuracy_95", "target_loss_1pt",
           "target_onnx_parity")


# --------------------------------------------------------------------------------------------------
# The results schema: every CSV the lab writes uses these names, units and signs
# --------------------------------------------------------------------------------------------------
# Direction = which way is better; it decides how the report rounds a value (never in its favour):
# HIGHER is rounded down (accuracy, speed-up, reductions, throughput), LOWER is rounded up (latency, size, cost),
# NEUTRAL half-even. A lower confidence bound rounds down and an upper one up: the interval only widens.
HIGHER, LOWER, NEUTRAL = "higher", "lower", "neutral"
_ID, _MODEL, _TIME, _ACC, _GUARD, _COST, _TRAIN, _ENV, _LOAD = (
    "identification", "model", "timing", "accuracy", "guard", "cost", "training", "environment", "load test")
RESULT_COLUMNS = {
    # name: (unit, better, group, meaning)
    "run_id": ("", NEUTRAL, _ID, "one run of a script (its rows share it)"),
    "script": ("", NEUTRAL, _ID, "the script that measured the row"),
    "mode": ("", NEUTRAL, _ID, "lab or demo (synthetic data, random-init models)"),
    "category": ("", NEUTRAL, _ID, "MVTec AD category"),
    "step": ("", NEUTRAL, _ID, "step of the pipeline (1-5)"),
    "variant": ("", NEUTRAL, _ID, "name of the variant, e.g. ort-int8-dynamic"),
    "role": ("", NEUTRAL, _ID, "baseline or student"),
    "backend": ("", NEUTRAL, _MODEL, "pytorch, onnxruntime or openvino"),
    "precision": ("", NEUTRAL, _MODEL, "numeric format that really runs: fp32, bf16, int8 (int8+bf16: int8 "
                                       "weights, the rest in bf16)"),
    "method": ("", NEUTRAL, _MODEL, "how the variant was made"),
    "engine": ("", NEUTRAL, _MODEL, "torch quantized engine (x86, fbgemm, onednn, qnnpack)"),
    "qscheme": ("", NEUTRAL, _MODEL, "int8 weight scheme"),
    "exporter": ("", NEUTRAL, _MODEL, "ONNX exporter used (torchscript or dynamo)"),
    "opset": ("", NEUTRAL, _MODEL, "ONNX opset"),
    "fused_ops": ("", NEUTRAL, _MODEL, "ORT transformer fusion: op=count;..."),
    "file": ("", NEUTRAL, _MODEL, "model file measured"),
    "model_name": ("", NEUTRAL, _MODEL, "Hugging Face model (hub id, folder or preset)"),
    "source_checkpoint": ("", NEUTRAL, _MODEL, "fp32 checkpoint the variant was made from"),
    "baseline_model": ("", NEUTRAL, _MODEL, "the pipeline's baseline model"),
    "student_model": ("", NEUTRAL, _MODEL, "the pipeline's student model"),
    "params_m": ("millions", NEUTRAL, _MODEL, "parameters"),
    "depth": ("blocks", NEUTRAL, _MODEL, "transformer blocks kept"),
    "size_mb": ("MB (10^6 bytes)", LOWER, _MODEL, "bytes of the file that ships (the row's `file`) / 10^6"),
    "size_ratio": ("x", HIGHER, _MODEL, "reference size / variant size (> 1 = smaller)"),
    "device": ("", NEUTRAL, _TIME, "cpu or gpu (benchmark_gpu.py: the training device)"),
    "torch_device": ("", NEUTRAL, _TIME, "PyTorch device type"),
    "device_name": ("", NEUTRAL, _TIME, "CPU or GPU model"),
    "measured": ("", NEUTRAL, _TIME, "yes, or no when the device is absent (row kept, values empty)"),
    "note": ("", NEUTRAL, _TIME, "why a row is not measured"),
    "batch_size": ("images", NEUTRAL, _TIME, "images per call of the latency columns: 1 for model rows; images "
                                              "per request for load_test.csv"),
    "threads": ("", NEUTRAL, _TIME, "intra-op threads of the engine"),
    "torch_threads": ("", NEUTRAL, _TIME, "PyTorch threads (when the engine is another)"),
    "warmup": ("runs", NEUTRAL, _TIME, "untimed warm-up runs"),
    "runs": ("runs", NEUTRAL, _TIME, "timed runs of the latency columns"),
    "rounds": ("", NEUTRAL, _TIME, "rounds the timed runs were split into, every variant timed in each round "
                                   "(lab_io.benchmark_rounds)"),
    "runs_throughput": ("runs", NEUTRAL, _TIME, "timed runs of the throughput columns"),
    "latency_median_ms": ("ms per call", LOWER, _TIME, "median latency at batch_size"),
    "latency_p95_ms": ("ms per call", LOWER, _TIME, "95th percentile latency at batch_size"),
    "latency_p99_ms": ("ms per call", LOWER, _TIME, "99th percentile latency at batch_size, only from >= 100 timed "
                                                    "calls (lab_io.P99_MIN_RUNS); empty below: see latency_max_ms"),
    "latency_mean_ms": ("ms per call", LOWER, _TIME, "mean latency"),
    "latency_max_ms": ("ms per call", LOWER, _TIME, "slowest call"),
    "throughput_batch_size": ("images", NEUTRAL, _TIME, "batch of the throughput columns"),
    "batch_latency_median_ms": ("ms per batch", LOWER, _TIME, "median latency at throughput_batch_size"),
    "throughput_img_s": ("images / s", HIGHER, _TIME, "throughput at throughput_batch_size (load test: overall)"),
    "throughput_b1_img_s": ("images / s", HIGHER, _TIME, "1000 / median latency at batch 1"),
    "speedup": ("x", HIGHER, _TIME, "reference latency / variant latency at batch 1 (> 1 = faster)"),
    "time_reduction_pct": ("%", HIGHER, _TIME, "1 - variant latency / reference latency (negative = slower)"),
    "throughput_ratio": ("x", HIGHER, _TIME, "variant throughput / reference throughput"),
    "gpu_speedup_train": ("x", HIGHER, _TIME, "CPU training time / GPU training time"),
    "gpu_speedup_latency_b1": ("x", HIGHER, _TIME, "CPU latency / GPU latency at batch 1"),
    "gpu_speedup_throughput": ("x", HIGHER, _TIME, "GPU throughput / CPU throughput"),
    "accuracy": ("fraction 0-1", HIGHER, _ACC, "test accuracy at the model's threshold"),
    "accuracy_ci_low": ("fraction 0-1", HIGHER, _ACC, "95 % Wilson interval, low end"),
    "accuracy_ci_high": ("fraction 0-1", LOWER, _ACC, "95 % Wilson interval, high end (rounded up: the interval "
                                                      "only widens)"),
    "threshold": ("probability", NEUTRAL, _ACC, "decision threshold on P(anomaly), chosen on val"),
    "one_image_pt": ("points", NEUTRAL, _ACC, "what one test image weighs in accuracy"),
    "precision_score": ("fraction 0-1", HIGHER, _ACC, "precision of the anomaly class"),
    "recall": ("fraction 0-1", HIGHER, _ACC, "recall of the anomaly class"),
    "f1": ("fraction 0-1", HIGHER, _ACC, "F1 of the anomaly class"),
    "auroc": ("fraction 0-1", HIGHER, _ACC, "area under the ROC curve of P(anomaly)"),
    "n_test": ("images", NEUTRAL, _ACC, "test images"),
    "n_train": ("images", NEUTRAL, _ACC, "training images"),
    "n_val": ("images", NEUTRAL, _ACC, "validation images"),
    "accuracy_delta_pt": ("points", HIGHER, _ACC, "variant - reference accuracy (negative = loss)"),
    "f1_delta_pt": ("points", HIGHER, _ACC, "variant - reference F1 x 100 (negative = loss)"),
    "auroc_delta_pt": ("points", HIGHER, _ACC, "variant - reference AUROC x 100 (negative = loss)"),
    "guard_reference": ("", NEUTRAL, _GUARD, "the variant the guard compares with (the model it was made from)"),
    "guard": ("", NEUTRAL, _GUARD, "the rule applied (lab_targets.judge_selection)"),
    "guard_split": ("", NEUTRAL, _GUARD, "the images the guard used: train+val, without labels (never test)"),
    "guard_images": ("images", NEUTRAL, _GUARD, "how many images the guard compared"),
    "guard_agreement": ("fraction 0-1", HIGHER, _GUARD, "share of guard_split decisions identical to the reference"),
    "guard_passed": ("", NEUTRAL, _GUARD, "the guard's verdict (True / False); empty for the reference itself"),
    "agreement": ("fraction 0-1", HIGHER, _GUARD, "share of predictions identical to guard_reference's on the same "
                                                  "images (model rows: the test split, reported; no choice reads it)"),
    "reference_accuracy_delta_pt": ("points", HIGHER, _GUARD, "variant - guard reference test accuracy (negative = "
                                                              "loss; reported)"),
    "flips": ("images", LOWER, _GUARD, "test predictions changed vs the guard reference (reported)"),
    "flips_good_to_anomaly": ("images", LOWER, _GUARD, "of which good -> anomaly"),
    "flips_anomaly_to_good": ("images", LOWER, _GUARD, "of which anomaly -> good"),
    "mcnemar_p": ("probability", NEUTRAL, _GUARD, "exact McNemar p-value of the flips"),
    "max_abs_logit_diff": ("logit", LOWER, _GUARD, "largest |logit difference| vs the guard reference"),
    "roundtrip_max_abs_diff": ("logit", LOWER, _GUARD, "saved and reloaded int8 model vs in memory"),
    "onnx_graph_checked": ("", NEUTRAL, _GUARD, "the fp32 ONNX graph whose conversion was checked"),
    "onnx_graph_agreement": ("fraction 0-1", HIGHER, _GUARD, "that graph vs its PyTorch model, guard_split decisions"),
    "onnx_graph_accuracy_delta_pt": ("points", HIGHER, _GUARD, "that graph - its PyTorch model, test accuracy "
                                                               "(reported)"),
    "onnx_graph_passed": ("", NEUTRAL, _GUARD, "conversion guard of that graph (guard_split)"),
    "flips_vs_classifier": ("images", NEUTRAL, _GUARD, "hybrid variants: test decisions that differ from the plain "
                                                       "classifier's (PyTorch fp32); measured once, read by no choice"),
    "bank_mb": ("MB (10^6 bytes)", LOWER, _MODEL, "hybrid variants: the memory bank of good train patches in float32 "
                                                   "(as in the fp32 graph; NNCF int8 stores it in int8), in size_mb"),
    "guards_passed": ("", NEUTRAL, _GUARD, "lab_targets.variant_passes: own guard, its source's, conversion "
                                           "(all on guard_split)"),
    "recommended": ("", NEUTRAL, _GUARD, "lab_targets.recommend: fastest CPU variant passing its guards (and "
                                         "under 30 MB when one is)"),
    "deployed_as": ("", NEUTRAL, _GUARD, "model_final file written from this variant (lab_targets.choose_deployable)"),
    "target_time_80": ("", NEUTRAL, _GUARD, "time_reduction_pct >= 80"),
    "target_cost_70": ("", NEUTRAL, _GUARD, "cost_reduction_pct >= 70"),
    "target_size_30mb": ("", NEUTRAL, _GUARD, "size_mb < 30"),
    "target_accuracy_95": ("", NEUTRAL, _GUARD, "accuracy > 0.95"),
    "target_loss_1pt": ("", NEUTRAL, _GUARD, "-accuracy_delta_pt < 1"),
    "target_onnx_parity": ("", NEUTRAL, _GUARD, "onnx_graph_passed (empty: no ONNX graph)"),
    "price_per_hour": ("USD / h", NEUTRAL, _COST, "price of the machine the row is costed on"),
    "price_source": ("", NEUTRAL, _COST, "where the price comes from"),
    "cost_per_1000_images_usd": ("USD", LOWER, _COST, "median latency at batch 1 x price (the -70 % target)"),
    "cost_per_1000_images_batch_usd": ("USD", LOWER, _COST, "the same at throughput_batch_size"),
    "cost_reduction_pct": ("%", HIGHER, _COST, "1 - variant cost / reference cost at batch 1 (negative = costlier)"),
    "training_cost_usd": ("USD", LOWER, _COST, "training time x price"),
    "epochs": ("", NEUTRAL, _TRAIN, "fine-tuning epochs"),
    "lr": ("", NEUTRAL, _TRAIN, "learning rate (top block)"),
    "train_batch_size": ("images", NEUTRAL, _TRAIN, "training batch size"),
    "seed": ("", NEUTRAL, _TRAIN, "seed of the split, weights and shuffling"),
    "train_seconds": ("s", LOWER, _TRAIN, "fine-tuning time (epochs, without the probe)"),
    "epoch_seconds_mean": ("s", LOWER, _TRAIN, "mean time of one epoch"),
    "probe_seconds": ("s", LOWER, _TRAIN, "linear probe time"),
    "train_precision": ("", NEUTRAL, _TRAIN, "fp32, amp-bf16 or amp-fp16"),
    "best_epoch": ("", NEUTRAL, _TRAIN, "epoch kept (0 = the linear probe)"),
    "trained_by": ("", NEUTRAL, _TRAIN, "script that trained the checkpoint"),
    "teacher_model": ("", NEUTRAL, _TRAIN, "distillation teacher"),
    "distill_alpha": ("", NEUTRAL, _TRAIN, "weight of the distillation term"),
    "distill_temperature": ("", NEUTRAL, _TRAIN, "distillation temperature (the kl loss only)"),
    "distill_loss": ("", NEUTRAL, _TRAIN, "distillation term: kl (softened logits) or mse (the logits themselves)"),
    "checkpoint": ("", NEUTRAL, _TRAIN, "checkpoint written"),
    "reused": ("", NEUTRAL, _TRAIN, "True when --resume reused an earlier file"),
    "cpu_name": ("", NEUTRAL, _ENV, "CPU model"),
    "cpu_flags": ("", NEUTRAL, _ENV, "instruction sets: avx2, avx512f, avx512_vnni, avx512_bf16, amx..."),
    "cpu_cores": ("", NEUTRAL, _ENV, "physical cores"),
    "cpu_logical": ("", NEUTRAL, _ENV, "logical processors"),
    "cpu_load_1min": ("", NEUTRAL, _ENV, "load average when the timing started"),
    "gpu_name": ("", NEUTRAL, _ENV, "GPU model, if any"),
    "cuda_version": ("", NEUTRAL, _ENV, "CUDA version of PyTorch"),
    "torch_version": ("", NEUTRAL, _ENV, ""), "transformers_version": ("", NEUTRAL, _ENV, ""),
    "onnx_version": ("", NEUTRAL, _ENV, ""), "onnxruntime_version": ("", NEUTRAL, _ENV, ""),
    "python_version": ("", NEUTRAL, _ENV, ""),
    "url": ("", NEUTRAL, _LOAD, "scoring URL"),
    "request_mode": ("", NEUTRAL, _LOAD, "raw image bytes or json base64"),
    "n_images": ("images", NEUTRAL, _LOAD, "distinct images sent"),
    "timeout_s": ("s", NEUTRAL, _LOAD, "timeout of one request"),
    "requests_per_level": ("", NEUTRAL, _LOAD, "requests planned per concurrency level"),
    "max_seconds_per_level": ("s", NEUTRAL, _LOAD, "time limit of a level"),
    "concurrency": ("clients", NEUTRAL, _LOAD, "concurrent clients"),
    "requests": ("", NEUTRAL, _LOAD, "requests sent"),
    "ok": ("", HIGHER, _LOAD, "successful requests"),
    "errors": ("", LOWER, _LOAD, "failed requests"),
    "error_rate": ("fraction 0-1", LOWER, _LOAD, "errors / requests"),
    "error_kinds": ("", NEUTRAL, _LOAD, "kind=count;..."),
    "throughput_req_s": ("requests / s", HIGHER, _LOAD, "successful requests per second"),
    "duration_s": ("s", NEUTRAL, _LOAD, "length of the level"),
    "model_sha256": ("", NEUTRAL, _LOAD, "sha256 of the served model, as the server reports it"),
    "stopped_by": ("", NEUTRAL, _LOAD, "requests or time limit"),
    # -- predict.py columns (issue 10) --
    "path": ("", NEUTRAL, "prediction", "image file, resolved absolute path (predictions.csv: one row per image, the "
                                        "key of --resume)"),
    "label": ("", NEUTRAL, "prediction", "good or anomaly at the model's threshold; empty when the image could not "
                                         "be read"),
    "anomaly_probability": ("probability", NEUTRAL, "prediction", "P(anomaly) = softmax(logits)[anomaly] (a "
                                                                  "classifier; empty for a detector)"),
    "anomaly_score": ("patch distance", NEUTRAL, "prediction", "the good-only detector's image score: mean of "
                                                             "the top 1 % patch distances to the nearest good patch "
                                                             "(empty for a classifier)"),
    "error": ("", NEUTRAL, "prediction", "why the image could not be scored (empty = scored)"),
    "image_width": ("pixels", NEUTRAL, "prediction", "width of the image file as decoded"),
    "image_height": ("pixels", NEUTRAL, "prediction", "height of the image file as decoded"),
    "file_bytes": ("bytes", NEUTRAL, "prediction", "size of the image file when scored (a changed file is scored "
                                                   "again)"),
    "file_mtime_ns": ("ns since 1970", NEUTRAL, "prediction", "modification time of the image file when scored"),
    "weights_sha256": ("", NEUTRAL, "prediction", "sha256 of the OpenVINO IR weights (.bin), or of a detector's "
                                                  "backbone; empty for an ONNX classifier"),
    "scored_at": ("", NEUTRAL, "prediction", "local time the image was scored"),
    "end_to_end_img_s": ("images / s", HIGHER, _TIME, "image files read, decoded, resized and classified per second "
                                                      "(median over the repeats of predict.py --benchmark)"),
    "end_to_end_speedup": ("x", HIGHER, _TIME, "end_to_end_img_s / that of the naive baseline measured in the same run"),
    "target_end_to_end_8x": ("", NEUTRAL, _GUARD, "end_to_end_speedup >= TARGET_END_TO_END_SPEEDUP (empty: other "
                                                  "processes shared the CPUs, not judged)"),
    "read_ms_per_img": ("ms per image", LOWER, _TIME, "reading the file (worker time, summed over workers)"),
    "decode_ms_per_img": ("ms per image", LOWER, _TIME, "decoding it to RGB (worker time)"),
    "resize_ms_per_img": ("ms per image", LOWER, _TIME, "resizing and normalising it (worker time)"),
    "model_ms_per_img": ("ms per image", LOWER, _TIME, "model call time / images (batched)"),
    "model_busy_pct": ("%", HIGHER, _TIME, "share of the wall time the model was computing (100 = it never waited "
                                           "for an image)"),
    "decode_workers": ("", NEUTRAL, _TIME, "parallel decode workers (0 = in the main loop, one after the other)"),
    "decode_pool": ("", NEUTRAL, _TIME, "thread or process pool of the decode workers"),
    "openvino_version": ("", NEUTRAL, _ENV, ""),
    "other_cpu_pct": ("% of all CPUs", LOWER, _ENV, "CPU used by other processes during the timing (> 10 %: not "
                                                    "reliable, target_end_to_end_8x left empty)"),
    # -- anomaly_detector.py columns (issue 11) --
    "defect_type": ("", NEUTRAL, _ACC, "MVTec defect folder, or all"),
    "section": ("", NEUTRAL, "run", "which part of optimization_report.csv / rapport.md a row feeds: variant (the "
                                    "model alone), end_to_end (image files -> labels), detector (good-only detector "
                                    "vs classifier); empty = variant"),
    "image_auroc": ("fraction 0-1", HIGHER, _ACC, "AUROC of the image scores (good vs defective test images)"),
    "pixel_auroc": ("fraction 0-1", HIGHER, _ACC, "AUROC of the anomaly maps against the ground-truth masks"),
    "false_alarm_rate": ("fraction 0-1", LOWER, _ACC, "good test images flagged at the threshold"),
    "feature_layers": ("", NEUTRAL, _MODEL, "transformer blocks whose patch tokens feed the detector"),
    "image_size": ("pixels", NEUTRAL, _MODEL, "input side of the backbone"),
    "bank_patches": ("patches", NEUTRAL, _MODEL, "patches in the detector's memory bank"),
    "coreset_ratio": ("fraction 0-1", NEUTRAL, _MODEL, "share of the good patches kept by coreset selection"),
    "n_train_good": ("images", NEUTRAL, _ACC, "good training images in the memory bank"),
    "n_holdout_good": ("images", NEUTRAL, _ACC, "good training images held out to set the threshold"),
    "threshold_rule": ("", NEUTRAL, _ACC, "how the detector's threshold was chosen (never on its test images)"),
    "n_threshold_good": ("images", NEUTRAL, _ACC, "good images that chose the detector's threshold"),
    "n_threshold_defective": ("images", NEUTRAL, _ACC, "defective images that chose the detector's threshold"),
    "threshold_image_auroc": ("fraction 0-1", HIGHER, _ACC, "image AUROC on the validation images that chose the "
                                                            "threshold (empty: good-only rule)"),
    "fit_seconds": ("s", LOWER, _TRAIN, "features + coreset + threshold (not the backbone's export)"),
    "export_seconds": ("s", LOWER, _TRAIN, "export / compilation of the detector's backbone"),
    "end_to_end_ms_per_img": ("ms per image", LOWER, _TIME, "image file -> decision and map (decode, preprocess, "
                                                           "backbone, patch distances) at batch_size images per call"),
    "backbone_mb": ("MB (10^6 bytes)", LOWER, _MODEL, "the detector's exported backbone on disk (0: run by PyTorch)"),
}
# Columns renamed when the four CSV writers were unified: old -> new (a test checks that no old name comes back)
RENAMED_COLUMNS = {"accuracy_loss_pt": "accuracy_delta_pt (sign reversed: negative = loss)",
                   "f1_loss_pt": "f1_delta_pt (sign reversed)", "auroc_loss_pt": "auroc_delta_pt (sign reversed)",
                   "agreement_pct": "agreement (fraction 0-1)", "prediction_agreement": "agreement",
                   "accuracy_diff_pt": "reference_accuracy_delta_pt",
                   "parity_accuracy_diff_pt": "reference_accuracy_delta_pt",
                   "guard_accuracy_delta_pt": "reference_accuracy_delta_pt",
                   "parity_reference": "guard_reference", "parity_passed": "guard_passed",
                   "onnx_graph_accuracy_diff_pt": "onnx_graph_accuracy_delta_pt", "speedup_b1": "speedup",
                   "savings_pct": "cost_reduction_pct", "price_per_hour_usd": "price_per_hour",
                   "selected_final": "deployed_as", "latency_batch_size": "batch_size (now always the latency batch)",
                   "runs_b1": "runs", "runs_bn": "runs_throughput", "bench_runs": "runs",
                   "model_path": "file", "base_model": "model_name", "objective_size": "target_size_30mb",
                   "objective_accuracy": "target_accuracy_95", "objective_accuracy_loss": "target_loss_1pt",
                   "mode (load_test.csv)": "request_mode"}


def check_result_columns(row: dict) -> None:
    """Every column a script writes is in RESULT_COLUMNS (one name, one unit, one sign for every CSV)."""
    unknown = [k for k in row if k not in RESULT_COLUMNS]
    if unknown:
        raise ValueError(f"result columns not in lab_targets.RESULT_COLUMNS: {', '.join(unknown)}")


def better_direction(column: str) -> str:
    return RESULT_COLUMNS[column][1] if column in RESULT_COLUMNS else NEUTRAL


def measured_columns(metrics: dict, b1: dict, bn: dict, *, reference: dict | None, price_per_hour: float) -> dict:
    """The accuracy, timing and cost columns of one variant (RESULT_COLUMNS names, units and signs), compared with
    `reference` = the same columns of the reference variant (None: the row IS the reference).

    metrics: classification metrics (accuracy, CI, f1...); b1: benchmark at batch 1 (the speed and cost targets);
    bn: benchmark at the throughput batch."""
    row = measurement_columns(metrics, b1, bn, price_per_hour=price_per_hour)
    ref = reference or row
    row.update(accuracy_delta_pt=100.0 * (row["accuracy"] - ref["accuracy"]),
               f1_delta_pt=100.0 * (row["f1"] - ref["f1"]), auroc_delta_pt=100.0 * (row["auroc"] - ref["auroc"]),
               speedup=ref["latency_median_ms"] / row["latency_median_ms"],
               time_reduction_pct=100.0 * (1.0 - row["latency_median_ms"] / ref["latency_median_ms"]),
               throughput_ratio=row["throughput_img_s"] / ref["throughput_img_s"],
               cost_reduction_pct=100.0 * (1.0 - row["cost_per_1000_images_usd"] / ref["cost_per_1000_images_usd"]))
    return row


def measurement_columns(metrics: dict, b1: dict, bn: dict, *, price_per_hour: float) -> dict:
    """measured_columns without the comparison with a reference (benchmark_gpu.py's CPU and GPU rows)."""
    cost = cost_per_1000_images(price_per_hour, b1["latency_median_ms"], 1)
    row = {"batch_size": 1, "threads": b1.get("threads"), "warmup": b1.get("warmup"), "runs": b1.get("runs"),
           "rounds": b1.get("rounds"),
           "latency_median_ms": b1["latency_median_ms"], "latency_p95_ms": b1["latency_p95_ms"],
           "latency_p99_ms": b1["latency_p99_ms"], "latency_max_ms": b1["latency_max_ms"],
           "throughput_b1_img_s": b1["throughput_img_s"],
           "throughput_batch_size": bn["batch_size"], "runs_throughput": bn.get("runs"),
           "batch_latency_median_ms": bn["latency_median_ms"], "throughput_img_s": bn["throughput_img_s"],
           "accuracy": metrics["accuracy"], "accuracy_ci_low": metrics["accuracy_ci_low"],
           "accuracy_ci_high": metrics["accuracy_ci_high"], "threshold": metrics["threshold"],
           "one_image_pt": 100.0 / metrics["n"] if metrics["n"] else float("nan"),
           "precision_score": metrics["precision"], "recall": metrics["recall"], "f1": metrics["f1"],
           "auroc": metrics["auroc"], "n_test": metrics["n"], "price_per_hour": price_per_hour,
           "cost_per_1000_images_usd": cost,
           "cost_per_1000_images_batch_usd": cost_per_1000_images(price_per_hour, bn["latency_median_ms"],
                                                                  bn["batch_size"])}
    return row


def variant_row(*, identity: dict, metrics: dict, b1: dict, bn: dict, reference: dict | None, price_per_hour: float,
                environment: dict, judged: dict | None = None, test: dict | None = None,
                conversion: tuple[dict, dict, str] | None = None, graph_columns: bool = True) -> dict:
    """One variant's result row, built the same way by quantization_demo.py, onnx_optimization.py and the pipeline:
    `identity` (run_id, script, variant, backend, precision, device, size_mb, file...), then measured_columns vs
    `reference` (the reference variant's row; None: this row is the reference) with size_ratio, the guard and its test
    report (guard_columns), the check of the fp32 graph an ONNX / OpenVINO variant runs or was quantized from
    (`conversion` = its judge_selection verdict, its compare_logits report, the graph's file name; graph_columns=False
    for a table without ONNX, quantization_demo.py's) and `environment` (lab_io.environment_columns)."""
    row = {**identity, **measured_columns(metrics, b1, bn, reference=reference, price_per_hour=price_per_hour),
           **guard_columns(judged, test)}
    if graph_columns:  # empty without a conversion; onnx_graph_passed None = does not apply (targets_met)
        judged_graph, test_graph, graph = conversion or ({}, {}, "")
        row.update(onnx_graph_checked=graph, onnx_graph_agreement=judged_graph.get("agreement", ""),
                   onnx_graph_accuracy_delta_pt=test_graph.get("accuracy_diff_pt", ""),
                   onnx_graph_passed=judged_graph.get("passed"))
    row.update(environment)
    row["size_ratio"] = (reference or row)["size_mb"] / row["size_mb"]
    return row
