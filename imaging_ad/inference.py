"""The one inference stream: items in, a result or an error per item out, in input order.

``Detector.predict``, the torch-free runtime of exported models, ``scan`` and the CLI all score through
:func:`stream`; fitting reads its batches through :func:`read_ahead` too. Two stages overlap so the model
never waits on the disk: a pool of threads reads and preprocesses the next images (OpenCV, Pillow and
NumPy release the GIL for the heavy parts), and the calling thread runs the model on one batch at a time.
At most a few batches are in memory, whatever the number of items.

A model is anything with ``preprocessor_`` (:class:`~imaging_ad.preprocess.Preprocessor`),
``calibration_`` (:class:`~imaging_ad.calibration.Calibration`), ``batch_size`` and
``score_batch(batch) -> (scores, heatmaps at model-input size)``: a fitted detector or an exported model.
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from imaging_ad.calibration import Calibration
from imaging_ad.domain import ImageFacts, domain_verdict
from imaging_ad.io import ImageReadError, ImageRecord
from imaging_ad.io.items import ImageInput, item_path, to_record
from imaging_ad.preprocess import Preprocessor
from imaging_ad.result import NON_FINITE_CODE, AnomalyResult, non_finite_errors

#: niceness added to the reading threads (see background_priority)
BACKGROUND_NICE = 10
#: a preprocessed (3, S, S) array -> a randomly transformed one (training augmentation)
Transform = Callable[[np.ndarray], np.ndarray]


class Scorer(Protocol):
    preprocessor_: Preprocessor
    calibration_: Calibration
    batch_size: int

    def score_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class Outcome:
    """One item on its way through the stream: its model input once read, then its result, or why it has
    none (an error naming the file, and the exception for callers that re-raise it)."""

    item: Any
    path: str | None
    image: np.ndarray | None = None  # (3, S, S) float32, until scored
    size: tuple[int, int] | None = None  # original (height, width)
    record: ImageRecord | np.ndarray | None = None  # the pixels, when asked to keep them
    facts: ImageFacts | None = None  # colour content, bit depth, modality: for the out-of-domain guard
    result: AnomalyResult | None = None
    reason: str | None = None  # why there is no result, without the file's name
    error_code: str | None = None
    exception: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def error(self) -> str | None:
        """Why there is no result, naming the file."""
        return None if self.reason is None else f"{self.path or 'the image'}: {self.reason}"

    def fail(self, reason: str, code: str, exception: Exception | None = None) -> Outcome:
        self.reason, self.error_code, self.exception, self.image = reason, code, exception, None
        return self


def default_workers() -> int:
    """Reading threads: enough to keep the model fed, few enough to leave it the cores."""
    return max(1, min(4, os.cpu_count() or 1))


def load(
    item: ImageInput,
    preprocessor: Preprocessor,
    keep_record: bool = False,
    transform: Transform | None = None,
    reader: Callable[[ImageInput], ImageRecord | np.ndarray] = to_record,
) -> Outcome:
    """Read (with ``reader``) and preprocess one item; a file that cannot be read or preprocessed gives its
    error instead."""
    outcome = Outcome(item, item_path(item))
    try:
        record = reader(item)
        image = preprocessor(record)
        outcome.image = image if transform is None else transform(image)
    except ImageReadError as exc:
        return outcome.fail(exc.reason, exc.reason_code, exc)
    except Exception as exc:  # noqa: BLE001  (one bad file must never stop the others: odd pixel layouts...)
        return outcome.fail(f"{type(exc).__name__}: {exc}", "preprocess_failed", exc)
    outcome.size = record.meta.size if isinstance(record, ImageRecord) else tuple(record.shape[:2])
    outcome.facts = ImageFacts.of(record)
    outcome.record = record if keep_record else None
    return outcome


def read_ahead(
    items: Iterable[ImageInput],
    preprocessor: Preprocessor,
    *,
    workers: int | None = None,
    depth: int = 8,
    keep_records: bool = False,
    transform: Transform | None = None,
    reader: Callable[[ImageInput], ImageRecord | np.ndarray] = to_record,
) -> Iterator[Outcome]:
    """Each item read (``reader``: e.g. ``read_image`` with a pixel cap) and preprocessed, in input order,
    ``depth`` items ahead of the consumer. A random ``transform`` (augmentation) reads with one thread, so
    the same seed draws the same transforms."""
    workers = 1 if transform is not None else int(workers or default_workers())
    iterator = iter(items)
    with ThreadPoolExecutor(
        workers, thread_name_prefix="imaging_ad-read", initializer=background_priority
    ) as pool:
        pending: deque[Future[Outcome]] = deque()
        try:
            while True:
                for item in iterator:
                    pending.append(pool.submit(load, item, preprocessor, keep_records, transform, reader))
                    if len(pending) >= max(depth, workers):
                        break
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for future in pending:  # a consumer that stops early must not wait for the rest
                future.cancel()


def batches(loaded: Iterable[Outcome], batch_size: int) -> Iterator[list[Outcome]]:
    """Group a read-ahead stream so that each batch holds ``batch_size`` readable items (fewer at the end);
    unreadable items travel in the batch they arrived in, so input order is kept."""
    group: list[Outcome] = []
    for entry in loaded:
        group.append(entry)
        if sum(e.ok for e in group) >= batch_size:
            yield group
            group = []
    if group:
        yield group


def stacked(batch: list[Outcome]) -> np.ndarray:
    """The readable items' model inputs as one (B, 3, S, S) array."""
    return np.stack([entry.image for entry in batch if entry.ok])


