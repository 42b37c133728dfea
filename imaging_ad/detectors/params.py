"""Hyperparameters checked before any work starts: names (with a did-you-mean), types (from each
constructor's annotations) and ranges or choices (each detector's ``param_constraints``), as
scikit-learn's parameter validation does. The CLI, the Python API and the demo's Learn tab all come here
through :func:`validate_params`, so a typo or a bad value fails in milliseconds, not after the backbone
has read half the training set."""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class ParameterError(ValueError):
    """A hyperparameter that does not exist or has a value the detector cannot use."""


@dataclass(frozen=True)
class Interval:
    """A number between ``low`` and ``high`` (either may be None); ``closed`` says which ends are allowed:
    "both", "left", "right" or "neither"."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def check(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.low is not None and (value < self.low or (value == self.low and not left)):
            return False
        return not (self.high is not None and (value > self.high or (value == self.high and not right)))

    def __str__(self) -> str:
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"in {left}{low}, {high}{right}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values."""

    values: tuple

    def check(self, value: Any) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


Constraint = Interval | OneOf


def constructor_parameters(cls: type) -> dict[str, tuple[Any, Any]]:
    """Keyword-only constructor parameters of ``cls`` and its bases -> (default, annotated type)."""
    parameters: dict[str, tuple[Any, Any]] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        for p in inspect.signature(init).parameters.values():
            if p.kind == p.KEYWORD_ONLY:
                parameters.setdefault(p.name, (p.default, hints.get(p.name, Any)))
    return parameters


def validate_params(cls: type, params: dict[str, Any]) -> None:
    """Raise :class:`ParameterError` for an unknown name, a value of the wrong type or one outside its
    range; the message names the parameter, what was given and what is allowed."""
    types_ = {name: annotation for name, (_, annotation) in constructor_parameters(cls).items()}
    constraints: dict[str, Constraint] = {}
    for klass in reversed(cls.__mro__):
        constraints.update(getattr(klass, "param_constraints", {}))
    detector = getattr(cls, "name", cls.__name__)
    for name, value in params.items():
        if name not in types_:
            close = difflib.get_close_matches(name, list(types_), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(
                f"{detector} has no hyperparameter {name!r}{hint} (it has: {', '.join(sorted(types_))})"
            )
        if not _matches(value, types_[name]):
            raise ParameterError(
                f"{detector}: {name} must be {_describe(types_[name])}, got {value!r} ({type(value).__name__})"
            )
        constraint = constraints.get(name)
        if constraint is not None and value is not None and not constraint.check(value):
            raise ParameterError(f"{detector}: {name} must be {constraint}, got {value!r}")


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        items = _item_types(annotation, len(value))
        return items is not None and all(_matches(v, a) for v, a in zip(value, items, strict=True))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or annotation)


def _item_types(annotation: Any, n: int) -> list[Any] | None:
    """The annotation of each of ``n`` items, or None when a fixed-length tuple wants another length."""
    args = typing.get_args(annotation)
    if not args:
        return [Any] * n
    if len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * n
    if typing.get_origin(annotation) is tuple:
        return list(args) if len(args) == n else None
    return [args[0]] * n


_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "None"}


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} values"
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        return "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
