"""batch_score.py (the Azure ML batch-deployment entry script) on real files, and deploy_azure.py --batch --dry-run.

The model is the offline ViT-Tiny (random init) exported to ONNX with its sidecar (test_azure_scoring.make_model_pair),
in Azure's layout AZUREML_MODEL_DIR/<uploaded folder>."""
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from deploy_azure import BATCH_RETRY, BATCH_SCORING_CODE, BATCH_SETTINGS, HTTP_SERVER_PACKAGE
from inference import Classifier, find_sidecar, load_rgb, preprocess
from test_azure_scoring import NO_AZURE_ENV, _post, deploy_folder, make_model_pair

ENV = {"TP4_ORT_THREADS": "1", "TP4_MAX_PIXELS": "1000000", "TP4_BATCH_SIZE": "3"}  # 3: batches cut across errors


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("azureml-batch") / "tp4-mvtec-onnx" / "1"
    return root, make_model_pair(root / "model")


@pytest.fixture
def scorer(model_root, monkeypatch):
    import batch_score

    monkeypatch.setenv("AZUREML_MODEL_DIR", str(model_root[0]))
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    batch_score.init()
    return batch_score


@pytest.fixture
def backlog(synthetic_root, tmp_path):
    """(paths in mini-batch order, names that must fail): good images, broken files and odd modes mixed."""
    test = synthetic_root / "bottle" / "test"
    good = [test / sub / f"{i:03d}.png" for sub in ("good", "crack", "contamination") for i in range(3)]
    data = good[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image, a text file named .png")
    rgb = load_rgb(good[4])
    rgb.convert("L").save(tmp_path / "gray.png")
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    Image.new("RGB", (1200, 1000), (40, 40, 40)).save(tmp_path / "huge.png")  # 1.2 Mpx > TP4_MAX_PIXELS
    odd = {name: tmp_path / name for name in ("truncated.png", "text.png", "gray.png", "rgba.png", "huge.png",
                                              "missing.png")}
    paths = [good[0], odd["truncated.png"], good[1], odd["gray.png"], odd["text.png"], *good[2:5], odd["rgba.png"],
             odd["huge.png"], *good[5:], odd["missing.png"]]
    return [str(p) for p in paths], {"truncated.png", "text.png", "huge.png", "missing.png"}


def parse(lines: list[str]) -> list[dict]:
    from batch_score import BATCH_COLUMNS

    assert all(isinstance(line, str) and "\n" not in line for line in lines)  # append_row: one element = one line
    return [dict(zip(BATCH_COLUMNS, row, strict=True)) for row in csv.reader(io.StringIO("\n".join(lines)))]


def test_one_row_per_file_in_order_with_errors_in_their_rows(scorer, backlog, model_root):
    paths, failing = backlog
    rows = parse(scorer.run(paths))
    assert [r["path"] for r in rows] == paths
    reference = Classifier(find_sidecar(model_root[0]), threads=1)  # the very decision code, image by image
    for row in rows:
        name = Path(row["path"]).name
        assert row["model_sha256"] == model_root[1]["sha256"] and float(row["threshold"]) == reference.threshold
        if name in failing:
            assert row["error"] and row["label"] == "" and row["anomaly_probability"] == "", row
            continue
        assert row["error"] == "", row
        p = reference.predict(preprocess(load_rgb(row["path"]), reference.preprocessing)[None])[0]
        assert row["label"] == reference.label_of(p)
        assert float(row["anomaly_probability"]) == pytest.approx(p[reference.anomaly_index], abs=2e-6)
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "pixels" in errors["huge.png"] and "not found" in errors["missing.png"]
    assert "broken" in errors["truncated.png"] and "not an image" in errors["text.png"]
    # an empty mini-batch is a valid call
    assert scorer.run([]) == []


def test_same_answer_as_the_online_score_py(scorer, backlog, model_root, monkeypatch):
    import score

    paths, failing = backlog
    rows = {r["path"]: r for r in parse(scorer.run(paths))}
    score.init()  # same AZUREML_MODEL_DIR and threads (the scorer fixture's environment)
    scored = [p for p in paths if Path(p).name not in failing]
    for path in scored[:4] + [p for p in scored if Path(p).name in ("gray.png", "rgba.png")]:
        reply = score.run(_post(Path(path).read_bytes(), "image/png"))
        assert reply.status_code == 200
        online = json.loads(reply.get_data())["predictions"][0]
        assert rows[path]["label"] == online["label"]
        assert float(rows[path]["anomaly_probability"]) == pytest.approx(online["anomaly_probability"], abs=2e-6)


def test_init_refuses_a_tampered_model(model_root, tmp_path, monkeypatch):
    import batch_score

    shutil.copytree(model_root[0], tmp_path / "m")
    onnx_path = tmp_path / "m" / "model" / "model_final.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[-1] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="sha256"):
        batch_score.init()


# --------------------------------------------------------------------------------------------------
# deploy_azure.py --batch
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def deploy_setup(model_root, tmp_path):
    return deploy_folder(model_root[0], tmp_path)


def test_batch_dry_run_writes_the_spec(cli, deploy_setup, model_root):
    cfg = deploy_setup / "azureml"
    res = cli("deploy_azure.py", "--batch", "--dry-run", "--config-dir", cfg, cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 0, res.stderr
    for setting in ("mini_batch_size", "instance_count", "max_concurrency_per_instance", "retry_settings.max_retries",
                    "append_row", "predictions.csv", "nothing sent to Azure"):
        assert setting in res.stdout, setting
    staged = cfg / "build" / "batch"
    assert sorted(p.name for p in (staged / "code").iterdir()) == sorted(BATCH_SCORING_CODE)
    assert not (cfg / "build" / "code").exists()  # the online stage is left alone
    assert json.loads((staged / "model" / "model_final.json").read_text())["sha256"] == model_root[1]["sha256"]
    spec = yaml.safe_load((staged / "batch-deployment.generated.yml").read_text())
    settings = spec["settings"]
    assert settings["mini_batch_size"] == BATCH_SETTINGS["mini_batch_size"]
    assert settings["instance_count"] == BATCH_SETTINGS["instance_count"]
    assert settings["max_concurrency_per_instance"] == BATCH_SETTINGS["max_concurrency_per_instance"]
    assert settings["retry_settings"] == BATCH_RETRY and settings["output_action"] == "append_row"
    assert spec["code_configuration"]["scoring_script"] == "batch_score.py"
    pip = spec["environment"]["conda_file"]["dependencies"][-1]["pip"]
    assert not any(HTTP_SERVER_PACKAGE in r for r in pip) and any(r.startswith("onnxruntime==") for r in pip)
    assert "azureml-core" in pip
    assert yaml.safe_load((staged / "batch-compute.generated.yml").read_text())["min_instances"] == 0
    # the uploaded code is complete on its own and imports neither torch nor the HTTP server
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import batch_score, inference; "
             "assert inference.__file__.startswith(sys.argv[1]); "
             "assert 'torch' not in sys.modules and 'azureml_inference_server_http' not in sys.modules")
    res = subprocess.run([sys.executable, "-I", "-c", probe, str(staged / "code")], capture_output=True, text=True,
                         cwd=deploy_setup)
    assert res.returncode == 0, res.stderr
    # overrides are applied and shown
    res = cli("deploy_azure.py", "--batch", "--dry-run", "--config-dir", cfg, "--mini-batch-size", "16",
              "--instance-type", "Standard_D4s_v5", cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 0 and "Standard_D4s_v5" in res.stdout
    assert yaml.safe_load((staged / "batch-deployment.generated.yml").read_text())["settings"]["mini_batch_size"] == 16


@pytest.mark.parametrize("flags, message", [(["--mini-batch-size", "0"], "--mini-batch-size"),
                                            (["--instance-count", "99"], "max_instances"),
                                            (["--detector", "x.safetensors"], "--detector")])
def test_batch_bad_flag_is_one_line(cli, deploy_setup, flags, message):
    res = cli("deploy_azure.py", "--batch", "--dry-run", "--config-dir", deploy_setup / "azureml", *flags,
              cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
