"""The preprocessing of :class:`imaging_ad.preprocess.Preprocessor` in numpy and OpenCV only.

An exported model takes the *preprocessed* tensor, so wherever it runs without torch (and without
albumentations) the same pipeline must be rebuilt from the JSON sidecar. Every step below mirrors
``Preprocessor`` and the albumentations transforms it composes (albumentations 2.0):

- intensity scaling: the same function, :func:`imaging_ad.intensity.scale_intensity`;
- CLAHE: 8-bit OpenCV CLAHE, on the L channel of LAB for colour images (``A.CLAHE``);
- ``A.Resize`` ("stretch"): INTER_AREA whenever either side shrinks, else the backbone's interpolation;
- ``A.LongestMaxSize`` + ``A.PadIfNeeded`` ("letterbox"): scale the long side, ``round`` the other, INTER_AREA
  when shrinking, then zero padding with the odd pixel at the bottom/right;
- grayscale to three channels, then ``(x - mean) * (1 / std)`` in float32.

``tests/test_export.py`` checks the output against ``Preprocessor`` to 1e-6 over every mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from imaging_ad.io.record import ImageRecord
from imaging_ad.preprocess_settings import PreprocessingSettings

_CLAHE_TILES = (8, 8)


class NumpyPreprocessor(PreprocessingSettings):
    """Image record or array -> (3, S, S) float32 array, equal to ``Preprocessor(record).numpy()``; built
    from the same settings (``NumpyPreprocessor.from_dict(preprocessor.to_dict())``)."""

    # -- the steps (same order as Preprocessor.__call__) ------------------------------------------

    def __call__(self, record: ImageRecord | np.ndarray) -> np.ndarray:
        image = self.scale_intensity(record)
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[..., 0]
        if self.clahe:
            image = self._apply_clahe(image)
        image = self._resize(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        mean = np.asarray(self.mean, dtype=np.float32)
        inverse_std = np.reciprocal(np.asarray(self.std, dtype=np.float32))
        image = (image - mean) * inverse_std
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)

    def batch(self, records: Sequence[ImageRecord | np.ndarray]) -> np.ndarray:
        """Several images -> (B, 3, S, S) float32."""
        return (
            np.stack([self(r) for r in records])
            if records
            else np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        )

    def _apply_clahe(self, image: np.ndarray) -> np.ndarray:
        as_uint8 = np.round(image * 255).astype(np.uint8)
        clahe = cv2.createCLAHE(clipLimit=self.clahe_clip_limit, tileGridSize=_CLAHE_TILES)
        if as_uint8.ndim == 2:
            out = clahe.apply(as_uint8)
        else:  # colour: equalise lightness only, as albumentations does
            lab = cv2.cvtColor(as_uint8, cv2.COLOR_RGB2LAB)
            lab[:, :, 0] = clahe.apply(lab[:, :, 0])
            out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        return out.astype(np.float32) / 255.0

    def _resize(self, image: np.ndarray) -> np.ndarray:
        """Resize into the content box of :meth:`geometry` and zero-pad around it; INTER_AREA whenever a
        side shrinks, as albumentations does."""
        height, width = image.shape[:2]
        size = self.image_size
        top, left, new_h, new_w = self.geometry((height, width)).content_box
        shrinks = new_h < height or new_w < width
        image = _cv2_resize(image, (new_h, new_w), cv2.INTER_AREA if shrinks else self.cv2_interpolation)
        if (new_h, new_w) == (size, size):
            return image
        pad = ((top, size - new_h - top), (left, size - new_w - left)) + ((0, 0),) * (image.ndim - 2)
        return np.pad(image, pad, mode="constant", constant_values=0)


def _cv2_resize(image: np.ndarray, shape: tuple[int, int], interpolation: int) -> np.ndarray:
    if image.shape[:2] == shape:  # albumentations returns the input unchanged
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)
