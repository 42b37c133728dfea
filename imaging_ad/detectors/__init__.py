"""Detectors: one file each, registered by name; all share the fit / predict / save / load contract."""

from imaging_ad.detectors import (  # noqa: F401  (registration)
    dfm,
    ensemble,
    feature_autoencoder,
    feature_vae,
    ganomaly,
    iforest,
    image_autoencoder,
    ocsvm,
    padim,
    patchcore,
)
from imaging_ad.detectors.base import AnomalyResult, Detector
from imaging_ad.detectors.persistence import ModelFileError, load_detector, read_description
from imaging_ad.detectors.registry import (
    DETECTORS,
    create_detector,
    list_detectors,
    register_detector,
    resolve_detector_name,
)

__all__ = [
    "DETECTORS",
    "AnomalyResult",
    "Detector",
    "ModelFileError",
    "create_detector",
    "list_detectors",
    "load_detector",
    "read_description",
    "register_detector",
    "resolve_detector_name",
]
