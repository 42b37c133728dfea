"""Detectors made of two classical models on deep features: one fitted on each image's pooled feature
statistics (the image score), one on a bounded, evenly spread sample of patch vectors (the heatmap).

A subclass says how to fit its model on rows of vectors and how to score rows with it; the fitted model
is a dict of tensors, so scoring runs in torch and saving needs no pickle.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.features import PatchSampler, patch_rows, pooled_statistics


class PooledAndPatchModels(Detector):
    feature_strides = (16, 32)
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

    def _fit_stream(self, batches: Iterator[list[torch.Tensor]], n_images: int) -> None:
        pooled, sampler = [], PatchSampler(self.max_patches, n_images, self.seed)
        for features in batches:
            pooled.append(pooled_statistics(features, self.pool_std).cpu())
            sampler.add(patch_rows(features), features[0].shape[0])
        vectors = torch.cat(pooled)
        if vectors.shape[0] < 2:
            raise ValueError(f"{self.model_description} needs at least two training images")
        self.image_model_ = self._to_device(self._fit_model(vectors))
        self.patch_model_ = self._to_device(self._fit_model(sampler.result()))

    def _to_device(self, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device_) for k, v in model.items()}

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self._outlier_score(pooled_statistics(features, self.pool_std), self.image_model_)
        b, (h, w) = features[0].shape[0], features[0].shape[-2:]
        maps = self._outlier_score(patch_rows(features), self.patch_model_).view(b, h, w)
        return scores, maps

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
