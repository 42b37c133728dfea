"""What the demo does, without the user interface: inspect one image, scan a batch, fit a model, review.

:class:`DemoService` owns the data folder, the review store and the model cache; the Gradio handlers in
:mod:`demo.app` only convert between its results and widgets. Every path it writes is inside the data
folder; every server path it reads is checked against the allowed roots first.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from imaging_ad.app import feedback
from imaging_ad.app.config import DemoConfig
from imaging_ad.app.memory import release_freed_memory
from imaging_ad.app.models import ModelCache, ModelEntry, fingerprint, list_models
from imaging_ad.app.review_store import NewItem, QueueItem, ReviewStore
from imaging_ad.app.safety import (
    IMAGE_SUFFIXES,
    UnsafeInputError,
    check_upload_name,
    copy_upload,
    is_within,
    resolve_within,
    safe_extract_zip,
    safe_name,
)
from imaging_ad.io import ImageRecord, read_image

ProgressFn = Callable[[float, str], None]


@dataclass
class InspectResult:
    name: str
    image_path: Path  # the stored copy under media/uploads
    display: np.ndarray  # uint8 RGB, the image as shown
    heatmap: np.ndarray  # float32 at the image's size
    score: float
    normalized_score: float
    threshold: float  # calibrated raw image threshold
    pixel_threshold: float
    score_scale: float
    target_fpr: float
    meta: dict[str, Any]
    model_name: str
    model_sha: str
    item_id: int
    model_seconds: float  # read + predict, the library call
    calibration: Any = None  # the model's Calibration (thresholds, colour scale, what they promise)
    domain_score: float | None = None  # the out-of-domain guard's distance over its threshold
    out_of_domain: tuple[str, ...] = ()  # why the image is unlike the training images (empty: it is not)

    def is_anomaly(self, normalized_threshold: float = 0.5) -> bool:
        return self.normalized_score > normalized_threshold


@dataclass
class BatchResult:
    batch_id: str
    n_files: int
    n_scored: int
    n_flagged: int
    n_errors: int
    seconds: float
    rows: list[dict[str, Any]]  # scan rows, highest score first; "overlay_abs" added
    csv_path: Path
    report_path: Path
    notes: list[str] = field(default_factory=list)


def _free_folder(dest: Path, name: str) -> Path:
    """``dest``, or the first of ``dest/2``, ``dest/3``, ... where ``name`` is still free: same-named
    uploads keep their own names instead of becoming ``000_1.png``. (Browsers send file names without
    their folders; a zip upload keeps its folders.)"""
    folder, n = dest, 1
    while (folder / safe_name(name)).exists():
        n += 1
        folder = dest / str(n)
    return folder


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def image_meta_summary(record: ImageRecord) -> dict[str, Any]:
    """The facts worth showing about an input (DICOM: modality and window)."""
    meta = record.meta
    info: dict[str, Any] = {
        "format": meta.format,
        "size": f"{meta.width} x {meta.height}",
        "bit depth": meta.bit_depth,
        "channels": meta.channels,
    }
    if meta.format == "DICOM":
        info["modality"] = meta.modality or "unknown"
        info["window (centre, width)"] = (
            f"{meta.window[0]:g}, {meta.window[1]:g}" if meta.window else "none in the file"
        )
        info["VOI applied"] = meta.voi_applied or "none"
        info["photometric"] = meta.photometric
        if meta.inverted:
            info["inverted"] = "MONOCHROME1 shown bright = dense"
    return info


class DemoService:
    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        config.make_dirs()
        self.store = ReviewStore(config.db_path)
        self.cache = ModelCache(device=config.device, runtime=config.runtime)

    # -- models -------------------------------------------------------------------------------------

    def models(self) -> list[ModelEntry]:
        return list_models(self.config.weights_dir, self.config.models_dir)

    def model_labels(self) -> list[str]:
        return [m.label for m in self.models()]

    def resolve_model(self, label: str | None = None, path: str | None = None) -> ModelEntry:
        """The model chosen in the UI: a typed path (inside the allowed roots or the models folder) wins
        over the dropdown; neither means the default (first shipped) model."""
        if path and path.strip():
            roots = [*self.config.allowed_roots, self.config.models_dir, self.config.weights_dir]
            resolved = resolve_within(path, roots)
            if resolved.suffix != ".safetensors" or not resolved.is_file():
                raise UnsafeInputError(f"{path}: not a .safetensors model file")
            return ModelEntry(resolved.stem, resolved, "model file given by path", None, "path")
        models = self.models()
        if not models:
            raise ValueError(
                f"no models found in {self.config.weights_dir} or {self.config.models_dir}; "
                "run weights/build_default_model.py or fit one in the Learn tab"
            )
        for model in models:
            if model.label == label:
                return model
        if label:
            raise ValueError(f"model {label!r} is no longer available")
        return models[0]

    def detector(self, entry: ModelEntry):  # -> Detector (imported lazily)
        return self.cache.get(entry, trust=self.trust_policy())

    # -- trust (see imaging_ad.trust) ------------------------------------------------------------------

    OWN_MODELS = "built-by-this-demo.json"

    def trust_policy(self):  # -> imaging_ad.trust.TrustPolicy
        """The operator's policy (``IMAGING_AD_TRUST_KEYS`` / ``IMAGING_AD_TRUSTED_HASHES``). When one is
        configured, the shipped registry's hashes and the models this demo built itself count as trusted
        lists too; without one, model files are checked for integrity only."""
        from imaging_ad.trust import TrustPolicy, read_hash_list

        policy = TrustPolicy.from_env()
        if not policy.configured:
            return policy
        registry = self.config.weights_dir / "registry.json"
        if registry.is_file():
            policy = policy.with_hashes(read_hash_list(registry), str(registry))
        own = self.config.models_dir / self.OWN_MODELS
        if own.is_file():
            policy = policy.with_hashes(read_hash_list(own), f"models built by this demo ({own})")
        return policy

    def trust_statement(self) -> str:
        """What loading a model here establishes, in one sentence for the page."""
        return "Model files: " + self.trust_policy().describe() + "."

    def _remember_own_model(self, path: Path) -> None:
        """List a model this demo just wrote among the ones it trusts (its data folder is its own)."""
        import json

        from imaging_ad.io.checksum import file_sha256

        own = self.config.models_dir / self.OWN_MODELS
        listing = json.loads(own.read_text()) if own.is_file() else {"models": []}
        listing["models"].append({"file": path.name, "sha256": file_sha256(path)})
        tmp = own.with_name(own.name + ".partial")
        tmp.write_text(json.dumps(listing, indent=2))
        tmp.replace(own)

    # -- inspect ------------------------------------------------------------------------------------

    def store_upload(self, upload: str | os.PathLike, name: str | None = None) -> Path:
        """Copy an uploaded image into media/uploads, named by content hash (the same image twice is one
        file and one review item)."""
        src = Path(upload)
        check_upload_name(name or src.name, IMAGE_SUFFIXES)
        if src.stat().st_size > self.config.max_upload_bytes:
            raise UnsafeInputError(f"{src.name}: over the upload limit of {self.config.max_upload_mb} MB")
        digest = hashlib.sha256()
        with src.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        target = (
            self.config.media_dir / "uploads" / f"{digest.hexdigest()[:16]}_{safe_name(name or src.name)}"
        )
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".partial")
            shutil.copyfile(src, tmp)
            tmp.replace(target)
        return target

    def inspect(
        self, upload: str | os.PathLike, model_label: str | None = None, model_path: str | None = None
    ) -> InspectResult:
        """Score one uploaded image with the chosen model and put it in the review queue."""
        from imaging_ad.visualize import ColourScale, overlay_with_legend, save_png, to_display_rgb

        entry = self.resolve_model(model_label, model_path)
        detector = self.detector(entry)
        name = Path(upload).name
        stored = self.store_upload(upload, name)
        start = time.perf_counter()
        record = read_image(stored, max_pixels=self.config.max_pixels)
        result = detector.predict([record])[0]
        if result.error is not None:  # a NaN score or map: a message, never a verdict
            raise ValueError(f"{name}: {result.error}")
        model_seconds = time.perf_counter() - start
        release_freed_memory()
        calibration = detector.calibration_
        display = to_display_rgb(record.pixels)
        sha = fingerprint(entry.path)
        overlay_path = self.config.media_dir / "overlays" / f"{stored.stem}_{sha[:12]}.png"
        save_png(overlay_path, overlay_with_legend(display, result.heatmap, ColourScale.of(calibration)))
        item_id = self.store.add_item(
            NewItem(
                image_path=str(stored),
                display_name=name,
                source="inspect",
                model_name=entry.name,
                model_sha=sha,
                score=result.score,
                normalized_score=result.normalized_score,
                threshold=calibration.image_threshold,
                overlay_path=str(overlay_path),
                width=record.meta.width,
                height=record.meta.height,
            )
        )
        return InspectResult(
            name=name,
            image_path=stored,
            display=display,
            heatmap=result.heatmap,
            score=result.score,
            normalized_score=result.normalized_score,
            threshold=calibration.image_threshold,
            pixel_threshold=calibration.pixel_threshold,
            score_scale=calibration.score_scale,
            target_fpr=calibration.target_fpr,
            meta=image_meta_summary(record),
            model_name=entry.name,
            model_sha=sha,
            item_id=item_id,
            model_seconds=model_seconds,
            calibration=calibration,
            domain_score=result.domain_score,
            out_of_domain=result.out_of_domain,
        )

    # -- inputs for batch and learn -------------------------------------------------------------------

    def gather_inputs(
        self, uploads: Sequence[str | os.PathLike], folder: str | None, dest: Path
    ) -> tuple[Path, list[str]]:
        """A folder of images to work on: the typed server folder (checked against the allowed roots), or
        ``dest`` filled with the uploads (zips extracted safely). Returns (folder, notes)."""
        notes: list[str] = []
        if folder and folder.strip():
            root = resolve_within(folder, self.config.allowed_roots)
            if not root.is_dir():
                raise UnsafeInputError(f"{folder} is not a folder")
            if is_within(self.config.data_dir, root):  # would read the demo's own uploads and results
                raise UnsafeInputError(f"{folder} contains the demo's data folder; choose a folder inside it")
            return root, notes
        if not uploads:
            raise ValueError("upload images (or a zip of images), or give a server folder")
        dest.mkdir(parents=True, exist_ok=True)
        n_files = 0
        for upload in uploads:
            path = Path(upload)
            suffix = check_upload_name(path)
            if suffix == ".zip":
                if path.stat().st_size > self.config.max_upload_bytes:
                    raise UnsafeInputError(
                        f"{path.name}: over the upload limit of {self.config.max_upload_mb} MB"
                    )
                extracted = safe_extract_zip(path, dest / safe_name(path.stem, "zip"), self.config.zip_limits)
                n_files += len(extracted.files)
                if extracted.skipped:
                    notes.append(f"{path.name}: skipped {len(extracted.skipped)} non-image member(s)")
            else:
                copy_upload(path, _free_folder(dest, path.name), self.config.max_upload_bytes)
                n_files += 1
            if n_files > self.config.max_batch_files:
                raise UnsafeInputError(f"more than {self.config.max_batch_files} files in one batch")
        if n_files == 0:
            raise ValueError("no image files in the upload")
        return dest, notes

    # -- batch --------------------------------------------------------------------------------------

    def run_batch(
        self,
        uploads: Sequence[str | os.PathLike],
        folder: str | None = None,
        model_label: str | None = None,
        model_path: str | None = None,
        progress: ProgressFn | None = None,
    ) -> BatchResult:
        """Scan uploads or an allowed server folder with the library scan; results enter the review queue."""
        import imaging_ad
        from imaging_ad.scan import read_rows

        entry = self.resolve_model(model_label, model_path)
        detector = self.detector(entry)
        batch_id = _stamp()
        batch_dir = self.config.media_dir / "batches" / batch_id
        input_dir, notes = self.gather_inputs(uploads, folder, batch_dir / "input")
        out_dir = batch_dir / "scan"

        def on_progress(p) -> None:  # imaging_ad.scan.ScanProgress
            if progress is not None and p.total:
                progress(p.done / p.total, f"{p.done}/{p.total} images, {p.flagged} flagged")

        summary = imaging_ad.scan(
            input_dir,
            entry.path,
            out_dir,
            heatmaps="all",
            detector=detector,
            progress=on_progress,
            # a link inside an allowed folder must not lead out of it; a header's size bounds memory
            allowed_roots=[*self.config.allowed_roots, self.config.media_dir],
            max_pixels=self.config.max_pixels,
            # one reader: each image in flight costs ~54 bytes per pixel at its peak (decoding,
            # preprocessing, the overlay), 1.3 GB at the 25 MP cap; the model is the bottleneck anyway
            workers=1,
        )
        if summary.n_files > self.config.max_batch_files:
            notes.append(
                f"{summary.n_files} files: more than the usual limit of {self.config.max_batch_files}"
            )
        rows = list(read_rows(out_dir))
        sha = summary.model_fingerprint
        items = []
        for row in rows:
            row["overlay_abs"] = str(out_dir / row["heatmap"]) if row.get("heatmap") else None
            if row.get("score") is None:
                continue
            items.append(
                NewItem(
                    image_path=str(input_dir / row["path"]),
                    display_name=row["path"],
                    source=f"batch:{batch_id}",
                    model_name=entry.name,
                    model_sha=sha,
                    score=float(row["score"]),
                    normalized_score=float(row["normalized_score"]),
                    threshold=float(row["threshold"]),
                    overlay_path=row["overlay_abs"],
                    width=row.get("width"),
                    height=row.get("height"),
                )
            )
        self.store.add_items(items)
        release_freed_memory()  # large images were decoded: give the memory back between requests
        rows.sort(key=lambda r: (r.get("score") is None, -(r.get("score") or 0.0)))
        return BatchResult(
            batch_id=batch_id,
            n_files=summary.n_files,
            n_scored=len(items),
            n_flagged=summary.n_flagged,
            n_errors=summary.n_errors,
            seconds=summary.seconds,
            rows=rows,
            csv_path=summary.results_csv,
            report_path=summary.report,
            notes=notes + list(summary.warnings),
        )

    # -- learn --------------------------------------------------------------------------------------

    def learn(
        self,
        uploads: Sequence[str | os.PathLike],
        folder: str | None,
        detector_name: str,
        model_name: str,
        image_size: int = 224,
        backbone: str = "tf_efficientnet_lite0",
        params: dict[str, Any] | None = None,
    ) -> ModelEntry:
        """Fit a detector on normal images and save it in the models folder (offered in Inspect from then)."""
        from imaging_ad.data import collect_images
        from imaging_ad.detectors import create_detector

        name = safe_name(model_name.strip(), "")
        if not name:
            raise ValueError("give the new model a name")
        out = self.config.models_dir / f"{name}.safetensors"
        if out.exists():
            raise ValueError(f"a model named {name} exists already; choose another name")
        work = self.config.media_dir / "learn" / _stamp()
        folder_in, _ = self.gather_inputs(uploads, folder, work / "input")
        images = collect_images(folder_in, confine_to=[*self.config.allowed_roots, self.config.media_dir])
        if len(images) > self.config.max_batch_files:
            raise UnsafeInputError(
                f"{len(images)} images, more than the limit of {self.config.max_batch_files}"
            )
        if len(images) < 5:
            raise ValueError(f"{len(images)} image(s) found; fitting needs at least 5 normal images")
        self._check_pixel_counts(images)
        detector = create_detector(
            detector_name,
            backbone=backbone,
            image_size=int(image_size),
            device=self.config.device,
            progress=True,  # tqdm bars, which Gradio's progress tracks
            **(params or {}),
        )
        detector.fit(images)
        detector.save(out)
        self._remember_own_model(out)
        return next(m for m in self.models() if m.path == out.resolve())

    def _check_pixel_counts(self, images: Sequence[Path]) -> None:
        """Refuse images over the pixel limit from their headers, before fitting decodes any of them
        (fitting reads a batch of images at a time: the same memory bound as Inspect and Batch)."""
        from imaging_ad.io import ImageTooLargeError, read_size

        for path in images:
            height, width = read_size(path)
            if height * width > self.config.max_pixels:
                raise ImageTooLargeError(
                    path,
                    f"{width}x{height} pixels exceeds the limit of {self.config.max_pixels:,} "
                    "(--max-megapixels); remove it or start the demo with a higher limit",
                )

    # -- review -------------------------------------------------------------------------------------

    def display_image(self, path: str) -> np.ndarray | None:
        """An item's image for display, read only from the data folder or an allowed root."""
        from imaging_ad.visualize import to_display_rgb

        roots = [self.config.media_dir, *self.config.allowed_roots]
        if not any(is_within(path, r) for r in roots) or not Path(path).is_file():
            return None
        try:
            return to_display_rgb(read_image(path, max_pixels=self.config.max_pixels).pixels)
        except Exception:  # noqa: BLE001  (a file changed since it was scored: show nothing, keep reviewing)
            return None

    def overlay_path(self, item: QueueItem) -> str | None:
        path = item.overlay_path
        if path and is_within(path, self.config.media_dir) and Path(path).is_file():
            return path
        return None

    def browser_secret(self) -> str:
        """The key Gradio encrypts browser-stored values with (the reviewer's name), kept in the data folder
        so that they still read after a restart."""
        path = self.config.data_dir / "browser-secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return path.read_text().strip()

    def export_verdicts(self, history: bool = False) -> Path:
        out = self.config.media_dir / "exports" / f"verdicts-{_stamp()}.csv"
        return self.store.export_csv(out, history=history)

    def export_dicom(self, progress: ProgressFn | None = None) -> tuple[Path, list[str]]:
        """DICOM results (see :mod:`imaging_ad.dicom_results`) for the DICOM images of the queue that are
        flagged: reviewed as anomalous, or unreviewed and above their model's threshold (an image reviewed
        as normal or unsure is left out). Each is scored again with its model for the float heatmap.
        Returns a zip of the objects and notes on what was left out."""
        from imaging_ad.dicom_results import DicomResultWriter, require_highdicom
        from imaging_ad.io.reader import is_dicom_bytes

        require_highdicom()
        notes: list[str] = []
        chosen: dict[str, list[QueueItem]] = {}
        for item in self.store.queue():
            flagged = item.verdict == "anomalous" or (item.verdict is None and item.normalized_score > 0.5)
            if not flagged or not Path(item.image_path).is_file():
                continue
            with open(item.image_path, "rb") as handle:
                if is_dicom_bytes(handle.read(132)):
                    chosen.setdefault(item.model_sha, []).append(item)
        if not chosen:
            raise ValueError(
                "no flagged DICOM images in the review queue (flagged: reviewed as anomalous, or unreviewed above the threshold)"
            )
        out = self.config.media_dir / "exports" / f"dicom-{_stamp()}"
        models = {fingerprint(m.path): m for m in self.models()}
        done = 0
        total = sum(len(items) for items in chosen.values())
        writers = []
        for sha, items in chosen.items():
            entry = models.get(sha)
            if entry is None:
                notes.append(f"{len(items)} image(s) scored by a model that is no longer available: left out")
                continue
            detector = self.detector(entry)
            calibration = detector.calibration_
            writer = DicomResultWriter(out, model_name=entry.name, model_fingerprint=sha)
            writers.append(writer)
            for item in items:
                record = read_image(item.image_path)
                result = detector.predict([record])[0]
                writer.add(
                    item.image_path,
                    result.heatmap,
                    result.score,
                    calibration.image_threshold,
                    pixels=record.pixels,
                    pixel_threshold=calibration.pixel_threshold,
                    pixel_upper=calibration.pixel_upper,
                )
                done += 1
                if progress is not None:
                    progress(done / total, f"{done}/{total} DICOM images")
        if not writers:
            raise ValueError("; ".join(notes))
        writers[-1].finish()  # the index in `out` holds every model's images: one selection per study
        archive = shutil.make_archive(str(out), "zip", root_dir=out)
        return Path(archive), notes

    # -- feedback -----------------------------------------------------------------------------------

    def calibration(self, entry: ModelEntry):  # -> Calibration
        from imaging_ad.calibration import Calibration
        from imaging_ad.detectors import read_description

        return Calibration.from_dict(read_description(entry.path)["calibration"])

    def next_version_path(self, entry: ModelEntry) -> Path:
        base = entry.name.split("-v")[0] if entry.source == "user" else entry.name
        for version in range(2, 10_000):
            candidate = self.config.models_dir / f"{safe_name(base)}-v{version}.safetensors"
            if not candidate.exists():
                return candidate
        raise ValueError("too many versions")

    def recalibrate(self, entry: ModelEntry) -> tuple[Path, Any]:
        """A new version of a model re-calibrated on the images reviewed as normal (site calibration: the
        thresholds and the out-of-domain guard learn this site's normals, no refit). Returns (path,
        calibration)."""
        from imaging_ad.detectors import load_detector

        readable = self._reviewed_normals(entry)
        if len(readable) < 2:
            raise ValueError(
                f"{len(readable)} image(s) reviewed as normal for {entry.name}: re-calibration needs at least 2"
            )
        detector = load_detector(entry.path, device=self.config.device, trust=self.trust_policy())
        detector.progress = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the calibration's own warnings are shown on the page
            detector.recalibrate(
                readable, source=f"site calibration in the demo: {len(readable)} reviewed normals"
            )
        path = detector.save(self.next_version_path(entry))
        self._remember_own_model(path)
        return path, detector.calibration_

    def _reviewed_normals(self, entry: ModelEntry) -> list[str]:
        """Images reviewed as normal for the model that are still readable inside the allowed folders."""
        normals = [i for i in self.store.labelled(fingerprint(entry.path)) if i.verdict == "normal"]
        return [
            i.image_path
            for i in normals
            if any(is_within(i.image_path, r) for r in [self.config.media_dir, *self.config.allowed_roots])
            and Path(i.image_path).is_file()
        ]

    def add_normals_to_bank(self, entry: ModelEntry) -> feedback.BankExtension:
        """A new version of a PatchCore model with the images reviewed as normal in its memory bank and its
        thresholds recalibrated (see :func:`feedback.extend_patchcore_bank`)."""
        readable = self._reviewed_normals(entry)
        if not readable:
            raise ValueError(f"no images reviewed as normal for {entry.name} (that are still readable)")
        extension = feedback.extend_patchcore_bank(
            entry.path,
            readable,
            self.next_version_path(entry),
            device=self.config.device,
            trust=self.trust_policy(),
        )
        self._remember_own_model(extension.path)
        return extension

    def recent_scores(self, sha: str, n: int = 200) -> list[float]:
        items = sorted(self.store.queue(sha), key=lambda i: (i.created_at, i.id), reverse=True)
        return [i.score for i in items[:n]]
