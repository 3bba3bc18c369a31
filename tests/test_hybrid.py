"""The hybrid classifier (head logit + patch distances to the train split's good patches, one graph): its graph is
the maths it was fitted with, its bank holds train good patches only, its decisions at the classifier's threshold
are its own val-chosen ones, and onnx_optimization.py exports, judges, deploys it and score.py serves it."""
import csv
import json

import numpy as np
import pytest
import torch

import hybrid as hy
import load_model_hf as lm
from inference import image_scores, nearest_distances
from lab_targets import auroc_no_gain_share, hybrid_wins
from mvtec_dataset import make_loaders, split_from_manifest
from train_utils import model_logits


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic_root):
    """An untrained offline ViT-tiny checkpoint on the synthetic split, and its hybrid."""
    from conftest import save_untrained_checkpoint

    cwd = tmp_path_factory.mktemp("hybrid")
    save_untrained_checkpoint(cwd, synthetic_root)
    model, ckpt = lm.load_checkpoint(cwd / "modeles" / "model_cpu_bottle.pth", "bottle")
    loaders = make_loaders(synthetic_root, "bottle", split_from_manifest(ckpt["split"]), ckpt["preprocessing"], 16,
                           names=("train", "val", "test"), augment="none")
    datasets = {n: loaders[n].dataset for n in ("train", "val")}
    model_h, info = hy.fit_hybrid(model, datasets, 0.4)
    return cwd, model, model_h, info, loaders


def test_graph_is_the_fitted_maths(fitted):
    _, model, model_h, info, loaders = fitted
    x = torch.stack([loaders["test"].dataset[i][0] for i in range(6)])
    with torch.inference_mode():
        z, feats = model_h.evidence(x)
        head = model_logits(model, x)
        fused = model_h(x)
    assert torch.allclose(z, head[:, 1] - head[:, 0], atol=1e-5)  # the head logit of the very classifier
    a, b = model_h.bank_a.numpy(), model_h.bank_b.numpy()
    feats = feats.numpy()
    score = 0.5 * (image_scores(nearest_distances(feats, a)) + image_scores(nearest_distances(feats, b)))
    f = info["w_logit"] * z.numpy() + info["w_log_distance"] * np.log(score) + info["bias"]
    assert np.allclose(fused[:, 1].numpy() - fused[:, 0].numpy(), f, atol=1e-3)
    assert fused.shape == (6, 2) and info["bank_patches"] == len(a) + len(b)


def test_bank_holds_train_good_patches_only(fitted):
    _, _, model_h, info, loaders = fitted
    train = loaders["train"].dataset
    good = torch.stack([train[i][0] for i in range(len(train)) if int(train[i][1]) == 0])
    with torch.inference_mode():
        good_feats = model_h.evidence(good)[1].reshape(-1, model_h.bank_a.shape[1]).numpy()
    bank = np.concatenate([model_h.bank_a.numpy(), model_h.bank_b.numpy()])
    assert nearest_distances(bank[None], good_feats).max() < 5e-3  # each bank row is a train good patch (float32)
    assert info["bank_images"] == len(good)


def test_decisions_at_the_classifier_threshold_are_the_val_chosen_ones(fitted):
    _, _, model_h, info, loaders = fitted
    val = loaders["val"].dataset
    x = torch.stack([val[i][0] for i in range(len(val))])
    labels = np.array([int(val[i][1]) for i in range(len(val))])
    with torch.inference_mode():
        p = torch.softmax(model_h(x), 1)[:, 1].numpy()
    decisions = (p >= 0.4).astype(int)  # the checkpoint's threshold of the fixture
    pos, neg = labels == 1, labels == 0
    assert np.isclose(0.5 * (decisions[pos].mean() + (1 - decisions[neg]).mean()),
                      info["val_fused"]["balanced_accuracy"])


def test_hybrid_rule_asks_for_a_gain_that_is_not_noise():
    perfect = {"auroc": 1.0, "balanced_accuracy": 1.0, "no_gain_share": 1.0}
    assert not hybrid_wins(perfect, perfect)
    head = {"auroc": 0.90, "balanced_accuracy": 0.85}
    assert hybrid_wins(head, {"auroc": 0.95, "balanced_accuracy": 0.85, "no_gain_share": 0.01})
    assert not hybrid_wins(head, {"auroc": 0.95, "balanced_accuracy": 0.85, "no_gain_share": 0.20})  # noise
    assert not hybrid_wins(head, {"auroc": 0.95, "balanced_accuracy": 0.80, "no_gain_share": 0.01})
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 40)
    noisy = labels + rng.normal(0, 1.0, 80)
    assert auroc_no_gain_share(labels, noisy, noisy) == 1.0  # the same scores never gain
    assert auroc_no_gain_share(labels, noisy, labels + rng.normal(0, 0.2, 80)) < 0.01  # much better scores
    assert 0.05 < auroc_no_gain_share(labels, noisy, noisy + rng.normal(0, 0.05, 80)) < 0.95  # a wobble


