"""Heatmaps from feature resolution to model-input resolution: bilinear upsampling, then a Gaussian blur
(as in PatchCore). One module, used by eager scoring and traced into every export alike."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class HeatmapSmoothing(nn.Module):
    """(B, h, w) maps -> (B, S, S): bilinear upsampling (half-pixel centres) and a Gaussian blur of
    ``sigma`` pixels with reflect-101 borders (``cv2.GaussianBlur``'s).

    Both steps are linear and separable, so for coarse grids each axis is one small (S, h) matrix and
    the whole step two matrix products: about 8x cheaper on the CPU than upsampling and a 33-tap blur at
    full size for a 16x16 grid, and equal to float32 rounding (:func:`smoothing_operator`). Maps finer
    than stride 8 (image-space detectors) take the direct path, where the products would cost more."""

    def __init__(self, grid: tuple[int, int], size: int, sigma: float, direct: bool | None = None) -> None:
        super().__init__()
        self.size = size
        self.direct = max(grid) * 8 > size if direct is None else direct
        if self.direct:
            kernel = torch.from_numpy(gaussian_kernel(sigma)) if sigma > 0 else torch.ones(1)
            self.radius = kernel.numel() // 2
            if self.radius >= size:
                raise ValueError(
                    f"blur_sigma={sigma} needs a {kernel.numel()}-pixel kernel, wider than the {size}-pixel "
                    "heatmap: reflected borders are undefined"
                )
            self.register_buffer("horizontal", kernel.view(1, 1, 1, -1).clone())
            self.register_buffer("vertical", kernel.view(1, 1, -1, 1).clone())
        else:
            self.register_buffer("rows", smoothing_operator(grid[0], size, sigma).clone())
            self.register_buffer("columns_t", smoothing_operator(grid[1], size, sigma).T.contiguous())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps.float()
        if not self.direct:
            return self.rows @ maps @ self.columns_t
        x = F.interpolate(maps[:, None], size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.radius:
            r = self.radius
            x = F.pad(x, (r, r, r, r), mode="reflect")  # torch "reflect" is OpenCV's BORDER_REFLECT_101
            x = F.conv2d(F.conv2d(x, self.horizontal), self.vertical)  # rows first, as cv2.sepFilter2D
        return x[:, 0]


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel ``cv2.GaussianBlur(ksize=(0, 0), sigmaX=sigma)`` uses on float images:
    size ``round(8 sigma + 1) | 1``, weights ``exp(-x^2 / (2 sigma^2))`` normalised, in float32."""
    size = int(round(sigma * 4 * 2 + 1)) | 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-(x * x) / (2 * sigma * sigma))
    return (weights / weights.sum()).astype(np.float32)


@functools.lru_cache(maxsize=16)  # a handful of (grid, input size, sigma) per process; never mutated
def smoothing_operator(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in) float32: bilinear upsampling (half-pixel centres, as ``F.interpolate`` with
    ``align_corners=False``) from ``n_in`` to ``n_out`` samples, then ``cv2.GaussianBlur``'s blur along
    that axis. Built by passing each unit vector through the very same two operations."""
    units = torch.eye(n_in)[:, None, :, None]  # (n_in, 1, n_in, 1): one unit column per map
    upsampled = F.interpolate(units, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0]
    columns = upsampled.numpy().T.copy()  # (n_out, n_in): column i is unit i upsampled
    if sigma > 0:
        # a 1-pixel-wide image: reflect-101 in x leaves it unchanged, so this blurs along y only
        columns = np.stack(
            [
                cv2.GaussianBlur(
                    np.ascontiguousarray(c[:, None]), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101
                )[:, 0]
                for c in columns.T
            ],
            axis=1,
        )
    return torch.from_numpy(np.ascontiguousarray(columns, dtype=np.float32))
