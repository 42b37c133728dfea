"""Run an exported model from image files with numpy, OpenCV/PIL/pydicom (the image reader) and
onnxruntime only — no torch, timm or albumentations — so it works on a machine that has just those.

    from imaging_ad.export.runtime import load_exported
    model = load_exported("tiles.onnx")          # reads tiles.onnx.json, checks the SHA-256
    results = model.predict(["a.png", "b.dcm"])  # score, normalized_score, is_anomaly, heatmap, path

Results match the checkpoint's ``predict``: the same reader, the same preprocessing (rebuilt from the
sidecar), the same thresholds and the same inference stream (:mod:`imaging_ad.inference`), heatmaps at
each image's original size. TorchScript files run through torch (imported only for them).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imaging_ad.calibration import Calibration
from imaging_ad.export.errors import ExportedModelError
from imaging_ad.export.sidecar import is_exported_model, read_sidecar, sidecar_path
from imaging_ad.inference import predict_all
from imaging_ad.io import ImageRecord
from imaging_ad.io.checksum import file_sha256
from imaging_ad.preprocess import Preprocessor
from imaging_ad.result import AnomalyResult
from imaging_ad.trust import TrustPolicy, verify_model

__all__ = ["ExportedModel", "ExportedResult", "OnnxBackend", "is_exported_model", "load_exported"]


#: the results of an exported model are the checkpoint's own result type, which imports no torch
ExportedResult = AnomalyResult


class Backend(Protocol):
    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]: ...


class OnnxBackend:
    """onnxruntime session: (B, 3, S, S) float32 -> (scores (B,), heatmaps (B, S, S)[, domain distances (B,)])."""

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError(
                "running an ONNX model needs onnxruntime: pip install onnxruntime (or imaging-ad[export])"
            ) from exc
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "device='cuda' was asked for but onnxruntime has no CUDA provider here "
                "(install onnxruntime-gpu); use device='cpu' or 'auto'"
            )
        use_cuda = device in ("cuda", "auto") and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        # every graph optimisation: constant folding, conv+bias+activation fusion, blocked (NCHWc) layout
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # idle pool threads sleep instead of spinning: a spinning pool keeps the cores busy after each run,
        # just when the head that follows (PatchCore's faiss search, torch) needs them; spinning doubled
        # the search's time on 2 cores (benchmarks/RESULTS.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)}))


#: sidecar ``model_format`` -> "module:class" of its backend, imported on use (torch only for TorchScript)
BACKENDS = {
    "onnx": "imaging_ad.export.runtime:OnnxBackend",
    "torchscript": "imaging_ad.export.torchscript:TorchScriptBackend",
}


class ExportedModel:
    """An exported model with its sidecar: preprocessing, calibration, and a backend to run the graph.

    Offers what the inference stream uses of a detector: ``score_batch``, ``preprocessor_``,
    ``calibration_`` and ``batch_size``, and ``predict`` like a detector's.
    """

    def __init__(self, path: Path, description: dict, backend: Backend) -> None:
        self.path = path
        self.description = description
        self.backend = backend
        self.name: str = description["detector"]
        self.preprocessor_ = Preprocessor.from_dict(description["preprocessing"])
        self.calibration_ = Calibration.from_dict(description["calibration"])
        self.batch_size: int = int(description.get("params", {}).get("batch_size", 16))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        threads: int | None = None,
        verify_checksum: bool = True,
        trust: TrustPolicy | None = None,
    ) -> ExportedModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: exported model file does not exist")
        description = read_sidecar(path)
        # authenticity of the graph and its sidecar, when a trust policy is configured
        verify_model(path, trust, sidecar=sidecar_path(path))
        if verify_checksum and file_sha256(path) != description.get("model_sha256"):
            raise ExportedModelError(
                f"{path}: checksum mismatch with its sidecar: the file was modified, damaged or swapped"
            )
        spec = BACKENDS.get(description.get("model_format", ""))
        if spec is None:
            raise ExportedModelError(f"{path}: unknown model format {description.get('model_format')!r}")
        module, name = spec.split(":")
        backend_class = getattr(importlib.import_module(module), name)
        kwargs: dict[str, Any] = {"device": device}
        if threads and backend_class is OnnxBackend:
            kwargs["threads"] = threads
        try:
            return cls(path, description, backend_class(path, **kwargs))
        except (KeyError, TypeError, AttributeError) as exc:  # a sidecar missing what it must say
            raise ExportedModelError(
                f"{sidecar_path(path)}: incomplete sidecar ({type(exc).__name__}: {exc}); export the model again"
            ) from exc

    @property
    def image_size(self) -> int:
        return self.preprocessor_.image_size

    def score_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Preprocessed ``(B, 3, S, S)`` -> (scores, heatmaps at model-input size, smoothed, and the
        out-of-domain guard's feature distances, None for exports without a guard)."""
        scores, heatmaps, *guard = self.backend(np.asarray(batch, dtype=np.float32))
        distances = np.asarray(guard[0], np.float32) if guard else None
        return np.asarray(scores, np.float32), np.asarray(heatmaps, np.float32), distances

    def predict(self, images: Sequence[Any] | Any) -> list[ExportedResult]:
        """Score images (paths, :class:`ImageRecord`, arrays, or anything with ``.path``); heatmaps at each
        image's original size, verdicts from the sidecar's calibration. An unreadable image raises its error."""
        if isinstance(images, (str, os.PathLike, np.ndarray, ImageRecord)):
            images = [images]
        return predict_all(self, list(images))

    def __repr__(self) -> str:
        return f"ExportedModel({self.name}, {self.description.get('model_format')}, {self.path})"


def load_exported(
    path: str | os.PathLike,
    device: str = "auto",
    threads: int | None = None,
    verify_checksum: bool = True,
    trust: TrustPolicy | None = None,
) -> ExportedModel:
    """Load an exported model (``.onnx``, or TorchScript ``.pt``/``.ts``) with its ``<file>.json`` sidecar.
    With a trust policy (``trust``, else the environment's) both must be signed or listed as trusted."""
    return ExportedModel.load(
        path, device=device, threads=threads, verify_checksum=verify_checksum, trust=trust
    )
