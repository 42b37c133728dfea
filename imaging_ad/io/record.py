"""What the reader returns: pixels at full bit depth and what is known about them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageMeta:
    """Facts about a decoded image. ``height``/``width`` are the stored size after EXIF orientation."""

    path: str
    format: str  # "PNG", "JPEG", "TIFF", "BMP", "DICOM", ...
    height: int
    width: int
    bit_depth: int  # significant bits per sample (8, 12, 16, 32)
    channels: int  # 1 (grayscale) or 3 (RGB)
    modality: str | None = None  # DICOM modality ("CR", "DX", "CT", ...); None for photos
    photometric: str | None = None  # DICOM photometric interpretation or PIL mode
    # Display range the pixel values are meant to span, when the file says so (DICOM VOI window or LUT
    # output range, or the full range of an integer type). Preprocessing scales it to [0, 1].
    value_range: tuple[float, float] | None = None
    window: tuple[float, float] | None = None  # DICOM (centre, width) found in the file, if any
    voi_applied: str | None = None  # "lut", "window" or None: what the reader applied
    inverted: bool = False  # MONOCHROME1 was inverted so that bright means dense
    frame: int | None = None
    n_frames: int = 1
    had_alpha: bool = False
    exif_orientation: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), the resolution heatmaps are returned at."""
        return (self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageRecord:
    pixels: np.ndarray  # HxW (grayscale) or HxWx3 (RGB), original dtype (uint8, uint16, int16, float32)
    meta: ImageMeta

    @property
    def is_grayscale(self) -> bool:
        return self.pixels.ndim == 2
