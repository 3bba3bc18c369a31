"""load_model_hf.py: presets, local folders of other architectures, checkpoint round trip and its errors."""
import re

import pytest
import torch

import load_model_hf as lm
from mvtec_dataset import prepare_split
from lab_io import UserError
from train_utils import model_logits


def _tiny_checkpoint(tmp_path, synthetic_root, category="bottle", name="model.pth"):
    model, pre, _ = lm.load_pretrained("offline-vit-tiny")
    _, manifest = prepare_split(synthetic_root, category)
    path = lm.save_checkpoint(tmp_path / name, model, model_name="offline-vit-tiny", preprocessing=pre,
                              category=category, split_manifest=manifest, metrics={"accuracy": 0.5})
    return model, pre, path


def test_offline_preset_forward():
    model, pre, info = lm.load_pretrained("offline-vit-tiny")
    assert info["pretrained"] is False and model.config.id2label == {0: "good", 1: "anomaly"}
    logits = model_logits(model.eval(), torch.randn(2, 3, *pre["image_size"]))
    assert logits.shape == (2, 2)


def test_checkpoint_round_trip_weights_only(tmp_path, synthetic_root):
    model, pre, path = _tiny_checkpoint(tmp_path, synthetic_root)
    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert raw["format"] == lm.CHECKPOINT_FORMAT and raw["category"] == "bottle"
    assert raw["split"]["counts"]["test"] > 0 and raw["versions"]["torch"]
    rebuilt, ckpt = lm.load_checkpoint(path, expected_category="bottle")
    x = torch.randn(3, 3, *pre["image_size"])
    with torch.no_grad():
        assert torch.allclose(model_logits(model.eval(), x), model_logits(rebuilt, x), atol=1e-6)
    assert ckpt["preprocessing"] == pre


def test_bare_name_resolves_in_models_dir(tmp_path, synthetic_root, monkeypatch):
    (tmp_path / "modeles").mkdir()
    _tiny_checkpoint(tmp_path / "modeles", synthetic_root, name="model_cpu_bottle.pth")
    monkeypatch.chdir(tmp_path)
    assert lm.resolve_model_path("model_cpu_bottle.pth").parent.name == "modeles"
    with pytest.raises(UserError, match="not found"):
        lm.resolve_model_path("model_gpu_bottle.pth")


def test_saving_keeps_the_previous_file(tmp_path, synthetic_root):
    _tiny_checkpoint(tmp_path, synthetic_root)
    _tiny_checkpoint(tmp_path, synthetic_root)
    assert len(list(tmp_path.glob("model*.pth"))) == 2


def test_checkpoint_errors(tmp_path, synthetic_root):
    _, _, path = _tiny_checkpoint(tmp_path, synthetic_root)
    with pytest.raises(UserError, match="category 'bottle', not 'capsule'"):
        lm.load_checkpoint(path, expected_category="capsule")
    # a foreign file: a plain state_dict
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not a checkpoint of this lab"):
        lm.load_checkpoint(foreign)
    # a pickled whole model is refused by weights_only
    pickled = tmp_path / "pickled.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        lm.load_checkpoint(pickled)
    # truncated file
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"not a readable checkpoint .*\(the file is truncated or damaged"):
        lm.load_checkpoint(truncated)
    # weights of another architecture under a matching config
    ckpt = torch.load(path, weights_only=True)
    other, _, _ = lm.load_pretrained("offline-vit-small")
    ckpt["state_dict"] = other.state_dict()
    mismatched = tmp_path / "mismatched.pth"
    torch.save(ckpt, mismatched)
    with pytest.raises(UserError, match="weights do not match"):
        lm.load_checkpoint(mismatched)
    # the same keys, one tensor of another shape: named, with both shapes
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("classifier.weight"))
    ckpt["state_dict"][key] = torch.zeros(3, ckpt["state_dict"][key].shape[1])
    torch.save(ckpt, mismatched)
    with pytest.raises(UserError, match=rf"{re.escape(key)} is \(3, \d+\) in the checkpoint, \(2, \d+\) in the model"):
        lm.load_checkpoint(mismatched)
    # a lab-like dict that lacks what the scripts read
    del ckpt["split"]
    torch.save(ckpt, mismatched)
    with pytest.raises(UserError, match="lacks split"):
        lm.load_checkpoint(mismatched)


@pytest.mark.parametrize("arch", ["deit", "dinov2"])
def test_local_folder_of_other_architectures(tmp_path, arch):
    """Any Auto image-classification architecture loads from a local folder with a fresh 2-label head."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Dinov2Config, \
        DeiTConfig, ViTImageProcessor

    if arch == "deit":
        config = DeiTConfig(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=96, num_labels=1000)
        processor = ViTImageProcessor(size={"height": 72, "width": 72}, do_center_crop=True,
                                      crop_size={"height": 64, "width": 64})
    else:
        config = Dinov2Config(image_size=98, patch_size=14, hidden_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_labels=5)
        processor = ViTImageProcessor(size={"height": 56, "width": 56}, image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225])
    folder = tmp_path / arch
    config.architectures = ["DeiTForImageClassification" if arch == "deit" else "Dinov2ForImageClassification"]
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    assert AutoImageProcessor.from_pretrained(folder) is not None

    model, pre, info = lm.load_pretrained(str(folder))
    assert info["pretrained"] and model.config.num_labels == 2
    assert pre["image_size"] == ([64, 64] if arch == "deit" else [56, 56])
    logits = model_logits(model.eval(), torch.randn(1, 3, *pre["image_size"]))
    assert logits.shape == (1, 2)


def test_offline_hub_error_is_one_line(cli):
    result = cli("load_model_hf.py", "--model-name", "google/vit-base-patch16-224-in21k")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not load") and "HF_HUB_OFFLINE" in last and "offline-vit" in last


@pytest.mark.slow
def test_cli_describes_model_and_checkpoint(run, tmp_path, synthetic_root):
    result = run("load_model_hf.py", "--model-name", "offline-vit-tiny")
    assert result.returncode == 0, result.stderr
    assert "RANDOM INIT" in result.stdout and "parameters" in result.stdout and "P(anomaly)" in result.stdout
    _, _, path = _tiny_checkpoint(tmp_path, synthetic_root)
    result = run("load_model_hf.py", "--checkpoint", path)
    assert result.returncode == 0, result.stderr
    assert "category 'bottle'" in result.stdout
