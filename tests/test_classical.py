"""The tensor forms of scikit-learn's isolation forest and one-class SVM must score exactly as sklearn."""

import numpy as np
import torch
from sklearn.ensemble import IsolationForest
from sklearn.svm import OneClassSVM

from imaging_ad.detectors.components.features import PatchSampler
from imaging_ad.detectors.iforest import fit_isolation_forest, forest_outlier_score
from imaging_ad.detectors.ocsvm import fit_one_class_svm, svm_outlier_score


def _data():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 12)).astype(np.float32)
    queries = np.concatenate([rng.normal(size=(100, 12)), 4 + rng.normal(size=(20, 12))]).astype(np.float32)
    return train, queries


def test_isolation_forest_walk_matches_sklearn():
    train, queries = _data()
    forest = fit_isolation_forest(torch.from_numpy(train), n_trees=40, seed=3)
    reference = -IsolationForest(n_estimators=40, random_state=3).fit(train).score_samples(queries)
    np.testing.assert_allclose(
        forest_outlier_score(torch.from_numpy(queries), forest).numpy(), reference, atol=1e-6
    )


def test_one_class_svm_tensors_match_sklearn():
    train, queries = _data()
    svm = fit_one_class_svm(torch.from_numpy(train), nu=0.1)
    x = train.astype(np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    reference = (
        -OneClassSVM(nu=0.1, gamma=1 / 12).fit((x - mean) / scale).decision_function((queries - mean) / scale)
    )
    scores = svm_outlier_score(torch.from_numpy(queries), svm).numpy()
    np.testing.assert_allclose(scores, reference, atol=1e-4)
    assert scores[100:].min() > scores[:100].max()  # the shifted cluster lies outside the boundary


def test_patch_sampler_is_bounded_and_spread_over_the_stream():
    sampler = PatchSampler(max_rows=100, n_images=50, seed=0)
    for batch in range(10):  # 10 batches of 5 images, 64 patches each, tagged by batch
        sampler.add(torch.full((5 * 64, 1), float(batch)), n_images=5)
    rows = sampler.result()
    assert rows.shape[0] == 100
    counts = torch.bincount(rows[:, 0].long(), minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
