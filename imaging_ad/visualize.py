"""Display helpers: colour-mapped heatmaps, overlays on the input image, mask contours, PNG output.

Pure OpenCV + NumPy (no matplotlib) so that the web demo and batch export stay light. Every function
returns a new uint8 RGB array and never modifies its inputs.

One colour scale: every output (predict and scan overlays, the scan report, evaluation examples, the
demo, the notebooks) colours a model's heatmaps with its :class:`ColourScale`, anchored at the
calibrated pixel threshold (blue: as normal as normal images get) and the upper reference the model
stores (red), and shows it with :func:`colour_bar`. The same heatmap value is the same colour
everywhere, so a normal image never looks redder than a broken one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike

from imaging_ad.metrics.pixel import binarize_mask

# Display window for images that are not already 8-bit: a 0.5-99.5 % percentile stretch keeps a few
# hot/dead pixels (or a large black border) from flattening the contrast of 12/16-bit radiographs.
DISPLAY_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class ColourScale:
    """Heatmap values from ``low`` (the bottom colour: the calibrated pixel threshold) to ``high`` (the top
    colour: the model's upper reference)."""

    low: float
    high: float

    @classmethod
    def of(cls, calibration: Any) -> ColourScale:
        """The scale of a model's :class:`~imaging_ad.calibration.Calibration`. Models saved before the
        upper reference existed get twice the pixel threshold's distance from zero."""
        low = float(calibration.pixel_threshold)
        high = getattr(calibration, "pixel_upper", None)
        if high is None or not high > low:
            high = low + max(abs(low), 1e-6)
        return cls(low, float(high))


def to_display_rgb(image: ArrayLike) -> np.ndarray:
    """Any HxW / HxWx1 / HxWx3 / HxWx4 image as uint8 HxWx3 RGB for display.

    uint8 is kept as is; bool becomes 0/255; floats within [0, 1] are scaled by 255 (the usual float
    image convention); anything else (uint16, int, other floats) is windowed to the
    :data:`DISPLAY_PERCENTILES` of its finite values. Colour inputs are assumed RGB(A); alpha is dropped.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {img.shape}")
    if img.dtype == np.uint8:
        img8 = img if img.ndim == 2 else img.copy()  # a grayscale image is copied by cvtColor below
    elif img.dtype == bool:
        img8 = img.astype(np.uint8) * 255
    else:
        values = img.astype(np.float64)
        finite = values[np.isfinite(values)]
        if np.issubdtype(img.dtype, np.floating) and finite.size and finite.min() >= 0 and finite.max() <= 1:
            lo, hi = 0.0, 1.0
        elif finite.size:
            lo, hi = (float(p) for p in np.percentile(finite, DISPLAY_PERCENTILES))
        else:
            lo, hi = 0.0, 1.0
        img8 = _scale_to_uint8(values, lo, hi)
    if img8.ndim == 2:
        img8 = cv2.cvtColor(img8, cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(img8)


def heatmap_to_color(
    heatmap: ArrayLike,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Colour-map a 2-D float heatmap to uint8 HxWx3 **RGB**.

    ``vmin``/``vmax`` default to the heatmap's own finite min/max; pass fixed values (e.g. the image
    threshold and a high validation score) to make colours comparable across images. Values outside
    the window are clipped; NaNs get the ``vmin`` colour; a flat window maps everything to it.
    """
    h = _as_heatmap(heatmap)
    lo, hi = vmin, vmax
    if lo is None or hi is None:  # the heatmap's own range, looked at only when it is needed
        finite = h[np.isfinite(h)]
        lo = lo if lo is not None else (finite.min() if finite.size else 0.0)
        hi = hi if hi is not None else (finite.max() if finite.size else lo)
    lo, hi = float(lo), float(hi)
    gray = _scale_to_uint8(h, lo, hi)
    # OpenCV colour maps produce BGR; everything in this package is RGB.
    return cv2.cvtColor(cv2.applyColorMap(gray, colormap), cv2.COLOR_BGR2RGB)


def overlay(
    image: ArrayLike,
    heatmap: ArrayLike,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Blend the colour-mapped ``heatmap`` over ``image``; returns uint8 HxWx3 RGB at the image's size.

    ``image`` may be HxW or HxWx3 of any dtype (see :func:`to_display_rgb`). A heatmap of another size
    (e.g. at feature-map resolution) is resized bilinearly to the image. ``alpha`` is the heatmap's
    weight in ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = to_display_rgb(image)
    h = _as_heatmap(heatmap)
    height, width = base.shape[:2]
    if h.shape != (height, width):
        h = cv2.resize(h.astype(np.float32, copy=False), (width, height), interpolation=cv2.INTER_LINEAR)
    color = heatmap_to_color(h, vmin=vmin, vmax=vmax, colormap=colormap)
    return cv2.addWeighted(base, 1.0 - alpha, color, alpha, 0.0)


def overlay_with_legend(
    image: ArrayLike, heatmap: ArrayLike, scale: ColourScale, alpha: float = 0.5
) -> np.ndarray:
    """:func:`overlay` on the model's :class:`ColourScale`, with its :func:`colour_bar` to the right."""
    picture = overlay(image, heatmap, alpha=alpha, vmin=scale.low, vmax=scale.high)
    return np.ascontiguousarray(np.concatenate([picture, colour_bar(picture.shape[0], scale)], axis=1))


def colour_bar(height: int, scale: ColourScale, title: str = "anomaly") -> np.ndarray:
    """A labelled vertical colour bar of ``scale``, ``height`` pixels tall, as uint8 RGB on black: the top
    value, the middle and the bottom one (the pixel threshold, marked "normal")."""
    unit = max(height, 160) / 512  # text and bar scale with the picture, legible on small ones
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(unit * 1.5))
    text_scale = 0.45 * unit
    bar_width, panel_width = round(20 * unit), round(110 * unit)
    panel = np.zeros((max(height, 1), panel_width, 3), np.uint8)
    top, bottom = round(26 * unit), max(height - round(16 * unit), round(26 * unit) + 2)
    if bottom > height:  # a very flat picture: no room for a bar
        return panel
    gradient = np.linspace(scale.high, scale.low, bottom - top, dtype=np.float32)[:, None]
    x0 = round(8 * unit)
    panel[top:bottom, x0 : x0 + bar_width] = heatmap_to_color(
        np.repeat(gradient, bar_width, axis=1), vmin=scale.low, vmax=scale.high
    )
    white = (255, 255, 255)
    cv2.putText(panel, title, (x0, round(18 * unit)), font, text_scale, white, thickness, cv2.LINE_AA)
    marks = (
        (scale.high, top, ""),
        ((scale.low + scale.high) / 2, (top + bottom) // 2, ""),
        (scale.low, bottom - 1, " normal"),
    )
    for value, y, note in marks:
        cv2.line(panel, (x0 + bar_width, y), (x0 + bar_width + round(4 * unit), y), white, thickness)
        at = (x0 + bar_width + round(6 * unit), y + round(4 * unit))
        cv2.putText(panel, f"{value:.3g}{note}", at, font, text_scale * 0.8, white, thickness, cv2.LINE_AA)
    return panel


def contour_mask(
    image_rgb: ArrayLike,
    mask: ArrayLike,
    color: tuple[int, int, int] = (0, 255, 0),
    thickness: int = 1,
) -> np.ndarray:
    """Draw the outlines of ``mask`` (nonzero = inside) on a copy of the image, in RGB ``color``.

    For ground-truth regions or thresholded anomaly maps: outlines keep the pixels underneath visible,
    unlike a filled overlay. Hole boundaries are drawn too. A mask of another size is resized with
    nearest-neighbour interpolation (so it stays binary).
    """
    out = to_display_rgb(image_rgb)
    m = binarize_mask(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    m8 = m.astype(np.uint8)
    height, width = out.shape[:2]
    if m8.shape != (height, width):
        m8 = cv2.resize(m8, (width, height), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m8, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    return out


def save_png(path: str | os.PathLike, rgb: ArrayLike) -> Path:
    """Write an RGB (or grayscale) uint8/uint16 image as PNG, creating parent folders; returns the path.

    Encodes in memory and writes the bytes with Python, because ``cv2.imwrite`` fails silently (returns
    False) and cannot handle non-ASCII paths on Windows.
    """
    path = Path(path)
    encoded = encode_png(rgb, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded)
    return path


def encode_png(rgb: ArrayLike, name: str | os.PathLike = "the image") -> bytes:
    """The PNG file's bytes of an RGB (or grayscale) uint8/uint16 image: rendered where the pixels are (a
    Ray worker) and written where the outputs are (the scan's driver), byte for byte as :func:`save_png`."""
    img = np.asarray(rgb)
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"save_png expects uint8 or uint16 pixels, got {img.dtype}; see to_display_rgb")
    if img.ndim == 3 and img.shape[-1] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[-1] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    elif img.ndim != 2:
        raise ValueError(f"save_png expects HxW, HxWx3 or HxWx4, got shape {img.shape}")
    ok, encoded = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"PNG encoding failed for {name}")
    return encoded.tobytes()


def _as_heatmap(heatmap: ArrayLike) -> np.ndarray:
    h = np.asarray(heatmap)
    # float32 heatmaps (what detectors return) stay float32: 8-bit colours need no more precision
    h = h if h.dtype in (np.float32, np.float64) else h.astype(np.float64)
    # Tolerate a singleton channel axis (1xHxW from torch, HxWx1 from cv2).
    if h.ndim == 3 and h.shape[0] == 1:
        h = h[0]
    elif h.ndim == 3 and h.shape[-1] == 1:
        h = h[..., 0]
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (HxW), got shape {h.shape}")
    return h


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 255] with clipping; NaN -> 0; a flat window -> 0."""
    if not hi > lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - values.dtype.type(lo)) * values.dtype.type(255.0 / (hi - lo))
    scaled = np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled).astype(np.uint8)
