"""predict.py's results CSV: one row per image, rewritten atomically under a file lock, merged with other runs' rows,
resumable."""
from __future__ import annotations

import csv
import datetime as _dt
import os
from collections import Counter
from pathlib import Path

from inference import Classifier
from lab_io import FileInUseError, UserError, atomic_write, csv_lock
from lab_targets import check_result_columns


PREDICTION_COLUMNS = ("path", "label", "anomaly_probability", "anomaly_score", "threshold", "variant", "model_sha256",
                      "weights_sha256", "error", "image_width", "image_height", "file_bytes", "file_mtime_ns",
                      "scored_at", "run_id")


# A file name that is not UTF-8 (e.g. Latin-1 from an old share) reaches Python as lone surrogates (os.fsdecode):
# written back as its own bytes, it is read again as the same path, so the row still matches its image.
PATH_ERRORS = "surrogateescape"

SAVE_SECONDS = 30.0  # the CSV is also rewritten at least this often while images are scored


def model_identity(model: Classifier) -> dict:
    """What makes a row this model's: its files, and its decision threshold (a sidecar given another threshold
    labels every image again)."""
    return {"variant": model.info["variant"], "model_sha256": model.meta["sha256"],
            "weights_sha256": model.meta.get("weights_sha256") or "", "threshold": f"{model.threshold:.6g}"}


class PredictionStore:
    """The rows of the predictions CSV keyed by resolved image path. save() merges the rows put since the last save
    with the file as it is now, under its lock (lab_io.csv_lock: another run may write to the same --output), and
    replaces it atomically (lab_io.atomic_write): a crash or Ctrl+C never leaves it half-written, and two runs keep
    every row of both (one row per image: the last saved). Rows of another model are not mixed in: that file is kept
    under a timestamped name (lab_io.keep_previous) at the first save."""

    def __init__(self, path: str | Path, identity: dict, rescore: bool = False):
        self.path, self.identity = Path(path), identity
        self.rows: dict[str, dict] = {}
        self.unsaved: dict[str, dict] = {}  # rows put since the last save, merged into the file by save()
        self.columns = list(PREDICTION_COLUMNS)
        self.replace_file = False  # keep the existing file aside before the first save
        self.stat_read = None  # (size, mtime) of the file as read here: replace_file applies to that file only
        self.dirty = 0
        self.note = ""
        if self.path.is_dir():
            raise UserError(f"--output {self.path} is a folder: give a CSV file name, e.g. {self.path}/predictions.csv")
        if not self.path.exists():
            return
        self.stat_read = self._stat()
        header, rows = self._read()
        others = self._others(rows)
        if rescore or others:
            self.replace_file = True
            why = "--rescore" if rescore else \
                "it holds predictions of another model or threshold (" + ", ".join(
                    f"{v or '?'} sha256 {s[:12]}... x{n}" for (v, s), n in others.most_common(3)) + ")"
            self.note = (f"note: {self.path}: {why}; it will be kept under a timestamped name and every image is "
                         f"scored again with {identity['variant']} (sha256 {identity['model_sha256'][:12]}...)")
            return
        self.columns += [c for c in header if c not in self.columns]
        self.rows = {r["path"]: r for r in rows}

    def _stat(self):
        try:
            st = self.path.stat()
            return st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def _read(self) -> tuple[list[str], list[dict]]:
        try:
            with open(self.path, newline="", encoding="utf-8", errors=PATH_ERRORS) as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"--output {self.path} cannot be read as a CSV ({exc}): choose another --output") from None
        if not {"path", "label", "model_sha256"} <= set(header):
            raise UserError(f"--output {self.path} is not a predictions file of predict.py (no path / label / "
                            "model_sha256 columns): choose another --output")
        return header, rows

    def _others(self, rows: list[dict]) -> Counter:
        """(variant, model_sha256) -> rows of a model other than this one (or of this one at another threshold)."""
        keys = ("variant", "model_sha256", "weights_sha256", "threshold")
        mine = tuple(self.identity[k] for k in keys)
        return Counter((r.get("variant", ""), r.get("model_sha256", "")) for r in rows
                       if tuple(r.get(k) or "" for k in keys) != mine)

    def status(self, path: Path) -> str:
        """'done' (scored by this model, file unchanged), 'changed' (scored, but the file changed since), 'failed'
        (an error last time: tried again) or 'new'."""
        row = self.rows.get(str(path))
        if row is None:
            return "new"
        if row.get("error") or not row.get("label"):
            return "failed"
        try:
            st = path.stat()
        except OSError:
            return "changed"
        same = row.get("file_bytes") == str(st.st_size) and row.get("file_mtime_ns") == str(st.st_mtime_ns)
        return "done" if same else "changed"

    def put(self, row: dict) -> None:
        for rows in (self.rows, self.unsaved):
            rows.pop(row["path"], None)  # a re-scored image moves to the end, in the order of this run
            rows[row["path"]] = row
        self.dirty += 1

    def save(self) -> None:
        if not self.dirty:
            return
        with csv_lock(self.path):  # read, merge and replace as one step: rows another run saved meanwhile stay
            header, on_disk = self._read() if self.path.exists() else ([], [])
            # set the file aside when it is the one read at the start (--rescore, another model), or when another
            # model's run wrote it since; one of this model's runs may have replaced it already: merge with that
            aside = bool(on_disk) and bool(self._others(on_disk) or (self.replace_file and
                                                                    self._stat() == self.stat_read))
            if aside:  # kept under a timestamped name by atomic_write, once the new file is written
                header, on_disk = [], []
            self.replace_file = False
            rows = {r["path"]: r for r in on_disk}
            for path, row in self.unsaved.items():
                rows.pop(path, None)
                rows[path] = row
            columns = self.columns + [c for c in header if c not in self.columns]
            check_result_columns(dict.fromkeys(columns))

            def write(tmp: Path) -> None:
                with open(tmp, "w", newline="", encoding="utf-8", errors=PATH_ERRORS) as f:
                    writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(rows.values())
                    f.flush()
                    os.fsync(f.fileno())

            try:
                atomic_write(self.path, write, overwrite=False if aside else None)
            except FileInUseError as exc:  # open in a spreadsheet: the run goes on, in a file of its own
                if exc.kept is None:
                    raise
                print(f"note: {self.path} is held by another program (open in a spreadsheet?): the predictions are "
                      f"saved in {exc.kept} from now on; close that program, then give that file the name "
                      f"{self.path.name}.")
                self.path = exc.kept
        self.rows, self.columns, self.unsaved, self.dirty = rows, columns, {}, 0


def prediction_row(result: dict, model: Classifier, identity: dict, rid: str) -> dict:
    path = Path(result["path"])
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = ""
    score = result.get("score")
    value = f"{score:.6f}" if score is not None and not result["error"] else ""
    column = "anomaly_probability" if model.score_kind == "probability" else "anomaly_score"
    return {"path": str(path), "label": result.get("label", "") if not result["error"] else "", column: value,
            "threshold": f"{model.threshold:.6g}", **identity, "error": result["error"],
            "image_width": result["width"], "image_height": result["height"], "file_bytes": size,
            "file_mtime_ns": mtime, "scored_at": _dt.datetime.now().isoformat(timespec="seconds"), "run_id": rid}
