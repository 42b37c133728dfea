"""Review: the queue of inspected and scanned images, verdicts by key or button, CSV export."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import gradio as gr

from imaging_ad.app.review_store import QueueItem
from imaging_ad.app.tabs.common import USER_ERRORS, Shared, fail

QUEUE_ROWS_SHOWN = 500  # the table shows the head of the queue; export has everything
QUEUE_HEADERS = ["id", "image", "score", "normalised", "verdict", "reviewer", "model"]

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


def queue_rows(items: Sequence[QueueItem]) -> list[list[Any]]:
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


def item_markdown(item: QueueItem | None) -> str:
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


def build(shared: Shared, app: gr.Blocks, tab: gr.Tab, saved_reviewer: gr.BrowserState) -> None:
    service = shared.service
    store = service.store
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
        [app.load, tab.select],
        lambda saved, typed: typed or saved,
        [saved_reviewer, reviewer],
        [reviewer],
        queue=False,
        show_progress="hidden",
    )
    item_md = gr.Markdown(elem_id="review-item")
    with gr.Row():
        image = gr.Image(label="Image", format="png", interactive=False, elem_id="review-image")
        overlay = gr.Image(label="Overlay", format="png", interactive=False, elem_id="review-overlay")
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
        export_history = gr.Checkbox(label="every verdict (history), not just the latest", value=False)
    export_file = gr.File(label="Verdicts CSV", interactive=False, elem_id="review-export-file")
    with gr.Row():
        dicom_button = gr.Button("Export DICOM results (flagged DICOM images)", elem_id="review-dicom")
        dicom_file = gr.File(label="DICOM results (zip)", interactive=False, elem_id="review-dicom-file")
    dicom_md = gr.Markdown(
        "For flagged DICOM images (reviewed as anomalous, or unreviewed above the threshold): a "
        "Secondary Capture of the overlay with its colour bar, a Parametric Map of the heatmap and "
        "one Key Object Selection per study, all referencing the source study, series and image. "
        "**Not for diagnostic use.**"
    )

    def show(item: QueueItem | None):
        done, total = store.progress()
        progress_text = f"**{done} of {total} reviewed**" + (" — all done" if total and done == total else "")
        rows = queue_rows(store.queue(limit=QUEUE_ROWS_SHOWN))
        if item is None:
            return None, progress_text, item_markdown(None), None, None, rows
        return (
            item.id,
            progress_text,
            item_markdown(item),
            service.display_image(item.image_path),
            service.overlay_path(item),
            rows,
        )

    outputs = [current, progress_md, item_md, image, overlay, queue_table]

    def open_next(current_id: int | None = None):
        item = store.next_unreviewed(after_id=current_id)
        if item is None and current_id is not None:
            item = store.item(current_id)
        if item is None:
            queue = store.queue(limit=1)
            item = queue[0] if queue else None
        return show(item)

    def record(verdict: str):
        def handler(current_id: int | None, name: str, text: str):
            if current_id is None:
                gr.Warning("No image open: inspect an image or scan a batch first.")
                return (*open_next(None), gr.skip())
            try:
                store.record_verdict(current_id, verdict, name, text)
            except ValueError as exc:
                gr.Warning(str(exc))
                return (*show(store.item(current_id)), gr.skip())
            return (*open_next(current_id), "")

        return handler

    for button, verdict in ((b_normal, "normal"), (b_anomalous, "anomalous"), (b_unsure, "unsure")):
        button.click(record(verdict), [current, reviewer, note], [*outputs, note])
    b_skip.click(lambda current_id: open_next(current_id), [current], outputs)
    tab.select(
        lambda current_id: show(store.item(current_id)) if current_id else open_next(None), [current], outputs
    )
    app.load(lambda: open_next(None), None, outputs)

    def select_row(event: gr.SelectData):
        row = event.row_value
        return show(store.item(int(row[0]))) if row else open_next(None)

    queue_table.select(select_row, None, outputs)
    export_button.click(lambda history: str(service.export_verdicts(history)), [export_history], export_file)

    def dicom_export(progress=gr.Progress()):  # noqa: B008  (Gradio injects it)
        try:
            archive, notes = service.export_dicom(lambda f, desc: progress(f, desc=desc))
        except (*USER_ERRORS, RuntimeError) as exc:  # RuntimeError: highdicom not installed
            raise fail(exc) from exc
        return str(archive), "\n".join(f"- {n}" for n in notes) or dicom_md.value

    dicom_button.click(dicom_export, None, [dicom_file, dicom_md])
