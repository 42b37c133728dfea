"""Fitting on a Ray cluster: PaDiM and DFM (a sum over images) and PatchCore (a two-level coreset).

A PaDiM or DFM fit is one pass that adds up per-image quantities (:attr:`Detector.fit_statistics`:
counts, sums, sums of outer products, DFM's pooled vectors) and an ``end_fit`` that turns the totals
into Gaussians. So each Ray task extracts the features of one contiguous shard of the images and
accumulates that shard's statistics, and the driver adds the shards' statistics, in shard order, and ends
the fit: the result equals a one-machine fit up to float64 rounding of the sums.

PatchCore's memory bank is no sum, so it is chosen by the one-machine fit's own two-level greedy coreset
(PatchCore's ``coreset_oversampling``): each task runs the first level over its shard's patches, keeping
its share of the bank times ``coreset_oversampling``, each row with its image's position in the training
list; the driver runs the second level over the union, in shard order
(:meth:`PatchCore.select_memory_bank`), to the size a one-machine fit keeps. The bank differs from a
one-machine fit's only where chunks of the first level meet a shard boundary, so the acceptance is by its
accuracy: benchmarks/bench_ray_fit.py.

Every task also records its images' out-of-domain guard vectors and facts. Calibration is the
one-machine fit's cross-fitted calibration (the :class:`Detector` steps ``begin_cross_fitted_fit``,
``cross_fitted_calibration``, ``complete_fit`` that :meth:`Detector.fit` runs too), with its backbone pass
split the same way: the fitted detector goes to the workers, each scores its share of the calibration
images without them (``cross_fitted_evidence``: for PatchCore, without the bank rows their own patches
put there, which the rows' image positions tell), and the driver sets the thresholds (and PatchCore's
per-position statistics) from all of it in image order, then the domain guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.components.domain_guard import FitRecorder, guard_positions
from imaging_ad.detectors.patchcore import PatchCore
from imaging_ad.io.items import ImageInput, item_path


def fits_on_ray(detector: Detector) -> bool:
    """Whether :func:`fit_on_ray` can fit ``detector``: PatchCore (two-level coreset) or a detector whose fit
    is a sum over images, either with cross-fitted calibration."""
    summed_or_coreset = bool(detector.fit_statistics) or isinstance(detector, PatchCore)
    return summed_or_coreset and detector.cross_fitting is not None


def fit_on_ray(
    detector: Detector,
    normal_images: Sequence[ImageInput],
    *,
    workers: int | None = None,
    address: str | None = None,
) -> Detector:
    """Fit ``detector`` (PaDiM, DFM or PatchCore) on ``normal_images`` with ``workers`` Ray tasks (default:
    one per CPU of the cluster; ``address`` as for ``ray.init``, default: the connected or a new local Ray).
    Images are file paths every node can read. Returns the detector, fitted and calibrated."""
    import ray

    if not fits_on_ray(detector):
        raise ValueError(
            f"{detector.name} cannot be fitted on a cluster: only PatchCore and detectors whose fit is a sum "
            "over images with cross-fitted calibration can (PaDiM, DFM)"
        )
    two_level = isinstance(detector, PatchCore)
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
        chosen = detector.begin_cross_fitted_fit(len(images))
        shards = _shards(len(images), n)
        # 1. learning: each task a contiguous shard; a task whose worker dies is run again by Ray
        if two_level:
            recorder = _two_level_coreset(ray, detector, images, shards)
        else:
            recorder = _summed_statistics(ray, detector, images, shards)
        # 2. cross-fitted calibration: the fitted detector scores each shard of the chosen images
        evidence_of = ray.remote(num_cpus=1, max_retries=3)(_cross_fitted_shard)
        state = ray.put(detector)
        pieces = [chosen[a:b] for a, b in _shards(len(chosen), n)]
        results = ray.get([evidence_of.remote(state, [images[i] for i in p], p) for p in pieces])
        evidence = [item for result in results for item in result[0]]
        sizes = [size for result in results for size in result[1]]
        names = [item_path(images[i]) or f"training image {i}" for i in chosen]
        source = f"{len(images)} training normals (fitted on {n} Ray workers)"
        calibration = detector.cross_fitted_calibration(evidence, sizes, names, source)
        return detector.complete_fit(calibration, recorder)
    finally:
        if started:
            ray.shutdown()


def _summed_statistics(
    ray: Any, detector: Detector, images: list[ImageInput], shards: list[tuple[int, int]]
) -> FitRecorder:
    """PaDiM's or DFM's fit: the shards' statistics added up on the driver; returns the guard's record."""
    detector.begin_fit(len(images))
    learn = ray.remote(num_cpus=1, max_retries=3)(_learn_shard)
    state = ray.put(detector)
    parts = ray.get([learn.remote(state, images[a:b]) for a, b in shards])
    for name in detector.fit_statistics:
        setattr(detector, name, _added([part[0][name] for part in parts]))
    detector.end_fit()
    detector.refresh_head()
    return _joined_record(detector, [(part[1], part[2]) for part in parts])


def _two_level_coreset(
    ray: Any, detector: PatchCore, images: list[ImageInput], shards: list[tuple[int, int]]
) -> FitRecorder:
    """PatchCore's fit: the coreset's first level on each shard, its second on the driver over their union
    (rows keeping their images' positions); returns the guard's record."""
    reduce = ray.remote(num_cpus=1, max_retries=3)(_coreset_shard)
    state = ray.put(detector)
    parts = ray.get([reduce.remote(state, images[a:b], a, len(images)) for a, b in shards])
    candidates = torch.cat([part[0] for part in parts])
    sources = torch.cat([part[1] for part in parts])
    detector.select_memory_bank(candidates, sources, len(images), parts[0][2])
    return _joined_record(detector, [(part[3], part[4]) for part in parts])


def _joined_record(detector: Detector, parts: list[tuple[list, list]]) -> FitRecorder:
    """The shards' guard vectors and image facts, in shard order, as one fit's recorder holds them."""
    recorder = FitRecorder(guard_positions(detector.feature_strides))
    recorder.vectors = [vector for vectors, _ in parts for vector in vectors]
    recorder.facts = [fact for _, facts in parts for fact in facts]
    return recorder


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


def _coreset_shard(
    detector: PatchCore, images: list[ImageInput], first: int, n_images: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], list, list]:
    """One shard's first coreset level (a Ray task, on its own copy): ``coreset_oversampling`` times the
    shard's share of the bank a one-machine fit on all ``n_images`` keeps (at most every patch), each
    row's image position (the shard starts at ``first``), the feature grid, and the guard vectors and
    image facts."""
    torch.set_num_threads(1)
    recorder = FitRecorder(guard_positions(detector.feature_strides))
    detector.begin_fit(len(images), first_image=first, total_images=n_images)
    for features, _batch in detector.extracted_batches(
        images, f"{detector.name}: coreset shard", recorder=recorder
    ):
        detector.partial_fit(features)
    return (*detector.selected_rows(), recorder.vectors, recorder.facts)


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
