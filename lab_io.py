"""Plain input/output of the lab, without torch: errors, the CLI wrapper and its argument parser, files written
atomically and never lost, CSV rows (locked: concurrent runs keep every row), printed tables, file hashes, the
machine's description and the timed loop of every benchmark.

The serving and client side (score.py, load_test.py, deploy_azure.py, predict.py) stands on this module and
inference.py only, so that it starts in well under a second and needs no PyTorch.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import errno
import hashlib
import io
import math
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

# x86 instruction sets that decide which CPU kernels run fast (int8 dot products, bf16 matmuls)
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


# --------------------------------------------------------------------------------------------------
# Errors and the command-line wrapper
# --------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem the user can fix (bad input, missing file, no GPU...): shown as one line, exit code 2."""


class DiskFullError(UserError):
    """A write failed because its disk is full (one line, exit code 2, like any UserError)."""


class FileInUseError(UserError):
    """An output could not be renamed or replaced: another program holds it open (Windows refuses to rename or
    replace such a file: a CSV open in a spreadsheet, the weights of a model being served) or it is read-only.
    `kept`: where the new content went instead, if anywhere."""

    def __init__(self, message: str, kept: Path | None = None):
        super().__init__(message)
        self.kept = kept


def entry_script_only(usage: str, argv: list[str] | None = None) -> None:
    """`python score.py`: an Azure ML entry script is called by a server (init() / run()), not run as a command. Says
    how to use it, in one line: on stdout with exit 0 for -h / --help, else as an error with exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        sys.exit(0)
    print(f"error: {usage}", file=sys.stderr)
    sys.exit(2)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main(): user errors become one clear line and a non-zero exit, never a traceback.

    Set TP4_DEBUG=1 to see the full traceback of unexpected errors.
    """
    for stream in (sys.stdout, sys.stderr):
        # a name the console cannot encode (non-UTF-8 bytes on Linux, CJK in a cp1252 log on Windows) prints escaped
        # instead of ending the run
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = main()
    except UserError as exc:
        _end_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted by the user (Ctrl+C); nothing was overwritten.", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, the traceback on request
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, named so torch stays optional
            print("error: the GPU ran out of memory: lower --batch-size.", file=sys.stderr)
            sys.exit(2)
        if os.environ.get("TP4_DEBUG"):
            raise
        _end_progress_bars()
        disk_full = disk_full_message(exc)
        if disk_full:
            print(f"error: {disk_full}", file=sys.stderr)
            sys.exit(2)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: unexpected {type(exc).__name__}: {msg} (set TP4_DEBUG=1 to see the traceback)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def _end_progress_bars() -> None:
    """An error raised inside a tqdm loop leaves its bar on the current line of stderr: close the bars and end that
    line, so that the error starts a line of its own (in a terminal and in a log file)."""
    tqdm_module = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", None) or [])
    for bar in bars:
        bar.close()
    if bars:
        print(file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the lab's one-line errors: a bad argument raises UserError, which run_cli prints as
    "error: --num-threads must be >= 1, not 0" with exit code 2, like every other user error (--help shows usage)."""

    def error(self, message):
        # argparse words it "argument --num-threads: must be ...": drop the prefix, as the scripts' own checks read
        raise UserError(re.sub(r"^argument (\S+): ", r"\1 ", message))


def positive_int(text: str) -> int:
    """argparse type of every count that must be >= 1 (--num-threads, --batch-size, --runs...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type of every real-valued option (--lr, prices, timeouts, fractions): nan and inf are refused here,
    since every range check after it (`x <= 0`) is False for nan."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def output_file(text: str) -> str:
    """argparse type of a file to write (--output, --report, --figure...): a folder of that name is refused at once,
    before any work, and never set aside in place of the file."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the file to write, e.g. {Path(text) / 'name'}")
    _OUTPUT_FOLDERS.add(Path(text).parent)
    return text


def output_dir(text: str) -> str:
    """argparse type of a folder the script writes in (--models-dir, --results-dir): a file of that name, or a folder
    this user may not write in, is refused at once, not after the training whose results would go there."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {existing}: choose a folder you may write in")
    _OUTPUT_FOLDERS.add(path)
    return text


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, never lose an earlier result
# --------------------------------------------------------------------------------------------------
def is_fresh(path: str | Path, *sources: str | Path) -> bool:
    """`path` exists and is newer than every source it was made from (reuse it with --resume)."""
    path = Path(path)
    return path.is_file() and all(path.stat().st_mtime >= Path(s).stat().st_mtime for s in sources
                                  if Path(s).is_file())


def keep_previous(path: str | Path, overwrite: bool = False, stamp: str | None = None) -> Path | None:
    """If `path` exists, rename it to `<stem>.<its mtime>.<suffix>` (or `<stem>.<stamp>.<suffix>`, to keep files that
    go together under one name) and say so (unless overwrite=True).

    Called before writing an output, so that a result produced earlier is never silently lost.
    Returns the backup path, or None.
    """
    path = Path(path)
    if path.is_dir():  # a whole folder is never set aside (and then replaced by one file)
        raise UserError(f"{path} is a folder, not the file to write: give a file name")
    if not path.exists() or overwrite:
        return None
    stamp = stamp or _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    backup = _free_name(path, stamp)
    rename(path, backup, held=path)
    print(f"note: previous {path} kept as {backup.name}")
    return backup


def _free_name(path: Path, stamp: str) -> Path:
    """`<stem>.<stamp><suffix>` beside `path`, with -1, -2... until no file has that name."""
    name, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while name.exists():
        name, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    return name


RENAME_RETRY_S = (0.05, 0.1, 0.2, 0.4, 0.8)  # Windows: a virus scanner or an indexer may hold a new file a moment


def in_use_message(path: str | Path, kept: str | Path | None = None) -> str:
    kept_note = f" The new file is kept as {kept}." if kept else ""
    return (f"{path} cannot be replaced: another program holds it open (a spreadsheet or an image viewer, a running "
            f"azmlinfsrv or predict.py) or it is read-only.{kept_note} Close that program and run again, or write "
            "elsewhere (--models-dir, --results-dir).")


def rename(src: str | Path, dst: str | Path, held: str | Path | None = None) -> None:
    """os.replace(src, dst), tried again for about 1.5 s while the system refuses it (PermissionError: on Windows a
    file that another program holds open cannot be renamed, nor replaced); then FileInUseError naming `held`, the
    file in the way (default: dst)."""
    for delay in (*RENAME_RETRY_S, None):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if delay is None:
                raise FileInUseError(in_use_message(held or dst)) from None
            time.sleep(delay)


def check_replaceable(*paths: str | Path) -> None:
    """FileInUseError if one of `paths` (those that exist) cannot be renamed, found by renaming it and back: checked
    before replacing files that go together (a model, its weights, its sidecar), so that none of them is replaced
    when another one is held."""
    for path in map(Path, paths):
        if path.is_file():
            probe = path.with_name(f".{path.name}.{secrets.token_hex(4)}.probe")
            rename(path, probe, held=path)
            rename(probe, path, held=path)


def atomic_write(path: str | Path, writer: Callable[[Path], None], overwrite: bool | None = None) -> Path:
    """Call writer(tmp_path) on a temporary file next to `path`, then rename it over `path`.

    A crash, a full disk or Ctrl+C never leaves a half-written output behind. overwrite=False: an existing `path` is
    kept under a timestamped name (keep_previous), once the new file is complete, so a failed write never takes its
    name away; True or None: replaced. A write that fails because the disk is full is one DiskFullError; a `path`
    that another program holds (see rename) is one FileInUseError, the new file kept as `<stem>.unsaved.<time>`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _OUTPUT_FOLDERS.add(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            writer(tmp_path)
        except Exception as exc:  # noqa: BLE001 - a full disk, whatever the library calls it; else re-raised
            message = disk_full_message(exc, path)
            if message:
                raise DiskFullError(message) from None
            raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        try:
            if overwrite is not None:
                keep_previous(path, overwrite)
            rename(tmp_path, path)
        except FileInUseError:  # the new content is not lost: it goes under a name of its own
            kept = _free_name(path, f"unsaved.{_dt.datetime.now():%Y%m%d-%H%M%S}")
            with contextlib.suppress(OSError):
                os.replace(tmp_path, kept)
            kept = kept if kept.exists() else None
            raise FileInUseError(in_use_message(path, kept), kept) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


@contextlib.contextmanager
def working_folder(parent: str | Path, prefix: str):
    """A temporary folder in `parent` (the outputs' disk: a finished file is moved in by a rename), removed at the
    end. A failure inside it while the disk is full is one DiskFullError naming `parent`: checked before the folder
    is removed and frees the space, since libraries writing there (torch.onnx, onnx shape inference, OpenVINO) may
    leave a cut file that the next step fails to parse. A folder that cannot be removed (Windows: a library still holds
    one of its files open) does not fail the run: a note says where it stays."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        yield tmp
    except Exception as exc:  # noqa: BLE001 - a full disk, whatever the library calls it; else re-raised
        if isinstance(exc, UserError) and not isinstance(exc, DiskFullError):
            raise
        message = disk_full_message(exc, folder=parent)
        if message:
            raise DiskFullError(message) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tmp.exists():
        print(f"note: the working folder {tmp} could not be removed (a file in it is still open): delete it once "
              "this run is over")


# A write that fails with less than this left on its disk failed because the disk is full: torch.save and OpenVINO
# say it in their own words ("unexpected pos", "iostream error"), without errno.
DISK_FULL_BYTES = 1 << 20
_OUTPUT_FOLDERS: set[Path] = set()  # the folders this run writes in (output_dir, output_file, atomic_write)


def disk_full_message(exc: BaseException, target: str | Path | None = None,
                      folder: str | Path | None = None) -> str | None:
    """One line for a failure caused by a full disk (errno ENOSPC / EDQUOT in the exception's chain, or less than
    DISK_FULL_BYTES free on a disk this run writes in), None for any other failure. `target`: the file being written,
    or `folder`: where the working files were written, when known."""
    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    no_space = [e for e in chain if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)]
    where = Path(folder) if folder is not None else Path(target).parent if target is not None else None
    folders = ([where] if where is not None else []) + [Path(e.filename).parent for e in no_space if e.filename] \
        + sorted(_OUTPUT_FOLDERS) + [Path(".")]
    full = next((f for f in folders if _free_bytes(f) < DISK_FULL_BYTES), None)
    if full is None and not no_space:
        return None
    shown = where if where is not None else full
    what = (f"{target} was not written" if target is not None else
            f"a working file in {folder} was not written" if folder is not None else "an output could not be written")
    return (f"{f'the disk of {shown}' if shown is not None else 'the disk'} is full: {what} (earlier results are "
            f"untouched). Free some space (older timestamped copies in modeles/ and resultats/ can go) or write "
            f"elsewhere (--models-dir, --results-dir).")


def _free_bytes(folder: Path) -> float:
    """Free bytes on the disk of `folder` (or of its nearest existing parent); infinite when it cannot be read."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return math.inf


def atomic_write_text(path: str | Path, text: str, overwrite: bool | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite)


def save_figure(fig, path: str | Path, overwrite: bool = False) -> Path:
    """Save a matplotlib figure atomically as PNG, keeping an earlier file of the same name."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"), overwrite)


