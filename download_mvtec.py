"""Download one category of MVTec AD (Bergmann et al., CVPR 2019) and extract it safely.

    python download_mvtec.py --category bottle --output ./data/mvtec
    python download_mvtec.py --category bottle --archive ~/Downloads/mvtec_anomaly_detection.tar.xz

The download resumes where an interrupted one stopped, the archive is checked (SHA-256 when known) and
extracted member by member, refusing anything that would land outside the output folder; the category
appears under <output>/<category> only once its layout has been verified.
MVTec AD is distributed under the CC BY-NC-SA 4.0 licence (non-commercial use): https://www.mvtec.com/company/research/datasets/mvtec-ad
"""
from __future__ import annotations

import argparse
import lzma
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import requests
from tqdm.auto import tqdm

from lab_io import (ArgumentParser, FileInUseError, UserError, finite_float, format_table, rename, run_cli,
                    sha256_file)

MAX_RETRIES = 10  # with waits doubling up to MAX_RETRY_WAIT_S: about 6 min of waiting in all
MAX_RETRY_WAIT_S = 60.0
MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
MVTEC_URLS = {  # official per-category archives
    "bottle": f"{_SHARE}/420937370-1629951468/bottle.tar.xz",
    "cable": f"{_SHARE}/420937413-1629951498/cable.tar.xz",
    "capsule": f"{_SHARE}/420937454-1629951595/capsule.tar.xz",
    "carpet": f"{_SHARE}/420937484-1629951672/carpet.tar.xz",
    "grid": f"{_SHARE}/420937487-1629951814/grid.tar.xz",
    "hazelnut": f"{_SHARE}/420937545-1629951845/hazelnut.tar.xz",
    "leather": f"{_SHARE}/420937607-1629951964/leather.tar.xz",
    "metal_nut": f"{_SHARE}/420937637-1629952063/metal_nut.tar.xz",
    "pill": "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download/420938129-1629953099/pill.tar.xz",
    "screw": f"{_SHARE}/420938130-1629953152/screw.tar.xz",
    "tile": f"{_SHARE}/420938133-1629953189/tile.tar.xz",
    "toothbrush": f"{_SHARE}/420938134-1629953256/toothbrush.tar.xz",
    "transistor": f"{_SHARE}/420938166-1629953277/transistor.tar.xz",
    "wood": f"{_SHARE}/420938383-1629953354/wood.tar.xz",
    "zipper": f"{_SHARE}/420938385-1629953449/zipper.tar.xz",
}
MVTEC_CATEGORIES = tuple(MVTEC_URLS)
SHA256: dict[str, str] = {}  # category -> sha256 of its archive; MVTec publishes none: add those you have checked
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_EXTRACT_KW = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


class DownloadError(UserError):
    """The network or the server failed: main() adds how to download the archive by hand."""


