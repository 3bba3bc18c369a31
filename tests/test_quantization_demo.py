"""quantization_demo.py and quantize.py: the plain dynamic int8 and the SmoothQuant fix, their checkpoints
(weights_only round trip), comparison CSV/plot, objectives, batch independence, errors."""
import csv
import math
import re

import pytest
import torch

import load_model_hf as lm
import quantize as qd
from mvtec_dataset import prepare_split
from lab_io import UserError
from train_utils import model_logits

FAST = ("--runs", "5", "--warmup", "1", "--bench-batch-size", "4", "--num-threads", "1")


def _checkpoint(folder, synthetic_root, name="model_cpu_bottle.pth"):
    """An untrained offline-vit-tiny checkpoint with a real split manifest (quantization needs no training)."""
    model, pre, _ = lm.load_pretrained("offline-vit-tiny")
    _, manifest = prepare_split(synthetic_root, "bottle")
    return lm.save_checkpoint(folder / name, model, model_name="offline-vit-tiny", preprocessing=pre,
                              category="bottle", split_manifest=manifest)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, synthetic_root):
    """One end-to-end run, as a user would type it (bare checkpoint name resolved in modeles/)."""
    from conftest import run_script

    cwd = tmp_path_factory.mktemp("quant")
    (cwd / "modeles").mkdir()
    _checkpoint(cwd / "modeles", synthetic_root)
    proc = run_script("quantization_demo.py", "--category", "bottle", "--model-path", "model_cpu_bottle.pth",
                      "--data-dir", synthetic_root, *FAST, cwd=cwd, timeout=300)
    return cwd, proc


def test_end_to_end_outputs(demo):
    cwd, proc = demo
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr  # deprecation warnings silenced
    out = proc.stdout
    for name in ("size", "accuracy", "accuracy loss"):
        assert re.search(rf"^\s+\[(PASS|FAIL)\] {name} [<>]", out, re.M), out
    assert re.search(r"^\s+\[INFO\] speed-up", out, re.M)
    # the untrained model is far from 95 %: the FAIL must say why and what to do
    assert "[FAIL] accuracy > 95 %" in out and "RANDOM weights" in out
    assert (cwd / "modeles" / "model_quantized.pth").is_file()
    assert (cwd / "modeles" / "model_quantized_smoothquant.pth").is_file()
    assert re.search(r"pytorch-int8-smoothquant: kernel \S+ \(engine '\w+', weights within \+-\d+: [^)]+\), "
                     r"calibrated on \d+ train images; SmoothQuant alpha [\d.]+ .* kept fp32", out), out
    assert (cwd / "resultats" / "quantization_comparison.png").stat().st_size > 10_000

    with open(cwd / "resultats" / "quantization_results.csv", newline="") as f:
        by_variant = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(by_variant) == {"pytorch-fp32", "pytorch-int8-dynamic", "pytorch-int8-smoothquant"}
    smooth = by_variant["pytorch-int8-smoothquant"]
    assert smooth["precision"] == "int8" and float(smooth["roundtrip_max_abs_diff"]) == 0
    assert float(smooth["size_mb"]) == pytest.approx(
        (cwd / "modeles/model_quantized_smoothquant.pth").stat().st_size / 1e6, rel=1e-4)
    rows = {"fp32": by_variant["pytorch-fp32"], "int8": by_variant["pytorch-int8-dynamic"]}
    for col in ("run_id", "script", "category", "variant", "backend", "precision", "device", "device_name",
                "batch_size", "threads", "size_mb", "latency_median_ms", "latency_p95_ms", "latency_p99_ms",
                "throughput_img_s", "accuracy", "precision_score", "recall", "f1", "auroc", "n_test",
                "torch_version", "size_ratio", "speedup", "throughput_ratio", "accuracy_delta_pt",
                "agreement", "max_abs_logit_diff", "engine", "throughput_batch_size", "guards_passed", "cpu_flags"):
        assert col in rows["int8"], col
    fp32, int8 = rows["fp32"], rows["int8"]
    assert int8["backend"] == fp32["backend"] == "pytorch" and int8["batch_size"] == "1" and int8["throughput_batch_size"] == "4"
    assert 0 < float(int8["size_mb"]) < float(fp32["size_mb"])
    assert float(int8["size_ratio"]) == pytest.approx(float(fp32["size_mb"]) / float(int8["size_mb"]), rel=1e-3)
    # the int8 size is the file written, in MB = 10^6 bytes
    assert float(int8["size_mb"]) == pytest.approx((cwd / "modeles/model_quantized.pth").stat().st_size / 1e6,
                                                   rel=1e-4)
    for row in (fp32, int8):
        for col in ("latency_median_ms", "latency_p95_ms", "throughput_img_s", "speedup"):
            assert math.isfinite(float(row[col])) and float(row[col]) > 0, col
        assert float(row["latency_p95_ms"]) >= float(row["latency_median_ms"])
    assert 0 <= float(int8["agreement"]) <= 1 and float(int8["max_abs_logit_diff"]) >= 0
    # one sign everywhere: accuracy_delta_pt = int8 - fp32, negative = a loss
    assert float(int8["accuracy_delta_pt"]) == pytest.approx(100 * (float(int8["accuracy"]) - float(fp32["accuracy"])),
                                                             abs=1e-3)
    assert int(int8["n_test"]) > 0 and float(int8["roundtrip_max_abs_diff"]) == 0
    assert {int8[k] for k in ("target_size_30mb", "target_accuracy_95", "target_loss_1pt")} <= {"True", "False"}


