"""Scoring a scan on a Ray cluster: a pool of model-holding actors, the driver keeping the outputs.

The scan itself (:func:`imaging_ad.scan.scan`) stays where it is: the driver lists the files, decides
what is already done, and writes every row, overlay and the report through the same store and writer
as a local scan. Only scoring moves: the driver cuts the files still to do into blocks and hands them
to actors, each of which loads the model once and scores its blocks with the one inference stream
(:func:`imaging_ad.inference.stream_batches`), so the scores are the local scan's to the last bit. An
actor draws the overlays of its own images (the pixels are where it is) and sends back one small record
per file, carrying the file's path, because blocks finish in any order.

Crash safety comes from three places. Rows are appended (fsync'ed) as each block comes back, so a
killed driver loses at most the blocks in flight and a re-run skips the rest (the store's resume). The
actors are created with ``max_restarts=-1, max_task_retries=-1``: a killed worker process is restarted
and its unfinished blocks are run again by Ray; a block's result reaches the driver once, and the driver
still drops a second result for a file it has written (exactly one row per file in every case).

Ray is imported only here, only when ``engine="ray"``: a local scan never imports it. On a real cluster
every node needs ``imaging-ad[cluster]`` installed and must read the model file and the input folder at
the same paths as the driver (a shared file system); the outputs are written by the driver only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from imaging_ad.calibration import Calibration
from imaging_ad.result import AnomalyResult
from imaging_ad.scan.runner import RenderedOutcome, ScanError, render_overlay, wants_overlay

log = logging.getLogger("imaging_ad.scan")

#: blocks of this many batches go to an actor at a time: big enough to keep its read-ahead busy,
#: small enough that a killed worker costs little work and progress moves often
BATCHES_PER_BLOCK = 4
#: blocks queued per actor, so that it never waits for the driver between two blocks
IN_FLIGHT_PER_ACTOR = 2


#: how a Ray started by the scan itself runs (see RayEngine._start)
LOCAL_RAY_OPTIONS: dict[str, Any] = {"include_dashboard": False, "_system_config": {"worker_niceness": 0}}


def require_ray() -> Any:
    """The ``ray`` module, or a clear setup error naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ScanError(
            'engine="ray" needs Ray: pip install "imaging-ad[cluster]" (or pip install "ray[data]>=2.9")'
        ) from exc
    return ray


@dataclass(frozen=True)
class DescribedModel:
    """What the driver needs of the model to write rows, read from the model file's header only: its
    calibration (threshold, overlay colour scale), name and batch size. The network stays on the workers."""

    name: str
    calibration_: Calibration
    batch_size: int


@dataclass(frozen=True)
class _Scored:
    """One file's outcome as a worker sends it back: small, picklable, and carrying its path."""

    path: str
    reason: str | None
    error_code: str | None
    size: tuple[int, int] | None = None
    score: float = float("nan")
    normalized_score: float = float("nan")
    is_anomaly: bool | None = None
    domain_score: float | None = None
    out_of_domain: tuple[str, ...] = ()
    overlay_png: bytes | None = None  # drawn when the heatmap mode asks for this file's overlay

    def outcome(self) -> RenderedOutcome:
        """The outcome the scan's writer takes, as the local stream would have given it."""
        outcome = RenderedOutcome(self.path, self.path, size=self.size, overlay_png=self.overlay_png)
        if self.reason is not None:
            return outcome.fail(self.reason, self.error_code or "unreadable")
        outcome.result = AnomalyResult(
            self.score,
            self.normalized_score,
            self.is_anomaly,
            None,
            self.path,
            domain_score=self.domain_score,
            out_of_domain=self.out_of_domain,
        )
        return outcome


class ScanWorker:
    """A Ray actor's state: the model, loaded once from the model file, scoring block after block."""

    def __init__(self, model_path: str, device: str, read_threads: int) -> None:
        from imaging_ad.detectors import load_detector, read_description

        self.detector = load_detector(Path(model_path), device=device)
        self.fingerprint = read_description(Path(model_path))["sha256"]
        self.read_threads = read_threads

    def identity(self) -> tuple[str, int]:
        """(model fingerprint, process id): the driver checks the one, kill tests use the other."""
        return self.fingerprint, os.getpid()

    def score(
        self, paths: list[str], batch_size: int, threshold: float, heatmaps: str, max_pixels: int
    ) -> list[_Scored]:
        """Score one block with the local scan's stream and options; overlays drawn as it would draw them."""
        from imaging_ad.inference import stream_batches
        from imaging_ad.io import read_image

        scored = []
        for batch in stream_batches(
            self.detector,
            paths,
            batch_size=batch_size,
            workers=self.read_threads,
            keep_records=heatmaps != "none",
            threshold=threshold,
            reader=partial(read_image, max_pixels=max_pixels),
        ):
            for outcome in batch:
                if not outcome.ok:
                    scored.append(_Scored(outcome.path, outcome.reason, outcome.error_code))
                    continue
                result = outcome.result
                draw = wants_overlay(heatmaps, result)
                png = render_overlay(outcome, self.detector.calibration_, outcome.path) if draw else None
                outcome.record = None
                scored.append(
                    _Scored(
                        outcome.path,
                        None,
                        None,
                        tuple(outcome.size),
                        result.score,
                        result.normalized_score,
                        result.is_anomaly,
                        result.domain_score,
                        tuple(result.out_of_domain),
                        png,
                    )
                )
        return scored


