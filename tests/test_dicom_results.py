"""DICOM results for DICOM inputs: Secondary Capture, Parametric Map and Key Object Selection objects,
written by ``imaging-ad scan --dicom-out`` and referencing the source study, series and images."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import ParametricMapStorage, SecondaryCaptureImageStorage

from imaging_ad.cli import main
from imaging_ad.detectors import create_detector, load_detector
from tests.synthetic import texture

SOURCES = {"ct/CT_small.dcm": "CT_small.dcm", "mr/MR_small": "MR_small.dcm"}  # one without a suffix
KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"


def fitted_on_textures(folder: Path, guard: bool) -> Path:
    """A PatchCore fitted on textures: to it, a CT or MR slice is as anomalous as an image gets. Its
    out-of-domain guard rightly calls them foreign; without the guard (``guard=False``, as a model saved
    before the guard existed) they are scored and flagged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: one thread is faster on a shared 2-core machine
    try:
        rng = np.random.default_rng(0)
        path = folder / "textures.safetensors"
        params = {"image_size": 128, "batch_size": 8, "progress": False, "holdout_fraction": 0.2}
        detector = create_detector("patchcore", **params).fit([texture(rng) for _ in range(24)])
        if not guard:
            detector.domain_guard_ = None
            detector.calibration_ = replace(detector.calibration_, domain_threshold=None, training_facts=None)
        detector.save(path)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return fitted_on_textures(tmp_path_factory.mktemp("dicom_model"), guard=False)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "incoming"
    for rel, name in SOURCES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), root / rel)
    rng = np.random.default_rng(5)
    import cv2

    assert cv2.imwrite(str(root / "texture.png"), texture(rng))  # not DICOM: never gets DICOM results
    return root


