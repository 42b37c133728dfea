"""Tiny fitted models (64 px, a dozen textures) shared by the robustness tests of one pytest process:
fitted once, on first use, into a temporary folder."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tests.synthetic import texture

TINY = {"image_size": 64, "batch_size": 8, "progress": False, "holdout_fraction": 0.2, "device": "cpu"}


@functools.cache
def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="imaging_ad-tiny-models-"))


@functools.cache
def tiny_textures(n: int = 14) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    return tuple(texture(rng, 64, 64) for _ in range(n))


@functools.cache
def tiny_model(name: str = "patchcore") -> Path:
    """A fitted ``name`` detector saved as .safetensors (read-only for callers: copy before editing)."""
    from imaging_ad.detectors import create_detector

    return create_detector(name, **TINY).fit(list(tiny_textures())).save(_folder() / f"{name}.safetensors")


@functools.cache
def tiny_torchscript_export() -> Path:
    """The tiny PatchCore exported to TorchScript (unverified: the export tests cover parity)."""
    from imaging_ad.export import export_model

    return export_model(tiny_model("patchcore"), _folder() / "tiles.pt", "torchscript", verify=False).model


def one_torch_thread() -> Iterator[None]:
    """For a module-scoped autouse fixture: tiny models run many small ops, and with 2 OpenMP threads on
    a busy 2-core machine each op can wait at its barrier (a 64 px image: 0.9 s instead of 10 ms)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
