"""``read_image``: one entry point for every supported file, dispatching on content, not extension."""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

import numpy as np

from imaging_ad.io.errors import (
    EmptyImageFileError,
    ImageNotFoundError,
    ImageReadError,
    ImageTooLargeError,
    NonFiniteImageError,
    NotAnImageError,
    SpecialFileError,
)
from imaging_ad.io.record import ImageRecord

# 100 megapixels: larger than any radiograph or inspection photo we expect, far below what
# would exhaust memory once converted to float feature maps.
DEFAULT_MAX_PIXELS = 100_000_000
# 2 GiB: a 100-megapixel 16-bit RGB TIFF is 600 MB and large multi-frame DICOMs stay below this; the
# bound matters for files whose size says nothing about what they yield (procfs and the like).
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
_READ_BLOCK = 1 << 22
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image(
    path: str | os.PathLike,
    *,
    frame: int | None = None,
    apply_voi: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> ImageRecord:
    """Read a PNG, JPEG, BMP, TIFF or DICOM file into an :class:`ImageRecord`.

    Pixels keep their full bit depth; grayscale stays 2-D. ``frame`` selects one frame of a
    multi-frame file (reading such a file without it raises :class:`MultiFrameImageError`).
    ``apply_voi`` applies a DICOM file's VOI LUT or window (when it has one). Every failure raises a
    subclass of :class:`ImageReadError` naming the file. The file is only ever opened for reading.

    Bounds: only regular files are opened (FIFOs, devices, sockets and link loops are refused before
    any read), at most ``max_file_bytes`` are read, and images whose header declares more than
    ``max_pixels`` pixels are refused before their pixels are decoded. Pixels that are NaN or infinite
    (a float TIFF holding them, a DICOM rescale slope of NaN or 1e308) raise :class:`NonFiniteImageError`:
    nothing scored from them would mean anything.
    """
    path = Path(path)
    data = _read_bytes(path, max_file_bytes)
    if is_dicom_bytes(data) or (path.suffix.lower() in DICOM_SUFFIXES + ("",) and not _looks_raster(data)):
        from imaging_ad.io.dicom import read_dicom

        record = read_dicom(path, data, frame=frame, apply_voi=apply_voi, max_pixels=max_pixels)
    else:
        from imaging_ad.io.raster import read_raster

        record = read_raster(path, data, max_pixels=max_pixels)
        if record.meta.n_frames > 1 and frame not in (None, 0):
            raise ImageReadError(
                path, f"frame {frame} requested; multi-page raster files are read at frame 0 only"
            )
    _check_finite(path, record)
    return record


def read_size(path: str | os.PathLike, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[int, int]:
    """(height, width) as the file's header declares them, without decoding any pixel: how many pixels
    reading the file would cost. Same guards and errors as :func:`read_image` (special files, bounds)."""
    path = Path(path)
    data = _read_bytes(path, max_file_bytes)
    try:
        if is_dicom_bytes(data) or (
            path.suffix.lower() in DICOM_SUFFIXES + ("",) and not _looks_raster(data)
        ):
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:  # lazy: parses the header only
            width, height = image.size
        return int(height), int(width)
    except Exception as exc:  # noqa: BLE001  (whatever the header's fault, it names the file)
        if type(exc).__name__ == "DecompressionBombError":  # Pillow's own guard, far above ours
            raise ImageTooLargeError(path, f"image dimensions exceed the safety limit ({exc})") from exc
        raise NotAnImageError(
            path, f"image size cannot be read from the header ({type(exc).__name__}: {exc})"
        ) from exc


def _check_finite(path: Path, record: ImageRecord) -> None:
    pixels = record.pixels
    if not np.issubdtype(pixels.dtype, np.floating):
        return  # integer pixels are always finite
    finite = np.isfinite(pixels)
    if finite.all():
        return
    n_bad = int(finite.size - np.count_nonzero(finite))
    hint = (
        " (its RescaleSlope/RescaleIntercept or float pixel data make them)"
        if record.meta.format == "DICOM"
        else ""
    )
    raise NonFiniteImageError(
        path,
        f"{n_bad:,} of {finite.size:,} pixel values are NaN or infinite{hint}; an image with such pixels "
        "cannot be scored",
    )


def is_dicom_bytes(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_supported_path(path: str | os.PathLike) -> bool:
    """Cheap filter for folder discovery: known suffix, or no suffix at all (DICOM often has none)."""
    suffix = Path(path).suffix.lower()
    return suffix in RASTER_SUFFIXES + DICOM_SUFFIXES or suffix == ""


def _looks_raster(data: bytes) -> bool:
    signatures = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
    return any(data.startswith(sig) for sig in signatures)


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most ``max_bytes`` of them; anything else is refused unread."""
    try:
        info = os.stat(path)  # follows links: what a read would reach
    except (OSError, ValueError) as exc:
        raise _inaccessible(path, exc) from exc
    _check_regular(path, info.st_mode)
    if info.st_size > max_bytes:
        raise ImageTooLargeError(
            path, f"file is {info.st_size:,} bytes, over the limit of {max_bytes:,} bytes"
        )
    # O_NONBLOCK: should a FIFO be swapped in after the check above, opening it must not wait for a
    # writer (it has no effect on regular files)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _inaccessible(path, exc) from exc
    try:
        _check_regular(path, os.fstat(fd).st_mode)  # the file actually opened, not the name checked
        blocks, total = [], 0
        while total <= max_bytes:  # bounded even when the size reported was wrong (procfs, growing files)
            block = os.read(fd, min(_READ_BLOCK, max_bytes + 1 - total))
            if not block:
                break
            blocks.append(block)
            total += len(block)
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if total > max_bytes:
        raise ImageTooLargeError(path, f"file yields more than the limit of {max_bytes:,} bytes")
    if not total:
        raise EmptyImageFileError(path, "file is empty (0 bytes)")
    return b"".join(blocks)


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise NotAnImageError(path, "is a directory, not an image file")
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise SpecialFileError(
        path, f"is {kind}, not a regular file; refused without reading (it could block or never end)"
    )


def _inaccessible(path: Path, exc: OSError | ValueError) -> ImageReadError:
    """The error for a name that cannot be stat'ed or opened, saying which of the usual causes it is."""
    if isinstance(exc, ValueError):  # an embedded NUL byte
        return ImageReadError(path, f"invalid file name ({exc})")
    if exc.errno == errno.ELOOP:
        return SpecialFileError(path, "is a symbolic link loop (its links never reach a file)")
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return ImageNotFoundError(path, f"is a broken symbolic link (its target {target} does not exist)")
        return ImageNotFoundError(path, "file does not exist")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageReadError(path, "permission denied")
    return ImageReadError(path, f"cannot be accessed ({exc.strerror or exc})")
