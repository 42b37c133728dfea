"""The detector contract: construct with hyperparameters, ``fit`` on normal images, ``predict``.

Subclasses implement three small hooks on top of a frozen backbone:
``_fit_stream`` (consume feature batches, set learned state), ``_score`` (feature batch -> image scores
and anomaly maps at feature resolution) and ``_state`` / ``_set_state`` (tensors to save). Reading,
preprocessing, batching, devices, calibration, heatmap resizing and persistence live here, once.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from imaging_ad.backbones import DEFAULT_BACKBONE, FeatureExtractor, create_backbone, feature_reductions
from imaging_ad.calibration import Calibration, calibrate
from imaging_ad.detectors.inputs import Augmentation, Batch, ImageInput, PreprocessedImages, collate, prefetch
from imaging_ad.preprocess import Preprocessor
from imaging_ad.result import AnomalyResult, without_non_finite

# Enough normal pixels for a stable 99th percentile without keeping whole heatmaps.
_PIXELS_PER_CALIBRATION_IMAGE = 4096


class Detector(ABC):
    """Base class of every registered detector (see :mod:`imaging_ad.detectors.registry`)."""

    name: ClassVar[str]
    #: layers of the backbone this detector reads, chosen by stride (output reduction)
    feature_strides: ClassVar[tuple[int, ...]] = (8, 16)

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
        self.extractor_: FeatureExtractor | None = None
        self.preprocessor_: Preprocessor | None = None
        self.calibration_: Calibration | None = None

    # -- hooks for subclasses -------------------------------------------------------------------

    def _fit_stream(self, batches: Iterator[list[torch.Tensor]], n_images: int) -> None:
        """Consume batches of feature maps of normal images (on ``self.device_``) and set learned state.
        Detectors that learn otherwise (several epochs of training) override :meth:`_fit_images` instead."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _fit_stream nor _fit_images")

    @abstractmethod
    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps -> (image scores ``(B,)``, anomaly maps ``(B, h, w)``) at feature resolution."""

    @abstractmethod
    def _state(self) -> dict[str, torch.Tensor]:
        """Learned tensors to save (besides calibration, which the base saves)."""

    @abstractmethod
    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``_state`` returned."""

    # -- scikit-learn style parameters ----------------------------------------------------------

    @classmethod
    def _param_defaults(cls) -> dict[str, Any]:
        """Keyword-only constructor parameters of this class and its bases, with their defaults."""
        defaults: dict[str, Any] = {}
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                for p in inspect.signature(klass.__init__).parameters.values():
                    if p.kind == p.KEYWORD_ONLY:
                        defaults.setdefault(p.name, p.default)
        return defaults

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_defaults()}

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
        images = list(normal_images)
        if validation_images is not None:
            train, held_out = images, list(validation_images)
        else:
            train, held_out = self._split_holdout(images)
        if len(train) < 1:
            raise ValueError("fit needs at least one normal training image")
        self._setup()
        self._fit_images(train)
        self.calibration_ = self._calibrate(held_out)
        return self

    def _fit_images(self, train: list[ImageInput]) -> None:
        """Learn from the training images (calibration images already set aside): one streamed pass of
        feature batches by default; detectors that train a network over several epochs override this."""
        self._fit_stream(self._feature_batches(train, desc=f"{self.name}: fit"), len(train))

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
        if len(held_out) < 2:
            raise ValueError("calibration needs at least two held-out normal images (holdout_fraction > 0)")
        with self._learning_from_held_out(held_out) as final_scores:
            scores, pixels = self._calibration_samples(held_out)
            scores = final_scores(scores)
        return calibrate(scores, pixels, self.target_fpr)

    @contextmanager
    def _learning_from_held_out(
        self, held_out: list[ImageInput]
    ) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """Around the pass that scores the held-out normals for calibration. Detectors that also learn from
        them (PatchCore's per-position statistics) collect while inside and, from the function yielded,
        return the image scores calibration should use instead of the pass's own (leave one out, so the
        threshold is not set on in-sample scores). Nothing to learn by default."""
        yield lambda scores: scores

    def _calibration_samples(self, held_out: list[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Image scores of the held-out normals and a sample of their heatmap pixels."""
        return sample_for_calibration(
            self._scored_batches(held_out, desc=f"{self.name}: calibrate"), self.seed
        )

    # -- predicting -----------------------------------------------------------------------------

    def predict(self, images: Sequence[ImageInput] | ImageInput) -> list[AnomalyResult]:
        """Score images: one :class:`AnomalyResult` each, heatmaps at each image's original size. An image
        whose score or map is not finite gets a result with ``error`` set and no verdict."""
        self._check_fitted()
        if isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "meta"):
            images = [images]
        results: list[AnomalyResult] = []
        calibration = self.calibration_
        for scores, heatmaps, paths in self._scored_batches(list(images), desc=f"{self.name}: predict"):
            normalized = calibration.normalize(scores)
            for score, norm, heatmap, path in zip(scores, normalized, heatmaps, paths, strict=True):
                results.append(
                    AnomalyResult(
                        score=float(score),
                        normalized_score=float(norm),
                        is_anomaly=bool(score > calibration.image_threshold),
                        heatmap=heatmap,
                        path=path,
                    )
                )
        return without_non_finite(results)  # a NaN score or map is an error, never a verdict

    def score_tensor(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed batch ``(B, 3, S, S)`` -> (scores, maps at model-input size, blurred)."""
        self._check_fitted()
        with torch.inference_mode():
            scores, maps = self._score(self._extract(batch.to(self.device_)))
            return scores.float().cpu().numpy(), self._smooth(maps)

    def _scored_batches(
        self, images: list[ImageInput], desc: str
    ) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[str | None]]]:
        for features, batch in self._extracted_batches(images, desc):
            with torch.inference_mode():
                scores, maps = self._score(features)
            yield scores.float().cpu().numpy(), self._heatmaps(maps, batch.original_sizes), batch.paths

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
        self.device_ = _resolve_device(self.device)
        indices = _indices_for_strides(feature_reductions(self.backbone), self.feature_strides, self.backbone)
        self.extractor_ = create_backbone(
            self.backbone, pretrained=self.pretrained, weights=self.backbone_weights, out_indices=indices
        ).to(self.device_)
        self.preprocessor_ = Preprocessor.for_backbone(
            self.extractor_,
            image_size=self.image_size,
            aspect=self.aspect,
            clahe=self.clahe,
            intensity=self.intensity,
        )

    def _loader(self, images: list[ImageInput], augment: Augmentation | None = None) -> DataLoader:
        dataset = PreprocessedImages(images, self.preprocessor_, augment)
        workers = min(self.num_workers, max(0, len(images) // self.batch_size))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device_.type == "cuda",
            persistent_workers=False,
        )

    def _batches(self, images: list[ImageInput], augment: Augmentation | None = None) -> Iterator[Batch]:
        """Preprocessed batches; read ahead in a thread unless worker processes already do it."""
        loader = self._loader(images, augment)
        return iter(loader) if loader.num_workers > 0 else prefetch(loader)

    def _feature_batches(self, images: list[ImageInput], desc: str) -> Iterator[list[torch.Tensor]]:
        for features, _ in self._extracted_batches(images, desc):
            yield features

    def _extracted_batches(
        self, images: list[ImageInput], desc: str
    ) -> Iterator[tuple[list[torch.Tensor], Batch]]:
        """Each batch's backbone features, with the batch itself (original sizes, paths); the progress bar
        counts a batch once the consumer is done with it."""
        with tqdm(total=len(images), desc=desc, unit="img", disable=not self.progress, leave=False) as bar:
            for batch in self._batches(images):
                with torch.inference_mode():
                    features = self._extract(batch.images.to(self.device_, non_blocking=True))
                yield features, batch
                bar.update(len(batch.paths))

    def _extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.device_.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return [f.float() for f in self.extractor_(images)]
        return self.extractor_(images)

    def _smooth(self, maps: torch.Tensor) -> np.ndarray:
        """Feature-resolution maps -> model-input resolution, Gaussian-smoothed as in PatchCore.

        Bilinear upsampling and the Gaussian blur are both linear and separable, so along each axis the
        two make one small (S, h) matrix: two matrix products per map instead of upsampling and a 33-tap
        blur at full size (about 8x cheaper on the CPU for a 16x16 grid; equal to float32 rounding, see
        :func:`smoothing_operator`). Maps finer than stride 8 take the direct path."""
        h, w = maps.shape[-2:]
        size = self.preprocessor_.image_size
        if max(h, w) * 8 > size:  # fine maps (image-space detectors): the products would cost more
            upsampled = F.interpolate(
                maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
            )
            upsampled = upsampled[:, 0].cpu().numpy()
            if self.blur_sigma <= 0:
                return upsampled
            return np.stack([gaussian_blur_numpy(m, self.blur_sigma) for m in upsampled])
        rows = smoothing_operator(h, size, self.blur_sigma).to(maps.device)
        columns = smoothing_operator(w, size, self.blur_sigma).to(maps.device)
        smoothed = rows @ maps.float() @ columns.T
        return smoothed.cpu().numpy()

    def _check_fitted(self) -> None:
        if self.extractor_ is None or self.calibration_ is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit() or load a model")

    # -- persistence (see imaging_ad.detectors.persistence) -----------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        from imaging_ad.detectors.persistence import save_detector

        self._check_fitted()
        return save_detector(self, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> Detector:
        from imaging_ad.detectors.persistence import load_detector

        detector = load_detector(Path(path), device=device)
        if not isinstance(detector, cls):
            raise TypeError(f"{path} holds a {type(detector).__name__}, not a {cls.__name__}")
        return detector


def sample_for_calibration(
    scored_batches: Iterable[tuple[np.ndarray, list[np.ndarray], Any]], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, a random sample of each heatmap's pixels) from batches of (scores, heatmaps, ...)."""
    rng = np.random.default_rng(seed)
    scores, pixels = [], []
    for batch_scores, heatmaps, *_ in scored_batches:
        scores.append(batch_scores)
        for heatmap in heatmaps:
            flat = heatmap.ravel()
            pixels.append(rng.choice(flat, size=min(flat.size, _PIXELS_PER_CALIBRATION_IMAGE), replace=False))
    return np.concatenate(scores), np.concatenate(pixels)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device='cuda' was asked for but CUDA is not available; use device='cpu' or 'auto'"
        )
    return resolved


def _indices_for_strides(reductions: Sequence[int], strides: Iterable[int], backbone: str) -> tuple[int, ...]:
    indices = []
    for stride in strides:
        if stride not in reductions:
            raise ValueError(
                f"backbone {backbone} has no feature map at stride {stride} (has {list(reductions)})"
            )
        indices.append(reductions.index(stride))
    return tuple(indices)


@functools.lru_cache(maxsize=16)  # a handful of (grid, input size, sigma) per process; never mutated
def smoothing_operator(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in) float32: bilinear upsampling (half-pixel centres, as ``F.interpolate`` with
    ``align_corners=False``) from ``n_in`` to ``n_out`` samples, then :func:`gaussian_blur_numpy`'s blur
    along that axis. Built by passing each unit vector through the very same two operations."""
    units = torch.eye(n_in)[:, None, :, None]  # (n_in, 1, n_in, 1): one unit column per map
    upsampled = F.interpolate(units, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0]
    columns = upsampled.numpy().T.copy()  # (n_out, n_in): column i is unit i upsampled
    if sigma > 0:
        # a 1-pixel-wide image: reflect-101 in x leaves it unchanged, so this blurs along y only
        columns = np.stack(
            [gaussian_blur_numpy(np.ascontiguousarray(c[:, None]), sigma)[:, 0] for c in columns.T], axis=1
        )
    return torch.from_numpy(np.ascontiguousarray(columns, dtype=np.float32))


def gaussian_blur_numpy(heatmap: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of one heatmap (kernel radius 4 sigma, reflected borders)."""
    return cv2.GaussianBlur(heatmap, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)