CSV_LOCK_TIMEOUT_S = 60.0  # a writer holds a CSV's lock for one read-merge-replace (milliseconds): longer = stuck


def lock_file(path: str | Path) -> Path:
    """The lock file of the CSV `path`: hidden, so that resultats/ shows the results only."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def csv_lock(path: str | Path, timeout: float | None = None):
    """Hold `.<name>.lock` (hidden, beside the CSV `path`) around a read-merge-replace of the CSV, so that runs writing
    to one CSV at the same time never drop each other's rows. A separate lock file, not the CSV itself: the CSV is
    replaced by a rename (atomic_write), which Windows refuses on a locked file. An OS lock (filelock), released when
    the process dies; the empty file stays."""
    from filelock import FileLock, Timeout

    lock_path = lock_file(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    timeout = CSV_LOCK_TIMEOUT_S if timeout is None else timeout
    lock = FileLock(lock_path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{lock_path} was held by another process for more than {timeout:g} s (a run writing to "
                        f"{Path(path).name}): wait for it to finish or stop it, then run again.") from None
    try:
        yield
    finally:
        lock.release()


def append_csv_rows(path: str | Path, rows: Iterable[dict]) -> Path:
    """Append result rows to a CSV (header = union of the columns seen so far); earlier rows are kept, also those
    another process appends at the same time (csv_lock). A file that cannot be extended as it is (saved again by
    a spreadsheet: ';' separators, a cell too many, another encoding) is kept under a timestamped name, and the rows
    start a new file. A CSV that cannot be replaced (held open by a spreadsheet on Windows) stays as it is: the rows,
    its own and the new ones, go to `<stem>.unsaved.<time>.csv`, said in a note, and that path is returned.

    Every column must be one of lab_targets.RESULT_COLUMNS (one schema: names, units, signs, for every CSV)."""
    from lab_targets import check_result_columns

    path = Path(path)
    rows = list(rows)
    for row in rows:
        check_result_columns(row)
    with csv_lock(path):
        columns, old_rows, foreign = [], [], False
        if path.exists():
            try:
                columns, old_rows = _read_results_csv(path)
            except UserError as exc:
                print(f"note: {exc}; it is kept aside and a new file is started")
                foreign = True
        for row in rows:
            columns += [k for k in row if k not in columns]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows(old_rows)
                writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)

        try:
            return atomic_write(path, write, overwrite=False if foreign else None)  # False: kept aside, once written
        except FileInUseError as exc:  # a CSV open in a spreadsheet must not stop a run of many minutes
            if exc.kept is None:
                raise
            print(f"note: {path} is held by another program (open in a spreadsheet?): the rows were written to "
                  f"{exc.kept} instead; close that program, then give that file the name {path.name}.")
            return exc.kept


def _read_results_csv(path: Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a results CSV as this lab writes it; UserError saying what is wrong otherwise. A BOM (a
    spreadsheet's "CSV UTF-8") is read through."""
    from lab_targets import RESULT_COLUMNS

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns, rows = list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a CSV written by this lab ({type(exc).__name__}: {exc})") from None
    unknown = [c for c in columns if c not in RESULT_COLUMNS]
    if unknown:
        raise UserError(f"{path} has columns this lab does not write ({unknown[0][:60]!r}...): it was changed, "
                        "e.g. saved by a spreadsheet with ';' separators")
    if any(None in r for r in rows):
        raise UserError(f"{path} has rows with more cells than its header: it was changed by hand")
    return columns, rows


