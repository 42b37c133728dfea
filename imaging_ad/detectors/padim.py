"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

Every position of the feature grid gets its own multivariate Gaussian over a random subset of the
concatenated multi-stage channels; a test patch's anomaly score is its Mahalanobis distance to the
Gaussian of its position. Statistics accumulate batch by batch (sums and outer products), so memory
does not grow with the number of training images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.registry import register_detector


@register_detector("padim")
class PaDiM(Detector):
    feature_strides = (4, 8, 16)

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

    def _embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, d, h, w): all stages on the ``grid_stride`` grid, then the selected channels."""
        size = self.preprocessor_.image_size // self.grid_stride
        maps = [F.adaptive_avg_pool2d(f, size) if f.shape[-1] > size else f for f in features]
        maps = [
            F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
            if m.shape[-1] < size
            else m
            for m in maps
        ]
        embedding = torch.cat(maps, dim=1)
        return embedding[:, self.channel_index_.to(embedding.device)]

    def _fit_stream(self, batches: Iterator[list[torch.Tensor]], n_images: int) -> None:
        info = self.extractor_.info  # may be shared with other detectors reading more stages (ensemble)
        total_channels = sum(
            c for c, r in zip(info.channels, info.reductions, strict=True) if r in self.feature_strides
        )
        generator = torch.Generator().manual_seed(self.seed)
        d = min(self.n_features, total_channels)
        self.channel_index_ = torch.randperm(total_channels, generator=generator)[:d].sort().values
        count, total, outer = 0, None, None
        for features in batches:
            embedding = self._embed(features).double()  # float64: sums of squares over thousands of images
            b, d, h, w = embedding.shape
            # (P, B, d), contiguous: the strided view made the batched products 2-4x slower
            x = embedding.permute(2, 3, 0, 1).reshape(h * w, b, d).contiguous()
            if total is None:
                total = torch.zeros(h * w, d, dtype=torch.float64, device=x.device)
                outer = torch.zeros(h * w, d, d, dtype=torch.float64, device=x.device)
            total += x.sum(1)
            outer += torch.bmm(x.transpose(1, 2), x)
            count += b
        if count < 2:
            raise ValueError("PaDiM needs at least two training images to estimate covariances")
        mean = total / count
        covariance = (outer - count * mean[:, :, None] * mean[:, None, :]) / (count - 1)
        covariance += self.regularization * torch.eye(
            covariance.shape[-1], dtype=torch.float64, device=x.device
        )
        self.mean_ = mean.float().contiguous()
        # contiguous so the fitted and the reloaded model take the same BLAS path (bit-identical scores)
        self.inverse_covariance_ = torch.linalg.inv(covariance).float().contiguous()

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self._embed(features)
        b, d, h, w = embedding.shape
        # (P, B, d), made contiguous before the batched product: 27 -> 11 ms per batch of 16, same result
        delta = embedding.permute(2, 3, 0, 1).reshape(h * w, b, d).contiguous() - self.mean_[:, None]
        squared = (torch.bmm(delta, self.inverse_covariance_) * delta).sum(-1)  # (P, B)
        maps = squared.clamp_min_(0).sqrt_().T.reshape(b, h, w)
        return maps.flatten(1).max(dim=1).values, maps

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
