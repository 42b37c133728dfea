"""Ways of turning a backbone's multi-stage feature maps into vectors, shared by several detectors."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def patch_grid(features: list[torch.Tensor], neighbourhood: int = 1) -> torch.Tensor:
    """(B, D, h, w): every stage locally averaged over a ``neighbourhood`` square (borders averaging only
    the cells inside; 1: none), resized bilinearly onto the finest selected stage's grid and concatenated,
    in channels-last memory (the patch rows (B, h * w, D) are then a view).

    Both steps are linear in space, so on small grids each stage is one matrix product with their
    (h * w, h_s * w_s) operator, which also lays the rows out channels-last for free: PatchCore's
    aggregation behind ONNX Runtime went from 0.26 to 0.07 s per 200 images (benchmarks/RESULTS.md). The
    operator grows with the square of the grid, so larger grids run torch's pooling and resizing kernels,
    on channels-last maps (NCHW maps, what ONNX Runtime returns, make them loop over channels)."""
    grid = (int(features[0].shape[-2]), int(features[0].shape[-1]))
    if grid[0] * grid[1] <= _OPERATOR_MAX_CELLS:
        rows = torch.cat(
            [
                torch.matmul(
                    aggregation_operator(tuple(f.shape[-2:]), grid, neighbourhood).to(f),
                    f.flatten(2).transpose(1, 2),
                )
                for f in features
            ],
            dim=2,
        )  # (B, h * w, D)
        return rows.view(rows.shape[0], *grid, -1).permute(0, 3, 1, 2)
    k = neighbourhood
    maps = [f.contiguous(memory_format=torch.channels_last) for f in features]
    if k > 1:
        maps = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in maps]
    maps = [maps[0]] + [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in maps[1:]]
    return torch.cat(maps, dim=1)


# Grids up to 16 x 16 (256 px inputs at stride 16) aggregate by operator: its cost grows with the square
# of the cells, and at 32 x 32 it would cost ~0.4 GFLOP per image.
_OPERATOR_MAX_CELLS = 256


@functools.lru_cache(maxsize=32)  # a few (stage, grid, k) per process; never mutated
def aggregation_operator(stage: tuple[int, int], grid: tuple[int, int], neighbourhood: int) -> torch.Tensor:
    """(grid cells, stage cells) float32: :func:`patch_grid`'s local average then bilinear resizing onto
    ``grid``, built by passing each unit map through those very operations."""
    k = neighbourhood
    with torch.inference_mode(False):  # cached: a normal tensor, usable by fits that track gradients too
        units = torch.eye(stage[0] * stage[1]).view(-1, 1, *stage)
        pooled = F.avg_pool2d(units, k, stride=1, padding=k // 2, count_include_pad=False)
        if tuple(stage) != tuple(grid):
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        return pooled.reshape(units.shape[0], -1).T.contiguous()


def patch_rows(features: list[torch.Tensor]) -> torch.Tensor:
    """(B * h * w, D): one row per patch of :func:`patch_grid`, image by image, row-major."""
    grid = patch_grid(features)
    return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])


def pooled_statistics(features: list[torch.Tensor], with_std: bool = True) -> torch.Tensor:
    """(B, D): spatial mean (and standard deviation) of every stage — image-level statistics that suit
    diffuse findings better than any single patch."""
    stats = [f.mean(dim=(2, 3)) for f in features]
    if with_std:
        # torch.std (Bessel-corrected) spelled out: ONNX has no standard-deviation operator
        for f in features:
            n = int(f.shape[-2]) * int(f.shape[-1])
            centred = f - f.mean(dim=(2, 3), keepdim=True)
            stats.append(((centred * centred).sum(dim=(2, 3)) / (n - 1)).sqrt())
    return torch.cat(stats, dim=1)


class PatchSampler:
    """A bounded, evenly spread sample of patch rows from a stream of batches: each batch contributes
    its share of ``max_rows`` (by its number of images), so memory never depends on the dataset size."""

    def __init__(self, max_rows: int, n_images: int, seed: int) -> None:
        self.max_rows = max_rows
        self.n_images = max(n_images, 1)
        self.generator = torch.Generator().manual_seed(seed)
        self._rows: list[torch.Tensor] = []
        self._images_seen = 0
        self._kept = 0

    def add(self, rows: torch.Tensor, n_images: int) -> None:
        self._images_seen += n_images
        target = math.ceil(self.max_rows * min(1.0, self._images_seen / self.n_images))
        take = min(rows.shape[0], max(0, target - self._kept))
        if take:
            pick = torch.randperm(rows.shape[0], generator=self.generator)[:take].to(rows.device)
            self._rows.append(rows[pick].cpu())
            self._kept += take

    def result(self) -> torch.Tensor:
        if not self._rows:
            raise ValueError("no patch features were added")
        return torch.cat(self._rows)
