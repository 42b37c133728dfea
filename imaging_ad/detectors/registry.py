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
    """Instantiate a registered detector by name (see :func:`resolve_detector_name`) with hyperparameters."""
    return DETECTORS[resolve_detector_name(name)](**params)


def resolve_detector_name(name: str) -> str:
    """The registered name for ``name`` in any case and spelling: ``PatchCore``, ``Patchcore`` (anomalib's
    class name), ``PADIM``, ``feature-ae`` all resolve; case, ``-``, ``_`` and spaces do not count."""
    if name in DETECTORS:
        return name
    wanted = _spelling_key(name)
    for registered in DETECTORS:
        if _spelling_key(registered) == wanted:
            return registered
    import difflib

    close = difflib.get_close_matches(wanted, [_spelling_key(n) for n in DETECTORS], n=3, cutoff=0.6)
    suggestions = [n for n in sorted(DETECTORS) if _spelling_key(n) in close]
    hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else ""
    raise ValueError(f"unknown detector {name!r}{hint} (registered: {', '.join(sorted(DETECTORS))})")


def _spelling_key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def list_detectors() -> list[str]:
    return sorted(DETECTORS)
