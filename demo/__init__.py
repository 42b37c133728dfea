"""The imaging_ad Gradio demo: inspect, review, batch, learn and improve (``imaging-ad demo``).

Importing this package is cheap; Gradio and the models load when the app is launched. Layers:
``safety`` (uploads, zips, allowed folders), ``review_store`` (SQLite verdicts), ``models`` (shipped and
user models), ``feedback`` (errors, thresholds, memory-bank extension, drift), ``service`` (the
operations) and ``app`` (the Gradio UI), started by ``launcher``.
"""

from __future__ import annotations

from demo.config import DemoConfig, default_data_dir

__all__ = ["DemoConfig", "default_data_dir", "launch"]


def launch(config: DemoConfig | None = None, **kwargs):
    """Serve the demo (see :func:`demo.launcher.launch`)."""
    from demo.launcher import launch as _launch

    return _launch(config or DemoConfig(), **kwargs)
