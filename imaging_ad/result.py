"""One image's verdict, as every detector and the runtime of exported models return it (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AnomalyResult:
    """One image's verdict. ``heatmap`` is float32 at the original image's height and width."""

    score: float
    normalized_score: float
    is_anomaly: bool
    heatmap: np.ndarray
    path: str | None = None

    def anomaly_mask(self, pixel_threshold: float) -> np.ndarray:
        return self.heatmap >= pixel_threshold
