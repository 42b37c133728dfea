"""Detector registry: a new detector is a new module in ``imaging_ad/detectors/`` with
``@register_detector``; the package imports every module there, so none can be forgotten."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from imaging_ad.detectors.params import validate_params
from imaging_ad.detectors.persistence import ModelFileError, describes_its_tensors, read_model
from imaging_ad.trust import TrustPolicy

if TYPE_CHECKING:  # pragma: no cover
    from imaging_ad.detectors.base import Detector

DETECTORS: dict[str, type[Detector]] = {}
T = TypeVar("T", bound="type[Detector]")


def register_detector(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in DETECTORS:
            raise ValueError(f"a detector named {name!r} is already registered ({DETECTORS[name].__name__})")
        # a detector taken off the recommended list must say why, or the CLI's guide would list it bare
        if not cls.recommended and not cls.not_recommended_because.strip():
            raise ValueError(f"{cls.__name__} sets recommended = False without a not_recommended_because")
        cls.name = name
        DETECTORS[name] = cls
        return cls

    return decorate


def resolve_detector_name(name: str) -> str:
    """The registered name for ``name`` in any case and spelling: ``PatchCore``, ``Patchcore`` (anomalib's
    class name), ``PADIM``, ``feature-ae`` all resolve; case, ``-``, ``_`` and spaces do not count."""
    if name in DETECTORS:
        return name
    wanted = _spelling_key(name)
    for registered in DETECTORS:
        if _spelling_key(registered) == wanted:
            return registered
    close = difflib.get_close_matches(wanted, [_spelling_key(n) for n in DETECTORS], n=3, cutoff=0.6)
    suggestions = [n for n in sorted(DETECTORS) if _spelling_key(n) in close]
    hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else ""
    raise ValueError(f"unknown detector {name!r}{hint} (registered: {', '.join(sorted(DETECTORS))})")


def _spelling_key(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def create_detector(name: str, **params) -> Detector:
    """A registered detector by name (see :func:`resolve_detector_name`) with hyperparameters, checked
    before anything is built."""
    cls = DETECTORS[resolve_detector_name(name)]
    validate_params(cls, params)
    return cls(**params)


def list_detectors(recommended: bool | None = None) -> list[str]:
    """Registered detector names, sorted; ``recommended=True`` / ``False``: only those that ``fit --help``
    recommends / lists for comparison only (``Detector.recommended``)."""
    return sorted(n for n, cls in DETECTORS.items() if recommended is None or cls.recommended == recommended)


def load_detector(
    path: str | os.PathLike, device: str = "auto", trust: TrustPolicy | None = None
) -> Detector:
    """A fitted detector from its model file: checksum verified, and with a trust policy (``trust``, else
    the environment's, see :mod:`imaging_ad.trust`) signed by a trusted key or listed as trusted. A file
    whose description does not fit its tensors is refused with a :class:`ModelFileError`."""
    path = Path(path)
    description, state = read_model(path, trust)
    name = description.get("detector")
    if name not in DETECTORS:
        raise ModelFileError(f"{path}: detector {name!r} is not available (registered: {sorted(DETECTORS)})")
    with describes_its_tensors(path, name):
        params = DETECTORS[name].params_of_older_files(description["params"])
        detector = DETECTORS[name](**{**params, "device": device})
        try:
            detector.restore(description, state)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from exc
        # one tiny forward pass: tensors of the wrong shape fail here, with this message, not mid-scan
        size = detector.preprocessor_.image_size
        detector.score_batch(np.zeros((1, 3, size, size), np.float32))
    return detector
