"""train_utils.py: metrics on known inputs, benchmark, CSV/atomic output, device choice, a tiny real training run."""
import csv
import math

import numpy as np
import pytest
import torch

import lab_io
import lab_targets
import train_utils as tu
from load_model_hf import load_pretrained
from mvtec_dataset import make_loaders, prepare_split


def _logits_for(preds, scores=None):
    """Two-column logits whose argmax is `preds` (and whose anomaly probability orders like `scores`)."""
    scores = np.asarray(scores if scores is not None else preds, dtype=float)
    z = np.where(np.asarray(preds) == 1, 1.0, -1.0) * (0.1 + np.abs(scores))
    return np.stack([np.zeros_like(z), z], axis=1)


def test_metrics_on_known_inputs():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    preds = [0, 0, 0, 1, 1, 1, 1, 0]   # TN=3 FP=1 TP=3 FN=1
    m = tu.classification_metrics(labels, _logits_for(preds), ["good"] * 4 + ["crack", "crack", "hole", "hole"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["recall_per_defect"] == {"crack": 1.0, "good": 0.75, "hole": 0.5}
    # AUROC: a perfect ranking gives 1 even when the argmax threshold makes mistakes
    logits = np.stack([np.zeros(8), np.array([-4, -3, -2, -1, 1.5, 2, 3, 4.0]) - 1.2], axis=1)
    assert tu.classification_metrics(labels, logits)["auroc"] == pytest.approx(1.0)
    assert tu.classification_metrics(labels, -logits)["auroc"] == pytest.approx(0.0)
    assert tu.classification_metrics([], np.zeros((0, 2)))["n"] == 0


def test_class_weights_favour_the_rare_class():
    labels = [0] * 9 + [1]
    w = tu.class_weights(labels)
    assert w[1] / w[0] == pytest.approx(9.0)
    assert float(w[labels].sum()) == pytest.approx(len(labels))  # average weight per sample stays 1


def test_benchmark_reports_percentiles_and_throughput():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    stats = tu.benchmark_torch_model(model, torch.randn(4, 3, 8, 8), warmup=2, runs=20)
    assert stats["runs"] == 20 and stats["batch_size"] == 4 and stats["threads"] >= 1
    assert 0 < stats["latency_median_ms"] <= stats["latency_p95_ms"] <= stats["latency_max_ms"]
    assert stats["latency_p99_ms"] is None  # 20 runs: a "p99" would be the slowest one, latency_max_ms says it
    stats = tu.benchmark_torch_model(model, torch.randn(4, 3, 8, 8), warmup=0, runs=100)
    assert stats["latency_p95_ms"] <= stats["latency_p99_ms"] <= stats["latency_max_ms"]
    assert stats["throughput_img_s"] == pytest.approx(4000 / stats["latency_median_ms"])
    assert lab_targets.cost_per_1000_images(3.6, latency_ms_per_batch=100, batch_size=1) == pytest.approx(0.1)


class _FakeMachine:
    """A clock that the jobs advance: job A costs 2 s and job B 1 s, three times more during a slow spell."""

    def __init__(self, slow_calls=range(0)):
        self.now, self.calls, self.order, self.slow_calls = 0.0, 0, [], slow_calls

    def job(self, name, seconds):
        def run():
            self.now += seconds * (3 if self.calls in self.slow_calls else 1)
            self.calls += 1
            self.order.append(name)
        return {"run": run, "batch_size": 1, "device": "cpu", "threads": 1}


def test_benchmark_rounds_interleave_variants_so_a_slow_spell_hits_all_alike(monkeypatch):
    ratios = {}
    for rounds in (1, 3):
        machine = _FakeMachine(slow_calls=range(2, 2 + 8))  # right after the warm-ups, a third of all the runs
        monkeypatch.setattr(lab_io.time, "perf_counter", lambda m=machine: m.now)
        timed = lab_io.benchmark_rounds({"A": machine.job("A", 2.0), "B": machine.job("B", 1.0)}, warmup=1, runs=12,
                                        max_seconds=None, rounds=rounds)
        assert [timed[n]["runs"] for n in "AB"] == [12, 12] and timed["A"]["rounds"] == rounds
        ratios[rounds] = timed["A"]["latency_median_ms"] / timed["B"]["latency_median_ms"]
        if rounds == 3:  # warm-ups, then every variant in each round, after one untimed call of its own
            assert machine.order == ["A", "B"] + (["A"] * 5 + ["B"] * 5) * 3
    assert ratios[1] == pytest.approx(6.0)  # the spell hit A's block alone: A looks 3x slower than it is
    assert ratios[3] == pytest.approx(2.0)  # a third of each variant's runs slowed: the medians keep the true ratio


def test_benchmark_rounds_never_time_the_first_call_after_a_switch(monkeypatch):
    machine = _FakeMachine()
    monkeypatch.setattr(lab_io.time, "perf_counter", lambda: machine.now)
    jobs = {"A": machine.job("A", 2.0), "B": machine.job("B", 1.0)}
    for name, job in jobs.items():  # the first call after the other variant ran costs 10x
        def run(job=job, name=name):
            cost = 10 if machine.order and machine.order[-1] != name else 1
            job["run"]()
            machine.now += (cost - 1) * {"A": 2.0, "B": 1.0}[name]
        jobs[name] = dict(job, run=run)
    timed = lab_io.benchmark_rounds(jobs, warmup=1, runs=6, max_seconds=None, rounds=3)
    assert timed["A"]["latency_max_ms"] == pytest.approx(2000) and timed["B"]["latency_max_ms"] == pytest.approx(1000)
    calls = len(machine.order)
    lab_io.benchmark_rounds({"A": jobs["A"]}, warmup=0, runs=3, max_seconds=None, rounds=3)
    assert len(machine.order) == calls + 3  # one variant: nothing to switch from, no extra call


def test_benchmark_rounds_share_the_time_budget_over_the_rounds(monkeypatch):
    machine = _FakeMachine()
    monkeypatch.setattr(lab_io.time, "perf_counter", lambda: machine.now)
    timed = lab_io.benchmark_rounds({"slow": machine.job("slow", 10.0), "fast": machine.job("fast", 0.001)},
                                    warmup=0, runs=30, max_seconds=30, rounds=3)
    assert timed["slow"]["runs"] == 5 and timed["fast"]["runs"] == 30  # never fewer than 5 runs
    slow_rounds = [i for i, name in enumerate(machine.order) if name == "slow"]
    fast_rounds = [i for i, name in enumerate(machine.order) if name == "fast"]
    assert slow_rounds[-1] > fast_rounds[0]  # still timed in the last round, after the fast one's first runs
    assert timed["slow"]["latency_median_ms"] == pytest.approx(10_000)


def test_csv_append_keeps_rows_and_unions_columns(tmp_path):
    path = tmp_path / "r.csv"
    lab_io.append_csv_rows(path, [{"run_id": 1, "accuracy": 0.5}])
    lab_io.append_csv_rows(path, [{"run_id": 2, "note": "x", "accuracy": float("nan")}])
    rows = list(csv.DictReader(open(path)))
    assert [r["run_id"] for r in rows] == ["1", "2"] and rows[0]["note"] == "" and rows[1]["note"] == "x"
    assert rows[1]["accuracy"] == ""  # nan written as empty, never as an invented number
    with pytest.raises(ValueError, match="speedup_b1"):  # one schema for every CSV: an unknown column is a bug
        lab_io.append_csv_rows(path, [{"run_id": 3, "speedup_b1": 2.0}])
    assert len(list(csv.DictReader(open(path)))) == 2


def test_csv_saved_again_by_a_spreadsheet_is_read_through_or_kept_aside(tmp_path, capsys):
    """A BOM ("CSV UTF-8") is read through: one header, the old rows under it. A file that cannot be extended as it
    is (';' separators, a cell too many) is kept under a timestamped name, and the new rows start a new file."""
    path = tmp_path / "r.csv"
    path.write_text("run_id,accuracy\n1,0.5\n", encoding="utf-8-sig")
    lab_io.append_csv_rows(path, [{"run_id": 2, "accuracy": 0.75}])
    assert path.read_text(encoding="utf-8") == "run_id,accuracy\n1,0.5\n2,0.75\n"
    for i, text in enumerate(("run_id;accuracy\n1;0,5\n", "run_id,accuracy\n1,0.5,oops\n")):
        path.write_text(text, encoding="utf-8")
        lab_io.append_csv_rows(path, [{"run_id": 3, "accuracy": 0.25}])
        assert path.read_text(encoding="utf-8") == "run_id,accuracy\n3,0.25\n"
        kept = sorted(p for p in tmp_path.glob("r.*.csv"))
        assert len(kept) == i + 1 and text in {p.read_text(encoding="utf-8") for p in kept}
        assert "it is kept aside and a new file is started" in capsys.readouterr().out
    for kept_file in tmp_path.glob("r.*.csv"):  # and the report says what is wrong with them, in one line
        with pytest.raises(lab_io.UserError, match="changed"):
            lab_io.read_csv_rows(kept_file)


def test_keep_previous_and_atomic_write(tmp_path):
    path = tmp_path / "out.txt"
    lab_io.atomic_write_text(path, "first")
    backup = lab_io.keep_previous(path)
    assert backup.read_text() == "first" and not path.exists()
    lab_io.atomic_write_text(path, "second")
    with pytest.raises(RuntimeError):
        lab_io.atomic_write(path, lambda p: (p.write_text("half"), (_ for _ in ()).throw(RuntimeError("crash"))))
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([backup.name, "out.txt"])  # no temp file left
    (tmp_path / "resultats").mkdir()
    with pytest.raises(lab_io.UserError, match="is a folder"):  # never set aside and replaced by one file
        lab_io.keep_previous(tmp_path / "resultats")
    assert (tmp_path / "resultats").is_dir()


def test_pick_device_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tu.pick_device("cpu").type == "cpu"
    with pytest.raises(lab_io.UserError, match="no CUDA GPU"):
        tu.pick_device("cuda")
    with pytest.raises(lab_io.UserError, match="unknown --device"):
        tu.pick_device("tpu")


@pytest.mark.slow
def test_tiny_training_learns_the_synthetic_task(synthetic_root):
    """A real fine-tuning run of the offline ViT: held-out accuracy clearly above chance."""
    tu.set_seed(0)
    split, _ = prepare_split(synthetic_root, "bottle")
    model, pre, _ = load_pretrained("offline-vit-tiny")
    loaders = make_loaders(synthetic_root, "bottle", split, pre, batch_size=8)
    result = tu.train_model(model, loaders["train"], loaders["val"], epochs=tu.OFFLINE_DEFAULT_EPOCHS,
                            lr=tu.OFFLINE_DEFAULT_LR, device=torch.device("cpu"),
                            loss_weights=tu.class_weights([s.label for s in split["train"]]))
    assert len(result["history"]) == tu.OFFLINE_DEFAULT_EPOCHS and result["train_seconds"] > 0
    logits, labels = tu.predict_logits(model, loaders["test"])
    metrics = tu.classification_metrics(labels, logits, loaders["test"].dataset.defect_types,
                                        threshold=result["threshold"])  # chosen on val
    majority = max(np.mean(labels), 1 - np.mean(labels))
    assert metrics["accuracy"] >= majority + 0.1, metrics
    assert metrics["auroc"] >= 0.85, metrics
    assert math.isfinite(result["history"][-1]["train_loss"])


def test_a_diverging_training_stops_with_a_clear_error_or_keeps_the_epoch_before(synthetic_root, capsys):
    """A learning rate far too high: the loss becomes nan in the first steps. Without an earlier epoch, one error that
    says to lower --lr (no nan reaching the metrics); with epoch 0 kept (keep_initial), training stops there."""
    tu.set_seed(0)
    split, _ = prepare_split(synthetic_root, "bottle")
    model, pre, _ = load_pretrained("offline-vit-tiny")
    loaders = make_loaders(synthetic_root, "bottle", split, pre, batch_size=16, augment="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lab_io.UserError, match=r"diverged in epoch 1 .* lower --lr"):
        tu.train_model(model, loaders["train"], loaders["val"], epochs=2, lr=1e9, device=torch.device("cpu"))
    model.load_state_dict(before)
    result = tu.train_model(model, loaders["train"], loaders["val"], epochs=2, lr=1e9, device=torch.device("cpu"),
                            keep_initial=True)
    assert result["best_epoch"] == 0 and [r["epoch"] for r in result["history"]] == [0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "diverged in epoch 1" in capsys.readouterr().out


@pytest.mark.slow
def test_linear_probe_head_is_folded_and_robust_choice_is_reported(synthetic_root):
    """The probe on frozen features (fitted on fp32 and int8-backbone train features; depth, scaling and C chosen
    by cross-validation on train + val), its val log-losses reported, the head folded into the model so that the
    model's P(anomaly) is the probe's, the backbone cut to the kept depth, and fine-tuning's epoch 0 starting from
    it with its own measured train loss."""
    tu.set_seed(0)
    split, _ = prepare_split(synthetic_root, "bottle")
    model, pre, _ = load_pretrained("offline-vit-tiny")
    loaders = make_loaders(synthetic_root, "bottle", split, pre, batch_size=16, augment="flips")
    info = tu.linear_probe_init(model, loaders["train"], loaders["val"], torch.device("cpu"))
    assert info["applied"] and info["scaling"] in tu.PROBE_SCALINGS and info["C"] in tu.PROBE_C_GRID
    assert info["depth"] in info["depths_tried"] and len(model.dinov2.encoder.layer) == info["depth"]
    assert math.isfinite(info["val_log_loss_int8"]) and 0 <= info["val_flips_int8"] <= len(split["val"])
    assert max(info["val_log_loss"], info["val_log_loss_int8"]) <= 1.0  # better than a coin on this easy tree
    # the folded head reproduces the probe's val log-loss from the model's own logits
    logits, labels = tu.predict_logits(model, loaders["val"])
    proba = lab_targets.anomaly_scores(logits)
    assert tu._log_loss(proba, labels) == pytest.approx(info["val_log_loss"], abs=1e-3)
    result = tu.train_model(model, loaders["train"], loaders["val"], epochs=1, lr=1e-6, device=torch.device("cpu"),
                            keep_initial=True)
    assert result["history"][0]["epoch"] == 0 and math.isfinite(result["history"][0]["train_loss"])


@pytest.mark.slow
def test_half_depth_student_copies_every_other_block_and_mimics_its_teacher(synthetic_root, tmp_path):
    """The 'baseline-half' student: blocks 0, 2, ... of the teacher with their weights, a checkpoint that rebuilds
    it; distilled with the logits' squared difference, it keeps the teacher's threshold and its kept epoch is the
    one closest to the teacher's val logits (no label)."""
    from load_model_hf import model_from_checkpoint, read_checkpoint, save_checkpoint

    tu.set_seed(0)
    split, manifest = prepare_split(synthetic_root, "bottle")
    teacher, pre, _ = load_pretrained("offline-vit-small")
    student = tu.half_depth_copy(teacher)
    blocks = teacher.dinov2.encoder.layer
    assert len(student.dinov2.encoder.layer) == student.config.num_hidden_layers == (len(blocks) + 1) // 2
    for kept, source in zip(student.dinov2.encoder.layer, list(blocks)[::2]):
        assert kept is not source and all(torch.equal(a, b) for a, b in zip(kept.parameters(), source.parameters()))
    assert torch.equal(student.classifier.weight, teacher.classifier.weight) and len(blocks) == 6  # teacher intact
    path = save_checkpoint(tmp_path / "s.pth", student, model_name=lab_targets.STUDENT_FROM_BASELINE,
                           preprocessing=pre, category="bottle", split_manifest=manifest)
    rebuilt = model_from_checkpoint(read_checkpoint(path, "bottle"), path)
    x = torch.rand(2, 3, *pre["image_size"])
    with torch.inference_mode():
        assert torch.allclose(tu.model_logits(rebuilt, x), tu.model_logits(student.eval(), x), atol=1e-5)

    loaders = make_loaders(synthetic_root, "bottle", split, pre, batch_size=16)
    result = tu.train_model(student, loaders["train"], loaders["val"], epochs=2, lr=tu.STUDENT_FROM_BASELINE_LR,
                            device=torch.device("cpu"), teacher=teacher.eval(), distill_alpha=1.0,
                            distill_loss="mse", teacher_threshold=0.37)
    assert result["threshold"] == 0.37 and all(r["val_threshold"] == 0.37 for r in result["history"])
    losses = [r["val_distill_loss"] for r in result["history"]]
    assert result["best_epoch"] == 1 + int(np.argmin(losses))
    teacher_logits, _ = tu.predict_logits(teacher, loaders["val"])
    logits, _ = tu.predict_logits(student, loaders["val"])
    assert float(((logits - teacher_logits) ** 2).mean()) == pytest.approx(min(losses), rel=1e-4)


def test_distillation_terms():
    """kl is Hinton's softened KL (0 for equal logits, scaled by T^2); mse the logits' squared difference."""
    a = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    assert float(tu.distillation_term(a, a, "kl")) == pytest.approx(0.0, abs=1e-6)
    assert float(tu.distillation_term(a, a + 1.0, "mse")) == pytest.approx(1.0)
    assert float(tu.distillation_term(a, a + 1.0, "kl")) == pytest.approx(0.0, abs=1e-6)  # a shift moves no softmax


def test_run_ids_of_runs_started_in_the_same_second_differ(tmp_path):
    """Two runs appending to one CSV in the same second keep separate run_ids, so a report never merges them."""
    ids = [lab_io.run_id() for _ in range(50)]
    assert len(set(ids)) == 50 and len({i[:15] for i in ids}) <= 2  # same timestamp prefix, unique suffix
    path = tmp_path / "r.csv"
    for rid in ids[:2]:
        lab_io.append_csv_rows(path, [{"run_id": rid, "variant": "x"}])
    assert [len(lab_io.read_csv_rows(path, rid)) for rid in ids[:2]] == [1, 1]


def test_selection_images_are_train_then_val_in_one_order_and_never_augmented(synthetic_root):
    """The guards compare two models on the same images in the same order: train + val, never shuffled or augmented,
    never the test split."""
    from mvtec_dataset import selection_loader

    split, _ = prepare_split(synthetic_root, "bottle")
    pre = load_pretrained("offline-vit-tiny")[1]
    loaders = make_loaders(synthetic_root, "bottle", split, pre, batch_size=8, names=("train", "val"), augment="none")
    chosen_on = selection_loader(loaders, batch_size=8)
    assert len(chosen_on.dataset) == len(split["train"]) + len(split["val"])
    first, second = (torch.cat([x for x, _ in chosen_on]) for _ in range(2))
    assert torch.equal(first, second)  # the train loader shuffles; the selection loader does not
    labels = torch.cat([y for _, y in chosen_on]).tolist()
    assert labels == [s.label for name in ("train", "val") for s in split[name]]
    augmented = make_loaders(synthetic_root, "bottle", split, pre, batch_size=8, names=("train", "val"))
    with pytest.raises(ValueError):
        selection_loader(augmented)
