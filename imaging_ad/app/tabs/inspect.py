"""Inspect: one image -> score, verdict at a movable threshold, overlay and heatmap, what the reader saw."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import numpy as np

from imaging_ad.app import feedback
from imaging_ad.app.safety import IMAGE_SUFFIXES
from imaging_ad.app.service import InspectResult
from imaging_ad.app.tabs.common import USER_ERRORS, Shared, fail


@dataclass
class InspectTab:
    state: gr.State
    threshold: gr.Slider
    verdict: gr.Markdown


def render_overlay(result: InspectResult | None, opacity: float) -> np.ndarray | None:
    from imaging_ad.visualize import ColourScale, overlay_with_legend

    if result is None:
        return None
    return overlay_with_legend(
        result.display, result.heatmap, ColourScale.of(_calibration_of(result)), float(opacity)
    )


def render_heatmap(result: InspectResult) -> np.ndarray:
    from imaging_ad.visualize import ColourScale, colour_bar, heatmap_to_color

    scale = ColourScale.of(_calibration_of(result))
    picture = heatmap_to_color(result.heatmap, vmin=scale.low, vmax=scale.high)
    return np.concatenate([picture, colour_bar(picture.shape[0], scale)], axis=1)


def verdict_markdown(result: InspectResult | None, normalized_threshold: float) -> str:
    """The verdict at the slider's threshold: pure arithmetic on the stored score, no model call."""
    if result is None:
        return "Upload an image (or pick an example) to score it."
    raw = feedback.raw_threshold(_calibration_of(result), normalized_threshold)
    anomalous = result.is_anomaly(normalized_threshold)
    word = "ANOMALOUS" if anomalous else "NORMAL"
    outside = ""
    if result.out_of_domain:  # no verdict: the model has never seen anything like this image
        word = "OUTSIDE THIS MODEL'S TRAINING DOMAIN — score not meaningful"
        reasons = "".join(f"- {html.escape(reason)}\n" for reason in result.out_of_domain)
        outside = f"This image is unlike the images the model learnt from:\n\n{reasons}\n"
    return (
        f"### Verdict: **{word}**\n\n" + outside + f"| measure | value |\n|---|---|\n"
        f"| score | <span id='inspect-score'>{result.score:.4f}</span> |\n"
        f"| normalised score | {result.normalized_score:.3f} |\n"
        f"| threshold | {normalized_threshold:.2f} normalised = {raw:.4f} raw "
        f"(calibrated: 0.50 = {result.threshold:.4f}, {result.target_fpr:.0%} false positives on normals it did not learn from) |\n"
        f"| image | {html.escape(result.name)} |\n"
        f"| model | {html.escape(result.model_name)} ({result.model_seconds * 1000:.0f} ms to read and score) |\n\n"
        "Heatmap colours (the bar beside the pictures): blue up to the calibrated pixel threshold (as normal as "
        "normal images get), red at the model's upper reference; the same value is the same colour for every "
        "image and in every output. The image is in the Review queue."
    )


def _calibration_of(result: InspectResult):
    if result.calibration is not None:
        return result.calibration
    from imaging_ad.calibration import Calibration

    return Calibration(result.threshold, result.pixel_threshold, result.score_scale, result.target_fpr, 0)


def build(shared: Shared) -> InspectTab:
    service = shared.service
    examples = sorted(p for p in service.config.examples_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(
                label="Image: PNG, JPEG, TIFF, BMP or DICOM",
                file_types=list(IMAGE_SUFFIXES),
                type="filepath",
                elem_id="inspect-upload",
            )
            model = shared.model_dropdown(elem_id="inspect-model")
            model_path = gr.Textbox(
                label="…or a model file (.safetensors) path",
                placeholder="/path/inside/an/allowed/folder/model.safetensors",
                info="Inside an allowed folder or the data folder's models/.",
            )
            button = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
            if examples:
                gr.Examples(
                    examples=[[str(p)] for p in examples],
                    inputs=[upload],
                    label="Example chest X-rays (Kermany et al. 2018, CC BY 4.0)",
                    examples_per_page=12,
                )
            image_facts = gr.JSON(label="Image", elem_id="inspect-facts")
        with gr.Column(scale=2):
            verdict = gr.Markdown(verdict_markdown(None, 0.5), elem_id="inspect-result")
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
                    label="Anomaly map", format="png", interactive=False, elem_id="inspect-heatmap"
                )
            opacity = gr.Slider(0.0, 1.0, value=0.45, step=0.05, label="Heatmap opacity")

    def inspect(path: str | None, label: str, path_of_model: str, t: float, alpha: float):
        if not path:
            return None, verdict_markdown(None, t), None, None, None
        try:
            result = service.inspect(path, label, path_of_model)
        except USER_ERRORS as exc:
            raise fail(exc) from exc
        return (
            result,
            verdict_markdown(result, t),
            render_overlay(result, alpha),
            render_heatmap(result),
            result.meta,
        )

    gr.on(
        [upload.change, button.click],
        inspect,
        [upload, model, model_path, threshold, opacity],
        [state, verdict, overlay_image, heatmap_image, image_facts],
        api_name="do_inspect",  # the HTTP API's name, kept stable for scripts that call it
    )
    threshold.change(verdict_markdown, [state, threshold], verdict, queue=False, show_progress="hidden")
    opacity.change(render_overlay, [state, opacity], overlay_image, queue=False, show_progress="hidden")
    return InspectTab(state, threshold, verdict)
