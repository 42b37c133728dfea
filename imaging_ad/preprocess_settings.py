"""The settings a model's preprocessing is saved with, and what follows from them alone (intensity
scaling, where the image sits in the model input, heatmaps back to the original size), in one place
for both implementations: :class:`imaging_ad.preprocess.Preprocessor` (albumentations, torch) and the
torch-free :class:`imaging_ad.export.preprocessing.NumpyPreprocessor`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar

import cv2
import numpy as np

from imaging_ad.intensity import INTENSITY_MODES, scale_intensity
from imaging_ad.io.record import ImageRecord

ASPECT_MODES = ("stretch", "letterbox")
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
_Settings = TypeVar("_Settings", bound="PreprocessingSettings")  # typing.Self needs Python 3.11


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the square model input."""

    original_size: tuple[int, int]  # (height, width)
    content_box: tuple[int, int, int, int]  # (top, left, height, width) inside the model input


@dataclass
class PreprocessingSettings:
    """``aspect``: ``"stretch"`` resizes to a square (keeps every pixel, distorts shape);
    ``"letterbox"`` keeps the aspect ratio and pads with black.
    ``intensity``: ``"auto"`` divides 8-bit data by 255 and uses the file's display range (DICOM
    window) when known, else a percentile stretch; ``"robust"`` maps median -/+ 3 robust standard
    deviations to [0, 1] per image (evens out exposure between images, insensitive to small
    defects); ``"percentile"`` stretches between the ``percentiles``; ``"full_range"`` divides by
    the dtype's range.
    """

    image_size: int = 256
    aspect: str = "stretch"
    intensity: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    clahe: bool = False
    clahe_clip_limit: float = 2.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {self.aspect!r}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        self.percentiles = tuple(float(v) for v in self.percentiles)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    @property
    def cv2_interpolation(self) -> int:
        """The OpenCV flag for ``interpolation`` (used when enlarging; shrinking uses INTER_AREA)."""
        return INTERPOLATIONS[self.interpolation]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(PreprocessingSettings)}

    @classmethod
    def from_dict(cls: type[_Settings], data: dict) -> _Settings:
        """From :meth:`to_dict`. Unknown keys are refused: a setting this version does not know would
        silently change the input."""
        unknown = set(data) - {f.name for f in fields(PreprocessingSettings)}
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}; update imaging_ad")
        return cls(**data)

    # -- what both implementations compute alike ---------------------------------------------------

    def scale_intensity(self, record: ImageRecord | np.ndarray) -> np.ndarray:
        """Pixels -> float32 in [0, 1], same shape (:func:`imaging_ad.intensity.scale_intensity`)."""
        return scale_intensity(record, self.intensity, self.percentiles)

    def geometry(self, original_size: tuple[int, int]) -> Geometry:
        height, width = original_size
        size = self.image_size
        if self.aspect == "stretch":
            return Geometry((height, width), (0, 0, size, size))
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        # PadIfNeeded(position="center") puts the odd pixel at the bottom/right.
        top, left = (size - new_h) // 2, (size - new_w) // 2
        return Geometry((height, width), (top, left, new_h, new_w))

    def heatmap_to_original(self, heatmap: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Model-input-sized (or any square) heatmap -> float32 heatmap at ``original_size``."""
        heatmap = np.asarray(heatmap, dtype=np.float32)
        if heatmap.shape != (self.image_size, self.image_size):
            heatmap = cv2.resize(heatmap, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        top, left, height, width = self.geometry(original_size).content_box
        content = heatmap[top : top + height, left : left + width]
        out_h, out_w = original_size
        return cv2.resize(content, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
