"""Save and load fitted detectors: one ``.safetensors`` file, its JSON description in the header.

No pickle: tensors go through safetensors, everything else is JSON. A SHA-256 over the description
and every tensor's bytes detects truncation and tampering; a format version guards compatibility.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import imaging_ad
from imaging_ad.trust import TrustPolicy, verify_model

FORMAT = "imaging_ad.detector"
FORMAT_VERSION = 1
_METADATA_KEY = "imaging_ad"
_STATE_PREFIX = "state."


class ModelFileError(ValueError):
    """A model file that cannot be trusted or used: truncated, tampered, or of another version."""


def save_detector(detector, path: Path) -> Path:  # a fitted Detector
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    tensors = {_STATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in detector.learned_state().items()}
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **fitted_model_description(detector),
        "versions": software_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    description["sha256"] = _digest(description, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={_METADATA_KEY: json.dumps(description)})
    tmp.replace(path)  # never leave a half-written model under the real name
    return path


def fitted_model_description(detector) -> dict:  # a fitted Detector
    """What a fitted model is, for a model file or an export's sidecar: detector, hyperparameters,
    backbone (weights, normalisation, stages), preprocessing and calibration."""
    extractor = detector.extractor_
    return {
        "detector": detector.name,
        "params": detector.get_params(),
        "backbone": {
            "name": extractor.name,
            "weight_source": extractor.weight_source.to_dict(),
            "normalization": extractor.normalization.to_dict(),
            "channels": extractor.info.channels,
            "reductions": extractor.info.reductions,
        },
        "preprocessing": detector.preprocessor_.to_dict(),
        "calibration": detector.calibration_.to_dict(),
    }


def software_versions() -> dict[str, str]:
    return {
        "imaging_ad": imaging_ad.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def read_description(path: Path) -> dict:
    """The JSON description of a model file, without loading (or verifying) its tensors."""
    _check_safetensors_header(Path(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except FileNotFoundError as exc:
        raise ModelFileError(f"{path}: model file does not exist") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable model file (truncated or corrupt?): {exc}") from exc
    if _METADATA_KEY not in metadata:
        raise ModelFileError(f"{path}: a safetensors file, but not an imaging_ad model")
    try:
        description = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: model description is not valid JSON (tampered?)") from exc
    if description.get("format") != FORMAT:
        raise ModelFileError(f"{path}: unknown model format {description.get('format')!r}")
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is not supported by imaging_ad {imaging_ad.__version__} "
            f"(supports {FORMAT_VERSION}); refit the model or use the imaging_ad version that wrote it "
            f"({description.get('versions', {}).get('imaging_ad', 'unknown')})"
        )
    return description


def _check_safetensors_header(path: Path) -> None:
    """Refuse a file that is not safetensors at all (an image, an ONNX file, a pickle) by its first bytes,
    naming it as such: safetensors itself would report e.g. "header too large" for a PNG."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError as exc:
        raise ModelFileError(f"{path}: model file does not exist") from exc
    except IsADirectoryError as exc:
        raise ModelFileError(f"{path}: is a folder, not an imaging_ad model file (.safetensors)") from exc
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    # safetensors: an 8-byte little-endian header length, then that many bytes of JSON
    header_length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if head[8:9] == b"{" and header_length > size - 8:
        raise ModelFileError(
            f"{path}: truncated model file: its header needs {header_length + 8} bytes, the file has {size}"
        )
    if head[8:9] != b"{":
        kind = _file_kind(head)
        raise ModelFileError(
            f"{path}: not an imaging_ad model file{f' (it looks like {kind})' if kind else ''}; a model "
            "file is the .safetensors that `imaging-ad fit` writes (exported models: .onnx or .pt with "
            "their .json sidecar)"
        )


def _file_kind(head: bytes) -> str | None:
    signatures = {
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"PK\x03\x04": "a zip archive (a torch .pt/.pth file is one)",
        b"\x80": "a Python pickle",
        b"II*\x00": "a TIFF image",
        b"MM\x00*": "a TIFF image",
        b"BM": "a BMP image",
    }
    for magic, kind in signatures.items():
        if head.startswith(magic):
            return kind
    if not head:
        return "an empty file"
    return None


def read_model(path: Path, trust: TrustPolicy | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, saved state tensors) of a model file, its checksum verified, and with a trust policy
    (``trust``, else the environment's, see :mod:`imaging_ad.trust`) its signature or listed hash."""
    path = Path(path)
    verify_model(path, trust)  # authenticity, when configured; the checksum below is integrity only
    description = read_description(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            # cloned into torch's own (aligned) allocations: BLAS kernels may take another path on the
            # file buffer's alignment, and loaded models must score bit-identically to the saved ones
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: tensor data cannot be read (truncated or corrupt?): {exc}") from exc
    expected = description.pop("sha256", None)
    if expected is None or _digest(description, tensors) != expected:
        raise ModelFileError(
            f"{path}: checksum mismatch: the file was modified or damaged after it was saved "
            "(this checksum detects damage, not forgery; see `imaging-ad sign` for authenticity)"
        )
    state = {k[len(_STATE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_STATE_PREFIX)}
    return description, state


@contextmanager
def describes_its_tensors(path: Path, detector: str) -> Iterator[None]:
    """A description that does not fit its tensors (a PaDiM file relabelled PatchCore, a tensor missing,
    a misshapen one): a :class:`ModelFileError` that says so instead of a traceback."""
    try:
        yield
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        what = f"missing entry {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ModelFileError(
            f"{path}: the model's description does not match its content for detector {detector!r} ({what}); "
            "the file was edited or assembled from different models. Use the file as it was saved, or refit"
        ) from exc


def check_backbone(detector, description: dict) -> None:
    """The backbone a model was fitted on must be the one found now, or scores would not compare."""
    saved = description["backbone"]["weight_source"]
    source = detector.extractor_.weight_source
    if saved["kind"] != source.kind or (saved.get("sha256") and saved["sha256"] != source.sha256):
        raise ModelFileError(
            f"the model was fitted on backbone weights {saved}, but the weights found now are "
            f"{source.to_dict()}; scores would not be comparable"
        )


def _digest(description: dict, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(
            np.ascontiguousarray(
                tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
            ).tobytes()
        )
    return digest.hexdigest()
