"""Metrics against hand-computed values, sklearn, and a slow obviously-correct AUPRO reference."""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import roc_auc_score

from imaging_ad.metrics import (
    aupro,
    evaluation_report,
    image_metrics,
    partial_area,
    per_category_metrics,
    pixel_auroc,
    pro_curve,
    save_curves,
)

# ---------------------------------------------------------------------------------------------------
# Image level


def test_perfect_scores_give_one():
    labels = [0, 0, 0, 1, 1]
    m = image_metrics(labels, [0.1, 0.2, 0.3, 0.8, 0.9])
    assert m["image_auroc"] == 1.0
    assert m["average_precision"] == 1.0
    assert m["f1_max"] == 1.0
    assert m["f1_max_threshold"] == 0.8  # lowest score that still separates perfectly
    assert (m["num_images"], m["num_anomalous"]) == (5, 2)


def test_random_scores_give_about_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20_000)
    m = image_metrics(labels, rng.random(20_000))
    assert m["image_auroc"] == pytest.approx(0.5, abs=0.02)
    assert m["average_precision"] == pytest.approx(labels.mean(), abs=0.02)


def test_inverted_scores_give_zero_auroc():
    assert image_metrics([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])["image_auroc"] == 0.0


# Sorted by descending score: 0.9(A) 0.8(A) 0.5(N) 0.4(N) 0.35(A) 0.1(N).
# score >= 0.8 gives TP=2 FP=0 FN=1: P=1, R=2/3, F1=0.8, the best threshold (others: 0.5, 2/3, 0.571, 0.75, 2/3).
F1_LABELS = [0, 0, 1, 1, 0, 1]
F1_SCORES = [0.1, 0.4, 0.35, 0.8, 0.5, 0.9]


def test_f1_max_matches_hand_computation():
    m = image_metrics(F1_LABELS, F1_SCORES)
    assert m["f1_max"] == pytest.approx(0.8)
    assert m["f1_max_threshold"] == 0.8


def test_f1_max_matches_brute_force_over_thresholds():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.4 * labels, 2)  # rounding creates ties
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = np.sum(pred & (labels == 1)), np.sum(pred & (labels == 0)), np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    m = image_metrics(labels, scores)
    assert m["f1_max"] == pytest.approx(best)
    assert image_metrics(labels, scores, threshold=m["f1_max_threshold"])["f1"] == pytest.approx(best)


def test_threshold_metrics_hand_computed():
    m = image_metrics(F1_LABELS, F1_SCORES, threshold=0.5)
    # score >= 0.5: 0.9(A) 0.8(A) 0.5(N) -> TP=2 FP=1; below: 0.4(N) 0.35(A) 0.1(N) -> TN=2 FN=1
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["false_positive_rate"] == pytest.approx(1 / 3)
    assert m["threshold"] == 0.5
    assert "precision" not in image_metrics(F1_LABELS, F1_SCORES)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_single_class_gives_none_not_crash(labels):
    scores = np.linspace(0, 1, len(labels))
    m = image_metrics(labels, scores, threshold=0.5)
    for key in ("image_auroc", "average_precision", "f1_max", "f1_max_threshold"):
        assert m[key] is None
    if labels and labels[0] == 0:
        assert m["recall"] is None  # nothing to find
        assert m["false_positive_rate"] == pytest.approx(2 / 3)  # still meaningful on a normal-only set
    json.dumps(m)


def test_threshold_above_all_scores():
    m = image_metrics([0, 1], [0.2, 0.4], threshold=1.0)
    assert m["precision"] is None  # nothing flagged
    assert m["recall"] == 0.0 and m["f1"] == 0.0 and m["false_positive_rate"] == 0.0


@pytest.mark.parametrize(
    ("labels", "scores"),
    [
        ([0, 2], [0.1, 0.2]),
        ([0, 255], [0.1, 0.2]),
        ([0, 1], [0.1, np.nan]),
        ([0, 1], [0.1]),
        ([[0, 1]], [[1, 2]]),
    ],
)
def test_invalid_image_input_raises(labels, scores):
    with pytest.raises(ValueError):
        image_metrics(labels, scores)


def test_per_category_auroc_against_all_normals():
    categories = ["good", "good", "good", "good", "scratch", "scratch", "hole", "hole"]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.25, 0.05]
    result = per_category_metrics(categories, labels, scores)
    assert list(result) == ["hole", "scratch"]
    assert result["scratch"] == {"image_auroc": 1.0, "num_images": 2}
    # hole scores 0.25 and 0.05 vs normals 0.1..0.4: 0.25 beats 2 of 4, 0.05 beats none -> 2/8
    assert result["hole"]["image_auroc"] == pytest.approx(0.25)
    assert per_category_metrics(["a", "b"], [1, 1], [0.3, 0.4])["a"]["image_auroc"] is None


