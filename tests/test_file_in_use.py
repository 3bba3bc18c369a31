"""An output that another program holds: Windows refuses to rename or replace a file open in a spreadsheet (a results
CSV) or mapped by a running server (an OpenVINO model's weights). One clear line and exit 2, the earlier file keeps
its name and bytes, the new one is kept under a name of its own, and a model is never half replaced.

Held two ways: the refusal simulated (os.replace raises PermissionError, as on Windows), and for real where this
machine allows it (root on ext4: `chattr +i` makes a file that cannot be renamed or replaced)."""
import os
import re
import shutil
import subprocess

import pytest

import lab_io
from lab_io import FileInUseError, append_csv_rows, atomic_write, read_csv_rows, run_cli


@pytest.fixture(params=["simulated", "chattr"])
def hold(request, monkeypatch, tmp_path):
    """hold(path): from now on `path` cannot be renamed, nor replaced."""
    held = set()
    if request.param == "simulated":
        real_replace = os.replace

        def replace(src, dst):
            if {os.path.abspath(src), os.path.abspath(dst)} & held:
                raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                          "process", str(src))
            real_replace(src, dst)

        monkeypatch.setattr(lab_io.os, "replace", replace)
        monkeypatch.setattr(lab_io, "RENAME_RETRY_S", ())
        yield lambda path: held.add(os.path.abspath(path))
        return
    probe = tmp_path / ".chattr-probe"
    probe.write_text("")
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    monkeypatch.setattr(lab_io, "RENAME_RETRY_S", (0.01,))

    def hold_for_real(path):
        subprocess.run(["chattr", "+i", str(path)], check=True)
        held.add(str(path))

    yield hold_for_real
    for path in held:
        subprocess.run(["chattr", "-i", path], check=False)


def _others(folder, *names):
    return sorted(p.name for p in folder.iterdir() if p.name not in names)


def test_a_held_output_is_one_error_the_earlier_file_untouched_and_the_new_one_kept(tmp_path, hold):
    target = tmp_path / "rapport.md"
    target.write_text("the report of yesterday")
    hold(target)
    with pytest.raises(FileInUseError, match=r"rapport\.md cannot be replaced: another program holds it open") as e:
        atomic_write(target, lambda p: p.write_text("today's report"), overwrite=False)
    assert target.read_text() == "the report of yesterday"
    kept = _others(tmp_path, "rapport.md")
    assert len(kept) == 1 and re.fullmatch(r"rapport\.unsaved\.\d{8}-\d{6}\.md", kept[0]), kept  # no temporary file
    assert (tmp_path / kept[0]).read_text() == "today's report" and f"kept as {tmp_path / kept[0]}" in str(e.value)


def test_a_csv_open_in_a_spreadsheet_loses_no_row_and_does_not_stop_the_run(tmp_path, hold, capsys):
    """The CSV comes at the end of a run of many minutes: its rows go beside it, said in a note, and the run goes on
    with that file (the scripts print, and the pipeline's report reads, the path returned)."""
    path = tmp_path / "onnx_results.csv"
    append_csv_rows(path, [{"run_id": "monday", "variant": "ort-fp32", "latency_median_ms": 5.0}])
    hold(path)
    written = append_csv_rows(path, [{"run_id": "tuesday", "variant": "ov-int8-nncf", "latency_median_ms": 3.0}])
    assert [r["run_id"] for r in read_csv_rows(path)] == ["monday"]
    assert re.fullmatch(r"onnx_results\.unsaved\.\d{8}-\d{6}\.csv", written.name)
    assert [r["run_id"] for r in read_csv_rows(written)] == ["monday", "tuesday"]
    assert _others(tmp_path, path.name, written.name, ".onnx_results.csv.lock") == []
    note = capsys.readouterr().out
    assert f"note: {path} is held by another program" in note and f"written to {written} instead" in note


def test_a_csv_saved_by_a_spreadsheet_and_still_open_loses_no_row(tmp_path, hold, capsys):
    """Saved again by Excel (';' separators) and still open in it: it cannot be set aside; the new rows start a file
    of their own."""
    path = tmp_path / "quantization_results.csv"
    path.write_text("run_id;variant\nmonday;ort-fp32\n")
    hold(path)
    written = append_csv_rows(path, [{"run_id": "tuesday", "variant": "pytorch-int8-dynamic"}])
    assert path.read_text() == "run_id;variant\nmonday;ort-fp32\n"
    assert ".unsaved." in written.name and [r["run_id"] for r in read_csv_rows(written)] == ["tuesday"]
    assert "written to" in capsys.readouterr().out


def test_a_served_model_is_replaced_whole_or_not_at_all(tmp_path, hold):
    """OpenVINO maps the weights of the model it serves: model_final.bin is held while model_final.xml and the sidecar
    are not. Nothing of the deployed set may move (a new .xml on old weights would serve garbage)."""
    from inference import save_final

    models, new = tmp_path / "modeles", tmp_path / "new"
    models.mkdir(), new.mkdir()
    deployed = {f"model_final{ext}": f"deployed {ext}".encode() for ext in (".xml", ".bin", ".json")}
    for name, data in deployed.items():
        (models / name).write_bytes(data)
    (new / "model_int8_nncf.xml").write_bytes(b"new xml")
    (new / "model_int8_nncf.bin").write_bytes(b"new bin")
    hold(models / "model_final.bin")
    with pytest.raises(FileInUseError, match=r"model_final\.bin cannot be replaced"):
        save_final(new / "model_int8_nncf.xml", models, overwrite=False)
    assert {p.name: p.read_bytes() for p in models.iterdir()} == deployed  # no backup, no probe, no half set


