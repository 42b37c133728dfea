"""The Gradio Blocks app: Inspect, Review, Batch, Learn and Improve tabs (one module each in ``tabs/``)
over :class:`~imaging_ad.app.service.DemoService`. Handlers only translate between widgets and the
service. Import this module after :func:`imaging_ad.app.launcher.prepare_environment` (Gradio reads its
cache folder at import time)."""

from __future__ import annotations

import gradio as gr

from imaging_ad.app.service import DemoService
from imaging_ad.app.tabs import batch, improve, inspect, learn, review
from imaging_ad.app.tabs.common import Shared
from imaging_ad.app.tabs.review import KEYS_HEAD

__all__ = ["KEYS_HEAD", "build_app"]


def build_app(service: DemoService) -> gr.Blocks:
    labels = service.model_labels()
    allowed = service.config.allowed_roots
    shared = Shared(
        service=service,
        labels=labels,
        default_label=labels[0] if labels else None,
        folders_note=(
            "Server folders allowed under: " + ", ".join(str(r) for r in allowed)
            if allowed
            else "Reading server folders is off (start with --allowed-root DIR to allow it)."
        ),
    )
    # Gradio's cache (uploads, rendered outputs) is transient: what lasts is in the media folder. Clear
    # files older than a day every hour so a long-running demo does not fill the disk.
    with gr.Blocks(
        title="imaging_ad: anomaly detection demo", analytics_enabled=False, delete_cache=(3600, 86400)
    ) as app:
        gr.Markdown(
            "# imaging_ad — anomaly detection from normal images\n"
            "Score an image, review the queue, scan a batch, build a model from your own normal images, "
            "and improve it from the reviews. Research demo: not a medical device.\n\n"
            + service.trust_statement()
        )
        # the reviewer's name, kept in this browser's local storage (outside the tabs: a state inside a
        # lazily rendered tab is not there yet when the page loads)
        saved_reviewer = gr.BrowserState(
            "", storage_key="imaging_ad_reviewer", secret=service.browser_secret()
        )
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect"):
                inspect_tab = inspect.build(shared)
            with gr.Tab("Review", id="review", elem_id="tab-review") as review_tab:
                review.build(shared, app, review_tab, saved_reviewer)
            with gr.Tab("Batch", id="batch", elem_id="tab-batch"):
                batch.build(shared)
            with gr.Tab("Learn", id="learn", elem_id="tab-learn"):
                learn.build(shared)
            with gr.Tab("Improve", id="improve", elem_id="tab-improve") as improve_tab:
                improve.build(shared, improve_tab, inspect_tab)
        for wire in shared.on_all_tabs_built:
            wire()
    return app
