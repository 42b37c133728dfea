"""Write an export graph as TorchScript (a zip archive made by ``torch.jit.save``; no pickle of Python
objects) and run one with ``torch.jit.load``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            scores, heatmaps = self.module(torch.from_numpy(batch).to(self.device))
        return scores.float().cpu().numpy(), heatmaps.float().cpu().numpy()
