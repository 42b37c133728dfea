"""What every tab shares: the user-error types, the error shown instead of a stack trace, file URLs,
and the widgets other tabs update (model lists, Inspect's threshold)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from imaging_ad.app.safety import UnsafeInputError
from imaging_ad.app.service import DemoService
from imaging_ad.io import ImageReadError

USER_ERRORS = (UnsafeInputError, ImageReadError, ValueError, FileNotFoundError)


def fail(exc: Exception) -> gr.Error:
    """A message for the user instead of a stack trace (input problems are expected, not bugs)."""
    return gr.Error(str(exc), duration=None)


def file_url(path: Path) -> str:
    """Gradio's URL of a file under an allowed path (the media folder)."""
    return "/gradio_api/file=" + quote(str(path))


@dataclass
class Shared:
    """Built once for the whole app and handed to every tab."""

    service: DemoService
    labels: list[str]
    default_label: str | None
    folders_note: str
    #: every model dropdown, refreshed when Learn or Improve saves a model
    model_dropdowns: list[gr.Dropdown] = field(default_factory=list)
    #: wiring that needs every tab's widgets (run by the app once all tabs exist)
    on_all_tabs_built: list[Callable[[], object]] = field(default_factory=list)

    def model_dropdown(self, **kwargs) -> gr.Dropdown:
        dropdown = gr.Dropdown(self.labels, value=self.default_label, label="Model", **kwargs)
        self.model_dropdowns.append(dropdown)
        return dropdown

    def refreshed_dropdowns(self) -> list[gr.Dropdown]:
        choices = self.service.model_labels()
        return [gr.Dropdown(choices=choices) for _ in self.model_dropdowns]
