"""The imaging_ad Gradio app: inspect, review, batch, learn and improve (``imaging-ad demo``, or the
repository's ``demo/launch.py``).

Importing this package is cheap; Gradio and the models load when the app is launched. Layers:
``safety`` (uploads, zips, allowed folders), ``review_store`` (SQLite verdicts), ``models`` (shipped and
user models), ``feedback`` (errors, thresholds, memory-bank extension, drift), ``service`` (the
operations) and ``ui`` with one module per tab in ``tabs/`` (the Gradio UI), started by ``launcher``.
"""

from __future__ import annotations

from imaging_ad.app.config import DemoConfig, default_data_dir

__all__ = ["DemoConfig", "default_data_dir", "launch"]


def launch(config: DemoConfig | None = None, **kwargs):
    """Serve the demo (see :func:`imaging_ad.app.launcher.launch`)."""
    from imaging_ad.app.launcher import launch as _launch

    return _launch(config or DemoConfig(), **kwargs)
