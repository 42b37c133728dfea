"""Backbone errors: what went wrong and what the user can do instead."""

from __future__ import annotations


class BackboneError(RuntimeError):
    """A backbone could not be created as asked."""


class BackboneWeightsUnavailableError(BackboneError):
    """Pretrained weights were asked for but none could be obtained (no bundle, no file, no network)."""
