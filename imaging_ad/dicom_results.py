"""DICOM results for DICOM inputs, so that a PACS viewer (OHIF, Weasis, Orthanc) can show them.

For each flagged DICOM image :class:`DicomResultWriter` writes, with ``highdicom`` (the ``[dicom]``
extra) and its validation on:

* a **Secondary Capture** (RGB) of the heatmap overlay with a colour bar, the scores and a
  "NOT FOR DIAGNOSTIC USE" banner burnt into the pixels, in the source's study, referencing the
  source image (Source Image Sequence);
* a **Parametric Map** of the float heatmap at the source's size, in the source's frame of reference
  (single-frame sources with plane geometry, such as CT and MR; others get the Secondary Capture only);

and, on :meth:`DicomResultWriter.finish`, one **Key Object Selection** per study listing its flagged
images (Study, Series and SOP Instance UIDs of the sources in its evidence). Every derived object has
new UIDs; its series says "NOT FOR DIAGNOSTIC USE". Series UIDs are derived from the study and the
model, so a resumed scan adds to the same series; instance UIDs are new for every object written.

Layout: ``OUT/<StudyInstanceUID>/SC_<source SOP Instance UID>.dcm``, ``PM_<...>.dcm`` and
``KO_flagged.dcm``; ``OUT/flagged.jsonl`` lists what was written (one line per flagged image, the
latest line for a source wins), so a resumed scan's Key Object Selection covers earlier runs too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

log = logging.getLogger("imaging_ad.dicom_results")

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DISCLAIMER = "imaging_ad anomaly heatmap: research output, NOT FOR DIAGNOSTIC USE"
OUTSIDE_DOMAIN = "OUTSIDE THE MODEL'S TRAINING DOMAIN"
INDEX_NAME = "flagged.jsonl"
KOS_NAME = "KO_flagged.dcm"
MANUFACTURER = "imaging_ad"
# Series numbers of the derived series: high, so they sort after the acquired series in a viewer.
SERIES_NUMBERS = {"SC": 9901, "PM": 9902, "KO": 9903}
#: the Secondary Capture is enlarged until its shorter side has this many pixels, so the burnt-in
#: legend stays legible on small images (CT_small is 128 x 128)
MIN_CAPTURE_SIDE = 512


class DicomResultsError(RuntimeError):
    """DICOM results cannot be written (highdicom missing, a source without the UIDs to reference)."""


def require_highdicom() -> None:
    """Raise :class:`DicomResultsError` with the install command when highdicom is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError as exc:
        raise DicomResultsError(
            "DICOM results need highdicom: pip install 'imaging-ad[dicom]' (or pip install highdicom)"
        ) from exc


@dataclass(frozen=True)
class WrittenResult:
    """The DICOM objects written for one flagged image."""

    source: Path
    secondary_capture: Path
    parametric_map: Path | None
    note: str | None = None  # why no parametric map was written, when none was


