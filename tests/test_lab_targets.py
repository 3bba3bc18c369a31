"""lab_targets.py (threshold, intervals, flips, McNemar, the one guard) and the LP-FT recipe end to end on a
'pretrained' local folder: depth chosen on val, threshold in the checkpoint, the ONNX sidecar and score.py."""
import json
import math

import numpy as np
import pytest
import torch

import lab_targets as lt
import train_utils as tu
from load_model_hf import checkpoint_threshold, load_checkpoint


def test_wilson_interval_known_values():
    low, high = lt.wilson_interval(108, 120)  # 90 %: the textbook Wilson interval is 83.3-94.2 %
    assert low == pytest.approx(0.8333, abs=5e-4) and high == pytest.approx(0.9421, abs=5e-4)
    low, high = lt.wilson_interval(73, 73)    # 100 % is not a certainty with 73 images
    assert high == pytest.approx(1.0) and low == pytest.approx(0.950, abs=1e-3)
    assert all(math.isnan(v) for v in lt.wilson_interval(0, 0))


def test_mcnemar_exact():
    assert lt.mcnemar_exact_p(0, 0) == 1.0
    assert lt.mcnemar_exact_p(1, 1) == 1.0
    assert lt.mcnemar_exact_p(2, 0) == pytest.approx(0.5)       # 2 * (1/2)^2
    assert lt.mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)
    assert lt.mcnemar_exact_p(3, 7) == lt.mcnemar_exact_p(7, 3)


