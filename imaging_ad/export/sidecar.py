"""The JSON file that travels with every exported model (``<model file>.json``); torch-free.

It says everything needed to use the graph without the checkpoint: the preprocessing (as
``Preprocessor.to_dict()``), the calibration, the detector and backbone, versions, and the SHA-256 of
the model file, which is checked on load so a swapped or damaged file is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imaging_ad.export.errors import ExportedModelError

FORMAT = "imaging_ad.export"
FORMAT_VERSION = 1
SUFFIX = ".json"
#: file suffix -> model format, for files given without their sidecar being consulted first
MODEL_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}


def sidecar_path(model_path: str | os.PathLike) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + SUFFIX)


def is_exported_model(path: str | os.PathLike) -> bool:
    """An exported model (by suffix, or by an imaging_ad export sidecar next to it), not a checkpoint."""
    path = Path(path)
    if path.suffix.lower() in MODEL_SUFFIXES:
        return True
    side = sidecar_path(path)
    if not side.is_file():
        return False
    try:
        return json.loads(side.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_sidecar(model_path: str | os.PathLike) -> dict:
    """The sidecar of ``model_path``, validated for format and version (not yet the checksum)."""
    side = sidecar_path(model_path)
    if not side.is_file():
        raise ExportedModelError(
            f"{model_path}: its sidecar {side.name} is missing; an exported model needs it for preprocessing "
            "and thresholds (export again with imaging-ad export)"
        )
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise ExportedModelError(f"{side}: not readable JSON: {exc}") from exc
    if data.get("format") != FORMAT:
        raise ExportedModelError(f"{side}: not an imaging_ad export sidecar (format {data.get('format')!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ExportedModelError(
            f"{side}: export format version {data.get('format_version')} is not supported (supports "
            f"{FORMAT_VERSION}); export the model again with this imaging_ad version"
        )
    return data
