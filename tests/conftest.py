"""Shared fixtures: the repository root on sys.path, a synthetic MVTec tree, helpers to run scripts."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the tests never reach the hub, in this process too (huggingface_hub reads it once, when first imported)
os.environ["HF_HUB_OFFLINE"] = "1"

from mvtec_dataset import make_synthetic_mvtec  # noqa: E402


HAS_XDIST = importlib.util.find_spec("xdist") is not None  # pytest.ini runs the tests in parallel with it


def pytest_addoption(parser):
    """Without pytest-xdist (a venv made before requirements.txt listed it), pytest.ini's options would be
    "unrecognized arguments": they are accepted and the tests run one at a time, with a note."""
    if not HAS_XDIST:
        group = parser.getgroup("xdist (not installed: pip install -r requirements.txt)")
        group.addoption("--numprocesses", default=None, help="ignored: no pytest-xdist")
        group.addoption("--maxprocesses", default=None, help="ignored: no pytest-xdist")
        group.addoption("--dist", default=None, help="ignored: no pytest-xdist")


def pytest_configure(config):
    """Under pytest-xdist (pytest.ini), the cores are shared between the workers: torch in each worker gets its share,
    so two workers do not run four threads on two cores. Without it, a warning says how to install it."""
    if not HAS_XDIST:
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            "pytest-xdist is not installed: the tests run one at a time, about twice as long "
            "(pip install -r requirements.txt -c constraints.txt)"), stacklevel=2)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec tree: DATA/bottle with train/good, test/good, 3 defect types, masks."""
    root = tmp_path_factory.mktemp("mvtec")
    make_synthetic_mvtec(root, "bottle", n_train_good=60, n_test_good=15, n_per_defect=15, image_size=96, seed=0)
    return root


def run_script(script: str, *args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run one of the lab's scripts as a user would, from `cwd`, with the CPU forced and no hub access."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def run():
    return run_script


@pytest.fixture
def cli(monkeypatch, capsys):
    """Like run, in this process: the script's main() through lab_io.run_cli, as its `__main__` calls it, so the same
    exit code and the same one-line stderr, without a fresh interpreter importing torch (1.5 s a call). For error
    paths and short runs; a run that needs its own process (signals, CUDA_VISIBLE_DEVICES, imports) uses run."""
    import importlib

    import torch

    from lab_io import run_cli

    def call(script: str, *args, cwd=None, env=None) -> subprocess.CompletedProcess:
        main = importlib.import_module(Path(script).stem).main
        monkeypatch.chdir(cwd or ROOT)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        threads, code = torch.get_num_threads(), 0
        capsys.readouterr()
        try:
            run_cli(lambda: main([str(a) for a in args]))
        except SystemExit as exc:
            code = exc.code
        finally:
            torch.set_num_threads(threads)  # a script's --num-threads must not leak into the next test
        out = capsys.readouterr()
        return subprocess.CompletedProcess([script, *map(str, args)], code, out.out, out.err)

    return call


def save_untrained_checkpoint(cwd: Path, synthetic_root: Path, model_name: str = "offline-vit-tiny") -> dict:
    """cwd/modeles/model_cpu_bottle.pth: an offline ViT (random init) with the project's split of the synthetic tree,
    as benchmark_gpu.py would write it; returns the split manifest."""
    import load_model_hf as lm
    from mvtec_dataset import prepare_split

    model, pre, _ = lm.load_pretrained(model_name)
    _, manifest = prepare_split(synthetic_root, "bottle")
    lm.save_checkpoint(cwd / "modeles" / "model_cpu_bottle.pth", model, model_name=model_name, preprocessing=pre,
                       category="bottle", split_manifest=manifest)
    return manifest


SLOW_FIXTURES = {"project", "demo", "fitted"}  # one full run of a script, shared by the tests of a module


def pytest_collection_modifyitems(items):
    """Tests that need a whole script run (the module fixtures above) are in the slow tier."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def detector_files(tmp_path_factory, synthetic_root) -> Path:
    """modeles/detector_bottle.safetensors + its ONNX backbone: anomaly_detector.py fitted on the synthetic
    train/good with the offline ViT-Tiny (random init), as a user would run it. Returns the models folder."""
    import anomaly_detector

    cwd = tmp_path_factory.mktemp("detector-files")
    code = anomaly_detector.main(["--data-dir", str(synthetic_root), "--model-name", "offline-vit-tiny",
                                  "--num-threads", "1", "--overlays", "0", "--models-dir", str(cwd / "modeles"),
                                  "--results-dir", str(cwd / "resultats")])
    assert code == 0
    return cwd / "modeles"
