"""The one inference preprocessing, in NumPy and OpenCV only: fitting, predicting, scanning, export and the
torch-free runtime all use it (albumentations is for training augmentation alone).

Steps, in order: intensity scaling to [0, 1] (explicit windowing or percentile stretch for data deeper
than 8 bits), optional CLAHE for radiographs, a resize that keeps the whole image (no centre crop that
could cut a defect away), grayscale to the backbone's 3 channels, and the backbone's normalisation. The
geometry is invertible, so heatmaps go back to the original resolution. The settings are saved as JSON
with every model and export.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import cv2
import numpy as np

from imaging_ad.intensity import INTENSITY_MODES, scale_intensity
from imaging_ad.io.record import ImageRecord

__all__ = ["ASPECT_MODES", "INTENSITY_MODES", "Geometry", "Preprocessor"]

ASPECT_MODES = ("stretch", "letterbox")
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
_CLAHE_TILES = (8, 8)
_Settings = TypeVar("_Settings", bound="Preprocessor")  # typing.Self needs Python 3.11


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the square model input."""

    original_size: tuple[int, int]  # (height, width)
    content_box: tuple[int, int, int, int]  # (top, left, height, width) inside the model input


@dataclass
class Preprocessor:
    """Image record or array -> normalised (3, S, S) float32 array ready for the backbone.

    ``aspect``: ``"stretch"`` resizes to a square (keeps every pixel, distorts shape); ``"letterbox"``
    keeps the aspect ratio and pads with black.
    ``intensity``: ``"auto"`` divides 8-bit data by 255 and uses the file's display range (DICOM window)
    when known, else a percentile stretch; ``"robust"`` maps median -/+ 3 robust standard deviations to
    [0, 1] per image (evens out exposure between images, insensitive to small defects);
    ``"percentile"`` stretches between the ``percentiles``; ``"full_range"`` divides by the dtype's range.
    Shrinking uses OpenCV's INTER_AREA, enlarging ``interpolation``.
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

    @classmethod
    def for_backbone(cls: type[_Settings], backbone: Any, **overrides: Any) -> _Settings:
        """Normalisation and interpolation from a :class:`FeatureExtractor`; the rest from ``overrides``."""
        norm = backbone.normalization
        defaults = {"mean": norm.mean, "std": norm.std, "interpolation": norm.interpolation}
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(Preprocessor)}

    @classmethod
    def from_dict(cls: type[_Settings], data: dict) -> _Settings:
        """From :meth:`to_dict`. Unknown keys are refused: a setting this version does not know would
        silently change the input."""
        unknown = set(data) - {f.name for f in fields(Preprocessor)}
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}; update imaging_ad")
        return cls(**data)

    # -- the steps -----------------------------------------------------------------------------------

    def __call__(self, record: ImageRecord | np.ndarray) -> np.ndarray:
        image = self.scale_intensity(record)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if self.clahe:
            image = self._apply_clahe(image)
        if image.ndim == 3 and self._same_for_every_channel() and _channels_equal(image):
            # grayscale stored as RGB (common for X-rays): one channel is the same up to OpenCV resizing
            # one channel and three in different rounding order (<= 1 float32 ulp), for a third of the work
            image = image[..., 0]
        image = self._resize(image)
        if image.ndim == 2 and self._same_for_every_channel():
            normalised = (image - np.float32(self.mean[0])) * np.reciprocal(np.float32(self.std[0]))
            return np.ascontiguousarray(np.broadcast_to(normalised, (3, *normalised.shape)), np.float32)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        mean = np.asarray(self.mean, dtype=np.float32)
        inverse_std = np.reciprocal(np.asarray(self.std, dtype=np.float32))
        image = (image - mean) * inverse_std
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)

    def batch(self, records: Sequence[ImageRecord | np.ndarray]) -> np.ndarray:
        """Several images -> (B, 3, S, S) float32."""
        if not records:
            return np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        return np.stack([self(r) for r in records])

    def scale_intensity(self, record: ImageRecord | np.ndarray) -> np.ndarray:
        """Pixels -> float32 in [0, 1], same shape (:func:`imaging_ad.intensity.scale_intensity`)."""
        return scale_intensity(record, self.intensity, self.percentiles)

    # -- geometry ----------------------------------------------------------------------------------

    @property
    def cv2_interpolation(self) -> int:
        """The OpenCV flag for ``interpolation`` (used when enlarging; shrinking uses INTER_AREA)."""
        return INTERPOLATIONS[self.interpolation]

    def geometry(self, original_size: tuple[int, int]) -> Geometry:
        height, width = original_size
        size = self.image_size
        if self.aspect == "stretch":
            return Geometry((height, width), (0, 0, size, size))
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (size - new_h) // 2, (size - new_w) // 2  # the odd pixel goes to the bottom/right
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

    # -- internals ---------------------------------------------------------------------------------

    def _same_for_every_channel(self) -> bool:
        return len(set(self.mean)) == 1 and len(set(self.std)) == 1

    def _apply_clahe(self, image: np.ndarray) -> np.ndarray:
        # OpenCV's CLAHE works on 8-bit data; intensity is already windowed to [0, 1] at this point
        as_uint8 = np.round(image * 255).astype(np.uint8)
        clahe = cv2.createCLAHE(clipLimit=self.clahe_clip_limit, tileGridSize=_CLAHE_TILES)
        if as_uint8.ndim == 2:
            out = clahe.apply(as_uint8)
        else:  # colour: equalise lightness only
            lab = cv2.cvtColor(as_uint8, cv2.COLOR_RGB2LAB)
            lab[:, :, 0] = clahe.apply(lab[:, :, 0])
            out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        return out.astype(np.float32) / 255.0

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """Resize into the content box of :meth:`geometry` and zero-pad around it; INTER_AREA whenever a
        side shrinks."""
        height, width = image.shape[:2]
        size = self.image_size
        top, left, new_h, new_w = self.geometry((height, width)).content_box
        if (new_h, new_w) != (height, width):
            shrinks = new_h < height or new_w < width
            interpolation = cv2.INTER_AREA if shrinks else self.cv2_interpolation
            image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        if (new_h, new_w) == (size, size):
            return image
        pad = ((top, size - new_h - top), (left, size - new_w - left)) + ((0, 0),) * (image.ndim - 2)
        return np.pad(image, pad, mode="constant", constant_values=0)


def _channels_equal(image: np.ndarray) -> bool:
    first = image[..., 0]
    return all(np.array_equal(first, image[..., c]) for c in range(1, image.shape[2]))
