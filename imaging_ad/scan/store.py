"""Append-only scan results that survive being killed at any moment, and resume from where they stopped.

``results.jsonl`` is the source of truth: one JSON object per line, appended per batch and flushed with
``fsync`` before the scan moves on, so a ``SIGKILL`` can lose at most the batch in flight and tear at
most the last line. ``results.csv`` is a convenience copy, appended alongside while the scan runs (so it
can be watched) and rebuilt from the JSONL whenever the store opens or finishes, so a kill between the
two writes never leaves them disagreeing for longer than that.

A file counts as done when a row holds its relative path with the same size and ``mtime_ns``; the
settings that give rows their meaning (model fingerprint, input folder, threshold, heatmap mode) live in
``scan.json``, and a change of any of them moves the earlier results aside instead of mixing them in.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imaging_ad.io.safe_text import csv_cell

log = logging.getLogger("imaging_ad.scan")

MANIFEST_NAME = "scan.json"
JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"
HEATMAP_DIR = "heatmaps"
INVALIDATED_DIR = "invalidated"
LOCK_NAME = ".scan.lock"
SCAN_FORMAT = "imaging_ad.scan"
SCAN_FORMAT_VERSION = 1
# file names that are not valid UTF-8 (possible on Linux) are written back as their original bytes
_FS_ERRORS = "surrogateescape"

#: columns of both results files, in order
FIELDS = (
    "path",
    "score",
    "normalized_score",
    "is_anomaly",
    "threshold",
    "domain_score",  # the out-of-domain guard's distance over its threshold (above 1: unlike training)
    "out_of_domain",  # why the image is unlike the training images; empty when it is not: then the
    # score and verdict mean something
    "heatmap",
    "width",
    "height",
    "error",
    "error_code",
    "size",
    "mtime_ns",
)


class StoreLockedError(RuntimeError):
    """Another scan holds the output folder."""


class OutputWriteError(OSError):
    """An output file of the scan could not be written (disk full, no permission, ...). Names the file;
    whatever was half-written has been removed, and the rows written before are kept, so running the
    same scan again resumes."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))

    def __str__(self) -> str:
        advice = (
            "free some space (or choose another --out) and run the same command again to resume"
            if self.errno in (errno.ENOSPC, errno.EDQUOT)
            else "fix that and run the same command again to resume"
        )
        return f"{self.filename}: cannot be written ({self.strerror}); finished rows are kept: {advice}"


@contextmanager
def writing(path: str | os.PathLike, remove_on_failure: bool = True) -> Iterator[None]:
    """Around writing ``path``: a failure becomes an :class:`OutputWriteError` naming it, and the file
    (created or replaced by this write) is removed, so no 0-byte or half file is left behind."""
    try:
        yield
    except OSError as exc:
        if remove_on_failure:
            with suppress(OSError):
                Path(path).unlink(missing_ok=True)
        if isinstance(exc, OutputWriteError):  # named already, by an inner write
            raise
        raise OutputWriteError(path, exc) from exc


@dataclass(frozen=True)
class ScanSettings:
    """What gives a row its meaning: rows written under other settings are not comparable."""

    model_fingerprint: str
    input_dir: str
    threshold: float
    heatmaps: str

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Human-readable list of what changed from the settings stored in ``other``."""
        changes = []
        for key, value in asdict(self).items():
            old = other.get(key)
            same = (
                math.isclose(float(old), float(value), rel_tol=1e-12, abs_tol=0.0)
                if key == "threshold" and isinstance(old, (int, float))
                else old == value
            )
            if not same:
                label = key.replace("_", " ")
                if key == "model_fingerprint":
                    changes.append(f"the model changed (fingerprint {str(old)[:12]}… → {value[:12]}…)")
                else:
                    changes.append(f"the {label} changed ({old!r} → {value!r})")
        return changes


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where a row lives in the JSONL, and the file state it was computed for."""

    offset: int
    length: int
    size: int
    mtime_ns: int


