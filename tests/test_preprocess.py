"""Preprocessing: whole image kept, 16-bit windowing explicit, geometry invertible, config round-trips,
and the same numbers as the albumentations transforms it replaced for inference."""

from __future__ import annotations

from itertools import product

import albumentations as A
import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from imaging_ad import create_backbone, read_image
from imaging_ad.intensity import percentiles
from imaging_ad.preprocess import INTERPOLATIONS, Preprocessor

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
    np.testing.assert_allclose(tensor, 1.0, atol=1e-5)  # (1 - 0.5) / 0.5


@pytest.mark.parametrize("size", [40, 64])
def test_grayscale_stored_as_rgb_takes_the_one_channel_path(size):
    """Grayscale stored as three equal channels (X-rays) is processed as one channel: the same numbers as
    the gray image, and as a colour image whose channels differ by nothing but OpenCV's rounding."""
    gray = np.random.default_rng(2).integers(0, 256, (40, 40), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    pre = Preprocessor(image_size=size)
    shortcut = pre(rgb)
    assert shortcut.flags.c_contiguous and shortcut.shape == (3, size, size)
    assert np.array_equal(shortcut, pre(gray))
    nearly_gray = rgb.copy()
    nearly_gray[0, 0, 1] ^= 1  # one channel differs in one pixel: the general path
    general = pre(nearly_gray)
    np.testing.assert_allclose(
        shortcut[:, 1:, 1:], general[:, 1:, 1:], rtol=0, atol=1e-6 if size == 40 else 2e-2
    )


def _inputs() -> dict:
    rng = np.random.default_rng(0)
    return {
        "uint8 gray": (rng.random((90, 120)) * 255).astype(np.uint8),
        "12-bit in uint16": (rng.random((300, 200)) * 3000 + 1000).astype(np.uint16),
        "uint8 RGB": (rng.random((70, 50, 3)) * 255).astype(np.uint8),
        "uint8 gray as RGB": np.repeat((rng.random((70, 50, 1)) * 255).astype(np.uint8), 3, axis=2),
        "float in [0, 1]": rng.random((64, 64)).astype(np.float32),
        "float, wide": (rng.random((40, 500)) * 7).astype(np.float32),
        "gray HxWx1": (rng.random((64, 64, 1)) * 255).astype(np.uint8),
        "CT DICOM": read_image(get_testdata_file("CT_small.dcm")),
        "MR DICOM": read_image(get_testdata_file("MR_small.dcm")),
    }


def _albumentations_reference(pre: Preprocessor, image) -> np.ndarray:
    """The albumentations 2.0 transforms inference used before it moved to NumPy/OpenCV alone."""
    scaled = pre.scale_intensity(image)
    if scaled.ndim == 3 and scaled.shape[2] == 1:
        scaled = scaled[..., 0]
    if pre.clahe:
        clahe = A.CLAHE(clip_limit=(pre.clahe_clip_limit,) * 2, tile_grid_size=(8, 8), p=1.0)
        scaled = clahe(image=np.round(scaled * 255).astype(np.uint8))["image"].astype(np.float32) / 255
    interpolation = INTERPOLATIONS[pre.interpolation]
    size = pre.image_size
    geometry = (
        [A.Resize(size, size, interpolation=interpolation, area_for_downscale="image")]
        if pre.aspect == "stretch"
        else [
            A.LongestMaxSize(max_size=size, interpolation=interpolation, area_for_downscale="image"),
            A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0),
        ]
    )
    out = A.Compose([*geometry, A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=1.0)])(
        image=scaled if scaled.ndim == 3 else np.repeat(scaled[..., None], 3, axis=2)
    )["image"]
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize(
    "aspect, intensity, clahe, interpolation",
    [
        *product(
            ["stretch", "letterbox"],
            ["auto", "robust", "percentile", "full_range"],
            [False, True],
            ["bicubic"],
        )
    ]
    + [("stretch", "auto", False, "bilinear"), ("letterbox", "robust", True, "nearest")],
)
def test_same_numbers_as_the_albumentations_transforms(aspect, intensity, clahe, interpolation):
    for size in (64, 128):  # below and above the inputs' sizes: INTER_AREA and interpolation both used
        pre = Preprocessor(
            image_size=size,
            aspect=aspect,
            intensity=intensity,
            clahe=clahe,
            interpolation=interpolation,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        )
        for name, image in _inputs().items():
            got = pre(image)
            expected = _albumentations_reference(pre, image)
            assert got.dtype == np.float32 and got.shape == expected.shape, name
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


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
