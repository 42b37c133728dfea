"""A seeded fuzz test (issue 18's acceptance): a few hundred bad inputs — truncated and bit-flipped
PNG/JPEG/TIFF/BMP/DICOM, absurd headers, non-finite pixels, special files — through ``read_image``,
``Detector.predict``, ``imaging-ad predict`` and ``scan``. Zero tracebacks, zero hangs (each case under
a time limit), zero verdicts on an unreadable or non-finite input, and every error names its file."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from imaging_ad.cli import main
from imaging_ad.detectors import load_detector
from imaging_ad.io import ImageReadError, read_image
from imaging_ad.scan import read_rows, scan
from tests.hostile_files import dicom_with_slope, float_tiff, png_chunk, special_files, time_limit
from tests.synthetic import texture
from tests.tiny_models import one_torch_thread, tiny_model

SEED = 18
MIN_CASES = 200
DICOM_SEEDS = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "JPEG-lossy.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
)
TRUNCATIONS, FLIPS = 5, 8


@dataclass(frozen=True)
class Case:
    path: Path
    kind: str


def _raster_seeds(rng: np.random.Generator) -> dict[str, bytes]:
    gray = texture(rng, 48, 56)
    rgb = np.dstack([gray, np.roll(gray, 3, axis=0), 255 - gray])
    deep = gray.astype(np.uint16) * 257
    seeds = {}
    for name, pixels, ext in (
        ("gray8.png", gray, ".png"),
        ("rgb8.png", rgb, ".png"),
        ("gray16.png", deep, ".png"),
        ("gray.jpg", gray, ".jpg"),
        ("rgb.jpg", rgb, ".jpg"),
        ("gray16.tif", deep, ".tiff"),
        ("rgb.bmp", rgb, ".bmp"),
    ):
        ok, encoded = cv2.imencode(ext, pixels)
        assert ok
        seeds[name] = encoded.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(gray.astype(np.float32) / 255, mode="F").save(buffer, format="TIFF")
    seeds["float.tif"] = buffer.getvalue()
    return seeds


def _dicom_header_attacks(folder: Path) -> Iterator[Case]:
    """DICOMs whose header lies: absurd sizes, depths, frame counts, photometric names, rescales."""
    edits = {
        "rows_65535": {"Rows": 65535, "Columns": 65535},
        "rows_0": {"Rows": 0},
        "bits_3": {"BitsAllocated": 3},
        "bits_64": {"BitsAllocated": 64, "BitsStored": 64, "HighBit": 63},
        "samples_4": {"SamplesPerPixel": 4},
        "frames_huge": {"NumberOfFrames": 2**31 - 1},
        "photometric_bogus": {"PhotometricInterpretation": "BOGUS"},
        "monochrome1_window0": {
            "PhotometricInterpretation": "MONOCHROME1",
            "WindowWidth": 0,
            "WindowCenter": 0,
        },
        "window_nan": {"WindowWidth": "nan", "WindowCenter": "nan"},
        "intercept_nan": {"RescaleIntercept": "nan"},
        "slope_neg_huge": {"RescaleSlope": "-1e308"},
        "pixel_repr_7": {"PixelRepresentation": 7},
    }
    for name, changes in edits.items():
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        path = folder / f"hdr_{name}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
        yield Case(path, "absurd header")
    for slope in ("nan", "inf", "1e308"):
        yield Case(dicom_with_slope(folder / f"slope_{slope}.dcm", slope), "non-finite")


def _raster_header_attacks(folder: Path, seeds: dict[str, bytes]) -> Iterator[Case]:
    png = seeds["gray8.png"]
    for width, height in ((0, 0), (65535, 65535), (1, 2**31 - 1), (2**31 - 1, 1)):
        header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        data = png[:8] + png_chunk(b"IHDR", header) + png[33:]  # IHDR with a valid CRC
        path = folder / f"hdr_png_{width}x{height}.png"
        path.write_bytes(data)
        yield Case(path, "absurd header")
    jpeg = bytearray(seeds["gray.jpg"])
    sof = next(i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC1, 0xC2))
    for height, width in ((65535, 65535), (0, 0)):
        attacked = bytearray(jpeg)
        attacked[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
        path = folder / f"hdr_jpeg_{width}x{height}.jpg"
        path.write_bytes(bytes(attacked))
        yield Case(path, "absurd header")
    tiff = seeds["gray16.tif"]
    for tag, value in ((256, 2**31 - 1), (257, 2**31 - 1), (258, 48), (277, 9), (273, 2**31), (279, 2**31)):
        path = folder / f"hdr_tiff_{tag}.tif"
        path.write_bytes(_patch_tiff_tag(tiff, tag, value))
        yield Case(path, "absurd header")


def _patch_tiff_tag(data: bytes, tag: int, value: int) -> bytes:
    """``data`` (a little-endian TIFF) with the inline value of ``tag`` in the first IFD replaced.
    Patched by hand: libtiff's writer corrupts its heap when asked to write such values."""
    assert data[:4] == b"II*\x00"
    out = bytearray(data)
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        entry_tag, kind = struct.unpack_from("<HH", data, entry)
        if entry_tag == tag:
            struct.pack_into("<HI", out, entry + 2, 4, 1)  # type LONG, one value, stored inline
            struct.pack_into("<I", out, entry + 8, value)
            return bytes(out)
    raise AssertionError(f"tag {tag} not in the seed TIFF")


