"""Ways of turning a backbone's multi-stage feature maps into vectors, shared by several detectors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_grid(features: list[torch.Tensor]) -> torch.Tensor:
    """(B, D, h, w): every stage resized onto the finest selected stage's grid and concatenated, in
    channels-last memory (patch rows are then a view)."""
    grid = (int(features[0].shape[-2]), int(features[0].shape[-1]))
    # NCHW maps (what ONNX Runtime returns) on small grids make torch's resize and pooling kernels loop
    # over channels: channels-last is several times faster for the same numbers
    features = [f.contiguous(memory_format=torch.channels_last) for f in features]
    maps = [features[0]] + [
        F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in features[1:]
    ]
    return torch.cat(maps, dim=1)


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