class _Incomplete(Exception):
    """The connection stopped before the end of the file: retried, resuming from what was received."""


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------
def download(url: str, dest: str | Path, sha256: str | None = None, retries: int = 3,
             timeout: float | tuple[float, float] = (10.0, 60.0), backoff: float = 2.0) -> Path:
    """Download `url` to `dest` through `dest.part`, then rename it (atomic).

    An existing .part is resumed with an HTTP Range request (from zero if the server ignores Range).
    Network errors, timeouts and HTTP 5xx/429 are retried `retries` times (waits backoff, 2*backoff, ..., at most
    MAX_RETRY_WAIT_S).
    With `sha256`, a mismatching file is deleted. Failures raise DownloadError (one line).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout)
            break
        except requests.HTTPError as exc:
            error = f"HTTP {exc.response.status_code} {exc.response.reason or ''}".strip()
            if exc.response.status_code not in RETRY_STATUS:
                raise DownloadError(f"download of {url} failed: {error}.") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Incomplete) as exc:
            error = _describe(exc)
        if attempt < retries:
            wait = min(backoff * 2 ** attempt, MAX_RETRY_WAIT_S)
            print(f"warning: {error}; retry {attempt + 1}/{retries} in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
    else:
        got = part.stat().st_size if part.exists() else 0
        kept = f" ({got} bytes kept in {part}: run again to resume)" if got else ""
        raise DownloadError(f"download of {url} failed: {error}{kept}.")
    if sha256:
        digest = sha256_file(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {digest}; "
                                f"the file was deleted.")
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout) -> None:
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left to send (the .part is complete) or a stale .part
            if re.search(rf"/{start}$", r.headers.get("Content-Range", "")):
                return
            part.unlink()
            raise _Incomplete("the server refused to resume (HTTP 416), restarting from zero")
        r.raise_for_status()
        if "text/html" in r.headers.get("Content-Type", ""):
            raise DownloadError(f"{url} answered with a web page, not an archive (expired link?).")
        mode = "wb"
        if r.status_code == 206:
            if not re.match(rf"bytes {start}-", r.headers.get("Content-Range", "")):
                part.unlink()
                raise _Incomplete("the server resumed at the wrong offset, restarting from zero")
            mode = "ab"
        elif start:
            print("note: the server does not resume downloads, restarting from zero", file=sys.stderr)
            start = 0
        length = r.headers.get("Content-Length", "")
        total = start + int(length) if length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=part.name[:-len(".part")]) as bar:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise _Incomplete(f"connection closed after {part.stat().st_size} of {total} bytes")


def _describe(exc: Exception) -> str:
    """A short reason for a network error (requests' own messages are several lines of nested causes)."""
    text = str(exc)
    if isinstance(exc, requests.Timeout) or "timed out" in text:
        return "the server did not answer in time (timeout)"
    for needle, reason in (("NameResolution", "DNS lookup failed (no network?)"),
                           ("Name or service not known", "DNS lookup failed (no network?)"),
                           ("getaddrinfo", "DNS lookup failed (no network?)"),
                           ("Connection refused", "connection refused"),
                           ("Network is unreachable", "network unreachable"),
                           ("Connection reset", "connection reset by the server"),
                           ("IncompleteRead", "connection cut before the end of the file"),
                           ("Connection broken", "connection cut before the end of the file")):
        if needle in text:
            return reason
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------
def safe_extract(archive: str | Path, output_dir: str | Path, category: str, replace: bool = False) -> dict[str, int]:
    """Extract `category` from a .tar.xz / .tar.gz / .tar into output_dir/category; return the image counts.

    Accepts a per-category archive and the full mvtec_anomaly_detection.tar.xz (other categories are skipped).
    Any member with an absolute path, '..', a link pointing outside or a device file makes the whole archive
    refused. Files go to a temporary folder inside output_dir, the layout is verified, then the folder is
    renamed into place (an existing one is replaced only with `replace`). Nothing half-done is left behind.
    """
    archive, output_dir = Path(archive), Path(output_dir)
    if not archive.is_file():
        raise UserError(f"archive {archive} not found.")
    target = output_dir / category
    if target.exists() and not replace:
        raise UserError(f"{target} already exists: use --force to replace it.")
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".tmp", dir=output_dir))
    try:
        _extract_category(archive, tmp, category)
        counts = verify_layout(tmp / category, shown=f"the {category} folder of {archive}")
        old = tmp / ".previous"
        if target.exists():
            try:
                rename(target, old, held=target)
            except FileInUseError:  # Windows: a file of it open in an image viewer, a window on the folder
                raise UserError(f"{target} cannot be replaced: another program has it or one of its images open (an "
                                "image viewer, a file explorer window, a running script); close it and run again; "
                                "the category in place is untouched.") from None
        try:
            os.replace(tmp / category, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _extract_category(archive: Path, dest: Path, category: str) -> None:
    tops: set[str] = set()
    selected, root = [0], str(dest.resolve())

    def members(tar):  # streamed: every member is checked, only the category's are extracted
        for m in tar:
            _check_member(m, root)
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            tops.add(parts[0] if parts else ".")
            if parts and parts[0] == category:
                selected[0] += 1
                yield m
            elif len(parts) == 1 and parts[0] in ("license.txt", "readme.txt") and m.isfile():
                m.name = f"{category}/{parts[0]}"  # keep the licence with the data
                yield m

    try:
        with open(archive, "rb") as raw, \
                tqdm.wrapattr(raw, "read", total=archive.stat().st_size, desc=f"extract {category}", unit="B",
                              unit_scale=True, unit_divisor=1024) as f, \
                tarfile.open(fileobj=f, mode="r|*") as tar:
            tar.errorlevel = 2
            tar.extractall(dest, members=members(tar), **_EXTRACT_KW)
    except _FILTER_ERROR as exc:
        raise UserError(f"unsafe archive {archive}: {exc}; nothing was extracted.") from None
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError) as exc:
        raise UserError(f"{archive} is not a valid or complete .tar.xz/.tar.gz/.tar archive ({exc}); "
                        f"delete it and download it again.") from None
    except OSError as exc:
        raise UserError(f"extraction of {archive} into {dest.parent} failed: {exc}") from None
    if not selected[0]:
        found = ", ".join(sorted(tops)[:8]) or "nothing"
        raise UserError(f"{archive} has no '{category}/' folder at its top level (found: {found}).")


