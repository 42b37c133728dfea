"""The streaming scan: discover image files, score them in batches, write rows and overlays as it goes.

Three stages overlap so the model never waits on the disk: a thread pool reads and preprocesses the
next images (OpenCV, PIL and NumPy release the GIL for the heavy parts), the calling thread runs the
model on one batch at a time, and one writer thread renders the overlays of the previous batch and
appends its rows. Every stage holds at most a few batches, so memory does not grow with the folder:
what is kept for the whole folder is a relative path and its size and modification time.

A file that cannot be read or preprocessed becomes a row with its error; only failures of the scan
itself (no model, no input folder, a full disk) stop it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

import numpy as np

from imaging_ad.io import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from imaging_ad.result import NON_FINITE_CODE, non_finite_errors
from imaging_ad.scan.store import HEATMAP_DIR, INVALIDATED_DIR, ResultStore, ScanSettings, writing

if TYPE_CHECKING:  # pragma: no cover
    from imaging_ad.detectors import Detector
    from imaging_ad.preprocess import Preprocessor

log = logging.getLogger("imaging_ad.scan")

HEATMAP_MODES = ("flagged", "all", "none")
#: niceness added to the reader and writer threads (see _background_priority)
BACKGROUND_NICE = 10
REPORT_NAME = "report.html"


class ScanError(RuntimeError):
    """The scan itself cannot run (missing input folder, bad options); bad *files* never raise this."""


@dataclass(frozen=True)
class ScanProgress:
    """Passed to the progress callback after every batch (and once before the first)."""

    done: int  # files handled in this run so far (scored or failed)
    total: int  # files this run has to handle (already-done files excluded)
    flagged: int  # of ``done``, flagged as anomalous
    errors: int  # of ``done``, unreadable
    skipped: int  # files skipped because an earlier run already has their row
    elapsed_s: float
    images_per_second: float
    eta_s: float | None


@dataclass
class ScanSummary:
    """What a scan did and where its outputs are. ``str()`` gives the one-paragraph summary."""

    input_dir: Path
    out_dir: Path
    model: Path
    model_fingerprint: str
    threshold: float
    heatmaps: str
    n_files: int  # image files found in the folder
    n_scanned: int  # handled by this run (scored or failed)
    n_skipped: int  # already done by an earlier run with the same settings
    n_rows: int  # rows in the results: one per file
    n_flagged: int  # rows flagged as anomalous (whole folder, not just this run)
    n_errors: int  # rows with an error (whole folder)
    n_overlays: int  # overlay PNGs written by this run
    n_removed: int  # rows dropped because their file is no longer in the folder
    invalidated_rows: int  # earlier rows moved aside because the model or settings changed
    seconds: float  # wall time of the scanning loop of this run
    images_per_second: float
    results_jsonl: Path
    results_csv: Path
    report: Path
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        parts = [
            f"Scanned {self.n_scanned} image file(s) of {self.n_files} in {self.input_dir} "
            f"in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)",
        ]
        if self.n_skipped:
            parts.append(f"{self.n_skipped} skipped as already done by an earlier run")
        if self.invalidated_rows:
            parts.append(
                f"{self.invalidated_rows} earlier row(s) invalidated by a change of model or settings"
            )
        parts.append(f"{self.n_flagged} of {self.n_rows} flagged as anomalous (score > {self.threshold:.4g})")
        parts.append(
            f"{self.n_errors} could not be read (see the error column)"
            if self.n_errors
            else "no unreadable files"
        )
        if self.n_removed:
            parts.append(f"{self.n_removed} row(s) of files no longer present were removed")
        return (
            "; ".join(parts)
            + f". Results: {self.results_csv} and {self.results_jsonl}; report: {self.report}"
            + (
                f"; {self.n_overlays} overlay(s) written to {self.out_dir / HEATMAP_DIR}."
                if self.n_overlays
                else "."
            )
        )


@dataclass(frozen=True)
class _Item:
    relpath: str
    size: int
    mtime_ns: int
    problem: str | None = None  # known before reading: not a regular file, cannot be stat'ed


@dataclass
class _Loaded:
    item: _Item
    tensor: Any = None  # torch.Tensor (3, S, S)
    size: tuple[int, int] | None = None  # (height, width)
    pixels: np.ndarray | None = None  # kept only when an overlay may be needed
    error: str | None = None
    error_code: str | None = None


def scan(
    input_dir: str | os.PathLike,
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    heatmaps: str = "flagged",
    device: str = "auto",
    workers: int | None = None,
    batch_size: int | None = None,
    progress: Callable[[ScanProgress], None] | None = None,
    progress_bar: bool = False,
    detector: Detector | None = None,
    gallery_limit: int = 500,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ScanSummary:
    """Score every image under ``input_dir`` with the model file ``model``; results go to ``out_dir``.

    Writes ``results.jsonl`` (the source of truth), ``results.csv``, overlays under ``heatmaps/``
    (``heatmaps="flagged"``: flagged images only, ``"all"``, or ``"none"``) and ``report.html``.
    Re-running with the same arguments resumes: files whose relative path, size and ``mtime_ns``
    already have a row are skipped. A different model (by fingerprint), input folder, threshold or
    heatmap mode moves the earlier results aside to ``out_dir/invalidated/`` and scans everything.

    ``threshold`` overrides the model's calibrated image threshold (a raw score; the normalised score
    stays calibrated). ``workers`` is the number of read/preprocess threads (default: CPU count, at
    most 4); ``batch_size`` defaults to the model's. ``progress`` is called after each batch with a
    :class:`ScanProgress` (an exception raised there stops the scan, keeping the finished batches,
    which is how a caller cancels); ``progress_bar`` shows a tqdm bar on stderr. ``detector`` may pass the
    model already loaded from ``model`` (e.g. by a long-running demo); the file still provides the
    fingerprint. Unreadable files become rows with an error; exceptions mean the scan could not run.
    ``allowed_roots`` (a server's allowed folders): files whose real path lies outside all of them,
    through a link, are skipped and never read. ``max_pixels``: images whose header declares more are
    error rows, refused before decoding (a server's per-request memory bound).
    """
    from imaging_ad.detectors import load_detector, read_description

    root = Path(input_dir).expanduser()
    out = Path(out_dir).expanduser()
    model_path = Path(model).expanduser()
    if heatmaps not in HEATMAP_MODES:
        raise ScanError(f"heatmaps must be one of {HEATMAP_MODES}, got {heatmaps!r}")
    if not root.exists():
        raise ScanError(f"input folder {root} does not exist")
    if not root.is_dir():
        raise ScanError(f"input {root} is not a folder (scan takes a folder; use `predict` for single files)")
    if workers is not None and workers < 1:
        raise ScanError(f"workers must be at least 1, got {workers}")
    if batch_size is not None and batch_size < 1:
        raise ScanError(f"batch size must be at least 1, got {batch_size}")
    root, out = root.resolve(), out.resolve()
    if out == root or out in root.parents:
        raise ScanError(f"the output folder {out} must not contain the input folder {root}")

    description = read_description(model_path)  # cheap: the header only, before the slow load
    fingerprint = description["sha256"]
    if detector is None:
        detector = load_detector(model_path, device=device)
    calibration = detector.calibration_
    if calibration is None:
        raise ScanError("the detector is not fitted: it has no calibration")
    if detector.name != description["detector"] or calibration.to_dict() != description["calibration"]:
        raise ScanError(
            f"the detector passed in was not loaded from {model_path}; results would be mislabelled"
        )
    threshold = float(calibration.image_threshold if threshold is None else threshold)
    batch_size = int(batch_size or detector.batch_size)
    workers = int(workers or min(4, os.cpu_count() or 1))

    settings = ScanSettings(fingerprint, str(root), threshold, heatmaps)
    store = ResultStore(out, settings)
    try:
        store.open()
        todo, present, n_skipped = _plan(root, out, store, allowed_roots)
        runner = _Runner(
            detector, store, root, threshold, heatmaps, batch_size, workers, progress, progress_bar
        )
        runner.max_pixels = max_pixels
        start = time.perf_counter()
        runner.run(todo, n_skipped)
        seconds = time.perf_counter() - start
        n_removed = store.finalize(present)
        if n_removed:
            log.info("%d row(s) of files no longer in %s were removed", n_removed, root)
        from imaging_ad.scan.report import ReportData, write_report

        data = ReportData.collect(store.rows(), gallery_limit=gallery_limit)
        report_path = write_report(
            out / REPORT_NAME,
            data,
            input_dir=root,
            model=model_path,
            fingerprint=fingerprint,
            threshold=threshold,
            heatmaps=heatmaps,
        )
    finally:
        store.release()
    return ScanSummary(
        input_dir=root,
        out_dir=out,
        model=model_path,
        model_fingerprint=fingerprint,
        threshold=threshold,
        heatmaps=heatmaps,
        n_files=len(present),
        n_scanned=runner.n_done,
        n_skipped=n_skipped,
        n_rows=data.n_rows,
        n_flagged=data.n_flagged,
        n_errors=data.n_errors,
        n_overlays=runner.n_overlays,
        n_removed=n_removed,
        invalidated_rows=store.invalidated_rows,
        seconds=seconds,
        images_per_second=runner.n_done / seconds if seconds > 0 else 0.0,
        results_jsonl=store.jsonl_path,
        results_csv=store.csv_path,
        report=report_path,
        warnings=list(store.warnings),
    )


def _background_priority() -> None:
    """Let the model's compute threads win the CPU over reading and writing (Linux; elsewhere a no-op).

    On a machine with few cores a reader that preempts one of torch's OpenMP threads stalls the others
    at the next barrier, which costs more than the read itself. At a lower priority the readers run in
    the gaps (Python between ops, single-threaded steps) and, should they fall behind, whenever the
    model waits for them, so the model never starves.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):
            thread = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, thread) + BACKGROUND_NICE
            os.setpriority(os.PRIO_PROCESS, thread, min(nice, 19))


