"""Detectors that train a network: the training loop, augmentations, SSIM and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from imaging_ad.detectors import create_detector, load_detector
from imaging_ad.detectors.augment import AUGMENTATIONS, build_augmentation
from imaging_ad.detectors.image_autoencoder import gaussian_window, ssim_map
from imaging_ad.detectors.training import train_network
from tests.synthetic import paste_defect, texture


def test_ssim_map_matches_scikit_image_inside_the_borders():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 48)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    _, reference = structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True
    )
    ours = ssim_map(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None], 1.0, gaussian_window())
    # borders differ only in how each library reflects the image; the interior must agree
    np.testing.assert_allclose(ours[0, 5:-5, 5:-5].numpy(), reference[5:-5, 5:-5], atol=1e-4)
    same = ssim_map(torch.from_numpy(x)[None, None], torch.from_numpy(x)[None, None], 1.0, gaussian_window())
    np.testing.assert_allclose(same.numpy(), 1.0, atol=1e-5)


def test_augmentations_keep_shape_and_change_the_image():
    image = np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32)
    assert build_augmentation("none", seed=0) is None
    for name in set(AUGMENTATIONS) - {"none"}:
        augment = build_augmentation(name, seed=1)
        outputs = [augment(image) for _ in range(4)]
        assert all(o.shape == image.shape and o.dtype == np.float32 for o in outputs)
        assert any(not np.array_equal(o, image) for o in outputs), name
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_augmentation("mirror", seed=0)
    with pytest.raises(ValueError, match="unknown augmentation"):
        create_detector("feature_ae", augment="mirror")


def test_early_stopping_keeps_the_best_epoch():
    torch.manual_seed(0)
    network = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def step(batch):
        optimizer.zero_grad()
        loss = (network(batch) - batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    # a scripted validation curve, best after the second epoch; remember the weights it saw
    curve = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    seen = []

    def validate(batch):
        seen.append(network.weight.detach().clone())
        return next(curve)

    history = train_network(
        network,
        step,
        validate,
        torch.randn(32, 4),
        torch.randn(8, 4),  # one validation batch: one call per epoch
        epochs=7,
        batch_size=8,
        patience=3,
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    assert history.best_epoch == 1 and history.stopped == "early_stopping"
    assert len(history.validation_loss) == 5  # two epochs, then three without improvement
    torch.testing.assert_close(network.weight, seen[1])
    assert not torch.equal(network.weight, seen[-1])


@pytest.mark.parametrize(
    "name", ["feature_ae", "image_ae", "reverse_distillation", "simplenet", "feature_draem"]
)
def test_training_is_reproducible_with_a_seed(name):
    rng = np.random.default_rng(1)
    normals = [texture(rng, 64, 64) for _ in range(14)]
    params = {
        "image_size": 64,
        "epochs": 3,
        "progress": False,
        "holdout_fraction": 0.2,
        "augmented_copies": 1,
    }
    first = create_detector(name, **params).fit(normals)
    second = create_detector(name, **params).fit(normals)
    assert first.history_.train_loss == second.history_.train_loss
    assert [r.score for r in first.predict(normals[:3])] == [r.score for r in second.predict(normals[:3])]


def test_progress_bar_reports_the_loss(capsys):
    rng = np.random.default_rng(2)
    normals = [texture(rng, 64, 64) for _ in range(12)]
    create_detector("feature_ae", image_size=64, epochs=2, holdout_fraction=0.2, progress=True).fit(normals)
    err = capsys.readouterr().err
    assert "feature_ae: train" in err and "loss=" in err and "val=" in err


def test_ganomaly_default_score_is_the_latent_distance():
    rng = np.random.default_rng(3)
    normals = [texture(rng, 64, 64) for _ in range(12)]
    detector = create_detector("ganomaly", epochs=2, holdout_fraction=0.2, progress=False).fit(normals)
    image = paste_defect(texture(rng, 64, 64), rng, size=14)[0]
    (result,) = detector.predict([image])
    batch = torch.from_numpy(detector.preprocessor_(image))[None]
    with torch.no_grad():
        _, z, z_hat = detector.network_.generator(batch)
    assert result.score == pytest.approx(float((z - z_hat).pow(2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="score must be one of"):
        create_detector("ganomaly", score="pixels")


@pytest.mark.parametrize("member", ["feature_ae", "reverse_distillation", "simplenet", "feature_draem"])
def test_ensemble_trains_feature_model_members_and_refuses_pixel_models(member):
    rng = np.random.default_rng(4)
    normals = [texture(rng) for _ in range(24)]
    clean = [texture(rng) for _ in range(4)]
    defects = [paste_defect(texture(rng), rng)[0] for _ in range(4)]
    ensemble = create_detector(
        "ensemble", members=["patchcore", member], image_size=128, holdout_fraction=0.2, progress=False
    ).fit(normals)
    assert ensemble.members_[1].history_ is not None  # the autoencoder member really trained
    scores = [r.score for r in ensemble.predict(clean + defects)]
    assert min(scores[4:]) > max(scores[:4])
    with pytest.raises(ValueError, match="model pixels"):
        create_detector("ensemble", members=["patchcore", "image_ae"])


def test_image_autoencoder_with_a_pretrained_encoder_fits_saves_and_loads(tmp_path):
    rng = np.random.default_rng(5)
    normals = [texture(rng, 64, 64) for _ in range(12)]
    detector = create_detector(
        "image_ae", encoder="backbone", image_size=64, epochs=2, holdout_fraction=0.2, progress=False
    ).fit(normals)
    pretrained = detector.network_.pretrained
    assert pretrained is not None and pretrained is not detector.extractor_  # a fine-tuned copy
    loaded = load_detector(detector.save(tmp_path / "ae"), device="cpu")
    assert [r.score for r in loaded.predict(normals[:2])] == [r.score for r in detector.predict(normals[:2])]


@pytest.mark.parametrize("name", ["reverse_distillation", "simplenet", "feature_draem"])
def test_feature_trained_detectors_find_and_locate_pasted_defects(name, tmp_path):
    rng = np.random.default_rng(6)
    normals = [texture(rng) for _ in range(24)]
    clean = [texture(rng) for _ in range(5)]
    defects = [paste_defect(texture(rng), rng) for _ in range(5)]
    detector = create_detector(name, image_size=256, epochs=15, progress=False).fit(normals)
    results = detector.predict(clean + [image for image, _ in defects])
    scores = [r.score for r in results]
    assert min(scores[5:]) > max(scores[:5]), scores
    for result, (_, mask) in zip(results[5:], defects, strict=True):
        peak = np.unravel_index(np.argmax(result.heatmap), result.heatmap.shape)
        # the peak on the pasted blob or within a few pixels of it (the heatmap is smoothed)
        near = np.zeros_like(mask)
        near[max(0, peak[0] - 3) : peak[0] + 4, max(0, peak[1] - 3) : peak[1] + 4] = True
        assert (near & mask).any(), f"{name}: heatmap peak {peak} is off the defect"
    loaded = load_detector(detector.save(tmp_path / name), device="cpu")
    again = loaded.predict(clean[:2] + [defects[0][0]])
    assert [r.score for r in again] == scores[:2] + scores[5:6]  # bit-identical after save and load
    assert all(np.array_equal(a.heatmap, b.heatmap) for a, b in zip(again, results[:2], strict=False))


def _with_label(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A burnt-in label in the top-left corner: random white strokes, different in every image."""
    out = image.copy()
    for _ in range(6):
        y, x = rng.integers(2, 20, size=2)
        out[y : y + 2, x : x + int(rng.integers(3, 9))] = 255
    return out


