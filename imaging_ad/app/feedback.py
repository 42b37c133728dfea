"""Learning from the reviews: errors at a threshold, a threshold suggested by the verdicts, reviewed
normals added to a PatchCore memory bank (``PatchCore.extend_memory_bank``), and a drift check of
recent scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imaging_ad.app.review_store import QueueItem

if TYPE_CHECKING:  # pragma: no cover
    from imaging_ad.calibration import Calibration
    from imaging_ad.io.items import ImageInput


# -- threshold arithmetic ---------------------------------------------------------------------------


def raw_threshold(calibration: Calibration, normalized: float) -> float:
    """The raw score whose normalised score is ``normalized`` (inverse of ``Calibration.normalize``)."""
    return calibration.raw_score(normalized)


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
    n_images: int  # added to the bank
    n_calibration: int  # kept out of the bank to recalibrate on


def extend_patchcore_bank(
    model_path: str | Path,
    images: Sequence[ImageInput],
    out_path: str | Path,
    *,
    rows_per_image: int | None = None,
    device: str = "cpu",
    trust=None,  # imaging_ad.trust.TrustPolicy the source model must satisfy (default: the environment's)
) -> BankExtension:
    """A new PatchCore model file: the model at ``model_path`` with patches of images reviewed as normal
    added to its memory bank, so that they and images like them score lower, and recalibrated.

    Calibration must come from normal images that are not in the bank, so every other reviewed normal
    (in the order given) is kept out of the bank to recalibrate on: at least four are needed. Thresholds
    resting on a few images are rough; the model file says how many it used."""
    from imaging_ad.detectors import load_detector

    images = list(images)
    if len(images) < 4:
        raise ValueError(
            f"{len(images)} image(s) reviewed as normal: at least 4 are needed (half extend the memory bank, "
            "half recalibrate the thresholds)"
        )
    detector = load_detector(Path(model_path), device=device, trust=trust)
    if detector.name != "patchcore":
        raise ValueError(f"only PatchCore models have a memory bank to extend; this one is {detector.name}")
    detector.progress = False
    rows_before = int(detector.memory_bank_.shape[0])
    added = detector.extend_memory_bank(images[0::2], images[1::2], rows_per_image=rows_per_image)
    path = detector.save(out_path)
    return BankExtension(path, rows_before, added, len(images[0::2]), len(images[1::2]))


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
