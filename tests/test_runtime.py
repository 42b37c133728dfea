"""The ONNX Runtime runtime (``--runtime``): same results as torch (scores to 1e-4 relative, the same
verdicts, heatmaps close, at input resolution), a graph cached next to the model, reused, and rebuilt
when the model file changes; ``auto`` times both runtimes once per model and CPU, picks the faster and says
so; a detector that cannot export stays on torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from imaging_ad.cli import main  # noqa: E402
from imaging_ad.detectors import create_detector, load_detector  # noqa: E402
from imaging_ad.export import CompiledDetector, build_graph, load_model, with_runtime  # noqa: E402
from imaging_ad.export import compiled as compiled_module  # noqa: E402
from imaging_ad.export.static_padding import count_dynamic_padding  # noqa: E402
from tests.synthetic import make_texture_dataset, paste_defect, texture  # noqa: E402
from tests.tiny_models import one_torch_thread  # noqa: E402

SCORE_RTOL, HEATMAP_RTOL = 1e-4, 1e-3
SMALL = {"image_size": 96, "batch_size": 8, "progress": False, "holdout_fraction": 0.2, "device": "cpu"}
PARITY_DETECTORS = ("patchcore", "padim", "dfm")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    normals = [texture(rng) for _ in range(20)]
    # odd sizes: heatmaps must come back at each image's own resolution
    test = [texture(rng, 90, 120) for _ in range(4)] + [
        paste_defect(texture(rng, 100, 84), rng)[0] for _ in range(4)
    ]
    return normals, test


@pytest.fixture(scope="module", params=PARITY_DETECTORS)
def model_file(request, images, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    return (
        create_detector(request.param, **SMALL).fit(images[0]).save(folder / f"{request.param}.safetensors")
    )


_one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(autouse=True)
def private_user_cache(tmp_path, monkeypatch):
    """Never write the user's real cache."""
    monkeypatch.setenv(compiled_module.CACHE_ENV, str(tmp_path / "user-cache"))


MEASURE = compiled_module.images_per_second


def rates_favouring(runtime: str, calls: list | None = None):
    """A stand-in for ``images_per_second``: 100 img/s for ``runtime``'s ``score_batch``, 10 for the other
    (tiny models on a shared CI core time too close to call)."""

    def fake(score_batch, batch, repeats=2):
        if calls is not None:
            calls.append(score_batch)
        is_onnxruntime = isinstance(getattr(score_batch, "__self__", None), CompiledDetector)
        return 100.0 if is_onnxruntime == (runtime == "onnxruntime") else 10.0

    return fake


@pytest.fixture(autouse=True)
def onnxruntime_measures_faster(monkeypatch):
    monkeypatch.setattr(compiled_module, "images_per_second", rates_favouring("onnxruntime"))


def test_onnxruntime_matches_torch(model_file, images):
    torch_model = load_model(model_file, runtime="torch")
    ort_model = load_model(model_file, runtime="onnxruntime")
    assert isinstance(ort_model, CompiledDetector) and ort_model.runtime_choice.runtime == "onnxruntime"
    assert torch_model.runtime_choice.runtime == "torch"
    # the same thresholds and scale: the calibration is the model file's
    assert ort_model.calibration_ == torch_model.calibration_
    test = images[1]
    want, got = torch_model.predict(test), ort_model.predict(test)
    assert [r.is_anomaly for r in got] == [r.is_anomaly for r in want]
    assert any(r.is_anomaly for r in want) and not all(r.is_anomaly for r in want)  # a real check
    for image, a, b in zip(test, want, got, strict=True):
        assert b.heatmap.shape == a.heatmap.shape == image.shape[:2]
        assert abs(b.score - a.score) <= SCORE_RTOL * abs(a.score)
        assert b.normalized_score == pytest.approx(a.normalized_score, abs=1e-4)
        assert np.abs(b.heatmap - a.heatmap).max() <= HEATMAP_RTOL * np.abs(a.heatmap).max()
        assert b.out_of_domain == a.out_of_domain
        if a.domain_score is not None:
            assert b.domain_score == pytest.approx(a.domain_score, rel=SCORE_RTOL)


