"""One-class SVM on deep features (Schölkopf et al. 2001, on a frozen pretrained backbone).

Two RBF one-class SVMs from scikit-learn: one on each image's pooled feature statistics (the image
score) and one on a bounded sample of patch vectors (the heatmap). Features are standardised first so
the RBF width (``gamma = 1 / n_features``) suits every stage alike. The fitted SVMs are kept as
tensors (support vectors, dual coefficients, offset), so scoring runs in torch and saving needs no
pickle.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from sklearn.svm import OneClassSVM

from imaging_ad.detectors.base import Detector
from imaging_ad.detectors.features import PatchSampler, patch_rows, pooled_statistics
from imaging_ad.detectors.registry import register_detector


def fit_one_class_svm(vectors: torch.Tensor, nu: float) -> dict[str, torch.Tensor]:
    """Standardise, fit, and return the decision function as tensors."""
    x = vectors.double().cpu().numpy()
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    gamma = 1.0 / z.shape[1]
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma=gamma).fit(z)
    return {
        "mean": torch.from_numpy(mean).float(),
        "scale": torch.from_numpy(scale).float(),
        "support": torch.from_numpy(np.ascontiguousarray(svm.support_vectors_)).float(),
        "coef": torch.from_numpy(np.ascontiguousarray(svm.dual_coef_[0])).float(),
        "offset": torch.tensor([float(svm.intercept_[0]), gamma]).float(),
    }


def svm_outlier_score(vectors: torch.Tensor, svm: dict[str, torch.Tensor]) -> torch.Tensor:
    """Minus sklearn's ``decision_function``: 0 on the learned boundary, larger further outside it."""
    z = (vectors.float() - svm["mean"]) / svm["scale"]
    intercept, gamma = svm["offset"][0], svm["offset"][1]
    kernel = torch.exp(-gamma * torch.cdist(z, svm["support"]).square())
    return -(kernel @ svm["coef"] + intercept)


@register_detector("ocsvm")
class DeepOneClassSVM(Detector):
    feature_strides = (16, 32)

    def __init__(self, *, nu: float = 0.1, max_patches: int = 3000, pool_std: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nu = nu
        self.max_patches = max_patches
        self.pool_std = pool_std
        self.image_svm_: dict[str, torch.Tensor] | None = None
        self.patch_svm_: dict[str, torch.Tensor] | None = None

    def _fit_stream(self, batches: Iterator[list[torch.Tensor]], n_images: int) -> None:
        pooled, sampler = [], PatchSampler(self.max_patches, n_images, self.seed)
        for features in batches:
            pooled.append(pooled_statistics(features, self.pool_std).cpu())
            sampler.add(patch_rows(features), features[0].shape[0])
        vectors = torch.cat(pooled)
        if vectors.shape[0] < 2:
            raise ValueError("the one-class SVM needs at least two training images")
        self.image_svm_ = self._to_device(fit_one_class_svm(vectors, self.nu))
        self.patch_svm_ = self._to_device(fit_one_class_svm(sampler.result(), self.nu))

    def _to_device(self, svm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device_) for k, v in svm.items()}

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = svm_outlier_score(pooled_statistics(features, self.pool_std), self.image_svm_)
        b, (h, w) = features[0].shape[0], features[0].shape[-2:]
        maps = svm_outlier_score(patch_rows(features), self.patch_svm_).view(b, h, w)
        return scores, maps

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            **{f"image.{k}": v for k, v in self.image_svm_.items()},
            **{f"patch.{k}": v for k, v in self.patch_svm_.items()},
        }

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        split = {"image": {}, "patch": {}}
        for key, value in tensors.items():
            part, name = key.split(".", 1)
            split[part][name] = value.float().to(self.device_)
        self.image_svm_, self.patch_svm_ = split["image"], split["patch"]
