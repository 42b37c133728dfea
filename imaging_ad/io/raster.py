"""PNG, JPEG, BMP and TIFF decoding with Pillow, keeping 16-bit data and honouring EXIF orientation.

Pillow is the primary decoder because it reports truncation and corruption as errors instead of
returning grey-filled pixels. OpenCV decodes the one case Pillow would silently reduce to 8 bits:
16-bit colour PNG/TIFF.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imaging_ad.io.errors import (
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
)
from imaging_ad.io.record import ImageMeta, ImageRecord

SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "MPO")
_EXIF_ORIENTATION_TAG = 0x0112


def read_raster(path: Path, data: bytes, max_pixels: int) -> ImageRecord:
    try:
        return _read_raster(path, data, max_pixels)
    except ImageReadError:
        raise
    except Exception as exc:  # never a bare crash: a decoder's unforeseen complaint still names the file
        raise ImageReadError(path, f"image cannot be decoded ({type(exc).__name__}: {exc})") from exc


def _read_raster(path: Path, data: bytes, max_pixels: int) -> ImageRecord:
    try:
        with warnings.catch_warnings():
            # Our own guard below replaces Pillow's warning; its hard error is still caught.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(path, f"image dimensions exceed the safety limit ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(path, "not a recognised image format (PNG, JPEG, BMP, TIFF or DICOM)") from exc
    except (OSError, EOFError, struct.error) as exc:  # the header itself is cut short
        raise TruncatedImageError(
            path, f"file is truncated or corrupt: its header cannot be read ({exc})"
        ) from exc
    except (SyntaxError, ValueError) as exc:
        raise NotAnImageError(path, f"corrupt image header ({exc})") from exc

    fmt = (image.format or "").upper()
    if fmt not in SUPPORTED_FORMATS:
        raise NotAnImageError(path, f"unsupported image format {fmt or 'unknown'}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise NotAnImageError(path, f"image header declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            path, f"{width}x{height} pixels exceeds the limit of {max_pixels:,} (decompression-bomb guard)"
        )
    n_frames = getattr(image, "n_frames", 1)
    orientation = _exif_orientation(image)

    had_alpha = False
    try:
        if _is_deep_colour(image, data, fmt):
            pixels, had_alpha = _decode_deep_colour_with_opencv(path, data)
            pixels, bit_depth = _apply_orientation(pixels, orientation), 16
        else:
            image.load()
            image = ImageOps.exif_transpose(image) if orientation not in (None, 1) else image
            pixels, bit_depth, had_alpha = _pil_to_array(image)
    except OSError as exc:
        message = str(exc)
        if "truncated" in message.lower() or "broken data stream" in message.lower():
            raise TruncatedImageError(path, f"file is truncated or corrupt ({message})") from exc
        raise TruncatedImageError(path, f"pixel data cannot be decoded ({message})") from exc
    except (SyntaxError, ValueError) as exc:
        raise NotAnImageError(path, f"corrupt {fmt} data ({exc})") from exc
    except cv2.error as exc:
        raise TruncatedImageError(path, f"16-bit colour pixel data cannot be decoded ({exc})") from exc

    meta = ImageMeta(
        path=str(path),
        format="JPEG" if fmt == "MPO" else fmt,
        height=int(pixels.shape[0]),
        width=int(pixels.shape[1]),
        bit_depth=bit_depth,
        channels=1 if pixels.ndim == 2 else int(pixels.shape[2]),
        photometric=image.mode,
        value_range=_integer_range(pixels.dtype, bit_depth),
        frame=0 if n_frames > 1 else None,
        n_frames=n_frames,
        had_alpha=had_alpha,
        exif_orientation=orientation,
    )
    return ImageRecord(pixels=pixels, meta=meta)


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # a malformed EXIF block must not make a readable image unreadable
        return None
    return int(value) if value else None


def _is_deep_colour(image: Image.Image, data: bytes, fmt: str) -> bool:
    """True for 16-bit colour (or grey + alpha) images that Pillow would decode as 8-bit RGB(A)."""
    if fmt == "PNG" and len(data) > 25:
        bit_depth, colour_type = data[24], data[25]
        return bit_depth == 16 and colour_type in (2, 4, 6)  # truecolour, grey + alpha, truecolour + alpha
    if fmt == "TIFF":
        tags = getattr(image, "tag_v2", {})
        bits = tags.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(bits) > 8 and tags.get(277, 1) >= 3
    return False


def _decode_deep_colour_with_opencv(path: Path, data: bytes) -> tuple[np.ndarray, bool]:
    """-> (pixels, had_alpha). 16-bit grey + alpha (OpenCV returns it as BGRA) stays 2-D."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise TruncatedImageError(path, "16-bit colour pixel data cannot be decoded")
    had_alpha = decoded.ndim == 3 and decoded.shape[2] in (2, 4)
    if had_alpha:
        decoded = _composite_alpha(
            decoded[..., [2, 1, 0]] if decoded.shape[2] == 4 else decoded[..., 0], decoded[..., -1], 65535
        )
    elif decoded.ndim == 3:
        decoded = decoded[..., ::-1]
    if decoded.ndim == 3 and _is_gray(decoded):
        grey_source = len(data) > 25 and data[:4] == b"\x89PNG" and data[25] in (0, 4)
        if grey_source:
            decoded = decoded[..., 0]
    return np.ascontiguousarray(decoded), had_alpha


def _apply_orientation(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """EXIF orientation 1-8 as flips/rotations (same semantics as ImageOps.exif_transpose)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation or 1)
    return np.ascontiguousarray(op(pixels)) if op else pixels


def _pil_to_array(image: Image.Image) -> tuple[np.ndarray, int, bool]:
    """Pillow image -> (array at full depth, significant bits, had_alpha). Grayscale stays 2-D."""
    mode = image.mode
    if mode == "P":
        has_transparency = "transparency" in image.info
        image = image.convert("RGBA" if has_transparency else "RGB")
        array = np.asarray(image)
        if not has_transparency and _is_gray(array):
            return np.ascontiguousarray(array[..., 0]), 8, False
        return _pil_to_array(image)
    if mode == "1":
        return np.asarray(image.convert("L")), 8, False
    if mode == "L":
        return np.asarray(image), 8, False
    if mode == "LA":
        array = np.asarray(image)
        return _composite_alpha(array[..., 0], array[..., 1], 255), 8, True
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16), 16, False
    if mode == "I":
        array = np.asarray(image)
        if array.size and array.min() >= 0 and array.max() <= 65535:
            return array.astype(np.uint16), 16, False
        return array.astype(np.int32), 32, False
    if mode == "F":
        return np.asarray(image, dtype=np.float32), 32, False
    if mode == "RGB":
        return np.asarray(image), 8, False
    if mode == "RGBA":
        array = np.asarray(image)
        return _composite_alpha(array[..., :3], array[..., 3], 255), 8, True
    # CMYK, YCbCr, LAB, ...: 8-bit colour spaces Pillow converts losslessly enough for inspection.
    return np.asarray(image.convert("RGB")), 8, False


def _composite_alpha(colour: np.ndarray, alpha: np.ndarray, full: int) -> np.ndarray:
    """Drop the alpha channel by compositing over black: transparent areas carry no content."""
    weight = alpha.astype(np.float32) / full
    if colour.ndim == 3:
        weight = weight[..., None]
    return np.round(colour.astype(np.float32) * weight).astype(colour.dtype)


def _is_gray(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _integer_range(dtype: np.dtype, bit_depth: int) -> tuple[float, float] | None:
    if np.issubdtype(dtype, np.unsignedinteger):
        return (0.0, float(2**bit_depth - 1))
    return None
