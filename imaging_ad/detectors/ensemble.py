"""Ensemble: several detectors on one backbone pass, their scores made comparable on normal images.

Raw scores of different detectors live on unrelated scales (a distance, a Mahalanobis norm, an SVM
margin). Each member's image scores and heatmap pixels are therefore standardised with the mean and
spread they have on the held-out *normal* images, then averaged; the ensemble is calibrated on the
same held-out normals like any detector. Members share the backbone, input size and preprocessing,
so the backbone runs once per image for all of them: an ensemble of two costs one forward pass plus
two detector heads. The ensemble drives its members through their public fitting and held-out
methods only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.base import Detector, Evidence
from imaging_ad.detectors.components.domain_guard import FitRecorder
from imaging_ad.detectors.registry import DETECTORS, register_detector
from imaging_ad.detectors.trained import ImageSpaceDetector, TrainedDetector
from imaging_ad.io.items import ImageInput

_BASE_PARAMS = (
    "backbone", "backbone_weights", "pretrained", "image_size", "aspect", "clahe", "intensity",
    "batch_size", "num_workers", "device", "seed", "progress",
)  # fmt: skip


class SelectedStages(nn.Module):
    """A shared backbone seen by one member: only that member's stages, in its order."""

    def __init__(self, extractor: nn.Module, positions: list[int]) -> None:
        super().__init__()
        self.extractor = extractor
        self.positions = list(positions)

    @property
    def info(self) -> Any:  # the shared backbone's description (channels and strides of every stage)
        return self.extractor.info

    @property
    def weight_source(self) -> Any:
        return self.extractor.weight_source

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.extractor(images)
        return [features[p] for p in self.positions]


class EnsembleHead(nn.Module):
    """Feature maps -> (scores, maps): every member's head on its own stages of the shared backbone pass,
    each member's scores and maps standardised with its normal-image statistics, maps brought to the
    finest member grid, then averaged."""

    def __init__(
        self, heads: list[nn.Module], positions: list[list[int]], normalization: torch.Tensor
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.positions = [list(p) for p in positions]
        self.register_buffer("normalization", normalization)  # (members, 4)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [
            head([features[p] for p in positions])
            for head, positions in zip(self.heads, self.positions, strict=True)
        ]
        return combine(outputs, self.normalization)