def test_saved_int8_checkpoint_reloads_weights_only(demo, synthetic_root):
    cwd, proc = demo
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = cwd / "modeles" / "model_quantized.pth"
    with qd.quiet_quantization_warnings():
        raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["quantization"]["method"] == "dynamic-int8" and raw["quantization"]["dtype"] == "qint8"
    for key in ("format", "model_type", "model_class", "config_json", "preprocessing", "category", "split"):
        assert key in raw, key
    assert raw["category"] == "bottle" and 0 <= raw["metrics"]["accuracy"] <= 1
    # reloaded int8 model == quantizing the fp32 checkpoint again here (quantize_dynamic is deterministic)
    int8, _ = qd.load_quantized_checkpoint(path, expected_category="bottle")
    fp32, ckpt = lm.load_checkpoint(cwd / "modeles" / "model_cpu_bottle.pth")
    again = qd.quantize_dynamic_int8(fp32, raw["quantization"]["engine"])
    x = torch.randn(3, 3, *ckpt["preprocessing"]["image_size"])
    with torch.inference_mode():
        assert torch.equal(model_logits(int8, x), model_logits(again, x))
    with pytest.raises(UserError, match="not an int8 checkpoint"):
        qd.load_quantized_checkpoint(cwd / "modeles" / "model_cpu_bottle.pth")
    with pytest.raises(UserError, match="not 'capsule'"):
        qd.load_quantized_checkpoint(path, expected_category="capsule")


def test_already_quantized_checkpoint_is_refused(demo, synthetic_root, run):
    cwd, _ = demo
    proc = run("quantization_demo.py", "--model-path", "model_quantized.pth", "--data-dir", synthetic_root, cwd=cwd)
    assert proc.returncode == 2 and "already an int8 checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("per_channel", [False, True])
def test_round_trip_same_logits(tmp_path, synthetic_root, per_channel):
    fp32, ckpt = lm.load_checkpoint(_checkpoint(tmp_path, synthetic_root))
    int8 = qd.quantize_dynamic_int8(fp32, "auto", per_channel)
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    assert not any("quantized" in type(m).__module__ for m in fp32.modules())  # the fp32 model is untouched
    info = qd.quantization_info(torch.backends.quantized.engine, per_channel)
    path = qd.save_quantized_checkpoint(tmp_path / "q.pth", int8, ckpt, quantization=info)
    reloaded, saved = qd.load_quantized_checkpoint(path)
    x = torch.randn(2, 3, *ckpt["preprocessing"]["image_size"])
    with torch.inference_mode():
        assert torch.equal(model_logits(int8, x), model_logits(reloaded, x))
        assert (model_logits(int8, x) - model_logits(fp32, x)).abs().max() < 0.5
    assert saved["quantization"]["qscheme"] == ("per_channel" if per_channel else "per_tensor")
    assert saved["split"] == ckpt["split"]


def test_smooth_int8_is_batch_independent_and_reloads(tmp_path, synthetic_root):
    """The fix: one activation scale per token, so an image's logits do not depend on its batch-mates (the plain
    dynamic int8 takes one scale per batch tensor); closer to fp32 than it; saved and reloaded weights_only."""
    fp32, ckpt = lm.load_checkpoint(_checkpoint(tmp_path, synthetic_root))
    torch.manual_seed(0)
    calibration, images = torch.randn(4, 3, *ckpt["preprocessing"]["image_size"]), \
        torch.randn(12, 3, *ckpt["preprocessing"]["image_size"])
    smooth, info = qd.quantize_smooth_int8(fp32, calibration, images, threshold=0.5)
    assert info["method"] == qd.SMOOTH_METHOD and info["agreement_images"] == 12 and info["tried"]
    assert sum(isinstance(m, qd.Int8Linear) for m in smooth.modules()) == info["int8_linears"] > 0
    assert not any(isinstance(m, qd.Int8Linear) for m in fp32.modules())  # the fp32 model is untouched
    mixed = images.clone()
    mixed[1:] *= 50  # loud batch-mates
    with torch.inference_mode():
        alone = model_logits(smooth, images[:1])
        assert torch.allclose(model_logits(smooth, mixed)[:1], alone, atol=1e-5)
        dynamic = qd.quantize_dynamic_int8(fp32)
        ref = model_logits(fp32, images)
        assert (model_logits(smooth, images) - ref).abs().max() <= (model_logits(dynamic, images) - ref).abs().max()
    path = qd.save_quantized_checkpoint(tmp_path / "s.pth", smooth, ckpt, quantization=info)
    reloaded, saved = qd.load_quantized_checkpoint(path)
    assert saved["quantization"]["fp32_linears"] == info["fp32_linears"]
    with torch.inference_mode():
        assert torch.equal(model_logits(smooth, images), model_logits(reloaded, images))


