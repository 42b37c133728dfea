"""Learn: a model from normal images (uploads, zips or an allowed folder), offered in every model list."""

from __future__ import annotations

import html

import gradio as gr

from imaging_ad.app.safety import UPLOAD_SUFFIXES
from imaging_ad.app.tabs.common import USER_ERRORS, Shared, fail


def calibration_markdown(calibration) -> str:
    """What the thresholds promise, the warnings in bold, and the training images to look at."""
    lines = [html.escape(calibration.describe()) + "."]
    lines += [f"**Warning:** {html.escape(w)}" for w in calibration.warnings]
    if calibration.outliers:
        lines.append(
            "The training images that look least like the others (check them for anomalies, other views or scanners):"
        )
        lines += [f"- {html.escape(name)} (score {score:.4g})" for name, score in calibration.outliers]
    return "\n\n".join(lines)


def build(shared: Shared) -> None:
    from imaging_ad.detectors import list_detectors

    service = shared.service
    gr.Markdown(
        "Build a model from **normal** images only (at least 5; a few hundred are needed for a 1% "
        "false-positive threshold, and the result says what yours can promise). The model is saved in the "
        "data folder and offered in every model list."
    )
    with gr.Row():
        with gr.Column():
            files = gr.File(
                label="Normal images or zip archives",
                file_count="multiple",
                file_types=list(UPLOAD_SUFFIXES),
                type="filepath",
            )
            folder = gr.Textbox(
                label="…or a server folder of normal images",
                info=shared.folders_note,
                interactive=bool(service.config.allowed_roots),
            )
        with gr.Column():
            detector = gr.Dropdown(list_detectors(), value="patchcore", label="Detector")
            name = gr.Textbox(label="Model name", placeholder="e.g. tiles-line-3")
            size = gr.Slider(128, 384, value=224, step=32, label="Image size (pixels)")
            button = gr.Button("Fit", variant="primary")
            message = gr.Markdown()

    def learn(
        uploads,
        server_folder,
        detector_name,
        model_name,
        image_size,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008  (Gradio injects it)
    ):
        progress(0, desc="reading images")
        try:
            entry = service.learn(uploads or [], server_folder, detector_name, model_name, int(image_size))
        except USER_ERRORS as exc:
            raise fail(exc) from exc
        text = f"Saved **{entry.name}** ({entry.path.stat().st_size / 1e6:.1f} MB): {entry.description}.\n\n"
        text += calibration_markdown(service.calibration(entry))
        return (text, *shared.refreshed_dropdowns())

    # every model list is an output: wired once all tabs (and their dropdowns) exist
    shared.on_all_tabs_built.append(
        lambda: button.click(
            learn,
            [files, folder, detector, name, size],
            [message, *shared.model_dropdowns],
            api_name="do_learn",
        )
    )