def test_position_statistics_keep_a_label_in_every_image_from_outranking_defects():
    """Every image carries a different label in the same corner, which the autoencoder reconstructs
    badly on normals too: standardised per position (the default), the label's cells stop looking
    anomalous, defects rank above every normal and heatmaps peak off the label. (With raw errors the
    label's error is the score of clean images, and they mix with the defective ones.)"""
    rng = np.random.default_rng(6)
    normals = [_with_label(texture(rng), rng) for _ in range(30)]
    clean = [_with_label(texture(rng), rng) for _ in range(6)]
    defects = [paste_defect(texture(rng), rng, size=12) for _ in range(6)]
    images = clean + [_with_label(image, rng) for image, _ in defects]
    detector = create_detector("feature_ae", image_size=128, epochs=15, progress=False).fit(normals)
    assert detector.position_statistics and detector.position_mean_ is not None
    results = detector.predict(images)
    scores = [r.score for r in results]
    assert min(scores[6:]) > max(scores[:6]), scores
    for result in results[6:]:
        peak = np.unravel_index(np.argmax(result.heatmap), result.heatmap.shape)
        assert not (peak[0] < 24 and peak[1] < 24), f"heatmap peak {peak} on the label"


def test_one_held_out_normal_gives_no_position_statistics_and_says_so():
    """A single early-stopping normal has no spread: rather than divide by the variance floor (a ranking
    that means nothing), the map is scored raw and the fit warns."""
    from imaging_ad.detectors.base import CalibrationWarning

    rng = np.random.default_rng(8)
    normals = [texture(rng) for _ in range(12)]  # 2 kept for thresholds, 1 of the other 10 for stopping
    with pytest.warns(CalibrationWarning, match="1 held-out normal image"):
        detector = create_detector("feature_ae", image_size=96, epochs=2, progress=False).fit(normals)
    assert detector.position_statistics and detector.position_mean_ is None
    defect, _ = paste_defect(texture(rng), rng)
    assert np.isfinite([r.score for r in detector.predict([texture(rng), defect])]).all()