def discover(
    root: Path, out_dir: Path | None = None, allowed_roots: Sequence[str | os.PathLike] | None = None
) -> list[Path]:
    """Image files under ``root`` (sorted, recursively), as the dataset discovery finds them.

    Names decide (known image suffixes, or none at all, since DICOM often has none); the reader sniffs
    the content later. Mask folders and hidden files are skipped, as are this scan's own outputs when
    the output folder lies inside ``root``.
    """
    from imaging_ad.data import collect_images

    excluded = [out_dir / HEATMAP_DIR, out_dir / INVALIDATED_DIR] if out_dir is not None else []
    found = collect_images(root, confine_to=allowed_roots)
    if excluded:
        found = [p for p in found if not any(p.is_relative_to(e) for e in excluded)]
    return found


def _plan(
    root: Path, out: Path, store: ResultStore, allowed_roots: Sequence[str | os.PathLike] | None = None
) -> tuple[list[_Item], set[str], int]:
    """(files to scan, relative paths of every file present, number skipped as already done)."""
    todo: list[_Item] = []
    present: set[str] = set()
    skipped = 0
    for path in discover(root, out, allowed_roots):
        relpath = path.relative_to(root).as_posix()
        present.add(relpath)
        problem = None
        try:
            stat = path.stat()
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
            if not S_ISREG(stat.st_mode):  # a FIFO or device would block or never end a read
                problem = "not a regular file"
        except OSError as exc:
            size, mtime_ns, problem = -1, -1, f"cannot be accessed ({exc.strerror or exc})"
        if store.is_done(relpath, size, mtime_ns):
            skipped += 1
        else:
            todo.append(_Item(relpath, size, mtime_ns, problem))
    return todo, present, skipped


