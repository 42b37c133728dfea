"""Improve: what the reviews say about a model — errors at a threshold, a suggested threshold, a new
version with reviewed normals in its memory bank, and drift of recent scores."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import gradio as gr
import numpy as np

from imaging_ad.app import feedback
from imaging_ad.app.models import fingerprint
from imaging_ad.app.review_store import QueueItem
from imaging_ad.app.service import DemoService
from imaging_ad.app.tabs.common import USER_ERRORS, Shared, fail
from imaging_ad.app.tabs.inspect import InspectTab, verdict_markdown
from imaging_ad.app.tabs.learn import calibration_markdown


def error_gallery(service: DemoService, items: Sequence[QueueItem], limit: int = 60) -> list[tuple[Any, str]]:
    out = []
    for item in items[:limit]:
        picture = service.overlay_path(item) or service.display_image(item.image_path)
        if picture is not None:
            out.append((picture, f"{item.normalized_score:.2f} · {item.display_name} ({item.reviewer})"))
    return out


def drift_figure(recent: Sequence[float], normal: Sequence[float], calibration, raw_threshold: float):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3), dpi=100)
    axes = figure.subplots()
    values = list(recent) + list(normal) + [calibration.image_threshold, raw_threshold]
    bins = np.linspace(min(values), max(values), 30) if len(values) > 2 else 10
    if recent:
        axes.hist(recent, bins=bins, alpha=0.55, label=f"recent scores ({len(recent)})", color="tab:blue")
    if normal:
        axes.hist(normal, bins=bins, alpha=0.55, label=f"reviewed normal ({len(normal)})", color="tab:green")
    axes.axvline(calibration.image_threshold, color="black", linestyle="--", label="calibrated threshold")
    axes.axvline(raw_threshold, color="tab:red", linestyle=":", label="current threshold")
    axes.set_xlabel("image score")
    axes.set_ylabel("images")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def build(shared: Shared, tab: gr.Tab, inspect: InspectTab) -> None:
    service = shared.service
    gr.Markdown(
        "What the reviews say about a model: its errors at a threshold, a threshold suggested by the "
        "verdicts, a new version with the images reviewed as normal added to its memory bank "
        "(PatchCore), and whether recent scores drift from the normal ones."
    )
    with gr.Row():
        model = shared.model_dropdown()
        threshold = gr.Slider(0.01, 0.99, value=0.5, step=0.01, label="Threshold (normalised)")
    summary = gr.Markdown(elem_id="improve-summary")
    with gr.Row():
        use_suggestion = gr.Button("Use the suggested threshold")
        send_threshold = gr.Button("Use this threshold in Inspect")
        extend_button = gr.Button("Add reviewed normals to the memory bank (new version)")
        recalibrate_button = gr.Button("Re-calibrate on the reviewed normals: site calibration (new version)")
    suggestion_state = gr.State(None)
    with gr.Row():
        fp_gallery = gr.Gallery(
            label="False positives: reviewed normal, flagged", columns=4, height=300, object_fit="contain"
        )
        fn_gallery = gr.Gallery(
            label="False negatives: reviewed anomalous, not flagged",
            columns=4,
            height=300,
            object_fit="contain",
        )
    drift_plot = gr.Plot(label="Score distributions")
    drift_md = gr.Markdown()
    extend_md = gr.Markdown()

    def analyse(label: str, t: float):
        try:
            entry = service.resolve_model(label)
            calibration = service.calibration(entry)
            sha = fingerprint(entry.path)
        except USER_ERRORS as exc:
            raise fail(exc) from exc
        labelled = service.store.labelled(sha)
        raw = feedback.raw_threshold(calibration, t)
        errors = feedback.errors_at(labelled, raw)
        normal_scores = [i.score for i in labelled if i.verdict == "normal"]
        suggestion = feedback.suggest_threshold(
            normal_scores, [i.score for i in labelled if i.verdict == "anomalous"]
        )
        lines = [
            f"**{errors.n_normal}** image(s) reviewed normal and **{errors.n_anomalous}** anomalous for "
            f"{html.escape(entry.name)}. At {t:.2f} (raw {raw:.4f}): **{len(errors.false_positives)}** false "
            f"positive(s), **{len(errors.false_negatives)}** false negative(s)."
        ]
        suggested = None
        if suggestion is None:
            lines.append("No threshold suggestion yet: review some images as normal first.")
        else:
            suggested = round(feedback.normalized_threshold(calibration, suggestion.threshold), 2)
            suggested = min(max(suggested, 0.01), 0.99)
            rates = f"false-positive rate {suggestion.false_positive_rate:.0%}"
            if suggestion.true_positive_rate is not None:
                rates += f", sensitivity {suggestion.true_positive_rate:.0%}"
            lines.append(
                f"Suggested threshold: **{suggested:.2f}** normalised (raw {suggestion.threshold:.4f}), "
                f"{suggestion.rule}; on the reviews: {rates}."
            )
        recent = service.recent_scores(sha)
        drift = feedback.drift_report(recent, normal_scores, calibration)
        return (
            "\n\n".join(lines),
            suggested,
            error_gallery(service, errors.false_positives),
            error_gallery(service, errors.false_negatives),
            drift_figure(recent, normal_scores, calibration, raw),
            drift.message,
        )

    outputs = [summary, suggestion_state, fp_gallery, fn_gallery, drift_plot, drift_md]
    gr.on(
        [tab.select, model.change, threshold.release],
        analyse,
        [model, threshold],
        outputs,
        api_name="analyse",
    )
    use_suggestion.click(
        lambda s, t: gr.Slider(value=s) if s is not None else gr.skip(),
        [suggestion_state, threshold],
        threshold,
    ).then(analyse, [model, threshold], outputs)
    send_threshold.click(lambda t: t, [threshold], inspect.threshold).then(
        verdict_markdown, [inspect.state, inspect.threshold], inspect.verdict
    )

    def extend(label: str, progress=gr.Progress(track_tqdm=True)):  # noqa: B008  (Gradio injects it)
        try:
            entry = service.resolve_model(label)
            result = service.add_normals_to_bank(entry)
        except USER_ERRORS as exc:
            raise fail(exc) from exc
        message = (
            f"Saved **{result.path.stem}**: {result.rows_added} patch rows from {result.n_images} "
            f"reviewed-normal image(s) added to the {result.rows_before} of {html.escape(entry.name)}. "
            f"Its thresholds were recalibrated on the other {result.n_calibration} reviewed-normal image(s), "
            "kept out of the bank: few images make rough thresholds. "
            "Choose it in Inspect or Batch; scans with it enter the queue under the new version."
        )
        return (message, *shared.refreshed_dropdowns())

    shared.on_all_tabs_built.append(
        lambda: extend_button.click(
            extend, [model], [extend_md, *shared.model_dropdowns], api_name="do_extend"
        )
    )

    def recalibrate(label: str, progress=gr.Progress(track_tqdm=True)):  # noqa: B008  (Gradio injects it)
        try:
            entry = service.resolve_model(label)
            path, calibration = service.recalibrate(entry)
        except USER_ERRORS as exc:
            raise fail(exc) from exc
        message = (
            f"Saved **{path.stem}**: {html.escape(entry.name)} re-calibrated on this site's reviewed normals, "
            "without refitting (thresholds and the out-of-domain guard).\n\n"
            + calibration_markdown(calibration)
        )
        return (message, *shared.refreshed_dropdowns())

    shared.on_all_tabs_built.append(
        lambda: recalibrate_button.click(
            recalibrate, [model], [extend_md, *shared.model_dropdowns], api_name="do_recalibrate"
        )
    )
