"""The feature half of the out-of-domain guard (see :mod:`imaging_ad.domain`): each image's pooled deep
features against the training images', as a module that eager scoring and export share, and what a fit
records to build it."""

from __future__ import annotations

import torch
from torch import nn

from imaging_ad.detectors.components.features import pooled_statistics
from imaging_ad.domain import DOMAIN_MARGIN, ImageFacts


class DomainGuard(nn.Module):
    """Feature maps -> (B,) Euclidean distance of each image's pooled vector (spatial mean and standard
    deviation of the stages at ``positions``) to the nearest training image's."""

    def __init__(self, reference: torch.Tensor, positions: list[int]) -> None:
        super().__init__()
        self.positions = list(positions)
        reference = reference.float()
        self.register_buffer("reference", reference)
        self.register_buffer("reference_norms", (reference * reference).sum(1))

    def vectors(self, features: list[torch.Tensor]) -> torch.Tensor:
        return pooled_statistics([features[p] for p in self.positions], True)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        vectors = self.vectors(features).float()
        squared = torch.addmm(self.reference_norms, vectors, self.reference.T, alpha=-2).min(dim=1).values
        return (squared + (vectors * vectors).sum(1)).clamp_min(0).sqrt()


def leave_one_out_threshold(reference: torch.Tensor, margin: float = DOMAIN_MARGIN) -> float:
    """``margin`` times the largest distance of a reference row to its nearest other row."""
    x = reference.double()
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(torch.inf)
    return float(distances.min(dim=1).values.max()) * margin


def guard_positions(strides: tuple[int, ...]) -> list[int]:
    """The stages the guard pools: the deep ones (stride 16 and coarser), else the deepest there is."""
    deep = [i for i, s in enumerate(strides) if s >= 16]
    return deep or [len(strides) - 1]


class FitRecorder:
    """What a fit's own backbone pass records besides learning: each image's guard vector and facts, and
    the features of the images cross-fitted calibration will score (kept within a memory budget)."""

    def __init__(self, positions: list[int], cache=None) -> None:
        self.positions = positions
        self.cache = cache  # a FeatureCache, or None when calibration reads its own images
        self.vectors: list[torch.Tensor] = []
        self.facts: list[ImageFacts] = []

    def offer(self, start: int, features: list[torch.Tensor], outcomes: list) -> None:
        """One batch of the fit's pass: its first image's position, features and read outcomes."""
        self.vectors.append(pooled_statistics([features[p] for p in self.positions], True).float().cpu())
        self.facts += [outcome.facts for outcome in outcomes]
        if self.cache is not None:
            self.cache.offer(start, features, [outcome.size for outcome in outcomes])

    def reference(self, limit: int, seed: int) -> torch.Tensor:
        """The recorded vectors, an even random sample of ``limit`` of them at most."""
        vectors = torch.cat(self.vectors)
        if len(vectors) > limit:
            keep = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:limit]
            vectors = vectors[keep.sort().values]
        return vectors
