"""One image's verdict, as every detector and the runtime of exported models return it (torch-free).

A result either holds a verdict (finite score, ``is_anomaly`` True or False) or an ``error`` and no
verdict at all: a NaN score compares False with every threshold, so it would otherwise read as
"normal". :func:`non_finite_errors` is the one check the inference stream (``Detector.predict``, the
exported runtime, ``scan``, ``imaging-ad predict``) runs on its scores and maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

#: the error code of a result whose score or anomaly map is NaN or infinite (scan rows, reports)
NON_FINITE_CODE = "non_finite_score"


class AnomalyResult:
    """One image's verdict. ``heatmap`` is float32 at the original image's height and width; it may be
    given as a function that computes it (the inference stream does, so resizing a heatmap to its image's
    size is paid only by callers that look at it).

    When ``error`` is set there is no verdict: ``is_anomaly`` is None, the scores are NaN and the heatmap
    is None; ``error`` says why (e.g. the model's score for this image was NaN)."""

    __slots__ = (
        "score",
        "normalized_score",
        "is_anomaly",
        "path",
        "error",
        "domain_score",
        "out_of_domain",
        "_heatmap",
    )

    def __init__(
        self,
        score: float,
        normalized_score: float,
        is_anomaly: bool | None,
        heatmap: np.ndarray | Callable[[], np.ndarray] | None,
        path: str | None = None,
        error: str | None = None,
        *,
        domain_score: float | None = None,
        out_of_domain: tuple[str, ...] = (),
    ) -> None:
        self.score = score
        self.normalized_score = normalized_score
        self.is_anomaly = is_anomaly
        self.path = path
        self.error = error
        #: the out-of-domain guard's feature distance over its threshold (above 1: unlike the training
        #: images); None for models without a guard
        self.domain_score = domain_score
        #: why the image is not the kind the model was trained on (empty: it is, as far as the guard sees)
        self.out_of_domain = tuple(out_of_domain)
        self._heatmap = heatmap

    @property
    def heatmap(self) -> np.ndarray | None:
        if callable(self._heatmap):
            self._heatmap = self._heatmap()
        return self._heatmap

    @property
    def ok(self) -> bool:
        """True when this result holds a verdict."""
        return self.error is None

    @property
    def in_domain(self) -> bool:
        """False when the out-of-domain guard says the image is unlike the training images: its score is
        then not meaningful, whatever its value."""
        return not self.out_of_domain

    @property
    def verdict(self) -> str:
        """``"anomalous"``, ``"normal"``, ``"out of domain"`` (the score means nothing) or ``"error"``."""
        if not self.ok:
            return "error"
        if not self.in_domain:
            return "out of domain"
        return "anomalous" if self.is_anomaly else "normal"

    def anomaly_mask(self, pixel_threshold: float) -> np.ndarray:
        if self.heatmap is None:
            raise ValueError(f"{self.path or 'this image'}: no anomaly map ({self.error})")
        return self.heatmap >= pixel_threshold

    @classmethod
    def failed(cls, path: str | None, error: str) -> AnomalyResult:
        """A result without a verdict."""
        return cls(math.nan, math.nan, None, None, path, error)

    def __repr__(self) -> str:
        if not self.ok:
            return f"AnomalyResult(error={self.error!r}, path={self.path!r})"
        return (
            f"AnomalyResult({self.verdict}, score={self.score:.4g}, normalized_score={self.normalized_score:.3f}, "
            f"path={self.path!r})"
        )


def non_finite_errors(
    scores: Sequence[float] | np.ndarray, maps: Sequence[np.ndarray] | np.ndarray | None = None
) -> list[str | None]:
    """Per item of a scored batch: None when its score (and map, if given) are finite, else the reason.

    Maps may be at any resolution; min and max propagate NaN and show infinities, so the check makes
    no temporary of a map's size."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    errors: list[str | None] = []
    for index, score in enumerate(scores):
        if not math.isfinite(score):
            errors.append(f"the model's score for this image is {score} (not a finite number); no verdict")
            continue
        if maps is not None:
            values = np.asarray(maps[index])
            if values.size and not (
                math.isfinite(float(values.min())) and math.isfinite(float(values.max()))
            ):
                errors.append(
                    "the model's anomaly map for this image holds NaN or infinite values; no verdict"
                )
                continue
        errors.append(None)
    return errors


def without_non_finite(results: list[AnomalyResult]) -> list[AnomalyResult]:
    """``results`` with every one whose score or heatmap is not finite replaced by a failed result."""
    out = []
    for result in results:
        error = result.error
        if error is None:
            error = non_finite_errors([result.score], None if result.heatmap is None else [result.heatmap])[0]
        out.append(
            result if error is None or result.error is not None else AnomalyResult.failed(result.path, error)
        )
    return out
