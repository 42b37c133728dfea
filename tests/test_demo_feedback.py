"""Learning from reviews: threshold arithmetic and suggestion, errors at a threshold, memory-bank
extension of a PatchCore model, drift report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from imaging_ad.app import feedback
from imaging_ad.app.review_store import QueueItem
from imaging_ad.calibration import Calibration
from tests.synthetic import texture

CAL = Calibration(image_threshold=10.0, pixel_threshold=1.0, score_scale=2.0, target_fpr=0.01, n_normal=20)


def _q(score: float, verdict: str | None, i: int = 0) -> QueueItem:
    return QueueItem(
        i,
        f"/x/{i}",
        f"{i}",
        "inspect",
        "m",
        "sha",
        score,
        float(CAL.normalize(score)),
        10.0,
        None,
        None,
        None,
        "",
        verdict,
        "r" if verdict else None,
        None,
        None,
        1 if verdict else 0,
    )


def test_threshold_conversion_inverts_normalisation() -> None:
    for t in (0.05, 0.3, 0.5, 0.77, 0.99):
        assert math.isclose(
            feedback.normalized_threshold(CAL, feedback.raw_threshold(CAL, t)), t, rel_tol=1e-9
        )
    assert feedback.raw_threshold(CAL, 0.5) == pytest.approx(10.0)


def test_errors_at_threshold() -> None:
    items = [
        _q(12, "normal", 1),
        _q(8, "normal", 2),
        _q(9, "anomalous", 3),
        _q(15, "anomalous", 4),
        _q(20, "unsure", 5),
    ]
    errors = feedback.errors_at(items, 10.0)
    assert [i.id for i in errors.false_positives] == [1]
    assert [i.id for i in errors.false_negatives] == [3]
    assert (errors.n_normal, errors.n_anomalous) == (2, 2)


def test_suggest_threshold() -> None:
    assert feedback.suggest_threshold([], [3.0]) is None
    only_normal = feedback.suggest_threshold([1.0, 4.0, 2.0], [])
    assert only_normal.threshold == 4.0 and only_normal.false_positive_rate == 0.0

    separable = feedback.suggest_threshold([1.0, 2.0, 3.0], [5.0, 6.0])
    assert separable.threshold == pytest.approx(4.0)
    assert (separable.true_positive_rate, separable.false_positive_rate) == (1.0, 0.0)

    # overlapping: J = 0.75 both at 3.5 (all anomalies, 1/4 normals) and at 5.5 (3/4 anomalies, no
    # normal); the tie goes to fewer false positives
    normal, anomalous = [1.0, 2.0, 3.0, 5.0], [4.0, 6.0, 7.0, 8.0]
    s = feedback.suggest_threshold(normal, anomalous)
    assert s.threshold == pytest.approx(5.5)
    flagged_normal = np.mean(np.array(normal) > s.threshold)
    flagged_anomalous = np.mean(np.array(anomalous) > s.threshold)
    assert (flagged_anomalous, flagged_normal) == (0.75, 0.0)
    assert (s.true_positive_rate, s.false_positive_rate) == (flagged_anomalous, flagged_normal)


def test_drift_report() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(5, 1, 50)
    same = feedback.drift_report(rng.normal(5, 1, 60), normal, CAL)
    shifted = feedback.drift_report(rng.normal(9, 1, 60), normal, CAL)
    assert same.ks_pvalue > 0.01 and "compatible" in same.message
    assert shifted.ks_pvalue < 0.01 and "differ" in shifted.message
    assert shifted.recent_flag_rate > same.recent_flag_rate
    few = feedback.drift_report([1.0, 2.0], [], CAL)
    assert few.ks_statistic is None and "at least 5" in few.message


def test_extend_patchcore_bank_lowers_scores_of_added_normals(tmp_path: Path) -> None:
    import cv2

    from imaging_ad.detectors import create_detector, load_detector

    rng = np.random.default_rng(0)
    # distance heatmaps: a larger bank can only lower them (standardised ones also move with the statistics)
    detector = create_detector(
        "patchcore", image_size=64, device="cpu", progress=False, batch_size=8, heatmap="distance"
    )
    detector.fit([texture(rng) for _ in range(12)])
    model = detector.save(tmp_path / "base.safetensors")
    # "normal" images the model has never seen: a coarser weave
    y, x = np.mgrid[0:96, 0:112].astype(np.float32)
    unseen = [
        np.clip((0.5 + 0.3 * np.sin(x / 7.0 + p) * np.sin(y / 7.0)) * 255, 0, 255).astype(np.uint8)
        for p in (0.0, 1.0, 2.0, 3.0)
    ]
    paths = []
    for i, image in enumerate(unseen):
        paths.append(str(tmp_path / f"n{i}.png"))
        cv2.imwrite(paths[-1], image)
    seen = texture(rng)
    before_results = detector.predict([*unseen, seen])
    before = [r.score for r in before_results]

    result = feedback.extend_patchcore_bank(model, paths, tmp_path / "v2.safetensors", device="cpu")
    extended = load_detector(result.path, device="cpu")
    after_results = extended.predict([*unseen, seen])
    after = [r.score for r in after_results]

    assert result.rows_added > 0 and result.n_images == 2 and result.n_calibration == 2
    assert extended.memory_bank_.shape[0] == result.rows_before + result.rows_added
    added = [0, 2]  # every other reviewed normal extends the bank, the others recalibrate
    assert all(after[i] < 0.5 * before[i] for i in added)  # added normals: much lower
    # a bigger bank never raises a patch distance (the image score's reweighting may move either way)
    assert np.all(after_results[4].heatmap <= before_results[4].heatmap + 1e-4)
    assert extended.calibration_.n_normal == 2 and extended.calibration_ != detector.calibration_
    with pytest.raises(ValueError, match="at least 4"):
        feedback.extend_patchcore_bank(model, paths[:3], tmp_path / "v3.safetensors", device="cpu")