class _Runner:
    """One scan's pipeline state: thread pools, counters, the progress bar."""

    def __init__(
        self,
        detector: Detector,
        store: ResultStore,
        root: Path,
        threshold: float,
        heatmaps: str,
        batch_size: int,
        workers: int,
        progress: Callable[[ScanProgress], None] | None,
        progress_bar: bool,
    ) -> None:
        self.detector = detector
        self.store = store
        self.root = root
        self.threshold = threshold
        self.heatmaps = heatmaps
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.progress_bar = progress_bar
        self.calibration = detector.calibration_
        self.preprocessor_config = detector.preprocessor_.to_dict()
        self._local = threading.local()
        self.max_pixels = DEFAULT_MAX_PIXELS
        self.n_done = self.n_flagged = self.n_errors = self.n_overlays = 0

    # -- stage 1: read + preprocess (thread pool) -----------------------------------------------

    def _preprocessor(self) -> Preprocessor:
        """One preprocessor per thread: albumentations pipelines are not documented as thread-safe."""
        pre = getattr(self._local, "preprocessor", None)
        if pre is None:
            from imaging_ad.preprocess import Preprocessor

            pre = self._local.preprocessor = Preprocessor.from_dict(self.preprocessor_config)
        return pre

    def _load(self, item: _Item) -> _Loaded:
        if item.problem is not None:
            return _Loaded(item, error=item.problem, error_code="unreadable")
        try:
            record = read_image(self.root / item.relpath, max_pixels=self.max_pixels)
            tensor = self._preprocessor()(record)
        except ImageReadError as exc:
            return _Loaded(item, error=exc.reason, error_code=exc.reason_code)
        except Exception as exc:  # noqa: BLE001  (a bad file must never stop the scan)
            return _Loaded(item, error=f"{type(exc).__name__}: {exc}", error_code="preprocess_failed")
        keep = record.pixels if self.heatmaps != "none" else None
        return _Loaded(item, tensor=tensor, size=record.meta.size, pixels=keep)

    # -- stage 2: the model (calling thread) ----------------------------------------------------

    def run(self, todo: list[_Item], n_skipped: int) -> None:
        import torch
        from tqdm.auto import tqdm

        total = len(todo)
        # enough read ahead that the next batch is ready when the model is; no more (memory)
        prefetch = self.batch_size + 2 * self.workers
        start = time.perf_counter()
        bar = tqdm(
            total=total,
            desc="scan",
            unit="img",
            disable=not self.progress_bar,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self._report_progress(total, n_skipped, start)
        with (
            ThreadPoolExecutor(
                self.workers, thread_name_prefix="scan-read", initializer=_background_priority
            ) as readers,
            ThreadPoolExecutor(
                1, thread_name_prefix="scan-write", initializer=_background_priority
            ) as writer,
            bar,
        ):
            items = iter(todo)
            pending: deque[Future[_Loaded]] = deque()
            writes: deque[Future[None]] = deque()

            def refill() -> None:
                while len(pending) < prefetch:
                    item = next(items, None)
                    if item is None:
                        return
                    pending.append(readers.submit(self._load, item))

            refill()
            ok: list[_Loaded] = []
            failed: list[_Loaded] = []
            while pending:
                loaded = pending.popleft().result()
                refill()
                (failed if loaded.error is not None else ok).append(loaded)
                if len(ok) < self.batch_size and len(failed) < self.batch_size and pending:
                    continue
                scores = maps = None
                if ok:
                    batch = torch.stack([entry.tensor for entry in ok])
                    scores, maps = self.detector.score_tensor(batch)
                    for entry in ok:
                        entry.tensor = None
                writes.append(writer.submit(self._write_batch, ok, failed, scores, maps))
                n_batch = len(ok) + len(failed)
                self.n_done += n_batch
                self.n_errors += len(failed)
                if scores is not None:
                    self.n_flagged += int(np.count_nonzero(scores > self.threshold))
                ok, failed = [], []
                while writes and (writes[0].done() or len(writes) > 2):
                    writes.popleft().result()  # re-raises a failure of the writer (e.g. disk full)
                bar.update(n_batch)
                self._report_progress(total, n_skipped, start)
            while writes:
                writes.popleft().result()

    def _report_progress(self, total: int, skipped: int, start: float) -> None:
        if self.progress is None:
            return
        elapsed = time.perf_counter() - start
        rate = self.n_done / elapsed if elapsed > 0 and self.n_done else 0.0
        eta = (total - self.n_done) / rate if rate > 0 else None
        self.progress(
            ScanProgress(self.n_done, total, self.n_flagged, self.n_errors, skipped, elapsed, rate, eta)
        )

    # -- stage 3: overlays and rows (one writer thread, so rows stay in order) ------------------

    def _write_batch(
        self,
        ok: list[_Loaded],
        failed: list[_Loaded],
        scores: np.ndarray | None,
        maps: np.ndarray | None,
    ) -> None:
        """Write this batch's overlays, then its rows: a row never names an overlay not yet on disk."""
        rows = []
        if ok:
            normalized = self.calibration.normalize(scores)
            non_finite = non_finite_errors(scores, maps)  # a NaN score or map: an error row, no verdict
            for i, entry in enumerate(ok):
                if non_finite[i] is not None:
                    rows.append(
                        self._row(entry.item) | {"error": non_finite[i], "error_code": NON_FINITE_CODE}
                    )
                    continue
                score = float(scores[i])
                flagged = bool(score > self.threshold)
                heatmap_rel = None
                if self.heatmaps == "all" or (flagged and self.heatmaps == "flagged"):
                    heatmap_rel = self._write_overlay(entry, maps[i])
                entry.pixels = None
                height, width = entry.size
                rows.append(
                    self._row(entry.item)
                    | {
                        "score": score,
                        "normalized_score": float(normalized[i]),
                        "is_anomaly": flagged,
                        "heatmap": heatmap_rel,
                        "width": width,
                        "height": height,
                    }
                )
        for entry in failed:
            rows.append(self._row(entry.item) | {"error": entry.error, "error_code": entry.error_code})
        self.store.append(rows)

    def _row(self, item: _Item) -> dict[str, Any]:
        return {
            "path": item.relpath,
            "threshold": self.threshold,
            "size": item.size,
            "mtime_ns": item.mtime_ns,
        }

    def _write_overlay(self, entry: _Loaded, model_map: np.ndarray) -> str | None:
        from imaging_ad.visualize import overlay, save_png

        # mirrors the input tree and keeps the original suffix, so names never collide
        rel = f"{HEATMAP_DIR}/{entry.item.relpath}.png"
        path = self.store.out_dir / rel
        heatmap = self.detector.preprocessor_.heatmap_to_original(model_map, entry.size)
        try:
            # blue up to the calibrated pixel threshold (as normal as normal images get), red at the peak
            image = overlay(entry.pixels, heatmap, vmin=self.calibration.pixel_threshold)
        except (ValueError, TypeError) as exc:  # an odd pixel layout: keep the score, skip the picture
            log.warning("%s: no overlay (%s)", entry.item.relpath, exc)
            return None
        with writing(path):  # a full disk: the error names the overlay, no 0-byte file is left
            save_png(path, image)
        self.n_overlays += 1
        return rel
