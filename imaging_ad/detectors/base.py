"""The detector contract: construct with hyperparameters, ``fit`` on normal images, ``predict``.

A detector is a frozen backbone plus a *head*: a ``torch.nn.Module`` from the backbone's feature maps to
image scores and anomaly maps at feature resolution. The head is the only scoring code: eager prediction
calls it, and export traces it. Subclasses say how they learn (``begin_fit`` / ``partial_fit`` /
``end_fit`` over one pass of feature batches, or ``learn`` for detectors that train over several epochs),
how their head is built from what they learnt (``_build_head``) and which tensors to save (``_state`` /
``_set_state``). Reading, preprocessing, batching, devices, calibration, heatmap smoothing and resizing,
and persistence live here or in the modules named below, once.
"""

from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from imaging_ad.backbones import DEFAULT_BACKBONE, FeatureExtractor, create_backbone, feature_reductions
from imaging_ad.calibration import Calibration, calibrate
from imaging_ad.detectors import persistence
from imaging_ad.detectors.components.domain_guard import (
    DomainGuard,
    FitRecorder,
    guard_positions,
    leave_one_out_threshold,
)
from imaging_ad.detectors.components.feature_cache import FeatureCache
from imaging_ad.detectors.components.smoothing import HeatmapSmoothing
from imaging_ad.detectors.params import Interval, OneOf, constructor_parameters, validate_params
from imaging_ad.devices import resolve_device
from imaging_ad.domain import ImageFacts, TrainingFacts
from imaging_ad.inference import Outcome, Transform, batches, predict_all, read_ahead, stacked
from imaging_ad.io.items import ImageInput, item_path
from imaging_ad.preprocess import ASPECT_MODES, INTENSITY_MODES, Preprocessor
from imaging_ad.result import AnomalyResult

# Enough normal pixels for a stable 99th percentile without keeping whole heatmaps.
_PIXELS_PER_CALIBRATION_IMAGE = 4096
# The model-file key of the out-of-domain guard's training vectors.
_GUARD_KEY = "domain_guard.reference"
# Training images' features kept from the fit's pass for cross-fitted calibration (the rest are read again).
_CALIBRATION_CACHE_BYTES = 512 * 2**20

#: a held-out batch's outputs, as a detector's ``held_out_evidence`` returns them
Evidence = Any


class CalibrationWarning(UserWarning):
    """The normal images cannot support the promised false-positive rate, or a few of them stand out."""


