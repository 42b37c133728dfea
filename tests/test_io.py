"""The image reader: raster formats at full bit depth, every DICOM in pydicom's test data, every bad input."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML

import imaging_ad
from imaging_ad.io import (
    EmptyImageFileError,
    ImageNotFoundError,
    ImageReadError,
    ImageTooLargeError,
    MultiFrameImageError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedCompressionError,
    read_image,
)
from imaging_ad.io.raster import _apply_orientation

RNG = np.random.default_rng(0)
GREY8 = RNG.integers(0, 256, (24, 32), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
GREY16 = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 80 + 300).astype(np.uint16)  # 300..61740
RGB16 = np.stack([GREY16, GREY16[::-1], GREY16[:, ::-1]], axis=-1)

DICOM_FILES = sorted(f for f in get_testdata_files() if Path(f).is_file())
TESTDATA_ROOT = Path(get_testdata_file("CT_small.dcm")).parent


def _id(path: str) -> str:
    try:
        return str(Path(path).relative_to(TESTDATA_ROOT.parent))
    except ValueError:
        return Path(path).name


def _raises(exc_type: type[ImageReadError], path: Path, **kwargs) -> ImageReadError:
    """read_image(path) must raise ``exc_type`` (an ImageReadError) naming the file."""
    with pytest.raises(exc_type) as info:
        read_image(path, **kwargs)
    assert isinstance(info.value, ImageReadError)
    assert str(path) in str(info.value)
    return info.value


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw_rows))
        + _png_chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------ raster


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "jpg"])
def test_grey8_stays_2d(tmp_path, ext):
    path = tmp_path / f"grey.{ext}"
    Image.fromarray(GREY8).save(path)
    record = read_image(path)
    assert record.pixels.shape == GREY8.shape and record.pixels.dtype == np.uint8
    assert record.is_grayscale and record.meta.channels == 1 and record.meta.bit_depth == 8
    assert record.meta.size == GREY8.shape
    if ext != "jpg":
        np.testing.assert_array_equal(record.pixels, GREY8)
    assert record.meta.format == {"png": "PNG", "bmp": "BMP", "tif": "TIFF", "jpg": "JPEG"}[ext]
    assert record.meta.value_range == (0.0, 255.0)


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "jpg"])
def test_rgb8(tmp_path, ext):
    path = tmp_path / f"rgb.{ext}"
    Image.fromarray(RGB8).save(path, **({"quality": 95} if ext == "jpg" else {}))
    record = read_image(path)
    assert record.pixels.shape == RGB8.shape and record.pixels.dtype == np.uint8
    assert record.meta.channels == 3 and not record.is_grayscale
    if ext != "jpg":
        np.testing.assert_array_equal(record.pixels, RGB8)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_rgba_alpha_is_dropped(tmp_path, ext):
    rgba = np.dstack([RGB8, np.full(GREY8.shape, 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel: composited over black
    path = tmp_path / f"rgba.{ext}"
    Image.fromarray(rgba, "RGBA").save(path)
    record = read_image(path)
    assert record.pixels.shape == RGB8.shape and record.meta.had_alpha
    np.testing.assert_array_equal(record.pixels[1:], RGB8[1:])
    assert record.pixels[0, 0].tolist() == [0, 0, 0]


def test_palette_grey_stays_2d_and_colour_palette_is_rgb(tmp_path):
    grey = Image.fromarray(GREY8).convert("P")  # L -> P keeps a grey palette
    grey.putpalette([v for i in range(256) for v in (i, i, i)])
    grey.save(tmp_path / "grey_palette.png")
    record = read_image(tmp_path / "grey_palette.png")
    assert record.pixels.ndim == 2 and record.pixels.dtype == np.uint8

    colour = Image.fromarray(RGB8).quantize(colors=16)
    colour.save(tmp_path / "colour_palette.png")
    colour.save(tmp_path / "colour_palette.bmp")
    for name in ("colour_palette.png", "colour_palette.bmp"):
        record = read_image(tmp_path / name)
        assert record.pixels.shape == RGB8.shape
        np.testing.assert_array_equal(record.pixels, np.asarray(colour.convert("RGB")))


@pytest.mark.parametrize("writer", ["pillow_png", "cv2_png", "pillow_tif", "cv2_tif"])
def test_grey16_keeps_full_depth(tmp_path, writer):
    lib, ext = writer.split("_")
    path = tmp_path / f"grey16.{ext}"
    if lib == "pillow":
        Image.fromarray(GREY16).save(path)
    else:
        assert cv2.imwrite(str(path), GREY16)
    record = read_image(path)
    assert record.pixels.dtype == np.uint16 and record.pixels.ndim == 2
    assert record.pixels.max() > 255 and record.meta.bit_depth == 16
    assert record.meta.value_range == (0.0, 65535.0)
    np.testing.assert_array_equal(record.pixels, GREY16)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_rgb16_keeps_full_depth(tmp_path, ext):
    path = tmp_path / f"rgb16.{ext}"
    assert cv2.imwrite(str(path), RGB16[..., ::-1])  # OpenCV writes BGR
    record = read_image(path)
    assert record.pixels.dtype == np.uint16 and record.pixels.shape == RGB16.shape
    assert record.meta.bit_depth == 16 and record.meta.channels == 3
    np.testing.assert_array_equal(record.pixels, RGB16)


def test_rgba16_png_and_grey_alpha16_png(tmp_path):
    rgba = np.dstack([RGB16[..., ::-1], np.full(GREY16.shape, 65535, np.uint16)])
    assert cv2.imwrite(str(tmp_path / "rgba16.png"), rgba)
    record = read_image(tmp_path / "rgba16.png")
    assert record.pixels.dtype == np.uint16 and record.meta.had_alpha
    np.testing.assert_array_equal(record.pixels, RGB16)

    grey_alpha = np.dstack([GREY16, np.full(GREY16.shape, 65535, np.uint16)]).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in grey_alpha)
    (tmp_path / "la16.png").write_bytes(_png_bytes(32, 24, 16, 4, rows))
    record = read_image(tmp_path / "la16.png")
    assert record.pixels.dtype == np.uint16 and record.pixels.ndim == 2 and record.meta.had_alpha
    np.testing.assert_array_equal(record.pixels, GREY16)


def test_jpeg_exif_orientation_6_is_applied(tmp_path):
    stored = np.zeros((20, 40), np.uint8)  # 20 rows x 40 columns as stored
    stored[:6, :6] = 255  # marker in the stored top-left corner
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    record = read_image(path)
    assert record.pixels.shape == (40, 20) and record.pixels.ndim == 2
    assert record.meta.exif_orientation == 6 and (record.meta.height, record.meta.width) == (40, 20)
    assert record.pixels[:6, -6:].mean() > 200 and record.pixels[:6, :6].mean() < 50  # now top-right


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_helper_matches_pillow(orientation):
    image = Image.fromarray(RGB8[:5, :7])
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(_apply_orientation(RGB8[:5, :7], orientation), expected)


def test_multipage_tiff_reads_frame_0_only(tmp_path):
    path = tmp_path / "pages.tif"
    Image.fromarray(GREY8).save(path, save_all=True, append_images=[Image.fromarray(GREY8[::-1])])
    record = read_image(path)
    assert record.meta.n_frames == 2 and record.meta.frame == 0
    np.testing.assert_array_equal(record.pixels, GREY8)
    _raises(ImageReadError, path, frame=1)


# ------------------------------------------------------------------------- DICOM: pydicom's test data


def _pydicom_decodes(path: str) -> np.ndarray | None:
    """What pydicom itself decodes (all frames), or None when it cannot."""
    try:
        return pydicom.dcmread(path, force=True).pixel_array
    except Exception:
        return None


def _missing_plugin(path: str) -> tuple[str, list[str]] | None:
    """(transfer syntax UID, pydicom's missing dependencies) when no installed plugin decodes the file."""
    try:
        ds = pydicom.dcmread(path, force=True)
        uid = ds.file_meta.TransferSyntaxUID
        decoder = get_decoder(uid)
    except Exception:
        return None
    if "PixelData" not in ds or decoder.is_available:
        return None
    return str(uid), decoder.missing_dependencies


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's own warnings while computing the oracle
@pytest.mark.parametrize("path", DICOM_FILES, ids=[_id(f) for f in DICOM_FILES])
def test_pydicom_testdata(path):
    expected = _pydicom_decodes(path)
    if expected is None:
        # Not DICOM, no pixel data, broken, or a compression no installed plugin decodes.
        try:
            read_image(path, frame=0)
        except ImageReadError as exc:
            assert path in str(exc)
            missing = _missing_plugin(path)
            if missing is not None:
                assert isinstance(exc, UnsupportedCompressionError)
                uid, dependencies = missing
                assert uid in str(exc)
                packages = [dep.split(" - requires ")[-1] for dep in dependencies]
                names = [p.split(">=")[0].replace("gdcm", "python-gdcm") for d in packages for p in d.split()]
                assert any(name in str(exc) for name in names if name not in ("and", "numpy"))
            return
        pytest.fail(f"pydicom cannot decode {path} but read_image returned pixels")

    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames > 1:
        _raises(MultiFrameImageError, Path(path))
        record = read_image(path, frame=0)
        first = expected[0]
        assert record.meta.frame == 0 and record.meta.n_frames == n_frames
    else:
        record = read_image(path)
        first = expected
    assert record.meta.format == "DICOM"
    assert (record.meta.height, record.meta.width) == first.shape[:2] == record.pixels.shape[:2]
    colour = first.ndim == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    assert record.pixels.ndim == (3 if colour else 2)
    assert record.meta.channels == (3 if colour else 1)
    assert record.pixels.dtype.isnative and record.pixels.flags.writeable
    assert np.issubdtype(record.pixels.dtype, np.integer) or record.pixels.dtype == np.float32


def _frames_file() -> str:
    return get_testdata_file("rtdose.dcm")


def test_multiframe_reads_only_the_requested_frame():
    path = _frames_file()
    full = pydicom.dcmread(path).pixel_array
    for k in (0, 7, 14):
        record = read_image(path, frame=k)
        np.testing.assert_array_equal(record.pixels, full[k])
        assert record.meta.frame == k and record.meta.n_frames == 15
    error = _raises(MultiFrameImageError, Path(path))
    assert "15 frames" in str(error) and "frame=" in str(error)
    for bad in (15, -1):
        error = _raises(ImageReadError, Path(path), frame=bad)
        assert "out of range" in str(error)
    _raises(ImageReadError, Path(get_testdata_file("CT_small.dcm")), frame=1)


def test_ct_gets_hounsfield_units():
    path = get_testdata_file("CT_small.dcm")
    record = read_image(path)
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(record.pixels, expected)
    assert record.pixels.min() < 0 and np.issubdtype(record.pixels.dtype, np.signedinteger)
    assert record.meta.modality == "CT" and record.meta.bit_depth == 16
    assert record.meta.voi_applied is None and record.meta.value_range is None  # no window in the file


def test_mr_keeps_full_depth_and_applies_window():
    path = get_testdata_file("MR_small.dcm")
    raw = read_image(path, apply_voi=False)
    assert raw.pixels.max() > 255 and raw.pixels.dtype == np.int16 and raw.meta.voi_applied is None
    assert raw.meta.window == (600.0, 1600.0) and raw.meta.value_range is None

    windowed = read_image(path)
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    np.testing.assert_allclose(windowed.pixels, expected, rtol=1e-6)
    assert windowed.meta.voi_applied == "window" and windowed.meta.window == (600.0, 1600.0)
    assert windowed.meta.value_range == (-32768.0, 32767.0)  # apply_windowing's output range (signed 16-bit)
    lo, hi = windowed.meta.value_range
    assert lo <= windowed.pixels.min() and windowed.pixels.max() <= hi


def _monochrome1_files() -> list[str]:
    found = []
    for path in DICOM_FILES:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            found.append(path)
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_monochrome1_is_inverted():
    files = _monochrome1_files()
    assert files, "pydicom's test data has MONOCHROME1 files (CR)"
    path = files[0]
    ds = pydicom.dcmread(path)
    modality = apply_modality_lut(ds.pixel_array, ds)

    record = read_image(path, apply_voi=False)  # no display range: mirrored in the data's own range
    assert record.meta.inverted and record.meta.photometric == "MONOCHROME1"
    np.testing.assert_allclose(record.pixels, modality.min() + modality.max() - modality, rtol=1e-5)

    record = read_image(path)  # windowed: mirrored inside the window's output range
    windowed = apply_voi_lut(modality, ds)
    lo, hi = record.meta.value_range
    assert record.meta.inverted and record.meta.voi_applied == "window"
    np.testing.assert_allclose(record.pixels, lo + hi - windowed, rtol=1e-5)
    # Bright means dense: the pixel that was darkest in the stored MONOCHROME1 data is now the brightest.
    assert record.pixels.flat[np.argmin(windowed)] == record.pixels.max()


def test_voi_lut_sequence_is_preferred(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", list(range(4096)))  # identity over 0..4095, clipped outside
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / "voi_lut.dcm"
    ds.save_as(path)
    record = read_image(path)
    assert record.meta.voi_applied == "lut" and record.meta.value_range == (0.0, 4095.0)
    assert record.meta.window == (600.0, 1600.0)
    np.testing.assert_array_equal(record.pixels, np.clip(ds.pixel_array, 0, 4095))
    assert np.issubdtype(record.pixels.dtype, np.integer)


def test_enhanced_functional_group_rescale(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = apply_modality_lut(ds.pixel_array, ds)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = ds.RescaleSlope, ds.RescaleIntercept
    del ds.RescaleSlope, ds.RescaleIntercept
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    np.testing.assert_array_equal(read_image(path).pixels, expected)


def test_colour_dicom_is_rgb():
    reference = read_image(get_testdata_file("SC_rgb_rle.dcm")).pixels.astype(int)
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm"):
        record = read_image(get_testdata_file(name))
        assert record.pixels.shape == (100, 100, 3) and record.meta.photometric.startswith("YBR")
        assert np.abs(record.pixels.astype(int) - reference).mean() < 2  # YBR converted to RGB


def test_dicom_with_and_without_extension_and_preamble(tmp_path):
    source = Path(get_testdata_file("CT_small.dcm"))
    expected = read_image(source).pixels
    data = source.read_bytes()
    meta_end = 132 + 12 + pydicom.dcmread(source).file_meta.FileMetaInformationGroupLength
    variants = {
        "plain.dcm": data,
        "no_extension": data,
        "no_preamble.dcm": data[132:],  # no preamble, no DICM prefix: group 0002 still there
        "no_file_meta": data[meta_end:],  # bare dataset: transfer syntax must be inferred
    }
    for name, payload in variants.items():
        (tmp_path / name).write_bytes(payload)
        record = read_image(tmp_path / name)
        np.testing.assert_array_equal(record.pixels, expected)
        assert record.meta.format == "DICOM"


def test_unknown_transfer_syntax_is_unsupported_compression(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # encapsulated video: pydicom has no decoder for it
    path = tmp_path / "video.dcm"
    ds.save_as(path)
    error = _raises(UnsupportedCompressionError, path)
    assert MPEG2MPML in str(error) and "MPEG2" in str(error)


def test_missing_plugin_message_names_packages(monkeypatch):
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if _missing_plugin(path) is None:
        # A JPEG-LS plugin is installed (pyjpegls comes with highdicom, the [dicom] extra that CI installs):
        # hide the installed plugins from pydicom's decoder, as if they were missing, so the message is
        # still tested.
        from pydicom.pixels.decoders.pyjpegls import DECODER_DEPENDENCIES

        decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        hidden = {label: DECODER_DEPENDENCIES[decoder.UID] for label in decoder._available}
        monkeypatch.setattr(decoder, "_available", {})
        monkeypatch.setattr(decoder, "_unavailable", {**decoder._unavailable, **hidden})
    assert _missing_plugin(path) is not None
    error = _raises(UnsupportedCompressionError, Path(path))
    assert "JPEG-LS Lossless" in str(error) and "1.2.840.10008.1.2.4.80" in str(error)
    assert "pyjpegls" in str(error) and "python-gdcm" in str(error)


def test_dicom_without_pixel_data(tmp_path):
    error = _raises(NotAnImageError, Path(get_testdata_file("rtplan.dcm")))
    assert "no pixel data" in str(error)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData  # an image header with its pixels removed
    ds.save_as(tmp_path / "header_only.dcm")
    error = _raises(NotAnImageError, tmp_path / "header_only.dcm")
    assert "no pixel data" in str(error)


def test_invalid_window_falls_back_to_no_voi(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 600, 0  # width 0 is invalid for LINEAR windowing
    ds.save_as(tmp_path / "bad_window.dcm")
    record = read_image(tmp_path / "bad_window.dcm")
    assert record.meta.voi_applied is None and record.meta.value_range is None
    assert "voi_error" in record.meta.extra
    np.testing.assert_array_equal(record.pixels, ds.pixel_array)


# --------------------------------------------------------------------------------------- bad inputs


def _good_png(tmp_path: Path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(GREY16).save(path)
    return path


def test_missing_file(tmp_path):
    error = _raises(ImageNotFoundError, tmp_path / "nope.png")
    assert isinstance(error, FileNotFoundError)


def test_zero_byte_file(tmp_path):
    for name in ("empty.png", "empty.dcm", "empty"):
        (tmp_path / name).write_bytes(b"")
        _raises(EmptyImageFileError, tmp_path / name)


def test_directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    _raises(NotAnImageError, tmp_path / "folder.png")


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(RGB8).resize((256, 192)).save(full, quality=95)
    data = full.read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    _raises(TruncatedImageError, tmp_path / "half.jpg")


@pytest.mark.parametrize("kind", ["grey16", "rgb8", "rgb16"])
def test_truncated_png(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "grey16":
        Image.fromarray(GREY16).save(path)
    elif kind == "rgb8":
        Image.fromarray(RGB8).save(path)
    else:
        cv2.imwrite(str(path), RGB16)
    data = path.read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    _raises(TruncatedImageError, tmp_path / "half.png")


def test_text_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n" * 10)
    _raises(NotAnImageError, tmp_path / "notes.png")


@pytest.mark.parametrize("name", ["random.dcm", "random", "random.bin"])
def test_random_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(np.random.default_rng(1).bytes(4096))
    _raises(NotAnImageError, tmp_path / name)


def test_text_named_dcm(tmp_path):
    (tmp_path / "report.dcm").write_text("patient report, not DICOM\n" * 20)
    _raises(NotAnImageError, tmp_path / "report.dcm")


@pytest.mark.parametrize("name", ["CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"])
def test_dicom_with_chopped_pixel_data(tmp_path, name):
    data = Path(get_testdata_file(name)).read_bytes()
    path = tmp_path / "chopped.dcm"
    for fraction in (0.7, 0.95):
        path.write_bytes(data[: int(len(data) * fraction)])
        _raises(TruncatedImageError, path)


def test_dicom_chopped_inside_an_element_header(tmp_path):
    data = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    (tmp_path / "chopped.dcm").write_bytes(data[: int(len(data) * 0.9)])  # 5 bytes into a tag header
    _raises(TruncatedImageError, tmp_path / "chopped.dcm")


def test_absurd_png_dimensions(tmp_path):
    # A valid-looking PNG whose header claims 100000 x 100000 pixels (10 gigapixels) over 1 row of data.
    (tmp_path / "bomb.png").write_bytes(_png_bytes(100_000, 100_000, 8, 0, b"\x00" * 101))
    _raises(ImageTooLargeError, tmp_path / "bomb.png")


def test_max_pixels_guard(tmp_path):
    _raises(ImageTooLargeError, _good_png(tmp_path), max_pixels=100)
    dicom = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), dicom)
    _raises(ImageTooLargeError, dicom, max_pixels=100)
    assert read_image(dicom, max_pixels=128 * 128).meta.size == (128, 128)


def test_dicom_dimensions_guard_before_decoding(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000  # header claims 3.6 gigapixels; the pixel data is tiny
    path = tmp_path / "bomb.dcm"
    ds.save_as(path)
    error = _raises(ImageTooLargeError, path)
    assert "60000x60000" in str(error)


def test_reader_never_modifies_inputs(tmp_path):
    files = [_good_png(tmp_path)]
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr_no_ext")
    (tmp_path / "broken.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:5000])
    (tmp_path / "notes.png").write_text("not an image")
    files += [tmp_path / n for n in ("mr.dcm", "mr_no_ext", "broken.dcm", "notes.png")]
    past = 1_600_000_000
    for path in files:
        os.utime(path, (past, past))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    for path in files:
        with contextlib.suppress(ImageReadError):
            read_image(path)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert before == after
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in files)  # no side files either


def test_error_family_is_exported():
    assert imaging_ad.ImageReadError is ImageReadError
    for exc_type in (
        ImageNotFoundError,
        EmptyImageFileError,
        TruncatedImageError,
        NotAnImageError,
        UnsupportedCompressionError,
        ImageTooLargeError,
        MultiFrameImageError,
    ):
        assert issubclass(exc_type, ImageReadError)