def _check_member(m: tarfile.TarInfo, root: str) -> None:
    """Refuse a member that would write outside `root` (absolute path, '..', link outside, device file)."""
    def inside(path: str) -> bool:
        path = os.path.normpath(path)
        return path == root or path.startswith(root + os.sep)

    name, why = m.name, None
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"[A-Za-z]:", name):
        why = "has an absolute path"
    elif ".." in re.split(r"[\\/]", name):
        why = "contains '..'"
    elif not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        why = "is a device or special file"
    elif not inside(os.path.join(root, name)):
        why = "lands outside the output folder"
    elif m.issym() and (os.path.isabs(m.linkname) or not inside(os.path.join(root, os.path.dirname(name), m.linkname))):
        why = f"is a symlink pointing outside ({m.linkname})"
    elif m.islnk() and (os.path.isabs(m.linkname) or not inside(os.path.join(root, m.linkname))):
        why = f"is a hard link pointing outside ({m.linkname})"
    if why:
        raise UserError(f"unsafe archive: member {name!r} {why}; nothing was extracted.")


def verify_layout(category_dir: str | Path, shown: str | None = None) -> dict[str, int]:
    """Check train/good, test/good, test/<defect>, ground_truth/ and count the PNG images of each folder."""
    d = Path(category_dir)
    defects = sorted(p.name for p in (d / "test").iterdir() if p.is_dir() and p.name != "good") \
        if (d / "test").is_dir() else []
    missing = [sub for sub in ("train/good", "test/good", "ground_truth") if not (d / sub).is_dir()]
    missing += [] if defects else ["test/<defect type>"]
    if missing:
        raise UserError(f"{shown or d} is not a complete MVTec AD category: missing {', '.join(missing)}.")
    folders = ["train/good", "test/good"] + [f"test/{x}" for x in defects] + \
        sorted(f"ground_truth/{p.name}" for p in (d / "ground_truth").iterdir() if p.is_dir())
    counts = {sub: sum(1 for _ in (d / sub).glob("*.png")) for sub in folders}
    if not counts["train/good"] or not counts["test/good"]:
        raise UserError(f"{shown or d} is not a complete MVTec AD category: train/good or test/good has no PNG image.")
    return counts


