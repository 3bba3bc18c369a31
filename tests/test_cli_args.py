"""Counts on the command line are checked by one argparse type (lab_io.positive_int) in every script: --num-threads 0
is refused at parse time with one line "error: --num-threads must be >= 1, not 0" and exit code 2, like every
other user error (lab_io.ArgumentParser + run_cli)."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from lab_io import run_cli

ROOT = Path(__file__).resolve().parents[1]
NUM_THREADS_SCRIPTS = ["anomaly_detector", "benchmark_gpu", "onnx_optimization", "optimization_pipeline", "predict",
                       "quantization_demo"]


def _typed_options(path: Path) -> dict[str, str]:
    """--option -> the name of its argparse type, for every add_argument(...) of a script."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                and isinstance(node.args[0], ast.Constant):
            kind = next((k.value for k in node.keywords if k.arg == "type"), None)
            found[node.args[0].value] = getattr(kind, "id", None)
    return found


def test_every_num_threads_option_is_a_positive_int():
    scripts = {p.stem: _typed_options(p) for p in ROOT.glob("*.py")}
    having = sorted(name for name, options in scripts.items() if "--num-threads" in options)
    assert having == NUM_THREADS_SCRIPTS  # a new script with --num-threads: add it here, it is then tested below
    assert {name: scripts[name]["--num-threads"] for name in having} == dict.fromkeys(having, "positive_int")


def _parse(module: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """The script's argument parsing as run from the command line (run_cli): exit code, stderr lines."""
    mod = importlib.import_module(module)
    entry = getattr(mod, "parse_args", None) or mod.main  # onnx_optimization parses first thing in main()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: entry(argv))
    return exit_.value.code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("value", ["0", "-3"])
@pytest.mark.parametrize("module", NUM_THREADS_SCRIPTS)
def test_num_threads_below_one_is_one_error_line_exit_2(module, value, capsys):
    code, err = _parse(module, ["--num-threads", value], capsys)
    assert (code, err) == (2, [f"error: --num-threads must be >= 1, not {value}"])


@pytest.mark.parametrize("module, flag", [("predict", "--batch-size"), ("predict", "--save-every"),
                                          ("benchmark_gpu", "--epochs"), ("onnx_optimization", "--runs"),
                                          ("optimization_pipeline", "--calibration-images"),
                                          ("quantization_demo", "--bench-batch-size"),
                                          ("anomaly_detector", "--max-bank"), ("load_test", "--requests-per-level")])
def test_other_counts_use_the_same_check(module, flag, capsys):
    assert _parse(module, [flag, "0"], capsys) == (2, [f"error: {flag} must be >= 1, not 0"])
    assert _parse(module, [flag, "two"], capsys) == (2, [f"error: {flag} must be an integer >= 1, not 'two'"])


def test_valid_counts_are_ints():
    import predict

    args = predict.parse_args(["--input", "x.png", "--num-threads", "3", "--batch-size", "8"])
    assert (args.num_threads, args.batch_size, args.save_every) == (3, 8, 256)


def test_the_real_command_line_prints_one_line():
    res = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--input", "x.png", "--num-threads", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert (res.returncode, res.stderr) == (2, "error: --num-threads must be >= 1, not 0\n")


def test_no_option_takes_a_bare_float():
    """nan passes every range check written `x <= 0`: each real-valued option goes through lab_io.finite_float."""
    bare = {f"{p.stem} {option}" for p in ROOT.glob("*.py") for option, kind in _typed_options(p).items()
            if kind == "float"}
    assert not bare


@pytest.mark.parametrize("module, flag, value", [("benchmark_gpu", "--lr", "nan"),
                                                 ("optimization_pipeline", "--price-per-hour", "nan"),
                                                 ("load_test", "--timeout", "inf"),
                                                 ("download_mvtec", "--timeout", "NaN")])
def test_nan_and_inf_are_refused_at_parse_time(module, flag, value, capsys):
    assert _parse(module, [flag, value], capsys) == (2, [f"error: {flag} must be a finite number, not {value}"])


def test_output_folders_and_files_are_checked_before_any_work(tmp_path, capsys):
    """A file given as --results-dir, a folder given as --output / --report: refused at once, nothing renamed."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    cases = [("benchmark_gpu", ["--results-dir", tmp_path / "a_file"], "is a file, not a folder"),
             ("onnx_optimization", ["--models-dir", tmp_path / "a_file"], "is a file, not a folder"),
             ("quantization_demo", ["--output", tmp_path / "a_folder"], "is a folder: give the file to write"),
             ("rapport", ["--report", tmp_path / "a_folder"], "is a folder: give the file to write"),
             ("optimization_pipeline", ["--report", tmp_path / "a_folder"], "is a folder: give the file to write")]
    for module, argv, message in cases:
        code, err = _parse(module, [str(a) for a in argv], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (module, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]


@pytest.mark.parametrize("module, argv, message", [
    ("optimization_pipeline", ["--end-to-end-repeats", "0"], "--end-to-end-repeats must be >= 1, not 0"),
    ("optimization_pipeline", ["--end-to-end-images", "-1"], "--end-to-end-images must be >= 1, not -1"),
    ("anomaly_detector", ["--image-size", "0"], "--image-size must be >= 1, not 0"),
    ("download_mvtec", ["--retries", "11"], "--retries must be between 0 and 10"),
])
def test_ranges_checked_before_any_work(module, argv, message, capsys):
    code, err = _parse(module, argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_an_error_inside_a_progress_bar_starts_its_own_line(capsys):
    from tqdm.auto import tqdm

    from lab_io import UserError

    def main():  # a bar held in a variable stays open while the error travels up (the image decoding loops)
        bar = tqdm(total=3, desc="decoding", leave=False)
        bar.update()
        raise UserError("cannot read image: x.png")

    with pytest.raises(SystemExit):
        run_cli(main)
    assert "\nerror: cannot read image: x.png\n" in capsys.readouterr().err
