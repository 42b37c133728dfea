"""DICOM decoding with pydicom: modality LUT, optional VOI LUT/window, MONOCHROME1 inversion, colour to RGB.

Only the requested frame of a multi-frame file is decoded. Every failure becomes an
:class:`~imaging_ad.io.errors.ImageReadError` subclass naming the file; a transfer syntax that no
installed plugin can decode names the plugin packages that would read it, as pydicom reports them.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from imaging_ad.io.errors import (
    ImageReadError,
    ImageTooLargeError,
    MultiFrameImageError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedCompressionError,
)
from imaging_ad.io.record import ImageMeta, ImageRecord

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Elements at least one of which any real DICOM image carries; garbage parsed with force=True has none.
_DICOM_MARKERS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "SOPClassUID", "Rows", "Modality")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# pydicom names plugin dependencies by import name; pip knows some of them under another name.
_PIP_NAMES = {"gdcm": "python-gdcm"}
# Fallback when pydicom cannot say which plugins are missing (it normally can).
_FALLBACK_PLUGINS = {
    "1.2.840.10008.1.2.4.5": "pylibjpeg-libjpeg or python-gdcm",  # JPEG family (baseline, extended, lossless)
    "1.2.840.10008.1.2.4.7": "pylibjpeg-libjpeg or python-gdcm",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.8": "pyjpegls, pylibjpeg-libjpeg or python-gdcm",  # JPEG-LS
    "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg or python-gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE
}


def read_dicom(
    path: Path, data: bytes, *, frame: int | None, apply_voi: bool, max_pixels: int
) -> ImageRecord:
    """Decode one frame of a DICOM file held in ``data`` (the bytes of ``path``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = _parse(path, data, caught)
            record = _decode(path, ds, frame=frame, apply_voi_lut=apply_voi, max_pixels=max_pixels)
        except ImageReadError:
            raise
        except Exception as exc:  # never a bare crash: anything unforeseen still names the file
            raise ImageReadError(path, f"DICOM file cannot be read ({type(exc).__name__}: {exc})") from exc
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    if messages:
        record.meta.extra["warnings"] = messages
    return record


# ---------------------------------------------------------------------------------------------- parsing


def _parse(path: Path, data: bytes, caught: list[warnings.WarningMessage]) -> Dataset:
    has_prefix = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (EOFError, struct.error) as exc:
        if has_prefix:
            raise TruncatedImageError(path, f"DICOM header is truncated ({exc})") from exc
        raise NotAnImageError(
            path, "not a recognised image format (neither DICOM nor a raster image)"
        ) from exc
    except Exception as exc:  # InvalidDicomError and the many other types pydicom raises on garbage
        if has_prefix:
            raise ImageReadError(
                path, f"DICOM header cannot be parsed ({type(exc).__name__}: {exc})"
            ) from exc
        raise NotAnImageError(
            path, "not a recognised image format (neither DICOM nor a raster image)"
        ) from exc

    if any("End of file reached" in str(w.message) for w in caught):
        # pydicom drops the whole dataset when an undefined-length element (encapsulated pixel data) has
        # no end: the file was cut short.
        raise TruncatedImageError(path, "DICOM file ends before its pixel data is complete (truncated)")
    if not has_prefix and not any(keyword in ds for keyword in _DICOM_MARKERS):
        raise NotAnImageError(path, "not a recognised image format (no DICOM prefix and no DICOM elements)")
    last = _check_last_element(path, ds)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        # pydicom also stops silently when fewer than 8 bytes (a partial element header) are left.
        if last is not None and 0 < len(data) - (last.value_tell + last.length) < 8:
            raise TruncatedImageError(path, "file is truncated: it ends inside a DICOM element header")
        if has_prefix and len(ds) == 0:
            raise TruncatedImageError(path, "DICOM file ends inside its header (truncated)")
        kind = ds.get("SOPClassUID")
        kind = f" ({UID(kind).name})" if kind else ""
        hint = (
            f" (its header declares a {ds.Rows}x{ds.Columns} image)"
            if "Rows" in ds and "Columns" in ds
            else ""
        )
        raise NotAnImageError(path, f"DICOM file{kind} has no pixel data{hint}")
    _ensure_transfer_syntax(path, ds)
    return ds


def _check_last_element(path: Path, ds: Dataset) -> RawDataElement | None:
    """pydicom silently keeps a short value when the file ends inside an element: detect that.
    Returns the last top-level element when it is still raw and has a defined length."""
    tail = deque(ds.elements(), maxlen=1)  # raw elements in tag order; nothing is converted
    last = tail[0] if tail else None
    if not isinstance(last, RawDataElement) or last.value is None or last.length == 0xFFFFFFFF:
        return None
    if len(last.value) < last.length:
        raise TruncatedImageError(
            path,
            f"file is truncated: element {last.tag} declares {last.length:,} bytes but only "
            f"{len(last.value):,} remain",
        )
    return last


def _ensure_transfer_syntax(path: Path, ds: Dataset) -> None:
    """Files without File Meta Information (no preamble) lack a Transfer Syntax UID: infer it when the
    pixel data is native (uncompressed) from the encoding pydicom detected while parsing."""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    pixel_elem = next(ds[keyword] for keyword in _PIXEL_KEYWORDS if keyword in ds)
    if pixel_elem.is_undefined_length:
        raise UnsupportedCompressionError(
            path, "pixel data is compressed (encapsulated) but the file names no Transfer Syntax UID"
        )
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise ImageReadError(path, "file has no Transfer Syntax UID and its encoding cannot be determined")
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


# --------------------------------------------------------------------------------------------- decoding


def _decode(
    path: Path, ds: Dataset, *, frame: int | None, apply_voi_lut: bool, max_pixels: int
) -> ImageRecord:
    rows = _int_element(path, ds, "Rows")
    columns = _int_element(path, ds, "Columns")
    n_frames = _int_element(path, ds, "NumberOfFrames", default=1) or 1
    if rows <= 0 or columns <= 0:
        raise NotAnImageError(path, f"DICOM header declares an empty image ({rows}x{columns})")
    # Decompression-bomb guard, before any pixel is decoded: the pixels that will actually be decoded
    # (one frame, since a multi-frame file is always read one frame at a time).
    if rows * columns > max_pixels:
        frames = f" per frame ({n_frames} frames)" if n_frames > 1 else ""
        raise ImageTooLargeError(
            path,
            f"{columns}x{rows} pixels{frames} exceeds the limit of {max_pixels:,} (decompression-bomb guard)",
        )
    if n_frames > 1 and frame is None:
        raise MultiFrameImageError(
            path,
            f"multi-frame DICOM with {n_frames} frames; pass frame=k (0 <= k < {n_frames}) to read one frame",
        )
    index = 0 if frame is None else int(frame)
    if not 0 <= index < n_frames:
        raise ImageReadError(
            path, f"frame {frame} is out of range: the file has {n_frames} frame{'s' if n_frames > 1 else ''}"
        )

    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or None
    tsyntax = UID(ds.file_meta.TransferSyntaxUID)
    arr, decoded_pi = _decode_pixels(path, ds, tsyntax, index)
    stored = arr.dtype
    _adopt_functional_groups(ds, index)

    bit_depth = int(ds.get("BitsStored") or ds.get("BitsAllocated") or arr.dtype.itemsize * 8)
    window = _first_window(ds)
    value_range: tuple[float, float] | None = None
    voi_applied: str | None = None
    inverted = False
    extra: dict = {"transfer_syntax": f"{tsyntax.name} ({tsyntax})"}

    if arr.ndim == 3:  # colour: RGB out, no modality/VOI transforms (they are defined for grayscale only)
        if arr.shape[2] != 3:
            raise NotAnImageError(
                path, f"unsupported photometric interpretation {photometric} ({arr.shape[2]} samples)"
            )
        if decoded_pi in ("YBR_FULL", "YBR_FULL_422"):
            arr = convert_color_space(arr, decoded_pi, "RGB")
        elif decoded_pi not in ("RGB", None):
            raise NotAnImageError(path, f"photometric interpretation {decoded_pi} cannot be converted to RGB")
        arr = _narrow(arr, arr.dtype)
        if np.issubdtype(arr.dtype, np.integer):
            value_range = (0.0, float(2**bit_depth - 1))
    elif photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise ImageReadError(path, f"palette colour lookup table cannot be applied ({exc})") from exc
        bit_depth = 8 if arr.dtype == np.uint8 else 16
        value_range = (0.0, float(2**bit_depth - 1))
    else:
        try:
            arr = _narrow(apply_modality_lut(arr, ds), stored)
        except Exception as exc:
            raise ImageReadError(path, f"modality LUT / rescale cannot be applied ({exc})") from exc
        if apply_voi_lut and photometric in _MONOCHROME:
            try:
                arr, value_range, voi_applied = _apply_voi(ds, arr, stored)
            except Exception as exc:  # a broken window must not make the pixels unreadable
                extra["voi_error"] = f"{type(exc).__name__}: {exc}"
        if photometric == "MONOCHROME1":
            arr, inverted = _invert(arr, value_range, stored), True

    meta = ImageMeta(
        path=str(path),
        format="DICOM",
        height=int(arr.shape[0]),
        width=int(arr.shape[1]),
        bit_depth=bit_depth,
        channels=1 if arr.ndim == 2 else int(arr.shape[2]),
        modality=str(ds.Modality) if ds.get("Modality") else None,
        photometric=photometric,
        value_range=value_range,
        window=window,
        voi_applied=voi_applied,
        inverted=inverted,
        frame=index if n_frames > 1 else None,
        n_frames=n_frames,
        extra=extra,
    )
    return ImageRecord(pixels=arr, meta=meta)


def _decode_pixels(path: Path, ds: Dataset, tsyntax: UID, index: int) -> tuple[np.ndarray, str | None]:
    """Decode frame ``index`` only; returns the array and the photometric interpretation it is in."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnsupportedCompressionError(
            path,
            f"transfer syntax {_ts_label(tsyntax)} is not supported by pydicom (no decoder exists for it)",
        ) from exc
    if not decoder.is_available:
        raise _unsupported(path, tsyntax, decoder, "no installed decoder plugin can read it")
    try:
        arr, info = decoder.as_array(ds, index=index, validate=True, **as_pixel_options(ds, as_rgb=True))
    except RuntimeError as exc:  # every available plugin failed
        message = str(exc)
        if "truncat" in message.lower():
            raise TruncatedImageError(
                path, f"compressed pixel data is truncated ({_plugin_errors(message)})"
            ) from exc
        if decoder.missing_dependencies:
            raise _unsupported(
                path, tsyntax, decoder, f"the installed plugins failed ({_plugin_errors(message)})"
            ) from exc
        raise TruncatedImageError(path, f"pixel data cannot be decoded ({_plugin_errors(message)})") from exc
    except ValueError as exc:
        message = str(exc)
        if (
            "less than expected" in message
            or "truncat" in message.lower()
            or "insufficient" in message.lower()
        ):
            raise TruncatedImageError(path, f"pixel data is truncated ({message})") from exc
        raise ImageReadError(path, f"pixel data cannot be decoded ({message})") from exc
    except (AttributeError, KeyError) as exc:
        raise ImageReadError(path, f"DICOM header is missing a required element ({exc})") from exc
    except Exception as exc:
        raise ImageReadError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    pi = info.get("photometric_interpretation")
    return arr, (str(pi) if pi is not None else None)


def _unsupported(path: Path, tsyntax: UID, decoder, why: str) -> UnsupportedCompressionError:
    plugins = _missing_plugins(decoder) or [_FALLBACK_PLUGINS.get(_uid_family(tsyntax), "python-gdcm")]
    exc = UnsupportedCompressionError(
        path,
        f"pixel data is compressed with {_ts_label(tsyntax)} and {why}; "
        f"install a decoder plugin: {', or '.join(plugins)}",
    )
    exc.transfer_syntax = str(tsyntax)
    exc.plugins = plugins
    return exc


def _missing_plugins(decoder) -> list[str]:
    """pydicom's 'gdcm - requires gdcm>=3.0.10' -> 'python-gdcm>=3.0.10' (pip names, numpy dropped)."""
    options = []
    for line in decoder.missing_dependencies:
        _, _, requires = line.partition(" - requires ")
        packages = [p.strip() for p in re.split(r",| and ", requires) if p.strip()]
        packages = [p for p in packages if not p.startswith("numpy")]
        packages = [_pip_spec(p) for p in packages]
        if packages:
            options.append(" + ".join(packages))
    return options


def _pip_spec(requirement: str) -> str:
    """'gdcm>=3.0.10' -> 'python-gdcm>=3.0.10': the import name pydicom reports, as pip knows it."""
    name = re.match(r"[A-Za-z0-9_.\-]*", requirement).group()
    return _PIP_NAMES.get(name, name) + requirement[len(name) :]


def _uid_family(tsyntax: UID) -> str:
    return next((prefix for prefix in _FALLBACK_PLUGINS if str(tsyntax).startswith(prefix)), "")


def _ts_label(tsyntax: UID) -> str:
    name = tsyntax.name
    return f"'{name}' ({tsyntax})" if name and name != str(tsyntax) else f"unknown transfer syntax {tsyntax}"


def _plugin_errors(message: str) -> str:
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return "; ".join(lines) if lines else message


def _int_element(path: Path, ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise ImageReadError(path, f"DICOM header is missing the required element {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(path, f"DICOM element {keyword} has an invalid value {value!r}") from exc


# ------------------------------------------------------------------------------------- LUTs and windows


def _adopt_functional_groups(ds: Dataset, index: int) -> None:
    """Enhanced multi-frame files keep rescale and window in functional groups; copy the ones for this
    frame to the top level (in memory only) so that pydicom's LUT functions see them."""
    groups = []
    for keyword, item_index in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(keyword)
        if seq and len(seq) > item_index:
            groups.append(seq[item_index])
    for attrs, seq_keyword in (
        (("RescaleSlope", "RescaleIntercept", "RescaleType"), "PixelValueTransformationSequence"),
        (("WindowCenter", "WindowWidth", "VOILUTFunction"), "FrameVOILUTSequence"),
    ):
        if any(attr in ds for attr in attrs[:2]):
            continue
        for group in groups:  # per-frame values take precedence over shared ones
            seq = group.get(seq_keyword)
            if seq and all(attr in seq[0] for attr in attrs[:2]):
                for attr in attrs:
                    if attr in seq[0]:
                        setattr(ds, attr, seq[0][attr].value)
                break


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None or centre == "" or width == "":
        return None
    try:
        centre = centre[0] if isinstance(centre, MultiValue) else centre
        width = width[0] if isinstance(width, MultiValue) else width
        return (float(centre), float(width))
    except (TypeError, ValueError, IndexError):
        return None


def _apply_voi(
    ds: Dataset, arr: np.ndarray, stored: np.dtype
) -> tuple[np.ndarray, tuple[float, float] | None, str | None]:
    """VOI LUT (preferred) or the first window; returns pixels, the output display range and what was done."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        nominal_depth = int(seq[0].LUTDescriptor[2])
        lut_input = arr if np.issubdtype(arr.dtype, np.integer) else np.round(arr).astype(np.int64)
        out = apply_voi(lut_input, ds, index=0)
        return _narrow(out, stored), (0.0, float(2**nominal_depth - 1)), "lut"
    if _first_window(ds) is not None:
        y_range = _windowing_output_range(ds)
        out = apply_windowing(arr, ds, index=0)
        return _narrow(out, stored), y_range, "window"
    return arr, None, None


def _windowing_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom's apply_windowing maps into (same rules as pydicom 3.0 processing.py)."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return (min(lo, hi), max(lo, hi))


def _invert(arr: np.ndarray, value_range: tuple[float, float] | None, stored: np.dtype) -> np.ndarray:
    """MONOCHROME1 -> bright means dense: mirror inside the display range, else inside the data range."""
    if value_range is not None:
        lo, hi = value_range
    elif arr.size:
        lo, hi = float(arr.min()), float(arr.max())
    else:
        return arr
    if np.issubdtype(arr.dtype, np.integer) and float(lo).is_integer() and float(hi).is_integer():
        return _narrow(int(lo) + int(hi) - arr.astype(np.int64), arr.dtype)
    return (lo + hi - arr.astype(np.float64)).astype(np.float32)


def _narrow(arr: np.ndarray, stored: np.dtype) -> np.ndarray:
    """Native byte order and a writable array. Float only when the values are not integers; integer
    results keep the stored dtype when it holds them, else the smallest integer type that does."""
    stored = np.dtype(stored).newbyteorder("=")
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.size == 0:
        return arr.copy()
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            return arr.astype(np.float32)
    elif not np.issubdtype(arr.dtype, np.integer):
        return np.array(arr)
    lo, hi = arr.min(), arr.max()
    candidates = (stored, np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.uint32))
    candidates += (np.dtype(np.int32), np.dtype(np.int64))
    for dtype in candidates:
        if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return arr.astype(dtype)  # astype copies: the result never aliases pydicom's buffer
    return arr.astype(np.float32)
