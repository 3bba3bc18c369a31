"""download_mvtec.py against a local HTTP server (127.0.0.1 only) and synthetic MVTec-like archives."""
import hashlib
import io
import os
import random
import re
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import download_mvtec as dm
from conftest import ROOT
from lab_io import UserError

LAYOUT = {"train/good": 3, "test/good": 2, "test/broken_large": 2, "ground_truth/broken_large": 2}


# --------------------------------------------------------------------------------------------------
# Synthetic data and a small HTTP server with Range support
# --------------------------------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def make_archive(path: Path, categories=("bottle",), layout=LAYOUT, extra=(), mode="w:xz") -> Path:
    """An MVTec-like archive: <category>/<folder>/NNN.png (+ `extra` members given as (name, attrs) pairs)."""
    with tarfile.open(path, mode) as tar:
        for category in categories:
            for folder, n in layout.items():
                for i in range(n):
                    suffix = "_mask" if folder.startswith("ground_truth") else ""
                    _add(tar, f"{category}/{folder}/{i:03d}{suffix}.png", _png(i + len(folder)))
        for name, attrs in extra:
            _add(tar, name, **attrs)
    return path


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        state = self.server.state
        state["requests"].append({"path": self.path, "range": self.headers.get("Range")})
        if state.get("status"):
            self.send_error(state["status"])
            return
        file = state["root"] / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data, start = file.read_bytes(), 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and not state.get("ignore_range"):
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/x-xz")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = state.pop("cut_after", None)  # first request only: send `cut` bytes, then drop the connection
        self.wfile.write(body[:cut] if cut else body)
        self.close_connection = True


class Server:
    def __init__(self, root: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.state = {"root": root, "requests": []}
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def state(self):
        return self.httpd.state

    @property
    def requests(self):
        return self.httpd.state["requests"]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


@pytest.fixture
def server(tmp_path):
    (tmp_path / "srv").mkdir()
    srv = Server(tmp_path / "srv")
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def bottle(tmp_path) -> Path:
    (tmp_path / "srv").mkdir(exist_ok=True)
    return make_archive(tmp_path / "srv" / "bottle.tar.xz")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# --------------------------------------------------------------------------------------------------
# Download + extraction through main()
# --------------------------------------------------------------------------------------------------
def test_download_extract_counts_then_idempotent_then_force(server, bottle, tmp_path, capsys):
    out = tmp_path / "data" / "mvtec"
    argv = ["--category", "bottle", "--output", str(out), "--url", server.url("bottle.tar.xz")]
    assert dm.main(argv) == 0
    assert dm.verify_layout(out / "bottle") == LAYOUT
    assert leftovers(out) == ["bottle"]  # archive deleted, no temporary folder
    text = capsys.readouterr().out
    assert "ready" in text and re.search(r"train/good\s+3", text) and re.search(r"total\s+9", text)
    assert len(server.requests) == 1

    assert dm.main(argv) == 0  # already there: the server is not asked again
    assert len(server.requests) == 1
    assert "already there" in capsys.readouterr().out

    (out / "bottle" / "marker.txt").write_text("old")
    assert dm.main(argv + ["--force", "--keep-archive"]) == 0
    assert len(server.requests) == 2
    assert not (out / "bottle" / "marker.txt").exists()
    assert leftovers(out) == ["bottle", "bottle.tar.xz"]
    assert (out / "bottle.tar.xz").read_bytes() == bottle.read_bytes()


def test_checksum_mismatch_leaves_nothing(server, bottle, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="checksum mismatch.*--archive"):
        dm.main(["--category", "bottle", "--output", str(out), "--url", server.url("bottle.tar.xz"),
                 "--sha256", "0" * 64, "--retries", "0"])
    assert leftovers(out) == []


def test_checksum_match(server, bottle, tmp_path):
    sha = hashlib.sha256(bottle.read_bytes()).hexdigest()
    dest = dm.download(server.url("bottle.tar.xz"), tmp_path / "dl" / "bottle.tar.xz", sha256=sha.upper())
    assert dest.read_bytes() == bottle.read_bytes()


# --------------------------------------------------------------------------------------------------
# Resume, retries, server errors
# --------------------------------------------------------------------------------------------------
def test_resume_after_cut_connection(server, tmp_path):
    data = random.Random(0).randbytes(1 << 20)  # bigger than the download chunks (64 KiB)
    (tmp_path / "srv" / "big.tar.xz").write_bytes(data)
    server.state["cut_after"] = 600_000
    dest = tmp_path / "dl" / "big.tar.xz"
    dm.download(server.url("big.tar.xz"), dest, sha256=hashlib.sha256(data).hexdigest(), retries=2, backoff=0)
    assert dest.read_bytes() == data
    assert not dest.with_name("big.tar.xz.part").exists()
    ranges = [r["range"] for r in server.requests]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < resumed_at <= 600_000


def test_resume_of_earlier_part_file(server, bottle, tmp_path):
    data = bottle.read_bytes()
    dest = tmp_path / "dl" / "bottle.tar.xz"
    dest.parent.mkdir()
    dest.with_name("bottle.tar.xz.part").write_bytes(data[:100])
    dm.download(server.url("bottle.tar.xz"), dest, retries=0)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.requests] == ["bytes=100-"]


def test_server_ignoring_range_restarts_from_zero(server, bottle, tmp_path):
    server.state["ignore_range"] = True
    dest = tmp_path / "dl" / "bottle.tar.xz"
    dest.parent.mkdir()
    dest.with_name("bottle.tar.xz.part").write_bytes(b"garbage from another download")
    dm.download(server.url("bottle.tar.xz"), dest, retries=0)
    assert dest.read_bytes() == bottle.read_bytes()