def read_csv_rows(path: str | Path, run_id_: str | None = None) -> list[dict]:
    """The rows of a results CSV as strings (those of one run when run_id_ is given); UserError if it is not one."""
    return [r for r in _read_results_csv(Path(path))[1] if run_id_ is None or r.get("run_id") == run_id_]


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return value


def json_safe(value):
    """NaN (e.g. AUROC with one class) is not valid JSON: null; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def size_on_disk_mb(path: str | Path) -> float:
    """Bytes on disk / 10^6 (a file, or every file of a folder)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return path.stat().st_size / 1e6


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read by 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_id() -> str:
    """Identifies the rows one run appends to a CSV: its start time (sortable) and 6 random hex digits, so that two
    runs started in the same second do not merge in a report."""
    return f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------
def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.readlines()
    except OSError:
        return []


def cpu_name() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The instruction sets of CPU_FLAGS_OF_INTEREST this CPU has, e.g. 'avx2 avx512f avx512_vnni' ('' = unknown)."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return " ".join(f for f in CPU_FLAGS_OF_INTEREST if f in have)
    return ""


def cpu_has_bf16() -> bool:
    """bf16 matrix products in hardware (AVX-512 BF16 or AMX): where bf16 variants can be faster, not emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


def physical_cores() -> int | None:
    """Physical cores (what ONNX Runtime uses by default for intra-op threads); None when it cannot be read."""
    cores, phys = set(), "0"
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    if cores:
        return len(cores)
    try:
        import psutil  # not a requirement: used when present (Windows, macOS)

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def library_versions() -> dict:
    """Versions that matter for the measurements (recorded in checkpoints, CSVs and the report)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "torchvision", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------------------------------
