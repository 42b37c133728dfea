"""The backbone alone as an ONNX graph (feature maps out), for detectors whose head must stay in torch
(:func:`imaging_ad.export.compiled.uses_graph_search`): written with the same static padding as the full
export graph and checked against the detector's feature module before it is kept."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from imaging_ad.detectors import Detector
from imaging_ad.export.errors import ExportedModelError, ExportError
from imaging_ad.export.onnx import DEFAULT_OPSET, trace_to_onnx
from imaging_ad.export.runtime import OnnxBackend
from imaging_ad.export.static_padding import with_static_padding
from imaging_ad.io.checksum import file_sha256

#: largest difference of a feature map, relative to its largest magnitude, the file may have
FEATURES_RTOL = 1e-4


def export_features(detector: Detector, path: Path, seed: int = 0) -> tuple[Path, dict]:
    """Write the detector's feature module (CPU, float32, static padding) to ``path``; returns the path and
    the check (random batch, the file against the module) that a sidecar keeps."""
    detector._check_fitted()
    size = detector.preprocessor_.image_size
    module = copy.deepcopy(detector.feature_module()).cpu().float().eval()
    module = with_static_padding(module, size)
    with torch.inference_mode():
        n_outputs = len(module(torch.zeros(1, 3, size, size)))
    outputs = [f"features_{i}" for i in range(n_outputs)]
    trace_to_onnx(
        module, torch.zeros(2, 3, size, size), path, outputs, DEFAULT_OPSET, "ONNX export of the backbone"
    )
    images = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = [f.numpy() for f in module(torch.from_numpy(images))]
    got = OnnxBackend(path, device="cpu")(images)
    difference = max(
        float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-12)) for g, e in zip(got, expected, strict=True)
    )
    if difference > FEATURES_RTOL:
        raise ExportError(f"the backbone's ONNX graph does not reproduce it: {difference:.2e} of the maximum")
    return path, {
        "graph": "backbone feature maps",
        "model_sha256": file_sha256(path),
        "max_feature_difference_relative_to_max": difference,
    }


def load_features(path: Path, device: str = "cpu", threads: int | None = None) -> OnnxBackend:
    """The backbone graph's session, after checking the file against its sidecar's SHA-256."""
    import json

    sidecar = path.with_name(path.name + ".json")
    if file_sha256(path) != json.loads(sidecar.read_text()).get("model_sha256"):
        raise ExportedModelError(f"{path}: checksum mismatch with its sidecar: damaged or swapped")
    return OnnxBackend(path, device=device, threads=threads)
