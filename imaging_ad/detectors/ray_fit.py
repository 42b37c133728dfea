"""Fitting on a Ray cluster: detectors whose fit is a sum over images (PaDiM, DFM), split over workers.

A PaDiM or DFM fit is one pass that adds up per-image quantities (:attr:`Detector.fit_statistics`:
counts, sums, sums of outer products, DFM's pooled vectors) and an ``end_fit`` that turns the totals
into Gaussians. So the driver sets the detector up and begins the fit, each Ray task extracts the
features of one contiguous shard of the images and accumulates that shard's statistics (and the
out-of-domain guard's vectors and image facts), and the driver adds the shards' statistics, in shard
order, and ends the fit: the result equals a one-machine fit up to float64 rounding of the sums.

Calibration is the one-machine fit's cross-fitted calibration, with its backbone pass split the same
way: the fitted detector goes to the workers, each scores its share of the calibration images without
them (``cross_fitted_evidence``), and the driver sets the thresholds from all of it in image order
(``_thresholds``), then the domain guard (``_with_domain_guard``). It mirrors the cross-fitted branch of
:meth:`Detector.fit`; PatchCore's two-level coreset is not done here (see the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.components.domain_guard import FitRecorder, guard_positions
from imaging_ad.io.items import ImageInput, item_path


def fit_on_ray(
    detector: Detector,
    normal_images: Sequence[ImageInput],
    *,
    workers: int | None = None,
    address: str | None = None,
) -> Detector:
    """Fit ``detector`` (PaDiM or DFM) on ``normal_images`` with ``workers`` Ray tasks (default: one per
    CPU of the cluster; ``address`` as for ``ray.init``, default: the connected or a new local Ray).
    Images are file paths every node can read. Returns the detector, fitted and calibrated."""
    import ray

    if not detector.fit_statistics or detector.cross_fitting is None:
        raise ValueError(
            f"{detector.name} cannot be fitted on a cluster: only detectors whose fit is a sum over images "
            "with cross-fitted calibration can (PaDiM, DFM)"
        )
    detector.validate_params()
    images = list(normal_images)
    if len(images) < 3:
        raise ValueError(f"{len(images)} normal image(s): cross-fitted calibration needs at least 3")
    started = False
    if not ray.is_initialized():
        from imaging_ad.scan.ray_engine import LOCAL_RAY_OPTIONS

        ray.init(address=address, log_to_driver=False, **(LOCAL_RAY_OPTIONS if address is None else {}))
        started = True
    try:
        n = max(1, min(workers or int(ray.cluster_resources().get("CPU", 1)), len(images)))
        positions = guard_positions(detector.feature_strides)
        chosen = detector._calibration_choice(len(images))
        detector._setup()
        detector.begin_fit(len(images))
        # 1. statistics: each task a contiguous shard; a task whose worker dies is run again by Ray
        learn = ray.remote(num_cpus=1, max_retries=3)(_learn_shard)
        state = ray.put(detector)
        parts = ray.get([learn.remote(state, images[a:b]) for a, b in _shards(len(images), n)])
        for name in detector.fit_statistics:
            setattr(detector, name, _added([part[0][name] for part in parts]))
        detector.end_fit()
        detector.refresh_head()
        recorder = FitRecorder(positions)
        recorder.vectors = [vector for part in parts for vector in part[1]]
        recorder.facts = [fact for part in parts for fact in part[2]]
        del parts
        # 2. cross-fitted calibration: the fitted detector scores each shard of the chosen images
        evidence_of = ray.remote(num_cpus=1, max_retries=3)(_cross_fitted_shard)
        state = ray.put(detector)
        pieces = [chosen[a:b] for a, b in _shards(len(chosen), n)]
        results = ray.get([evidence_of.remote(state, [images[i] for i in p], p) for p in pieces])
        evidence = [item for result in results for item in result[0]]
        sizes = [size for result in results for size in result[1]]
        names = [item_path(images[i]) or f"training image {i}" for i in chosen]
        calibration = detector._thresholds(
            evidence,
            sizes,
            f"cross-fitted ({detector.cross_fitting})",
            f"{len(images)} training normals (fitted on {n} Ray workers)",
            names,
        )
        detector.calibration_ = detector._with_domain_guard(
            calibration, recorder.reference(detector.max_guard_images, detector.seed), recorder.facts
        )
        detector.release_fit_state()
        detector._warn_about_calibration()
        return detector
    finally:
        if started:
            ray.shutdown()


def _shards(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous, near-equal ranges covering ``range(n)``, in order."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _added(values: list[Any]) -> Any:
    """The shards' values of one statistic combined: lists join in order, numbers and tensors add up."""
    if isinstance(values[0], list):
        return [item for value in values for item in value]
    present = [value for value in values if value is not None]
    total = present[0]
    for value in present[1:]:
        total = total + value
    return total


def _learn_shard(detector: Detector, images: list[ImageInput]) -> tuple[dict[str, Any], list, list]:
    """One shard's fit statistics, guard vectors and image facts (a Ray task, on its own copy)."""
    torch.set_num_threads(1)
    recorder = FitRecorder(guard_positions(detector.feature_strides))
    for features, _batch in detector.extracted_batches(
        images, f"{detector.name}: fit shard", recorder=recorder
    ):
        detector.partial_fit(features)
    return (
        {name: getattr(detector, name) for name in detector.fit_statistics},
        recorder.vectors,
        recorder.facts,
    )


def _cross_fitted_shard(
    detector: Detector, images: list[ImageInput], positions: list[int]
) -> tuple[list, list[tuple[int, int]]]:
    """The cross-fitted evidence (scores and maps) and original sizes of one shard of calibration images."""
    torch.set_num_threads(1)
    evidence, sizes = [], []
    remaining = list(positions)
    for features, batch in detector.extracted_batches(images, f"{detector.name}: calibrate shard"):
        here, remaining = remaining[: len(batch)], remaining[len(batch) :]
        scores, maps = detector.cross_fitted_evidence(features, here)
        evidence.append((scores.cpu(), maps.cpu()))
        sizes += [entry.size for entry in batch]
    return evidence, sizes