# ---------------------------------------------------------------------------------------------------
# Pixel AUROC


def _random_case(seed: int, n_images: int = 5, size: tuple[int, int] = (10, 32), separation: float = 1.5):
    """Images of varying size; blob masks on most (255 inside), pure-normal images in between."""
    rng = np.random.default_rng(seed)
    masks, heatmaps = [], []
    for i in range(n_images):
        h, w = rng.integers(size[0], size[1], size=2)
        mask = np.zeros((h, w), np.uint8)
        if i % 3 != 2:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, h), rng.integers(0, w)
                mask[r : r + rng.integers(1, 7), c : c + rng.integers(1, 7)] = 255
            mask[rng.integers(0, h), rng.integers(0, w)] = 255  # single-pixel regions too
        heatmaps.append(rng.normal(size=(h, w)) + separation * (mask > 0))
        masks.append(mask)
    return masks, heatmaps


def _sklearn_pixel_auroc(masks, heatmaps):
    return roc_auc_score(
        np.concatenate([np.asarray(m).ravel() > 0 for m in masks]),
        np.concatenate([np.asarray(h).ravel() for h in heatmaps]),
    )


@pytest.mark.parametrize(("method", "tolerance"), [("exact", 1e-12), ("auto", 1e-12), ("histogram", 1e-4)])
def test_pixel_auroc_equals_sklearn_on_concatenated_pixels(method, tolerance):
    # Histogram: only positive/negative pairs sharing one of the 100k bins are uncertain (~1e-5 here).
    masks, heatmaps = _random_case(0)
    expected = _sklearn_pixel_auroc(masks, heatmaps)
    assert pixel_auroc(masks, heatmaps, method=method) == pytest.approx(expected, abs=tolerance)


def test_pixel_auroc_histogram_on_many_images_matches_exact():
    masks, heatmaps = _random_case(1, n_images=60, size=(40, 120), separation=0.7)
    expected = _sklearn_pixel_auroc(masks, heatmaps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pixel_auroc(masks, heatmaps, method="histogram")
    assert got == pytest.approx(expected, abs=1e-5)


def test_pixel_auroc_histogram_handles_ties_like_sklearn():
    # Heatmaps clipped at 0 (e.g. background suppressed) have a large exact tie, which the histogram
    # treats exactly (1/2 per pair, as sklearn does) and must not flag as imprecise.
    masks, heatmaps = _random_case(2)
    heatmaps = [np.maximum(h - 0.5, 0).round(1) for h in heatmaps]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pixel_auroc(masks, heatmaps, method="histogram", num_bins=1000)
    assert got == pytest.approx(_sklearn_pixel_auroc(masks, heatmaps), abs=1e-12)


def test_pixel_auroc_warns_when_histogram_is_too_coarse():
    masks, heatmaps = _random_case(3)
    heatmaps[0] = heatmaps[0].copy()
    heatmaps[0][0, 0] = 1e9  # one outlier squashes every other score into the bottom bin
    with pytest.warns(UserWarning, match="may be off by up to"):
        pixel_auroc(masks, heatmaps, method="histogram", num_bins=1000)


def test_pixel_auroc_perfect_inverted_and_degenerate():
    mask = np.zeros((8, 9), np.uint8)
    mask[2:5, 3:6] = 1
    heat = mask.astype(np.float32)
    for method in ("exact", "histogram"):
        assert pixel_auroc([mask, None], [heat, np.zeros((4, 4))], method=method) == 1.0
        assert pixel_auroc([mask], [1 - heat], method=method) == 0.0
        assert (
            pixel_auroc([None, np.zeros((3, 3))], [np.ones((2, 2)), np.ones((3, 3))], method=method) is None
        )


def test_pixel_inputs_are_validated():
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="NaN"):
        aupro([np.ones((2, 2))], [np.full((2, 2), np.nan)])
    with pytest.raises(ValueError, match="masks for"):
        aupro([None], [np.zeros((2, 2)), np.zeros((2, 2))])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([np.ones((2, 2))], [np.zeros((2, 2))], fpr_limit=0)


# ---------------------------------------------------------------------------------------------------
# AUPRO