# The timed loop (in the spirit of timm's benchmark.py) and printed tables
# --------------------------------------------------------------------------------------------------
BENCH_ROUNDS = 3  # timed runs split into rounds, every variant in each: a slow spell of the machine hits all alike
# untimed calls each time the rounds switch to another variant: its first call after another engine ran was measured
# up to 1.7x its steady latency (caches, the other engine's threads), a cost a model that runs alone never pays
BENCH_SWITCH_WARMUP = 1


def benchmark(run_batch: Callable[[], object], *, batch_size: int, device: str = "cpu", threads: int | None = None,
              sync: Callable[[], None] | None = None, warmup: int = 5, runs: int = 30,
              max_seconds: float | None = 60.0, desc: str = "benchmark") -> dict:
    """Time `run_batch()` (one forward pass on a fixed batch): warm-up, then timed runs.

    `sync()` is called after every run so that asynchronous GPU work is counted. Timed runs stop early after
    `max_seconds` (never fewer than 5). Returns the latency columns in ms per batch (latency_columns), images per
    second (batch_size / median latency), and the settings used."""
    job = {"run": run_batch, "batch_size": batch_size, "device": device, "threads": threads, "sync": sync}
    return benchmark_rounds({desc: job}, warmup=warmup, runs=runs, max_seconds=max_seconds, rounds=1, desc=desc)[desc]