def generate_cases(folder: Path) -> list[Case]:
    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = _raster_seeds(rng)
    for name in DICOM_SEEDS:
        seeds[name] = Path(get_testdata_file(name)).read_bytes()
    cases: list[Case] = []
    for name, data in seeds.items():
        stem, suffix = os.path.splitext(name)
        for i in range(TRUNCATIONS):
            cut = int(rng.integers(1, len(data) - 1)) if i else min(20, len(data) - 1)
            path = folder / f"trunc_{stem}_{i}{suffix}"
            path.write_bytes(data[:cut])
            cases.append(Case(path, "truncated"))
        for i in range(FLIPS):
            flipped = bytearray(data)
            for position in rng.integers(0, len(data), size=int(rng.choice([1, 3, 12, 48]))):
                flipped[position] ^= 1 << int(rng.integers(0, 8))
            path = folder / f"flip_{stem}_{i}{suffix}"
            path.write_bytes(bytes(flipped))
            cases.append(Case(path, "bit-flipped"))
    cases += _dicom_header_attacks(folder)
    cases += _raster_header_attacks(folder, seeds)
    for values, name in (
        ((np.nan,), "nan"),
        ((np.inf,), "inf"),
        ((-np.inf,), "neginf"),
        ((np.nan, np.inf), "both"),
    ):
        cases.append(Case(float_tiff(folder / f"float_{name}.tif", values), "non-finite"))
    garbage = {
        "empty.png": b"",
        "one_byte.jpg": b"\xff",
        "zeros.png": bytes(1024),
        "random.dcm": rng.bytes(2048),
        "random_no_suffix": rng.bytes(700),
        "text.jpg": b"this is not an image\n" * 20,
        "dicom_prefix_only.dcm": bytes(128) + b"DICM",
        "png_signature_only.png": b"\x89PNG\r\n\x1a\n",
    }
    for name, data in garbage.items():
        (folder / name).write_bytes(data)
        cases.append(Case(folder / name, "garbage"))
    for kind, path in special_files(folder).items():
        if kind != "directory":  # a folder is not a file to score; the reader's refusal is tested elsewhere
            cases.append(Case(path, "special file"))
    os.symlink("/dev/null", folder / "null.png")
    cases.append(Case(folder / "null.png", "special file"))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket.dcm"))
    sock.close()
    cases.append(Case(folder / "socket.dcm", "special file"))
    return cases


