"""Exported models (ONNX, TorchScript) reproduce their checkpoint: scores to 1e-4 relative, heatmaps to
1e-3 of their maximum, on synthetic textures always and on the shared datasets when present; the ONNX
runtime works with torch unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imaging_ad import read_image
from imaging_ad.cli import main
from imaging_ad.data import discover_dataset
from imaging_ad.detectors import DETECTORS, create_detector, load_detector
from imaging_ad.detectors.trained import TrainedDetector
from imaging_ad.export import (
    EXPORT_FORMATS,
    ExportedModelError,
    ExportError,
    build_graph,
    export_model,
    exportable_detectors,
    load_exported,
)
from imaging_ad.export.sidecar import sidecar_path
from imaging_ad.io.checksum import file_sha256
from tests.synthetic import make_texture_dataset, paste_defect, texture
from tests.test_detectors import FAST

ROOT = Path(__file__).resolve().parents[1]
SCORE_RTOL, HEATMAP_RTOL = 1e-4, 1e-3
#: every detector whose head is a fixed tensor graph: all but the two holding scikit-learn models
EXPORTABLE = tuple(sorted(set(DETECTORS) - {"ocsvm", "iforest"}))
#: trained detectors train briefly here: export parity does not depend on how well they learnt
SHORT_TRAINING = {"epochs": 2}


def assert_parity(exported: list, reference: list, what: str) -> tuple[float, float]:
    """Same verdicts, scores within SCORE_RTOL relative, heatmaps within HEATMAP_RTOL of their maximum."""
    assert len(exported) == len(reference)
    score_diff = heatmap_diff = 0.0
    for got, want in zip(exported, reference, strict=True):
        assert got.heatmap.shape == want.heatmap.shape and got.heatmap.dtype == np.float32
        score_diff = max(score_diff, abs(got.score - want.score) / abs(want.score))
        heatmap_diff = max(
            heatmap_diff, float(np.abs(got.heatmap - want.heatmap).max() / np.abs(want.heatmap).max())
        )
        assert got.normalized_score == pytest.approx(want.normalized_score, abs=1e-4)
    assert score_diff <= SCORE_RTOL, f"{what}: scores differ by {score_diff:.2e} relative"
    assert heatmap_diff <= HEATMAP_RTOL, f"{what}: heatmaps differ by {heatmap_diff:.2e} of their maximum"
    return score_diff, heatmap_diff


# -- synthetic parity: every exportable detector, every format --------------------------------------


@pytest.fixture(scope="module")
def textures():
    rng = np.random.default_rng(0)
    normals = [texture(rng) for _ in range(30)]
    test = [texture(rng, 90, 120) for _ in range(3)] + [
        paste_defect(texture(rng, 90, 120), rng)[0] for _ in range(3)
    ]
    return normals, test


@pytest.fixture(scope="module", params=EXPORTABLE)
def fitted(request, textures):
    trained = issubclass(DETECTORS[request.param], TrainedDetector)
    return create_detector(request.param, **FAST, **(SHORT_TRAINING if trained else {})).fit(textures[0])


def test_every_exportable_detector_is_covered():
    assert set(exportable_detectors()) == set(EXPORTABLE)


@pytest.mark.parametrize("format", EXPORT_FORMATS)
def test_export_reproduces_checkpoint_on_synthetic_images(fitted, textures, format, tmp_path):
    _, test = textures
    files = export_model(fitted, tmp_path / "model", format)
    assert files.model.is_file() and files.model.suffix in (".onnx", ".pt")
    assert files.sidecar == sidecar_path(files.model)
    assert files.verification["max_score_relative_difference"] <= SCORE_RTOL
    side = json.loads(files.sidecar.read_text())
    assert side["format"] == "imaging_ad.export" and side["model_format"] == format
    assert side["detector"] == fitted.name and side["model_file"] == files.model.name
    assert side["model_sha256"] == file_sha256(files.model)
    assert side["preprocessing"] == json.loads(json.dumps(fitted.preprocessor_.to_dict()))
    assert side["calibration"] == fitted.calibration_.to_dict()
    assert side["backbone"]["name"] == fitted.backbone
    assert side["graph"]["input"]["shape"] == ["batch", 3, 128, 128]
    kernel = int(round(8 * fitted.blur_sigma + 1)) | 1  # as cv2 sizes it: 33 for the default blur_sigma 4
    assert side["graph"]["heatmap_smoothing"]["gaussian_kernel_size"] == kernel
    assert side["verification"] == files.verification
    assert {"imaging_ad", "torch", "timm"} <= set(side["versions"])

    model = load_exported(files.model, device="cpu")
    assert_parity(model.predict(test), fitted.predict(test), f"{fitted.name}/{format}")
    for batch in (1, 5):  # the batch axis stays free
        scores, heatmaps, _ = model.score_batch(model.preprocessor_.batch(test[:batch]))
        assert scores.shape == (batch,) and heatmaps.shape == (batch, 128, 128)


def test_patchcore_with_graph_search_keeps_exact_image_scores(textures, tmp_path):
    """HNSW can only overestimate distances; PatchCore recomputes the top patches exactly, so its image
    scores equal the exported model's exact search, while its other heatmap cells may not. Nine held-out
    normals here, enough for per-position statistics: the exported graph standardises as the checkpoint."""
    normals, test = textures
    settings = {**FAST, "holdout_fraction": 0.3}
    detector = create_detector("patchcore", **settings, search="hnsw", hnsw_ef_search=1).fit(normals)
    assert detector.position_mean_ is not None
    files = export_model(detector, tmp_path / "hnsw.onnx", "onnx")
    side = json.loads(files.sidecar.read_text())
    assert side["graph"]["checkpoint_search"].startswith("approximate: faiss HNSW")
    assert side["graph"]["nearest_neighbour_search"].startswith("exact")
    exported = load_exported(files.model).predict(test)
    approximate = detector.predict(test)
    for got, want in zip(exported, approximate, strict=True):
        assert got.score == pytest.approx(want.score, rel=SCORE_RTOL)
    detector.head_ = detector.head_.without_graph_search()
    exact = detector.predict(test)
    assert_parity(exported, exact, "patchcore exact search")
    # the graph search did miss neighbours here (faiss' HNSW is deterministic), so the heatmaps differ
    assert any(
        not np.allclose(a.heatmap, e.heatmap, atol=1e-3) for a, e in zip(approximate, exact, strict=True)
    )


@pytest.mark.parametrize("name", sorted(set(DETECTORS) - set(EXPORTABLE)))
def test_detectors_without_exportable_head_are_refused_clearly(name):
    with pytest.raises(ExportError, match=f"detector '{name}' cannot be exported"):
        build_graph(create_detector(name))
    with pytest.raises(ExportError, match=f"detector 'ensemble' cannot be exported.*{name}"):
        build_graph(create_detector("ensemble", members=["patchcore", name]))


def test_unknown_export_format_is_refused_clearly():
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(create_detector("patchcore"), "x", "tflite")


# -- command line and the torch-free runtime ---------------------------------------------------------


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory):
    return make_texture_dataset(tmp_path_factory.mktemp("tiles"), n_train=24, n_good=3, n_bad=3)


@pytest.fixture(scope="module")
def cli_models(tile_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    checkpoint = out / "tiles.safetensors"
    fit = [
        "fit",
        str(tile_folder),
        "--image-size",
        "96",
        "--param",
        "holdout_fraction=0.2",
        "--param",
        "progress=false",
    ]
    assert main([*fit, "--out", str(checkpoint)]) == 0
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out / "tiles.onnx")]) == 0
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(out / "tiles.pt")]) == 0
    return checkpoint, out / "tiles.onnx", out / "tiles.pt"


def _predict_rows(model: Path, inputs: list[Path], out: Path) -> list[dict]:
    assert main(["predict", str(model), *map(str, inputs), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_cli_predict_accepts_exported_models(cli_models, tile_folder, tmp_path):
    checkpoint, onnx_file, torchscript_file = cli_models
    inputs = [tile_folder / "test" / "good", tile_folder / "test" / "defect"]
    reference = _predict_rows(checkpoint, inputs, tmp_path / "ckpt.json")
    for model in (onnx_file, torchscript_file):
        rows = _predict_rows(model, inputs, tmp_path / f"{model.suffix}.json")
        assert [r["path"] for r in rows] == [r["path"] for r in reference]
        assert set(rows[0]) == set(reference[0])
        for got, want in zip(rows, reference, strict=True):
            assert got["score"] == pytest.approx(want["score"], rel=SCORE_RTOL)
            assert got["is_anomaly"] == want["is_anomaly"] and got["threshold"] == want["threshold"]


def test_changed_or_orphaned_exports_are_refused(cli_models, tmp_path):
    _, onnx_file, _ = cli_models
    tampered = tmp_path / "tampered.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    sidecar_path(tampered).write_text(sidecar_path(onnx_file).read_text())
    with pytest.raises(ExportedModelError, match="checksum"):
        load_exported(tampered)
    sidecar_path(tampered).unlink()
    with pytest.raises(ExportedModelError, match="sidecar"):
        load_exported(tampered)
    assert main(["predict", str(tampered), str(tmp_path)]) == 1  # a clear error, not a traceback


_BLOCK_TORCH = """
import importlib.abc, json, sys
BLOCKED = {"torch", "torchvision", "timm", "albumentations", "faiss", "sklearn"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
from imaging_ad.export.runtime import load_exported
results = load_exported(sys.argv[1]).predict(sys.argv[2:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"scores": [r.score for r in results], "shapes": [r.heatmap.shape for r in results],
                  "heatmap_sums": [float(r.heatmap.sum()) for r in results], "loaded": loaded}))
