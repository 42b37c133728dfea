"""Fitting PaDiM and DFM on a local Ray (2 CPUs): the same statistics, thresholds and scores as one machine."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from imaging_ad.detectors import create_detector  # noqa: E402
from imaging_ad.detectors.ray_fit import fit_on_ray  # noqa: E402
from tests.synthetic import paste_defect, texture  # noqa: E402

PARAMS = {"image_size": 96, "batch_size": 8, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread, as each 1-CPU Ray task has: the backbone's sums then run in the same order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    train = [texture(rng) for _ in range(21)]
    test = [texture(rng) for _ in range(4)] + [paste_defect(texture(rng), rng)[0] for _ in range(4)]
    return train, test


@pytest.mark.slow  # two fits each, about 40 s on 2 busy cores
@pytest.mark.parametrize("name", ["padim", "dfm"])
def test_ray_fit_equals_one_machine_fit(name, images):
    train, test = images
    local = create_detector(name, **PARAMS).fit(train)
    remote = fit_on_ray(create_detector(name, **PARAMS), train, workers=2)
    for key, value in local._state().items():
        other = remote._state()[key]
        if value.is_floating_point():
            torch_close(other, value, key)
        else:
            assert (other == value).all(), key
    a, b = local.calibration_, remote.calibration_
    assert np.isclose(a.image_threshold, b.image_threshold, rtol=1e-5)
    assert np.isclose(a.pixel_threshold, b.pixel_threshold, rtol=1e-5)
    assert np.isclose(a.domain_threshold, b.domain_threshold, rtol=1e-5)
    assert b.method == a.method and "2 Ray workers" in b.source
    torch_close(remote.domain_guard_.reference, local.domain_guard_.reference, "guard")
    scores = np.array([r.score for r in local.predict(test)])
    assert np.allclose([r.score for r in remote.predict(test)], scores, rtol=1e-5)


def torch_close(actual, expected, what: str) -> None:
    import torch

    # float tolerance relative to the tensor's scale: sums split in two are rounded differently
    scale = float(expected.double().abs().max())
    assert torch.allclose(actual.double(), expected.double(), rtol=1e-5, atol=1e-6 * scale), what


def test_detectors_that_are_not_sums_are_refused(images):
    with pytest.raises(ValueError, match="cannot be fitted on a cluster"):
        fit_on_ray(create_detector("patchcore", **PARAMS), images[0])


@pytest.mark.slow
def test_cli_fit_engine_ray(images, tmp_path, capsys):
    import cv2

    from imaging_ad.cli import main
    from imaging_ad.detectors import load_detector

    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for i, image in enumerate(images[0][:12]):
        cv2.imwrite(str(good / f"{i:03d}.png"), image)
    out = tmp_path / "dfm.safetensors"
    args = ["fit", str(tmp_path / "data"), "--detector", "dfm", "--image-size", "96", "--out", str(out)]
    assert main([*args, "--engine", "ray", "--workers", "2", "--device", "cpu"]) == 0
    assert "12 training normals (fitted on 2 Ray workers)" in load_detector(out).calibration_.source
    assert main([*args[:2], "--detector", "patchcore", "--out", str(out), "--engine", "ray"]) == 1
    assert "not patchcore" in capsys.readouterr().err