class DicomResultWriter:
    """Writes DICOM results into ``out_dir``; see the module docstring for what and where.

    ``model_name`` and ``model_fingerprint`` identify the model in the objects (and seed the derived
    series UIDs). :meth:`add` is called once per flagged DICOM image (from one thread at a time or
    several: a lock guards the index), :meth:`finish` once at the end.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        model_name: str,
        model_fingerprint: str,
        parametric_map: bool = True,
    ) -> None:
        require_highdicom()
        self.out_dir = Path(out_dir)
        self.model_name = model_name
        self.model_fingerprint = model_fingerprint
        self.parametric_map = parametric_map
        self._lock = threading.Lock()
        self.n_written = 0

    # -- per flagged image ------------------------------------------------------------------------

    def add(
        self,
        source: str | os.PathLike,
        heatmap: np.ndarray,
        score: float,
        threshold: float,
        *,
        pixels: np.ndarray | None = None,
        pixel_threshold: float | None = None,
        pixel_upper: float | None = None,
        outside_domain: str | None = None,
    ) -> WrittenResult:
        """Write the Secondary Capture (and Parametric Map) for the flagged DICOM image ``source``.

        ``heatmap`` is float at the image's (rows, columns); ``pixels`` the image as read (read again
        from ``source`` when not given); ``pixel_threshold`` and ``pixel_upper`` are the model's colour
        scale (blue is as normal as normal images get; the same scale as every other output).

        ``outside_domain`` (why the image is unlike the model's training images) writes instead a capture
        of the plain image that says the model has no verdict for it: no heatmap, no parametric map, and
        the image stays out of the study's selection of flagged images, so a PACS reader sees that the
        model declined rather than nothing.
        """
        import pydicom

        source = Path(source)
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        _check_references(ds, source)
        heatmap = np.asarray(heatmap, dtype=np.float32)
        if heatmap.shape != (int(ds.Rows), int(ds.Columns)):
            raise DicomResultsError(
                f"{source}: heatmap {heatmap.shape} does not match the image's {ds.Rows} x {ds.Columns}"
            )
        if pixels is None:
            from imaging_ad.io import read_image

            pixels = read_image(source).pixels
        study_dir = self.out_dir / str(ds.StudyInstanceUID)
        study_dir.mkdir(parents=True, exist_ok=True)

        with _strict_values():
            capture = self._secondary_capture(
                ds, pixels, heatmap, score, threshold, pixel_threshold, pixel_upper, outside_domain
            )
            sc_path = study_dir / f"SC_{ds.SOPInstanceUID}.dcm"
            _save(capture, sc_path)

            pm_path, note = None, None
            if self.parametric_map and outside_domain is None:
                try:
                    pm = self._parametric_map(ds, heatmap, pixel_threshold)
                except (ValueError, TypeError, AttributeError, KeyError) as exc:
                    # e.g. a radiograph without plane position/orientation: the map needs patient geometry
                    note = f"no parametric map ({type(exc).__name__}: {exc})"
                    log.info("%s: %s", source, note)
                else:
                    pm_path = study_dir / f"PM_{ds.SOPInstanceUID}.dcm"
                    _save(pm, pm_path)

        entry = {
            "source": str(source.resolve()),
            "study": str(ds.StudyInstanceUID),
            "series": str(ds.SeriesInstanceUID),
            "sop_instance": str(ds.SOPInstanceUID),
            "sop_class": str(ds.SOPClassUID),
            "secondary_capture": sc_path.relative_to(self.out_dir).as_posix(),
            "parametric_map": pm_path.relative_to(self.out_dir).as_posix() if pm_path else None,
            "score": float(score),
            "threshold": float(threshold),
            "model": self.model_name,
            "outside_domain": outside_domain,
        }
        with self._lock:
            with open(self.out_dir / INDEX_NAME, "a", encoding="utf-8") as index:
                index.write(json.dumps(entry) + "\n")
            self.n_written += 1 + (pm_path is not None)
        return WrittenResult(source, sc_path, pm_path, note)

    def _secondary_capture(
        self,
        ds: Dataset,
        pixels: np.ndarray,
        heatmap: np.ndarray,
        score: float,
        threshold: float,
        pixel_threshold: float | None,
        pixel_upper: float | None,
        outside_domain: str | None = None,
    ) -> Any:
        import highdicom as hd
        from pydicom.dataset import Dataset as PydicomDataset
        from pydicom.uid import ExplicitVRLittleEndian

        picture = capture_picture(
            pixels,
            None if outside_domain else heatmap,
            score=score,
            threshold=threshold,
            pixel_threshold=pixel_threshold,
            pixel_upper=pixel_upper,
            title=f"imaging_ad {self.model_name}",
        )
        orientation = patient_orientation(ds)
        capture = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds,
            pixel_array=picture,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=self._series_uid(ds, "SC"),
            series_number=SERIES_NUMBERS["SC"],
            sop_instance_uid=hd.UID(),
            instance_number=int(ds.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            patient_orientation=orientation or ("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        if orientation is None:
            # Patient Orientation is type 2: empty is the honest value when the source gives none
            # (highdicom insists on one for the constructor, hence the placeholder above).
            capture.PatientOrientation = None
        capture.SeriesDescription = f"imaging_ad heatmaps - {NOT_FOR_DIAGNOSTIC_USE}"
        capture.ImageComments = (
            f"{DISCLAIMER}. Image score {score:.4g}, threshold {threshold:.4g}."
            if outside_domain is None
            else f"{DISCLAIMER}. {OUTSIDE_DOMAIN}: {outside_domain}."
        )[:10240]
        capture.BurnedInAnnotation = "YES"
        capture.ImageType = ["DERIVED", "SECONDARY"]
        capture.DerivationDescription = (
            f"Anomaly heatmap of {self.model_name} over the source image, with colour bar and scores"
            if outside_domain is None
            else f"The source image; {self.model_name} gives no verdict for it ({OUTSIDE_DOMAIN})"
        )[:1024]
        reference = PydicomDataset()
        reference.ReferencedSOPClassUID = ds.SOPClassUID
        reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        if int(ds.get("NumberOfFrames") or 1) > 1:
            reference.ReferencedFrameNumber = 1  # the reader scores the first frame unless told
        capture.SourceImageSequence = [reference]
        return capture

    def _parametric_map(self, ds: Dataset, heatmap: np.ndarray, pixel_threshold: float | None) -> Any:
        import highdicom as hd
        from pydicom.sr.codedict import codes

        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise ValueError("multi-frame source: one map per frame is not written")
        finite = heatmap[np.isfinite(heatmap)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 1.0
        if not high > low:
            high = low + 1.0
        mapping = hd.pm.RealWorldValueMapping(
            lut_label="anomaly",
            lut_explanation="imaging_ad pixel anomaly score (not for diagnostic use)",
            unit=codes.UCUM.NoUnits,
            value_range=(low, high),
            slope=1.0,
            intercept=0.0,
        )
        start = low if pixel_threshold is None else min(float(pixel_threshold), high)
        window = hd.VOILUTTransformation(
            window_center=(start + high) / 2, window_width=max(high - start, 1e-6)
        )
        import imaging_ad

        return hd.pm.ParametricMap(
            source_images=[ds],
            pixel_array=heatmap,
            series_instance_uid=self._series_uid(ds, "PM"),
            series_number=SERIES_NUMBERS["PM"],
            sop_instance_uid=hd.UID(),
            instance_number=int(ds.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            manufacturer_model_name=f"imaging_ad {self.model_name}"[:64],
            software_versions=str(imaging_ad.__version__),
            device_serial_number=self.model_fingerprint[:16] or "unknown",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[window],
            content_label="ANOMALY",
            content_description=f"Anomaly heatmap, {NOT_FOR_DIAGNOSTIC_USE}"[:64],
            series_description=f"imaging_ad anomaly map - {NOT_FOR_DIAGNOSTIC_USE}"[:64],
        )

    # -- per study, at the end ---------------------------------------------------------------------

    def finish(self) -> list[Path]:
        """Write one Key Object Selection per study that has flagged images (in this run or, for a
        resumed scan, an earlier one); returns the files written."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        entries = read_index(self.out_dir)
        by_study: dict[str, list[dict]] = {}
        for entry in entries:
            if not entry.get("outside_domain"):  # no verdict: not "flagged"
                by_study.setdefault(entry["study"], []).append(entry)
        written = []
        for study, members in sorted(by_study.items()):
            sources = []
            for entry in members:
                try:
                    sources.append(pydicom.dcmread(entry["source"], stop_before_pixels=True))
                except (OSError, InvalidDicomError) as exc:
                    log.warning("%s: left out of the key object selection (%s)", entry["source"], exc)
            if not sources:
                continue
            sources.sort(key=lambda d: (str(d.SeriesInstanceUID), int(d.get("InstanceNumber") or 0)))
            with _strict_values():
                path = self._write_selection(study, sources)
            written.append(path)
            self.n_written += 1
        return written

    def _write_selection(self, study: str, sources: list[Dataset]) -> Path:
        """One study's Key Object Selection of its flagged images."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=sources,
            description=(
                f"{len(sources)} image(s) flagged as anomalous by imaging_ad {self.model_name}; "
                f"heatmaps in series {SERIES_NUMBERS['SC']}. {NOT_FOR_DIAGNOSTIC_USE}."
            ),
        )
        document = hd.ko.KeyObjectSelectionDocument(
            evidence=sources,
            content=content,
            series_instance_uid=self._series_uid(sources[0], "KO"),
            series_number=SERIES_NUMBERS["KO"],
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
        )
        document.SeriesDescription = f"imaging_ad flagged images - {NOT_FOR_DIAGNOSTIC_USE}"
        path = self.out_dir / study / KOS_NAME
        _save(document, path)
        return path

    def _series_uid(self, ds: Dataset, kind: str) -> str:
        from pydicom.uid import generate_uid

        # deterministic: the same study and model always write into the same derived series
        return str(generate_uid(entropy_srcs=[str(ds.StudyInstanceUID), self.model_fingerprint, kind]))


def read_index(out_dir: str | os.PathLike) -> list[dict]:
    """The flagged images recorded in ``out_dir`` (latest line per source SOP Instance UID)."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        return []
    latest: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by an interruption
        latest[entry["sop_instance"]] = entry
    return list(latest.values())


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """(row, column) direction letters of the source: its Patient Orientation, else the dominant axis
    of each Image Orientation (Patient) vector (L/R, P/A, H/F); None when the file gives neither."""
    given = ds.get("PatientOrientation")
    if given and len(given) == 2 and all(str(v)[:1] in "LRAPHF" and str(v) for v in given):
        return str(given[0])[0], str(given[1])[0]
    cosines = ds.get("ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        return None
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    result = []
    for vector in (np.asarray(cosines[:3], float), np.asarray(cosines[3:], float)):
        axis = int(np.argmax(np.abs(vector)))
        result.append(letters[axis][0] if vector[axis] >= 0 else letters[axis][1])
    return result[0], result[1]


def capture_picture(
    pixels: np.ndarray,
    heatmap: np.ndarray | None,
    *,
    score: float,
    threshold: float,
    pixel_threshold: float | None = None,
    pixel_upper: float | None = None,
    title: str = "imaging_ad",
    min_side: int = MIN_CAPTURE_SIDE,
) -> np.ndarray:
    """The overlay with a banner (title, scores, "NOT FOR DIAGNOSTIC USE") and the model's labelled colour
    bar (:func:`imaging_ad.visualize.colour_bar`, the scale of every other output), as uint8 RGB; small
    images are enlarged so that the text stays legible. Without a heatmap (an image outside the model's
    domain) the plain image, with a banner that says there is no verdict."""
    from imaging_ad.visualize import ColourScale, colour_bar, overlay, to_display_rgb

    if heatmap is None:
        return _with_banner(
            to_display_rgb(pixels), [NOT_FOR_DIAGNOSTIC_USE, title, f"{OUTSIDE_DOMAIN}: NO VERDICT"], min_side
        )
    finite = heatmap[np.isfinite(heatmap)]
    high = float(finite.max()) if finite.size else 1.0
    low = float(finite.min()) if finite.size else 0.0
    start = low if pixel_threshold is None else float(pixel_threshold)
    top = pixel_upper if pixel_upper is not None and pixel_upper > start else max(high, start + 1e-6)
    scale = ColourScale(start, float(top))
    picture = overlay(pixels, heatmap, vmin=scale.low, vmax=scale.high)
    lines = [NOT_FOR_DIAGNOSTIC_USE, title, f"image score {score:.4g} > threshold {threshold:.4g}"]
    return _with_banner(picture, lines, min_side, lambda height: colour_bar(height, scale))


def _with_banner(picture: np.ndarray, lines: list[str], min_side: int, panel_of=None) -> np.ndarray:
    """``picture`` enlarged to ``min_side`` (legible text), a side panel (``panel_of(height)``) to its
    right, and a banner of ``lines`` above both (the first in red)."""
    height, width = picture.shape[:2]
    factor = max(1.0, min_side / max(1, min(height, width)))
    if factor > 1.0:
        picture = cv2.resize(
            picture, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_LINEAR
        )
    height, width = picture.shape[:2]
    unit = max(height, width) / 512  # text scales with the picture
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(unit * 1.5))
    line = round(26 * unit)
    banner = np.zeros((line * len(lines) + round(10 * unit), width, 3), np.uint8)
    for i, text in enumerate(lines):
        colour = (255, 80, 80) if i == 0 else (255, 255, 255)
        at = (round(8 * unit), line * (i + 1))
        cv2.putText(banner, text, at, font, 0.55 * unit, colour, thickness, cv2.LINE_AA)
    if panel_of is not None:
        panel = panel_of(height)
        picture = np.concatenate([picture, panel], axis=1)
        banner = np.pad(banner, ((0, 0), (0, panel.shape[1]), (0, 0)))
    return np.ascontiguousarray(np.concatenate([banner, picture], axis=0))


@contextlib.contextmanager
def _strict_values() -> Iterator[None]:
    """pydicom's value validation raising instead of warning while results are built and written: a
    value a viewer might reject (too long, bad characters for its VR) fails here, not in a PACS."""
    from pydicom import config

    previous = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = previous


def _check_references(ds: Dataset, source: Path) -> None:
    missing = [
        key
        for key in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "SOPClassUID",
            "Rows",
            "Columns",
        )
        if not ds.get(key)
    ]
    if missing:
        raise DicomResultsError(f"{source}: no {', '.join(missing)}; DICOM results must reference them")


def _save(dataset: Any, path: Path) -> None:
    """Write next to the target and rename: a viewer polling the folder never sees half a file."""
    tmp = path.with_name(path.name + ".partial")
    dataset.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
