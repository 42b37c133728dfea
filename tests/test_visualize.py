"""Visualisation: colour mapping, overlays on 8/16-bit/float images, contours and PNG output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from imaging_ad.visualize import contour_mask, heatmap_to_color, overlay, save_png, to_display_rgb

JET_RGB = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_JET)[0][:, ::-1]


def _gaussian(shape, center, sigma=5.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma**2))


def test_heatmap_to_color_is_rgb_with_min_blue_and_max_red():
    heat = np.linspace(-3, 7, 40 * 50).reshape(40, 50)
    rgb = heatmap_to_color(heat)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], JET_RGB[0])  # dark blue, in RGB order
    np.testing.assert_array_equal(rgb[-1, -1], JET_RGB[255])  # dark red
    assert rgb[-1, -1, 0] > 0 and rgb[-1, -1, 2] == 0


def test_heatmap_to_color_window_clips_and_flat_input_is_safe():
    heat = np.array([[0.0, 0.5, 1.0, 2.0]])
    rgb = heatmap_to_color(heat, vmin=0.0, vmax=1.0)
    np.testing.assert_array_equal(rgb[0, 2], rgb[0, 3])  # 2.0 clipped to vmax
    flat = heatmap_to_color(np.full((3, 3), 4.2))
    assert (flat == JET_RGB[0]).all()
    with_nan = heatmap_to_color(np.array([[np.nan, 0.0, 1.0]]))
    np.testing.assert_array_equal(with_nan[0, 0], JET_RGB[0])


@pytest.mark.parametrize(
    "image",
    [
        np.full((48, 64), 120, np.uint8),
        np.linspace(0, 4095, 48 * 64).reshape(48, 64).astype(np.uint16),  # 12-bit radiograph
        np.random.default_rng(0).random((48, 64, 3)),  # float RGB in [0, 1]
        np.random.default_rng(0).normal(100, 30, (48, 64)).astype(np.float32),  # e.g. CT values
    ],
    ids=["uint8", "uint16", "float01-rgb", "float-any"],
)
def test_overlay_shape_dtype_and_peak_is_reddest(image):
    heat = _gaussian((48, 64), (30, 20))
    out = overlay(image, heat, alpha=0.6)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    # JET is darkest red at its top and brightest red just below it, so the reddest pixel sits on
    # or right next to the peak; anything far from the peak is blue-dominated.
    redness = out[..., 0].astype(int) - out[..., 1:].max(axis=-1)
    r, c = np.unravel_index(np.argmax(redness), redness.shape)
    assert np.hypot(r - 30, c - 20) <= 4
    assert redness[30, 20] > 0
    assert out[2, 60, 2] > out[2, 60, 0]  # far corner: blue > red


def test_overlay_resizes_a_smaller_heatmap_to_the_image():
    image = np.zeros((100, 200), np.uint8)
    heat = _gaussian((25, 50), (5, 40), sigma=2)  # quarter resolution
    out = overlay(image, heat, alpha=1.0)
    assert out.shape == (100, 200, 3)
    redness = out[..., 0].astype(int) - out[..., 1:].max(axis=-1)
    r, c = np.unravel_index(np.argmax(redness), redness.shape)
    assert abs(r - 21) <= 8 and abs(c - 161) <= 8  # peak at (5, 40) * 4 plus half-pixel offset


def test_overlay_alpha_extremes():
    image = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    heat = np.random.default_rng(2).random((20, 30))
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), np.repeat(image[..., None], 3, axis=-1))
    np.testing.assert_array_equal(overlay(image, heat, alpha=1.0), heatmap_to_color(heat))
    with pytest.raises(ValueError):
        overlay(image, heat, alpha=1.5)


def test_to_display_rgb_scaling():
    ramp16 = np.linspace(0, 4095, 1000).reshape(20, 50).astype(np.uint16)
    out = to_display_rgb(ramp16)
    assert out.shape == (20, 50, 3) and out.min() == 0 and out.max() == 255  # 12-bit stretched to 8
    np.testing.assert_array_equal(to_display_rgb(np.array([[0.0, 0.5, 1.0]]))[0, :, 0], [0, 128, 255])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    assert to_display_rgb(rgba).shape == (2, 2, 3) and (to_display_rgb(rgba)[..., 0] == 200).all()
    with pytest.raises(ValueError):
        to_display_rgb(np.zeros((2, 2, 2)))


def test_contour_mask_draws_outline_only_and_keeps_input():
    image = np.full((40, 40, 3), 50, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    out = contour_mask(image, mask, color=(255, 0, 0))
    assert (image == 50).all()  # input untouched
    np.testing.assert_array_equal(out[10, 20], [255, 0, 0])  # on the boundary, in RGB order
    np.testing.assert_array_equal(out[20, 20], [50, 50, 50])  # interior unchanged
    np.testing.assert_array_equal(out[2, 2], [50, 50, 50])
    small = contour_mask(image, mask[::2, ::2], color=(0, 0, 255))  # resized mask
    np.testing.assert_array_equal(small[10, 20], [0, 0, 255])


def test_save_png_round_trip_creates_parents(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: would come back blue if the BGR conversion were missing
    path = save_png(tmp_path / "a" / "b" / "red.png", rgb)
    assert path.is_file()
    back = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(
        cv2.imread(str(save_png(tmp_path / "g.png", gray)), cv2.IMREAD_UNCHANGED), gray
    )
    with pytest.raises(ValueError):
        save_png(tmp_path / "f.png", rgb.astype(np.float32))


def test_one_heatmap_value_gets_one_colour_in_every_output(tmp_path):
    """Predict overlays, scan overlays, evaluation examples and the demo draw a model's heatmaps on its one
    colour scale (the calibrated pixel threshold to the model's upper reference), with its colour bar: the
    same image gives the same picture everywhere, and a value's colour is the scale's."""
    import warnings

    from imaging_ad.app.config import DemoConfig
    from imaging_ad.app.service import DemoService
    from imaging_ad.cli import main
    from imaging_ad.data import discover_dataset
    from imaging_ad.detectors import create_detector
    from imaging_ad.evaluation import evaluate, save_plots
    from imaging_ad.scan import scan
    from imaging_ad.visualize import ColourScale, colour_bar
    from tests.synthetic import make_texture_dataset

    data = make_texture_dataset(tmp_path / "data", n_train=16, n_good=1, n_bad=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16 normals cannot support 1 %: known and warned elsewhere
        detector = create_detector("padim", image_size=64, batch_size=8, progress=False).fit(
            discover_dataset(data).train
        )
    model = detector.save(tmp_path / "allowed" / "model.safetensors")
    image = data / "test" / "good" / "000.png"
    scale = ColourScale.of(detector.calibration_)
    assert scale.low == detector.calibration_.pixel_threshold and scale.high > scale.low

    assert (
        main(["predict", str(model), str(image), "--heatmaps", str(tmp_path / "predict"), "--device", "cpu"])
        == 0
    )
    predicted = next((tmp_path / "predict").glob("*.png"))
    scan(data / "test" / "good", model, tmp_path / "scan", heatmaps="all", device="cpu")
    scanned = next((tmp_path / "scan" / "heatmaps").glob("000*.png"))
    evaluation = evaluate(detector, discover_dataset(data))
    save_plots(evaluation, discover_dataset(data), tmp_path / "plots")
    examples = sorted((tmp_path / "plots" / "examples").glob("*_good_*.png"))
    service = DemoService(
        DemoConfig(data_dir=tmp_path / "demo", allowed_roots=[tmp_path / "allowed"], device="cpu")
    )
    inspected = service.inspect(image, model_path=str(model))
    demo_overlay = service.store.item(inspected.item_id).overlay_path

    pictures = [cv2.imread(str(p))[..., ::-1] for p in (predicted, scanned, examples[0], demo_overlay)]
    for picture in pictures[1:]:
        np.testing.assert_array_equal(picture, pictures[0])
    height, width = cv2.imread(str(image)).shape[:2]
    assert pictures[0].shape[:2] == (height, width + colour_bar(height, scale).shape[1])  # the bar beside
    np.testing.assert_array_equal(pictures[0][:, width:], colour_bar(height, scale))
    # a value of the heatmap, its colour on the scale, blended half and half over the image
    heatmap = detector.predict([str(image)])[0].heatmap
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    expected = heatmap_to_color(heatmap[y : y + 1, x : x + 1], vmin=scale.low, vmax=scale.high)[0, 0]
    grey = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)[y, x]
    np.testing.assert_allclose(pictures[0][y, x], 0.5 * expected + 0.5 * grey, atol=1.5)
