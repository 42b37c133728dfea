"""Fitting on a local Ray (2 CPUs): PaDiM and DFM give the same statistics, thresholds and scores as one
machine; PatchCore's two-level coreset keeps each bank row's image and calibrates cross-fitted."""

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


def test_detectors_that_cannot_be_split_are_refused(images):
    with pytest.raises(ValueError, match="cannot be fitted on a cluster"):
        fit_on_ray(create_detector("iforest", **PARAMS), images[0])
    with pytest.raises(ValueError, match="coreset_oversampling"):
        fit_on_ray(create_detector("patchcore", **PARAMS, coreset_oversampling=0.5), images[0])


@pytest.mark.slow  # about 35 s on 2 busy cores, with the local Ray
def test_patchcore_two_level_coreset_on_ray(images):
    """The bank's rows are real patches of the images their sources name, of the one-machine size; the
    calibration equals the driver's own recomputation from the same bank; defects stand out."""
    import torch

    from imaging_ad.detectors.patchcore import PatchCore

    train, test = images
    kept = {}
    original = PatchCore.release_fit_state

    def keep_sources(self):  # the driver drops the rows' sources at the end of the fit; keep a copy
        kept["sources"] = self._bank_sources.clone()
        original(self)

    params = {**PARAMS, "search": "flat", "coreset_ratio": 0.25, "coreset_oversampling": 2}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PatchCore, "release_fit_state", keep_sources)
        remote = fit_on_ray(create_detector("patchcore", **params), train, workers=2)
    bank, sources = remote.memory_bank_, kept["sources"]
    features = [f for f, _ in remote.extracted_batches(train, "features")]
    rows = torch.cat([remote.patch_rows(f)[0] for f in features])
    patches = rows.shape[0] // len(train)
    assert bank.shape[0] == remote.memory_bank_rows(len(train) * patches) == sources.shape[0]
    assert set(sources.tolist()) == set(range(len(train)))  # both shards gave rows, from every image here
    own = rows.reshape(len(train), patches, -1)[sources]  # (N, P, D): each row's source image's patches
    assert float((own - bank[:, None]).norm(dim=2).min(dim=1).values.max()) < 1e-4

    # the driver's recomputation: each training image against the bank without its own rows, one process
    evidence, sizes, position = [], [], 0
    remote._bank_sources = sources
    for f, batch in remote.extracted_batches(train, "calibrate"):
        evidence.append(remote.cross_fitted_evidence(f, list(range(position, position + len(batch)))))
        sizes += [entry.size for entry in batch]
        position += len(batch)
    mean, std = remote.position_mean_.clone(), remote.position_std_.clone()
    names = [f"training image {i}" for i in range(len(train))]
    again = remote.cross_fitted_calibration(evidence, sizes, names, "driver")
    assert np.isclose(again.image_threshold, remote.calibration_.image_threshold, rtol=1e-5)
    assert np.isclose(again.pixel_threshold, remote.calibration_.pixel_threshold, rtol=1e-5)
    assert torch.allclose(remote.position_mean_, mean, rtol=1e-5) and torch.allclose(
        remote.position_std_, std
    )
    assert remote.calibration_.method.startswith("cross-fitted (leave-one-out")
    assert "2 Ray workers" in remote.calibration_.source and remote.domain_guard_ is not None
    assert remote.domain_guard_.reference.shape[0] == len(train)

    scores = [r.score for r in remote.predict(test)]
    assert min(scores[4:]) > max(scores[:4])  # every defect above every normal test image


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
    assert main([*args[:2], "--detector", "iforest", "--out", str(out), "--engine", "ray"]) == 1
    assert "not iforest" in capsys.readouterr().err