class ResultStore:
    """The results of one output folder: open (validate, repair, resume), append batches, finalize.

    Not thread-safe: one thread appends (the scan's writer thread).
    """

    def __init__(self, out_dir: str | os.PathLike, settings: ScanSettings) -> None:
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.jsonl_path = self.out_dir / JSONL_NAME
        self.csv_path = self.out_dir / CSV_NAME
        self.manifest_path = self.out_dir / MANIFEST_NAME
        self.heatmap_dir = self.out_dir / HEATMAP_DIR
        self.warnings: list[str] = []
        self.invalidated = False
        self.invalidated_rows = 0
        self._index: dict[str, _Entry] = {}
        self._lock_handle: io.BufferedWriter | None = None
        self._jsonl: io.FileIO | None = None
        self._csv: io.TextIOWrapper | None = None
        self._csv_writer: csv.DictWriter | None = None

    # -- opening --------------------------------------------------------------------------------

    def open(self) -> ResultStore:
        """Check the stored settings, move incompatible results aside, repair a torn tail, load the index."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        for leftover in self.out_dir.glob("*.partial"):  # an atomic rewrite killed half-way
            leftover.unlink()
        stored = self._read_manifest()
        has_results = self.jsonl_path.exists() or self.csv_path.exists() or self.heatmap_dir.exists()
        if has_results:
            if stored is None:
                self._invalidate(["no readable scan.json says how the existing results were made"])
            else:
                changes = self.settings.differences(stored.get("settings", {}))
                if stored.get("format_version") != SCAN_FORMAT_VERSION:
                    changes.insert(0, f"results format version {stored.get('format_version')!r}")
                if changes:
                    self._invalidate(changes)
        self._write_manifest(None if self.invalidated or not has_results else stored)
        if self.jsonl_path.exists():
            self._compact(keep=None)  # drops a torn last line and duplicates; rebuilds the CSV
        # unbuffered: a failed append can be cut back to the last whole row (see append)
        with writing(self.jsonl_path, remove_on_failure=False):
            self._jsonl = open(self.jsonl_path, "ab", buffering=0)  # noqa: SIM115  (held open for the whole scan)
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with writing(self.csv_path, remove_on_failure=False):
            self._csv = open(self.csv_path, "a", newline="", encoding="utf-8", errors=_FS_ERRORS)  # noqa: SIM115
            self._csv_writer = csv.DictWriter(self._csv, fieldnames=FIELDS, extrasaction="ignore")
            if new_csv:
                self._csv_writer.writeheader()
                self._csv.flush()
        return self

    def _lock(self) -> None:
        """One scan per output folder at a time. The OS drops the lock when the process dies, so a
        killed scan never leaves a stale lock behind (no lock on platforms without ``fcntl``)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows)
            return
        handle = open(self.out_dir / LOCK_NAME, "ab")  # noqa: SIM115  (held until close())
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise StoreLockedError(
                f"{self.out_dir}: another scan is writing to this output folder; wait for it or use another --out"
            ) from exc
        self._lock_handle = handle

    def _read_manifest(self) -> dict | None:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("format") == SCAN_FORMAT else None

    def _write_manifest(self, previous: dict | None) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "format": SCAN_FORMAT,
            "format_version": SCAN_FORMAT_VERSION,
            "settings": asdict(self.settings),
            "created": (previous or {}).get("created", now),
            "last_run": now,
        }
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2).encode())

    def _invalidate(self, reasons: list[str]) -> None:
        """Move the earlier results (rows, CSV, overlays, manifest) into ``invalidated/<time>/``."""
        n_rows = _count_lines(self.jsonl_path)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.out_dir / INVALIDATED_DIR / stamp
        target.mkdir(parents=True, exist_ok=True)
        for path in (self.jsonl_path, self.csv_path, self.heatmap_dir, self.manifest_path):
            if path.exists():
                shutil.move(str(path), str(target / path.name))
        _fsync_dir(self.out_dir)
        self.invalidated = True
        self.invalidated_rows = n_rows
        message = (
            f"{self.out_dir}: {'; '.join(reasons)}. The {n_rows} earlier result row(s) no longer apply and "
            f"were moved to {target}; every file will be scanned again."
        )
        self.warnings.append(message)
        log.warning(message)

    # -- resume ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, relpath: str) -> bool:
        return relpath in self._index

    def is_done(self, relpath: str, size: int, mtime_ns: int) -> bool:
        """True when a row exists for this file as it is now (same size and modification time)."""
        entry = self._index.get(relpath)
        return entry is not None and entry.size == size and entry.mtime_ns == mtime_ns

    # -- appending ------------------------------------------------------------------------------

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows durably: JSONL first (flush + fsync), then the CSV copy."""
        if self._jsonl is None or self._csv is None:
            raise RuntimeError("ResultStore.open() must be called before append()")
        rows = [_normalise_row(row) for row in rows]
        if not rows:
            return
        # ASCII JSON: file names that are not valid UTF-8 survive as \\udcXX escapes; strict JSON (no NaN)
        lines = [(json.dumps(row, allow_nan=False) + "\n").encode("ascii") for row in rows]
        offset = self._jsonl.tell()
        try:
            _write_all(self._jsonl.fileno(), b"".join(lines))
            os.fsync(self._jsonl.fileno())
        except OSError as exc:
            # cut back to the last whole row (shrinking a file needs no space), so the file stays valid
            with suppress(OSError):
                os.ftruncate(self._jsonl.fileno(), offset)
                os.lseek(self._jsonl.fileno(), offset, os.SEEK_SET)
            raise OutputWriteError(self.jsonl_path, exc) from exc
        for row, line in zip(rows, lines, strict=True):
            self._index[row["path"]] = _Entry(offset, len(line), int(row["size"]), int(row["mtime_ns"]))
            offset += len(line)
        # the CSV is a copy, rebuilt from the JSONL whenever the store opens: a failure here loses nothing
        with writing(self.csv_path, remove_on_failure=False):
            for row in rows:
                self._csv_writer.writerow(_csv_row(row))
            self._csv.flush()
            os.fsync(self._csv.fileno())

    # -- finishing ------------------------------------------------------------------------------

    def finalize(self, present: set[str] | None) -> int:
        """Rewrite both files sorted by path with one row per file; drop rows of files that are gone;
        delete overlays no row names (left by a kill before their rows, or by an older verdict).

        Returns how many rows were dropped because their file is no longer in the folder.
        """
        self.close()
        before = len(self._index)
        if self.jsonl_path.exists():
            self._compact(keep=present)
        self._sweep_overlays()
        return before - len(self._index)

    def _sweep_overlays(self) -> None:
        if not self.heatmap_dir.is_dir():
            return
        named = {row["heatmap"] for row in self.rows() if row.get("heatmap")}
        for dirpath, _dirnames, filenames in os.walk(self.heatmap_dir, topdown=False):
            for name in filenames:
                path = Path(dirpath, name)
                if name.endswith(".png") and path.relative_to(self.out_dir).as_posix() not in named:
                    path.unlink()
            if dirpath != str(self.heatmap_dir) and not os.listdir(dirpath):
                os.rmdir(dirpath)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Stream the stored rows (one dict at a time, never all at once)."""
        return read_rows(self.out_dir)

    def close(self) -> None:
        """Close the result files (``finalize`` does too); the folder lock is kept until :meth:`release`."""
        for handle in (self._jsonl, self._csv):
            if handle is not None and not handle.closed:
                # flushing the CSV's buffer can fail on a full disk; the CSV is rebuilt from the JSONL on
                # the next open, and the failure that filled the disk has been reported already
                with suppress(OSError):
                    handle.close()
        self._jsonl = self._csv = self._csv_writer = None

    def release(self) -> None:
        """Close everything and let another scan use the folder."""
        self.close()
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing the descriptor drops the flock
            self._lock_handle = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # -- compaction -----------------------------------------------------------------------------

    def _compact(self, keep: set[str] | None) -> None:
        """Index the JSONL (last row per path wins), then rewrite it and the CSV from that index.

        Streams: holds a path and four integers per row, never the rows themselves. A torn last line
        (killed mid-write) and unparsable lines are dropped, with a note when it is more than the tail.
        """
        index: dict[str, _Entry] = {}
        n_lines = n_bad = 0
        torn = False
        with open(self.jsonl_path, "rb") as handle:
            offset = 0
            for line in handle:
                length = len(line)
                n_lines += 1
                row = None
                if line.endswith(b"\n"):
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                else:
                    torn = True
                if isinstance(row, dict) and isinstance(row.get("path"), str):
                    try:
                        index[row["path"]] = _Entry(offset, length, int(row["size"]), int(row["mtime_ns"]))
                    except (KeyError, TypeError, ValueError):
                        n_bad += 1
                elif not torn:
                    n_bad += 1
                offset += length
        if torn:
            log.info(
                "%s: dropped an incomplete last line (the previous scan was interrupted)", self.jsonl_path
            )
        if n_bad:
            message = (
                f"{self.jsonl_path}: {n_bad} unreadable line(s) were dropped; those files will be rescanned"
            )
            self.warnings.append(message)
            log.warning(message)
        if keep is not None:
            index = {path: entry for path, entry in index.items() if path in keep}
        order = sorted(index)
        new_index: dict[str, _Entry] = {}
        jsonl_tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".partial")
        csv_tmp = self.csv_path.with_name(self.csv_path.name + ".partial")
        with (
            writing(jsonl_tmp),
            writing(csv_tmp),
            open(self.jsonl_path, "rb") as source,
            open(jsonl_tmp, "wb") as jsonl_out,
            open(csv_tmp, "w", newline="", encoding="utf-8", errors=_FS_ERRORS) as csv_out,
        ):
            writer = csv.DictWriter(csv_out, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            out_offset = 0
            for path in order:
                entry = index[path]
                source.seek(entry.offset)
                line = source.read(entry.length)
                jsonl_out.write(line)
                writer.writerow(_csv_row(json.loads(line)))
                new_index[path] = _Entry(out_offset, entry.length, entry.size, entry.mtime_ns)
                out_offset += entry.length
            for handle in (jsonl_out, csv_out):
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(jsonl_tmp, self.jsonl_path)  # the JSONL first: it is the source of truth
        os.replace(csv_tmp, self.csv_path)
        _fsync_dir(self.out_dir)
        self._index = new_index


def read_rows(out_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Rows of a finished or interrupted scan's ``results.jsonl``, streamed; a torn last line is skipped."""
    path = Path(out_dir) / JSONL_NAME
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for line in handle:
            if line.endswith(b"\n"):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    yield row


def _normalise_row(row: dict[str, Any]) -> dict[str, Any]:
    """Every field present, in :data:`FIELDS` order, with JSON-safe values (NaN scores become None)."""
    out = {}
    for key in FIELDS:
        value = row.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    if not isinstance(out["path"], str):
        raise ValueError(f"a result row needs a relative path, got {row!r}")
    return out


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row for the CSV copy; file names are outside text, escaped so no cell runs as a formula."""
    return {key: ("" if row.get(key) is None else csv_cell(row.get(key))) for key in FIELDS}


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.endswith(b"\n"))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with writing(tmp), open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may be short, e.g. just before a disk fills)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
