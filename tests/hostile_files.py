"""Files made to hurt: non-finite pixels, special files, headers that lie, and small PNGs that declare
huge images. Shared by the robustness tests (issue 18)."""

from __future__ import annotations

import os
import signal
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def huge_png(path: Path, width: int = 9999, height: int = 9999, rgb: bool = True) -> Path:
    """A valid PNG of ``width`` x ``height`` black pixels; a few hundred KB on disk, streamed out row by
    row so that making it takes no more memory than one row."""
    channels = 3 if rgb else 1
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + width * channels)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header))
        handle.write(png_chunk(b"IDAT", b"".join(parts)))
        handle.write(png_chunk(b"IEND", b""))
    return path


def float_tiff(path: Path, values: tuple[float, ...] = (np.nan, np.inf, -np.inf)) -> Path:
    """A float32 TIFF of plausible values with a few non-finite ones."""
    pixels = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40)
    for index, value in enumerate(values):
        pixels[5 + index, 7] = value
    Image.fromarray(pixels, mode="F").save(path)
    return path


def dicom_with_slope(path: Path, slope: str) -> Path:
    """CT_small.dcm with RescaleSlope set to ``slope`` ("nan", "1e308", "inf"): the modality LUT makes
    every pixel non-finite."""
    import warnings

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that such a DS value is invalid: that is the point
        ds.RescaleSlope = slope
        ds.save_as(path)
    return path


def special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a link to /dev/zero, a symlink loop, a broken link and a folder, all named like images."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {
        "fifo": folder / "fifo.png",
        "dev_zero": folder / "zero.png",
        "loop": folder / "loop.png",
        "dangling": folder / "dangling.dcm",
        "directory": folder / "folder.png",
    }
    os.mkfifo(made["fifo"])
    os.symlink("/dev/zero", made["dev_zero"])
    os.symlink(made["loop"].name, made["loop"])
    os.symlink("no-such-file.dcm", made["dangling"])
    made["directory"].mkdir()
    return made


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a blocked open() or read() in the main thread."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