def test_threshold_maximises_balanced_accuracy_on_val():
    scores = np.array([0.01, 0.02, 0.03, 0.2, 0.25, 0.3, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    t = lt.choose_threshold(scores, labels)
    assert 0.03 < t <= 0.2  # argmax (0.5) would miss three anomalies
    assert (lt.predict_labels(np.stack([np.zeros(7), np.log(scores / (1 - scores))], 1), t) == labels).all()
    assert lt.choose_threshold([0.1, 0.9], [0, 0]) == 0.5       # one class: the usual 0.5
    # perfectly separated: the tie is broken towards 0.5, not an extreme
    assert lt.choose_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 0.5
    # scores with no natural middle (patch distances): the midpoint of the gap, and no default without both classes
    assert lt.choose_threshold([0.1, 0.3, 0.35, 0.9], [0, 0, 1, 1], neutral=None) == pytest.approx(0.325)
    assert lt.choose_threshold([1.0, 2.0, 3.0, 7.0, 8.0], [0, 0, 0, 1, 1], neutral=None) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        lt.choose_threshold([0.1, 0.2], [0, 0], neutral=None)


def _logits(decisions):
    decisions = np.asarray(decisions, dtype=float)
    return np.stack([1.0 - decisions, decisions], 1)


def test_one_guard_on_train_val_decisions_without_labels():
    ref = np.array([0] * 100 + [1] * 100)          # the reference's decisions on 200 train + val images
    one_moved = ref.copy()
    one_moved[0] = 1
    conv = lt.judge_selection(lt.CONVERSION, _logits(ref), _logits(one_moved))
    quant = lt.judge_selection(lt.QUANTIZATION, _logits(ref), _logits(one_moved))
    assert conv["agreement"] == quant["agreement"] == pytest.approx(0.995) and conv["changed"] == 1
    assert conv["passed"] and quant["passed"] and conv["split"] == lt.SELECTION_SPLIT == "train+val"
    three_moved = one_moved.copy()
    three_moved[-2:] = 0
    assert not lt.judge_selection(lt.CONVERSION, _logits(ref), _logits(three_moved))["passed"]  # 98.5 % < 99.5 %
    assert not lt.judge_selection(lt.DISTILLATION, _logits(ref), _logits(three_moved))["passed"]  # < 99 %
    two_moved = one_moved.copy()
    two_moved[-1] = 0
    judged = lt.judge_selection(lt.QUANTIZATION, _logits(ref), _logits(two_moved), reference="ort-fp32")
    assert judged["passed"] and "PASS (quantization): 198 of 200 train+val decisions identical to ort-fp32" in \
        lt.describe_guard(judged)
    # a student with its own threshold: each model's decisions at its threshold
    scores = np.linspace(0.05, 0.95, 200)
    student = np.log(np.stack([1 - scores, scores], 1))
    teacher = np.log(np.stack([1 - (scores + 0.1) / 1.2, (scores + 0.1) / 1.2], 1))
    assert lt.judge_selection(lt.DISTILLATION, teacher, student, threshold=0.5,
                              reference_threshold=0.6 / 1.2)["agreement"] > lt.judge_selection(
        lt.DISTILLATION, teacher, student, threshold=0.5, reference_threshold=0.3)["agreement"]
    with pytest.raises(ValueError):
        lt.judge_selection("other", _logits(ref), _logits(ref))
    with pytest.raises(ValueError):
        lt.judge_selection(lt.CONVERSION, _logits(ref), _logits(ref[:10]))
    assert not lt.judge_selection(lt.CONVERSION, _logits([]).reshape(0, 2), _logits([]).reshape(0, 2))["passed"]


def test_test_report_counts_flips_and_mcnemar():
    labels = np.array([0] * 60 + [1] * 60)
    ref = labels.copy()
    ref[:3] = 1  # the reference is wrong on 3 images
    one_fixed = ref.copy()
    one_fixed[0] = 0  # a variant that fixes one of them
    cmp = lt.compare_logits(_logits(ref), _logits(one_fixed), labels)
    assert cmp["flips"] == 1 and cmp["anomaly_to_good"] == 1 and cmp["flips_to_right"] == 1
    assert "passed" not in cmp  # a report: no verdict is taken on test
    two_broken = labels.copy()
    two_broken[-2:] = 0
    worse = lt.compare_logits(_logits(labels), _logits(two_broken), labels)
    assert worse["accuracy_diff_pt"] == pytest.approx(-200 / 120) and worse["mcnemar_p"] == pytest.approx(0.5)
    assert "2 of 120 predictions flipped" in lt.describe_flips(worse)


def test_a_variant_passes_only_when_every_guard_of_its_lineage_does():
    assert lt.variant_passes(None) and lt.variant_passes(True, None, True)
    assert not lt.variant_passes(True, False) and not lt.variant_passes(None, False)
    columns = lt.guard_columns(lt.judge_selection(lt.QUANTIZATION, _logits([0, 1]), _logits([0, 1])),
                               lt.compare_logits(_logits([0, 1]), _logits([1, 1]), [0, 1]))
    assert columns["guard_split"] == "train+val" and columns["guard_images"] == 2 and columns["guard_passed"]
    assert columns["flips"] == 1 and columns["agreement"] == 0.5  # the test report sits beside the guard
    assert set(columns) <= set(lt.RESULT_COLUMNS) and lt.guard_columns(None, None)["guard_passed"] == ""


def test_metrics_use_the_threshold_and_give_an_interval():
    labels = [0, 0, 1, 1]
    logits = np.stack([np.zeros(4), np.array([-3.0, -2.0, -1.0, 2.0])], 1)  # P(anomaly) 0.05 0.12 0.27 0.88
    assert tu.classification_metrics(labels, logits)["accuracy"] == 0.75
    m = tu.classification_metrics(labels, logits, threshold=0.2)
    assert m["accuracy"] == 1.0 and m["threshold"] == 0.2 and m["predictions"] == [0, 0, 1, 1]
    assert m["accuracy_ci_low"] < 1.0 == m["accuracy_ci_high"]


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A small DINOv2 saved as a local Hugging Face folder: the lab treats it as a pretrained model (LP-FT)."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-dinov2"
    config = Dinov2Config(image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                          mlp_ratio=2, num_labels=2)
    Dinov2ForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_lp_ft_recipe_threshold_flows_to_sidecar_and_score(run, synthetic_root, pretrained_folder, tmp_path,
                                                          monkeypatch):
    res = run("benchmark_gpu.py", "--data-dir", synthetic_root, "--model-name", pretrained_folder, "--epochs", "1",
              "--devices", "cpu", "--runs", "2", "--warmup", "0", "--num-threads", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "linear probe on frozen features: kept" in res.stdout
    assert "95 % CI" in res.stdout and "threshold" in res.stdout
    model, ckpt = load_checkpoint(tmp_path / "modeles" / "model_cpu_bottle.pth")
    probe = ckpt["train_args"]["linear_probe"]
    assert probe["applied"] and probe["depths_tried"] == [2, 3, 4]
    assert model.config.num_hidden_layers == probe["depth"] == len(model.dinov2.encoder.layer)
    threshold = checkpoint_threshold(ckpt)
    assert 0.0 < threshold < 1.0 and "validation" in ckpt["threshold_rule"]
    assert ckpt["metrics"]["threshold"] == threshold

    res = run("onnx_optimization.py", "--data-dir", synthetic_root, "--no-fusion", "--runs", "2", "--warmup", "0",
              "--num-threads", "1", cwd=tmp_path)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    assert "predictions flipped" in res.stdout and "conversion" in res.stdout
    sidecar_path = tmp_path / "modeles" / "model_final.json"
    if res.returncode == 1:  # no variant passed its guard: said, and nothing deployed
        assert "no ONNX variant passed its guard" in res.stdout and not sidecar_path.exists()
        return
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["threshold"] == pytest.approx(threshold)

    # score.py decides with the sidecar's threshold, not argmax
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    import score
    from inference import read_sidecar

    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "modeles"))
    score.init()
    data = next((synthetic_root / "bottle" / "test" / "crack").glob("*.png")).read_bytes()
    reply = score.run(Request(EnvironBuilder(method="POST", data=data, content_type="image/png").get_environ()))
    pred = json.loads(reply.get_data())["predictions"][0]
    assert pred["threshold"] == pytest.approx(threshold)
    assert pred["label"] == ("anomaly" if pred["anomaly_probability"] >= threshold else "good")
    # a sidecar whose threshold is not a probability is refused at init, with a clear reason
    bad = dict(json.loads(sidecar_path.read_text()), threshold=2.0)
    sidecar_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="threshold must be a probability"):
        read_sidecar(sidecar_path)


