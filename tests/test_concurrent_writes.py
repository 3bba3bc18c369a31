"""Result CSVs written by several processes at once: every row kept exactly once, one header (lab_io.csv_lock around
the read-merge-replace of lab_io.append_csv_rows and prediction_store.PredictionStore.save), a stuck lock is one clear error.

The writers are real processes (multiprocessing, "spawn": what Windows does, and no state shared by fork), released
together by a barrier so that their writes interleave.
"""
import csv
import multiprocessing
import types
from collections import Counter

import pytest
from filelock import FileLock

import lab_io
from lab_io import UserError

IDENTITY = {"variant": "ort-fp32", "model_sha256": "ab" * 32, "weights_sha256": "", "threshold": "0.5"}
MODEL = types.SimpleNamespace(score_kind="probability", threshold=0.5)  # what prediction_row reads of a Classifier


def _append_writer(path, writer: int, n: int, barrier) -> None:
    rid = lab_io.run_id()
    barrier.wait()
    for i in range(n):
        row = {"run_id": rid, "script": f"writer{writer}", "runs": i, "latency_median_ms": i / 7}
        if writer == 0 and i == n // 2:
            row["threads"] = 1  # a new column in the middle of the run: merged into the header
        lab_io.append_csv_rows(path, [row])


def _prediction(path: str, score: float, rid: str) -> dict:
    import prediction_store

    result = {"path": path, "label": "good", "score": score, "error": "", "width": 8, "height": 8}
    return prediction_store.prediction_row(result, MODEL, IDENTITY, rid)


def _store_writer(path, writer: int, n: int, barrier) -> None:
    """As predict.py: put a row per image, save every few images, save at the end."""
    import prediction_store

    store = prediction_store.PredictionStore(path, IDENTITY)
    rid = lab_io.run_id()
    barrier.wait()
    for i in range(n):
        store.put(_prediction(f"/line{writer}/img{i:03d}.png", 0.25, rid))
        if store.dirty >= 7:
            store.save()
    for i in range(10):  # the same run scores its first images again: their rows are replaced, not duplicated
        store.put(_prediction(f"/line{writer}/img{i:03d}.png", 0.75, rid))
    store.save()


def _run_together(target, path, writers: int, n: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(writers)
    procs = [ctx.Process(target=target, args=(str(path), w, n, barrier)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * writers


def _header_count(path) -> int:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    return sum(line == first for line in path.read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_appends_keep_every_row_once(tmp_path, writers):
    path, n = tmp_path / "results.csv", 100
    _run_together(_append_writer, path, writers, n)
    rows = lab_io.read_csv_rows(path)
    assert len(rows) == writers * n and _header_count(path) == 1
    assert Counter((r["script"], r["runs"]) for r in rows) == {(f"writer{w}", str(i)): 1
                                                               for w in range(writers) for i in range(n)}
    run_ids = {r["script"]: r["run_id"] for r in rows}
    assert len(set(run_ids.values())) == writers  # run_id() stays unique across processes started together
    assert all(r["run_id"] == run_ids[r["script"]] for r in rows)
    with open(path, newline="", encoding="utf-8") as f:
        assert "threads" in csv.DictReader(f).fieldnames
    assert sum(r["threads"] == "1" for r in rows) == 1
    assert {r["latency_median_ms"] for r in rows if r["runs"] == "3"} == {f"{3 / 7:.6g}"}  # formatted as before
    assert not list(tmp_path.glob(".results.csv.*.tmp"))  # no temporary file left behind (atomic_write)


def test_two_prediction_stores_in_two_processes_keep_every_row(tmp_path):
    import prediction_store

    path, n = tmp_path / "pred.csv", 60
    _run_together(_store_writer, path, 2, n)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:len(prediction_store.PREDICTION_COLUMNS)] == list(prediction_store.PREDICTION_COLUMNS)
        rows = list(reader)
    assert _header_count(path) == 1 and len(rows) == 2 * n
    assert Counter(r["path"] for r in rows) == {f"/line{w}/img{i:03d}.png": 1 for w in range(2) for i in range(n)}
    rescored = {r["path"] for r in rows if r["anomaly_probability"] == "0.750000"}
    assert rescored == {f"/line{w}/img{i:03d}.png" for w in range(2) for i in range(10)}
    assert len({r["run_id"] for r in rows}) == 2


def test_store_save_merges_rows_another_store_saved_meanwhile(tmp_path):
    """Two runs started on the same file: each save keeps the other's rows; one row per image (the last saved)."""
    import prediction_store

    path = tmp_path / "pred.csv"
    first = prediction_store.PredictionStore(path, IDENTITY)
    first.put(_prediction("/old.png", 0.1, "r0"))
    first.save()
    a, b = prediction_store.PredictionStore(path, IDENTITY), prediction_store.PredictionStore(path, IDENTITY)
    a.put(_prediction("/a.png", 0.2, "ra"))
    b.put(_prediction("/b.png", 0.3, "rb"))
    a.save()
    b.save()
    assert [r["path"] for r in lab_io.read_csv_rows(path)] == ["/old.png", "/a.png", "/b.png"]
    assert list(b.rows) == ["/old.png", "/a.png", "/b.png"]  # the summary counts what the file holds
    a.put(_prediction("/a.png", 0.9, "ra"))  # scored again by the same run: replaced
    a.save()
    rows = lab_io.read_csv_rows(path)
    assert [r["path"] for r in rows] == ["/old.png", "/b.png", "/a.png"]
    assert rows[-1]["anomaly_probability"] == "0.900000"


def test_a_lock_held_too_long_is_one_clear_user_error(tmp_path, monkeypatch):
    import prediction_store

    path = tmp_path / "results.csv"
    lock = str(lab_io.lock_file(path))
    assert lock == str(tmp_path / ".results.csv.lock")
    monkeypatch.setattr(lab_io, "CSV_LOCK_TIMEOUT_S", 0.2)
    store = prediction_store.PredictionStore(path, IDENTITY)
    store.put(_prediction("/a.png", 0.2, "ra"))
    with FileLock(lock):  # another writer that does not let go
        for write in (lambda: lab_io.append_csv_rows(path, [{"run_id": "x", "runs": 1}]), store.save):
            with pytest.raises(UserError) as err:
                write()
            assert lock in str(err.value) and "more than 0.2 s" in str(err.value) and "\n" not in str(err.value)
    assert not path.exists()
    store.save()  # the lock is free again: the rows wait in the store until then
    lab_io.append_csv_rows(path, [{"run_id": "x", "runs": 1}])
    assert [r["path"] for r in lab_io.read_csv_rows(path)] == ["/a.png", ""]