class RayEngine:
    """The scan's scoring on a Ray cluster (see the module docstring). Connects, or starts a local Ray,
    only when there is something to score; :meth:`close` ends the actors (and a Ray it started)."""

    def __init__(
        self,
        model_path: Path,
        description: dict,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        device: str = "auto",
    ) -> None:
        require_ray()
        if workers is not None and workers < 1:
            raise ScanError(f"workers must be at least 1, got {workers}")
        self.model_path = Path(model_path).resolve()
        self.fingerprint = description["sha256"]
        self.model = DescribedModel(
            description["detector"],
            Calibration.from_dict(description["calibration"]),
            int(description["params"].get("batch_size") or 16),
        )
        self.address = address
        self.n_workers = workers
        self.gpus_per_worker = float(gpus_per_worker)
        self.device = device
        self.actors: list[Any] = []
        self.pids: list[int] = []
        self._started_ray = False

    def _start(self) -> None:
        ray = require_ray()
        if not ray.is_initialized():
            # a Ray started here needs no dashboard, and its workers score at this process's priority
            # (Ray's default worker niceness, 15, would let any other job on the machine starve them);
            # an existing cluster's settings are its own
            options = LOCAL_RAY_OPTIONS if self.address is None else {}
            ray.init(address=self.address, log_to_driver=False, **options)
            self._started_ray = True
        elif self.address is not None:
            log.info("Ray is initialised already in this process; using that cluster, not %s", self.address)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        n = self.n_workers or max(1, cpus)
        # actors that can never be placed would wait forever: say so instead of hanging
        if n > cpus:
            raise ScanError(
                f"{n} Ray workers need {n} CPUs, the cluster has {cpus}; use --workers {max(1, cpus)}"
            )
        if n * self.gpus_per_worker > gpus:
            raise ScanError(
                f"{n} Ray workers of {self.gpus_per_worker:g} GPU(s) need {n * self.gpus_per_worker:g} GPUs, "
                f"the cluster has {gpus:g}"
            )
        actor = ray.remote(ScanWorker).options(
            num_cpus=1,
            num_gpus=self.gpus_per_worker,
            max_restarts=-1,  # a killed worker process is replaced ...
            max_task_retries=-1,  # ... and the blocks it had are run again
        )
        # reading threads per actor: the model thread takes the actor's CPU, reading fills its gaps
        self.actors = [actor.remote(str(self.model_path), self.device, 2) for _ in range(n)]
        try:
            identities = ray.get([a.identity.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            raise ScanError(f"the Ray workers could not load {self.model_path}: {exc}") from exc
        for fingerprint, _pid in identities:
            if fingerprint != self.fingerprint:
                raise ScanError(
                    f"a Ray worker read another model at {self.model_path} (fingerprint {fingerprint[:12]}…, "
                    f"the driver's {self.fingerprint[:12]}…): the path must name the same file on every node"
                )
        self.pids = [pid for _fingerprint, pid in identities]
        log.info("scoring on %d Ray worker(s)", n)

    def batches(
        self, paths: list[Path], batch_size: int, threshold: float, heatmaps: str, max_pixels: int
    ) -> Iterator[list[RenderedOutcome]]:
        """Each block's outcomes as it finishes (any order; every outcome names its file), each file once."""
        if not paths:
            return
        ray = require_ray()
        self._start()
        block = max(1, batch_size * BATCHES_PER_BLOCK)
        blocks = [[str(p) for p in paths[i : i + block]] for i in range(0, len(paths), block)]
        blocks.reverse()  # popped from the end: handed out in listing order
        expected = {str(p) for p in paths}
        pending: dict[Any, Any] = {}
        load = dict.fromkeys(range(len(self.actors)), 0)
        while blocks or pending:
            for index in sorted(load, key=load.get):  # the least busy actors first
                while blocks and load[index] < IN_FLIGHT_PER_ACTOR:
                    ref = self.actors[index].score.remote(
                        blocks.pop(), batch_size, threshold, heatmaps, max_pixels
                    )
                    pending[ref] = index
                    load[index] += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            load[pending.pop(ref)] -= 1
            scored = ray.get(ref)  # a worker that died is restarted and the block retried by Ray
            fresh = []
            for item in scored:
                if item.path in expected:  # never a second row for a file
                    expected.discard(item.path)
                    fresh.append(item.outcome())
            if len(fresh) != len(scored):
                log.warning("dropped %d duplicate result(s) from a retried block", len(scored) - len(fresh))
            if fresh:
                yield fresh

    def close(self) -> None:
        """End the actors, and the local Ray this engine started (a cluster it joined stays up)."""
        if not self.actors and not self._started_ray:
            return
        ray = require_ray()
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001  (already gone)
                log.debug("actor already gone", exc_info=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
