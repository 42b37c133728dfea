"""The command line end to end on a small generated dataset: dataset, fit, evaluate, predict, info."""

from __future__ import annotations

import json

import pytest

from imaging_ad.cli import main
from tests.synthetic import make_texture_dataset


@pytest.fixture(scope="module")
def texture_data(tmp_path_factory):
    return make_texture_dataset(tmp_path_factory.mktemp("tiles"), n_train=24, n_good=6, n_bad=6)


def test_fit_help_recommends_patchcore_and_lists_image_ae_for_comparison_with_its_reason(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    recommended, _, comparison = help_text.partition("for comparison only")
    recommended = recommended.split("recommended detectors:", 1)[1]
    assert "patchcore" in recommended and "image_ae" not in recommended
    image_ae_line = next(line for line in comparison.splitlines() if line.strip().startswith("image_ae:"))
    assert "AUROC" in image_ae_line  # the measured reason, not just the name
    assert "patchcore" not in comparison.split("image_ae:", 1)[0]


def test_list_detectors_filters_on_recommended():
    from imaging_ad.detectors import DETECTORS, list_detectors

    assert list_detectors() == sorted(DETECTORS)
    assert "patchcore" in list_detectors(recommended=True)
    assert {"image_ae", "feature_ae", "feature_vae", "ganomaly"} <= set(list_detectors(recommended=False))
    assert sorted(list_detectors(recommended=True) + list_detectors(recommended=False)) == list_detectors()


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
            "--allow-errors",
        ]
    )
    assert code == 0  # --allow-errors: a bad file is a row, not a failure of the run
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


# --- the first hour of a new user: mistakes caught before any work, explicit folders, exit codes -----


def write_png(path, image) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


@pytest.fixture(scope="module")
def yes_no_data(tmp_path_factory):
    """A brain-MRI-like layout: ``no/`` (normal textures) and ``yes/`` (textures with a defect)."""
    import numpy as np

    from tests.synthetic import paste_defect, texture

    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("brain")
    for i in range(14):
        write_png(root / "no" / f"n{i:02d}.png", texture(rng))
    for i in range(4):
        write_png(root / "yes" / f"y{i:02d}.png", paste_defect(texture(rng), rng)[0])
    return root


def test_fit_refuses_unknown_class_folders_naming_them(yes_no_data, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["fit", str(yes_no_data), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no/ (14 images)" in err and "yes/ (4 images)" in err
    assert "--normal-dir no --abnormal-dir yes" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["dataset", str(yes_no_data)]) == 1  # reported as unknown, not as normal training images
    table = capsys.readouterr().out
    assert "unknown" in table and not any(line.startswith("train") for line in table.splitlines())


def test_explicit_folders_fit_and_evaluate_with_the_threshold_named(yes_no_data, tmp_path, capsys):
    data = ["--normal-dir", "no", "--abnormal-dir", "tumour=yes"]
    assert main(["dataset", str(yes_no_data), *data, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train"]["normal"], summary["test"]["normal"], summary["test"]["anomalous"]) == (12, 2, 4)
    assert summary["test"]["categories"] == {"no": 2, "tumour": 4}

    out = tmp_path / "brain.safetensors"
    fit = ["fit", str(yes_no_data), *data, "--detector", "PatchCore", "--image-size", "64", "--out", str(out)]
    assert main([*fit, "--param", "holdout_fraction=0.3", "--param", "progress=false"]) == 0
    assert "fitting patchcore on 12 normal images" in capsys.readouterr().err

    plots = tmp_path / "plots"
    assert main(["evaluate", str(out), str(yes_no_data), *data, "--plots", str(plots)]) == 0
    printed = capsys.readouterr().out
    threshold = load_threshold(out)
    assert f"at the calibrated threshold {threshold:.4g} (score > {threshold:.4g} is anomalous" in printed
    assert "precision" in printed.split("at the calibrated threshold")[1]
    assert (plots / "roc_curve.png").is_file() and (plots / "pr_curve.png").is_file()


def load_threshold(model_path) -> float:
    from imaging_ad.detectors import read_description

    return read_description(model_path)["calibration"]["image_threshold"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "model.pt"], "saved as .safetensors; name it model.safetensors"),
        (["--param", "coreset_ration=0.3"], "did you mean 'coreset_ratio'"),
        (["--param", "coreset_ratio=abc"], "coreset_ratio must be a number, got 'abc'"),
        (["--param", "progress"], "expects KEY=VALUE"),
        (["--detector", "patchcor"], "did you mean patchcore"),
    ],
)
def test_fit_mistakes_fail_before_any_work(texture_data, tmp_path, monkeypatch, capsys, extra, message):
    import imaging_ad.data

    def no_discovery(*args, **kwargs):
        raise AssertionError("the dataset was read before the arguments were checked")

    monkeypatch.setattr(imaging_ad.data, "open_dataset", no_discovery)
    monkeypatch.chdir(tmp_path)
    args = ["fit", str(texture_data), "--out", "model.safetensors", *extra]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_exit_codes_header_and_non_model_files(model, texture_data, tmp_path, capsys):
    image = texture_data / "test" / "good" / "000.png"
    assert main(["predict", str(model), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["verdict", "normalised", "score", "path"] and lines[1].endswith("000.png")

    missing = tmp_path / "missing.png"
    assert main(["predict", str(model), str(image), str(missing)]) == 1
    assert "1 of 2 input(s) could not be scored" in capsys.readouterr().err
    assert main(["predict", str(model), str(image), str(missing), "--allow-errors"]) == 0

    capsys.readouterr()
    assert main(["predict", str(image), str(image)]) == 1  # an image given as the model
    err = capsys.readouterr().err
    assert "not an imaging_ad model file (it looks like a PNG image)" in err and "header" not in err


def test_scan_of_an_empty_folder_fails_clearly(model, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "scan"
    assert main(["scan", str(empty), "--model", str(model), "--out", str(out), "--no-progress"]) == 1
    assert "no image files found in" in capsys.readouterr().err
    assert not out.exists()  # nothing written for an empty scan


@pytest.mark.parametrize("spelling", ["PatchCore", "Patchcore", "PATCHCORE", "patch-core", "patch_core"])
def test_detector_names_in_any_case_and_anomalib_spelling(spelling):
    from imaging_ad.detectors import resolve_detector_name

    assert resolve_detector_name(spelling) == "patchcore"
    assert resolve_detector_name("Feature-AE") == "feature_ae"


def test_no_progress_bar_for_a_single_image(model, texture_data, capfd):
    from imaging_ad.detectors import load_detector

    detector = load_detector(model, device="cpu")
    detector.progress = True
    capfd.readouterr()
    detector.predict(texture_data / "test" / "good" / "000.png")
    assert "img" not in capfd.readouterr().err  # one image: no bar
    many = sorted((texture_data / "train" / "good").glob("*.png"))[: detector.batch_size + 1]
    detector.predict(many)
    assert "img" in capfd.readouterr().err  # more than one batch: the bar is back
