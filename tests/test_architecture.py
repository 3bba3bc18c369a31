"""The shape of the code: one definition of each decision, no script importing another for constants, a serving
side without PyTorch that starts fast, one results schema for every CSV."""
import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lab_targets

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"benchmark_gpu", "quantization_demo", "onnx_optimization", "optimization_pipeline", "score",
           "deploy_azure", "load_test", "download_mvtec", "predict", "anomaly_detector", "batch_score"}
SERVING = ("score", "load_test", "deploy_azure", "inference", "lab_io", "lab_targets", "rapport", "predict", "batch_score",
           "image_pipeline", "prediction_store", "heatmaps", "end_to_end")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, in any form: `import x`, `import x as y`, `from x import y` (at any depth: inside
    functions too), `from . import x`, and importlib.import_module("x") / __import__("x") with a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return {m.split(".")[0] for m in found}


def test_no_module_imports_a_script():
    """Scripts parse, call helpers and print; what two of them share lives in a helper module."""
    for path in ROOT.glob("*.py"):
        scripts = (imported_modules(path) & SCRIPTS) - {path.stem}
        assert not scripts, f"{path.name} imports the script(s) {sorted(scripts)}: move what it needs to a helper"


def test_import_finder_sees_every_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import predict as p\nfrom onnx_optimization import main\ndef f():\n    import score\n"
                     "import importlib\nimportlib.import_module('anomaly_detector')\n__import__('load_test')\n")
    assert imported_modules(probe) >= {"predict", "onnx_optimization", "score", "anomaly_detector", "load_test"}


def test_each_target_and_price_is_defined_once():
    values = {"0.192": 0, "0.526": 0}
    for path in ROOT.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for value in values:
            values[value] += len(re.findall(rf"(?<![\d.]){re.escape(value)}(?!\d)", text))
        if path.name != "lab_targets.py":
            assert not re.search(r"^(TARGET_|PARITY_|CPU_PRICE|GPU_PRICE)\w* *=", text, re.M), path.name
    assert values == {"0.192": 1, "0.526": 1}  # in lab_targets.py only


@pytest.mark.parametrize("module", SERVING)
def test_serving_side_imports_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch'; " \
           f"assert 'transformers' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("script", ["load_test.py", "deploy_azure.py", "rapport.py", "predict.py"])
def test_client_help_is_fast(script):
    best = min(_timed_help(script) for _ in range(2))
    assert best < 1.0, f"{script} --help took {best:.2f} s"


@pytest.mark.parametrize("script, how", [("score.py", "azmlinfsrv --entry_script score.py"),
                                         ("batch_score.py", "deploy_azure.py --batch")])
def test_entry_scripts_run_as_commands_say_how_to_use_them(script, how):
    """Azure's entry scripts are loaded by a server, not run: `python score.py` says so in one line (it was silent,
    exit 0)."""
    res = subprocess.run([sys.executable, str(ROOT / script)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.startswith("error: ") and how in res.stderr
    assert res.stderr.count("\n") == 1
    res = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and how in res.stdout and res.stderr == ""


def _timed_help(script: str) -> float:
    """Seconds of CPU the child used (what importing torch would cost), not wall time: the tests run in parallel
    (pytest.ini), so another worker may hold the cores. Wall time where the OS does not report a child's CPU."""
    t0, cpu0 = time.perf_counter(), os.times()
    res = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr
    cpu1 = os.times()
    cpu = cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system
    return cpu if cpu > 0 else time.perf_counter() - t0


def test_result_schema_has_units_directions_and_no_old_names():
    for name, (unit, better, group, meaning) in lab_targets.RESULT_COLUMNS.items():
        assert better in (lab_targets.HIGHER, lab_targets.LOWER, lab_targets.NEUTRAL), name
    for old in lab_targets.RENAMED_COLUMNS:
        assert old.split(" ")[0] not in lab_targets.RESULT_COLUMNS or old.startswith("mode"), old
    for column in ("latency_median_ms", "size_mb", "cost_per_1000_images_usd", "accuracy_ci_high"):
        assert lab_targets.better_direction(column) == lab_targets.LOWER
    for column in ("accuracy", "speedup", "time_reduction_pct", "accuracy_delta_pt", "accuracy_ci_low"):
        assert lab_targets.better_direction(column) == lab_targets.HIGHER
    with pytest.raises(ValueError, match="accuracy_loss_pt"):
        lab_targets.check_result_columns({"accuracy_loss_pt": 1.0})


def test_rounding_never_flatters():
    from rapport import num, sig

    row = {"latency_median_ms": "10.001", "accuracy": "0.97499", "accuracy_delta_pt": "-0.001",
           "accuracy_ci_low": "0.9251", "accuracy_ci_high": "0.9901", "speedup": "4.999", "size_mb": "29.991",
           "cost_per_1000_images_usd": "0.00005331", "mcnemar_p": "0.125", "time_reduction_pct": "79.99"}
    assert num(row, "latency_median_ms", 2) == "10,01"       # slower
    assert num(row, "accuracy", 2, 100) == "97,49"           # less accurate
    assert num(row, "accuracy_delta_pt", 2) == "-0,01"       # a larger loss, never "0,00"
    assert (num(row, "accuracy_ci_low", 1, 100), num(row, "accuracy_ci_high", 1, 100)) == ("92,5", "99,1")  # wider
    assert num(row, "speedup", 2) == "4,99" and num(row, "time_reduction_pct", 0) == "79"  # not "-80 %" reached
    assert num(row, "size_mb", 1) == "30,0"                  # not under 30 MB by rounding
    assert sig(row, "cost_per_1000_images_usd") == "0,0000534"  # costlier
    assert num(row, "mcnemar_p", 2) == "0,12"                # neutral: half-even
    assert num({"accuracy": ""}, "accuracy") == "n/m"


def test_no_function_over_80_lines():
    """Short functions: a script's main parses, calls helpers and prints; a helper does one job."""
    long = []
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
