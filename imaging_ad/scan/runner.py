"""The streaming scan: discover image files, score them in batches, write rows and overlays as it goes.

Three stages overlap so the model never waits on the disk: the shared inference stream
(:mod:`imaging_ad.inference`) reads and preprocesses the next images in a thread pool while the calling
thread runs the model on one batch at a time, and one writer thread renders the overlays of the previous
batch and appends its rows. Every stage holds at most a few batches, so memory does not grow with the
folder: what is kept for the whole folder is a relative path and its size and modification time.

A file that cannot be read or preprocessed becomes a row with its error; only failures of the scan
itself (no model, no input folder, a full disk) stop it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

from imaging_ad.calibration import Calibration
from imaging_ad.inference import Outcome, background_priority
from imaging_ad.io import DEFAULT_MAX_PIXELS, ImageRecord, read_image
from imaging_ad.result import AnomalyResult
from imaging_ad.scan.store import HEATMAP_DIR, INVALIDATED_DIR, ResultStore, ScanSettings, writing

if TYPE_CHECKING:  # pragma: no cover
    from imaging_ad.detectors import Detector

log = logging.getLogger("imaging_ad.scan")

HEATMAP_MODES = ("flagged", "all", "none")
#: where files are scored: this process (the default, needs no Ray) or a Ray cluster's actors
ENGINES = ("local", "ray")
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
    n_out_of_domain: int  # rows of images unlike the training images: their scores mean nothing
    n_overlays: int  # overlay PNGs written by this run
    n_removed: int  # rows dropped because their file is no longer in the folder
    invalidated_rows: int  # earlier rows moved aside because the model or settings changed
    seconds: float  # wall time of the scanning loop of this run
    images_per_second: float
    results_jsonl: Path
    results_csv: Path
    report: Path
    warnings: list[str] = field(default_factory=list)
    dicom_out: Path | None = None  # where DICOM results went (scan(dicom_out=...))
    n_dicom_objects: int = 0  # Secondary Captures, Parametric Maps and Key Object Selections written
    n_dicom_failed: int = 0  # flagged DICOM images whose results could not be written (see the log)
    runtime: str = "torch"  # what scored the images, and why (imaging_ad.export.compiled.RuntimeChoice)

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
        if self.n_out_of_domain:
            parts.append(
                f"{self.n_out_of_domain} outside this model's training domain (score not meaningful; see the "
                "out_of_domain column)"
            )
        parts.append(
            f"{self.n_errors} could not be read (see the error column)"
            if self.n_errors
            else "no unreadable files"
        )
        if self.n_removed:
            parts.append(f"{self.n_removed} row(s) of files no longer present were removed")
        if self.dicom_out is not None:
            parts.append(
                f"{self.n_dicom_objects} DICOM result object(s) written to {self.dicom_out}"
                + (f", {self.n_dicom_failed} flagged DICOM image(s) failed" if self.n_dicom_failed else "")
            )
        return (
            "; ".join(parts)
            + f". Results: {self.results_csv} and {self.results_jsonl}; report: {self.report}"
            + (
                f"; {self.n_overlays} overlay(s) written to {self.out_dir / HEATMAP_DIR}."
                if self.n_overlays
                else "."
            )
        )


@dataclass
class RenderedOutcome(Outcome):
    """An outcome scored elsewhere (a Ray worker) that arrives with its overlay drawn already (PNG bytes;
    None when the pixel layout allowed none) instead of its pixels and heatmap."""

    overlay_png: bytes | None = None


def wants_overlay(heatmaps: str, result: AnomalyResult) -> bool:
    """Whether a scored image gets an overlay: all of them, none, or (``"flagged"``) the flagged ones and
    those outside the model's domain, which the report lists for review."""
    return heatmaps == "all" or (heatmaps == "flagged" and bool(result.is_anomaly or result.out_of_domain))


def render_overlay(outcome: Outcome, calibration: Calibration, name: str) -> bytes | None:
    """The overlay PNG of a scored outcome that kept its record: the same bytes wherever it is drawn
    (this process's writer thread, or the Ray worker that scored it). None for an odd pixel layout."""
    from imaging_ad.visualize import ColourScale, encode_png, overlay_with_legend

    pixels = outcome.record.pixels if isinstance(outcome.record, ImageRecord) else outcome.record
    try:
        # blue up to the calibrated pixel threshold (as normal as normal images get), red at the peak
        image = overlay_with_legend(pixels, outcome.result.heatmap, ColourScale.of(calibration))
    except (ValueError, TypeError) as exc:  # an odd pixel layout: keep the score, skip the picture
        log.warning("%s: no overlay (%s)", name, exc)
        return None
    return encode_png(image, name)