def test_slices_outside_the_domain_get_a_capture_that_says_so_and_nothing_else(folder, tmp_path, capsys):
    """A DICOM result says "flagged" to a PACS: never for an image whose score means nothing. Such an
    image gets a capture of itself saying the model has no verdict (no heatmap, no parametric map) and
    stays out of the key object selection."""
    pytest.importorskip("highdicom")
    model = fitted_on_textures(tmp_path, guard=True)
    out, dicom_out = tmp_path / "scan", tmp_path / "dicom"
    assert main(["scan", str(folder), "--model", str(model), "--out", str(out), "--no-progress",
                 "--dicom-out", str(dicom_out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "2 outside this model's training domain" in printed
    assert "2 DICOM result object(s)" in printed
    written = sorted(p.name for p in dicom_out.rglob("*.dcm"))
    assert len(written) == 2 and all(name.startswith("SC_") for name in written)
    for path in dicom_out.rglob("SC_*.dcm"):
        capture = pydicom.dcmread(path)
        assert "OUTSIDE THE MODEL'S TRAINING DOMAIN" in capture.ImageComments
        assert "NOT FOR DIAGNOSTIC USE" in capture.ImageComments


def test_scan_writes_dicom_results_referencing_the_sources(model_path, folder, tmp_path, capsys):
    highdicom = pytest.importorskip("highdicom")
    out, dicom_out = tmp_path / "scan", tmp_path / "dicom"
    command = ["scan", str(folder), "--model", str(model_path), "--out", str(out), "--no-progress"]
    assert main([*command, "--dicom-out", str(dicom_out)]) == 0
    assert f"6 DICOM result object(s) written to {dicom_out}" in capsys.readouterr().out

    detector = load_detector(model_path, device="cpu")
    for rel in SOURCES:
        source = pydicom.dcmread(folder / rel)
        study = dicom_out / source.StudyInstanceUID

        capture = pydicom.dcmread(study / f"SC_{source.SOPInstanceUID}.dcm")
        assert capture.SOPClassUID == SecondaryCaptureImageStorage
        assert capture.StudyInstanceUID == source.StudyInstanceUID  # in the source's study
        assert capture.PatientID == source.PatientID
        assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert capture.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert capture.SOPInstanceUID != source.SOPInstanceUID
        assert capture.SeriesInstanceUID != source.SeriesInstanceUID  # a new, derived series
        assert "NOT FOR DIAGNOSTIC USE" in capture.SeriesDescription
        assert "NOT FOR DIAGNOSTIC USE" in capture.ImageComments and capture.BurnedInAnnotation == "YES"
        picture = capture.pixel_array
        assert picture.ndim == 3 and picture.shape[2] == 3 and capture.PhotometricInterpretation == "RGB"
        assert picture.shape[1] > source.Columns  # overlay plus colour bar, enlarged to stay legible

        parametric = pydicom.dcmread(study / f"PM_{source.SOPInstanceUID}.dcm")
        assert parametric.SOPClassUID == ParametricMapStorage
        assert parametric.StudyInstanceUID == source.StudyInstanceUID
        assert parametric.FrameOfReferenceUID == source.FrameOfReferenceUID
        series = parametric.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "NOT FOR DIAGNOSTIC USE" in parametric.ContentDescription
        heatmap = parametric.pixel_array  # float32, the heatmap itself at the source's size
        assert heatmap.dtype == np.float32 and heatmap.shape == (source.Rows, source.Columns)
        expected = detector.predict(folder / rel)[0].heatmap
        np.testing.assert_allclose(heatmap, expected, atol=1e-3 * float(expected.max()))

        selection = pydicom.dcmread(study / "KO_flagged.dcm")
        assert selection.SOPClassUID == KOS_STORAGE and selection.Modality == "KO"
        evidence = selection.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert selection.StudyInstanceUID == source.StudyInstanceUID
        assert selection.SOPInstanceUID not in {capture.SOPInstanceUID, parametric.SOPInstanceUID}
        # highdicom parses its own document back, content tree included
        document = highdicom.ko.KeyObjectSelectionDocument.from_dataset(selection)
        items = [item for item in document.ContentSequence if "ReferencedSOPSequence" in item]
        assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items] == [source.SOPInstanceUID]
        descriptions = [item.TextValue for item in document.ContentSequence if "TextValue" in item]
        assert any("NOT FOR DIAGNOSTIC USE" in text for text in descriptions)

    assert sorted(p.name for p in dicom_out.rglob("*.dcm") if p.name.startswith("SC_")) == sorted(
        f"SC_{pydicom.dcmread(folder / rel).SOPInstanceUID}.dcm" for rel in SOURCES
    )  # the PNG got no DICOM results

    # a resumed scan (nothing new to score) keeps one selection per study and the same derived series
    series_before = pydicom.dcmread(next(dicom_out.rglob("SC_*.dcm"))).SeriesInstanceUID
    assert main([*command, "--dicom-out", str(dicom_out)]) == 0
    assert len(list(dicom_out.rglob("KO_flagged.dcm"))) == 2
    assert pydicom.dcmread(next(dicom_out.rglob("SC_*.dcm"))).SeriesInstanceUID == series_before


def test_without_highdicom_the_scan_refuses_before_any_work(
    model_path, folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    out = tmp_path / "scan"
    code = main(
        [
            "scan",
            str(folder),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--dicom-out",
            str(tmp_path / "d"),
        ]
    )
    assert code == 1
    assert "pip install 'imaging-ad[dicom]'" in capsys.readouterr().err
    assert not out.exists()


def test_dicom_output_inside_the_input_folder_is_refused(model_path, folder, tmp_path, capsys):
    pytest.importorskip("highdicom")
    out = tmp_path / "scan"
    assert (
        main(
            [
                "scan",
                str(folder),
                "--model",
                str(model_path),
                "--out",
                str(out),
                "--dicom-out",
                str(folder / "r"),
            ]
        )
        == 1
    )
    assert "must not be inside the input folder" in capsys.readouterr().err


def test_patient_orientation_from_the_image_plane():
    from pydicom.dataset import Dataset

    from imaging_ad.dicom_results import patient_orientation

    axial, coronal, unknown = Dataset(), Dataset(), Dataset()
    axial.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    coronal.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert patient_orientation(axial) == ("L", "P")
    assert patient_orientation(coronal) == ("L", "F")
    assert patient_orientation(unknown) is None
    radiograph = Dataset()
    radiograph.PatientOrientation = ["A", "FR"]
    assert patient_orientation(radiograph) == ("A", "F")
