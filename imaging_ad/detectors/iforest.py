"""Isolation forest on deep features (Liu et al. 2008, on a frozen pretrained backbone).

scikit-learn grows two forests: one on each image's pooled feature statistics (the image score) and
one on a bounded sample of patch vectors (the heatmap). The grown trees are flattened into padded
tensors (children, split feature, threshold, and each node's expected path length), so scoring is a
vectorised walk down all trees at once in torch, and saving needs no pickle. The walk reproduces
sklearn's ``score_samples`` (checked in the tests).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import IsolationForest

from imaging_ad.detectors.components.pooled_and_patches import PooledAndPatchModels
from imaging_ad.detectors.params import Interval
from imaging_ad.detectors.registry import register_detector


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): the mean path length of an unsuccessful binary-search-tree lookup among n points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def fit_isolation_forest(vectors: torch.Tensor, n_trees: int, seed: int) -> dict[str, torch.Tensor]:
    """Grow a forest and flatten it: leaves point to themselves, so a fixed number of steps ends at
    every sample's leaf whatever its depth."""
    x = vectors.float().cpu().numpy()
    forest = IsolationForest(n_estimators=n_trees, random_state=seed).fit(x)
    trees = [estimator.tree_ for estimator in forest.estimators_]
    width = max(tree.node_count for tree in trees)
    left = np.tile(np.arange(width), (len(trees), 1))
    right, feature = left.copy(), np.zeros_like(left)
    threshold = np.zeros(left.shape, np.float32)
    path = np.zeros(left.shape, np.float32)
    for t, (tree, columns) in enumerate(zip(trees, forest.estimators_features_, strict=True)):
        n = tree.node_count
        depth = np.zeros(n)
        for node in range(n):  # children always come after their parent
            for child in (tree.children_left[node], tree.children_right[node]):
                if child >= 0:
                    depth[child] = depth[node] + 1
        split = tree.children_left[:n] >= 0
        left[t, :n] = np.where(split, tree.children_left[:n], np.arange(n))
        right[t, :n] = np.where(split, tree.children_right[:n], np.arange(n))
        feature[t, :n] = np.where(split, np.asarray(columns)[np.maximum(tree.feature[:n], 0)], 0)
        threshold[t, :n] = tree.threshold[:n]
        path[t, :n] = depth + _average_path_length(tree.n_node_samples[:n])
    steps = max(tree.max_depth for tree in trees)
    return {
        "left": torch.from_numpy(left).long(),
        "right": torch.from_numpy(right).long(),
        "feature": torch.from_numpy(feature).long(),
        "threshold": torch.from_numpy(threshold),
        "path": torch.from_numpy(path),
        "norm": torch.tensor([float(_average_path_length([forest.max_samples_])[0]), float(steps)]),
    }


def forest_outlier_score(vectors: torch.Tensor, forest: dict[str, torch.Tensor]) -> torch.Tensor:
    """sklearn's anomaly score ``2 ** (-E[path] / c(max_samples))`` in (0, 1]: higher is more isolated."""
    x = vectors.float()
    n_trees, n = forest["left"].shape[0], x.shape[0]
    node = torch.zeros(n_trees, n, dtype=torch.long, device=x.device)
    samples = torch.arange(n, device=x.device).expand(n_trees, n)
    for _ in range(int(forest["norm"][1])):
        value = x[samples, forest["feature"].gather(1, node)]
        go_left = value <= forest["threshold"].gather(1, node)
        node = torch.where(go_left, forest["left"].gather(1, node), forest["right"].gather(1, node))
    mean_path = forest["path"].gather(1, node).mean(0)
    return torch.pow(2.0, -mean_path / forest["norm"][0])


@register_detector("iforest")
class IForest(PooledAndPatchModels):
    """Isolation forests on deep features: pooled statistics for the score, sampled patches for the heatmap.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.base.Detector`):

    n_trees
        trees in each forest.
    max_patches
        patch vectors sampled (evenly over the images) for the heatmap's forest.
    pool_std
        summarise each stage by its spatial standard deviation as well as its mean.
    """

    # measured: benchmarks/RESULTS.md, "Classical detectors on deep features" (2026-11-24)
    recommended = False
    not_recommended_because = (
        "image AUROC 0.77 on magnetic_tile and 0.79 on chest_xray "
        "against PatchCore's 0.97 and 0.87 (the only datasets measured)"
    )

    model_description = "the isolation forest"
    param_constraints = {"n_trees": Interval(1, 10_000)}

    def __init__(
        self, *, n_trees: int = 200, max_patches: int = 20_000, pool_std: bool = True, **kwargs
    ) -> None:
        super().__init__(max_patches=max_patches, pool_std=pool_std, **kwargs)
        self.n_trees = n_trees

    def _fit_model(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return fit_isolation_forest(rows, self.n_trees, self.seed)

    def _outlier_score(self, rows: torch.Tensor, model: dict[str, torch.Tensor]) -> torch.Tensor:
        return forest_outlier_score(rows, model)
