"""``read_image``: one entry point for every supported file, dispatching on content, not extension."""

from __future__ import annotations

import os
from pathlib import Path

from imaging_ad.io.errors import (
    EmptyImageFileError,
    ImageNotFoundError,
    ImageReadError,
    NotAnImageError,
)
from imaging_ad.io.record import ImageRecord

# 100 megapixels: larger than any radiograph or inspection photo we expect, far below what
# would exhaust memory once converted to float feature maps.
DEFAULT_MAX_PIXELS = 100_000_000
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image(
    path: str | os.PathLike,
    *,
    frame: int | None = None,
    apply_voi: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageRecord:
    """Read a PNG, JPEG, BMP, TIFF or DICOM file into an :class:`ImageRecord`.

    Pixels keep their full bit depth; grayscale stays 2-D. ``frame`` selects one frame of a
    multi-frame file (reading such a file without it raises :class:`MultiFrameImageError`).
    ``apply_voi`` applies a DICOM file's VOI LUT or window (when it has one). Every failure raises a
    subclass of :class:`ImageReadError` naming the file. The file is only ever opened for reading.
    """
    path = Path(path)
    data = _read_bytes(path)
    if is_dicom_bytes(data) or (path.suffix.lower() in DICOM_SUFFIXES + ("",) and not _looks_raster(data)):
        from imaging_ad.io.dicom import read_dicom

        return read_dicom(path, data, frame=frame, apply_voi=apply_voi, max_pixels=max_pixels)

    from imaging_ad.io.raster import read_raster

    record = read_raster(path, data, max_pixels=max_pixels)
    if record.meta.n_frames > 1 and frame not in (None, 0):
        raise ImageReadError(
            path, f"frame {frame} requested; multi-page raster files are read at frame 0 only"
        )
    return record


def is_dicom_bytes(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_supported_path(path: str | os.PathLike) -> bool:
    """Cheap filter for folder discovery: known suffix, or no suffix at all (DICOM often has none)."""
    suffix = Path(path).suffix.lower()
    return suffix in RASTER_SUFFIXES + DICOM_SUFFIXES or suffix == ""


def _looks_raster(data: bytes) -> bool:
    signatures = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
    return any(data.startswith(sig) for sig in signatures)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ImageNotFoundError(path, "file does not exist")
    if path.is_dir():
        raise NotAnImageError(path, "is a directory, not an image file")
    try:
        data = path.read_bytes()
    except PermissionError as exc:
        raise ImageReadError(path, "permission denied") from exc
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise EmptyImageFileError(path, "file is empty (0 bytes)")
    return data
