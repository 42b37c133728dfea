"""Batch: many images, zips or an allowed server folder through the library's resumable scan."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from imaging_ad.app.safety import UPLOAD_SUFFIXES
from imaging_ad.app.service import BatchResult
from imaging_ad.app.tabs.common import USER_ERRORS, Shared, fail, file_url


def summary_markdown(result: BatchResult) -> str:
    lines = [
        f"**{result.n_scored}** of {result.n_files} image(s) scored in {result.seconds:.1f} s, "
        f"**{result.n_flagged}** flagged, {result.n_errors} unreadable. All scored images are now in the Review queue. "
        f"[Open the scan report]({file_url(result.report_path)})"
    ]
    errors = [r for r in result.rows if r.get("error")]
    for row in errors[:10]:
        lines.append(f"- {html.escape(row['path'])}: {html.escape(str(row['error']))}")
    lines += [f"- {html.escape(n)}" for n in result.notes]
    return "\n".join(lines)


def gallery(result: BatchResult, limit: int = 200) -> list[tuple[str, str]]:
    out = []
    for row in result.rows:
        # error rows (unreadable or non-finite) have no normalised score and are left out
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


def build(shared: Shared) -> None:
    service = shared.service
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(
                # browsers send file names without their folders; a zip keeps them
                label="Images or zip archives of images (a zip keeps its folders)",
                file_count="multiple",
                file_types=list(UPLOAD_SUFFIXES),
                type="filepath",
                elem_id="batch-upload",
            )
            folder = gr.Textbox(
                label="…or a server folder",
                info=shared.folders_note,
                interactive=bool(service.config.allowed_roots),
            )
            model = shared.model_dropdown()
            button = gr.Button("Scan", variant="primary", elem_id="batch-run")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="batch-summary")
            overlays = gr.Gallery(
                label="Overlays, highest score first",
                columns=4,
                height=480,
                object_fit="contain",
                elem_id="batch-gallery",
            )
            csv = gr.File(label="results.csv", interactive=False)

    def scan(uploads: list[str] | None, server_folder: str, label: str, progress=gr.Progress()):  # noqa: B008  (Gradio injects it)
        try:
            result = service.run_batch(
                uploads or [], server_folder, label, progress=lambda f, desc: progress(f, desc=desc)
            )
        except USER_ERRORS as exc:
            raise fail(exc) from exc
        return summary_markdown(result), gallery(result), str(result.csv_path)

    button.click(scan, [files, folder, model], [summary, overlays, csv], api_name="do_batch")