def _read_outcome(path: Path) -> tuple[bool, str | None]:
    """(readable, error message); anything but an ImageReadError escapes and fails the test."""
    with time_limit(10):
        try:
            record = read_image(path)
        except ImageReadError as exc:
            return False, str(exc)
    if np.issubdtype(record.pixels.dtype, np.floating):
        assert np.isfinite(record.pixels).all(), f"{path}: non-finite pixels returned"
    return True, None


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Case], dict[Path, tuple[bool, str | None]]]:
    folder = tmp_path_factory.mktemp("fuzz") / "inputs"
    cases = generate_cases(folder)
    return cases, {case.path: _read_outcome(case.path) for case in cases}


def test_enough_cases_of_every_kind(fuzz) -> None:
    cases, outcomes = fuzz
    assert len(cases) >= MIN_CASES
    kinds = {case.kind for case in cases}
    assert kinds == {"truncated", "bit-flipped", "absurd header", "non-finite", "garbage", "special file"}
    unreadable = sum(not readable for readable, _ in outcomes.values())
    assert unreadable >= MIN_CASES * 0.6, "the fuzzer should mostly make unreadable files"


def test_read_image_errors_name_their_file(fuzz) -> None:
    cases, outcomes = fuzz
    for case in cases:
        readable, error = outcomes[case.path]
        if case.kind in ("non-finite", "special file", "garbage"):
            assert not readable, f"{case.path} ({case.kind}) was read"
        if not readable:
            assert str(case.path) in error, error


def test_python_predict_gives_no_verdict_without_readable_pixels(fuzz) -> None:
    cases, outcomes = fuzz
    detector = load_detector(tiny_model("patchcore"), device="cpu")
    for case in cases:
        readable, _ = outcomes[case.path]
        with time_limit(15):
            try:
                (result,) = detector.predict([case.path])
            except ImageReadError as exc:
                assert not readable, f"{case.path}: readable, but predict raised {exc}"
                assert exc.path == str(case.path)
                continue
        assert readable, f"{case.path}: unreadable, yet a result came back"
        if result.ok:
            assert np.isfinite(result.score) and isinstance(result.is_anomaly, bool)
        else:
            assert result.is_anomaly is None


def test_cli_predict_gives_error_rows_for_every_unreadable_file(fuzz, tmp_path, capsys) -> None:
    cases, outcomes = fuzz
    folder = cases[0].path.parent
    out = tmp_path / "rows.json"
    with time_limit(120):
        status = main(
            ["predict", str(tiny_model("patchcore")), str(folder), "--json", str(out), "--device", "cpu"]
        )
    assert status == 1  # some inputs could not be scored
    err = capsys.readouterr().err
    assert "Traceback" not in err
    rows = {row["path"]: row for row in json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))}
    for case in cases:
        readable, _ = outcomes[case.path]
        row = rows[str(case.path)]
        if not readable:
            assert "score" not in row and "is_anomaly" not in row, f"a verdict on unreadable {case.path}"
            assert str(case.path) in row["error"]
        elif "score" in row:
            assert np.isfinite(row["score"])


def test_scan_gives_error_rows_for_every_unreadable_file(fuzz, tmp_path) -> None:
    cases, outcomes = fuzz
    folder = cases[0].path.parent
    model = tiny_model("patchcore")
    with time_limit(120):
        summary = scan(folder, model, tmp_path / "out", detector=load_detector(model, device="cpu"))
    rows = {row["path"]: row for row in read_rows(tmp_path / "out")}
    n_unreadable = 0
    for case in cases:
        readable, _ = outcomes[case.path]
        row = rows[case.path.name]
        if not readable:
            n_unreadable += 1
            assert row["error"] and row["score"] is None and row["is_anomaly"] is None, row
        elif row["score"] is not None:
            assert np.isfinite(row["score"])
    assert summary.n_errors >= n_unreadable
    assert summary.n_rows == len(rows) == len(cases)


def test_generation_is_seeded(tmp_path) -> None:
    first = generate_cases(tmp_path / "a")
    second = generate_cases(tmp_path / "b")
    for a, b in zip(first, second, strict=True):
        if a.kind != "special file":
            assert a.path.name == b.path.name and a.path.read_bytes() == b.path.read_bytes()
    shutil.rmtree(tmp_path / "a")