"""


def test_onnx_runtime_needs_no_torch(cli_models, tile_folder):
    checkpoint, onnx_file, _ = cli_models
    images = sorted((tile_folder / "test" / "defect").glob("*.png")) + sorted(
        (tile_folder / "test" / "good").glob("*.png")
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, str(onnx_file), *map(str, images)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["loaded"] == []
    reference = load_exported(onnx_file).predict(images)  # in this process, for the heatmaps
    expected = [r.score for r in load_detector(checkpoint, device="cpu").predict(images)]
    np.testing.assert_allclose(child["scores"], expected, rtol=SCORE_RTOL)
    assert [tuple(s) for s in child["shapes"]] == [r.heatmap.shape for r in reference]
    np.testing.assert_allclose(child["heatmap_sums"], [float(r.heatmap.sum()) for r in reference], rtol=1e-6)


# -- the shared datasets ------------------------------------------------------------------------------

N_TEST, N_TRAIN = 40, 16


def _spread(items: list, n: int) -> list:
    """n items evenly spread over a list sorted by class folder, so every class is represented."""
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, min(n, len(items)))]


@pytest.fixture(scope="module", params=["magnetic_tile", "chest_xray"])
def shared_dataset(request, shared_data):
    dataset = discover_dataset(shared_data / request.param)
    train = _spread(dataset.train, N_TRAIN)
    test = [read_image(s.path) for s in _spread(dataset.test, N_TEST)]  # read once, scored many times
    return request.param, train, test


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["dfm", "padim", "patchcore"])
def test_export_reproduces_checkpoint_on_shared_data(shared_dataset, name, tmp_path):
    dataset, train, test = shared_dataset
    # default settings; one batch for all 40 images keeps the test short
    detector = create_detector(name, progress=False, holdout_fraction=0.2, batch_size=N_TEST).fit(train)
    reference = detector.predict(test)
    figures = {}
    for format in EXPORT_FORMATS:
        # verify=False: the export's own check on noise is replaced by the real images below
        files = export_model(detector, tmp_path / f"{name}-{format}", format, verify=False)
        exported = load_exported(files.model, device="cpu").predict(test)
        figures[format] = assert_parity(exported, reference, f"{dataset}/{name}/{format}")
    print(f"{dataset} {name}: max relative score / heatmap differences {figures}")
