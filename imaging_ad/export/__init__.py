"""Export a fitted detector to one ONNX or TorchScript graph (preprocessed images -> score, heatmap),
with a JSON sidecar, and run it where torch is absent (:mod:`imaging_ad.export.runtime`).

Names load lazily: ``imaging_ad.export.runtime`` must stay importable without torch, and importing it
runs this file first.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_LAZY = {
    "export_model": "imaging_ad.export.exporter",
    "verify_export": "imaging_ad.export.exporter",
    "ExportedFiles": "imaging_ad.export.exporter",
    "EXPORT_FORMATS": "imaging_ad.export.exporter",
    "build_graph": "imaging_ad.export.graph",
    "exportable_detectors": "imaging_ad.export.graph",
    "load_exported": "imaging_ad.export.runtime",
    "ExportedModel": "imaging_ad.export.runtime",
    "ExportedResult": "imaging_ad.export.runtime",
    "is_exported_model": "imaging_ad.export.sidecar",
    "read_sidecar": "imaging_ad.export.sidecar",
    "ExportError": "imaging_ad.export.errors",
    "with_runtime": "imaging_ad.export.compiled",
    "load_model": "imaging_ad.export.compiled",
    "CompiledDetector": "imaging_ad.export.compiled",
    "RUNTIMES": "imaging_ad.export.compiled",
    "ExportedModelError": "imaging_ad.export.errors",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from imaging_ad.export.compiled import RUNTIMES, CompiledDetector, load_model, with_runtime  # noqa: F401
    from imaging_ad.export.errors import ExportedModelError, ExportError  # noqa: F401
    from imaging_ad.export.exporter import EXPORT_FORMATS, ExportedFiles, export_model, verify_export  # noqa: F401
    from imaging_ad.export.graph import build_graph, exportable_detectors  # noqa: F401
    from imaging_ad.export.runtime import ExportedModel, ExportedResult, load_exported  # noqa: F401
    from imaging_ad.export.sidecar import is_exported_model, read_sidecar  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imaging_ad.export' has no attribute {name!r}")