def test_cache_is_reused_and_rebuilt_when_the_model_changes(tmp_path, images):
    path = create_detector("padim", **SMALL).fit(images[0]).save(tmp_path / "m.safetensors")
    first = load_model(path, runtime="onnxruntime")
    graph = first.onnx_path
    assert graph.parent == tmp_path / "m.safetensors.ort" and graph.is_file()
    assert "built" in first.runtime_choice.note
    stamp = graph.stat().st_mtime_ns

    second = load_model(path, runtime="onnxruntime")
    assert second.onnx_path == graph and graph.stat().st_mtime_ns == stamp
    assert "cached" in second.runtime_choice.note

    # a different model under the same name: a new graph, the stale one removed
    rng = np.random.default_rng(7)
    create_detector("padim", **SMALL).fit([texture(rng, 80, 80) for _ in range(20)]).save(path)
    third = load_model(path, runtime="onnxruntime")
    assert third.onnx_path != graph and not graph.exists()
    assert sorted(p.name for p in (tmp_path / "m.safetensors.ort").iterdir()) == sorted(
        [third.onnx_path.name, third.onnx_path.name + ".json"]
    )
    torch_scores = [r.score for r in load_model(path, runtime="torch").predict(images[1])]
    ort_scores = [r.score for r in third.predict(images[1])]
    np.testing.assert_allclose(ort_scores, torch_scores, rtol=SCORE_RTOL)


def test_a_damaged_cached_graph_is_rebuilt(tmp_path, images):
    path = create_detector("padim", **SMALL).fit(images[0]).save(tmp_path / "m.safetensors")
    graph = load_model(path, runtime="onnxruntime").onnx_path
    graph.write_bytes(graph.read_bytes()[:1000])  # truncated
    model = load_model(path, runtime="onnxruntime")
    assert model.onnx_path == graph and "built" in model.runtime_choice.note
    assert model.predict(images[1][:1])[0].score > 0


def test_unwritable_model_folder_uses_the_user_cache(tmp_path, images, monkeypatch):
    path = create_detector("padim", **SMALL).fit(images[0]).save(tmp_path / "m.safetensors")
    real = compiled_module._writable_dir
    monkeypatch.setattr(
        compiled_module, "_writable_dir", lambda folder: False if folder.parent == tmp_path else real(folder)
    )
    model = load_model(path, runtime="onnxruntime")
    assert model.onnx_path.parent == tmp_path / "user-cache" / "onnxruntime"
    assert not (tmp_path / "m.safetensors.ort").exists()


def test_auto_says_what_it_chose(tmp_path, images):
    path = create_detector("patchcore", **SMALL).fit(images[0]).save(tmp_path / "p.safetensors")
    model = load_model(path, runtime="auto", device="cpu")
    assert model.runtime_choice.runtime == "onnxruntime"
    assert str(model.runtime_choice).startswith("runtime: onnxruntime")


def test_auto_times_both_runtimes_once_per_cpu_and_picks_the_faster(tmp_path, images, monkeypatch):
    path = create_detector("padim", **SMALL).fit(images[0]).save(tmp_path / "p.safetensors")
    calls: list = []
    monkeypatch.setattr(compiled_module, "images_per_second", rates_favouring("torch", calls))
    model = load_model(path, runtime="auto", device="cpu")
    assert model.runtime_choice.runtime == "torch"
    assert "measured on this CPU: onnxruntime 10.0 img/s, torch 100.0 img/s" in model.runtime_choice.note
    assert len(calls) == 2  # each runtime timed once
    (record,) = (tmp_path / "p.safetensors.ort").glob("*.speed-*.json")
    # the next use reads the record: nothing is timed again
    assert load_model(path, runtime="auto", device="cpu").runtime_choice.runtime == "torch"
    assert len(calls) == 2
    # another CPU (another record key) is timed afresh; there onnxruntime is faster
    monkeypatch.setattr(compiled_module, "cpu_model", lambda: "another CPU")
    monkeypatch.setattr(compiled_module, "images_per_second", rates_favouring("onnxruntime", calls))
    model = load_model(path, runtime="auto", device="cpu")
    assert isinstance(model, CompiledDetector) and "auto: measured" in model.runtime_choice.note
    assert len(calls) == 4 and len(list(record.parent.glob("*.speed-*.json"))) == 2
    # an explicit runtime is never second-guessed
    assert load_model(path, runtime="onnxruntime").runtime_choice.runtime == "onnxruntime"
    monkeypatch.setattr(compiled_module, "images_per_second", rates_favouring("torch"))
    assert isinstance(load_model(path, runtime="onnxruntime"), CompiledDetector)


