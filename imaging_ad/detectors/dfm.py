"""DFM, a Gaussian on pooled deep features (in the spirit of Ahuja et al., "Probabilistic Modeling of
Deep Features for Out-of-Distribution and Adversarial Detection", 2019).

For diffuse findings (pneumonia in a chest X-ray) the evidence is spread over the image, so local
patch detectors see little; image-level statistics of deep, semantic stages see more. Each image is
summarised by the spatial mean and standard deviation of its deep feature maps; a single Gaussian
(Ledoit-Wolf shrinkage) over those vectors gives the image score. The heatmap comes from a second
Gaussian over all patch vectors, so it still shows *where* the image is unusual.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.components.features import patch_grid, pooled_statistics
from imaging_ad.detectors.params import Interval
from imaging_ad.detectors.registry import register_detector

# folds of the cross-fitted calibration: each Ledoit-Wolf fit sees 90% of the images
_FOLDS = 10


class DFMHead(nn.Module):
    """Feature maps -> (image scores, maps): Mahalanobis distance of the pooled (mean, std) features for
    the score, of every patch vector for the map."""

    def __init__(
        self,
        pool_std: bool,
        image_mean: torch.Tensor,
        image_precision: torch.Tensor,
        patch_mean: torch.Tensor,
        patch_precision: torch.Tensor,
    ) -> None:
        super().__init__()
        self.pool_std = pool_std
        self.register_buffer("image_mean", image_mean)
        self.register_buffer("image_precision", image_precision)
        self.register_buffer("patch_mean", patch_mean)
        self.register_buffer("patch_precision", patch_precision)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        delta = pooled_statistics(features, self.pool_std) - self.image_mean
        scores = ((delta @ self.image_precision) * delta).sum(1).clamp_min(0).sqrt()
        patches = patch_grid(features)
        h, w = int(patches.shape[-2]), int(patches.shape[-1])
        x = patches.permute(0, 2, 3, 1).reshape(-1, int(self.patch_mean.shape[0])) - self.patch_mean
        maps = ((x @ self.patch_precision) * x).sum(1).clamp_min(0).sqrt().reshape(-1, h, w)
        return scores, maps


@register_detector("dfm")
class DFM(Detector):
    """DFM: one Gaussian over each image's pooled deep features (image score), one over patch vectors (map).

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.base.Detector`):

    pool_std
        summarise each stage by its spatial standard deviation as well as its mean.
    patch_regularization
        added to the patch covariance's diagonal, so it stays invertible.
    """

    # magnetic_tile, image AUROC of the pooled Gaussian: strides 16+32 with std pooling 0.974,
    # adding stride 8 0.975 (but a noisier heatmap), stride 32 alone 0.962.
    feature_strides = (16, 32)
    cross_fitting = f"{_FOLDS}-fold: each training image against the pooled Gaussian of the other folds"
    # each image's pooled vector (in order), and the patches' count, sum and sum of outer products
    fit_statistics = ("_pooled", "_count", "_total", "_outer")
    param_constraints = {"patch_regularization": Interval(0, None, "neither")}

    def __init__(self, *, pool_std: bool = True, patch_regularization: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pool_std = pool_std
        self.patch_regularization = patch_regularization
        self.image_mean_: torch.Tensor | None = None
        self.image_precision_: torch.Tensor | None = None
        self.patch_mean_: torch.Tensor | None = None
        self.patch_precision_: torch.Tensor | None = None

    def begin_fit(self, n_images: int) -> None:
        self._pooled, self._count, self._total, self._outer = [], 0, None, None

    def partial_fit(self, features: list[torch.Tensor]) -> None:
        self._pooled.append(pooled_statistics(features, self.pool_std).double().cpu())
        patches = patch_grid(features).double()
        x = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
        self._total = x.sum(0) if self._total is None else self._total + x.sum(0)
        self._outer = x.T @ x if self._outer is None else self._outer + x.T @ x
        self._count += x.shape[0]

    def end_fit(self) -> None:
        vectors = torch.cat(self._pooled).numpy()  # one row per image: small even for 10,000 images
        count, total, outer = self._count, self._total, self._outer
        del self._pooled, self._count, self._total, self._outer
        if vectors.shape[0] < 2:
            raise ValueError("DFM needs at least two training images")
        self.image_mean_, self.image_precision_ = self._pooled_gaussian(vectors)
        folds = np.arange(len(vectors)) % min(_FOLDS, len(vectors))
        # for cross-fitted calibration: the Gaussian of every fold's complement
        self._fold_models = [self._pooled_gaussian(vectors[folds != f]) for f in range(folds.max() + 1)]
        mean = total / count
        covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
        covariance += self.patch_regularization * torch.eye(
            covariance.shape[0], dtype=covariance.dtype, device=covariance.device
        )
        self.patch_mean_ = mean.float()
        self.patch_precision_ = torch.linalg.inv(covariance).float().contiguous()

    def _pooled_gaussian(self, vectors: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        estimator = LedoitWolf().fit(vectors)
        precision = np.ascontiguousarray(estimator.precision_)
        to = {"dtype": torch.float32, "device": self.device_}
        return torch.from_numpy(estimator.location_).to(**to), torch.from_numpy(precision).to(**to)

    def cross_fitted_evidence(
        self, features: list[torch.Tensor], positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores from the Gaussian fitted without each image's fold; maps from the patch Gaussian (its
        millions of patches make one image's share negligible)."""
        with torch.inference_mode():
            _, maps = self.head_(features)
            pooled = pooled_statistics(features, self.pool_std)
            scores = []
            for vector, position in zip(pooled, positions, strict=True):
                mean, precision = self._fold_models[position % len(self._fold_models)]
                delta = vector - mean
                scores.append((delta @ precision @ delta).clamp_min(0).sqrt())
            return torch.stack(scores), maps

    def release_fit_state(self) -> None:
        self.__dict__.pop("_fold_models", None)

    def _build_head(self) -> DFMHead:
        return DFMHead(
            self.pool_std, self.image_mean_, self.image_precision_, self.patch_mean_, self.patch_precision_
        )

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            "image_mean": self.image_mean_,
            "image_precision": self.image_precision_,
            "patch_mean": self.patch_mean_,
            "patch_precision": self.patch_precision_,
        }

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            setattr(self, f"{key}_", value.to(self.device_).float())