class Detector(ABC):
    """Base class of every registered detector (see :mod:`imaging_ad.detectors.registry`).

    Hyperparameters shared by every detector (keyword-only, checked before any work):

    backbone, backbone_weights, pretrained
        timm model name (default ``tf_efficientnet_lite0``, whose weights ship with the package); a local
        ``.safetensors``/``.pth`` weights file; ``pretrained=False`` for random weights (tests only).
    image_size, aspect, clahe, intensity
        preprocessing (:class:`~imaging_ad.preprocess.Preprocessor`): model-input side in pixels,
        ``"stretch"`` or ``"letterbox"``, contrast-limited equalisation for radiographs, intensity scaling.
    target_fpr
        false-positive rate on normal images that the image threshold aims at (default 1%).
    holdout_fraction
        share of the normal images kept aside to set thresholds, for detectors that do not cross-fit.
    max_calibration_images
        most training images whose cross-fitted scores set the thresholds (an even random sample beyond).
    max_guard_images
        most training images the out-of-domain guard keeps as its reference (an even random sample
        beyond; each costs a few kB of the model file).
    blur_sigma
        Gaussian smoothing of heatmaps, in model-input pixels (0 disables it).
    batch_size, num_workers, device, seed, progress
        images per forward pass; threads reading ahead (0: up to four); ``"auto"``, ``"cpu"`` or
        ``"cuda"``; seed of every random choice; progress bars.
    """

    name: ClassVar[str]
    #: layers of the backbone this detector reads, chosen by stride (output reduction)
    feature_strides: ClassVar[tuple[int, ...]] = (8, 16)
    #: how calibration scores of the training images are made without each image (e.g. "leave-one-out");
    #: None: a held-out split of the normal images sets the thresholds instead
    cross_fitting: ClassVar[str | None] = None
    #: the attributes ``partial_fit`` accumulates that are sums over images (numbers and tensors add up,
    #: lists join in order): a fit split over machines adds its shards' values before ``end_fit``
    #: (:mod:`imaging_ad.detectors.ray_fit`); empty for detectors whose fit is no such sum
    fit_statistics: ClassVar[tuple[str, ...]] = ()
    #: whether the out-of-domain guard compares deep features (detectors of raw pixels check image facts only)
    guards_features: ClassVar[bool] = True
    #: whether the head is a fixed tensor graph that ONNX and TorchScript can hold
    exportable: ClassVar[bool] = True
    #: whether ``imaging-ad fit --help`` recommends this detector; a detector kept for comparison only sets
    #: False and says why, with the figure measured (``benchmarks/RESULTS.md``), in ``not_recommended_because``
    recommended: ClassVar[bool] = True
    not_recommended_because: ClassVar[str] = ""
    #: ranges and choices of hyperparameters; types come from the constructors' annotations
    param_constraints: ClassVar[dict[str, Interval | OneOf]] = {
        "image_size": Interval(32, 4096),
        "aspect": OneOf(ASPECT_MODES),
        "intensity": OneOf(INTENSITY_MODES),
        "target_fpr": Interval(0, 0.5, "neither"),
        "holdout_fraction": Interval(0, 1, "left"),
        "blur_sigma": Interval(0, None),
        "batch_size": Interval(1, None),
        "num_workers": Interval(0, 64),
        "max_calibration_images": Interval(3, None),
        "max_guard_images": Interval(2, None),
    }

    def __init__(
        self,
        *,
        backbone: str = DEFAULT_BACKBONE,
        backbone_weights: str | None = None,
        pretrained: bool = True,
        image_size: int = 256,
        aspect: str = "stretch",
        clahe: bool = False,
        intensity: str = "robust",
        target_fpr: float = 0.01,
        holdout_fraction: float = 0.1,
        max_calibration_images: int = 2000,
        max_guard_images: int = 2000,
        blur_sigma: float = 4.0,
        batch_size: int = 16,
        num_workers: int = 0,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.backbone = backbone
        self.backbone_weights = backbone_weights
        self.pretrained = pretrained
        self.image_size = image_size
        self.aspect = aspect
        self.clahe = clahe
        self.intensity = intensity
        self.target_fpr = target_fpr
        self.holdout_fraction = holdout_fraction
        self.max_calibration_images = max_calibration_images
        self.max_guard_images = max_guard_images
        self.blur_sigma = blur_sigma
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.seed = seed
        self.progress = progress
        self.extractor_: nn.Module | None = None
        self.preprocessor_: Preprocessor | None = None
        self.calibration_: Calibration | None = None
        self.head_: nn.Module | None = None
        self.domain_guard_: DomainGuard | None = None
        self._smoothing: dict[tuple[int, int], HeatmapSmoothing] = {}

    # -- what a detector says about itself ------------------------------------------------------

    def begin_fit(self, n_images: int) -> None:
        """Start learning from ``n_images`` normal images whose features :meth:`partial_fit` will bring."""
        raise NotImplementedError(f"{type(self).__name__} learns with learn(), not from one feature pass")

    def partial_fit(self, features: list[torch.Tensor]) -> None:
        """Learn from one batch of feature maps of normal images (on ``device_``)."""
        raise NotImplementedError

    def end_fit(self) -> None:
        """Finish learning: set the learned state from what :meth:`partial_fit` gathered."""
        raise NotImplementedError

    @abstractmethod
    def _build_head(self) -> nn.Module:
        """The scoring head from the learned state: feature maps -> (image scores ``(B,)``, maps ``(B, h, w)``)."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Learned tensors to save (besides calibration, which is saved for every detector)."""

    @abstractmethod
    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``_state`` returned."""

    def held_out_evidence(self, features: list[torch.Tensor]) -> Evidence:
        """What a batch of held-out normal images tells calibration (by default the head's outputs).
        Detectors that learn from held-out normals too (PatchCore's per-position statistics) return more."""
        with torch.inference_mode():
            return self.head_(features)

    def cross_fitted_evidence(self, features: list[torch.Tensor], positions: list[int]) -> Evidence:
        """:meth:`held_out_evidence` for training images (at ``positions`` of the fit's list), each scored by
        the detector as if fitted without it. Detectors with a :attr:`cross_fitting` method implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not cross-fit its calibration")

    def learn_from_held_out(self, evidence: list[Evidence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Learn what the held-out normals teach (nothing by default) and return their calibration image
        scores ``(N,)`` and maps ``(N, h, w)``, in the order the evidence came in."""
        return torch.cat([scores for scores, _ in evidence]), torch.cat([maps for _, maps in evidence])

    def feature_module(self) -> nn.Module:
        """Preprocessed images -> the feature maps the head reads (the backbone's selected stages)."""
        return self.extractor_

    def export_head(self) -> nn.Module:
        """The head an export traces: this detector's own, unless it searches approximately."""
        return self.head_

    def not_exportable_reason(self) -> str:
        return "its scoring is not written as a fixed tensor graph"

    def export_notes(self) -> dict:
        """What an export's sidecar should say about how its head differs from eager scoring (if at all)."""
        return {}

    # -- scikit-learn style parameters ----------------------------------------------------------

    @classmethod
    def _param_defaults(cls) -> dict[str, Any]:
        """Keyword-only constructor parameters of this class and its bases, with their defaults."""
        return {name: default for name, (default, _) in constructor_parameters(cls).items()}

    @classmethod
    def params_of_older_files(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Saved hyperparameters as this version reads them: a parameter added later gets the value that
        reproduces what older files did, not today's default."""
        return params

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_defaults()}

    def validate_params(self) -> None:
        """Raise :class:`~imaging_ad.detectors.params.ParameterError` for a bad hyperparameter value."""
        validate_params(type(self), self.get_params())

    def __repr__(self) -> str:
        defaults = self._param_defaults()
        changed = {k: v for k, v in self.get_params().items() if defaults[k] != v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # -- fitting --------------------------------------------------------------------------------

    def fit(
        self, normal_images: Sequence[ImageInput], validation_images: Sequence[ImageInput] | None = None
    ) -> Detector:
        """Learn from normal images and set the thresholds.

        Detectors that cross-fit (:attr:`cross_fitting`) learn from every image and calibrate on every image's
        score made without that image (up to ``max_calibration_images`` of them), so the threshold rests on
        as many normals as were given. The others keep ``holdout_fraction`` of the images aside for it.
        ``validation_images`` (also normal) replace either: the detector learns from all ``normal_images``
        and calibrates on those."""
        self.validate_params()
        images = list(normal_images)
        if not images:
            raise ValueError("fit needs at least one normal training image")
        source = f"{len(images)} training normals"
        positions = guard_positions(self.feature_strides)
        if validation_images is not None:
            held_out = list(validation_images)
            self._setup()
            recorder = FitRecorder(positions)
            self.learn(images, recorder)
            calibration = self._calibrate(
                held_out, "separate validation images", f"{len(held_out)} validation normals"
            )
        elif self.cross_fitting is not None:
            chosen = self.begin_cross_fitted_fit(len(images))
            recorder = FitRecorder(positions, FeatureCache(chosen, _CALIBRATION_CACHE_BYTES))
            self.learn(images, recorder)
            calibration = self._cross_fitted_calibration(images, chosen, recorder.cache, source)
        else:
            train, held_out = self._split_holdout(images)
            if len(held_out) < 2:
                raise ValueError(
                    "calibration needs at least two held-out normal images (holdout_fraction > 0)"
                )
            self._setup()
            recorder = FitRecorder(positions)
            self.learn(train, recorder)
            calibration = self._calibrate(held_out, f"held-out split ({self.holdout_fraction:.0%})", source)
        return self.complete_fit(calibration, recorder)

    # -- the steps of a fit that a distributed fit (imaging_ad.detectors.ray_fit) shares -----------
    # A cross-fitted fit elsewhere (learning split over machines) runs: begin_cross_fitted_fit on the
    # driver; learning, however it is split; cross_fitted_evidence of the chosen images, wherever they are
    # scored; cross_fitted_calibration on the driver with all of it in one list; complete_fit. fit() runs
    # the same steps, so both set thresholds, per-position statistics and the domain guard one way.

    def begin_cross_fitted_fit(self, n_images: int) -> list[int]:
        """Start a cross-fitted fit on ``n_images`` training images: refuse too few, set up the backbone and
        preprocessing (seeded), and return the positions (in the training list) of the images whose
        cross-fitted scores will set the thresholds: all, or an even random sample of
        ``max_calibration_images``."""
        if self.cross_fitting is None:
            raise ValueError(f"{type(self).__name__} does not cross-fit its calibration")
        if n_images < 3:
            raise ValueError(f"{n_images} normal image(s): cross-fitted calibration needs at least 3")
        chosen = self._calibration_choice(n_images)
        self._setup()
        return chosen

    def cross_fitted_calibration(
        self, evidence: list[Evidence], sizes: list[tuple[int, int]], names: list[str], source: str
    ) -> Calibration:
        """Thresholds (and what the detector learns from held-out normals) from the training images'
        cross-fitted evidence: :meth:`cross_fitted_evidence`'s outputs batch by batch, with each image's
        original size and name in the same order; ``source`` says which images they were."""
        return self._thresholds(evidence, sizes, f"cross-fitted ({self.cross_fitting})", source, names)

    def complete_fit(self, calibration: Calibration, recorder: FitRecorder) -> Detector:
        """Finish a fit: the out-of-domain guard from the training images ``recorder`` saw (their pooled
        vectors and facts, in training order), the calibration with it, the fit-only state dropped and the
        calibration's warnings raised. Returns the detector."""
        self.calibration_ = self._with_domain_guard(
            calibration, recorder.reference(self.max_guard_images, self.seed), recorder.facts
        )
        self.release_fit_state()
        # warn -> _warn_about_calibration -> complete_fit -> fit (or fit_on_ray) -> the caller's line
        self._warn_about_calibration(stacklevel=4)
        return self

    def recalibrate(self, normal_images: Sequence[ImageInput], source: str | None = None) -> Calibration:
        """Re-set the thresholds, what the detector learns from held-out normals (PatchCore's per-position
        statistics) and the out-of-domain guard from normal images it was not fitted on, such as a new
        site's, without refitting: the guard then knows the site's images besides the training images.
        ``source`` says where they came from (saved with the model)."""
        self._check_fitted()
        images = list(normal_images)
        if len(images) < 2:
            raise ValueError("re-calibration needs at least two normal images")
        recorder = FitRecorder(guard_positions(self.feature_strides))
        calibration = self._calibrate(
            images, "site calibration", source or f"{len(images)} normals", recorder
        )
        reference = recorder.reference(self.max_guard_images, self.seed)
        if self.domain_guard_ is not None:
            reference = torch.cat([self.domain_guard_.reference.cpu(), reference])
        training = self.calibration_.training_facts
        self.calibration_ = self._with_domain_guard(calibration, reference, recorder.facts, training)
        self._warn_about_calibration()
        return self.calibration_

    def _with_domain_guard(
        self,
        calibration: Calibration,
        reference: torch.Tensor,
        facts: list[ImageFacts],
        earlier: TrainingFacts | None = None,
    ) -> Calibration:
        """Build the out-of-domain guard from the recorded training vectors and facts (see
        :mod:`imaging_ad.domain`) and put its threshold and the facts into the calibration."""
        training = TrainingFacts.of(facts)
        if earlier is not None:
            training = earlier.merged(training)
        threshold = None
        self.domain_guard_ = None
        if self.guards_features and len(reference) >= 2:
            self.domain_guard_ = DomainGuard(reference, guard_positions(self.feature_strides)).to(
                self.device_
            )
            threshold = leave_one_out_threshold(reference)
        return replace(calibration, domain_threshold=threshold, training_facts=training)

    def _warn_about_calibration(self, stacklevel: int = 3) -> None:
        for warning in self.calibration_.warnings:  # the Python API says what the CLI and the demo say
            warnings.warn(f"{self.name}: {warning}", CalibrationWarning, stacklevel=stacklevel)

    def learn(self, images: list[ImageInput], recorder: FitRecorder | None = None) -> None:
        """Learn from the training images: one streamed pass of feature batches through ``begin_fit`` /
        ``partial_fit`` / ``end_fit`` (``recorder`` keeps what the domain guard and cross-fitted
        calibration will need); detectors that train a network over several epochs override this."""
        self.begin_fit(len(images))
        for features, _ in self.extracted_batches(images, desc=f"{self.name}: fit", recorder=recorder):
            self.partial_fit(features)
        self.end_fit()
        self.refresh_head()

    def release_fit_state(self) -> None:  # noqa: B027  (a hook: most detectors keep nothing)
        """Drop what fitting kept only for calibration (nothing by default)."""

    def use_backbone(self, extractor: nn.Module, preprocessor: Preprocessor) -> None:
        """Adopt a backbone and preprocessing set up elsewhere (an ensemble shares one with its members);
        ``extractor`` must give this detector's stages, in :attr:`feature_strides` order."""
        self.extractor_ = extractor
        self.preprocessor_ = preprocessor
        self.device_ = next(extractor.parameters()).device

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors a model file stores (besides calibration): the detector's own and the
        out-of-domain guard's training vectors (float16: the guard needs no more)."""
        guard = {} if self.domain_guard_ is None else {_GUARD_KEY: self.domain_guard_.reference.half()}
        return {**self._state(), **guard}

    def restore_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the learned state from :meth:`learned_state`'s tensors and rebuild the head."""
        tensors = dict(tensors)
        reference = tensors.pop(_GUARD_KEY, None)  # absent from files written before the guard existed
        self._set_state(tensors)
        self.domain_guard_ = None
        if reference is not None and self.guards_features:
            self.domain_guard_ = DomainGuard(reference, guard_positions(self.feature_strides)).to(
                self.device_
            )
        self.refresh_head()

    def refresh_head(self) -> None:
        """Rebuild the head from the learned state (after fitting, loading, or learning more)."""
        self.head_ = self._build_head().eval()

    def _split_holdout(self, images: list[ImageInput]) -> tuple[list[ImageInput], list[ImageInput]]:
        n_holdout = max(2, math.ceil(len(images) * self.holdout_fraction)) if self.holdout_fraction > 0 else 0
        if len(images) - n_holdout < 1:
            raise ValueError(
                f"{len(images)} normal images are too few to keep {n_holdout} aside for thresholds; "
                "give more images or validation_images"
            )
        order = np.random.default_rng(self.seed).permutation(len(images))
        held = set(order[:n_holdout].tolist())
        return [im for i, im in enumerate(images) if i not in held], [images[i] for i in sorted(held)]

    def _calibration_choice(self, n_images: int) -> list[int]:
        """Positions of the training images cross-fitted calibration scores: all, or an even random sample
        of ``max_calibration_images``."""
        if n_images <= self.max_calibration_images:
            return list(range(n_images))
        return sorted(
            np.random.default_rng(self.seed)
            .choice(n_images, self.max_calibration_images, replace=False)
            .tolist()
        )

    def _calibrate(
        self, held_out: list[ImageInput], method: str, source: str, recorder: FitRecorder | None = None
    ) -> Calibration:
        """Thresholds from normals outside the training set: one pass gathers each batch's evidence, the
        detector learns from it what it learns from held-out images, and its calibration scores and maps set
        the image and pixel thresholds (``recorder`` keeps the images' guard vectors and facts)."""
        evidence, sizes = [], []
        for features, batch in self.extracted_batches(held_out, f"{self.name}: calibrate", recorder=recorder):
            evidence.append(self.held_out_evidence(features))
            sizes.extend(entry.size for entry in batch)
        names = [item_path(item) or f"validation image {i}" for i, item in enumerate(held_out)]
        return self._thresholds(evidence, sizes, method, source, names)

    def _cross_fitted_calibration(
        self, images: list[ImageInput], chosen: list[int], cache: FeatureCache, source: str
    ) -> Calibration:
        """Thresholds from the training images' own scores, each made without that image
        (:meth:`cross_fitted_evidence`): the features kept by the fit's pass, then the rest read again."""
        evidence, sizes, order = [], [], []
        missing = cache.missing()  # before the cache hands its features over (and forgets them)
        for features, positions, batch_sizes in cache.batches(self.batch_size, self.device_):
            evidence.append(self.cross_fitted_evidence(features, positions))
            sizes += batch_sizes
            order += positions
        for features, batch in self.extracted_batches(
            [images[i] for i in missing], f"{self.name}: calibrate"
        ):
            positions, missing = missing[: len(batch)], missing[len(batch) :]
            evidence.append(self.cross_fitted_evidence(features, positions))
            sizes += [entry.size for entry in batch]
            order += positions
        names = [item_path(images[i]) or f"training image {i}" for i in order]
        return self.cross_fitted_calibration(evidence, sizes, names, source)

    def _thresholds(
        self,
        evidence: list[Evidence],
        sizes: list[tuple[int, int]],
        method: str,
        source: str,
        names: list[str],
    ) -> Calibration:
        with torch.inference_mode():
            scores, maps = self.learn_from_held_out(evidence)
        pixels = self._pixel_sample(maps, sizes)
        scores = scores.float().cpu().numpy()
        return calibrate(scores, pixels, self.target_fpr, method=method, source=source, names=names)

    def _pixel_sample(self, maps: torch.Tensor, sizes: list[tuple[int, int]]) -> np.ndarray:
        """A random sample of each image's heatmap pixels (at original size), a batch of maps at a time."""
        rng = np.random.default_rng(self.seed)
        pixels = []
        step = max(self.batch_size, 1)
        for start in range(0, len(sizes), step):
            for heatmap in self._heatmaps(maps[start : start + step], sizes[start : start + step]):
                flat = heatmap.ravel()
                pixels.append(
                    rng.choice(flat, size=min(flat.size, _PIXELS_PER_CALIBRATION_IMAGE), replace=False)
                )
        return np.concatenate(pixels)

    # -- predicting -----------------------------------------------------------------------------

    def predict(self, images: Sequence[ImageInput] | ImageInput) -> list[AnomalyResult]:
        """Score images: one :class:`AnomalyResult` each, heatmaps at each image's original size. An image
        that cannot be read raises its error (``imaging_ad.inference.stream`` yields per-item errors
        instead); one whose score or map is not finite gets a result with ``error`` set and no verdict."""
        self._check_fitted()
        if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "meta"):
            images = [images]
        items = list(images)
        # no bar for a handful of images: it would flash and go
        show = self.progress and len(items) > self.batch_size
        with tqdm(
            total=len(items), desc=f"{self.name}: predict", unit="img", disable=not show, leave=False
        ) as bar:
            return predict_all(self, items, workers=self.num_workers or None, on_batch=bar.update)

    def score_batch(
        self, batch: np.ndarray | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Preprocessed batch ``(B, 3, S, S)`` -> (scores, maps at model-input size, smoothed, and the
        out-of-domain guard's feature distances, None without a guard)."""
        self._check_fitted()
        with torch.inference_mode():
            return self.score_features(self._extract(torch.as_tensor(batch).to(self.device_)))

    def score_features(
        self, features: list[torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`score_batch` after the backbone: the head, the smoothing and the domain guard on feature
        maps (from this detector's feature module, or from a runtime that ran it)."""
        with torch.inference_mode():
            scores, maps = self.head_(features)
            distances = None if self.domain_guard_ is None else self.domain_guard_(features).cpu().numpy()
            return scores.float().cpu().numpy(), self._smooth(maps), distances

    def _heatmaps(self, maps: torch.Tensor, original_sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Feature-resolution maps -> smoothed heatmaps, each at its image's original size."""
        with torch.inference_mode():
            smoothed = self._smooth(maps)
        return [
            self.preprocessor_.heatmap_to_original(m, size)
            for m, size in zip(smoothed, original_sizes, strict=True)
        ]

    # -- shared machinery -----------------------------------------------------------------------

    def _setup(self) -> None:
        torch.manual_seed(self.seed)
        self.device_ = resolve_device(self.device)
        indices = _indices_for_strides(feature_reductions(self.backbone), self.feature_strides, self.backbone)
        extractor = create_backbone(
            self.backbone, pretrained=self.pretrained, weights=self.backbone_weights, out_indices=indices
        ).to(self.device_)
        self.extractor_: FeatureExtractor = extractor
        self.preprocessor_ = Preprocessor.for_backbone(
            extractor,
            image_size=self.image_size,
            aspect=self.aspect,
            clahe=self.clahe,
            intensity=self.intensity,
        )

    def extracted_batches(
        self,
        images: list[ImageInput],
        desc: str,
        transform: Transform | None = None,
        recorder: FitRecorder | None = None,
    ) -> Iterator[tuple[list[torch.Tensor], list[Outcome]]]:
        """Each batch's feature maps, with the batch itself (original sizes, paths); the progress bar counts a
        batch once the consumer is done with it. A file that cannot be read stops with its error."""
        loaded = read_ahead(
            images,
            self.preprocessor_,
            workers=self.num_workers or None,
            depth=2 * self.batch_size,
            transform=transform,
        )
        # one batch or less: the bar would jump from 0 to done and only clutter e.g. a one-image calibration
        quiet = not self.progress or len(images) <= self.batch_size
        with tqdm(total=len(images), desc=desc, unit="img", disable=quiet, leave=False) as bar:
            position = 0
            for batch in batches(loaded, self.batch_size):
                for entry in batch:
                    if not entry.ok:
                        raise entry.exception or ValueError(entry.error)
                with torch.inference_mode():
                    features = self._extract(
                        torch.from_numpy(stacked(batch)).to(self.device_, non_blocking=True)
                    )
                if recorder is not None:
                    recorder.offer(position, features, batch)
                yield features, batch
                position += len(batch)
                bar.update(len(batch))

    def _extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        module = self.feature_module()
        if self.device_.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return [f.float() for f in module(images)]
        return module(images)

    def smoothing_for(self, grid: tuple[int, int]) -> HeatmapSmoothing:
        """The heatmap smoothing of maps on ``grid`` (built once per grid)."""
        grid = (int(grid[0]), int(grid[1]))
        if grid not in self._smoothing:
            self._smoothing[grid] = HeatmapSmoothing(grid, self.preprocessor_.image_size, self.blur_sigma)
        return self._smoothing[grid]

    def _smooth(self, maps: torch.Tensor) -> np.ndarray:
        """Feature-resolution maps -> model-input resolution, Gaussian-smoothed (:class:`HeatmapSmoothing`)."""
        smoothing = self.smoothing_for(maps.shape[-2:]).to(maps.device)
        with torch.inference_mode():
            return smoothing(maps).cpu().numpy()

    def _check_fitted(self) -> None:
        if self.extractor_ is None or self.calibration_ is None or self.head_ is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit() or load a model")

    # -- persistence (safetensors + JSON, see imaging_ad.detectors.persistence) -----------------

    def save(self, path: str | os.PathLike) -> Path:
        self._check_fitted()
        return persistence.save_detector(self, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> Detector:
        from imaging_ad.detectors.registry import load_detector

        detector = load_detector(Path(path), device=device)
        if not isinstance(detector, cls):
            raise TypeError(f"{path} holds a {type(detector).__name__}, not a {cls.__name__}")
        return detector

    def restore(self, description: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Become the fitted detector a model file describes (backbone, preprocessing, calibration, state)."""
        self._setup()
        persistence.check_backbone(self, description)
        self.preprocessor_ = Preprocessor.from_dict(description["preprocessing"])
        self.calibration_ = Calibration.from_dict(description["calibration"])
        self.restore_state(tensors)


def _indices_for_strides(reductions: Sequence[int], strides: Sequence[int], backbone: str) -> tuple[int, ...]:
    indices = []
    for stride in strides:
        if stride not in reductions:
            raise ValueError(
                f"backbone {backbone} has no feature map at stride {stride} (has {list(reductions)})"
            )
        indices.append(reductions.index(stride))
    return tuple(indices)
