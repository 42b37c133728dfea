"""Errors of the export package (torch-free, so the runtime can raise them where torch is absent)."""

from __future__ import annotations


class ExportError(ValueError):
    """A model that cannot be exported exactly (the message says which part and why)."""


class ExportedModelError(ValueError):
    """An exported model that cannot be used: missing or foreign sidecar, checksum mismatch, bad version."""
