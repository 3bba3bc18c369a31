"""A full disk (a laptop whose modeles/ has grown with every kept copy): one clear line and a non-zero exit, and the
earlier result keeps its name and bytes. torch.save and OpenVINO report a full disk without errno ("unexpected
pos", "iostream error"), so lab_io also reads the free space; it is faked here (no tmpfs mount in CI)."""
import errno
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest

import lab_io
import load_model_hf
from lab_io import UserError, atomic_write, working_folder

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def full_disk(monkeypatch):
    """Every disk reports 0 bytes free."""
    monkeypatch.setattr(lab_io.shutil, "disk_usage", lambda _path: Usage(10**9, 10**9, 0))


def _fail_like_torch_save(tmp: Path) -> None:
    tmp.write_bytes(b"PK\x03\x04 half a checkpoint")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_a_full_disk_is_one_clear_error_and_the_earlier_file_keeps_its_name(tmp_path, full_disk):
    target = tmp_path / "model_cpu_bottle.pth"
    target.write_bytes(b"the checkpoint of yesterday")
    with pytest.raises(UserError, match=r"is full: .*model_cpu_bottle\.pth was not written"):
        atomic_write(target, _fail_like_torch_save, overwrite=False)
    assert target.read_bytes() == b"the checkpoint of yesterday"  # not renamed aside before the write failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_cpu_bottle.pth"]  # no temporary file, no copy


def test_another_write_error_is_not_called_a_full_disk(tmp_path):
    target = tmp_path / "model_cpu_bottle.pth"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(target, _fail_like_torch_save, overwrite=False)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_the_earlier_file_is_kept_aside_only_once_the_new_one_is_complete(tmp_path):
    target = tmp_path / "rapport.md"
    target.write_text("old")
    atomic_write(target, lambda p: p.write_text("new"), overwrite=False)
    kept = [p for p in tmp_path.iterdir() if p.name != "rapport.md"]
    assert target.read_text() == "new" and len(kept) == 1 and kept[0].read_text() == "old"
    atomic_write(target, lambda p: p.write_text("newer"), overwrite=True)
    assert target.read_text() == "newer" and len(list(tmp_path.iterdir())) == 2


def test_save_checkpoint_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, full_disk, monkeypatch):
    path = tmp_path / "model_cpu_bottle.pth"
    path.write_bytes(b"previous")
    monkeypatch.setattr(load_model_hf.torch, "save", lambda _obj, p: _fail_like_torch_save(Path(p)))
    model, pre, _ = load_model_hf.load_pretrained("offline-vit-tiny")
    with pytest.raises(UserError, match="is full"):
        load_model_hf.save_checkpoint(path, model, model_name="offline-vit-tiny", preprocessing=pre,
                                      category="bottle", split_manifest={})
    assert path.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_a_library_that_fails_later_on_the_cut_file_is_caught_before_the_space_comes_back(tmp_path, monkeypatch):
    """onnx shape inference writes a cut file on a full disk and the next parse fails (DecodeError): checked inside
    the working folder, while its files still fill the disk."""
    free = {"bytes": 10**9}
    monkeypatch.setattr(lab_io.shutil, "disk_usage", lambda _path: Usage(10**9, 10**9 - free["bytes"], free["bytes"]))
    with pytest.raises(lab_io.DiskFullError, match=rf"the disk of {tmp_path} is full: a working file in {tmp_path}"):
        with working_folder(tmp_path, ".int8-mixed-") as work:
            (work / "smoothed.onnx").write_bytes(b"cut")
            free["bytes"] = 0
            raise ValueError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")
    assert list(tmp_path.iterdir()) == []  # the working folder is gone
    with pytest.raises(lab_io.DiskFullError, match=rf"the disk of {tmp_path} is full: a working file in {tmp_path}"):
        with working_folder(tmp_path, ".int8-mixed-") as work:  # a file written there by atomic_write: named alike
            atomic_write(work / "smoothed-0.5.onnx", _fail_like_torch_save)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="Wire format"):  # with free space, the library's error stays its own
        free["bytes"] = 10**9
        with working_folder(tmp_path, ".w-"):
            raise ValueError("Wire format was corrupt")


def test_a_script_reports_a_full_disk_in_one_line(tmp_path):
    """errno ENOSPC from any write of a script (a CSV, a PNG, an archive): one line, exit code 2, no traceback."""
    script = tmp_path / "writes.py"
    script.write_text(textwrap.dedent(f"""
        import errno, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from lab_io import run_cli
        def main():
            raise OSError(errno.ENOSPC, "No space left on device", {str(tmp_path / "resultats" / "x.csv")!r})
        run_cli(main)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the disk") and "is full" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_errno_alone_is_enough_and_free_space_elsewhere_is_not_read_as_full(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_io.shutil, "disk_usage", shutil.disk_usage)
    assert lab_io.disk_full_message(RuntimeError("boom")) is None
    assert "is full" in lab_io.disk_full_message(OSError(errno.ENOSPC, "No space left on device"))
    assert "is full" in lab_io.disk_full_message(OSError(errno.EDQUOT, "Disk quota exceeded"))