def test_reverse_distillation_refuses_teacher_strides_that_do_not_halve():
    from imaging_ad.detectors.params import ParameterError

    rng = np.random.default_rng(7)
    normals = [texture(rng, 64, 64) for _ in range(6)]
    for strides in [(8, 32), (32, 16), ()]:
        with pytest.raises(ParameterError, match="teacher_strides"):
            create_detector("reverse_distillation", teacher_strides=strides, progress=False).fit(normals)


def test_reverse_distillation_file_from_before_teacher_strides_loads_as_it_was_fitted(tmp_path):
    """Files written before ``teacher_strides`` and ``neighbourhood`` existed reconstructed strides 4, 8
    and 16 without averaging: they must load as that network, and score exactly as when saved."""
    import json

    from safetensors.torch import load_file, save_file

    from imaging_ad.detectors.persistence import _digest

    rng = np.random.default_rng(8)
    normals = [texture(rng, 64, 64) for _ in range(12)]
    old = create_detector(
        "reverse_distillation",
        teacher_strides=(4, 8, 16),
        neighbourhood=1,
        width=8,
        image_size=64,
        epochs=2,
        holdout_fraction=0.2,
        progress=False,
    ).fit(normals)
    path = old.save(tmp_path / "rd")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        description = json.loads(handle.metadata()["imaging_ad"])
    tensors = load_file(str(path))
    for key in ("teacher_strides", "neighbourhood"):
        del description["params"][key]  # as an older version wrote it
    description.pop("sha256")
    description["sha256"] = _digest(description, tensors)
    save_file(tensors, str(path), metadata={"imaging_ad": json.dumps(description)})
    loaded = load_detector(path, device="cpu")
    assert loaded.feature_strides == (4, 8, 16) and loaded.neighbourhood == 1
    assert [r.score for r in loaded.predict(normals[:2])] == [r.score for r in old.predict(normals[:2])]


def test_feature_draem_blobs_cover_the_asked_share_and_leave_some_images_clean():
    from imaging_ad.detectors.feature_draem import blob_masks

    generator = torch.Generator().manual_seed(0)
    masks = blob_masks(200, (16, 16), anomaly_probability=0.5, coverage=(0.05, 0.2), generator=generator)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    shares = masks.flatten(1).mean(1)
    with_blob = shares[shares > 0]
    assert 70 < len(with_blob) < 130  # about half the images get an anomaly
    assert with_blob.min() >= 0.05 - 1 / 256 and with_blob.max() <= 0.2 + 1 / 256
    again = blob_masks(
        200,
        (16, 16),
        anomaly_probability=0.5,
        coverage=(0.05, 0.2),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(masks, again)  # seeded: the same anomalies


def test_feature_draem_pastes_other_images_features_only_inside_the_blob():
    from imaging_ad.detectors.feature_draem import paste_foreign_features

    fine, coarse = torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4)
    masks = torch.zeros(4, 1, 8, 8)
    masks[0, 0, 2:4, 2:4] = 1  # only the first image gets a blob, on whole cells of the coarse grid
    corrupted = paste_foreign_features([fine, coarse], masks, torch.Generator().manual_seed(1))
    changed = (corrupted[0] != fine).any(1)
    assert changed[0].nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    assert not changed[1:].any() and torch.equal(corrupted[1][1:], coarse[1:])
    assert (corrupted[1][0] != coarse[0]).any(0).nonzero().tolist() == [[1, 1]]


def test_feature_draem_head_never_reads_a_larger_reconstruction_failure_as_more_normal():
    """Whatever weights training reaches, a position reconstructed worse scores higher, and only that
    position moves (the head reads each position on its own)."""
    from imaging_ad.detectors.feature_draem import SegmentationHead

    teacher = [torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)]
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    worse = [student[0].clone(), student[1]]
    worse[0][..., 3, 3] = -teacher[0][..., 3, 3]  # one position reconstructed as its opposite
    for seed in range(20):
        torch.manual_seed(seed)
        head = SegmentationHead(2, 8)
        for parameter in head.parameters():
            parameter.data.add_(2 * torch.randn_like(parameter))  # any weights training could reach
        head.layers[0].running_mean.copy_(torch.rand(2))
        head.layers[0].running_var.copy_(0.01 + torch.rand(2))
        head.eval()  # as it scores: distances standardised by the statistics training left
        with torch.no_grad():
            before, after = head(teacher, student)[0], head(teacher, worse)[0]
        assert after[3, 3] > before[3, 3], seed
        assert (after != before).sum() == 1, seed


def test_feature_draem_refuses_a_coverage_that_is_not_two_shares():
    from imaging_ad.detectors.params import ParameterError

    for coverage in [(0.3, 0.1), (0.0, 0.2), (0.1, 1.0), (0.1,)]:
        with pytest.raises(ParameterError, match="coverage"):
            create_detector("feature_draem", coverage=coverage, progress=False).validate_params()
