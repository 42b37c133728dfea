"""imaging_ad: anomaly detection for medical and industrial images.

Learn from normal images only; every detector returns a per-image score and a pixel heatmap.
Heavy modules (torch, timm) load on first use so ``read_image`` stays cheap to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from imaging_ad.io import ImageMeta, ImageReadError, ImageRecord, read_image

__version__ = "0.1.0"

_LAZY = {
    "create_backbone": "imaging_ad.backbones",
    "list_backbones": "imaging_ad.backbones",
    "Preprocessor": "imaging_ad.preprocess",
    "discover_dataset": "imaging_ad.data",
    "Dataset": "imaging_ad.data",
    "Sample": "imaging_ad.data",
    "scan": "imaging_ad.scan",
}

__all__ = ["ImageMeta", "ImageReadError", "ImageRecord", "read_image", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from imaging_ad.backbones import create_backbone, list_backbones  # noqa: F401
    from imaging_ad.data import Dataset, Sample, discover_dataset  # noqa: F401
    from imaging_ad.preprocess import Preprocessor  # noqa: F401
    from imaging_ad.scan import scan  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imaging_ad' has no attribute {name!r}")