def test_auto_that_cannot_time_still_scores(tmp_path, images, monkeypatch):
    def broken(score_batch, batch, repeats=2):
        raise RuntimeError("timer broke")

    monkeypatch.setattr(compiled_module, "images_per_second", broken)
    path = create_detector("padim", **SMALL).fit(images[0]).save(tmp_path / "p.safetensors")
    model = load_model(path, runtime="auto", device="cpu")
    assert isinstance(model, CompiledDetector) and "untimed (RuntimeError)" in model.runtime_choice.note
    assert model.predict(images[1][:1])[0].score > 0


def test_auto_measurement_times_real_scoring(tmp_path, images, monkeypatch):
    monkeypatch.setattr(compiled_module, "images_per_second", MEASURE)
    path = create_detector("padim", **SMALL).fit(images[0]).save(tmp_path / "p.safetensors")
    model = load_model(path, runtime="auto", device="cpu")
    (record,) = (tmp_path / "p.safetensors.ort").glob("*.speed-*.json")
    import json

    rates = json.loads(record.read_text())
    assert rates["torch"] > 0 and rates["onnxruntime"] > 0 and rates["threads"] >= 1
    faster = "onnxruntime" if rates["onnxruntime"] >= rates["torch"] else "torch"
    assert model.runtime_choice.runtime == faster


def test_a_detector_that_cannot_export_stays_on_torch(images):
    detector = create_detector("ocsvm", **SMALL).fit(images[0])
    for runtime in ("auto", "onnxruntime"):
        model = with_runtime(detector, runtime)
        assert model is detector and model.runtime_choice.runtime == "torch"
        assert "cannot" in model.runtime_choice.note


def test_in_memory_detector_is_cached_by_content(images):
    detector = create_detector("padim", **SMALL).fit(images[0])
    first = with_runtime(detector, "onnxruntime")
    again = with_runtime(detector, "onnxruntime")
    assert again.onnx_path == first.onnx_path and "cached" in again.runtime_choice.note
    np.testing.assert_allclose(
        [r.score for r in first.predict(images[1])],
        [r.score for r in detector.predict(images[1])],
        rtol=SCORE_RTOL,
    )