def test_http_404_fails_at_once(server, tmp_path):
    with pytest.raises(dm.DownloadError, match="HTTP 404"):
        dm.download(server.url("missing.tar.xz"), tmp_path / "x.tar.xz", retries=3, backoff=0)
    assert len(server.requests) == 1


def test_http_503_is_retried(server, tmp_path):
    server.state["status"] = 503
    with pytest.raises(dm.DownloadError, match="HTTP 503"):
        dm.download(server.url("bottle.tar.xz"), tmp_path / "x.tar.xz", retries=2, backoff=0)
    assert len(server.requests) == 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_cli_one_line_exit_2(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/bottle.tar.xz"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.run([sys.executable, "download_mvtec.py", "--category", "bottle", "--output",
                           str(tmp_path / "out"), "--url", url, "--retries", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: download of")
    assert "connection refused" in lines[0] and "--archive" in lines[0] and "CC BY-NC-SA 4.0" in lines[0]
    assert leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------------------------------
# The manual route (--archive) and bad archives
# --------------------------------------------------------------------------------------------------
def test_full_archive_extracts_only_the_requested_category(tmp_path):
    full = make_archive(tmp_path / "mvtec_anomaly_detection.tar.xz", categories=("bottle", "cable"),
                        extra=[("license.txt", {})])
    out = tmp_path / "out"
    assert dm.main(["--category", "cable", "--output", str(out), "--archive", str(full)]) == 0
    assert leftovers(out) == ["cable"]
    assert (out / "cable" / "license.txt").exists()
    assert full.exists()  # the user's archive is never deleted


@pytest.mark.parametrize("mode, suffix", [("w:gz", ".tar.gz"), ("w", ".tar")])
def test_gz_and_plain_tar(tmp_path, mode, suffix):
    archive = make_archive(tmp_path / f"bottle{suffix}", mode=mode)
    assert dm.safe_extract(archive, tmp_path / "out", "bottle") == LAYOUT


def test_wrong_category_missing_and_corrupt_archives(tmp_path):
    out = tmp_path / "out"
    bottle = make_archive(tmp_path / "bottle.tar.xz")
    with pytest.raises(UserError, match="no 'cable/' folder.*found: bottle"):
        dm.safe_extract(bottle, out, "cable")
    with pytest.raises(UserError, match="not found"):
        dm.main(["--category", "bottle", "--output", str(out), "--archive", str(tmp_path / "nope.tar.xz")])
    garbage = tmp_path / "garbage.tar.xz"
    garbage.write_bytes(b"\xfd7zXZ\x00" + b"not really xz" * 100)
    with pytest.raises(UserError, match="not a valid or complete"):
        dm.safe_extract(garbage, out, "bottle")
    truncated = tmp_path / "truncated.tar.xz"
    truncated.write_bytes(bottle.read_bytes()[: bottle.stat().st_size // 2])
    with pytest.raises(UserError, match="not a valid or complete"):
        dm.safe_extract(truncated, out, "bottle")
    assert leftovers(out) == []


def test_incomplete_layout_is_refused(tmp_path):
    layout = {k: v for k, v in LAYOUT.items() if not k.startswith("ground_truth")}
    archive = make_archive(tmp_path / "bottle.tar.xz", layout=layout)
    with pytest.raises(UserError, match="missing ground_truth"):
        dm.safe_extract(archive, tmp_path / "out", "bottle")
    assert leftovers(tmp_path / "out") == []


def test_unknown_category_lists_known_ones(tmp_path):
    with pytest.raises(UserError, match="unknown --category 'bottel'.*bottle, cable"):
        dm.main(["--category", "bottel", "--output", str(tmp_path)])


def test_every_flag_has_help():
    for action in dm.build_parser()._actions:
        assert action.help, action.dest
    assert len(dm.MVTEC_URLS) == 15 and all(u.endswith(f"/{c}.tar.xz") for c, u in dm.MVTEC_URLS.items())


def _evil_members(outside: Path):
    return {
        "dotdot": [("bottle/../../evil_dotdot", {})],
        "absolute": [(str(outside / "evil_abs"), {})],
        "symlink": [("bottle/train/good/evil_link", {"type": tarfile.SYMTYPE, "linkname": "../../../../evil_sym"})],
        "symlink_abs": [("bottle/evil_link", {"type": tarfile.SYMTYPE, "linkname": str(outside)}),
                        ("bottle/evil_link/evil_through", {})],
        "hardlink": [("bottle/evil_hard", {"type": tarfile.LNKTYPE, "linkname": str(outside / "victim")})],
        "device": [("bottle/evil_dev", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})],
    }


@pytest.mark.parametrize("use_filter", [True, False], ids=["data_filter", "own_checks_only"])
@pytest.mark.parametrize("kind", list(_evil_members(Path("/x"))))
def test_malicious_archives_are_refused(tmp_path, monkeypatch, kind, use_filter):
    if not use_filter:
        monkeypatch.setattr(dm, "_EXTRACT_KW", {})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    archive = make_archive(tmp_path / "evil.tar.xz", extra=_evil_members(outside)[kind])
    out = tmp_path / "deep" / "out"
    with pytest.raises(UserError, match="unsafe archive"):
        dm.safe_extract(archive, out, "bottle")
    assert leftovers(out) == []  # neither the category nor the temporary folder
    assert [p.name for p in tmp_path.rglob("evil*") if p.name != "evil.tar.xz"] == []
    assert sorted(p.name for p in outside.iterdir()) == ["victim"] and (outside / "victim").read_text() == "keep me"
