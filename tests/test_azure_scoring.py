"""score.py on Azure ML's real inference server (azmlinfsrv), and deploy_azure.py --dry-run.

The model is the offline ViT-Tiny (random init) exported to ONNX with a sidecar in onnx_optimization's format;
the server is started on a free loopback port and only ever contacted on 127.0.0.1.
"""
import base64
import contextlib
import datetime
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
from deploy_azure import SCORING_CODE
from inference import softmax
from mvtec_dataset import image_to_tensor, open_dataset_image

SERVER_ENV = {"TP4_MAX_BODY_MB": "1", "TP4_MAX_IMAGES": "4", "TP4_MAX_PIXELS": "1000000",
              "TP4_MAX_REQUEST_PIXELS": "2000000"}


# --------------------------------------------------------------------------------------------------
# Helpers (also used by test_load_test.py)
# --------------------------------------------------------------------------------------------------
def make_model_pair(folder: Path, category: str = "bottle") -> dict:
    """model_final.onnx + model_final.json (tp4-onnx-sidecar-v1) from the offline ViT-Tiny; returns the sidecar."""
    import torch

    from load_model_hf import load_pretrained

    folder.mkdir(parents=True, exist_ok=True)
    model, pre, _ = load_pretrained("offline-vit-tiny")
    model.eval()
    onnx_path = folder / "model_final.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
        torch.onnx.export(model, torch.randn(1, 3, *pre["image_size"]), onnx_path, input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    sidecar = {"format": "tp4-onnx-sidecar-v1", "model_file": onnx_path.name, "variant": "ort-fp32-test",
               "category": category, "labels": ["good", "anomaly"], "input_name": "pixel_values",
               "output_name": "logits",
               "preprocessing": {**pre, "resize": "bilinear", "crop": None, "color": "RGB", "scale": 255.0,
                                 "layout": "NCHW", "dtype": "float32"},
               "opset": 17, "exporter": "torch.onnx.export(dynamo=False)", "source_checkpoint": None,
               "base_model": "offline-vit-tiny", "parity": {}, "metrics": {},
               "created": datetime.datetime.now().isoformat(timespec="seconds"), "versions": {},
               "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()}
    (folder / "model_final.json").write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    return sidecar


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_dir: Path, port: int) -> list[str]:
    # `python -m` rather than the azmlinfsrv script: CI calls the venv's python without activating the venv
    return [sys.executable, "-m", "azureml_inference_server_http", "--entry_script", str(ROOT / "score.py"),
            "--model_dir", str(model_dir), "--port", str(port)]


@contextlib.contextmanager
def azmlinfsrv(model_dir: Path, workdir: Path, env: dict | None = None, timeout: float = 60.0):
    """Start the real inference server on a free port, wait until GET / answers, yield its base URL, stop it."""
    port = free_port()
    log_path = workdir / f"azmlinfsrv-{port}.log"
    full_env = {**os.environ, "XDG_RUNTIME_DIR": str(workdir),  # gunicorn's control socket, not in $HOME
                "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    full_env.pop("AZUREML_MODEL_DIR", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(server_command(model_dir, port), cwd=workdir, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"azmlinfsrv exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(base + "/", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # still starting, or slow on a loaded machine
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"azmlinfsrv not ready after {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # gunicorn's master stops its workers on SIGTERM
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)  # the process group started above (start_new_session)
        else:
            proc.kill()
        proc.wait(timeout=10)


def reference(model_path: Path, images: list[Image.Image], pre: dict) -> np.ndarray:
    """Probabilities of a direct ONNX Runtime run, preprocessed by mvtec_dataset.image_to_tensor."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    batch = np.stack([image_to_tensor(img, pre).numpy() for img in images])
    return softmax(session.run(["logits"], {"pixel_values": batch})[0])


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def azure_model_dir(tmp_path_factory):
    """Azure's layout: AZUREML_MODEL_DIR = .../<model name>/<version>, the uploaded folder inside it."""
    root = tmp_path_factory.mktemp("azureml-models") / "tp4-mvtec-onnx" / "1"
    sidecar = make_model_pair(root / "model")
    return root, sidecar


@pytest.fixture(scope="module")
def server(azure_model_dir, tmp_path_factory):
    with azmlinfsrv(azure_model_dir[0], tmp_path_factory.mktemp("server"), env=SERVER_ENV) as base:
        yield base + "/score"


@pytest.fixture(scope="module")
def test_images(synthetic_root):
    folder = synthetic_root / "bottle" / "test"
    return [folder / sub / "000.png" for sub in ("good", "broken_large", "contamination", "crack")]


def check_predictions(reply: dict, expected: np.ndarray, labels=("good", "anomaly")):
    assert reply["n_images"] == len(expected) == len(reply["predictions"])
    for i, (pred, probs) in enumerate(zip(reply["predictions"], expected)):
        assert pred["index"] == i
        assert pred["label"] == labels[int(probs.argmax())]
        assert pred["anomaly_probability"] == pytest.approx(probs[1], abs=1e-4)
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The real server
# --------------------------------------------------------------------------------------------------
def test_raw_images_match_direct_onnxruntime(server, azure_model_dir, test_images):
    model_dir, sidecar = azure_model_dir
    pre = sidecar["preprocessing"]
    onnx_path = model_dir / "model" / "model_final.onnx"
    for path in test_images:
        r = requests.post(server, data=path.read_bytes(), headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        reply = r.json()
        check_predictions(reply, reference(onnx_path, [open_dataset_image(path)], pre))
        assert reply["model"]["sha256"] == sidecar["sha256"] and reply["model"]["variant"] == "ort-fp32-test"
        assert reply["model"]["created"] == sidecar["created"]
        assert reply["inference_ms"] > 0 and reply["total_ms"] >= reply["inference_ms"]
    # JPEG, grayscale, RGBA (composited on black like load_rgb), a non-square size
    rgb = open_dataset_image(test_images[1])
    variants = {"image/jpeg": png_bytes(rgb, "JPEG"), "image/png": png_bytes(rgb.convert("L")),
                "image/x-png": png_bytes(rgb.convert("RGBA")), "application/octet-stream":
                png_bytes(rgb.resize((150, 90)))}
    for content_type, data in variants.items():
        r = requests.post(server, data=data, headers={"Content-Type": content_type}, timeout=30)
        assert r.status_code == 200, (content_type, r.text)
        check_predictions(r.json(), reference(onnx_path, [open_dataset_image(io.BytesIO(data))], pre))


def test_json_base64_batch(server, azure_model_dir, test_images):
    model_dir, sidecar = azure_model_dir
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in test_images[:3]]
    encoded[1] = "data:image/png;base64," + encoded[1]  # what a browser's FileReader produces
    r = requests.post(server, json={"images": encoded}, timeout=30)
    assert r.status_code == 200, r.text
    expected = reference(model_dir / "model" / "model_final.onnx", [open_dataset_image(p) for p in test_images[:3]],
                         sidecar["preprocessing"])
    check_predictions(r.json(), expected)
    # GET describes the served model and the limits
    info = requests.get(server, timeout=10).json()
    assert info["model"]["sha256"] == sidecar["sha256"] and info["limits"]["max_images"] == 4


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = {  # id: (body, Content-Type, expected status, expected error code)
    "empty_raw": (b"", "image/png", 400, "empty_body"),
    "empty_json": (b"", "application/json", 400, "empty_body"),
    "not_an_image": (b"hello, this is text", "image/jpeg", 400, "not_an_image"),
    "truncated_png": ("TRUNCATED", "image/png", 400, "not_an_image"),
    "invalid_json": (b'{"images": [', "application/json", 400, "invalid_json"),
    "json_nested_too_deep": (b"[" * 200_000, "application/json", 400, "invalid_json"),
    "json_list": (b"[1, 2]", "application/json", 400, "missing_images"),
    "json_wrong_key": (json.dumps({"image": "abc"}).encode(), "application/json", 400, "missing_images"),
    "images_not_list": (json.dumps({"images": "abc"}).encode(), "application/json", 400, "invalid_images"),
    "images_empty": (json.dumps({"images": []}).encode(), "application/json", 400, "invalid_images"),
    "image_not_string": (json.dumps({"images": [42]}).encode(), "application/json", 400, "invalid_images"),
    "bad_base64": (json.dumps({"images": ["@@not base64@@"]}).encode(), "application/json", 400, "invalid_base64"),
    "base64_not_image": (json.dumps({"images": [_b64(b"hello")]}).encode(), "application/json", 400,
                         "not_an_image"),
    "too_many_images": ("FIVE_IMAGES", "application/json", 413, "too_many_images"),
    "too_many_pixels": ("BIG_IMAGE", "image/png", 413, "image_too_large"),
    "too_many_pixels_together": ("THREE_BIG_IMAGES", "application/json", 413, "request_too_large"),
    "oversized_raw": (os.urandom(1_200_000), "image/png", 413, "payload_too_large"),
    "oversized_json": (json.dumps({"images": [_b64(os.urandom(900_000))]}).encode(), "application/json", 413,
                       "payload_too_large"),
    "unsupported_type": (b"<html></html>", "text/html", 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_4xx_and_server_keeps_serving(server, test_images, case):
    body, content_type, status, code = BAD_REQUESTS[case]
    good = test_images[0].read_bytes()
    if body == "TRUNCATED":
        body = good[: len(good) // 2]
    elif body == "FIVE_IMAGES":
        body = json.dumps({"images": [_b64(good)] * 5}).encode()
    elif body == "BIG_IMAGE":  # 1.2 Mpixel > TP4_MAX_PIXELS=1e6, yet a small file
        body = png_bytes(Image.new("RGB", (1200, 1000), (40, 40, 40)))
    elif body == "THREE_BIG_IMAGES":  # 0.9 Mpixel each (allowed), 2.7 together > TP4_MAX_REQUEST_PIXELS=2e6
        body = json.dumps({"images": [_b64(png_bytes(Image.new("RGB", (1000, 900), (40, 40, 40))))] * 3}).encode()
    r = requests.post(server, data=body, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and error["code"] == code and error["message"]
    # the server is still up and still right
    assert requests.get(server.rsplit("/", 1)[0] + "/", timeout=10).status_code == 200
    ok = requests.post(server, data=good, headers={"Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["n_images"] == 1


def test_server_refuses_to_start_on_a_tampered_model(azure_model_dir, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(azure_model_dir[0], model_dir)
    onnx_path = model_dir / "model" / "model_final.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the weights
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="exited with code 3") as info:
        with azmlinfsrv(model_dir, tmp_path, timeout=60):
            pass
    assert "sha256" in str(info.value)
    # one line says what to fix, without the server's traceback of our exception and of its own (it may still log
    # its harmless "Error while fetching model IDs" one, README)
    assert "User's init function failed" not in str(info.value) and "score.py\", line" not in str(info.value)
    errors = [line for line in str(info.value).splitlines() if "azmlinfsrv.score - error: " in line]
    assert len(errors) == 1 and "the server does not start" in errors[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="exited with code 3") as info:
        with azmlinfsrv(tmp_path / "empty", tmp_path, timeout=60):
            pass
    assert "Traceback" not in str(info.value) and "run onnx_optimization.py first" in str(info.value)
    assert "the server does not start" in str(info.value)


# --------------------------------------------------------------------------------------------------
# score.py in-process: preprocessing parity, model discovery, init errors
# --------------------------------------------------------------------------------------------------
def test_numpy_preprocessing_equals_image_to_tensor(azure_model_dir, test_images):
    import score

    pre = azure_model_dir[1]["preprocessing"]
    rgb = open_dataset_image(test_images[2])
    for img in (rgb, rgb.resize((131, 77)), Image.new("RGB", (300, 200), (255, 0, 10))):
        assert np.abs(score.preprocess(img, pre) - image_to_tensor(img, pre).numpy()).max() < 1e-6


def _post(data: bytes, content_type: str):
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    return Request(EnvironBuilder(method="POST", data=data, content_type=content_type).get_environ())


MEMORY_PROBE = """
import base64, io, json, resource, sys
from PIL import Image
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request
import score
score.init()
buf = io.BytesIO()
Image.new("RGB", (4000, 4000), (120, 130, 140)).save(buf, "PNG")  # 48 MB decoded, 50 kB on the wire
body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()] * 8}).encode()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reply = score.run(Request(EnvironBuilder(method="POST", data=body, content_type="application/json").get_environ()))
print(json.dumps({"status": reply.status_code, "n": json.loads(reply.get_data()).get("n_images"),
                  "grown_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="resource.getrusage is POSIX")
def test_a_request_of_large_images_is_decoded_one_at_a_time(azure_model_dir, tmp_path):
    """8 images of 16 Mpixel in one small request (a decode bomb): the worker's peak memory grows by about one
    decoded image, not eight (it grew by ~2 GB for 16 such images when every image was kept until the end)."""
    env = {**os.environ, "AZUREML_MODEL_DIR": str(azure_model_dir[0]), "TP4_MAX_PIXELS": "20e6",
           "TP4_MAX_REQUEST_PIXELS": "200e6", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["status"] == 200 and probe["n"] == 8
    assert probe["grown_mb"] < 150, probe  # one decoded 4000x4000 RGB image is 48 MB; all eight, 384 MB


def test_local_fallback_to_modeles_and_discovery(azure_model_dir, test_images, tmp_path, monkeypatch):
    import score

    shutil.copytree(azure_model_dir[0] / "model", tmp_path / "modeles")
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    score.init()
    response = score.run(_post(test_images[0].read_bytes(), "image/png"))
    assert response.status_code == 200 and json.loads(response.get_data())["n_images"] == 1
    # a sidecar with another name is found when it is the only one; two are ambiguous; none is an error
    (tmp_path / "modeles" / "model_final.json").rename(tmp_path / "modeles" / "variant_a.json")
    assert score.find_sidecar(tmp_path / "modeles").name == "variant_a.json"
    shutil.copytree(tmp_path / "modeles", tmp_path / "modeles" / "copy")
    with pytest.raises(ValueError, match="several ONNX sidecars"):
        score.find_sidecar(tmp_path / "modeles")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="model_final.json"):
        score.init()


def test_init_rejects_bad_sidecars(azure_model_dir, tmp_path, monkeypatch):
    import score

    folder = tmp_path / "model"
    shutil.copytree(azure_model_dir[0] / "model", folder)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path))
    sidecar = json.loads((folder / "model_final.json").read_text())
    cases = [({"sha256": "0" * 64}, "sha256"), ({"format": "other"}, "not a tp4-onnx-sidecar-v1"),
             ({"labels": ["ok", "ko"]}, "labels must be"), ({"labels": ["anomaly", "good"]}, "labels must be"),
             ({"labels": ["good", "anomaly", "other"]}, "labels must be"),
             ({"model_file": "missing.onnx"}, "does not exist"), ({"model_file": None}, "model_file must be"),
             ({"model_file": "../model/model_final.onnx"}, "model_file must be"),
             ({"preprocessing": {**sidecar["preprocessing"], "mean": 0.5}}, "lists of 3 numbers"),
             ({"preprocessing": {**sidecar["preprocessing"], "std": ["a", "b", "c"]}}, "lists of 3 numbers"),
             ({"preprocessing": {**sidecar["preprocessing"],  # the graph's fixed input says otherwise
                                 "image_size": [v + 16 for v in sidecar["preprocessing"]["image_size"]]}},
              r"takes \d+x\d+ images, the sidecar's preprocessing image_size says"),
             ({"input_name": "images"}, "sidecar names"),
             ({"preprocessing": {**sidecar["preprocessing"], "layout": "NHWC"}}, "layout")]
    for change, message in cases:
        (folder / "model_final.json").write_text(json.dumps({**sidecar, **change}))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            score.init()


# --------------------------------------------------------------------------------------------------
# deploy_azure.py
# --------------------------------------------------------------------------------------------------
def deploy_folder(model_root: Path, tmp_path: Path) -> Path:
    """A folder as deploy_azure.py sees it: modeles/ (the model pair of `model_root`) and azureml/ (no build/)."""
    shutil.copytree(model_root / "model", tmp_path / "modeles")
    shutil.copytree(ROOT / "azureml", tmp_path / "azureml", ignore=shutil.ignore_patterns("build"))
    return tmp_path


@pytest.fixture
def deploy_setup(azure_model_dir, tmp_path):
    return deploy_folder(azure_model_dir[0], tmp_path)


NO_AZURE_ENV = {"AZURE_SUBSCRIPTION_ID": "", "AZURE_RESOURCE_GROUP": "", "AZUREML_WORKSPACE": ""}


@pytest.mark.parametrize("flag, name", [("--endpoint-name", "Mon Endpoint"), ("--deployment-name", "blue_1"),
                                        ("--endpoint-name", "ab"), ("--deployment-name", "green-")])
def test_deploy_refuses_names_azure_would_refuse(cli, deploy_setup, flag, name):
    res = cli("deploy_azure.py", "--dry-run", flag, name, "--config-dir", deploy_setup / "azureml", cwd=deploy_setup,
              env=NO_AZURE_ENV)
    assert res.returncode == 2 and res.stderr == f"error: {flag} {name!r} is not a name Azure ML accepts: 3 to 32 " \
        "characters, a letter first, then letters, digits or '-', not ending with '-' (e.g. tp4-mvtec-bottle)\n"


def test_deploy_dry_run_builds_and_validates_the_spec(cli, deploy_setup, azure_model_dir):
    cfg = deploy_setup / "azureml"
    res = cli("deploy_azure.py", "--dry-run", "--config-dir", cfg, cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 0, res.stderr
    assert "Standard_DS3_v2" in res.stdout and "identical on" in res.stdout and "nothing sent to Azure" in res.stdout
    staged = cfg / "build"
    assert hashlib.sha256((staged / "model" / "model_final.onnx").read_bytes()).hexdigest() == \
        azure_model_dir[1]["sha256"]
    assert (staged / "code" / "score.py").read_text() == (ROOT / "score.py").read_text()
    assert sorted(p.name for p in (staged / "code").iterdir()) == sorted(SCORING_CODE)  # nothing else is uploaded
    # the uploaded folder is complete on its own (no module of the repository missing) and imports no torch
    probe = ("import sys, score, inference, lab_io, lab_targets; "
             "assert all(m.__file__.startswith(sys.argv[1]) for m in (score, inference, lab_io, lab_targets)); "
             "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, sys.argv[1]); {probe}",
                          str(staged / "code")], capture_output=True, text=True, cwd=deploy_setup)
    assert res.returncode == 0, res.stderr
    spec = yaml.safe_load((staged / "deployment.generated.yml").read_text())
    assert spec["request_settings"]["request_timeout_ms"] > 0 and spec["liveness_probe"]["period"] > 0
    assert spec["code_configuration"]["scoring_script"] == "score.py"
    # overriding the VM size is allowed and shown
    res = cli("deploy_azure.py", "--dry-run", "--config-dir", cfg, "--instance-type", "Standard_D4s_v5",
              cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 0 and "Standard_D4s_v5" in res.stdout


def test_deploy_errors(cli, deploy_setup):
    cfg = deploy_setup / "azureml"
    # the YAML and the script must describe the same deployment
    text = (cfg / "deployment.yml").read_text()
    (cfg / "deployment.yml").write_text(text.replace("instance_count: 1", "instance_count: 3"))
    res = cli("deploy_azure.py", "--dry-run", "--config-dir", cfg, cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 2 and "disagree" in res.stderr and "instance_count" in res.stderr
    (cfg / "deployment.yml").write_text(text)
    # a model changed after its sidecar was written
    sidecar = json.loads((deploy_setup / "modeles" / "model_final.json").read_text())
    (deploy_setup / "modeles" / "model_final.json").write_text(json.dumps({**sidecar, "sha256": "1" * 64}))
    res = cli("deploy_azure.py", "--dry-run", "--config-dir", cfg, cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 2 and "sha256" in res.stderr and "Traceback" not in res.stderr
    # no model at all; a real deployment without the workspace's coordinates
    res = cli("deploy_azure.py", "--dry-run", "--models-dir", "nowhere", "--config-dir", cfg, cwd=deploy_setup,
              env=NO_AZURE_ENV)
    assert res.returncode == 2 and "onnx_optimization.py" in res.stderr
    res = cli("deploy_azure.py", "--config-dir", cfg, cwd=deploy_setup, env=NO_AZURE_ENV)
    assert res.returncode == 2 and "--subscription-id" in res.stderr and "az login" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_openvino_ir_final_is_served(azure_model_dir, test_images, tmp_path):
    """An OpenVINO IR model_final (.xml + .bin, sidecar engine 'openvino') under the real server: same probabilities
    as OpenVINO run directly, malformed requests still 4xx, and a changed .bin stops the server from starting."""
    import openvino as ov

    from inference import Runner, write_sidecar

    model_dir, sidecar = azure_model_dir
    folder = tmp_path / "ov-model"
    folder.mkdir()
    ov.save_model(ov.convert_model(str(model_dir / "model" / "model_final.onnx")), str(folder / "model_final.xml"),
                  compress_to_fp16=False)
    meta = write_sidecar(folder / "model_final.xml", variant="ov-fp32-test", category="bottle",
                         preprocessing=sidecar["preprocessing"], exporter="test", source_checkpoint="none",
                         base_model="offline-vit-tiny", parity_result={}, metrics={}, engine="openvino",
                         precision_hint="f32")
    assert meta["weights_file"] == "model_final.bin" and meta["opset"] is None
    pre = sidecar["preprocessing"]
    images = [open_dataset_image(p) for p in test_images]
    x = np.stack([image_to_tensor(img, pre).numpy() for img in images])
    expected = softmax(Runner(folder / "model_final.xml", "openvino", 1, "f32").run(x))
    for name in ("srv", "srv2"):
        (tmp_path / name).mkdir()
    with azmlinfsrv(folder, tmp_path / "srv", env=SERVER_ENV) as base:
        got = []
        for path in test_images:
            reply = requests.post(base + "/score", data=path.read_bytes(), headers={"Content-Type": "image/png"},
                                  timeout=30)
            assert reply.status_code == 200, reply.text
            got.append(reply.json())
        for reply, probs in zip(got, expected):
            check_predictions(reply, probs[None])
            assert reply["model"]["engine"] == "openvino" and reply["model"]["precision"] == "f32"
        bad = requests.post(base + "/score", data=b"not an image", headers={"Content-Type": "image/png"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"
    with open(folder / "model_final.bin", "r+b") as f:  # tamper with the weights: the sidecar's sha256 catches it
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(RuntimeError, match="weights were changed"):
        with azmlinfsrv(folder, tmp_path / "srv2", env=SERVER_ENV, timeout=30):
            pass


# --------------------------------------------------------------------------------------------------
# The good-only detector beside the model: maps on request
# --------------------------------------------------------------------------------------------------
def test_maps_on_request_when_a_detector_is_shipped(azure_model_dir, detector_files, test_images, tmp_path,
                                                    monkeypatch):
    import score
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from inference import PatchDetector, load_rgb as load, preprocess

    folder = tmp_path / "model"
    shutil.copytree(azure_model_dir[0] / "model", folder)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path))
    score.init()
    plain = score.run(_post(test_images[1].read_bytes(), "image/png"))
    assert plain.status_code == 200 and "detector" not in json.loads(plain.get_data())["predictions"][0]
    asked = Request(EnvironBuilder(method="POST", data=test_images[1].read_bytes(), content_type="image/png",
                                   query_string="maps=1").get_environ())
    refused = score.run(asked)
    assert refused.status_code == 400 and json.loads(refused.get_data())["error"]["code"] == "no_detector"

    for f in detector_files.iterdir():
        shutil.copy2(f, folder / f.name)
    score.init()
    reference = PatchDetector(folder / "detector_bottle.safetensors")
    images = [base64.b64encode(p.read_bytes()).decode() for p in test_images]
    reply = score.run(_post(json.dumps({"images": images, "maps": True}).encode(), "application/json"))
    assert reply.status_code == 200
    body = json.loads(reply.get_data())
    patches = reference.patch_distances(np.stack([preprocess(load(p), reference.preprocessing) for p in test_images]))
    for pred, expected in zip(body["predictions"], patches):
        det = pred["detector"]
        grid = det["anomaly_map"]["grid"]
        values = np.array(det["anomaly_map"]["values"])
        assert values.shape == tuple(grid) and np.abs(values.ravel() - expected).max() < 1e-4
        assert det["anomaly_score"] == pytest.approx(float(reference.image_scores(expected[None])[0]), abs=1e-4)
        assert det["label"] == ("anomaly" if det["anomaly_score"] >= det["threshold"] else "good")
        assert "anomaly_probability" in pred  # the classifier's answer is still there
    described = json.loads(score.run(Request(EnvironBuilder(method="GET").get_environ())).get_data())
    assert described["detector"]["variant"] == "detector-fp32"


def test_deploy_ships_the_detector(cli, deploy_setup, detector_files):
    cfg = deploy_setup / "azureml"
    det = detector_files / "detector_bottle.safetensors"
    res = cli("deploy_azure.py", "--dry-run", "--config-dir", cfg, "--detector", det, cwd=deploy_setup,
              env=NO_AZURE_ENV)
    assert res.returncode == 0, res.stderr
    staged = sorted(p.name for p in (cfg / "build" / "model").iterdir())
    assert "detector_bottle.safetensors" in staged and "detector_bottle_backbone.onnx" in staged
    # a detector of another category is refused in one line
    sidecar = json.loads((deploy_setup / "modeles" / "model_final.json").read_text())
    (deploy_setup / "modeles" / "model_final.json").write_text(json.dumps({**sidecar, "category": "capsule"}))
    res = cli("deploy_azure.py", "--dry-run", "--config-dir", cfg, "--detector", det, cwd=deploy_setup,
              env=NO_AZURE_ENV)
    assert res.returncode == 2 and "same category" in res.stderr and len(res.stderr.strip().splitlines()) == 1