def test_smooth_int8_mixed_precision_stays_under_the_size_target(tmp_path, synthetic_root, monkeypatch):
    """More fp32 layers are tried while agreement is short of its target, but never past the size target."""
    import lab_targets

    fp32, ckpt = lm.load_checkpoint(_checkpoint(tmp_path, synthetic_root))
    torch.manual_seed(0)
    images = torch.randn(6, 3, *ckpt["preprocessing"]["image_size"])
    monkeypatch.setattr(lab_targets, "INT8_MIN_AGREEMENT", 1.01)  # never reached: every candidate is a try
    _, free = qd.quantize_smooth_int8(fp32, images[:2], images, threshold=0.5)
    assert [k for k, _ in free["tried"]] == [k for k in qd.MAX_FP32_LINEARS if k < len(qd.backbone_linears(fp32))]
    all_int8_mb = qd.state_dict_bytes(qd.quantize_linears_int8(fp32, {n: torch.ones(m.in_features) for n, m in
                                                                      fp32.named_modules() if n in
                                                                      qd.backbone_linears(fp32)})) / 1e6
    monkeypatch.setattr(lab_targets, "TARGET_MAX_SIZE_MB", all_int8_mb * 1.001)
    smooth, capped = qd.quantize_smooth_int8(fp32, images[:2], images, threshold=0.5)
    assert [k for k, _ in capped["tried"]] == [0] and capped["fp32_linears"] == []
    assert not any(type(m) is torch.nn.Linear for n, m in smooth.named_modules() if n in qd.backbone_linears(fp32))


def test_int8_linear_matches_float_reference():
    """Int8Linear = its own integer arithmetic done in float (rounding per image and per output channel), with the
    weight range this CPU's kernel multiplies exactly."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(2, 7, 64)
    x[..., 3] *= 30  # an outlier channel, as in ViT activations
    q = qd.Int8Linear.from_linear(linear, x.abs().reshape(-1, 64).amax(0), weight_code=qd.weight_codes()[-1])
    with torch.inference_mode():
        rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert q(x).shape == (2, 7, 32) and rel < 0.02, float(rel)


def test_smooth_int8_corrects_the_head_offset_and_keeps_the_chosen_alpha(tmp_path, synthetic_root):
    """The head's bias absorbs the mean margin offset of the int8 model on the calibration images (label-free bias
    correction), and the alpha kept is the one whose margins stayed closest to fp32's on the agreement images."""
    fp32, ckpt = lm.load_checkpoint(_checkpoint(tmp_path, synthetic_root))
    torch.manual_seed(0)
    calibration, images = torch.randn(4, 3, *ckpt["preprocessing"]["image_size"]), \
        torch.randn(10, 3, *ckpt["preprocessing"]["image_size"])
    smooth, info = qd.quantize_smooth_int8(fp32, calibration, images, threshold=0.5)
    with torch.inference_mode():
        offset = qd.logit_margin(model_logits(fp32, calibration)) - qd.logit_margin(model_logits(smooth, calibration))
    assert abs(offset.mean()) < 1e-4, offset.mean()
    assert [a for a, _ in info["alphas_tried"]] == list(qd.SMOOTH_ALPHAS)
    assert info["alpha"] == min(info["alphas_tried"], key=lambda t: t[1])[0]
    head = qd.quantize_linears_int8(fp32, {n: torch.ones(m.in_features) for n, m in fp32.named_modules()
                                           if n in qd.backbone_linears(fp32)})
    with torch.inference_mode():
        before = qd.logit_margin(model_logits(head, images))
        assert qd.head_logit_shift(head, 0.75)
        assert abs(qd.logit_margin(model_logits(head, images)) - before - 0.75).max() < 1e-5