def print_counts(counts: dict[str, int]) -> None:
    rows = [{"folder": k, "images": v} for k, v in counts.items()]
    print(format_table(rows + [{"folder": "total", "images": sum(counts.values())}], ["folder", "images"]), end="")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def manual_hint(category: str, output: Path) -> str:
    return (f"To download by hand: get {category}.tar.xz (or the full mvtec_anomaly_detection.tar.xz) from "
            f"{MVTEC_PAGE} (licence CC BY-NC-SA 4.0, non-commercial use), then run: python download_mvtec.py "
            f"--category {category} --output {output} --archive PATH/TO/{category}.tar.xz")


def _suffix(url: str) -> str:
    name = url.split("?")[0].rstrip("/").lower()
    return next((s for s in (".tar.xz", ".tar.gz", ".tgz", ".tar") if name.endswith(s)), ".tar.xz")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Download and safely extract one MVTec AD category "
                                   f"(licence CC BY-NC-SA 4.0, {MVTEC_PAGE}).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--category", default="bottle", help=f"MVTec AD category: {', '.join(MVTEC_CATEGORIES)}")
    p.add_argument("--output", default="./data/mvtec", help="folder that receives <category>/ (train, test, ground_truth)")
    p.add_argument("--url", default=None, help="download from this URL instead of the category's official link")
    p.add_argument("--archive", default=None, help="extract this archive downloaded by hand instead of downloading: "
                                                   "<category>.tar.xz or the full mvtec_anomaly_detection.tar.xz")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (a mismatching download is deleted)")
    p.add_argument("--force", action="store_true", help="download and extract again even if the category is there "
                                                        "(the old folder is replaced once the new one is verified)")
    p.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive (deleted after extraction "
                                                               "by default; an --archive file is never deleted)")
    p.add_argument("--retries", type=int, default=3,
                   help=f"retries after a network error, with exponential backoff (0 to {MAX_RETRIES})")
    p.add_argument("--timeout", type=finite_float, default=60.0,
                   help="seconds to wait for the server (connection: at most 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    category = args.category.strip().lower().replace("-", "_")
    if category not in MVTEC_URLS:
        raise UserError(f"unknown --category {args.category!r}: MVTec AD has {', '.join(MVTEC_CATEGORIES)}.")
    sha = (args.sha256 or SHA256.get(category) or "").strip().lower() or None
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise UserError("--sha256 must be 64 hexadecimal characters.")
    if not 0 <= args.retries <= MAX_RETRIES or args.timeout <= 0:
        raise UserError(f"--retries must be between 0 and {MAX_RETRIES}, and --timeout > 0.")
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder.")
    target = output / category
    if target.exists() and not args.force:
        try:
            counts = verify_layout(target)
        except UserError as exc:
            raise UserError(f"{exc} Use --force to replace it.") from None
        print(f"{target} is already there (use --force to download it again):")
        print_counts(counts)
        return 0

    if args.archive:  # the manual route: never delete the user's file
        archive = Path(args.archive).expanduser()
        if not archive.is_file():
            raise UserError(f"--archive {archive} not found. {manual_hint(category, output)}")
        if sha and sha256_file(archive) != sha:
            raise UserError(f"checksum mismatch: {archive} does not have sha256 {sha}.")
        counts = safe_extract(archive, output, category, replace=args.force)
    else:
        url = args.url or MVTEC_URLS[category]
        archive = output / f"{category}{_suffix(url)}"
        if archive.exists() and not args.force and (not sha or sha256_file(archive) == sha):
            print(f"reusing {archive} (use --force to download it again)")
        else:
            print(f"downloading {category} from {url}")
            try:
                download(url, archive, sha, retries=args.retries, timeout=(min(10.0, args.timeout), args.timeout))
            except DownloadError as exc:
                raise UserError(f"{exc} {manual_hint(category, output)}") from None
        try:
            counts = safe_extract(archive, output, category, replace=args.force)
        finally:
            if not args.keep_archive:
                archive.unlink(missing_ok=True)
    print(f"{category} is ready in {target}:")
    print_counts(counts)
    return 0


if __name__ == "__main__":
    run_cli(main)