def test_an_openvino_ir_is_never_half_replaced(tmp_path, hold):
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    from engines import save_openvino_ir

    x = ops.parameter([1, 4], np.float32, name="x")
    model = ov.Model([ops.relu(ops.add(x, ops.constant(np.ones((1, 4), np.float32))))], [x], "tiny")
    xml = save_openvino_ir(model, tmp_path / "model_int8_weights.xml", overwrite=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    hold(xml)  # the .bin is free, the .xml is not: the .bin must not be replaced either
    with pytest.raises(FileInUseError, match=r"model_int8_weights\.xml cannot be replaced"):
        save_openvino_ir(model, xml, overwrite=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # working folder gone, nothing moved


def test_a_refusal_of_a_moment_is_waited_out(tmp_path, monkeypatch):
    """Windows: a virus scanner or an indexer opens a file just written for a moment; the rename is tried again."""
    real_replace, refusals = os.replace, []

    def replace(src, dst):
        if len(refusals) < 2:
            refusals.append(dst)
            raise PermissionError(13, "Access is denied", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(lab_io.os, "replace", replace)
    target = tmp_path / "benchmark_cpu_gpu.png"
    atomic_write(target, lambda p: p.write_bytes(b"png"), overwrite=False)
    assert target.read_bytes() == b"png" and len(refusals) == 2 and _others(tmp_path, target.name) == []


def test_a_script_says_it_in_one_line(tmp_path, hold, capsys):
    target = tmp_path / "model_cpu_bottle.pth"
    target.write_bytes(b"yesterday")
    hold(target)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: atomic_write(target, lambda p: p.write_bytes(b"today"), overwrite=False) and 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {target} cannot be replaced") and "Close that program and run again" in err[0]


def test_a_working_folder_that_cannot_be_removed_does_not_fail_the_run(tmp_path, hold, capsys):
    """Windows: OpenVINO maps the weights of an IR it has read; the folder of part 3's trials then cannot be removed
    at once. The run goes on, and a note says where the folder stays."""
    with lab_io.working_folder(tmp_path, ".int8-nncf-") as work:
        (work / "k2.bin").write_bytes(b"weights")
        hold(work / "k2.bin")
    note = capsys.readouterr().out
    if work.exists():  # held for real (chattr): the file could not be deleted
        assert f"note: the working folder {work} could not be removed" in note
    else:  # simulated: only renames are refused, so the folder went
        assert "note" not in note


def test_the_archive_holds_the_rows_of_this_run_when_the_report_csv_was_held(tmp_path):
    """optimization_pipeline.py --package: its report CSV held open, the rows went to the unsaved file; the archive
    carries that file under the lab's name (rapport.md was written from it), not the stale one."""
    from types import SimpleNamespace

    from optimization_pipeline import REPORT_CSV, package_members

    results = tmp_path / "resultats"
    results.mkdir()
    (results / REPORT_CSV).write_text("run_id\nmonday\n")
    unsaved = results / REPORT_CSV.replace(".csv", ".unsaved.20261208-101500.csv")
    unsaved.write_text("run_id\nmonday\ntuesday\n")
    args = SimpleNamespace(results_dir=results, report=tmp_path / "rapport.md")
    members, _ = package_members(args, models={}, report_csv=unsaved)
    assert members[f"resultats/{REPORT_CSV}"] == unsaved and unsaved.name not in str(list(members))
    members, _ = package_members(args, models={})
    assert members[f"resultats/{REPORT_CSV}"] == results / REPORT_CSV


def test_predictions_open_in_a_spreadsheet_go_on_in_a_file_of_their_own(tmp_path, hold, capsys):
    """predict.py saves its CSV every few images; opened in Excel meanwhile, the next saves go beside it and the run
    goes on (its summary names the file: store.path)."""
    from types import SimpleNamespace

    from prediction_store import PredictionStore, prediction_row

    model = SimpleNamespace(score_kind="probability", threshold=0.5)
    identity = {"variant": "ort-fp32", "model_sha256": "ab" * 32, "weights_sha256": "", "threshold": "0.5"}
    path = tmp_path / "predictions.csv"

    def put(store, name, score):
        result = {"path": str(tmp_path / name), "label": "good", "score": score, "error": "", "width": 8, "height": 8}
        store.put(prediction_row(result, model, identity, "run"))

    store = PredictionStore(path, identity)
    put(store, "a.png", 0.1)
    store.save()
    hold(path)
    put(store, "b.png", 0.2)
    store.save()
    moved = store.path
    assert moved != path and ".unsaved." in moved.name and "saved in" in capsys.readouterr().out
    put(store, "c.png", 0.9)
    store.save()
    assert store.path == moved and len(list(tmp_path.glob("predictions.unsaved.*.csv"))) == 1
    assert [r["path"][-5:] for r in read_csv_rows(moved)] == ["a.png", "b.png", "c.png"]
    assert [r["path"][-5:] for r in read_csv_rows(path)] == ["a.png"]


def test_a_category_folder_in_use_is_not_replaced_by_download_force(tmp_path, hold):
    """download_mvtec.py --force over data/mvtec/bottle while an image viewer has one of its images open (Windows
    refuses to rename the folder): one clear line, the category in place untouched, no temporary folder left."""
    import tarfile

    import download_mvtec as dm
    from mvtec_dataset import make_synthetic_mvtec

    make_synthetic_mvtec(tmp_path / "source", n_train_good=3, n_test_good=2, n_per_defect=1, image_size=16)
    archive = tmp_path / "bottle.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "source" / "bottle", arcname="bottle")
    out = tmp_path / "mvtec"
    argv = ["--category", "bottle", "--output", str(out), "--archive", str(archive)]
    assert dm.main(argv) == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    hold(out / "bottle")
    with pytest.raises(lab_io.UserError, match=r"bottle cannot be replaced: another program has it"):
        dm.main(argv + ["--force"])
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
