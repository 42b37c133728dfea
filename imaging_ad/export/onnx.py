"""Write an export graph as ONNX (torch's TorchScript-based exporter: no onnxscript needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from imaging_ad.export.errors import ExportError
from imaging_ad.export.graph import ExportGraph

DEFAULT_OPSET = 17
INPUT_NAME = "images"


def write_onnx(graph: ExportGraph, path: Path, image_size: int, opset: int = DEFAULT_OPSET) -> dict:
    """Export ``graph`` for inputs ``(batch, 3, image_size, image_size)``; returns format details for the
    sidecar. ``dynamo=False`` selects the tracing exporter: the graph is a fixed sequence of tensor
    operations, which it captures exactly, and it needs no extra package."""
    try:
        import onnx
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs the onnx package: pip install onnx (or imaging-ad[export])"
        ) from exc
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: the batch axis must stay symbolic
    trace_to_onnx(graph, example, path, list(graph.output_names), opset, "ONNX export")
    onnx.checker.check_model(str(path), full_check=True)
    return {"onnx_opset": opset, "onnx": onnx.__version__}


def trace_to_onnx(
    module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: list[str], opset: int, what: str
) -> None:
    """Trace ``module`` on ``example`` into ``path``, every input and output's first axis a free batch
    axis; an exporter failure becomes an :class:`ExportError` that says ``what`` failed (the exporter's
    own errors name the operator it could not express)."""
    batch = {0: "batch"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notice of the TorchScript-based exporter
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes={INPUT_NAME: batch, **{name: batch for name in outputs}},
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001  (any exporter failure means no file to run)
        raise ExportError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
