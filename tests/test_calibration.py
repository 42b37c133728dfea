"""Thresholds that say what they can promise: cross-fitted scores equal brute-force leave-one-out (or
k-fold) scores, the bound and the small-n warning, outlying training images, the normalised score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imaging_ad.calibration import Calibration, calibrate, fpr_upper_bound, normals_needed
from imaging_ad.detectors import create_detector
from imaging_ad.detectors.components.search import Exclusion
from tests.synthetic import texture
from tests.test_trust import forge

SMALL = {"image_size": 64, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def normals():
    rng = np.random.default_rng(0)
    return [texture(rng, 60, 70) for _ in range(12)]


def _features(detector, images):
    """Each image's feature maps, as the fit's pass saw them (batch by batch, then per image)."""
    per_image = []
    for features, batch in detector.extracted_batches(images, "features"):
        per_image += [[f[j : j + 1] for f in features] for j in range(len(batch))]
    return per_image


def test_padim_cross_fitted_scores_equal_refitting_without_each_image(normals):
    detector = create_detector("padim", **SMALL).fit(normals)
    assert detector.calibration_.n_normal == len(normals) and "leave-one-out" in detector.calibration_.method
    features = _features(detector, normals)
    # the closed form again (fit state kept for the check), against a Gaussian refitted without image i
    detector.begin_fit(len(normals))
    for f in features:
        detector.partial_fit(f)
    detector.end_fit()
    for i in (0, 5, 11):
        _, loo_map = detector.cross_fitted_evidence(features[i], [i])
        refit = create_detector("padim", **SMALL)
        refit.use_backbone(detector.extractor_, detector.preprocessor_)
        refit.begin_fit(len(normals) - 1)
        for j, f in enumerate(features):
            if j != i:
                refit.partial_fit(f)
        refit.end_fit()
        refit.refresh_head()
        _, expected = refit.head_(features[i])
        np.testing.assert_allclose(loo_map.numpy(), expected.numpy(), rtol=1e-4)


def test_patchcore_cross_fitted_distances_skip_the_images_own_bank_rows(normals):
    for search in ("flat", "hnsw"):
        detector = create_detector("patchcore", search=search, **SMALL)
        detector._setup()
        features = _features(detector, normals)
        detector.begin_fit(len(normals))
        for f in features:
            detector.partial_fit(f)
        detector.end_fit()
        sources = detector._bank_sources
        assert sources.shape[0] == detector.memory_bank_.shape[0] and set(sources.tolist()) <= set(range(12))
        for i in (0, 7):
            distances, _ = detector.cross_fitted_evidence(features[i], [i])
            queries = (
                detector.head_.embed(features[i])
                .permute(0, 2, 3, 1)
                .reshape(-1, detector.memory_bank_.shape[1])
            )
            others = detector.memory_bank_[sources != i]
            brute = torch.cdist(queries, others).min(dim=1).values
            plain, _ = detector.held_out_evidence(features[i])
            assert (plain.flatten() <= distances.flatten() * (1 + 1e-5) + 1e-4).all()  # own rows only helped
            if search == "flat":
                np.testing.assert_allclose(distances.flatten().numpy(), brute.numpy(), rtol=1e-4, atol=1e-4)
            else:  # graph search: the image's top patch (what the score reads) is exact
                top = distances.flatten().argmax()
                assert float(distances.flatten()[top]) == pytest.approx(float(brute[top]), rel=1e-4)
        detector.release_fit_state()
        assert not hasattr(detector, "_bank_sources")


def test_exclusion_never_matches_a_row_of_the_same_source():
    from imaging_ad.detectors.components.search import ExactSearch

    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    search = ExactSearch(bank)
    queries = torch.tensor([[0.1, 0.0], [0.9, 0.0]])
    distances, nearest = search.in_blocks(queries, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    assert nearest.tolist() == [1, 0]  # each skips the row of its own source
    exclusion = Exclusion(torch.tensor([0, 1, 2]), torch.tensor([3, 4]))
    assert exclusion.per_query(2).tolist() == [3, 3, 4, 4]


def test_exact_distance_is_precise_near_a_bank_row_whatever_the_batch():
    # deeppcb: boards repeat designs, so test patches can sit on bank rows. The GEMM expansion
    # |q|^2 - 2 q.m + |m|^2 cancels norms of ~1e4 there and its rounding changed with the batch (one
    # patch's distance differed by 0.027 between a batch of 16 and its image alone); it is taken from q - m
    from imaging_ad.detectors.components.search import ExactSearch

    generator = torch.Generator().manual_seed(0)
    bank = 10 + 5 * torch.rand(2000, 1024, generator=generator)
    search = ExactSearch(bank)
    offset = torch.zeros(1024)
    offset[0] = 1e-3
    target = bank[123] + offset  # 1e-3 from row 123, norm ~400
    others = 10 + 5 * torch.rand(63, 1024, generator=generator)
    alone = search(target[None])
    in_batch = search(torch.cat([others, target[None]]))
    for distances, nearest in (alone, (in_batch[0][-1:], in_batch[1][-1:])):
        assert int(nearest[0]) == 123
        assert float(distances[0]) == pytest.approx(1e-3, rel=1e-3)
    # cross-fitting a one-image bank: no row may match, so no neighbour at all
    lonely, _ = search.in_blocks(target[None], torch.tensor([0]), torch.zeros(2000, dtype=torch.long))
    assert torch.isinf(lonely).all()


def test_dfm_cross_fitted_scores_come_from_the_other_folds(normals):
    detector = create_detector("dfm", **SMALL)
    detector._setup()
    features = _features(detector, normals)
    detector.begin_fit(len(normals))
    for f in features:
        detector.partial_fit(f)
    detector.end_fit()
    detector.refresh_head()
    folds = len(detector._fold_models)
    assert folds == 10
    for i in (0, 3):
        score, _ = detector.cross_fitted_evidence(features[i], [i])
        refit = create_detector("dfm", **SMALL)
        refit.use_backbone(detector.extractor_, detector.preprocessor_)
        refit.begin_fit(len(normals))
        for j, f in enumerate(features):
            if j % folds != i % folds:
                refit.partial_fit(f)
        refit.end_fit()
        refit.refresh_head()
        expected, _ = refit.head_(features[i])
        assert float(score[0]) == pytest.approx(float(expected[0]), rel=1e-4)


def test_held_out_detectors_still_split():
    detector = create_detector("ocsvm")
    assert detector.cross_fitting is None
    assert create_detector("ensemble", members=["patchcore", "ocsvm"]).cross_fitting is None
    assert create_detector("ensemble", members=["patchcore", "padim"]).cross_fitting is not None


# -- what a calibration promises -------------------------------------------------------------------------


def test_bound_and_small_n_warning():
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=1000)
    few = calibrate(rng.normal(size=107), pixels, 0.01, method="test")
    many = calibrate(rng.normal(size=2000), pixels, 0.01, method="test")
    assert few.n_normal == 107 and few.fpr_resolution == pytest.approx(1 / 107)
    assert few.fpr_upper_bound > 0.03 and "cannot support" in few.warnings[0]
    assert str(normals_needed(0.01)) in few.warnings[0]
    assert many.fpr_upper_bound < 0.02 and not many.warnings
    # the bound's definition: the exceedance of the (n - k)-th order statistic is Beta(k + 1, n - k)
    draws = rng.beta(3, 98, size=200_000)
    assert fpr_upper_bound(100, 2) == pytest.approx(np.quantile(draws, 0.95), rel=0.01)


def test_outlying_training_images_are_listed_and_a_heavy_tail_warned():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=500)
    scores[17] = 40.0  # a mislabelled anomaly among the normals
    names = [f"img{i}.png" for i in range(500)]
    calibration = calibrate(scores, rng.normal(size=100), 0.01, names=names)
    assert calibration.outliers[0] == ("img17.png", 40.0)
    assert any("far above the rest" in w for w in calibration.warnings)


def test_normalised_score_keeps_ranking_far_above_the_threshold():
    calibration = Calibration(10.0, 1.0, 2.0, 0.01, 500)
    assert calibration.normalize(10.0) == pytest.approx(0.5)
    far, farther = calibration.normalize([210.0, 2010.0])
    assert 0.99 < far < farther < 1.0 and f"{far:.3f}" != f"{farther:.4f}"
    for t in (0.05, 0.5, 0.93, 0.999):
        assert calibration.normalize(calibration.raw_score(t)) == pytest.approx(t)


def test_calibrations_saved_before_the_new_fields_still_load():
    old = {
        "image_threshold": 3.0,
        "pixel_threshold": 1.0,
        "score_scale": 0.5,
        "target_fpr": 0.01,
        "n_normal": 8,
    }
    calibration = Calibration.from_dict(old)
    assert calibration.fpr_upper_bound is None and calibration.warnings == () and calibration.n_normal == 8
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_fit_and_recalibrate_say_when_the_normals_cannot_support_the_target(normals):
    from imaging_ad.detectors import CalibrationWarning

    with pytest.warns(CalibrationWarning, match="cannot support a 1.0% false-positive rate"):
        detector = create_detector("padim", **SMALL).fit(normals)
    site = [texture(np.random.default_rng(9), 60, 70) for _ in range(6)]
    with pytest.warns(CalibrationWarning):
        calibration = detector.recalibrate(site, source="site X")
    assert calibration.method == "site calibration" and calibration.source == "site X"
    assert calibration.n_normal == 6 and detector.calibration_ is calibration


def test_patchcore_border_band_neither_scores_nor_shows(tmp_path):
    """A defect in the ignored outer band hardly moves the score (only through the receptive field of
    the cells next to it), one inside is still found; the band shows each position's typical normal
    distance; the setting is saved with the model."""
    import warnings

    from imaging_ad.detectors import load_detector

    rng = np.random.default_rng(5)
    normals = [texture(rng, 128, 128) for _ in range(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 12 normals cannot support 1%: not what this test is about
        detector = create_detector(
            "patchcore", border=1, heatmap="distance", **{**SMALL, "image_size": 128}
        ).fit(normals)
    clean = texture(rng, 128, 128)
    corner, middle = clean.copy(), clean.copy()
    corner[:10, :10] = 0  # inside the outer cell of the 8x8 grid (16 px cells at 128 px)
    middle[56:72, 56:72] = 0

    def scores() -> list[float]:
        return [r.score for r in detector.predict([clean, corner, middle])]

    with_band = scores()
    detector.border = 0
    detector.refresh_head()
    without_band = scores()
    detector.border = 1
    detector.refresh_head()
    assert with_band[1] - with_band[0] < 0.5 * (without_band[1] - without_band[0])
    assert with_band[2] > 2 * with_band[0] and with_band[2] > detector.calibration_.image_threshold

    grid = detector.head_.shown(torch.zeros(1, 64))[0]
    band = detector.head_.ignored(torch.zeros(1, 64))
    assert band.sum() == 64 - 36 and torch.equal(grid[band], detector.position_mean_[band])
    assert (detector.head_.ranked(torch.zeros(1, 64))[0, band] == -torch.inf).all()
    heatmap = detector.predict(middle)[0].heatmap
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert 40 <= y < 88 and 40 <= x < 88

    detector.save(tmp_path / "m.safetensors")
    assert load_detector(tmp_path / "m.safetensors").border == 1
    # a file written before the option existed (no "border" saved) scores the whole grid, as it did
    older = forge(tmp_path / "m.safetensors", tmp_path / "older.safetensors", _without_border)
    assert load_detector(older).border == 0


def _without_border(description: dict) -> None:
    del description["params"]["border"]


def test_patchcore_heatmap_modes_show_what_they_say(normals):
    """``excess``: distance above the position's mean on held-out normals; ``standardised``: what the image
    score ranks; both keep the defect on top; the pixel threshold is set on maps of the same kind."""
    import warnings

    rng = np.random.default_rng(9)
    defect = texture(rng, 60, 70)
    defect[20:34, 25:40] = 0
    distances = torch.rand(2, 16) * 4  # 4 x 4 grid at 64 px
    maps = {}
    for mode in ("distance", "excess", "standardised"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 12 normals cannot support 1%: not what this test is about
            detector = create_detector("patchcore", heatmap=mode, **SMALL).fit(normals)
        maps[mode] = detector.head_.shown(distances)
        result = detector.predict(defect)[0]
        assert result.score > detector.calibration_.image_threshold
        assert result.heatmap.max() > detector.calibration_.pixel_threshold
    assert torch.equal(maps["distance"], distances)
    assert torch.allclose(maps["excess"], distances - detector.position_mean_)
    assert torch.allclose(maps["standardised"], detector.head_.ranked(distances))


def test_patchcore_region_of_interest_mask(tmp_path):
    """A mask image (white: examine) keeps a fixture that moves between images from scoring where it is
    outside the region; a defect inside is found; a bad mask is refused before any image is read; the
    model keeps the mask (the file is not needed to load it)."""
    import warnings

    import cv2

    from imaging_ad.detectors import load_detector
    from imaging_ad.detectors.params import ParameterError

    rng = np.random.default_rng(3)
    normals = [texture(rng, 128, 128) for _ in range(12)]
    mask = np.zeros((256, 256), np.uint8)
    mask[:, :128] = 255  # examine the left half only
    region = tmp_path / "left.png"
    cv2.imwrite(str(region), mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 12 normals cannot support 1%: not what this test is about
        detector = create_detector("patchcore", region=str(region), **{**SMALL, "image_size": 128}).fit(
            normals
        )
    clean = texture(rng, 128, 128)
    right, left = clean.copy(), clean.copy()
    right[56:72, 96:112] = 0
    left[56:72, 16:32] = 0
    clean_r, right_r, left_r = detector.predict([clean, right, left])
    assert right_r.score < clean_r.score + 0.5 * (left_r.score - clean_r.score)
    assert left_r.score > detector.calibration_.image_threshold
    assert (
        detector.region_cells_.reshape(8, 8)[:, :4].all()
        and not detector.region_cells_.reshape(8, 8)[:, 4:].any()
    )

    region.rename(tmp_path / "moved.png")
    saved = detector.save(tmp_path / "m.safetensors")
    assert torch.equal(load_detector(saved).region_cells_, detector.region_cells_)

    with pytest.raises(ParameterError, match="moved_again.png is not a file"):
        create_detector("patchcore", region=str(tmp_path / "moved_again.png"), **SMALL).fit(normals)
    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ParameterError, match="black everywhere"):
        create_detector("patchcore", region=str(tmp_path / "black.png"), **SMALL).fit(normals)