def test_one_row_builder_for_every_variant_table():
    """variant_row: the reference's own row compares with itself; a variant's speed, cost and size ratios are vs the
    reference row; the fp32-graph columns are filled only for a variant that runs or was quantized from a converted
    graph."""
    metrics = {"accuracy": 0.9, "accuracy_ci_low": 0.8, "accuracy_ci_high": 0.95, "threshold": 0.4, "n": 100,
               "precision": 0.9, "recall": 0.9, "f1": 0.9, "auroc": 0.95}

    def bench(ms, batch=1):
        return {"batch_size": batch, "runs": 30, "warmup": 5, "threads": 2, "latency_median_ms": ms,
                "latency_p95_ms": ms * 1.1, "latency_p99_ms": ms * 1.2, "latency_max_ms": ms * 1.3,
                "throughput_img_s": 1000.0 * batch / ms}

    env = {"cpu_name": "test cpu"}
    base = lt.variant_row(identity={"variant": "pytorch-fp32", "size_mb": 40.0}, metrics=metrics,
                                   b1=bench(10.0), bn=bench(40.0, 8), reference=None, price_per_hour=1.0,
                                   environment=env)
    assert base["speedup"] == 1.0 and base["size_ratio"] == 1.0 and base["accuracy_delta_pt"] == 0.0
    assert base["onnx_graph_checked"] == "" and base["onnx_graph_passed"] is None and base["guard"] == ""
    assert base["cpu_name"] == "test cpu"
    judged = lt.judge_selection(lt.QUANTIZATION, np.zeros((4, 2)), np.zeros((4, 2)))
    test = lt.compare_logits(np.zeros((4, 2)), np.zeros((4, 2)), np.array([0, 1, 0, 1]))
    fast = lt.variant_row(identity={"variant": "ov-int8", "size_mb": 10.0}, metrics=metrics,
                                   b1=bench(2.0), bn=bench(8.0, 8), reference=base, price_per_hour=1.0,
                                   environment=env, judged=judged, test=test,
                                   conversion=(judged, test, "model_fp32.onnx"))
    assert fast["speedup"] == pytest.approx(5.0) and fast["time_reduction_pct"] == pytest.approx(80.0)
    assert fast["cost_reduction_pct"] == pytest.approx(80.0) and fast["size_ratio"] == pytest.approx(4.0)
    assert fast["onnx_graph_checked"] == "model_fp32.onnx" and fast["onnx_graph_passed"] is True
    assert fast["guard_passed"] is True and fast["guard_images"] == 4
    lt.check_result_columns(fast)
