"""load_test.py against the real inference server (loopback only) and against a closed port."""
import csv
import math

import pytest

from test_azure_scoring import SERVER_ENV, azmlinfsrv, free_port, make_model_pair


@pytest.fixture(scope="module")
def score_url(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("models")
    make_model_pair(model_dir)
    with azmlinfsrv(model_dir, tmp_path_factory.mktemp("server"), env=SERVER_ENV) as base:
        yield base + "/score"


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_load_test_on_the_inference_server(run, score_url, synthetic_root, tmp_path):
    images = synthetic_root / "bottle" / "test"
    args = ["--url", score_url, "--images", images, "--concurrency", "1,2", "--requests-per-level", 10,
            "--max-seconds-per-level", 60, "--warmup", 1]
    res = run("load_test.py", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = read_rows(tmp_path / "resultats" / "load_test.csv")
    assert [int(r["concurrency"]) for r in rows] == [1, 2]
    for r in rows:
        assert int(r["requests"]) == 10 and int(r["errors"]) == 0 and float(r["error_rate"]) == 0
        p50, p95, top = (float(r[k]) for k in ("latency_median_ms", "latency_p95_ms", "latency_max_ms"))
        assert r["latency_p99_ms"] == ""  # 10 requests: no p99, the slowest is latency_max_ms
        assert 0 < p50 <= p95 <= top and float(r["throughput_req_s"]) > 0 and float(r["duration_s"]) > 0
        assert r["variant"] == "ort-fp32-test" and r["run_id"] and r["stopped_by"] == "requests"
    assert (tmp_path / "resultats" / "load_test.png").stat().st_size > 10_000
    assert "latency_p95_ms" in res.stdout

    # JSON mode, 2 images per request; earlier rows and figure are kept
    res = run("load_test.py", *args[:4], "--mode", "json", "--images-per-request", 2, "--concurrency", "2",
              "--requests-per-level", 6, "--warmup", 0, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = read_rows(tmp_path / "resultats" / "load_test.csv")
    assert len(rows) == 3 and rows[-1]["request_mode"] == "json" and int(rows[-1]["errors"]) == 0
    assert float(rows[-1]["throughput_img_s"]) == pytest.approx(2 * float(rows[-1]["throughput_req_s"]), rel=1e-3)
    assert len(list((tmp_path / "resultats").glob("load_test*.png"))) == 2


def test_errors_are_counted_and_a_run_with_no_success_is_an_error(run, score_url, tmp_path):
    # files that are not images: every request gets a 400, counted as errors; every level is measured and written,
    # then the run ends with one line and a non-zero exit (a load test in which nothing was served measured nothing)
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    res = run("load_test.py", "--url", score_url, "--images", folder, "--concurrency", "1,2",
              "--requests-per-level", 4, "--warmup", 0, cwd=tmp_path)
    last = res.stderr.strip().splitlines()[-1]  # after the levels' progress bars
    assert res.returncode == 2 and last.startswith("error: every request to ") and "http_400:4" in last, res.stderr
    rows = read_rows(tmp_path / "resultats" / "load_test.csv")
    assert [r["error_kinds"] for r in rows] == ["http_400:4", "http_400:4"]
    assert all(float(r["error_rate"]) == 1.0 for r in rows)


def test_closed_port_is_reported_cleanly(run, synthetic_root, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    res = run("load_test.py", "--url", url, "--images", synthetic_root / "bottle" / "test", "--concurrency", "1,2,4",
              "--requests-per-level", 5, "--timeout", 5, cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.strip().splitlines()[-1].startswith("error: no request")
    assert "Levels [2, 4] skipped" in res.stderr
    rows = read_rows(tmp_path / "resultats" / "load_test.csv")  # what was measured is written
    assert len(rows) == 1 and rows[0]["error_kinds"] == "connection:5" and float(rows[0]["error_rate"]) == 1.0
    assert rows[0]["latency_median_ms"] == "" or math.isnan(float(rows[0]["latency_median_ms"]))
    assert not (tmp_path / "resultats" / "load_test.png").exists()


@pytest.mark.parametrize("bad, message", [
    (["--concurrency", "1,x"], "comma-separated"),
    (["--concurrency", "0"], "between 1 and 256"),
    (["--url", "127.0.0.1:5001/score"], "http://"),
    (["--images-per-request", "3"], "--mode json"),
    (["--requests-per-level", "0"], "--requests-per-level must be >= 1"),
])
def test_bad_arguments(bad, message):
    import load_test
    from lab_io import UserError

    with pytest.raises(UserError, match=message):
        load_test.parse_args(bad)


def test_missing_image_folder_is_one_line(run, tmp_path):
    res = run("load_test.py", "--images", "no_such_folder", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: image folder no_such_folder not found: pass --images DIR, "
                                               "or --synthetic."]
