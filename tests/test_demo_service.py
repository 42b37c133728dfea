"""The demo's operations without a browser: shipped model, inspect, batch, learn, and the CLI entry."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from imaging_ad.app import feedback
from imaging_ad.app.config import EXAMPLES_DIR, WEIGHTS_DIR, DemoConfig
from imaging_ad.app.models import ModelCache, fingerprint, shipped_models
from imaging_ad.app.safety import UnsafeInputError
from imaging_ad.app.service import DemoService
from imaging_ad.io.checksum import file_sha256

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.jpeg"))


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    (root / "cases").mkdir()
    for path in EXAMPLES[:3]:
        shutil.copy(path, root / "cases" / path.name)
    return root


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, allowed: Path) -> DemoService:
    data = tmp_path_factory.mktemp("demo-data")
    return DemoService(DemoConfig(data_dir=data, allowed_roots=[allowed], device="cpu"))


def test_shipped_model_and_examples_are_in_the_repository() -> None:
    registry = json.loads((WEIGHTS_DIR / "registry.json").read_text())
    entries = shipped_models(WEIGHTS_DIR)
    assert [e.name for e in entries] == [m["name"] for m in registry["models"]]
    default = entries[0]
    # "a few MB at most": the bank (2,000 rows), and the domain guard's 1,341 pooled vectors (2.3 MB)
    assert default.path.stat().st_size < 8 * 1024 * 1024
    assert file_sha256(default.path) == default.sha256
    assert len(EXAMPLES) >= 6
    assert {p.name.split("_")[0] for p in EXAMPLES} == {"normal", "pneumonia"}


def test_a_model_file_that_differs_from_the_registry_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, weights, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    registry = json.loads((weights / "registry.json").read_text())
    registry["models"][0]["sha256"] = "0" * 64
    (weights / "registry.json").write_text(json.dumps(registry))
    with pytest.raises(ValueError, match="differs from the registry"):
        ModelCache(device="cpu").get(shipped_models(weights)[0])


def test_inspect_scores_an_example_and_queues_it(service: DemoService) -> None:
    by_name = {}
    for path in EXAMPLES:
        result = service.inspect(path)
        assert result.heatmap.shape == result.display.shape[:2] == (224, 224)
        assert np.isfinite(result.score) and 0 < result.normalized_score < 1
        by_name[path.name] = result
    normal = [r.normalized_score for n, r in by_name.items() if n.startswith("normal")]
    pneumonia = [r.normalized_score for n, r in by_name.items() if n.startswith("pneumonia")]
    assert np.mean(pneumonia) > np.mean(normal)
    queue = service.store.queue()
    assert {i.display_name for i in queue} >= {p.name for p in EXAMPLES}
    item = service.store.item(by_name[EXAMPLES[0].name].item_id)
    assert item.model_sha == fingerprint(WEIGHTS_DIR / "chest_xray_patchcore.safetensors")
    assert Path(item.overlay_path).is_file() and Path(item.image_path).is_relative_to(
        service.config.media_dir
    )
    # the same upload again is the same item, not a duplicate
    assert service.inspect(EXAMPLES[0]).item_id == item.id


def test_inspect_dicom_shows_modality_and_window(service: DemoService, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    path = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    result = service.inspect(path)
    assert result.meta["format"] == "DICOM" and result.meta["modality"] == "CT"
    assert "window (centre, width)" in result.meta
    assert result.heatmap.shape == (128, 128)


def test_refusals(service: DemoService, allowed: Path, tmp_path: Path) -> None:
    script = tmp_path / "x.sh"
    script.write_text("echo")
    with pytest.raises(UnsafeInputError):
        service.inspect(script)
    outside = tmp_path / "model.safetensors"
    shutil.copy(WEIGHTS_DIR / "chest_xray_patchcore.safetensors", outside)
    with pytest.raises(UnsafeInputError, match="outside"):
        service.resolve_model(path=str(outside))
    with pytest.raises(UnsafeInputError, match="outside"):
        service.run_batch([], folder=str(tmp_path))
    assert service.resolve_model(path=str(WEIGHTS_DIR / "chest_xray_patchcore.safetensors")).source == "path"
    # an allowed root that holds the data folder would scan the demo's own files
    nested = DemoService(DemoConfig(data_dir=tmp_path / "data", allowed_roots=[tmp_path], device="cpu"))
    with pytest.raises(UnsafeInputError, match="data folder"):
        nested.run_batch([], folder=str(tmp_path))


def test_batch_from_zip_and_from_allowed_folder_enters_the_queue(
    service: DemoService, allowed: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in EXAMPLES:
            zf.write(path, f"study/{path.name}")
        zf.writestr("study/readme.txt", "not an image")
    seen = []
    result = service.run_batch([str(archive)], progress=lambda f, d: seen.append(f))
    assert result.n_files == result.n_scored == len(EXAMPLES) and result.n_errors == 0
    assert seen[-1] == 1.0 and any("non-image" in n for n in result.notes)
    scores = [r["score"] for r in result.rows]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(r["overlay_abs"]).is_relative_to(service.config.media_dir) for r in result.rows)
    assert result.csv_path.is_file()
    batch_items = service.store.queue(source=f"batch:{result.batch_id}")
    assert len(batch_items) == len(EXAMPLES)

    folder = service.run_batch([], folder=str(allowed / "cases"))
    assert folder.n_scored == 3
    assert {Path(i.image_path).parent for i in service.store.queue(source=f"batch:{folder.batch_id}")} == {
        (allowed / "cases").resolve()
    }
    item = service.store.queue(source=f"batch:{folder.batch_id}")[0]
    assert service.display_image(item.image_path).shape == (224, 224, 3)


def test_learn_builds_a_model_offered_in_the_model_list(service: DemoService) -> None:
    from imaging_ad.detectors import load_detector

    entry = service.learn([str(p) for p in EXAMPLES], None, "dfm", "my model", image_size=96)
    assert entry.source == "user" and entry.name == "my_model"
    assert entry.label in service.model_labels()
    assert load_detector(entry.path, device="cpu").image_size == 96
    with pytest.raises(ValueError, match="only PatchCore"):  # no memory bank to add reviewed normals to
        feedback.extend_patchcore_bank(entry.path, EXAMPLES[:4], service.config.models_dir / "x.safetensors")
    with pytest.raises(ValueError, match="exists already"):
        service.learn([str(p) for p in EXAMPLES], None, "dfm", "my model", image_size=96)
    with pytest.raises(ValueError, match="at least 5"):
        service.learn([str(p) for p in EXAMPLES[:3]], None, "dfm", "small", image_size=96)


def test_cli_has_the_demo_command(capsys: pytest.CaptureFixture[str]) -> None:
    from imaging_ad.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--allowed-root" in out and "127.0.0.1" in out


def test_same_named_uploads_keep_their_names_and_zips_keep_their_folders(
    service: DemoService, tmp_path: Path
) -> None:
    uploads = []
    for folder, example in (("a", EXAMPLES[0]), ("b", EXAMPLES[1])):
        (tmp_path / folder).mkdir()
        uploads.append(shutil.copy(example, tmp_path / folder / "000.jpeg"))
    archive = tmp_path / "scans.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(EXAMPLES[2], "left/000.jpeg")
        zf.write(EXAMPLES[3], "right/000.jpeg")
    dest = tmp_path / "input"
    service.gather_inputs([*uploads, str(archive)], None, dest)
    found = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.jpeg"))
    assert found == ["000.jpeg", "2/000.jpeg", "scans/left/000.jpeg", "scans/right/000.jpeg"]
    assert (dest / "2" / "000.jpeg").read_bytes() == EXAMPLES[1].read_bytes()


def test_inspect_verdict_table_has_no_empty_first_row(service: DemoService) -> None:
    from imaging_ad.app.tabs.inspect import verdict_markdown

    lines = verdict_markdown(service.inspect(EXAMPLES[0]), 0.5).splitlines()
    header = lines[lines.index("|---|---|") - 1]
    assert all(cell.strip() for cell in header.strip("|").split("|")), header


def test_review_export_writes_dicom_results_for_flagged_dicom(service: DemoService, tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    import pydicom
    from pydicom.data import get_testdata_file

    source = tmp_path / "mr.dcm"
    shutil.copy(get_testdata_file("MR_small.dcm"), source)
    item = service.store.item(service.inspect(source).item_id)
    service.store.record_verdict(item.id, "anomalous", "tester")
    archive, notes = service.export_dicom()
    assert notes == [] and archive.suffix == ".zip"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        original = pydicom.dcmread(source)
        study = original.StudyInstanceUID
        assert {f"{study}/SC_{original.SOPInstanceUID}.dcm", f"{study}/KO_flagged.dcm"} <= set(names)
        zf.extract(f"{study}/SC_{original.SOPInstanceUID}.dcm", tmp_path / "x")
    capture = pydicom.dcmread(tmp_path / "x" / study / f"SC_{original.SOPInstanceUID}.dcm")
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in capture.SeriesDescription
    # images reviewed as normal leave the export: with every DICOM image so reviewed, nothing is left
    for queued in service.store.queue():
        if Path(queued.image_path).suffix == ".dcm":
            service.store.record_verdict(queued.id, "normal", "tester")
    with pytest.raises(ValueError, match="no flagged DICOM images"):
        service.export_dicom()


def test_site_calibration_in_the_improve_tab_makes_a_new_version(tmp_path: Path) -> None:
    from imaging_ad.detectors import load_detector

    service = DemoService(DemoConfig(data_dir=tmp_path / "data", device="cpu"))  # a queue of its own
    entry = service.resolve_model()
    with pytest.raises(ValueError, match="at least 2"):
        service.recalibrate(entry)
    for example in EXAMPLES[:3]:
        item = service.inspect(example)
        service.store.record_verdict(item.item_id, "normal", "tester")
    path, calibration = service.recalibrate(entry)
    assert calibration.method == "site calibration" and calibration.n_normal == 3
    assert "demo" in calibration.source and any("cannot support" in w for w in calibration.warnings)
    assert load_detector(path, device="cpu").calibration_ == calibration
    assert path.name in [m.path.name for m in service.models()]
