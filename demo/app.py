"""The Gradio Blocks app: Inspect, Review, Batch, Learn and Improve tabs over :class:`DemoService`.

Handlers only translate between widgets and the service. Import this module after
:func:`demo.launcher.prepare_environment` (Gradio reads its cache folder at import time).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from demo import feedback
from demo.review_store import QueueItem
from demo.safety import IMAGE_SUFFIXES, UPLOAD_SUFFIXES, UnsafeInputError
from demo.service import BatchResult, DemoService, InspectResult
from imaging_ad.io import ImageReadError

# Keyboard shortcuts of the Review tab. Ignored while typing in a field, and only when the Review buttons
# are on screen (offsetParent is null for elements in a hidden tab).
KEYS_HEAD = """
<script>
document.addEventListener('keydown', (event) => {
  const target = event.target;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (target && (target.tagName === 'INPUT' || target.tagName === 'TEXTAREA' || target.isContentEditable)) return;
  const ids = {n: 'review-normal', a: 'review-anomalous', u: 'review-unsure', s: 'review-skip'};
  const id = ids[(event.key || '').toLowerCase()];
  if (!id) return;
  const button = document.getElementById(id);
  if (button && button.offsetParent !== null) { event.preventDefault(); button.click(); }
});
</script>
"""

USER_ERRORS = (UnsafeInputError, ImageReadError, ValueError, FileNotFoundError)
QUEUE_ROWS_SHOWN = 500  # the table shows the head of the queue; export has everything
QUEUE_HEADERS = ["id", "image", "score", "normalised", "verdict", "reviewer", "model"]


def _fail(exc: Exception) -> gr.Error:
    """A message for the user instead of a stack trace (input problems are expected, not bugs)."""
    return gr.Error(str(exc), duration=None)


# -- Inspect ------------------------------------------------------------------------------------------


def render_overlay(result: InspectResult | None, opacity: float) -> np.ndarray | None:
    from imaging_ad.visualize import overlay

    if result is None:
        return None
    return overlay(result.display, result.heatmap, alpha=float(opacity), vmin=result.pixel_threshold)


def render_heatmap(result: InspectResult) -> np.ndarray:
    from imaging_ad.visualize import heatmap_to_color

    return heatmap_to_color(result.heatmap, vmin=result.pixel_threshold)


def verdict_markdown(result: InspectResult | None, normalized_threshold: float) -> str:
    """The verdict at the slider's threshold: pure arithmetic on the stored score, no model call."""
    if result is None:
        return "Upload an image (or pick an example) to score it."
    raw = feedback.raw_threshold(_calibration_of(result), normalized_threshold)
    anomalous = result.is_anomaly(normalized_threshold)
    word = "ANOMALOUS" if anomalous else "NORMAL"
    return (
        f"### Verdict: **{word}**\n\n"
        f"| | |\n|---|---|\n"
        f"| score | <span id='inspect-score'>{result.score:.4f}</span> |\n"
        f"| normalised score | {result.normalized_score:.3f} |\n"
        f"| threshold | {normalized_threshold:.2f} normalised = {raw:.4f} raw "
        f"(calibrated: 0.50 = {result.threshold:.4f}, {result.target_fpr:.0%} false positives on held-out normals) |\n"
        f"| image | {html.escape(result.name)} |\n"
        f"| model | {html.escape(result.model_name)} ({result.model_seconds * 1000:.0f} ms to read and score) |\n\n"
        "Heatmap colours: blue up to the calibrated pixel threshold (as normal as normal images get), red at "
        "this image's maximum. The image is in the Review queue."
    )


def _calibration_of(result: InspectResult):
    from imaging_ad.calibration import Calibration

    return Calibration(result.threshold, result.pixel_threshold, result.score_scale, result.target_fpr, 0)


# -- Review -------------------------------------------------------------------------------------------


def _queue_rows(items: Sequence[QueueItem]) -> list[list[Any]]:
    return [
        [
            i.id,
            i.display_name,
            round(i.score, 4),
            round(i.normalized_score, 3),
            i.verdict or "",
            i.reviewer or "",
            i.model_name,
        ]
        for i in items
    ]


def _item_markdown(item: QueueItem | None) -> str:
    if item is None:
        return "Nothing to review: inspect an image or scan a batch first."
    status = (
        f"latest verdict **{item.verdict}** by {html.escape(item.reviewer or '')}"
        + (f" — {html.escape(item.note)}" if item.note else "")
        + f" ({item.n_verdicts} verdict(s) in all)"
        if item.verdict
        else "**not reviewed yet**"
    )
    flagged = "flagged" if item.score > item.threshold else "not flagged"
    return (
        f"**{html.escape(item.display_name)}** · item <span id='review-item-id'>{item.id}</span> · "
        f"score {item.score:.4f} (normalised {item.normalized_score:.3f}, {flagged} at the calibrated threshold) · "
        f"model {html.escape(item.model_name)} · {html.escape(item.source)}\n\n{status}"
    )


