"""One image's verdict, as every detector and the runtime of exported models return it (torch-free)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class AnomalyResult:
    """One image's verdict. ``heatmap`` is float32 at the original image's height and width.

    The heatmap may be given as a function that computes it: the inference stream passes one, so that
    resizing a heatmap to its image's original size is paid only by callers that look at it."""

    __slots__ = ("score", "normalized_score", "is_anomaly", "path", "_heatmap")

    def __init__(
        self,
        score: float,
        normalized_score: float,
        is_anomaly: bool,
        heatmap: np.ndarray | Callable[[], np.ndarray],
        path: str | None = None,
    ) -> None:
        self.score = score
        self.normalized_score = normalized_score
        self.is_anomaly = is_anomaly
        self.path = path
        self._heatmap = heatmap

    @property
    def heatmap(self) -> np.ndarray:
        if callable(self._heatmap):
            self._heatmap = self._heatmap()
        return self._heatmap

    def anomaly_mask(self, pixel_threshold: float) -> np.ndarray:
        return self.heatmap >= pixel_threshold

    def __repr__(self) -> str:
        verdict = "anomalous" if self.is_anomaly else "normal"
        return (
            f"AnomalyResult({verdict}, score={self.score:.4g}, normalized_score={self.normalized_score:.3f}, "
            f"path={self.path!r})"
        )
