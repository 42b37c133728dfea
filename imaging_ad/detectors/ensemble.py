"""Ensemble: several detectors on one backbone pass, their scores made comparable on normal images.

Raw scores of different detectors live on unrelated scales (a distance, a Mahalanobis norm, an SVM
margin). Each member's image scores and heatmap pixels are therefore standardised with the mean and
spread they have on the held-out *normal* images, then averaged; the ensemble is calibrated on the
same held-out normals like any detector. Members share the backbone, input size and preprocessing,
so the backbone runs once per image for all of them: an ensemble of two costs one forward pass plus
two detector heads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imaging_ad.detectors.base import Detector, sample_for_calibration
from imaging_ad.detectors.inputs import ImageInput
from imaging_ad.detectors.registry import DETECTORS, register_detector
from imaging_ad.detectors.trained import ImageSpaceDetector, TrainedDetector

_BASE_PARAMS = (
    "backbone", "backbone_weights", "pretrained", "image_size", "aspect", "clahe", "intensity",
    "batch_size", "num_workers", "device", "seed",
)  # fmt: skip


@register_detector("ensemble")
class Ensemble(Detector):
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
            DETECTORS[m](**{**shared, **self.member_params.get(m, {}), "progress": False})
            for m in self.members
        ]
        self.feature_strides = tuple(sorted({s for d in self.members_ for s in d.feature_strides}))
        self._positions = [[self.feature_strides.index(s) for s in d.feature_strides] for d in self.members_]
        # per member: mean and spread of its image scores and of its heatmap pixels on normal images
        self.normalization_: torch.Tensor | None = None
        # while calibrating: the members' outputs on each held-out batch, with its images' original sizes
        self._held_out_outputs: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list]] | None = None

    # -- sharing the backbone -------------------------------------------------------------------

    def _setup(self) -> None:
        super()._setup()
        for i, member in enumerate(self.members_):
            member.device_ = self.device_
            member.extractor_ = self.extractor_
            member.preprocessor_ = self.preprocessor_
            if isinstance(member, TrainedDetector):
                # it reads its own training passes; give it only its stages of the shared extractor
                member._extract = lambda images, i=i: self._member_features(
                    Detector._extract(self, images), i
                )

    def _member_features(self, features: list[torch.Tensor], i: int) -> list[torch.Tensor]:
        return [features[p] for p in self._positions[i]]

    # -- fit ------------------------------------------------------------------------------------

    def _fit_images(self, train: list[ImageInput]) -> None:
        """Streaming members share one backbone pass; trained members (feature autoencoders) then cache
        their own, possibly augmented, passes and train."""
        streaming = [(i, m) for i, m in enumerate(self.members_) if not isinstance(m, TrainedDetector)]
        if streaming:
            self._fit_members_in_one_pass(
                self._feature_batches(train, desc=f"{self.name}: fit"), len(train), streaming
            )
        for member in self.members_:
            if isinstance(member, TrainedDetector):
                member.progress = self.progress
                member._fit_images(train)
                member.progress = False

    def _fit_members_in_one_pass(
        self, batches: Iterator[list[torch.Tensor]], n_images: int, members: list[tuple[int, Detector]]
    ) -> None:
        consumers = [
            (lambda stream, i=i, member=member: member._fit_stream(
                (self._member_features(f, i) for f in stream), n_images
            ))
            for i, member in members
        ]  # fmt: skip
        _fan_out(batches, consumers)

    @contextmanager
    def _learning_from_held_out(
        self, held_out: list[ImageInput]
    ) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """Standardise each member on the held-out normals, in one pass in which members that learn from
        held-out normals (PatchCore's per-position statistics) learn too. The ensemble is then calibrated
        on the same images, with calibration scores built from the members' own calibration scores (leave
        one out where a member learnt from these images) exactly as :meth:`_score` combines them, and
        heatmap pixels from the members' maps of that same pass (:meth:`_calibration_samples`): one
        backbone pass over the held-out images in all."""
        self.normalization_ = None
        scores: list[list[np.ndarray]] = [[] for _ in self.members_]
        pixels: list[list[np.ndarray]] = [[] for _ in self.members_]
        kept = []
        with ExitStack() as learning:
            final_scores = [
                learning.enter_context(m._learning_from_held_out(held_out)) for m in self.members_
            ]
            for features, batch in self._extracted_batches(held_out, desc=f"{self.name}: standardise"):
                outputs = [m._score(self._member_features(features, i)) for i, m in enumerate(self.members_)]
                for i, (s, maps) in enumerate(outputs):
                    scores[i].append(s.float().cpu().numpy())
                    pixels[i].append(maps.float().cpu().numpy().ravel())
                kept.append((outputs, batch.original_sizes))
            member_scores = [final(np.concatenate(s)) for final, s in zip(final_scores, scores, strict=True)]
        rows = []
        for s, p in zip(member_scores, pixels, strict=True):
            p = np.concatenate(p)
            rows.append(
                [s.mean(), max(s.std(), 1e-6 * max(abs(s.mean()), 1.0)), p.mean(), max(p.std(), 1e-12)]
            )
        normalization = np.array(rows, dtype=np.float32)
        self.normalization_ = torch.from_numpy(normalization).to(self.device_)
        combined = np.mean(
            [(s - row[0]) / row[1] for s, row in zip(member_scores, normalization, strict=True)], axis=0
        )
        self._held_out_outputs = kept
        try:
            yield lambda _: combined.astype(np.float32)
        finally:
            self._held_out_outputs = None

    def _calibration_samples(self, held_out: list[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """While calibrating, from the standardising pass's member outputs instead of a second pass."""
        if self._held_out_outputs is None:
            return super()._calibration_samples(held_out)

        def scored() -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
            for outputs, original_sizes in self._held_out_outputs:
                scores, maps = self._combine(outputs)
                yield scores.float().cpu().numpy(), self._heatmaps(maps, original_sizes)

        return sample_for_calibration(scored(), self.seed)

    # -- score ----------------------------------------------------------------------------------

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._combine(
            [m._score(self._member_features(features, i)) for i, m in enumerate(self.members_)]
        )

    def _combine(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Members' (scores, maps) -> the ensemble's: each standardised on normal images, then averaged."""
        if self.normalization_ is None:
            raise RuntimeError("the ensemble's members are not standardised yet")
        grid = max((maps.shape[-2:] for _, maps in outputs), key=lambda hw: hw[0] * hw[1])
        total_scores, total_maps = 0.0, 0.0
        for (scores, maps), (s_mean, s_std, p_mean, p_std) in zip(outputs, self.normalization_, strict=True):
            maps = F.interpolate(maps[:, None].float(), size=grid, mode="bilinear", align_corners=False)[:, 0]
            total_scores = total_scores + (scores.float() - s_mean) / s_std
            total_maps = total_maps + (maps - p_mean) / p_std
        return total_scores / len(outputs), total_maps / len(outputs)

    # -- persistence ----------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        state = {"normalization": self.normalization_}
        for i, member in enumerate(self.members_):
            state.update({f"member{i}.{k}": v for k, v in member._state().items()})
        return state

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.normalization_ = tensors["normalization"].float().to(self.device_)
        for i, member in enumerate(self.members_):
            prefix = f"member{i}."
            member._set_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def _fan_out(batches: Iterator[Any], consumers: list[Callable[[Iterator[Any]], None]]) -> None:
    """Feed every batch to every consumer, each running its own loop in a thread, so one pass over
    the data (one backbone forward per image) fits all members. Errors reach the caller."""
    done = object()
    queues = [queue.Queue(maxsize=2) for _ in consumers]
    errors: list[BaseException] = []
    stop = threading.Event()

    def run(consumer: Callable[[Iterator[Any]], None], q: queue.Queue) -> None:
        ended = threading.Event()

        def stream() -> Iterator[Any]:
            while (item := q.get()) is not done:
                yield item
            ended.set()

        try:
            consumer(stream())
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            errors.append(error)
            stop.set()
        finally:
            while not ended.is_set():  # a consumer that stopped early must not block the producer
                if q.get() is done:
                    break

    threads = [
        threading.Thread(target=run, args=(c, q), daemon=True) for c, q in zip(consumers, queues, strict=True)
    ]
    for t in threads:
        t.start()
    try:
        for batch in batches:
            if stop.is_set():
                break
            for q in queues:
                q.put(batch)
    finally:
        for q in queues:
            q.put(done)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
