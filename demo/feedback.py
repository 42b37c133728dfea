"""Learning from the reviews: errors at a threshold, a threshold suggested by the verdicts, reviewed
normals added to a PatchCore memory bank, and a drift check of recent scores.

``extend_patchcore_bank`` reaches into PatchCore's learned state (``memory_bank_``) and helpers
(``_extract``, ``_embed``) from outside the detector before handing the grown bank to
``use_memory_bank``: a candidate to move into ``imaging_ad/detectors/patchcore.py`` as a public method
if it proves useful.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from demo.review_store import QueueItem

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from imaging_ad.calibration import Calibration
    from imaging_ad.detectors.inputs import ImageInput


# -- threshold arithmetic ---------------------------------------------------------------------------


def raw_threshold(calibration: Calibration, normalized: float) -> float:
    """The raw score whose normalised score is ``normalized`` (inverse of ``Calibration.normalize``)."""
    p = min(max(float(normalized), 1e-9), 1 - 1e-9)
    return calibration.image_threshold + calibration.score_scale * math.log(p / (1 - p))


def normalized_threshold(calibration: Calibration, raw: float) -> float:
    return float(calibration.normalize(raw))


@dataclass(frozen=True)
class Errors:
    threshold: float  # raw
    false_positives: list[QueueItem]  # reviewed normal, scored above the threshold
    false_negatives: list[QueueItem]  # reviewed anomalous, scored at or below it
    n_normal: int
    n_anomalous: int


def errors_at(labelled: Sequence[QueueItem], threshold: float) -> Errors:
    """False positives and negatives of reviewed items at a raw threshold (flag: score > threshold)."""
    fp = [i for i in labelled if i.verdict == "normal" and i.score > threshold]
    fn = [i for i in labelled if i.verdict == "anomalous" and i.score <= threshold]
    return Errors(
        threshold,
        sorted(fp, key=lambda i: -i.score),
        sorted(fn, key=lambda i: i.score),
        sum(i.verdict == "normal" for i in labelled),
        sum(i.verdict == "anomalous" for i in labelled),
    )


@dataclass(frozen=True)
class ThresholdSuggestion:
    threshold: float  # raw
    rule: str
    true_positive_rate: float | None
    false_positive_rate: float
    n_normal: int
    n_anomalous: int


def suggest_threshold(
    normal_scores: Sequence[float], anomalous_scores: Sequence[float]
) -> ThresholdSuggestion | None:
    """A raw threshold from reviewed scores (flag: score > threshold).

    With both kinds reviewed: the threshold maximising Youden's J (TPR - FPR), ties broken towards fewer
    false positives, placed midway between the two scores it separates. With reviewed normals only: the
    highest of them (no reviewed normal is flagged). With no reviewed normals: no suggestion.
    """
    normal = np.sort(np.asarray(normal_scores, dtype=np.float64))
    anomalous = np.sort(np.asarray(anomalous_scores, dtype=np.float64))
    if normal.size == 0:
        return None
    if anomalous.size == 0:
        return ThresholdSuggestion(
            float(normal[-1]), "highest reviewed normal score", None, 0.0, normal.size, 0
        )
    values = np.unique(np.concatenate([normal, anomalous]))
    # candidates: below everything, midpoints between neighbours, and at the top value (flags nothing)
    candidates = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2, [values[-1]]])
    fpr = 1.0 - np.searchsorted(normal, candidates, side="right") / normal.size
    tpr = 1.0 - np.searchsorted(anomalous, candidates, side="right") / anomalous.size
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    pick = best[np.argmin(fpr[best])]
    return ThresholdSuggestion(
        float(candidates[pick]),
        "best balance of sensitivity and specificity on the reviews (Youden's J)",
        float(tpr[pick]),
        float(fpr[pick]),
        normal.size,
        anomalous.size,
    )


# -- memory bank extension ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BankExtension:
    path: Path
    rows_before: int
    rows_added: int
    n_images: int


def _nearest_sq(x: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    import torch

    out = []
    bank_norms = (bank * bank).sum(1)
    for start in range(0, x.shape[0], chunk):
        q = x[start : start + chunk]
        d = (q * q).sum(1, keepdim=True) - 2 * q @ bank.T + bank_norms
        out.append(d.min(dim=1).values.clamp_min_(0))
    return torch.cat(out) if out else torch.empty(0)


def select_new_rows(bank: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-centre continued from the existing bank: up to ``k`` candidate rows, each the one
    farthest from the bank and the rows already chosen. Rows the bank already covers exactly add nothing
    and are never picked."""
    import torch

    min_d = _nearest_sq(candidates, bank)
    chosen: list[int] = []
    for _ in range(min(k, candidates.shape[0])):
        index = int(torch.argmax(min_d))
        if float(min_d[index]) <= 0.0:
            break
        chosen.append(index)
        row = candidates[index]
        d = (candidates - row).pow(2).sum(1)
        torch.minimum(min_d, d, out=min_d)
    return torch.tensor(chosen, dtype=torch.long)


