"""Detectors made of two classical models on deep features: one fitted on each image's pooled feature
statistics (the image score), one on a bounded, evenly spread sample of patch vectors (the heatmap).

A subclass says how to fit its model on rows of vectors and how to score rows with it; the fitted model
is a dict of tensors, so scoring runs in torch and saving needs no pickle.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.components.features import PatchSampler, patch_rows, pooled_statistics
from imaging_ad.detectors.params import Interval

#: rows (N, D) and a fitted model -> (N,) outlier scores
OutlierScore = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class PooledAndPatchHead(nn.Module):
    """Feature maps -> (image scores from pooled statistics, maps from every patch vector)."""

    def __init__(
        self,
        outlier_score: OutlierScore,
        image_model: dict[str, torch.Tensor],
        patch_model: dict[str, torch.Tensor],
        pool_std: bool,
    ) -> None:
        super().__init__()
        self.outlier_score = outlier_score
        self.pool_std = pool_std
        self.image_model, self.patch_model = image_model, patch_model  # not exported: plain attributes

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.outlier_score(pooled_statistics(features, self.pool_std), self.image_model)
        b, (h, w) = features[0].shape[0], features[0].shape[-2:]
        maps = self.outlier_score(patch_rows(features), self.patch_model).view(b, h, w)
        return scores, maps


class PooledAndPatchModels(Detector):
    feature_strides = (16, 32)
    exportable = False
    param_constraints = {"max_patches": Interval(2, None)}
    #: what the model is called in error messages ("the one-class SVM")
    model_description: ClassVar[str]

    def __init__(self, *, max_patches: int = 20_000, pool_std: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_patches = max_patches
        self.pool_std = pool_std
        self.image_model_: dict[str, torch.Tensor] | None = None
        self.patch_model_: dict[str, torch.Tensor] | None = None

    @abstractmethod
    def _fit_model(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fit on ``rows`` (N, D) of normal vectors; return the model as CPU tensors."""

    @abstractmethod
    def _outlier_score(self, rows: torch.Tensor, model: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) scores of ``rows`` (N, D), higher for more unusual rows."""

    def begin_fit(self, n_images: int) -> None:
        self._pooled, self._sampler = [], PatchSampler(self.max_patches, n_images, self.seed)

    def partial_fit(self, features: list[torch.Tensor]) -> None:
        self._pooled.append(pooled_statistics(features, self.pool_std).cpu())
        self._sampler.add(patch_rows(features), features[0].shape[0])

    def end_fit(self) -> None:
        vectors, sampler = torch.cat(self._pooled), self._sampler
        del self._pooled, self._sampler
        if vectors.shape[0] < 2:
            raise ValueError(f"{self.model_description} needs at least two training images")
        self.image_model_ = self._to_device(self._fit_model(vectors))
        self.patch_model_ = self._to_device(self._fit_model(sampler.result()))

    def _to_device(self, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device_) for k, v in model.items()}

    def _build_head(self) -> PooledAndPatchHead:
        return PooledAndPatchHead(self._outlier_score, self.image_model_, self.patch_model_, self.pool_std)

    def not_exportable_reason(self) -> str:
        return f"{self.model_description} is not written as a fixed tensor graph"

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"image.{k}": v for k, v in self.image_model_.items()},
            **{f"patch.{k}": v for k, v in self.patch_model_.items()},
        }

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        split = {"image": {}, "patch": {}}
        for key, value in tensors.items():
            part, name = key.split(".", 1)
            split[part][name] = value
        self.image_model_, self.patch_model_ = (
            self._to_device(split["image"]),
            self._to_device(split["patch"]),
        )
