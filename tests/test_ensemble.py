"""Ensemble plumbing: one data pass feeds every member through their public fitting methods; bad member
lists are refused."""

import numpy as np
import pytest
import torch

from imaging_ad.calibration import calibrate
from imaging_ad.detectors import create_detector, load_detector
from tests.synthetic import texture


def test_members_share_one_backbone_pass_over_the_union_of_their_stages():
    ensemble = create_detector("ensemble", members=["patchcore", "padim"], progress=False)
    assert ensemble.feature_strides == (4, 8, 16, 32)
    assert [m.name for m in ensemble.members_] == ["patchcore", "padim"]


@pytest.mark.parametrize("members", [["patchcore"], ["patchcore", "patchcore"], ["patchcore", "nope"]])
def test_bad_member_lists_are_refused(members):
    with pytest.raises(ValueError, match="two or more different registered detectors"):
        create_detector("ensemble", members=members)


def test_padim_member_picks_channels_from_its_own_stages(textures_small):
    normals, probe = textures_small
    ensemble = create_detector(
        "ensemble",
        members=["patchcore", "padim"],
        image_size=64,
        batch_size=8,
        progress=False,
        holdout_fraction=0.25,
    ).fit(normals)
    result = ensemble.predict([probe])[0]
    assert result.heatmap.shape == probe.shape[:2] and np.isfinite(result.score)


@pytest.fixture
def textures_small():
    rng = np.random.default_rng(1)
    return [texture(rng, 64, 64) for _ in range(12)], texture(rng, 50, 70)


@pytest.mark.parametrize("members", [["dfm", "padim"], ["patchcore", "dfm"]])
def test_ensemble_calibrates_on_its_members_calibration_scores(members, tmp_path):
    """The members are standardised and the ensemble calibrated on the same held-out normals. Without a
    member that learns from them, the calibration scores are exactly the ensemble's own scores of those
    images; a PatchCore member learns its per-position statistics there too, and contributes its
    leave-one-out scores, so the threshold sits above every held-out image's in-sample score."""
    rng = np.random.default_rng(2)
    normals = [texture(rng, 64, 64) for _ in range(16)]
    validation = [texture(rng, 64, 64) for _ in range(10)]
    ensemble = create_detector("ensemble", members=members, image_size=64, batch_size=8, progress=False)
    ensemble.fit(normals, validation)
    in_sample = max(r.score for r in ensemble.predict(validation))
    threshold = ensemble.calibration_.image_threshold  # 1% of 10 normals: the highest score
    if "patchcore" not in members:
        assert threshold == pytest.approx(in_sample, rel=1e-5)
        return
    patchcore = ensemble.members_[members.index("patchcore")]
    assert patchcore.position_mean_ is not None
    assert threshold > in_sample
    ensemble.save(tmp_path / "ensemble.safetensors")
    loaded = load_detector(tmp_path / "ensemble.safetensors")
    assert loaded.members_[0].position_mean_ is not None
    assert [r.score for r in loaded.predict(validation[:3])] == [
        r.score for r in ensemble.predict(validation[:3])
    ]


def test_ensemble_calibration_reads_the_held_out_images_once():
    """Standardising the members and sampling the ensemble's heatmap pixels share one backbone pass over
    the held-out normals, and the pixel threshold is the one a separate pass would give."""
    rng = np.random.default_rng(4)
    normals = [texture(rng, 64, 64) for _ in range(16)]
    validation = [texture(rng, 64, 64) for _ in range(10)]
    ensemble = create_detector(
        "ensemble", members=["dfm", "padim"], image_size=64, batch_size=8, progress=False
    )
    images_read = []
    extract = ensemble._extract
    ensemble._extract = lambda batch: (images_read.append(batch.shape[0]), extract(batch))[1]
    ensemble.fit(normals, validation)
    assert sum(images_read) == len(normals) + len(validation)

    # a separate pass, as before: the ensemble's own scores and maps of the held-out images
    outputs = [
        (ensemble.head_(f), [e.size for e in batch])
        for f, batch in ensemble.extracted_batches(validation, "")
    ]
    with torch.inference_mode():
        maps = torch.cat([maps for (_, maps), _ in outputs])
    pixels = ensemble._pixel_sample(maps, [size for _, sizes in outputs for size in sizes])
    scores = np.array([r.score for r in ensemble.predict(validation)])
    separate = calibrate(scores, pixels, ensemble.target_fpr)
    assert ensemble.calibration_.pixel_threshold == pytest.approx(separate.pixel_threshold, rel=1e-6)
    assert ensemble.calibration_.image_threshold == pytest.approx(separate.image_threshold, rel=1e-5)
