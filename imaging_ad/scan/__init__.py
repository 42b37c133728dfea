"""Batch scanning of image folders: ``scan(input_dir, model, out_dir)`` and what it writes.

``runner`` streams files through the model in batches (background reading, a writer thread),
``store`` keeps the append-only, resumable results (``results.jsonl`` + ``results.csv``) and
``report`` renders ``report.html``. The ``imaging-ad scan`` command is a thin layer over :func:`scan`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from imaging_ad.scan.report import ReportData, render_report, write_report
from imaging_ad.scan.runner import HEATMAP_MODES, ScanError, ScanProgress, ScanSummary, discover, scan
from imaging_ad.scan.store import FIELDS, ResultStore, ScanSettings, read_rows

__all__ = [
    "FIELDS",
    "HEATMAP_MODES",
    "ReportData",
    "ResultStore",
    "ScanError",
    "ScanProgress",
    "ScanSettings",
    "ScanSummary",
    "discover",
    "read_rows",
    "render_report",
    "scan",
    "write_report",
]


class _CallableModule(types.ModuleType):
    """``imaging_ad.scan`` is both this package and the function :func:`scan`.

    Importing a submodule (``imaging_ad.scan.store``) makes Python bind the *package* to the name
    ``imaging_ad.scan``, replacing the lazily exported function; making the package callable keeps
    ``imaging_ad.scan(...)`` working whichever was imported first.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> ScanSummary:
        return scan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
