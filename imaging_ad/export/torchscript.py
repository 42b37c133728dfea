"""Write an export graph as TorchScript (a zip archive made by ``torch.jit.save``; no pickle of Python
objects) and run one with ``torch.jit.load``."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from imaging_ad.export.errors import ExportedModelError
from imaging_ad.export.graph import ExportGraph


def write_torchscript(graph: ExportGraph, path: Path, image_size: int, opset: int | None = None) -> dict:
    """Trace ``graph`` (a fixed sequence of tensor operations, so tracing is exact) and save it (``opset``:
    ONNX's, unused here)."""
    example = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notice of torch.jit
        traced = torch.jit.trace(graph, (example,), check_trace=False)
        torch.jit.save(traced, str(path))
    return {"torchscript": "torch.jit.trace"}


class TorchScriptBackend:
    """Runs a saved TorchScript export graph: (B, 3, S, S) float32 -> (scores, heatmaps) as numpy."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        check_torchscript_archive(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
            except RuntimeError as exc:  # torch's reader speaks of zip internals; say what it means
                raise ExportedModelError(
                    f"{path}: not a loadable TorchScript export ({str(exc).splitlines()[0][:200]})"
                ) from exc

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(batch).to(self.device))
        return tuple(output.float().cpu().numpy() for output in outputs)


def check_torchscript_archive(path: Path) -> None:
    """Refuse, before torch reads it, a file that is not the zip archive ``torch.jit.save`` writes (a
    pickled ``.pt``, say): its name says TorchScript, its content does not."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ExportedModelError(
            f"{path}: not a TorchScript export: the file is not the zip archive torch.jit.save writes "
            "(a pickled model, for instance, which imaging_ad never loads); export the model again"
        ) from exc
    if not any("/code/" in name for name in names):  # torch.save archives hold data, no code
        raise ExportedModelError(
            f"{path}: not a TorchScript export: a zip archive, but without TorchScript code; export the model again"
        )
