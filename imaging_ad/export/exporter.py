"""``export_model``: a fitted detector (or its checkpoint file) -> ONNX or TorchScript file + JSON sidecar.

After writing, the file is loaded back with the same runtime ``imaging-ad predict`` uses and scored on a
fixed pseudo-random batch next to the detector itself; the differences go into the sidecar, and an
export that does not reproduce the detector is refused (files removed) rather than shipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from imaging_ad.detectors import Detector, load_detector, read_description
from imaging_ad.detectors.components.smoothing import gaussian_kernel
from imaging_ad.detectors.persistence import fitted_model_description, software_versions
from imaging_ad.export.errors import ExportError
from imaging_ad.export.graph import ExportGraph, build_graph
from imaging_ad.export.onnx import DEFAULT_OPSET, write_onnx
from imaging_ad.export.sidecar import FORMAT, FORMAT_VERSION, sidecar_path
from imaging_ad.export.torchscript import write_torchscript
from imaging_ad.io.checksum import file_sha256
from imaging_ad.trust import TrustPolicy

#: relative score and heatmap (relative to the heatmap's maximum) differences an export must stay within
SCORE_RTOL = 1e-4
HEATMAP_RTOL = 1e-3


#: format name -> writer (graph, path, image size, opset) and accepted file suffixes (the first is
#: appended when the name has none)
WRITERS: dict[str, tuple[Callable[..., dict], tuple[str, ...]]] = {
    "onnx": (write_onnx, (".onnx",)),
    "torchscript": (write_torchscript, (".pt", ".ts")),
}
EXPORT_FORMATS = tuple(WRITERS)


@dataclass
class ExportedFiles:
    """What :func:`export_model` wrote, and how closely the file reproduced the detector."""

    model: Path
    sidecar: Path
    format: str
    verification: dict = field(default_factory=dict)


def export_model(
    model: Detector | str | os.PathLike,
    out: str | os.PathLike,
    format: str = "onnx",
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> ExportedFiles:
    """Export a fitted detector or a ``.safetensors`` checkpoint to ``out`` (+ ``out.json``).

    The file maps the *preprocessed* batch ``(B, 3, S, S)`` (see the sidecar's ``preprocessing``) to
    image scores ``(B,)`` and Gaussian-smoothed heatmaps ``(B, S, S)`` at model-input resolution.
    Raises :class:`ExportError` for a detector whose scoring cannot be exported exactly.
    """
    if format not in WRITERS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    write, suffixes = WRITERS[format]
    source: dict = {"checkpoint": None, "checkpoint_sha256": None}
    if isinstance(model, Detector):
        detector = model
    else:
        source = {
            "checkpoint": str(Path(model).resolve()),
            "checkpoint_sha256": read_description(Path(model))["sha256"],
        }
        detector = load_detector(Path(model), device="cpu")
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        path = path.with_name(path.name + suffixes[0])
    path.parent.mkdir(parents=True, exist_ok=True)

    graph = build_graph(detector)
    size = detector.preprocessor_.image_size
    tmp = path.with_name(path.name + ".partial")
    try:
        details = write(graph, tmp, size, opset)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    description = _describe(detector, graph, format, details, source)
    description["model_sha256"] = file_sha256(path)
    side = sidecar_path(path)
    _write_json(side, description)
    files = ExportedFiles(path, side, format)
    if verify:
        try:
            files.verification = verify_export(graph, path, size)
        except ExportError:
            path.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            raise
        description["verification"] = files.verification
        _write_json(side, description)
    return files


def verify_export(graph: ExportGraph, path: Path, image_size: int, n_images: int = 2, seed: int = 0) -> dict:
    """Score a fixed pseudo-random batch with the exported file and with the graph it was written from
    (the detector's own feature module, head and smoothing, run eagerly); raise :class:`ExportError`
    beyond the tolerances."""
    from imaging_ad.export.runtime import load_exported

    batch = (
        np.random.default_rng(seed).standard_normal((n_images, 3, image_size, image_size)).astype(np.float32)
    )
    with torch.inference_mode():
        expected_scores, expected_maps, *expected_guard = (t.numpy() for t in graph(torch.from_numpy(batch)))
    # the file just written is checked against the graph itself: no trust policy applies to it (it is
    # signed, if at all, after export)
    scores, maps, *guard = load_exported(path, device="cpu", trust=TrustPolicy()).score_batch(batch)
    result = {
        "images": n_images,
        "input": f"standard normal noise, seed {seed}",
        "max_score_relative_difference": _max_relative(scores, expected_scores),
        "max_heatmap_difference_relative_to_max": float(
            np.abs(maps - expected_maps).max() / max(np.abs(expected_maps).max(), 1e-12)
        ),
    }
    if expected_guard:
        result["max_domain_distance_relative_difference"] = _max_relative(guard[0], expected_guard[0])
    if (
        result["max_score_relative_difference"] > SCORE_RTOL
        or result["max_heatmap_difference_relative_to_max"] > HEATMAP_RTOL
        or result.get("max_domain_distance_relative_difference", 0.0) > SCORE_RTOL
    ):
        raise ExportError(f"the exported model does not reproduce the detector's graph: {result}")
    return result


def _max_relative(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = np.maximum(np.abs(expected), 1e-12)
    return float((np.abs(np.asarray(actual, np.float64) - expected) / scale).max())


def _describe(detector: Detector, graph: ExportGraph, format: str, details: dict, source: dict) -> dict:
    size = detector.preprocessor_.image_size
    sigma = detector.blur_sigma
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": None,  # filled below: the sidecar must name the file it belongs to
        "model_format": format,
        **fitted_model_description(detector),
        "graph": {
            "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"},
            "outputs": {
                "scores": {"shape": ["batch"], "dtype": "float32"},
                "heatmaps": {"shape": ["batch", size, size], "dtype": "float32"},
                **(
                    {"domain_distances": {"shape": ["batch"], "dtype": "float32"}}
                    if graph.guard is not None
                    else {}
                ),
            },
            "heatmap_smoothing": {
                "upsampling": "bilinear, half-pixel centres (align_corners=False)",
                "gaussian_sigma": sigma,
                "gaussian_kernel_size": int(gaussian_kernel(sigma).size) if sigma > 0 else 0,
                "border": "reflect-101 (cv2.BORDER_REFLECT_101)",
            },
            **detector.export_notes(),
            **details,
        },
        "source": source,
        "versions": software_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json(path: Path, description: dict) -> None:
    description["model_file"] = path.name[: -len(".json")]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(description, indent=2))
    tmp.replace(path)
