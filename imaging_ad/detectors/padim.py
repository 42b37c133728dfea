"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

Every position of the feature grid gets its own multivariate Gaussian over a random subset of the
concatenated multi-stage channels; a test patch's anomaly score is its Mahalanobis distance to the
Gaussian of its position. Statistics accumulate batch by batch (sums and outer products), so memory
does not grow with the number of training images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.params import Interval
from imaging_ad.detectors.registry import register_detector


def to_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """One stage resampled to the ``size`` grid: adaptive average pooling for finer maps (a plain average
    pool when the sizes divide, else the same bins as two small matrix products, which export), bilinear
    interpolation for coarser ones."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if width > size:
        if height % size == 0 and width % size == 0:
            kernel = (height // size, width // size)
            return F.avg_pool2d(x, kernel, stride=kernel)
        rows = _pooling_matrix(height, size).to(x.device)
        columns = _pooling_matrix(width, size).T.contiguous().to(x.device)
        return rows @ x @ columns
    if width < size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def _pooling_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out, in) averaging weights of ``adaptive_avg_pool`` along one axis (bins floor/ceil as torch)."""
    weights = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, math.ceil((i + 1) * size_in / size_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


class PaDiMHead(nn.Module):
    """Feature maps -> (image scores, maps): per-position Mahalanobis distance on the selected channels."""

    def __init__(
        self, size: int, channel_index: torch.Tensor, mean: torch.Tensor, inverse_covariance: torch.Tensor
    ) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("channel_index", channel_index)
        self.register_buffer("mean", mean)  # (P, d)
        self.register_buffer("inverse_covariance", inverse_covariance)  # (P, d, d)

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, d, size, size): all stages on the grid, then the selected channels."""
        embedding = torch.cat([to_grid(f, self.size) for f in features], dim=1)
        return embedding.index_select(1, self.channel_index)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(features)
        d = int(self.channel_index.shape[0])
        # (P, B, d), made contiguous before the batched product: 27 -> 11 ms per batch of 16, same result
        delta = embedding.permute(2, 3, 0, 1).reshape(self.size * self.size, -1, d).contiguous()
        delta = delta - self.mean[:, None]
        squared = (torch.bmm(delta, self.inverse_covariance) * delta).sum(-1)  # (P, B)
        maps = squared.clamp_min(0).sqrt().T.reshape(-1, self.size, self.size)
        return maps.flatten(1).max(dim=1).values, maps


@register_detector("padim")
class PaDiM(Detector):
    """PaDiM: one Gaussian per feature-map position.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.base.Detector`):

    n_features
        channels kept (a random subset of the concatenated stages, fixed by ``seed``), as in the paper.
    regularization
        added to each covariance's diagonal, so it stays invertible.
    grid_stride
        the grid the stages are resampled to, as a stride of the model input (8: a 32x32 grid at 256 px).
    """

    feature_strides = (4, 8, 16)
    cross_fitting = "exact leave-one-out: each training image against its position's Gaussian without it"
    fit_statistics = ("_count", "_total", "_outer")  # per position: images, sums, sums of outer products
    param_constraints = {
        "n_features": Interval(1, None),
        "regularization": Interval(0, None, "neither"),
        "grid_stride": Interval(1, 64),
    }

    def __init__(
        self, *, n_features: int = 100, regularization: float = 0.01, grid_stride: int = 8, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.n_features = n_features
        self.regularization = regularization
        self.grid_stride = grid_stride
        self.channel_index_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.inverse_covariance_: torch.Tensor | None = None

    def begin_fit(self, n_images: int) -> None:
        info = self.extractor_.info  # may be shared with other detectors reading more stages (ensemble)
        total_channels = sum(
            c for c, r in zip(info.channels, info.reductions, strict=True) if r in self.feature_strides
        )
        generator = torch.Generator().manual_seed(self.seed)
        d = min(self.n_features, total_channels)
        self.channel_index_ = torch.randperm(total_channels, generator=generator)[:d].sort().values
        self._count, self._total, self._outer = 0, None, None

    def partial_fit(self, features: list[torch.Tensor]) -> None:
        size = self.preprocessor_.image_size // self.grid_stride
        embedding = torch.cat([to_grid(f, size) for f in features], dim=1)
        embedding = embedding[:, self.channel_index_.to(embedding.device)].double()  # float64: sums over many
        b, d, h, w = embedding.shape
        # (P, B, d), contiguous: the strided view made the batched products 2-4x slower
        x = embedding.permute(2, 3, 0, 1).reshape(h * w, b, d).contiguous()
        if self._total is None:
            self._total = torch.zeros(h * w, d, dtype=torch.float64, device=x.device)
            self._outer = torch.zeros(h * w, d, d, dtype=torch.float64, device=x.device)
        self._total += x.sum(1)
        self._outer += torch.bmm(x.transpose(1, 2), x)
        self._count += b

    def end_fit(self) -> None:
        count, total, outer = self._count, self._total, self._outer
        del self._count, self._total, self._outer
        if count < 2:
            raise ValueError("PaDiM needs at least two training images to estimate covariances")
        mean = total / count
        covariance = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
        covariance += self.regularization * torch.eye(
            covariance.shape[-1], dtype=torch.float64, device=mean.device
        )
        self.mean_ = mean.float().contiguous()
        # contiguous so the fitted and the reloaded model take the same BLAS path (bit-identical scores)
        self.inverse_covariance_ = torch.linalg.inv(covariance).float().contiguous()
        self._leave_one_out = (count, mean, *torch.linalg.eigh(covariance))  # for cross-fitted calibration

    def cross_fitted_evidence(
        self, features: list[torch.Tensor], positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each training image's Mahalanobis distances to its positions' Gaussians estimated without it, in
        closed form. With n images, mean m and C = S / (n - 1) + rI (S the scatter), removing x leaves
        C' = a C + (1 - a) rI - c dd^T (d = x - m, a = (n-1)/(n-2), c = n/((n-1)(n-2))), and x - m' =
        d n/(n-1). In C's eigenbasis the first two terms are diagonal, so Sherman-Morrison gives
        |x - m'|^2_{C'} = (n/(n-1))^2 q / (1 - c q) with q = d^T (a C + (1 - a) rI)^-1 d: exact, one
        eigendecomposition per position for all images."""
        n, mean, eigenvalues, eigenvectors = self._leave_one_out
        size = self.preprocessor_.image_size // self.grid_stride
        embedding = torch.cat([to_grid(f, size) for f in features], dim=1)
        embedding = embedding[:, self.channel_index_.to(embedding.device)].double()
        b, d, h, w = embedding.shape
        delta = embedding.permute(2, 3, 0, 1).reshape(h * w, b, d) - mean[:, None]  # (P, B, d)
        a, c = (n - 1) / (n - 2), n / ((n - 1) * (n - 2))
        shrunk = a * eigenvalues + (1 - a) * self.regularization  # (P, d)
        q = (torch.bmm(delta, eigenvectors).square() / shrunk[:, None]).sum(-1)  # (P, B)
        squared = (n / (n - 1)) ** 2 * q / (1 - c * q)
        maps = squared.clamp_min(0).sqrt().T.reshape(b, h, w).float()
        return maps.flatten(1).max(dim=1).values, maps

    def release_fit_state(self) -> None:
        self.__dict__.pop("_leave_one_out", None)

    def _build_head(self) -> PaDiMHead:
        size = self.preprocessor_.image_size // self.grid_stride
        return PaDiMHead(size, self.channel_index_.to(self.device_), self.mean_, self.inverse_covariance_)

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            "channel_index": self.channel_index_,
            "mean": self.mean_,
            "inverse_covariance": self.inverse_covariance_,
        }

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channel_index_ = tensors["channel_index"].long()
        self.mean_ = tensors["mean"].to(self.device_).float()
        self.inverse_covariance_ = tensors["inverse_covariance"].to(self.device_).float()
