"""One-class SVM on deep features (Schölkopf et al. 2001, on a frozen pretrained backbone).

Two RBF one-class SVMs from scikit-learn: one on each image's pooled feature statistics (the image
score) and one on a bounded sample of patch vectors (the heatmap). Features are standardised first so
the RBF width (``gamma = 1 / n_features``) suits every stage alike. The fitted SVMs are kept as
tensors (support vectors, dual coefficients, offset), so scoring runs in torch and saving needs no
pickle.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.svm import OneClassSVM

from imaging_ad.detectors.components.pooled_and_patches import PooledAndPatchModels
from imaging_ad.detectors.params import Interval
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
class OCSVM(PooledAndPatchModels):
    """One-class SVMs on deep features: pooled statistics for the score, sampled patches for the heatmap.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.base.Detector`):

    nu
        upper bound on the share of training vectors outside the boundary (scikit-learn's ``nu``).
    max_patches
        patch vectors sampled (evenly over the images) for the heatmap's SVM; its cost grows ~quadratically.
    pool_std
        summarise each stage by its spatial standard deviation as well as its mean.
    """

    # measured: benchmarks/RESULTS.md, "Classical detectors on deep features" (2026-11-24)
    recommended = False
    not_recommended_because = (
        "image AUROC 0.83 on magnetic_tile and 0.84 on chest_xray "
        "against PatchCore's 0.97 and 0.87 (the only datasets measured)"
    )

    model_description = "the one-class SVM"
    param_constraints = {"nu": Interval(0, 1, "right")}

    def __init__(self, *, nu: float = 0.1, max_patches: int = 3000, pool_std: bool = True, **kwargs) -> None:
        super().__init__(max_patches=max_patches, pool_std=pool_std, **kwargs)
        self.nu = nu

    def _fit_model(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return fit_one_class_svm(rows, self.nu)

    def _outlier_score(self, rows: torch.Tensor, model: dict[str, torch.Tensor]) -> torch.Tensor:
        return svm_outlier_score(rows, model)
