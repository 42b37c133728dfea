"""Network building blocks shared by the trained detectors (autoencoders, VAE, GANomaly)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: image-space networks code the image on a 4 x 4 grid, whatever its size
BOTTLENECK_GRID = 4


def conv_block(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Doubles the grid (transposed 4 x 4 convolution, stride 2)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def stage_widths(image_size: int, width: int) -> list[int]:
    """Channels after each stride-2 stage from ``image_size`` down to the 4 x 4 bottleneck grid:
    ``width`` doubling per stage, capped at ``8 * width``."""
    stages = max(1, round(math.log2(image_size / BOTTLENECK_GRID)))
    return [min(width * 2**i, 8 * width) for i in range(stages)]


def image_encoder(image_size: int, width: int) -> nn.Sequential:
    """(B, 3, S, S) -> (B, stage_widths[-1], 4, 4)."""
    widths = [3, *stage_widths(image_size, width)]
    return nn.Sequential(
        *[conv_block(a, b, kernel=3, stride=2) for a, b in zip(widths, widths[1:], strict=False)],
        nn.AdaptiveAvgPool2d(BOTTLENECK_GRID),  # sizes that are not 4 x 2^k
    )


def image_decoder(image_size: int, width: int, in_channels: int) -> nn.Sequential:
    """(B, in_channels, 4, 4) -> (B, 3, ~S, ~S): the mirror of :func:`image_encoder`."""
    widths = [in_channels, *reversed(stage_widths(image_size, width))]
    return nn.Sequential(
        *[up_block(a, b) for a, b in zip(widths, widths[1:], strict=False)],
        nn.Conv2d(widths[-1], 3, 3, padding=1),
    )


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` at grid ``size`` (a no-op when it already is; sizes that are not 4 x 2^k round)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def top_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, h, w) -> (B,): mean of each map's highest ``fraction`` of values (at least one): the image
    score of the reconstruction detectors, less noisy than the single worst position."""
    flat = maps.flatten(1)
    k = max(1, math.ceil(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(1)


def channel_statistics(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (floored at 1e-3) of a ``(N, C, h, w)`` cache over
    images and positions, each ``(1, C, 1, 1)`` float32; summed in chunks in float64 because the cache
    is large and float16."""
    total = torch.zeros(maps.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in maps.split(64):
        x = chunk.double()
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = maps.shape[0] * maps.shape[2] * maps.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return mean.float().view(1, -1, 1, 1), std.float().clamp_min(1e-3).view(1, -1, 1, 1)
