"""Intensity scaling to [0, 1], the first preprocessing step, in NumPy only.

:class:`imaging_ad.preprocess.Preprocessor`, the one preprocessing of fitting, predicting and exported
models, calls these functions.
"""

from __future__ import annotations

import numpy as np

from imaging_ad.io.record import ImageMeta, ImageRecord

INTENSITY_MODES = ("auto", "robust", "percentile", "full_range")
# median +- this many robust standard deviations (IQR / 1.349) spans [0, 1] in "robust" mode
ROBUST_SPAN = 3.0


def percentiles(pixels: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(pixels, q)`` (linear interpolation), bit for bit; for 8- and 16-bit pixels read
    off a histogram instead of partially sorting the image: ~10x faster on a 400 x 250 image."""
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.size == 0:
        return np.percentile(pixels, q)
    cumulative = np.cumsum(np.bincount(pixels.ravel()))
    rank = np.asarray(q, dtype=np.float64) / 100 * (pixels.size - 1)
    below = np.floor(rank)
    weight = rank - below
    lower = np.searchsorted(cumulative, below, side="right").astype(np.float64)
    upper = np.searchsorted(cumulative, np.minimum(below + 1, pixels.size - 1), side="right").astype(
        np.float64
    )
    # NumPy's own lerp, from whichever end is nearer, so the result is identical to np.percentile's
    difference = upper - lower
    return np.where(weight >= 0.5, upper - difference * (1 - weight), lower + difference * weight)


def scale_intensity(
    record: ImageRecord | np.ndarray, mode: str, percentile_range: tuple[float, float]
) -> np.ndarray:
    """Pixels -> float32 in [0, 1], same shape. The only place bit depth is reduced. ``mode`` is one of
    :data:`INTENSITY_MODES`, as documented on :class:`imaging_ad.preprocess.Preprocessor`."""
    pixels, meta = (record.pixels, record.meta) if isinstance(record, ImageRecord) else (record, None)
    low, high = intensity_range(pixels, meta, mode, percentile_range)
    scale = float(high - low) if high > low else 1.0
    return np.clip((pixels.astype(np.float32) - float(low)) / scale, 0.0, 1.0)


def intensity_range(
    pixels: np.ndarray, meta: ImageMeta | None, mode: str, percentile_range: tuple[float, float]
) -> tuple[float, float]:
    """The pixel values that ``scale_intensity`` maps to 0 and 1."""
    if mode == "percentile":
        return tuple(percentiles(pixels, percentile_range))
    if mode == "robust":
        # Median and IQR barely move when a defect covers a few percent of the image, unlike
        # extreme percentiles: a dark blob must not re-expose the whole image.
        # quartiles of every 2nd pixel in each direction: same statistics, 4x less sorting
        sample = pixels[::2, ::2] if pixels.size > 65536 else pixels
        q25, median, q75 = percentiles(sample, (25, 50, 75))
        spread = max((q75 - q25) / 1.349, 1e-6)
        return median - ROBUST_SPAN * spread, median + ROBUST_SPAN * spread
    if meta is not None and meta.voi_applied and meta.value_range is not None:
        return meta.value_range  # the file's own window: what a radiologist would see
    if mode == "full_range" or pixels.dtype == np.uint8:
        if meta is not None and meta.value_range is not None:
            return meta.value_range
        if np.issubdtype(pixels.dtype, np.integer):
            return float(np.iinfo(pixels.dtype).min), float(np.iinfo(pixels.dtype).max)
    if np.issubdtype(pixels.dtype, np.floating) and pixels.min() >= 0.0 and pixels.max() <= 1.0:
        return 0.0, 1.0
    # Deeper than 8 bits with no window: robust stretch, so a 12-bit image in a 16-bit
    # container is not left nearly black.
    return tuple(percentiles(pixels, percentile_range))
