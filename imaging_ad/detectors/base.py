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
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from imaging_ad.backbones import DEFAULT_BACKBONE, FeatureExtractor, create_backbone, feature_reductions
from imaging_ad.calibration import Calibration, calibrate
from imaging_ad.detectors import persistence
from imaging_ad.detectors.components.smoothing import HeatmapSmoothing
from imaging_ad.detectors.params import Interval, OneOf, constructor_parameters, validate_params
from imaging_ad.devices import resolve_device
from imaging_ad.inference import Outcome, Transform, batches, predict_all, read_ahead, stacked
from imaging_ad.io.items import ImageInput
from imaging_ad.preprocess import ASPECT_MODES, INTENSITY_MODES, Preprocessor
from imaging_ad.result import AnomalyResult

# Enough normal pixels for a stable 99th percentile without keeping whole heatmaps.
_PIXELS_PER_CALIBRATION_IMAGE = 4096

#: a held-out batch's outputs, as a detector's ``held_out_evidence`` returns them
Evidence = Any


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
        share of the normal images kept aside to set thresholds (when no ``validation_images`` are given).
    blur_sigma
        Gaussian smoothing of heatmaps, in model-input pixels (0 disables it).
    batch_size, num_workers, device, seed, progress
        images per forward pass; threads reading ahead (0: up to four); ``"auto"``, ``"cpu"`` or
        ``"cuda"``; seed of every random choice; progress bars.
    """

    name: ClassVar[str]
    #: layers of the backbone this detector reads, chosen by stride (output reduction)
    feature_strides: ClassVar[tuple[int, ...]] = (8, 16)
    #: whether the head is a fixed tensor graph that ONNX and TorchScript can hold
    exportable: ClassVar[bool] = True
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
        """Learn from normal images. Part of them (``holdout_fraction``) is kept aside to set thresholds,
        unless ``validation_images`` (also normal) are given."""
        self.validate_params()
        images = list(normal_images)
        if validation_images is not None:
            train, held_out = images, list(validation_images)
        else:
            train, held_out = self._split_holdout(images)
        if len(train) < 1:
            raise ValueError("fit needs at least one normal training image")
        if len(held_out) < 2:
            raise ValueError("calibration needs at least two held-out normal images (holdout_fraction > 0)")
        self._setup()
        self.learn(train)
        self.calibration_ = self._calibrate(held_out)
        return self

    def learn(self, images: list[ImageInput]) -> None:
        """Learn from the training images (calibration images already set aside): one streamed pass of
        feature batches through ``begin_fit`` / ``partial_fit`` / ``end_fit``; detectors that train a
        network over several epochs override this."""
        self.begin_fit(len(images))
        for features, _ in self.extracted_batches(images, desc=f"{self.name}: fit"):
            self.partial_fit(features)
        self.end_fit()
        self.refresh_head()

    def use_backbone(self, extractor: nn.Module, preprocessor: Preprocessor) -> None:
        """Adopt a backbone and preprocessing set up elsewhere (an ensemble shares one with its members);
        ``extractor`` must give this detector's stages, in :attr:`feature_strides` order."""
        self.extractor_ = extractor
        self.preprocessor_ = preprocessor
        self.device_ = next(extractor.parameters()).device

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The learned tensors a model file stores (besides calibration)."""
        return self._state()

    def restore_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the learned state from :meth:`learned_state`'s tensors and rebuild the head."""
        self._set_state(tensors)
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

    def _calibrate(self, held_out: list[ImageInput]) -> Calibration:
        """Thresholds from the held-out normals: one pass gathers each batch's evidence, the detector learns
        from it what it learns from held-out images, and its calibration scores and maps set the image and
        pixel thresholds."""
        evidence, sizes = [], []
        for features, batch in self.extracted_batches(held_out, desc=f"{self.name}: calibrate"):
            evidence.append(self.held_out_evidence(features))
            sizes.extend(entry.size for entry in batch)
        with torch.inference_mode():
            scores, maps = self.learn_from_held_out(evidence)
        pixels = self._pixel_sample(maps, sizes)
        return calibrate(scores.float().cpu().numpy(), pixels, self.target_fpr)

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

    def score_batch(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed batch ``(B, 3, S, S)`` -> (scores, maps at model-input size, smoothed)."""
        self._check_fitted()
        with torch.inference_mode():
            scores, maps = self.head_(self._extract(torch.as_tensor(batch).to(self.device_)))
            return scores.float().cpu().numpy(), self._smooth(maps)

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
        self, images: list[ImageInput], desc: str, transform: Transform | None = None
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
            for batch in batches(loaded, self.batch_size):
                for entry in batch:
                    if not entry.ok:
                        raise entry.exception or ValueError(entry.error)
                with torch.inference_mode():
                    features = self._extract(
                        torch.from_numpy(stacked(batch)).to(self.device_, non_blocking=True)
                    )
                yield features, batch
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