def extend_patchcore_bank(
    model_path: str | Path,
    images: Sequence[ImageInput],
    out_path: str | Path,
    *,
    rows_per_image: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    trust=None,  # imaging_ad.trust.TrustPolicy the source model must satisfy (default: the environment's)
) -> BankExtension:
    """A new PatchCore model file: the model at ``model_path`` with patches of ``images`` (reviewed as
    normal) added to its memory bank, so that they and images like them score lower.

    The new rows are chosen like the fit's coreset: greedy k-centre over the new images' patch
    embeddings, continued from the existing bank, keeping ``coreset_ratio`` of them (or
    ``rows_per_image`` per image). The calibration (threshold, normalisation) is kept as it was: the
    held-out normals it came from are not stored in the model, so it cannot be redone here; adding
    normal patches only lowers distances, so the threshold errs towards fewer flags.
    """
    import torch

    from imaging_ad.detectors import load_detector
    from imaging_ad.detectors.inputs import to_record

    images = list(images)
    if not images:
        raise ValueError("no images reviewed as normal to add")
    detector = load_detector(Path(model_path), device=device, trust=trust)
    if detector.name != "patchcore":
        raise ValueError(f"only PatchCore models have a memory bank to extend; this one is {detector.name}")
    detector.progress = False
    embeddings = []
    batch = max(1, detector.batch_size)
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        tensors = torch.stack([detector.preprocessor_(to_record(im)) for im in chunk])
        with torch.inference_mode():
            emb = detector._embed(detector._extract(tensors.to(detector.device_)))
        embeddings.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float())
        if progress is not None:
            progress(min(start + batch, len(images)), len(images))
    candidates = torch.cat(embeddings)
    bank = detector.memory_bank_
    k = (
        rows_per_image * len(images)
        if rows_per_image is not None
        else max(1, round(detector.coreset_ratio * candidates.shape[0]))
    )
    with torch.inference_mode():
        chosen = select_new_rows(bank, candidates.to(bank.device), k)
    rows_before = int(bank.shape[0])
    detector.use_memory_bank(torch.cat([bank, candidates[chosen].to(bank.device)]))
    path = detector.save(out_path)
    return BankExtension(path, rows_before, int(chosen.numel()), len(images))


# -- drift ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    n_recent: int
    n_reference: int
    recent_median: float | None
    reference_median: float | None
    recent_flag_rate: float | None  # share of recent scores above the calibrated threshold
    expected_flag_rate: float  # the calibration's target false-positive rate (normals only)
    ks_statistic: float | None
    ks_pvalue: float | None
    message: str


def drift_report(recent: Sequence[float], reference: Sequence[float], calibration: Calibration) -> Drift:
    """Compare recent scores with reviewed-normal scores and with what the calibration expects.

    The calibration keeps the threshold and the spread of the held-out normal scores at fit time, not the
    scores themselves, so the distribution at fit time is represented by the images reviewed as normal.
    """
    recent_a = np.asarray(recent, dtype=np.float64)
    reference_a = np.asarray(reference, dtype=np.float64)
    flag_rate = float(np.mean(recent_a > calibration.image_threshold)) if recent_a.size else None
    ks = p = None
    if recent_a.size >= 5 and reference_a.size >= 5:
        from scipy.stats import ks_2samp

        test = ks_2samp(recent_a, reference_a)
        ks, p = float(test.statistic), float(test.pvalue)
    parts = []
    if flag_rate is not None:
        parts.append(
            f"{flag_rate:.0%} of the last {recent_a.size} images are flagged; on normal images alone the "
            f"calibration expects {calibration.target_fpr:.0%}"
        )
    if ks is not None:
        verdict = (
            "differ (p < 0.01): check for a change of scanner, protocol or population"
            if p < 0.01
            else ("are compatible")
        )
        parts.append(
            f"recent scores and reviewed-normal scores {verdict} (Kolmogorov-Smirnov D = {ks:.2f}, p = {p:.2g})"
        )
    else:
        parts.append("review at least 5 images as normal (and score 5 recent ones) for a distribution test")
    return Drift(
        int(recent_a.size),
        int(reference_a.size),
        float(np.median(recent_a)) if recent_a.size else None,
        float(np.median(reference_a)) if reference_a.size else None,
        flag_rate,
        calibration.target_fpr,
        ks,
        p,
        "; ".join(parts) + ".",
    )
