"""benchmark_gpu.py end to end on the synthetic tree (CPU only here): outputs, GPU marked not measured, reruns
keep earlier checkpoints, and the user errors (one `error:` line, exit 2, no traceback)."""
import csv
import json
import math

import pytest
import torch

from load_model_hf import load_checkpoint

# One thread: on a busy 2-core machine, two spinning threads per process make these runs several times slower.
FAST = ("--model-name", "offline-vit-tiny", "--epochs", "2", "--runs", "5", "--warmup", "1", "--num-threads", "1")
RERUN = ("--model-name", "offline-vit-tiny", "--epochs", "1", "--runs", "2", "--warmup", "0", "--bench-batch-size", "2",
         "--num-threads", "1", "--devices", "cpu")  # reruns only check file handling: as cheap as possible
MEASURED = ("train_seconds", "epoch_seconds_mean", "latency_median_ms", "latency_p95_ms", "latency_max_ms",
            "throughput_img_s", "size_mb", "training_cost_usd", "cost_per_1000_images_usd",
            "cost_per_1000_images_batch_usd")
COLUMNS = ("run_id", "script", "category", "variant", "backend", "device", "device_name", "batch_size", "threads",
           "precision", "accuracy", "precision_score", "recall", "f1",
           "auroc", "n_test", "torch_version", "price_per_hour",
           "gpu_speedup_train", "gpu_speedup_latency_b1", "gpu_speedup_throughput", *MEASURED)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cpu_run_writes_everything_and_marks_gpu_not_measured(run, synthetic_root, tmp_path):
    res = run("benchmark_gpu.py", "--data-dir", synthetic_root, *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA/MPS GPU found: GPU part not measured" in res.stdout
    assert "Summary" in res.stdout and "GPU/CPU speedup: not measured" in res.stdout
    models, results = tmp_path / "modeles", tmp_path / "resultats"
    assert (models / "model_cpu_bottle.pth").is_file() and not (models / "model_gpu_bottle.pth").exists()
    assert (results / "benchmark_cpu_gpu.png").stat().st_size > 10_000
    manifest = json.loads((models / "split_bottle.json").read_text())

    rows = _rows(results / "benchmark_cpu_gpu.csv")
    assert [r["device"] for r in rows] == ["cpu", "gpu"] and len({r["run_id"] for r in rows}) == 1
    assert set(COLUMNS) <= set(rows[0])
    cpu, gpu = rows
    assert cpu["measured"] == "yes" and cpu["batch_size"] == "1" and cpu["threads"] == "1" and int(cpu["n_test"]) == manifest["counts"]["test"]
    for key in MEASURED:
        assert math.isfinite(float(cpu[key])) and float(cpu[key]) > 0, key
        assert gpu[key] == "", key  # not measured: left empty, never invented
    assert cpu["precision"] == gpu["precision"] == "fp32"  # numeric format; the metric is precision_score
    for key in ("accuracy", "precision_score", "recall", "f1", "auroc"):
        assert 0 <= float(cpu[key]) <= 1
        assert gpu[key] == ""
    assert float(cpu["latency_median_ms"]) <= float(cpu["latency_p95_ms"]) <= float(cpu["latency_max_ms"])
    assert cpu["latency_p99_ms"] == "" or int(cpu["runs"]) >= 100
    assert float(cpu["price_per_hour"]) == pytest.approx(0.192) and float(gpu["price_per_hour"]) == pytest.approx(0.526)
    assert float(cpu["training_cost_usd"]) == pytest.approx(0.192 * float(cpu["train_seconds"]) / 3600, rel=1e-3)
    assert gpu["measured"] == "no" and gpu["gpu_speedup_train"] == ""

    model, ckpt = load_checkpoint("model_cpu_bottle.pth", expected_category="bottle", models_dir=models)
    assert ckpt["category"] == "bottle" and ckpt["split"] == manifest
    assert ckpt["train_args"]["device"] == "cpu" and len(ckpt["train_args"]["history"]) == 2
    assert len(ckpt["train_args"]["epoch_seconds"]) == 2
    assert ckpt["metrics"]["accuracy"] == pytest.approx(float(cpu["accuracy"]), abs=1e-5)
    with torch.inference_mode():
        assert model(pixel_values=torch.zeros(1, 3, *ckpt["preprocessing"]["image_size"])).logits.shape == (1, 2)

    # A second run keeps the first checkpoint and plot (timestamped) and appends rows; --overwrite replaces.
    res = run("benchmark_gpu.py", "--data-dir", synthetic_root, *RERUN, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "note: previous" in res.stdout
    assert len(list(models.glob("model_cpu_bottle*.pth"))) == 2 and len(list(results.glob("*.png"))) == 2
    assert len(list(models.glob("split_bottle*.json"))) == 1  # same split: nothing to keep
    rows = _rows(results / "benchmark_cpu_gpu.csv")
    assert len(rows) == 4 and rows[3]["note"].startswith("GPU not requested")
    res = run("benchmark_gpu.py", "--data-dir", synthetic_root, *RERUN, "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(models.glob("model_cpu_bottle*.pth"))) == 2 and len(list(results.glob("*.png"))) == 2


@pytest.mark.parametrize("args, message", [
    (("--data-dir", "{tmp}/nowhere"), "no dataset folder"),
    (("--data-dir", "{root}", "--category", "capsule"), "no dataset folder"),
    (("--data-dir", "{root}", "--devices", "tpu"), "--devices takes cpu and/or gpu"),
    (("--data-dir", "{root}", "--batch-size", "0"), "--batch-size must be >= 1"),
    (("--data-dir", "{root}", "--devices", "gpu"), "no CUDA/MPS GPU found"),
])
def test_user_errors_are_one_line(run, cli, synthetic_root, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, root=synthetic_root) for a in args]
    # the GPU case in a real process: CUDA_VISIBLE_DEVICES="" hides a GPU only before CUDA starts
    launch = run if "gpu" in args else cli
    res = launch("benchmark_gpu.py", *args, "--model-name", "offline-vit-tiny", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert not (tmp_path / "modeles").exists() and not (tmp_path / "resultats").exists()
