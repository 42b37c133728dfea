"""Preprocessing: whole image kept, 16-bit windowing explicit, geometry invertible, config round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from imaging_ad import create_backbone, read_image
from imaging_ad.intensity import percentiles
from imaging_ad.preprocess import Preprocessor

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


@pytest.mark.parametrize("aspect", ["stretch", "letterbox"])
@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (64, 64), (37, 91)])
def test_whole_image_is_kept_and_heatmap_returns_to_original_size(aspect, shape):
    pre = Preprocessor(image_size=64, aspect=aspect, **IDENTITY)
    image = np.zeros(shape, np.uint8)
    image[0, 0] = image[-1, -1] = 255  # corners survive: nothing is cropped away
    tensor = pre(image)
    assert tensor.shape == (3, 64, 64)
    top, left, height, width = pre.geometry(shape).content_box
    assert tensor[0, top, left] > 0.1 and tensor[0, top + height - 1, left + width - 1] > 0.1
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[top : top + height, left : left + width] = 1.0
    back = pre.heatmap_to_original(heatmap, shape)
    assert back.shape == shape and back.dtype == np.float32
    np.testing.assert_allclose(back, 1.0, atol=1e-5)


def test_letterbox_preserves_aspect_and_pads_black():
    pre = Preprocessor(image_size=64, aspect="letterbox", **IDENTITY)
    tensor = pre(np.full((32, 64), 255, np.uint8))
    assert tensor[0, :16].max() == 0 and tensor[0, 48:].max() == 0 and tensor[0, 16:48].min() > 0.99


def test_grayscale_becomes_three_identical_channels_and_backbone_normalisation_applies():
    pre = Preprocessor.for_backbone(create_backbone(), image_size=32)
    tensor = pre(np.full((20, 20), 255, np.uint8))
    assert tensor.shape == (3, 32, 32)
    np.testing.assert_allclose(tensor.numpy(), 1.0, atol=1e-5)  # (1 - 0.5) / 0.5


@pytest.mark.parametrize("aspect", ["stretch", "letterbox"])
@pytest.mark.parametrize("intensity", ["auto", "robust"])
def test_grayscale_shortcut_equals_the_three_channel_path(aspect, intensity):
    """Grayscale images are normalised on one channel and copied to three: bit for bit what the
    three-channel pipeline gives the same pixels stacked as RGB."""
    pixels = np.random.default_rng(0).integers(0, 256, (45, 70), dtype=np.uint8)
    pre = Preprocessor(image_size=48, aspect=aspect, intensity=intensity, mean=(0.5,) * 3, std=(0.25,) * 3)
    gray = pre(pixels)
    assert gray.is_contiguous() and gray.shape == (3, 48, 48)
    assert pre._gray_pipeline is not None
    pre._gray_pipeline = None  # force the general path
    assert np.array_equal(gray.numpy(), pre(pixels).numpy())
    # channels normalised differently (ImageNet statistics) take the general path
    assert Preprocessor(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))._gray_pipeline is None


@pytest.mark.parametrize("size", [40, 64])
def test_grayscale_stored_as_rgb_takes_the_one_channel_path(size):
    gray = np.random.default_rng(2).integers(0, 256, (40, 40), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    pre = Preprocessor(image_size=size)
    shortcut = pre(rgb).numpy()
    assert np.array_equal(shortcut, pre(gray).numpy())
    pre._gray_pipeline = None
    general = pre(rgb).numpy()
    if size == 40:  # no resize: bit for bit
        assert np.array_equal(shortcut, general)
    np.testing.assert_allclose(shortcut, general, rtol=0, atol=1e-6)  # OpenCV's 1- vs 3-channel rounding


def test_histogram_percentiles_equal_numpys_bit_for_bit():
    rng = np.random.default_rng(1)
    for trial in range(300):
        dtype, top = [(np.uint8, 256), (np.uint16, 4096), (np.uint16, 65536)][trial % 3]
        shape = [(int(rng.integers(1, 60)), int(rng.integers(1, 60))), (17, 9, 3)][trial % 2]
        pixels = rng.integers(0, top, shape).astype(dtype)
        if trial % 5 == 0:
            pixels.ravel()[: pixels.size // 2] = pixels.ravel()[0]  # many ties
        for q in [(25, 50, 75), (0.5, 99.5), (0, 100)]:
            assert np.array_equal(percentiles(pixels, q), np.percentile(pixels, q)), (trial, q)
    floats = rng.normal(size=(20, 20)).astype(np.float32)
    assert np.array_equal(percentiles(floats, (1, 99)), np.percentile(floats, (1, 99)))


def test_sixteen_bit_data_is_windowed_by_percentiles_not_truncated():
    pre = Preprocessor(image_size=32, **IDENTITY)
    ramp = np.tile(np.linspace(1000, 4000, 64), (64, 1)).astype(np.uint16)  # 12-bit data in 16 bits
    scaled = pre.scale_intensity(ramp)
    assert scaled.min() == 0.0 and scaled.max() == 1.0  # stretched, not left near black at /65535
    assert Preprocessor(image_size=32, intensity="full_range").scale_intensity(ramp).max() < 0.07


def test_dicom_window_is_used(tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    record = read_image(pydicom_data.get_testdata_file("CT_small.dcm"))
    scaled = Preprocessor(image_size=32).scale_intensity(record)
    assert scaled.dtype == np.float32 and scaled.min() >= 0.0 and scaled.max() <= 1.0
    if record.meta.voi_applied:
        low, high = record.meta.value_range
        expected = np.clip((record.pixels.astype(np.float32) - low) / (high - low), 0, 1)
        np.testing.assert_allclose(scaled, expected, atol=1e-6)


def test_clahe_changes_contrast_but_not_shape():
    rng = np.random.default_rng(0)
    image = (rng.random((80, 80)) * 60 + 100).astype(np.uint8)
    plain = Preprocessor(image_size=64, **IDENTITY)(image)
    equalised = Preprocessor(image_size=64, clahe=True, **IDENTITY)(image)
    assert plain.shape == equalised.shape
    assert equalised.std() > plain.std() * 1.5


def test_config_round_trip_and_validation():
    pre = Preprocessor(image_size=128, aspect="letterbox", clahe=True)
    assert Preprocessor.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError, match="aspect"):
        Preprocessor(aspect="crop")
    with pytest.raises(ValueError, match="unknown preprocessing"):
        Preprocessor.from_dict({**pre.to_dict(), "bogus": 1})