def test_export_graph_has_static_padding(images):
    detector = create_detector("padim", **SMALL).fit(images[0])
    assert count_dynamic_padding(detector.feature_module()) > 0  # tf_efficientnet_lite0: tf "same" padding
    graph = build_graph(detector)
    assert count_dynamic_padding(graph.features) == 0
    assert count_dynamic_padding(detector.feature_module()) > 0  # the detector itself is untouched
    import torch

    batch = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        for a, b in zip(graph.features(batch), detector.feature_module()(batch), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_runtime_is_refused(images):
    detector = create_detector("padim", **SMALL).fit(images[0])
    with pytest.raises(ValueError, match="unknown runtime"):
        with_runtime(detector, "tensorrt")


def test_cli_predict_scan_and_evaluate_take_runtime(tmp_path, capsys):
    data = make_texture_dataset(tmp_path / "data", n_train=16, n_good=3, n_bad=3)
    model = create_detector("padim", **SMALL).fit(sorted((data / "train/good").glob("*.png")))
    path = model.save(tmp_path / "m.safetensors")
    test_images = str(data / "test")
    assert (
        main(
            [
                "predict",
                str(path),
                test_images,
                "--runtime",
                "onnxruntime",
                "--json",
                str(tmp_path / "o.json"),
            ]
        )
        == 0
    )
    assert "runtime: onnxruntime" in capsys.readouterr().err
    assert (
        main(["predict", str(path), test_images, "--runtime", "torch", "--json", str(tmp_path / "t.json")])
        == 0
    )
    assert "runtime: torch" in capsys.readouterr().err
    import json

    ort_rows = json.loads((tmp_path / "o.json").read_text())
    torch_rows = json.loads((tmp_path / "t.json").read_text())
    assert [r["verdict"] for r in ort_rows] == [r["verdict"] for r in torch_rows]
    np.testing.assert_allclose(
        [r["score"] for r in ort_rows], [r["score"] for r in torch_rows], rtol=SCORE_RTOL
    )

    assert (
        main(["scan", test_images, "--model", str(path), "--out", str(tmp_path / "scan"), "--no-progress"])
        == 0
    )
    assert "imaging-ad scan: runtime: onnxruntime" in capsys.readouterr().err  # auto is the default
    assert main(["evaluate", str(path), str(data), "--runtime", "auto"]) == 0
    captured = capsys.readouterr()
    assert "runtime: onnxruntime" in captured.err and "image_auroc" in captured.out


def test_loaded_detector_is_unchanged_by_compiling(tmp_path, images):
    path = create_detector("patchcore", **SMALL).fit(images[0]).save(tmp_path / "p.safetensors")
    detector = load_detector(path, device="cpu")
    before = [r.score for r in detector.predict(images[1][:2])]
    compiled = with_runtime(detector, "onnxruntime", model_path=path)
    assert compiled.detector is detector
    assert [r.score for r in detector.predict(images[1][:2])] == before
    shutil.rmtree(tmp_path / "p.safetensors.ort")


def test_int8_check_refuses_moved_scores_and_verdicts():
    from imaging_ad.export.quantize import compare

    fp32 = np.array([1.0, 2.0, 3.0, 4.0])
    assert compare(fp32, fp32 * 1.01, threshold=0.5, n_calibration=4).accepted
    moved = compare(fp32, fp32 * 1.05, threshold=0.5, n_calibration=4)
    assert not moved.accepted and moved.max_relative_score_difference == pytest.approx(0.05)
    # standardised scores of normals sit around zero: a change is weighed against the threshold there
    centred = np.array([-0.5, -0.001, 0.002, 0.4])
    near_zero = compare(centred, centred + 0.01, threshold=3.0, n_calibration=4)
    assert near_zero.accepted and near_zero.max_relative_score_difference == pytest.approx(0.01 / 3.0)
    assert not compare(centred, centred + 0.1, threshold=3.0, n_calibration=4).accepted
    flipped = compare(fp32, fp32 + np.array([0, 0, 0, 0.01]), threshold=4.005, n_calibration=4)
    assert flipped.verdict_changes == 1 and not flipped.accepted


@pytest.mark.slow
def test_int8_is_checked_against_fp32_on_held_out_normals(tmp_path, images):
    from imaging_ad.export.quantize import QuantizationRefused

    path = create_detector("padim", **SMALL).fit(images[0]).save(tmp_path / "m.safetensors")
    detector = load_detector(path, device="cpu")
    fp32 = with_runtime(detector, "onnxruntime", model_path=path)
    try:
        int8 = with_runtime(detector, "onnxruntime", model_path=path, precision="int8", normals=images[0])
    except QuantizationRefused as exc:  # refused: the message has the measured gap, nothing is cached
        assert "moves image scores by up to" in str(exc)
        assert not list((tmp_path / "m.safetensors.ort").glob("*int8*"))
        return
    assert "int8" in int8.runtime_choice.note and int8.onnx_path != fp32.onnx_path
    got = np.array([r.score for r in int8.predict(images[0][1::2])])
    want = np.array([r.score for r in fp32.predict(images[0][1::2])])
    assert np.max(np.abs(got - want) / np.abs(want)) <= 0.02 + 1e-6


def test_int8_needs_normals(images):
    detector = create_detector("padim", **SMALL).fit(images[0])
    with pytest.raises(ValueError, match="normal images"):
        with_runtime(detector, "onnxruntime", precision="int8")


def test_patchcore_with_graph_search_runs_its_backbone_in_onnxruntime(tmp_path, images):
    """A bank searched with HNSW (large banks) stays searched so: only the backbone runs in onnxruntime."""
    path = (
        create_detector("patchcore", **SMALL, search="hnsw").fit(images[0]).save(tmp_path / "h.safetensors")
    )
    torch_model = load_model(path, runtime="torch")
    ort_model = load_model(path, runtime="onnxruntime")
    assert ort_model.features_only and ort_model.onnx_path.name.endswith(".features.onnx")
    assert "HNSW" in ort_model.runtime_choice.note
    want, got = torch_model.predict(images[1]), ort_model.predict(images[1])
    assert [r.is_anomaly for r in got] == [r.is_anomaly for r in want]
    for a, b in zip(want, got, strict=True):
        assert abs(b.score - a.score) <= SCORE_RTOL * abs(a.score)
        assert np.abs(b.heatmap - a.heatmap).max() <= HEATMAP_RTOL * np.abs(a.heatmap).max()
    assert "cached" in load_model(path, runtime="onnxruntime").runtime_choice.note
