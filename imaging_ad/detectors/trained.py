"""Base for detectors that train a network on normal images (reverse distillation, SimpleNet, autoencoders,
VAE, GANomaly).

Training data is cached once: each training image is read, preprocessed and (in each of the
``augmented_copies`` extra views, default none) augmented with ``augment``, then turned into the
network's input — backbone features for feature-space models, the image itself for image-space
ones — and kept on the CPU in float16. Epochs then cost only the small network, which is what makes
training feasible on a 2-core CPU. ``max_train_images`` bounds the cache, so memory does not grow
with the folder.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from abc import abstractmethod

import numpy as np
import torch
from torch import nn

from imaging_ad.detectors.augment import build_augmentation, check_augmentation
from imaging_ad.detectors.base import CalibrationWarning, Detector
from imaging_ad.detectors.components.domain_guard import FitRecorder
from imaging_ad.detectors.layers import top_mean
from imaging_ad.detectors.params import Interval
from imaging_ad.detectors.training import TrainingHistory, train_network
from imaging_ad.io.items import ImageInput

_NETWORK = "network."


class TrainedDetector(Detector):
    """A :class:`Detector` whose learned state is a network trained with early stopping.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.base.Detector`):

    epochs, learning_rate, weight_decay, train_batch_size
        the optimisation (Adam).
    patience
        epochs without a better validation loss before training stops (0: never early).
    augment, augmented_copies
        training augmentation (``"none"``, ``"light"``, ``"flip"``, ``"rotate"``) and how many augmented copies
        of every training image are added.
    validation_fraction
        share of the training images held out for early stopping.
    max_train_images, max_train_minutes
        caps on the cached training set and on training time (None: no time cap).

    Training is seeded (``seed``: the same seed gives the same network), shows a progress bar with the
    loss, keeps the epoch with the best validation loss, and on CUDA runs in bfloat16 autocast.
    """

    def __init__(
        self,
        *,
        epochs: int = 40,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-5,
        train_batch_size: int = 32,
        patience: int = 5,
        augment: str = "light",
        augmented_copies: int = 0,
        validation_fraction: float = 0.1,
        max_train_images: int = 2000,
        max_train_minutes: float | None = 8.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.train_batch_size = train_batch_size
        self.patience = patience
        self.augment = augment
        self.augmented_copies = augmented_copies
        self.validation_fraction = validation_fraction
        self.max_train_images = max_train_images
        self.max_train_minutes = max_train_minutes
        check_augmentation(augment)  # fail on an unknown name now, not after reading the data
        self.network_: nn.Module | None = None
        self.history_: TrainingHistory | None = None

    # -- hooks for subclasses -------------------------------------------------------------------

    @abstractmethod
    def _build_network(self) -> nn.Module:
        """A fresh network; its shape may depend on hyperparameters and the backbone, never on data."""

    @abstractmethod
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean training loss of a batch of cached inputs (on the device, float32)."""

    def _training_inputs(self, features: list[torch.Tensor]) -> torch.Tensor:
        """What the network learns from, given what :meth:`_extract` returns for a batch."""
        return features[0]

    def _prepare(self, train_inputs: torch.Tensor) -> None:
        """Statistics of the training inputs (e.g. for standardisation), before the network exists."""

    def _learn_from_validation(self, validation_inputs: torch.Tensor) -> None:
        """What the trained network's outputs on the held-out normals teach (nothing by default)."""

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def _set_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def _configure_optimizers(self) -> None:
        self.optimizer_ = torch.optim.Adam(
            self.network_.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )

    def _mixed_precision(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CUDA (same exponent range as float32: no loss scaling needed); on the CPU
        full precision, where bfloat16 matrix units are rare and training is cheap enough anyway."""
        if self.device_.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, batch: torch.Tensor) -> float:
        self.optimizer_.zero_grad(set_to_none=True)
        with self._mixed_precision():
            loss = self._loss(batch)
        loss.backward()
        self.optimizer_.step()
        return float(loss.detach())

    def _validation_loss(self, batch: torch.Tensor) -> float:
        return float(self._loss(batch))

    # -- training -------------------------------------------------------------------------------

    def learn(self, train: list[ImageInput], recorder: FitRecorder | None = None) -> None:
        """Cache the training inputs (the originals, then ``augmented_copies`` randomly augmented copies)
        and train the network with early stopping on held-out normals; ``recorder`` sees the un-augmented
        passes (the domain guard's vectors and the images' facts)."""
        fit_images, validation_images = self._split_validation(train)
        views = 1 + self.augmented_copies
        train_inputs = torch.cat(
            [
                self._cache(
                    fit_images,
                    view,
                    f"{self.name}: features (view {view + 1}/{views})",
                    recorder if view == 0 else None,
                )
                for view in range(views)
            ]
        )
        validation_inputs = self._cache(validation_images, 0, f"{self.name}: validation features", recorder)
        self._prepare(train_inputs)
        torch.manual_seed(self.seed)
        self.network_ = self._build_network().to(self.device_)
        self._configure_optimizers()
        self.history_ = train_network(
            self.network_,
            self._train_step,
            self._validation_loss,
            train_inputs,
            validation_inputs,
            epochs=self.epochs,
            batch_size=self.train_batch_size,
            patience=self.patience,
            device=self.device_,
            seed=self.seed,
            max_seconds=None if self.max_train_minutes is None else 60 * self.max_train_minutes,
            progress=self.progress,
            desc=f"{self.name}: train",
        )
        self.network_.requires_grad_(False)
        for name in [n for n in vars(self) if n.endswith("optimizer_")]:
            delattr(self, name)  # optimiser moments are twice the network's size and never used again
        with torch.inference_mode():
            self._learn_from_validation(validation_inputs)
        self.refresh_head()

    def _split_validation(self, images: list[ImageInput]) -> tuple[list[ImageInput], list[ImageInput]]:
        """Images to train on and held-out normals for early stopping (not those kept for thresholds)."""
        rng = np.random.default_rng(self.seed + 1)
        order = rng.permutation(len(images)).tolist()
        n_validation = max(1, math.ceil(len(images) * self.validation_fraction))
        if len(images) - n_validation < 2:
            raise ValueError(
                f"{len(images)} training images are too few to hold {n_validation} out for early stopping; "
                "give more normal images"
            )
        validation, train = order[:n_validation], order[n_validation:]
        if len(train) > self.max_train_images:
            train = train[: self.max_train_images]  # the order is already random: an even sample
        return [images[i] for i in sorted(train)], [images[i] for i in sorted(validation)]

    def _cache(
        self, images: list[ImageInput], view: int, desc: str, recorder: FitRecorder | None = None
    ) -> torch.Tensor:
        augment = build_augmentation(self.augment, seed=self.seed + view) if view > 0 else None
        chunks = []
        for features, _ in self.extracted_batches(images, desc, transform=augment, recorder=recorder):
            with torch.inference_mode():
                chunks.append(self._training_inputs(features).to("cpu", torch.float16))
        return torch.cat(chunks)

    # -- scoring --------------------------------------------------------------------------------

    @abstractmethod
    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (image scores ``(B,)``, maps ``(B, h, w)``) with the trained network."""

    def _build_head(self) -> nn.Module:
        return ScoringHead(self)

    # -- persistence ----------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        network = {_NETWORK + k: v for k, v in self.network_.state_dict().items()}
        return {**network, **self._extra_state()}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        torch.manual_seed(self.seed)
        self.network_ = self._build_network()
        weights = {k[len(_NETWORK) :]: v for k, v in tensors.items() if k.startswith(_NETWORK)}
        self.network_.load_state_dict(weights)
        self.network_.to(self.device_).eval().requires_grad_(False)
        self._set_extra_state(
            {k: v.to(self.device_) for k, v in tensors.items() if not k.startswith(_NETWORK)}
        )


#: pseudo-count of the map-wide variance in each position's variance (see MapScoredDetector)
POSITION_SHRINKAGE = 10
#: one held-out normal has no spread at all: standardising by it would divide by the 1e-6 floor
MIN_IMAGES_FOR_POSITION_STATISTICS = 2


def position_statistics(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out normals' maps (N, h, w) -> each position's mean and spread (h, w), float32; the variance
    is shrunk towards the map-wide one with a pseudo-count of :data:`POSITION_SHRINKAGE` images."""
    maps = maps.double()
    n = len(maps)
    spread = maps.var(0, unbiased=False)
    variance = (n * spread + POSITION_SHRINKAGE * spread.mean()) / (n + POSITION_SHRINKAGE)
    return maps.mean(0).float(), variance.sqrt().clamp_min(1e-6).float()


class MapScoredDetector(TrainedDetector):
    """A trained detector whose network makes a per-position anomaly map; the image score is the mean of
    the map's highest ``top_fraction`` of positions.

    Hyperparameters (besides those of :class:`TrainedDetector`):

    top_fraction
        the image score is the mean of the map's highest ``top_fraction`` of positions.
    position_statistics
        standardise the map per position by its mean and spread on the held-out early-stopping normals
        (PatchCore's per-position statistics, for the same reason: some positions — the frame, the
        padding, an edge every image has — score high on every normal image, and a plain top-k mean
        lands there). Few held-out normals give noisy spreads, so each position's variance is shrunk
        towards the map-wide one (a pseudo-count of 10 images); with a single held-out normal (about 20
        training images or fewer) there is no spread to learn, and the map is scored raw, with a warning.

    Subclasses say what the network reads (:meth:`_training_inputs`, cached for training) and how it makes
    the raw map from that (:meth:`_input_maps`); scoring is the same two steps on live features.
    """

    param_constraints = {"top_fraction": Interval(0, 1, "right")}

    def __init__(self, *, top_fraction: float = 0.01, position_statistics: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.top_fraction = top_fraction
        self.position_statistics = position_statistics
        self.position_mean_: torch.Tensor | None = None
        self.position_std_: torch.Tensor | None = None

    @abstractmethod
    def _input_maps(self, inputs: torch.Tensor) -> torch.Tensor:
        """What :meth:`_training_inputs` makes of a batch (any float dtype) -> raw maps (B, h, w), high =
        anomalous."""

    def _learn_from_validation(self, validation_inputs: torch.Tensor) -> None:
        self.position_mean_ = self.position_std_ = None
        if not self.position_statistics:
            return
        if len(validation_inputs) < MIN_IMAGES_FOR_POSITION_STATISTICS:
            warnings.warn(
                f"{self.name}: {len(validation_inputs)} held-out normal image(s) cannot give per-position "
                "statistics, so the map is scored without them; give more normal images (or raise "
                "validation_fraction)",
                CalibrationWarning,
                stacklevel=2,
            )
            return
        maps = torch.cat([self._input_maps(chunk.to(self.device_)) for chunk in validation_inputs.split(32)])
        self.position_mean_, self.position_std_ = position_statistics(maps)

    def _anomaly_maps(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Features -> the heatmap (B, h, w)."""
        return self._standardised(self._input_maps(self._training_inputs(features)))

    def _standardised(self, maps: torch.Tensor) -> torch.Tensor:
        """Raw maps (B, h, w), standardised per position when the statistics were learned."""
        if self.position_mean_ is None:
            return maps
        return (maps - self.position_mean_) / self.position_std_

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self._anomaly_maps(features)
        return top_mean(maps, self.top_fraction), maps

    def _state(self) -> dict[str, torch.Tensor]:
        state = super()._state()
        if self.position_mean_ is not None:
            state.update(position_mean=self.position_mean_, position_std=self.position_std_)
        return state

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        names = ("position_mean", "position_std")
        positions = {k: v for k, v in tensors.items() if k in names}
        super()._set_state({k: v for k, v in tensors.items() if k not in names})
        self.position_mean_ = self.position_std_ = None
        if positions:
            self.position_mean_ = positions["position_mean"].to(self.device_).float()
            self.position_std_ = positions["position_std"].to(self.device_).float()


def stage_channels(detector: Detector) -> list[int]:
    """Channels of each of ``detector``'s feature stages, looked up by stride: inside an ensemble the
    shared extractor also yields other members' stages."""
    info = detector.extractor_.info
    return [info.channels[info.reductions.index(stride)] for stride in detector.feature_strides]


class ScoringHead(nn.Module):
    """A trained detector's ``_score`` as its head: the network is a submodule (an export holds its
    weights), the detector's other tensors (feature statistics) are read where ``_score`` reads them."""

    def __init__(self, detector: TrainedDetector) -> None:
        super().__init__()
        self.network = detector.network_
        self.score = detector._score

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(features)


class ImageSpaceDetector(TrainedDetector):
    """A trained detector that models the preprocessed image itself, not backbone features.

    The backbone is still loaded for its normalisation (and, optionally, as a pretrained encoder) but
    by default does not run: :meth:`_extract` hands the image through."""

    feature_strides = (16,)

    def __init__(self, *, image_size: int = 128, blur_sigma: float = 2.0, **kwargs) -> None:
        super().__init__(image_size=image_size, blur_sigma=blur_sigma, **kwargs)

    def feature_module(self) -> nn.Module:
        return _ImagesAsFeatures()


class _ImagesAsFeatures(nn.Module):
    """The preprocessed images themselves as the one "feature map" an image-space network reads."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]