def combine(
    outputs: list[tuple[torch.Tensor, torch.Tensor]], normalization: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' (scores, maps) -> the ensemble's: each standardised on normal images, then averaged."""
    grid = max((tuple(int(s) for s in maps.shape[-2:]) for _, maps in outputs), key=lambda hw: hw[0] * hw[1])
    total_scores, total_maps = None, None
    for (scores, maps), row in zip(outputs, normalization, strict=True):
        s_mean, s_std, p_mean, p_std = row[0], row[1], row[2], row[3]
        maps = F.interpolate(maps[:, None].float(), size=grid, mode="bilinear", align_corners=False)[:, 0]
        scores = (scores.float() - s_mean) / s_std
        maps = (maps - p_mean) / p_std
        total_scores = scores if total_scores is None else total_scores + scores
        total_maps = maps if total_maps is None else total_maps + maps
    return total_scores / len(outputs), total_maps / len(outputs)


@register_detector("ensemble")
class Ensemble(Detector):
    """Several detectors on one backbone pass, each standardised on normal images, averaged.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.base.Detector`, which the members
    share):

    members
        registered names of two or more different feature-based detectors (default PatchCore and DFM).
    member_params
        each member's own hyperparameters, by name: ``{"patchcore": {"coreset_ratio": 0.05}}``.
    """

    def __init__(
        self,
        *,
        members: tuple[str, ...] | list[str] = ("patchcore", "dfm"),
        member_params: dict[str, dict[str, Any]] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.members = list(members)
        self.member_params = dict(member_params or {})
        unknown = [m for m in self.members if m not in DETECTORS or m == "ensemble"]
        if len(self.members) < 2 or len(set(self.members)) != len(self.members) or unknown:
            raise ValueError(
                f"an ensemble needs two or more different registered detectors, got {self.members} "
                f"(registered: {sorted(set(DETECTORS) - {'ensemble'})})"
            )
        pixel_models = [m for m in self.members if issubclass(DETECTORS[m], ImageSpaceDetector)]
        if pixel_models:
            raise ValueError(
                f"{', '.join(pixel_models)} model pixels, not backbone features, so cannot share the "
                "ensemble's backbone pass; combine feature-based detectors"
            )
        shared = {name: getattr(self, name) for name in _BASE_PARAMS}
        self.members_: list[Detector] = [
            DETECTORS[m](**{**shared, **self.member_params.get(m, {})}) for m in self.members
        ]
        self.exportable = all(m.exportable for m in self.members_)
        if all(m.cross_fitting is not None for m in self.members_):  # else: a held-out split for all
            self.cross_fitting = "each member's own"
        self.feature_strides = tuple(sorted({s for d in self.members_ for s in d.feature_strides}))
        self._positions = [[self.feature_strides.index(s) for s in d.feature_strides] for d in self.members_]
        # per member: mean and spread of its image scores and of its heatmap pixels on normal images
        self.normalization_: torch.Tensor | None = None

    def validate_params(self) -> None:
        super().validate_params()
        for member in self.members_:
            member.validate_params()

    def _setup(self) -> None:
        super()._setup()
        for member, positions in zip(self.members_, self._positions, strict=True):
            member.use_backbone(SelectedStages(self.extractor_, positions), self.preprocessor_)

    def _member_features(self, features: list[torch.Tensor], i: int) -> list[torch.Tensor]:
        return [features[p] for p in self._positions[i]]

    # -- fit ------------------------------------------------------------------------------------

    def learn(self, images: list[ImageInput], recorder: FitRecorder | None = None) -> None:
        """Streaming members learn from one shared backbone pass (``recorder`` keeps what the domain guard
        and cross-fitted calibration need); trained members (feature autoencoders) then read their own,
        possibly augmented, passes and train (the first of them records when no member streams)."""
        streaming = [(i, m) for i, m in enumerate(self.members_) if not isinstance(m, TrainedDetector)]
        if streaming:
            for _, member in streaming:
                member.begin_fit(len(images))
            for features, _ in self.extracted_batches(images, desc=f"{self.name}: fit", recorder=recorder):
                for i, member in streaming:
                    member.partial_fit(self._member_features(features, i))
            for _, member in streaming:
                member.end_fit()
                member.refresh_head()
        trained = [m for m in self.members_ if isinstance(m, TrainedDetector)]
        for k, member in enumerate(trained):
            member.learn(images, recorder if not streaming and k == 0 else None)

    def held_out_evidence(self, features: list[torch.Tensor]) -> list[Evidence]:
        return [m.held_out_evidence(self._member_features(features, i)) for i, m in enumerate(self.members_)]

    def cross_fitted_evidence(self, features: list[torch.Tensor], positions: list[int]) -> list[Evidence]:
        return [
            m.cross_fitted_evidence(self._member_features(features, i), positions)
            for i, m in enumerate(self.members_)
        ]

    def release_fit_state(self) -> None:
        for member in self.members_:
            member.release_fit_state()

    def learn_from_held_out(self, evidence: list[list[Evidence]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member learns from its share of the held-out evidence (PatchCore: per-position statistics,
        leave-one-out scores); each member's calibration scores and maps give its standardisation, and the
        ensemble's calibration scores and maps are the members' combined exactly as the head combines them."""
        outputs = [
            m.learn_from_held_out([batch[i] for batch in evidence]) for i, m in enumerate(self.members_)
        ]
        rows = []
        for scores, maps in outputs:
            s = scores.float().cpu().numpy()
            p = maps.float().cpu().numpy().ravel()
            rows.append(
                [s.mean(), max(s.std(), 1e-6 * max(abs(s.mean()), 1.0)), p.mean(), max(p.std(), 1e-12)]
            )
        self.normalization_ = torch.from_numpy(np.array(rows, dtype=np.float32)).to(self.device_)
        self.refresh_head()
        return combine(outputs, self.normalization_)

    # -- heads ----------------------------------------------------------------------------------

    def _build_head(self) -> EnsembleHead:
        return EnsembleHead([m.head_ for m in self.members_], self._positions, self._normalization())

    def export_head(self) -> EnsembleHead:
        return EnsembleHead([m.export_head() for m in self.members_], self._positions, self._normalization())

    def not_exportable_reason(self) -> str:
        return "; ".join(
            f"member {m.name!r}: {m.not_exportable_reason()}" for m in self.members_ if not m.exportable
        )

    def export_notes(self) -> dict:
        notes: dict = {}
        for member in self.members_:
            notes.update(member.export_notes())
        return notes

    def _normalization(self) -> torch.Tensor:
        if self.normalization_ is None:  # before the held-out pass: members not standardised yet
            return torch.tensor([[0.0, 1.0, 0.0, 1.0]] * len(self.members_), device=self.device_)
        return self.normalization_

    # -- persistence ----------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"normalization": self.normalization_}
        for i, member in enumerate(self.members_):
            state.update({f"member{i}.{k}": v for k, v in member.learned_state().items()})
        return state

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.normalization_ = tensors["normalization"].float().to(self.device_)
        for i, member in enumerate(self.members_):
            prefix = f"member{i}."
            member.restore_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