def reference_pro_points(masks, heatmaps, thresholds=None):
    """Slow but plain: for every threshold, count FP pixels and each region's covered fraction.

    Regions come from scikit-image (8-connectivity), independently of the cv2 labelling under test.
    Default thresholds: every distinct score, i.e. the exact curve.
    """
    gts = [np.asarray(m) > 0 for m in masks]
    regions = []
    for i, gt in enumerate(gts):
        labelled = sk_label(gt, connectivity=2)
        regions += [(i, labelled == k) for k in range(1, labelled.max() + 1)]
    n_normal = sum(int((~gt).sum()) for gt in gts)
    if thresholds is None:
        thresholds = np.unique(np.concatenate([h.ravel() for h in heatmaps]))
    points = [(0.0, 0.0)]  # threshold above every score: nothing predicted
    for t in sorted(thresholds, reverse=True):
        preds = [h >= t for h in heatmaps]
        fp = sum(int((p & ~gt).sum()) for p, gt in zip(preds, gts, strict=True))
        overlaps = [(preds[i] & region).sum() / region.sum() for i, region in regions]
        points.append((fp / n_normal, float(np.mean(overlaps))))
    return points


def reference_area(points, fpr_limit):
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points, points[1:], strict=False):
        if f0 >= fpr_limit:
            break
        if f1 > fpr_limit:  # cut the segment exactly at the limit
            p1 = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
            f1 = fpr_limit
        area += (f1 - f0) * (p0 + p1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
def test_aupro_matches_slow_reference(seed):
    masks, heatmaps = _random_case(seed, separation=1.0 + 0.3 * seed)
    points = reference_pro_points(masks, heatmaps)
    for fpr_limit in (0.3, 0.05, 1.0):
        expected = reference_area(points, fpr_limit)
        assert aupro(masks, heatmaps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-3)


def test_aupro_matches_reference_at_identical_thresholds():
    # Coarse thresholds make the discretisation visible; at the same thresholds both must agree exactly.
    masks, heatmaps = _random_case(7)
    lo, hi = min(h.min() for h in heatmaps), max(h.max() for h in heatmaps)
    n = 37
    thresholds = lo + np.arange(n) * (hi - lo) / n
    points = reference_pro_points(masks, heatmaps, thresholds)
    fpr, pro = pro_curve(masks, heatmaps, num_thresholds=n)
    np.testing.assert_allclose(np.array(points), np.stack([fpr, pro], axis=1), atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 37 bins is deliberately coarse
        got = aupro(masks, heatmaps, fpr_limit=0.3, num_thresholds=n)
    assert got == pytest.approx(reference_area(points, 0.3), abs=1e-12)


def test_aupro_perfect_and_inverted():
    masks, _ = _random_case(4)
    perfect = [(np.asarray(m) > 0).astype(np.float64) for m in masks]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact ties must not count as imprecision
        assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
        assert aupro(masks, [1 - p for p in perfect]) == pytest.approx(0.0, abs=1e-12)


def test_aupro_random_scores_is_about_half_the_limit():
    # PRO equals FPR in expectation for random scores; many regions keep the spread small (sd ~0.01).
    masks, heatmaps = _random_case(5, n_images=300, size=(16, 40), separation=0.0)
    assert aupro(masks, heatmaps, fpr_limit=0.3) == pytest.approx(0.15, abs=0.02)


def test_aupro_weights_regions_equally_and_uses_8_connectivity():
    mask = np.zeros((12, 12), np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # one diagonal region under 8-connectivity
    mask[6:10, 6:10] = 1  # a 16-pixel region
    heat = np.zeros((12, 12))
    heat[0, 0] = heat[1, 1] = 1.0  # 2 of 3 diagonal pixels found ...
    heat[2, 2] = -1.0
    heat[6:10, 6:10] = -1.0  # ... the big region missed entirely (scored below every normal pixel)
    # Curve: (0, 0) -> (0, P) -> (1, P) -> (1, 1) with P = mean(2/3, 0) = 1/3. Pixel-weighted it would
    # be 2/19; with 4-connectivity (regions 1, 1, 0, 0) it would be 1/2.
    assert aupro([mask], [heat]) == pytest.approx(1 / 3, abs=1e-9)
    n_labels, _ = cv2.connectedComponents(mask, connectivity=8)
    assert n_labels - 1 == 2


def test_aupro_none_without_regions_or_normals():
    assert aupro([None, np.zeros((3, 3))], [np.ones((2, 2)), np.ones((3, 3))]) is None
    assert aupro([np.ones((3, 3))], [np.ones((3, 3))]) is None


def test_partial_area_interpolates_at_limit_and_handles_vertical_steps():
    # y = x: area up to 0.3 is 0.045, from two points only (needs interpolation).
    assert partial_area([0, 1], [0, 1], 0.3) == pytest.approx(0.045)
    # Vertical step at x=0 (perfect detector): area = limit.
    assert partial_area([0, 0, 1], [0, 1, 1], 0.3) == pytest.approx(0.3)
    # Vertical step exactly at the limit does not count.
    assert partial_area([0, 0.3, 0.3, 1], [0, 0, 1, 1], 0.3) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------
# Report and curves


def test_evaluation_report_with_and_without_masks():
    masks, heatmaps = _random_case(6, n_images=6)
    labels = [int(np.asarray(m).any()) for m in masks]
    scores = [float(h.max()) for h in heatmaps]
    categories = ["crack" if lab else "good" for lab in labels]

    image_only = evaluation_report(labels, scores, heatmaps=heatmaps)
    assert image_only["pixel_auroc"] is None and image_only["aupro"] is None
    assert image_only["per_category"] is None

    # Normal images may come without a mask (MVTec has no mask files for them).
    masks_in = [m if lab else None for m, lab in zip(masks, labels, strict=True)]
    report = evaluation_report(
        labels, scores, masks=masks_in, heatmaps=heatmaps, categories=categories, threshold=1.0
    )
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "average_precision", "precision"):
        assert type(report[key]) is float, key  # not np.float64
    assert report["image_auroc"] == image_metrics(labels, scores)["image_auroc"]
    assert report["pixel_auroc"] == pytest.approx(_sklearn_pixel_auroc(masks, heatmaps))
    assert report["aupro"] == pytest.approx(aupro(masks, heatmaps))
    assert report["num_pixel_images"] == 6
    assert set(report["per_category"]) == {"crack"}
    assert json.loads(json.dumps(report)) == report  # plain JSON types only


def test_evaluation_report_skips_anomalous_images_without_masks():
    masks, heatmaps = _random_case(6, n_images=6)
    labels = [int(np.asarray(m).any()) for m in masks]
    first_anomalous = labels.index(1)
    masks_in = list(masks)
    masks_in[first_anomalous] = None
    report = evaluation_report(labels, [0.0] * 6, masks=masks_in, heatmaps=heatmaps)
    keep = [i for i in range(6) if i != first_anomalous]
    assert report["num_pixel_images"] == 5
    assert report["pixel_auroc"] == pytest.approx(
        _sklearn_pixel_auroc([masks[i] for i in keep], [heatmaps[i] for i in keep])
    )
    with pytest.raises(ValueError, match="without heatmaps"):
        evaluation_report(labels, [0.0] * 6, masks=masks)


def test_save_curves_writes_readable_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100)
    paths = save_curves(labels, rng.random(100) + labels, tmp_path / "nested" / "curves")
    assert set(paths) == {"roc", "pr"}
    assert paths["roc"].name == "roc_curve.png" and paths["pr"].name == "pr_curve.png"
    for path in paths.values():
        img = cv2.imread(str(path))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 100


def test_save_curves_single_class_writes_nothing(tmp_path):
    with pytest.warns(UserWarning, match="both normal and anomalous"):
        assert save_curves([0, 0, 0], [0.1, 0.2, 0.3], tmp_path) == {}
    assert not list(tmp_path.iterdir())


def test_curves_mark_the_calibrated_operating_point(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(60, int), np.ones(40, int)]
    scores = rng.random(100) + labels
    plain = save_curves(labels, scores, tmp_path / "plain")
    marked = save_curves(labels, scores, tmp_path / "marked", threshold=1.2, inclusive=False)

    def crimson_pixels(path) -> int:  # the marker's colour; nothing else in the plot is red
        bgr = cv2.imread(str(path)).astype(int)
        return int(((bgr[..., 2] > 180) & (bgr[..., 1] < 60) & (bgr[..., 0] > 30) & (bgr[..., 0] < 90)).sum())

    for kind in ("roc", "pr"):
        assert crimson_pixels(plain[kind]) == 0 and crimson_pixels(marked[kind]) > 20


def test_threshold_rule_inclusive_or_strict():
    labels, scores = [0, 1, 1], [0.2, 0.5, 0.9]
    assert image_metrics(labels, scores, threshold=0.5)["tp"] == 2  # score >= threshold
    strict = image_metrics(labels, scores, threshold=0.5, inclusive=False)  # a detector's score > threshold
    assert (strict["tp"], strict["fn"], strict["recall"]) == (1, 1, 0.5)