@dataclass(frozen=True)
class _Item:
    relpath: str
    size: int
    mtime_ns: int
    problem: str | None = None  # known before reading: not a regular file, cannot be stat'ed
    overlay: str = ""  # overlay file name relative to the heatmap folder (see overlay_names)


def scan(
    input_dir: str | os.PathLike,
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    threshold: float | None = None,
    heatmaps: str = "flagged",
    device: str = "auto",
    runtime: str = "torch",
    workers: int | None = None,
    batch_size: int | None = None,
    progress: Callable[[ScanProgress], None] | None = None,
    progress_bar: bool = False,
    detector: Detector | None = None,
    gallery_limit: int = 500,
    dicom_out: str | os.PathLike | None = None,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: str = "local",
    address: str | None = None,
    gpus_per_worker: float = 0.0,
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
    fingerprint. ``dicom_out`` writes DICOM results for the flagged DICOM inputs there (see
    :mod:`imaging_ad.dicom_results`; needs the ``[dicom]`` extra). Unreadable files become rows with an
    error; exceptions mean the scan could not run, as does a folder without any image file ``allowed_roots`` (a server's allowed folders): files whose real path lies outside all of
    them, through a link, are skipped and never read. ``max_pixels``: images whose header declares more
    are error rows, refused before decoding (a server's per-request memory bound). ``runtime``:
    ``"torch"``, ``"onnxruntime"`` or ``"auto"`` (see :func:`imaging_ad.export.with_runtime`; the graph is
    cached next to the model file); a ``detector`` passed in that is already compiled is used as is.

    ``engine="ray"`` scores on a Ray cluster (the ``[cluster]`` extra): ``address`` names an existing
    cluster (default: the one this process is connected to, else a new local one), ``workers`` is then
    the number of model-holding actors (default: one per CPU of the cluster) and ``gpus_per_worker`` the
    GPUs each reserves; its workers score with torch. Files are listed and rows, overlays and the report
    written here, by the same code as a local scan, so the outputs are the same; the model file and the
    input folder must be readable at the same paths on every node (see :mod:`imaging_ad.scan.ray_engine`).
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
    if engine not in ENGINES:
        raise ScanError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "local" and (address is not None or gpus_per_worker):
        raise ScanError("address and gpus_per_worker are options of engine='ray'")
    if engine == "ray" and dicom_out is not None:
        raise ScanError(
            "DICOM results (dicom_out) are written by the local engine only; scan without --engine ray"
        )
    if engine == "ray" and detector is not None:
        raise ScanError(
            "engine='ray' loads the model in its workers; pass the model file, not a loaded detector"
        )
    if gpus_per_worker < 0:
        raise ScanError(f"gpus_per_worker must not be negative, got {gpus_per_worker}")
    root, out = root.resolve(), out.resolve()
    if out == root or out in root.parents:
        raise ScanError(f"the output folder {out} must not contain the input folder {root}")
    if dicom_out is not None:
        from imaging_ad.dicom_results import require_highdicom

        require_highdicom()  # before any work: a missing extra is a setup error, not a late surprise
        dicom_dir = Path(dicom_out).expanduser().resolve()
        if dicom_dir == root or root in dicom_dir.parents:
            raise ScanError(
                f"the DICOM output folder {dicom_dir} must not be inside the input folder {root}: "
                "its files would be scanned as inputs next time"
            )

    description = read_description(model_path)  # cheap: the header only, before the slow load
    fingerprint = description["sha256"]
    remote = None
    if engine == "ray":
        from imaging_ad.scan.ray_engine import RayEngine

        # the driver never loads the network: its workers do; it needs the calibration to write rows
        remote = RayEngine(model_path, description, address, workers, gpus_per_worker, device)
        detector = remote.model
    else:
        if detector is None:
            if runtime == "onnxruntime" and device == "auto":
                device = "cpu"  # the graph runs on the CPU: no GPU copy to move back
            detector = load_detector(model_path, device=device)
        if runtime != "torch":
            from imaging_ad.export.compiled import CompiledDetector, with_runtime

            if not isinstance(detector, CompiledDetector):
                detector = with_runtime(detector, runtime, model_path=model_path)
    calibration = detector.calibration_
    if calibration is None:
        raise ScanError("the detector is not fitted: it has no calibration")
    if detector.name != description["detector"] or calibration != Calibration.from_dict(
        description["calibration"]
    ):
        raise ScanError(
            f"the detector passed in was not loaded from {model_path}; results would be mislabelled"
        )
    threshold = float(calibration.image_threshold if threshold is None else threshold)
    batch_size = int(batch_size or detector.batch_size)
    workers = int(workers or min(4, os.cpu_count() or 1)) if remote is None else 0

    relpaths = [path.relative_to(root).as_posix() for path in discover(root, out, allowed_roots)]
    if not relpaths:  # before the output folder is touched: an empty scan writes nothing
        raise ScanError(_no_images_message(root))
    settings = ScanSettings(fingerprint, str(root), threshold, heatmaps)
    store = ResultStore(out, settings)
    try:
        store.open()
        todo, present, n_skipped = _plan(root, relpaths, store)
        dicom_writer = _dicom_writer(dicom_out, model_path, fingerprint)
        runner = _Runner(
            detector,
            store,
            root,
            threshold,
            heatmaps,
            batch_size,
            workers,
            progress,
            progress_bar,
            dicom_writer,
            max_pixels,
            remote,
        )
        start = time.perf_counter()
        try:
            runner.run(todo, n_skipped)
        finally:
            if remote is not None:
                remote.close()
        seconds = time.perf_counter() - start
        if dicom_writer is not None:
            dicom_writer.finish()  # one key object selection per study
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
        n_out_of_domain=data.n_out_of_domain,
        n_overlays=runner.n_overlays,
        n_removed=n_removed,
        invalidated_rows=store.invalidated_rows,
        seconds=seconds,
        images_per_second=runner.n_done / seconds if seconds > 0 else 0.0,
        results_jsonl=store.jsonl_path,
        results_csv=store.csv_path,
        report=report_path,
        warnings=list(store.warnings),
        dicom_out=dicom_writer.out_dir if dicom_writer is not None else None,
        n_dicom_objects=dicom_writer.n_written if dicom_writer is not None else 0,
        n_dicom_failed=runner.n_dicom_failed,
        runtime=str(getattr(detector, "runtime_choice", "runtime: torch")),
    )


def _no_images_message(root: Path) -> str:
    from imaging_ad.io.reader import DICOM_SUFFIXES, RASTER_SUFFIXES

    return (
        f"no image files found in {root} (searched recursively for {', '.join(RASTER_SUFFIXES + DICOM_SUFFIXES)} "
        "and DICOM files without a suffix; hidden files and mask folders are skipped)"
    )


def _dicom_writer(
    dicom_out: str | os.PathLike | None, model_path: Path, fingerprint: str
):  # -> writer | None
    if dicom_out is None:
        return None
    from imaging_ad.dicom_results import DicomResultWriter

    return DicomResultWriter(
        Path(dicom_out).expanduser().resolve(), model_name=model_path.stem, model_fingerprint=fingerprint
    )


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


def _plan(root: Path, relpaths: list[str], store: ResultStore) -> tuple[list[_Item], set[str], int]:
    """(files to scan, relative paths of every file present, number skipped as already done)."""
    from imaging_ad.scan.overlay_names import overlay_names

    todo: list[_Item] = []
    present: set[str] = set()
    skipped = 0
    overlays = overlay_names(relpaths)
    for relpath in relpaths:
        path = root / relpath
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
            todo.append(_Item(relpath, size, mtime_ns, problem, overlays[relpath]))
    return todo, present, skipped


@dataclass
class _Runner:
    """One scan's pipeline state: the writer thread, counters, the progress bar. Reading, preprocessing and
    scoring are the shared inference stream's (:mod:`imaging_ad.inference`)."""

    detector: Detector
    store: ResultStore
    root: Path
    threshold: float
    heatmaps: str
    batch_size: int
    workers: int
    progress: Callable[[ScanProgress], None] | None
    progress_bar: bool
    dicom: Any = None  # a DicomResultWriter when the scan writes DICOM results
    max_pixels: int = DEFAULT_MAX_PIXELS
    remote: Any = None  # a RayEngine scoring on a cluster instead of this process
    n_done: int = 0
    n_flagged: int = 0
    n_errors: int = 0
    n_overlays: int = 0
    n_dicom_failed: int = 0

    def run(self, todo: list[_Item], n_skipped: int) -> None:
        from tqdm.auto import tqdm

        from imaging_ad.inference import stream_batches

        total = len(todo)
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
        # known before reading (not a regular file, cannot be stat'ed): rows of their own, never read
        unreadable = [item for item in todo if item.problem is not None]
        readable = [item for item in todo if item.problem is None]
        by_path = {str(self.root / item.relpath): item for item in readable}
        with (
            ThreadPoolExecutor(1, thread_name_prefix="scan-write", initializer=background_priority) as writer,
            bar,
        ):
            writes: deque[Future[None]] = deque()

            def write(rows: list[tuple[_Item, Outcome | None]]) -> None:
                writes.append(writer.submit(self._write_batch, rows))
                errors = sum(outcome is None or not outcome.ok for _, outcome in rows)
                self.n_done += len(rows)
                self.n_errors += errors
                self.n_flagged += sum(
                    o is not None and o.ok and o.result.verdict == "anomalous" for _, o in rows
                )
                while writes and (writes[0].done() or len(writes) > 2):
                    writes.popleft().result()  # re-raises a failure of the writer (e.g. disk full)
                bar.update(len(rows))
                self._report_progress(total, n_skipped, start)

            for chunk in range(0, len(unreadable), self.batch_size):
                write([(item, None) for item in unreadable[chunk : chunk + self.batch_size]])
            paths = [self.root / item.relpath for item in readable]
            if self.remote is not None:  # a cluster's actors, blocks in the order they finish
                outcomes = self.remote.batches(
                    paths, self.batch_size, self.threshold, self.heatmaps, self.max_pixels
                )
            else:
                outcomes = stream_batches(
                    self.detector,
                    paths,
                    batch_size=self.batch_size,
                    workers=self.workers,
                    keep_records=self.heatmaps != "none" or self.dicom is not None,
                    threshold=self.threshold,
                    reader=partial(read_image, max_pixels=self.max_pixels),
                )
            for batch in outcomes:
                write([(by_path[outcome.path], outcome) for outcome in batch])
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

    # -- overlays and rows (one writer thread, so rows stay in order) ---------------------------

    def _write_batch(self, rows: list[tuple[_Item, Outcome | None]]) -> None:
        """Write this batch's overlays, then its rows: a row never names an overlay not yet on disk."""
        written = []
        for item, outcome in rows:
            if outcome is None:
                written.append(self._row(item) | {"error": item.problem, "error_code": "unreadable"})
                continue
            if not outcome.ok:
                written.append(self._row(item) | {"error": outcome.reason, "error_code": outcome.error_code})
                continue
            result = outcome.result
            heatmap_rel = None
            if wants_overlay(self.heatmaps, result):
                heatmap_rel = self._write_overlay(item, outcome)
            is_dicom = isinstance(outcome.record, ImageRecord) and outcome.record.meta.format == "DICOM"
            if result.verdict in ("anomalous", "out of domain") and is_dicom and self.dicom is not None:
                self._write_dicom(item, outcome)
            outcome.record = None
            height, width = outcome.size
            written.append(
                self._row(item)
                | {
                    "score": result.score,
                    "normalized_score": result.normalized_score,
                    "is_anomaly": result.is_anomaly,
                    "domain_score": result.domain_score,
                    "out_of_domain": "; ".join(result.out_of_domain) or None,
                    "heatmap": heatmap_rel,
                    "width": width,
                    "height": height,
                }
            )
        self.store.append(written)

    def _row(self, item: _Item) -> dict[str, Any]:
        return {
            "path": item.relpath,
            "threshold": self.threshold,
            "size": item.size,
            "mtime_ns": item.mtime_ns,
        }

    def _write_overlay(self, item: _Item, outcome: Outcome) -> str | None:
        # mirrors the input tree; names are distinct per input (see overlay_names)
        rel = f"{HEATMAP_DIR}/{item.overlay}"
        path = self.store.out_dir / rel
        if isinstance(outcome, RenderedOutcome):  # drawn by the worker that scored it
            png = outcome.overlay_png
        else:
            png = render_overlay(outcome, self.detector.calibration_, item.relpath)
        if png is None:
            return None
        with writing(path):  # a full disk: the error names the overlay, no 0-byte file is left
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        self.n_overlays += 1
        return rel

    def _write_dicom(self, item: _Item, outcome: Outcome) -> None:
        """DICOM results of one flagged DICOM image (or a capture saying it is outside the model's domain);
        a failure is logged and counted, the scan goes on."""
        from pydicom.errors import InvalidDicomError

        from imaging_ad.dicom_results import DicomResultsError

        try:
            self.dicom.add(
                self.root / item.relpath,
                outcome.result.heatmap,
                outcome.result.score,
                self.threshold,
                pixels=outcome.record.pixels,
                pixel_threshold=self.detector.calibration_.pixel_threshold,
                pixel_upper=self.detector.calibration_.pixel_upper,
                outside_domain="; ".join(outcome.result.out_of_domain) or None,
            )
        # a disk that is full or read-only (OSError) stops the scan, as it does for overlays
        except (DicomResultsError, InvalidDicomError, ValueError, TypeError, AttributeError, KeyError) as exc:
            self.n_dicom_failed += 1
            log.warning("%s: no DICOM results (%s: %s)", item.relpath, type(exc).__name__, exc)