def benchmark_rounds(jobs: dict[str, dict], *, warmup: int = 5, runs: int = 30, max_seconds: float | None = 60.0,
                     rounds: int = BENCH_ROUNDS, desc: str = "timing") -> dict[str, dict]:
    """Time several variants against each other: each job (run, batch_size, device, threads, sync: the arguments of
    benchmark) is warmed up, then its `runs` timed runs are split into `rounds`, and every round times every job in
    turn. A machine that slows down for a while (another task, frequency) then slows every variant alike, instead of
    the one whose block it hit: the speed-up ratios are what the targets and the recommendation read. With several
    jobs, each one's share of a round starts with BENCH_SWITCH_WARMUP untimed calls. A job stops after `max_seconds`
    of timed runs in all, shared out over the rounds (never fewer than 5 runs). Returns {name: what benchmark
    returns}."""
    from tqdm.auto import tqdm

    rounds = max(1, min(rounds, runs))
    rewarm = BENCH_SWITCH_WARMUP if len(jobs) > 1 else 0
    times: dict[str, list[float]] = {name: [] for name in jobs}
    spent = dict.fromkeys(jobs, 0.0)
    with tqdm(total=len(jobs) * (warmup + runs + rounds * rewarm), desc=desc, leave=False) as bar:
        for job in jobs.values():
            for _ in range(warmup):
                job["run"]()
                bar.update()
            (job.get("sync") or (lambda: None))()
        for r in range(rounds):
            for name, job in jobs.items():
                sync = job.get("sync") or (lambda: None)
                share = runs * (r + 1) // rounds - runs * r // rounds
                # the time budget too is shared out round by round
                min_runs, budget = math.ceil(5 * (r + 1) / rounds), (max_seconds or 0) * (r + 1) / rounds
                if share and not _out_of_time(len(times[name]), spent[name], min_runs, budget, max_seconds):
                    for _ in range(rewarm):
                        job["run"]()
                    bar.update(rewarm)
                    sync()
                for _ in range(share):
                    if _out_of_time(len(times[name]), spent[name], min_runs, budget, max_seconds):
                        break
                    t0 = time.perf_counter()
                    job["run"]()
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1000.0)
                    spent[name] += times[name][-1] / 1000.0
                    bar.update()
    return {name: _bench_result(times[name], job, warmup, rounds) for name, job in jobs.items()}


def _out_of_time(n_timed: int, spent_s: float, min_runs: int, budget_s: float, max_seconds: float | None) -> bool:
    return max_seconds is not None and n_timed >= min_runs and spent_s > budget_s


def _bench_result(times: list[float], job: dict, warmup: int, rounds: int) -> dict:
    stats = latency_columns(times)
    return {"batch_size": job["batch_size"], "runs": len(times), "warmup": warmup, "rounds": rounds,
            "device": job.get("device", "cpu"), "threads": job.get("threads"), **stats,
            "throughput_img_s": job["batch_size"] * 1000.0 / stats["latency_median_ms"]}


P99_MIN_RUNS = 100  # with fewer timed runs a 99th percentile is the slowest one: latency_max_ms says so


def latency_columns(ms) -> dict:
    """Median, p95, p99, mean and max of timed calls in ms (the latency columns of every CSV); p99 is None under
    P99_MIN_RUNS calls, where it would only be the maximum."""
    import numpy as np

    ms = np.asarray(ms, dtype=float)
    if not len(ms):
        return dict.fromkeys(("latency_median_ms", "latency_p95_ms", "latency_p99_ms", "latency_mean_ms",
                              "latency_max_ms"), float("nan"))
    return {"latency_median_ms": float(np.median(ms)), "latency_p95_ms": float(np.percentile(ms, 95)),
            "latency_p99_ms": float(np.percentile(ms, 99)) if len(ms) >= P99_MIN_RUNS else None,
            "latency_mean_ms": float(ms.mean()), "latency_max_ms": float(ms.max())}


def format_table(rows: list[dict], columns: list[str], floatfmt: str = ".4g") -> str:
    """A plain-text table for the summaries the scripts print."""
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else format(v, floatfmt)
        return "n/a" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    buf = io.StringIO()
    buf.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "\n")
    buf.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        buf.write("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "\n")
    return buf.getvalue()


def environment_columns() -> dict:
    """The machine and library versions, as result-row columns (the same in every CSV)."""
    versions = library_versions()
    return {"cpu_name": cpu_name(), "cpu_flags": cpu_flags(), "cpu_cores": physical_cores() or "",
            "cpu_logical": os.cpu_count() or "", "torch_version": versions["torch"],
            "transformers_version": versions["transformers"], "onnx_version": versions["onnx"],
            "onnxruntime_version": versions["onnxruntime"], "python_version": versions["python"]}
