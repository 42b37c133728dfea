"""Detector registry: a new detector is a new file with ``@register_detector``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from imaging_ad.detectors.base import Detector

DETECTORS: dict[str, type[Detector]] = {}
T = TypeVar("T", bound=type[Detector])


def register_detector(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in DETECTORS:
            raise ValueError(f"a detector named {name!r} is already registered ({DETECTORS[name].__name__})")
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return decorate


def create_detector(name: str, **params) -> Detector:
    """Instantiate a registered detector by name with hyperparameters."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**params)


def list_detectors() -> list[str]:
    return sorted(DETECTORS)
