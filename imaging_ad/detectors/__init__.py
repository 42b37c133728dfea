"""Detectors: one module each, registered by name; all share the fit / predict / save / load contract.

Every module in this package is imported here, so a new detector is registered by adding its file; the
framework modules below and the ``components`` subpackage (shared building blocks) are not detectors.
"""

import importlib
import pkgutil

from imaging_ad.detectors.base import CalibrationWarning, Detector
from imaging_ad.detectors.params import ParameterError
from imaging_ad.detectors.persistence import ModelFileError, read_description
from imaging_ad.detectors.registry import (
    DETECTORS,
    create_detector,
    list_detectors,
    load_detector,
    register_detector,
    resolve_detector_name,
)
from imaging_ad.result import AnomalyResult

_FRAMEWORK = {"base", "params", "persistence", "registry", "components"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _FRAMEWORK:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DETECTORS",
    "AnomalyResult",
    "CalibrationWarning",
    "Detector",
    "ModelFileError",
    "ParameterError",
    "create_detector",
    "list_detectors",
    "load_detector",
    "read_description",
    "register_detector",
    "resolve_detector_name",
]