def test_int8_kernels_agree_and_legacy_checkpoints_load(tmp_path, synthetic_root, monkeypatch):
    """The fused per-image kernel and the per-token fallback run the same int8 weights to close logits; a checkpoint
    of the earlier per-token version (same tensors, older method name) still loads."""
    fp32, ckpt = lm.load_checkpoint(_checkpoint(tmp_path, synthetic_root))
    torch.manual_seed(0)
    images = torch.randn(6, 3, *ckpt["preprocessing"]["image_size"])
    smooth, info = qd.quantize_smooth_int8(fp32, images[:2], images, threshold=0.5)
    with torch.inference_mode():
        ref, here = model_logits(fp32, images), model_logits(smooth, images)
        monkeypatch.setattr(qd, "int8_kernel", lambda: qd.KERNEL_PER_TOKEN)
        per_token = model_logits(smooth, images)
    assert info["kernel"] == qd.KERNEL_FUSED
    spread = (ref - ref.mean()).abs().max()
    assert (here - ref).abs().max() < 0.25 * spread and (per_token - ref).abs().max() < 0.25 * spread
    path = qd.save_quantized_checkpoint(tmp_path / "legacy.pth", smooth, ckpt,
                                        quantization={**info, "method": qd.LEGACY_SMOOTH_METHODS[0]})
    reloaded, _ = qd.load_quantized_checkpoint(path)
    with torch.inference_mode():
        assert torch.equal(model_logits(reloaded, images), per_token)


def test_a_saturating_kernel_keeps_the_fix_on_the_fused_kernel(tmp_path, synthetic_root, monkeypatch):
    """Where fbgemm's AVX2 kernel saturates with full-range weights (emulated here on any CPU), the fix never falls
    back to the per-token product (26x slower than fp32 there): it measures full-range weights against weights within
    +-64, which that kernel multiplies exactly, and keeps the one whose margins stay closer to fp32's."""
    assert qd.fused_kernel_exact(qd.WEIGHT_CODE_SATURATION_SAFE)  # exact on every x86 kernel, VNNI or not
    monkeypatch.setitem(qd._KERNEL_PROBES, (torch.backends.quantized.engine, qd.WEIGHT_CODE_FULL), False)
    assert qd.weight_codes() == (qd.WEIGHT_CODE_FULL, qd.WEIGHT_CODE_SATURATION_SAFE)
    assert qd.int8_kernel() == qd.KERNEL_FUSED
    per_token_calls = []
    monkeypatch.setattr(qd, "_int8_matmul", lambda a, b: per_token_calls.append(1) or a.float() @ b.float())
    fp32, ckpt = lm.load_checkpoint(_checkpoint(tmp_path, synthetic_root))
    torch.manual_seed(0)
    images = torch.randn(6, 3, *ckpt["preprocessing"]["image_size"])
    smooth, info = qd.quantize_smooth_int8(fp32, images[:2], images, threshold=0.5)
    assert [c for c, _ in info["weight_codes_tried"]] == [qd.WEIGHT_CODE_FULL, qd.WEIGHT_CODE_SATURATION_SAFE]
    assert info["weight_code"] == min(info["weight_codes_tried"], key=lambda t: t[1])[0]
    assert info["kernel_exact"] == (info["weight_code"] == qd.WEIGHT_CODE_SATURATION_SAFE)
    layers = [m for m in smooth.modules() if isinstance(m, qd.Int8Linear)]
    assert layers and all(int(m.weight_int8.abs().max()) <= info["weight_code"] for m in layers)
    with torch.inference_mode():
        ref, here = model_logits(fp32, images), model_logits(smooth, images)
        spread = (ref - ref.mean()).abs().max()
        safe = qd.quantize_linears_int8(fp32, {n: torch.ones(m.in_features) for n, m in fp32.named_modules()
                                               if n in qd.backbone_linears(fp32)},
                                        weight_code=qd.WEIGHT_CODE_SATURATION_SAFE)
        assert (model_logits(safe, images) - ref).abs().max() < 0.25 * spread
    assert (here - ref).abs().max() < 0.25 * spread and not per_token_calls


@pytest.mark.slow
def test_error_paths(tmp_path, synthetic_root, run):
    (tmp_path / "modeles").mkdir()
    _checkpoint(tmp_path / "modeles", synthetic_root)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "foreign.pth")
    cases = [
        (["--model-path", "missing.pth"], "not found"),
        (["--category", "capsule", "--model-path", "model_cpu_bottle.pth"], "'bottle', not 'capsule'"),
        (["--model-path", "foreign.pth"], "not a checkpoint of this lab"),
        (["--data-dir", tmp_path / "no_data"], "no dataset folder"),
        (["--runs", "0"], "--runs must be >= 1"),
        (["--num-threads", "0"], "--num-threads must be >= 1"),
    ]
    for args, message in cases:
        proc = run("quantization_demo.py", "--data-dir", synthetic_root, *args, cwd=tmp_path)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr[-1000:])
        assert "Traceback" not in proc.stderr and len(err) == 1 and err[0].startswith("error:"), proc.stderr
        assert message in err[0], (message, err[0])
    assert not (tmp_path / "modeles" / "model_quantized.pth").exists()
