"""One ``torch.nn.Module`` per fitted detector: preprocessed images -> (scores, smoothed heatmaps).

The graph is the detector's own parts: its feature module (the frozen backbone's selected stages), its
head (``Detector.export_head``: the head eager scoring calls, with exact search where eager scoring may
search approximately) and its heatmap smoothing. Nothing is re-implemented here; only tf-style "same"
padding is fixed for the input size (:mod:`imaging_ad.export.static_padding`). Shapes are fixed at
export (the model input is ``image_size`` square) except the batch dimension.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from imaging_ad.detectors.base import Detector
from imaging_ad.export.errors import ExportError
from imaging_ad.export.static_padding import with_static_padding


class ExportGraph(nn.Module):
    """Feature module + detector head + heatmap smoothing (+ the out-of-domain guard's feature distances,
    when the detector has a guard), on the CPU in float32."""

    def __init__(
        self, features: nn.Module, head: nn.Module, smoothing: nn.Module, guard: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.smoothing = smoothing
        self.guard = guard

    @property
    def output_names(self) -> tuple[str, ...]:
        return (
            ("scores", "heatmaps", "domain_distances") if self.guard is not None else ("scores", "heatmaps")
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.features(images)
        scores, maps = self.head(features)
        if self.guard is None:
            return scores, self.smoothing(maps)
        return scores, self.smoothing(maps), self.guard(features)


def exportable_detectors() -> list[str]:
    """Registered detectors whose head is a fixed tensor graph (an ensemble: when all its members are)."""
    from imaging_ad.detectors import DETECTORS

    return sorted(name for name, cls in DETECTORS.items() if cls.exportable)


def build_graph(detector: Detector) -> ExportGraph:
    """The export graph of a fitted detector (the detector itself is left untouched)."""
    if not detector.exportable:
        raise ExportError(
            f"detector {detector.name!r} cannot be exported (exportable: {', '.join(exportable_detectors())}): "
            f"{detector.not_exportable_reason()}; use the checkpoint with imaging-ad predict"
        )
    detector._check_fitted()
    head = detector.export_head()
    features, guard = detector.feature_module(), detector.domain_guard_
    if detector.device_.type != "cpu" or any(p.dtype != torch.float32 for p in features.parameters()):
        # a CPU float32 copy: the graph runs on the CPU, and the caller's detector must not move
        features, head = copy.deepcopy(features).cpu().float(), copy.deepcopy(head).cpu().float()
        guard = None if guard is None else copy.deepcopy(guard).cpu().float()
    size = detector.preprocessor_.image_size
    # tf-style "same" padding computed once for the fixed input size: constant pads the runtimes fold
    features = with_static_padding(features, size)
    with torch.inference_mode():
        _, maps = head(features(torch.zeros(1, 3, size, size)))
    smoothing = copy.deepcopy(detector.smoothing_for(maps.shape[-2:])).cpu()
    return ExportGraph(features.eval(), head.eval(), smoothing, guard).eval().requires_grad_(False)
