"""Thresholds and score normalisation learned from normal images only.

The image threshold sits at a target false-positive rate on held-out normal images; the normalised
score is a logistic map that puts that threshold at 0.5, so scores of different models compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    image_threshold: float
    pixel_threshold: float
    score_scale: float  # spread of normal scores: how fast the normalised score saturates
    target_fpr: float
    n_normal: int  # held-out normal images the thresholds came from

    def normalize(self, scores: np.ndarray | float) -> np.ndarray:
        """Raw scores -> (0, 1), with the image threshold at exactly 0.5."""
        z = (np.asarray(scores, dtype=np.float64) - self.image_threshold) / self.score_scale
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


def calibrate(
    normal_scores: np.ndarray, normal_pixel_sample: np.ndarray, target_fpr: float = 0.01
) -> Calibration:
    """Thresholds at ``target_fpr`` on normal image scores and on a sample of normal heatmap pixels."""
    normal_scores = np.asarray(normal_scores, dtype=np.float64)
    if normal_scores.size < 2:
        raise ValueError("calibration needs at least two held-out normal images")
    if not 0.0 < target_fpr < 0.5:
        raise ValueError(f"target_fpr must be in (0, 0.5), got {target_fpr}")
    # "higher": with few normals the threshold is an observed score, never an interpolation below it.
    image_threshold = float(np.quantile(normal_scores, 1.0 - target_fpr, method="higher"))
    pixel_threshold = float(np.quantile(normal_pixel_sample, 1.0 - target_fpr))
    spread = float(np.std(normal_scores))
    scale = spread if spread > 0 else max(abs(image_threshold) * 0.1, 1e-6)
    return Calibration(image_threshold, pixel_threshold, scale, target_fpr, int(normal_scores.size))
