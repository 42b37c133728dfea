"""The command line end to end on a small generated dataset: dataset, fit, evaluate, predict, info."""

from __future__ import annotations

import json

import pytest

from imaging_ad.cli import main
from tests.synthetic import make_texture_dataset


@pytest.fixture(scope="module")
def texture_data(tmp_path_factory):
    return make_texture_dataset(tmp_path_factory.mktemp("tiles"), n_train=24, n_good=6, n_bad=6)


@pytest.fixture(scope="module")
def model(texture_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiles.safetensors"
    code = main(
        [
            "fit",
            str(texture_data),
            "--detector",
            "patchcore",
            "--image-size",
            "96",
            "--param",
            "holdout_fraction=0.2",
            "--param",
            "progress=false",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.is_file()
    return out


def test_dataset_command(texture_data, capsys):
    assert main(["dataset", str(texture_data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["masks"] == 6


def test_evaluate_writes_metrics_and_plots(model, texture_data, tmp_path, capsys):
    metrics, plots = tmp_path / "m.json", tmp_path / "plots"
    assert (
        main(["evaluate", str(model), str(texture_data), "--json", str(metrics), "--plots", str(plots)]) == 0
    )
    report = json.loads(metrics.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "images_per_second"):
        assert key in report
    assert report["image_auroc"] == 1.0 and report["pixel_auroc"] > 0.9
    assert (plots / "roc_curve.png").is_file() and list((plots / "examples").glob("*.png"))


def test_predict_json_heatmaps_and_bad_files(model, texture_data, tmp_path):
    bad = tmp_path / "inputs"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    out = tmp_path / "r.json"
    code = main(
        [
            "predict",
            str(model),
            str(texture_data / "test" / "defect"),
            str(bad / "empty.png"),
            "--json",
            str(out),
            "--heatmaps",
            str(tmp_path / "h"),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    good_rows = [r for r in rows if "error" not in r]
    assert len(good_rows) == 6 and all(r["is_anomaly"] for r in good_rows)
    assert {"path", "score", "normalized_score", "is_anomaly"} <= set(good_rows[0])
    assert [r for r in rows if "error" in r][0]["path"].endswith("empty.png")
    assert len(list((tmp_path / "h").glob("*.png"))) == 6


def test_info_and_clear_errors(texture_data, tmp_path, capsys):
    image = next((texture_data / "train" / "good").iterdir())
    assert main(["info", str(image)]) == 0
    assert "PNG" in capsys.readouterr().out
    assert main(["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("detector", ["feature_ae", "feature_vae", "image_ae", "ganomaly"])
def test_trained_detectors_fit_and_evaluate_through_the_cli(detector, texture_data, tmp_path):
    out, metrics = tmp_path / f"{detector}.safetensors", tmp_path / "m.json"
    fit = ["fit", str(texture_data), "--detector", detector, "--image-size", "64", "--out", str(out)]
    for param in ("holdout_fraction=0.2", "progress=false", "epochs=3", "augment=flip", "augmented_copies=1"):
        fit += ["--param", param]
    assert main(fit) == 0 and out.is_file()
    assert main(["evaluate", str(out), str(texture_data), "--json", str(metrics)]) == 0
    report = json.loads(metrics.read_text())
    assert report["detector"] == detector and report["pixel_auroc"] is not None