def stream_batches(
    model: Scorer,
    items: Iterable[ImageInput],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    keep_records: bool = False,
    threshold: float | None = None,
    reader: Callable[[ImageInput], ImageRecord | np.ndarray] = to_record,
) -> Iterator[list[Outcome]]:
    """Score ``items`` with ``model``, a batch of outcomes at a time, in input order.

    Heatmaps are brought to each image's original size only when a result's ``heatmap`` is read (a scan
    that draws overlays of flagged images only never pays for the rest). ``threshold`` overrides the
    calibrated image threshold for the verdicts (a raw score). Non-finite scores or heatmaps become
    errors, never verdicts."""
    preprocessor, calibration = model.preprocessor_, model.calibration_
    threshold = calibration.image_threshold if threshold is None else float(threshold)
    size = int(batch_size or model.batch_size)
    loaded = read_ahead(
        items, preprocessor, workers=workers, depth=2 * size, keep_records=keep_records, reader=reader
    )
    for batch in batches(loaded, size):
        readable = [entry for entry in batch if entry.ok]
        if readable:
            scores, heatmaps, *guard = model.score_batch(stacked(batch))
            distances = guard[0] if guard and guard[0] is not None else [None] * len(readable)
            normalized = calibration.normalize(scores)
            problems = non_finite_errors(scores, heatmaps)  # a NaN score or map: an error, never a verdict
            for entry, score, norm, heatmap, problem, distance in zip(
                readable, scores, normalized, heatmaps, problems, distances, strict=True
            ):
                entry.image = None
                if problem is not None:
                    entry.fail(problem, NON_FINITE_CODE)
                    continue
                domain_score, outside = domain_verdict(
                    distance, calibration.domain_threshold, entry.facts, calibration.training_facts
                )
                entry.result = AnomalyResult(
                    float(score),
                    float(norm),
                    bool(score > threshold),
                    _to_original(preprocessor, heatmap, entry.size),
                    entry.path,
                    domain_score=domain_score,
                    out_of_domain=outside,
                )
        yield batch


def stream(
    model: Scorer, items: Iterable[ImageInput], on_batch: Callable[[int], None] | None = None, **options
) -> Iterator[Outcome]:
    """:func:`stream_batches` one outcome at a time; ``on_batch(n)`` is called after each batch of n items."""
    for batch in stream_batches(model, items, **options):
        yield from batch
        if on_batch is not None:
            on_batch(len(batch))


def predict_all(model: Scorer, items: Iterable[ImageInput], **options) -> list[AnomalyResult]:
    """Every item's result (:func:`stream`'s options): an image whose score or map is not finite gets a
    result with ``error`` set and no verdict; the first item that cannot be read raises its error."""
    results = []
    for outcome in stream(model, items, **options):
        if outcome.error_code == NON_FINITE_CODE:
            results.append(AnomalyResult.failed(outcome.path, outcome.reason))
        elif not outcome.ok:
            raise outcome.exception or ValueError(outcome.error)
        else:
            results.append(outcome.result)
    return results


def _to_original(
    preprocessor: Preprocessor, heatmap: np.ndarray, size: tuple[int, int]
) -> Callable[[], np.ndarray]:
    return lambda: preprocessor.heatmap_to_original(heatmap, size)


def background_priority() -> None:
    """Let the model's compute threads win the CPU over reading (Linux; elsewhere a no-op).

    On a machine with few cores a reader that preempts one of torch's OpenMP threads stalls the others at
    the next barrier, which costs more than the read itself. At a lower priority the readers run in the
    gaps (Python between ops, single-threaded steps) and, should they fall behind, whenever the model
    waits for them, so the model never starves."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(AttributeError, OSError):
            thread = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, thread) + BACKGROUND_NICE
            os.setpriority(os.PRIO_PROCESS, thread, min(nice, 19))
