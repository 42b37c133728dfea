"""What the library accepts as an image, and how each kind becomes pixels: shared by detectors and the
torch-free runtime of exported models."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from imaging_ad.io.reader import read_image
from imaging_ad.io.record import ImageRecord

#: a path, a decoded record, an array (HxW or HxWxC), or anything with a ``.path`` (a dataset Sample)
ImageInput = str | os.PathLike | ImageRecord | np.ndarray | Any


def to_record(item: ImageInput) -> ImageRecord | np.ndarray:
    """The pixels of ``item``: records and arrays as they are, paths (or ``item.path``) read."""
    if isinstance(item, (ImageRecord, np.ndarray)):
        return item
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    if hasattr(item, "path"):
        return read_image(item.path)
    raise TypeError(f"cannot read an image from {type(item).__name__}; give a path, ImageRecord or array")


def item_path(item: ImageInput) -> str | None:
    """Where ``item`` came from, when known."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, ImageRecord):
        return item.meta.path
    return str(item.path) if hasattr(item, "path") else None