def build_app(service: DemoService) -> gr.Blocks:
    labels = service.model_labels()
    default_label = labels[0] if labels else None
    examples = sorted(p for p in service.config.examples_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    folders_note = (
        "Server folders allowed under: " + ", ".join(str(r) for r in service.config.allowed_roots)
        if service.config.allowed_roots
        else "Reading server folders is off (start with --allowed-root DIR to allow it)."
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
        model_dropdowns: list[gr.Dropdown] = []
        # the reviewer's name, kept in this browser's local storage (outside the tabs: a state inside a
        # lazily rendered tab is not there yet when the page loads)
        saved_reviewer = gr.BrowserState(
            "", storage_key="imaging_ad_reviewer", secret=service.browser_secret()
        )
        with gr.Tabs():
            # ---------------------------------------------------------------- Inspect
            with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect"):
                inspect_state = gr.State(None)
                with gr.Row():
                    with gr.Column(scale=1):
                        upload = gr.File(
                            label="Image: PNG, JPEG, TIFF, BMP or DICOM",
                            file_types=list(IMAGE_SUFFIXES),
                            type="filepath",
                            elem_id="inspect-upload",
                        )
                        inspect_model = gr.Dropdown(
                            labels, value=default_label, label="Model", elem_id="inspect-model"
                        )
                        model_dropdowns.append(inspect_model)
                        inspect_model_path = gr.Textbox(
                            label="…or a model file (.safetensors) path",
                            placeholder="/path/inside/an/allowed/folder/model.safetensors",
                            info="Inside an allowed folder or the data folder's models/.",
                        )
                        inspect_button = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
                        if examples:
                            gr.Examples(
                                examples=[[str(p)] for p in examples],
                                inputs=[upload],
                                label="Example chest X-rays (Kermany et al. 2018, CC BY 4.0)",
                                examples_per_page=12,
                            )
                        image_facts = gr.JSON(label="Image", elem_id="inspect-facts")
                    with gr.Column(scale=2):
                        verdict_md = gr.Markdown(verdict_markdown(None, 0.5), elem_id="inspect-result")
                        threshold = gr.Slider(
                            0.01,
                            0.99,
                            value=0.5,
                            step=0.01,
                            label="Threshold (normalised score; 0.5 = the calibrated threshold)",
                            elem_id="inspect-threshold",
                        )
                        with gr.Row():
                            overlay_image = gr.Image(
                                label="Overlay", format="png", interactive=False, elem_id="inspect-overlay"
                            )
                            heatmap_image = gr.Image(
                                label="Anomaly map",
                                format="png",
                                interactive=False,
                                elem_id="inspect-heatmap",
                            )
                        opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity")

                def do_inspect(path: str | None, label: str, model_path: str, t: float, alpha: float):
                    if not path:
                        return None, verdict_markdown(None, t), None, None, None
                    try:
                        result = service.inspect(path, label, model_path)
                    except USER_ERRORS as exc:
                        raise _fail(exc) from exc
                    return (
                        result,
                        verdict_markdown(result, t),
                        render_overlay(result, alpha),
                        render_heatmap(result),
                        result.meta,
                    )

                gr.on(
                    [upload.change, inspect_button.click],
                    do_inspect,
                    [upload, inspect_model, inspect_model_path, threshold, opacity],
                    [inspect_state, verdict_md, overlay_image, heatmap_image, image_facts],
                )
                threshold.change(
                    verdict_markdown,
                    [inspect_state, threshold],
                    verdict_md,
                    queue=False,
                    show_progress="hidden",
                )
                opacity.change(
                    render_overlay,
                    [inspect_state, opacity],
                    overlay_image,
                    queue=False,
                    show_progress="hidden",
                )

            # ---------------------------------------------------------------- Review
            with gr.Tab("Review", id="review", elem_id="tab-review") as review_tab:
                current = gr.State(None)
                progress_md = gr.Markdown(elem_id="review-progress")
                with gr.Row():
                    reviewer = gr.Textbox(
                        label="Your name", placeholder="recorded with each verdict", elem_id="review-reviewer"
                    )
                    note = gr.Textbox(label="Note (optional)", elem_id="review-note")
                # saved when it changes, but never replaced by an empty field (a freshly rendered one is empty);
                # restored when the page loads and when the tab opens (its fields render lazily)
                reviewer.change(
                    lambda name, saved: name.strip() or saved,
                    [reviewer, saved_reviewer],
                    [saved_reviewer],
                    queue=False,
                    show_progress="hidden",
                )
                gr.on(
                    [app.load, review_tab.select],
                    lambda saved, typed: typed or saved,
                    [saved_reviewer, reviewer],
                    [reviewer],
                    queue=False,
                    show_progress="hidden",
                )
                item_md = gr.Markdown(elem_id="review-item")
                with gr.Row():
                    review_image = gr.Image(
                        label="Image", format="png", interactive=False, elem_id="review-image"
                    )
                    review_overlay = gr.Image(
                        label="Overlay", format="png", interactive=False, elem_id="review-overlay"
                    )
                with gr.Row():
                    b_normal = gr.Button("Normal (n)", elem_id="review-normal")
                    b_anomalous = gr.Button("Anomalous (a)", variant="stop", elem_id="review-anomalous")
                    b_unsure = gr.Button("Unsure (u)", elem_id="review-unsure")
                    b_skip = gr.Button("Skip (s)", elem_id="review-skip")
                gr.Markdown(
                    "Keys **n** / **a** / **u** record a verdict, **s** skips (not while typing in a field). "
                    "Click a row of the queue to open it."
                )
                queue_table = gr.Dataframe(
                    headers=QUEUE_HEADERS,
                    interactive=False,
                    label="Queue: unreviewed first, highest score first",
                    elem_id="review-queue",
                    max_height=360,
                )
                with gr.Row():
                    export_button = gr.Button("Export verdicts (CSV)", elem_id="review-export")
                    export_history = gr.Checkbox(
                        label="every verdict (history), not just the latest", value=False
                    )
                export_file = gr.File(label="Verdicts CSV", interactive=False, elem_id="review-export-file")

                def show(item: QueueItem | None):
                    done, total = service.store.progress()
                    progress_text = f"**{done} of {total} reviewed**" + (
                        " — all done" if total and done == total else ""
                    )
                    if item is None:
                        return (
                            None,
                            progress_text,
                            _item_markdown(None),
                            None,
                            None,
                            _queue_rows(service.store.queue(limit=QUEUE_ROWS_SHOWN)),
                        )
                    overlay_path = service.overlay_path(item)
                    return (
                        item.id,
                        progress_text,
                        _item_markdown(item),
                        service.display_image(item.image_path),
                        overlay_path,
                        _queue_rows(service.store.queue(limit=QUEUE_ROWS_SHOWN)),
                    )

                review_outputs = [current, progress_md, item_md, review_image, review_overlay, queue_table]

                def open_next(current_id: int | None = None):
                    item = service.store.next_unreviewed(after_id=current_id)
                    if item is None and current_id is not None:
                        item = service.store.item(current_id)
                    if item is None:
                        queue = service.store.queue(limit=1)
                        item = queue[0] if queue else None
                    return show(item)

                def record(verdict: str):
                    def handler(current_id: int | None, name: str, text: str):
                        if current_id is None:
                            gr.Warning("No image open: inspect an image or scan a batch first.")
                            return (*open_next(None), gr.skip())
                        try:
                            service.store.record_verdict(current_id, verdict, name, text)
                        except ValueError as exc:
                            gr.Warning(str(exc))
                            return (*show(service.store.item(current_id)), gr.skip())
                        return (*open_next(current_id), "")

                    return handler

                for button, verdict in (
                    (b_normal, "normal"),
                    (b_anomalous, "anomalous"),
                    (b_unsure, "unsure"),
                ):
                    button.click(record(verdict), [current, reviewer, note], [*review_outputs, note])
                b_skip.click(lambda current_id: open_next(current_id), [current], review_outputs)
                review_tab.select(
                    lambda current_id: (
                        show(service.store.item(current_id)) if current_id else open_next(None)
                    ),
                    [current],
                    review_outputs,
                )
                app.load(lambda: open_next(None), None, review_outputs)

                def select_row(event: gr.SelectData):
                    row = event.row_value
                    return show(service.store.item(int(row[0]))) if row else open_next(None)

                queue_table.select(select_row, None, review_outputs)
                export_button.click(
                    lambda history: str(service.export_verdicts(history)), [export_history], export_file
                )

            # ---------------------------------------------------------------- Batch
            with gr.Tab("Batch", id="batch", elem_id="tab-batch"):
                with gr.Row():
                    with gr.Column(scale=1):
                        batch_files = gr.File(
                            label="Images or zip archives of images",
                            file_count="multiple",
                            file_types=list(UPLOAD_SUFFIXES),
                            type="filepath",
                            elem_id="batch-upload",
                        )
                        batch_folder = gr.Textbox(
                            label="…or a server folder",
                            info=folders_note,
                            interactive=bool(service.config.allowed_roots),
                        )
                        batch_model = gr.Dropdown(labels, value=default_label, label="Model")
                        model_dropdowns.append(batch_model)
                        batch_button = gr.Button("Scan", variant="primary", elem_id="batch-run")
                    with gr.Column(scale=2):
                        batch_md = gr.Markdown(elem_id="batch-summary")
                        batch_gallery = gr.Gallery(
                            label="Overlays, highest score first",
                            columns=4,
                            height=480,
                            object_fit="contain",
                            elem_id="batch-gallery",
                        )
                        batch_csv = gr.File(label="results.csv", interactive=False)

                def do_batch(files: list[str] | None, folder: str, label: str, progress=gr.Progress()):  # noqa: B008  (Gradio injects it)
                    try:
                        result = service.run_batch(
                            files or [], folder, label, progress=lambda f, desc: progress(f, desc=desc)
                        )
                    except USER_ERRORS as exc:
                        raise _fail(exc) from exc
                    return _batch_markdown(result), _batch_gallery(result), str(result.csv_path)

                batch_button.click(
                    do_batch, [batch_files, batch_folder, batch_model], [batch_md, batch_gallery, batch_csv]
                )

            # ---------------------------------------------------------------- Learn
            with gr.Tab("Learn", id="learn", elem_id="tab-learn"):
                from imaging_ad.detectors import list_detectors

                gr.Markdown(
                    "Build a model from **normal** images only (at least 5; a few hundred is better). A tenth "
                    "is held out to set the threshold. The model is saved in the data folder and offered in "
                    "every model list."
                )
                with gr.Row():
                    with gr.Column():
                        learn_files = gr.File(
                            label="Normal images or zip archives",
                            file_count="multiple",
                            file_types=list(UPLOAD_SUFFIXES),
                            type="filepath",
                        )
                        learn_folder = gr.Textbox(
                            label="…or a server folder of normal images",
                            info=folders_note,
                            interactive=bool(service.config.allowed_roots),
                        )
                    with gr.Column():
                        learn_detector = gr.Dropdown(list_detectors(), value="patchcore", label="Detector")
                        learn_name = gr.Textbox(label="Model name", placeholder="e.g. tiles-line-3")
                        learn_size = gr.Slider(128, 384, value=224, step=32, label="Image size (pixels)")
                        learn_button = gr.Button("Fit", variant="primary")
                        learn_md = gr.Markdown()

                def do_learn(files, folder, detector_name, name, size, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
                    progress(0, desc="reading images")
                    try:
                        entry = service.learn(files or [], folder, detector_name, name, int(size))
                    except USER_ERRORS as exc:
                        raise _fail(exc) from exc
                    choices = service.model_labels()
                    message = f"Saved **{entry.name}** ({entry.path.stat().st_size / 1e6:.1f} MB): {entry.description}."
                    return (message, *[gr.Dropdown(choices=choices) for _ in model_dropdowns])

            # ---------------------------------------------------------------- Improve
            with gr.Tab("Improve", id="improve", elem_id="tab-improve") as improve_tab:
                gr.Markdown(
                    "What the reviews say about a model: its errors at a threshold, a threshold suggested by the "
                    "verdicts, a new version with the images reviewed as normal added to its memory bank "
                    "(PatchCore), and whether recent scores drift from the normal ones."
                )
                with gr.Row():
                    improve_model = gr.Dropdown(labels, value=default_label, label="Model")
                    model_dropdowns.append(improve_model)
                    improve_threshold = gr.Slider(
                        0.01, 0.99, value=0.5, step=0.01, label="Threshold (normalised)"
                    )
                improve_md = gr.Markdown(elem_id="improve-summary")
                with gr.Row():
                    use_suggestion = gr.Button("Use the suggested threshold")
                    send_threshold = gr.Button("Use this threshold in Inspect")
                    extend_button = gr.Button("Add reviewed normals to the memory bank (new version)")
                suggestion_state = gr.State(None)
                with gr.Row():
                    fp_gallery = gr.Gallery(
                        label="False positives: reviewed normal, flagged",
                        columns=4,
                        height=300,
                        object_fit="contain",
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
                        from demo.models import fingerprint

                        sha = fingerprint(entry.path)
                    except USER_ERRORS as exc:
                        raise _fail(exc) from exc
                    labelled = service.store.labelled(sha)
                    raw = feedback.raw_threshold(calibration, t)
                    errors = feedback.errors_at(labelled, raw)
                    suggestion = feedback.suggest_threshold(
                        [i.score for i in labelled if i.verdict == "normal"],
                        [i.score for i in labelled if i.verdict == "anomalous"],
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
                    normal_scores = [i.score for i in labelled if i.verdict == "normal"]
                    drift = feedback.drift_report(recent, normal_scores, calibration)
                    return (
                        "\n\n".join(lines),
                        suggested,
                        _error_gallery(service, errors.false_positives),
                        _error_gallery(service, errors.false_negatives),
                        _drift_figure(recent, normal_scores, calibration, raw),
                        drift.message,
                    )

                improve_outputs = [improve_md, suggestion_state, fp_gallery, fn_gallery, drift_plot, drift_md]
                gr.on(
                    [improve_tab.select, improve_model.change, improve_threshold.release],
                    analyse,
                    [improve_model, improve_threshold],
                    improve_outputs,
                )
                use_suggestion.click(
                    lambda s, t: gr.Slider(value=s) if s is not None else gr.skip(),
                    [suggestion_state, improve_threshold],
                    improve_threshold,
                ).then(analyse, [improve_model, improve_threshold], improve_outputs)
                send_threshold.click(lambda t: t, [improve_threshold], threshold).then(
                    verdict_markdown, [inspect_state, threshold], verdict_md
                )

                def do_extend(label: str, progress=gr.Progress()):  # noqa: B008  (Gradio injects it)
                    try:
                        entry = service.resolve_model(label)
                        result = service.add_normals_to_bank(
                            entry, progress=lambda f, desc: progress(f, desc=desc)
                        )
                    except USER_ERRORS as exc:
                        raise _fail(exc) from exc
                    choices = service.model_labels()
                    message = (
                        f"Saved **{result.path.stem}**: {result.rows_added} patch rows from {result.n_images} "
                        f"reviewed-normal image(s) added to the {result.rows_before} of {html.escape(entry.name)}. "
                        "Its threshold is the original model's (the held-out normals it came from are not stored). "
                        "Choose it in Inspect or Batch; scans with it enter the queue under the new version."
                    )
                    return (message, *[gr.Dropdown(choices=choices) for _ in model_dropdowns])

        learn_button.click(
            do_learn,
            [learn_files, learn_folder, learn_detector, learn_name, learn_size],
            [learn_md, *model_dropdowns],
        )
        extend_button.click(do_extend, [improve_model], [extend_md, *model_dropdowns])
    return app


def _batch_markdown(result: BatchResult) -> str:
    lines = [
        f"**{result.n_scored}** of {result.n_files} image(s) scored in {result.seconds:.1f} s, "
        f"**{result.n_flagged}** flagged, {result.n_errors} unreadable. All scored images are now in the Review queue. "
        f"[Open the scan report]({_file_url(result.report_path)})"
    ]
    errors = [r for r in result.rows if r.get("error")]
    for row in errors[:10]:
        lines.append(f"- {html.escape(row['path'])}: {html.escape(str(row['error']))}")
    lines += [f"- {html.escape(n)}" for n in result.notes]
    return "\n".join(lines)


def _file_url(path: Path) -> str:
    """Gradio's URL of a file under an allowed path (the media folder)."""
    from urllib.parse import quote

    return "/gradio_api/file=" + quote(str(path))


def _batch_gallery(result: BatchResult, limit: int = 200) -> list[tuple[str, str]]:
    out = []
    for row in result.rows:
        if (
            row.get("overlay_abs")
            and row.get("normalized_score") is not None
            and Path(row["overlay_abs"]).is_file()
        ):
            flag = "FLAGGED " if row.get("is_anomaly") else ""
            out.append((row["overlay_abs"], f"{flag}{row['normalized_score']:.2f} · {row['path']}"))
        if len(out) >= limit:
            break
    return out


def _error_gallery(
    service: DemoService, items: Sequence[QueueItem], limit: int = 60
) -> list[tuple[Any, str]]:
    out = []
    for item in items[:limit]:
        picture = service.overlay_path(item) or service.display_image(item.image_path)
        if picture is not None:
            out.append((picture, f"{item.normalized_score:.2f} · {item.display_name} ({item.reviewer})"))
    return out


def _drift_figure(recent: Sequence[float], normal: Sequence[float], calibration, raw_threshold: float):
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
