"""The models the demo can use: the shipped ones (``weights/registry.json``) and the user's own
(``<data dir>/models/*.safetensors``), and a small cache of loaded detectors.

A shipped model's file is checked against the SHA-256 in the registry before it is loaded, on top of
the model file's own checksum (which ``load_detector`` verifies): a registry entry names exactly one file.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imaging_ad.io.checksum import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from imaging_ad.detectors import Detector
    from imaging_ad.trust import TrustPolicy

REGISTRY_NAME = "registry.json"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    description: str
    sha256: str | None  # of the file, from the registry (shipped models only)
    source: str  # "shipped" or "user"

    @property
    def label(self) -> str:
        """What the model dropdown shows; also the key the UI passes back."""
        return f"{self.name} ({self.source})"


def shipped_models(weights_dir: Path) -> list[ModelEntry]:
    registry = weights_dir / REGISTRY_NAME
    if not registry.is_file():
        return []
    entries = []
    for model in json.loads(registry.read_text()).get("models", []):
        path = (weights_dir / model["file"]).resolve()
        if path.parent != weights_dir.resolve():  # a registry entry names a file in weights/, nothing else
            raise ValueError(f"{registry}: model file {model['file']!r} is not inside {weights_dir}")
        if path.is_file():
            entries.append(
                ModelEntry(model["name"], path, model.get("description", ""), model["sha256"], "shipped")
            )
    return entries


def user_models(models_dir: Path) -> list[ModelEntry]:
    from imaging_ad.detectors import ModelFileError, read_description

    entries = []
    for path in sorted(models_dir.glob("*.safetensors")) if models_dir.is_dir() else []:
        try:
            description = read_description(path)
        except ModelFileError:
            continue  # a half-copied or foreign file: not offered
        detail = description.get("demo", {}).get("description") or (
            f"{description['detector']} on {description['backbone']['name']}, {description.get('created', '')}"
        )
        entries.append(ModelEntry(path.stem, path.resolve(), detail, None, "user"))
    return entries


def list_models(weights_dir: Path, models_dir: Path) -> list[ModelEntry]:
    """Shipped models first (the default is the first), then the user's, newest name last."""
    return shipped_models(weights_dir) + user_models(models_dir)


def fingerprint(path: Path) -> str:
    """The model file's own fingerprint (the SHA-256 in its description), as scans and reviews key it."""
    from imaging_ad.detectors import read_description

    return read_description(path)["sha256"]


class ModelCache:
    """Keeps the last few loaded detectors; loads (and warms up) each model file once.

    Keyed by path, size and modification time, so a model file replaced on disk is reloaded. One lock per
    cache: Gradio calls handlers from several threads and a detector load is not something to do twice.
    """

    def __init__(self, device: str = "auto", capacity: int = 3, runtime: str = "torch") -> None:
        self.device = device
        self.runtime = runtime
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int, int], Detector] = OrderedDict()
        self._lock = threading.Lock()
        self._verified: set[tuple[str, int, int]] = set()

    def get(self, entry: ModelEntry | Path, trust: TrustPolicy | None = None) -> Detector:
        """The loaded detector of ``entry``; ``trust``: the policy a first load checks (default: the
        environment's, see :mod:`imaging_ad.trust`)."""
        from imaging_ad.detectors import load_detector

        path = entry.path if isinstance(entry, ModelEntry) else Path(entry)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            if isinstance(entry, ModelEntry) and entry.sha256 and key not in self._verified:
                actual = file_sha256(path)
                if actual != entry.sha256:
                    raise ValueError(
                        f"{path.name}: SHA-256 {actual[:12]}... differs from the registry's "
                        f"{entry.sha256[:12]}...; rebuild it with weights/build_default_model.py"
                    )
                self._verified.add(key)
            detector = load_detector(path, device=self.device, trust=trust)
            detector.progress = False
            if self.runtime != "torch":
                import torch

                from imaging_ad.export.compiled import with_runtime

                # the same threads as torch's (the launcher's choice for an interactive server)
                detector = with_runtime(
                    detector, self.runtime, model_path=path, threads=torch.get_num_threads()
                )
            # first call pays one-off costs (allocator, oneDNN kernel selection); pay them here, not
            # in the first user's request
            size = detector.preprocessor_.image_size
            detector.predict([np.zeros((size, size), np.uint8)])
            self._items[key] = detector
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return detector