def test_part3_exports_judges_deploys_and_serves_the_hybrid(fitted, synthetic_root, monkeypatch):
    """--hybrid on: its own rows, guarded against the PyTorch hybrid, model_final among them, served by score.py."""
    import base64

    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    import score
    from conftest import run_script

    cwd = fitted[0]
    result = run_script("onnx_optimization.py", "--category", "bottle", "--model-path", "model_cpu_bottle.pth",
                        "--data-dir", synthetic_root, "--hybrid", "on", "--no-fusion", "--no-int8", "--runs", "3",
                        "--warmup", "1", "--num-threads", "1", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hybrid head logit + patch distances" in result.stdout and "Traceback" not in result.stderr
    assert (cwd / "modeles" / hy.HYBRID_ONNX).is_file()
    with open(cwd / "resultats" / "onnx_results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    hybrid_rows = [r for r in rows if r["variant"].startswith(hy.HYBRID_PREFIX)]
    assert {"hybrid-ov-fp32", "hybrid-ov-int8-nncf", "hybrid-ov-int8-weights"} <= {r["variant"] for r in hybrid_rows}
    info, loaders = fitted[3], fitted[4]
    n_guard = len(loaders["train"].dataset) + len(loaders["val"].dataset) - info["bank_images"]
    for r in hybrid_rows:
        assert r["flips_vs_classifier"] != "" and float(r["bank_mb"]) > 0
        # judged against the PyTorch hybrid on train + val but the bank's images
        assert r["guard_split"] == "train+val-bank" and int(r["guard_images"]) == n_guard
        # the bank is in the graph: float32 in the fp32 / bf16 variants, one byte a value in the int8 ones
        assert float(r["size_mb"]) > float(r["bank_mb"]) / (4 if "int8" in r["variant"] else 1)
    graphs = {r["variant"]: r["onnx_graph_checked"] for r in rows}
    assert graphs["hybrid-ov-int8-nncf"] == graphs["hybrid-ov-int8-weights"] == hy.HYBRID_ONNX  # its own graph
    assert "identical to pytorch-hybrid-fp32" in result.stdout
    deployed = [r for r in rows if r["deployed_as"]]
    assert len(deployed) == 1 and deployed[0]["variant"].startswith(hy.HYBRID_PREFIX)

    sidecar = json.loads((cwd / "modeles" / "model_final.json").read_text(encoding="utf-8"))
    assert sidecar["variant"] == deployed[0]["variant"]
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(cwd / "modeles"))
    score.init()
    paths = sorted((synthetic_root / "bottle" / "test").rglob("*.png"))[:4]
    body = json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
    reply = score.run(Request(EnvironBuilder(method="POST", data=body, content_type="application/json").get_environ()))
    assert reply.status_code == 200, reply.get_data()
    served = json.loads(reply.get_data())["predictions"]
    assert len(served) == len(paths)

    # its own map, from the same pass (no detector shipped): on the patch grid of the sidecar
    reply = score.run(Request(EnvironBuilder(method="POST", data=body, query_string="maps=1",
                                             content_type="application/json").get_environ()))
    assert reply.status_code == 200, reply.get_data()
    mapped = json.loads(reply.get_data())["predictions"]
    gh, gw = sidecar["map_grid"]
    assert sidecar["anomaly_map"] and sidecar["map_reference"] > 0
    for p in mapped:
        assert p["anomaly_map"]["grid"] == [gh, gw] and len(p["anomaly_map"]["values"]) == gh
        assert min(min(row) for row in p["anomaly_map"]["values"]) >= 0
    assert [p["anomaly_probability"] for p in mapped] == pytest.approx([p["anomaly_probability"] for p in served])

    # predict.py serves the same model_final: the same probabilities as score.py for the same files
    listing = cwd / "hybrid_inputs"
    listing.mkdir()
    for p in paths:
        (listing / p.name).write_bytes(p.read_bytes())
    out = run_script("predict.py", "--input", listing, "--output", cwd / "predictions.csv", "--heatmaps",
                     cwd / "hybrid_maps", cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    anomalous = sum(s["label"] == "anomaly" for s in served)
    assert len(list((cwd / "hybrid_maps").glob("*_heatmap.png"))) == anomalous  # an overlay per anomalous image
    with open(cwd / "predictions.csv", newline="", encoding="utf-8") as f:
        predicted = {r["path"].replace("\\", "/").rsplit("/", 1)[-1]: float(r["anomaly_probability"])
                     for r in csv.DictReader(f)}
    assert np.abs(np.array([predicted[p.name] for p in paths])
                  - np.array([s["anomaly_probability"] for s in served])).max() < 1e-4


def test_auto_mode_skips_what_the_hybrid_cannot_use_and_on_mode_says_why(capsys):
    from lab_io import UserError

    not_a_vit = torch.nn.Linear(4, 2)
    assert hy.fit_for_mode(not_a_vit, {}, 0.5, "auto") == (None, None)
    assert "the hybrid classifier was not fitted: Linear is not a ViT" in capsys.readouterr().out
    with pytest.raises(UserError, match="not a ViT"):
        hy.fit_for_mode(not_a_vit, {}, 0.5, "on")
    assert hy.fit_for_mode(not_a_vit, {}, 0.5, "off") == (None, None)
