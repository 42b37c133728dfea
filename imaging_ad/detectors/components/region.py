"""A user's region of interest: the part of every image a detector should examine (a mask image, white
inside), reduced to the cells of a feature grid. Cells mostly outside it neither score nor show, so a
ruler, a burnt-in label or a fixture that is in every image in the same place cannot raise an alarm."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from imaging_ad.detectors.params import ParameterError

#: a cell is examined when at least this share of it lies inside the region
_INSIDE_SHARE = 0.5


def read_region(path: str | os.PathLike) -> np.ndarray:
    """The mask image at ``path`` as a boolean array (nonzero: examine), or a :class:`ParameterError`
    that names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"region: {path} is not a file (give a mask image: white where to look)")
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ParameterError(f"region: {path} cannot be read as an image (PNG, JPEG, BMP or TIFF mask)")
    inside = mask > 0
    if not inside.any():
        raise ParameterError(f"region: {path} is black everywhere, so nothing would be examined")
    return inside


def region_cells(inside: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(h * w,) bool: the grid cells at least half inside the region. The mask is stretched onto the grid
    as images are stretched onto the model's input (the default ``aspect``)."""
    height, width = grid
    share = cv2.resize(inside.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    cells = torch.from_numpy(share >= _INSIDE_SHARE).reshape(-1)
    if not cells.any():
        raise ParameterError(
            f"region: less than half of every {height} x {width} grid cell lies inside the mask; "
            "draw a larger region"
        )
    return cells
