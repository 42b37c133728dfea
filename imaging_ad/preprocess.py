"""One preprocessing pipeline, shared by fitting, predicting and export.

Steps, in order: intensity scaling to [0, 1] (explicit windowing or percentile stretch for data
deeper than 8 bits), optional CLAHE for radiographs, a resize that keeps the whole image (no centre
crop that could cut a defect away), grayscale to the backbone's 3 channels, and the backbone's
normalisation. The geometry is invertible so heatmaps go back to the original resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import albumentations as A
import cv2
import numpy as np
import torch

from imaging_ad.intensity import INTENSITY_MODES
from imaging_ad.io.record import ImageRecord
from imaging_ad.preprocess_settings import ASPECT_MODES, Geometry, PreprocessingSettings

__all__ = ["ASPECT_MODES", "INTENSITY_MODES", "Geometry", "PreprocessingSettings", "Preprocessor"]


@dataclass
class Preprocessor(PreprocessingSettings):
    """Image record -> normalised CHW float tensor, built from :class:`PreprocessingSettings` (saved as
    JSON with models)."""

    _pipeline: A.Compose | None = field(default=None, init=False, repr=False, compare=False)
    _gray_pipeline: A.Compose | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pipeline = self._build_pipeline()
        self._gray_pipeline = self._build_gray_pipeline()

    @classmethod
    def for_backbone(cls, backbone, **overrides) -> Preprocessor:
        """Normalisation and interpolation from a :class:`FeatureExtractor`; the rest from ``overrides``."""
        norm = backbone.normalization
        defaults = {"mean": norm.mean, "std": norm.std, "interpolation": norm.interpolation}
        return cls(**{**defaults, **overrides})

    # -- the steps ---------------------------------------------------------------------------------

    def __call__(self, record: ImageRecord | np.ndarray) -> torch.Tensor:
        """One image -> (3, image_size, image_size) float32 tensor ready for the backbone."""
        image = self.scale_intensity(record)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if self.clahe:
            image = self._apply_clahe(image)
        if self._gray_pipeline is not None:
            if image.ndim == 3 and _channels_equal(image):
                # grayscale stored as RGB (common for X-rays): the same tensor up to OpenCV resizing
                # one channel and three in different rounding order (<= 1 float32 ulp)
                image = image[..., 0]
            if image.ndim == 2:
                # the same arithmetic on one channel, copied to three once at the end: 3x less work
                gray = self._gray_pipeline(image=image)["image"]
                return torch.from_numpy(gray).expand(3, *gray.shape).contiguous()
        out = self._pipeline(image=image)["image"]
        if out.ndim == 2:
            out = np.repeat(out[..., None], 3, axis=2)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    # -- internals ---------------------------------------------------------------------------------

    def _geometry_transforms(self) -> list[A.BasicTransform]:
        interpolation = self.cv2_interpolation
        size = self.image_size
        if self.aspect == "stretch":
            return [A.Resize(size, size, interpolation=interpolation, area_for_downscale="image")]
        return [
            A.LongestMaxSize(max_size=size, interpolation=interpolation, area_for_downscale="image"),
            A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0),
        ]

    def _build_pipeline(self) -> A.Compose:
        normalise = A.Normalize(mean=self.mean, std=self.std, max_pixel_value=1.0)
        return A.Compose([*self._geometry_transforms(), _ToThreeChannels(), normalise])

    def _build_gray_pipeline(self) -> A.Compose | None:
        """For grayscale input when every channel is normalised alike (mean and std the same for all)."""
        if len(set(self.mean)) != 1 or len(set(self.std)) != 1:
            return None
        normalise = A.Normalize(mean=self.mean[:1], std=self.std[:1], max_pixel_value=1.0)
        return A.Compose([*self._geometry_transforms(), normalise])

    def _apply_clahe(self, image: np.ndarray) -> np.ndarray:
        # OpenCV's CLAHE works on 8-bit data; intensity is already windowed to [0, 1] at this point.
        as_uint8 = np.round(image * 255).astype(np.uint8)
        clahe = A.CLAHE(
            clip_limit=(self.clahe_clip_limit, self.clahe_clip_limit), tile_grid_size=(8, 8), p=1.0
        )
        return clahe(image=as_uint8)["image"].astype(np.float32) / 255.0


def _channels_equal(image: np.ndarray) -> bool:
    first = image[..., 0]
    return all(np.array_equal(first, image[..., c]) for c in range(1, image.shape[2]))


class _ToThreeChannels(A.ImageOnlyTransform):
    """Grayscale -> 3 identical channels, as late as possible (after resizing, so it is done once)."""

    def __init__(self) -> None:
        super().__init__(p=1.0)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        if img.ndim == 2:
            return np.repeat(img[..., None], 3, axis=2)
        if img.shape[2] == 1:
            return np.repeat(img, 3, axis=2)
        return img
