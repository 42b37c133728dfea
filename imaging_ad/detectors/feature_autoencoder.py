"""Feature-space convolutional autoencoder.

A small conv autoencoder learns to reconstruct the frozen backbone's multi-stage feature maps of normal
images (both stages on one grid, each channel standardised over the training set). What it never saw
— a scratch, a crack, an opacity — it reconstructs badly: the per-position squared error
(``position_statistics``: standardised per position on held-out normals) is the heatmap and the mean of
its highest ``top_fraction`` of positions the image score. Reconstructing
features rather than pixels makes the error semantic and the network small (CPU-trainable in minutes).
"""

from __future__ import annotations

import torch
from torch import nn

from imaging_ad.detectors.components.features import patch_grid
from imaging_ad.detectors.layers import channel_statistics, conv_block, resize_to, up_block
from imaging_ad.detectors.registry import register_detector
from imaging_ad.detectors.trained import MapScoredDetector, stage_channels


class FeatureEncoder(nn.Module):
    """(B, C, h, w) -> (B, latent, h/2, w/2): 1x1 channel compression, then a strided 3x3 stage."""

    def __init__(self, channels: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_block(channels, hidden, kernel=1),
            conv_block(hidden, hidden // 2, stride=2),
            nn.Conv2d(hidden // 2, latent, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FeatureDecoder(nn.Module):
    def __init__(self, channels: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            up_block(latent, hidden // 2),
            conv_block(hidden // 2, hidden, kernel=1),  # 1x1: a 3x3 here would cost most of the network
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_to(self.layers(z), size)  # odd grids: the strided encoder rounded down


class FeatureAutoencoderNetwork(nn.Module):
    def __init__(self, channels: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(channels, hidden, latent)
        self.decoder = FeatureDecoder(channels, hidden, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x), x.shape[-2:])


@register_detector("feature_ae")
class FeatureAutoencoder(MapScoredDetector):
    """A conv autoencoder that reconstructs the backbone's standardised feature maps; error = anomaly.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.trained.MapScoredDetector`):

    hidden_channels, latent_channels
        width of the network and of its bottleneck (on a grid half the feature grid's side).
    """

    # measured: benchmarks/RESULTS.md, "feature_ae: per-position statistics vs raw maps" (2026-12-03)
    recommended = False
    not_recommended_because = (
        "mean image AUROC 0.79 over the six benchmark datasets against PatchCore's 0.87 "
        "(0.71 on head_ct against 0.92), though its mean AUPRO is higher (0.66 against 0.52)"
    )

    # magnetic_tile: strides 8+16 keep small defects visible on a 32x32 grid (at 256 px)
    feature_strides = (8, 16)

    def __init__(self, *, hidden_channels: int = 128, latent_channels: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden_channels = hidden_channels
        self.latent_channels = latent_channels
        self.feature_mean_: torch.Tensor | None = None
        self.feature_std_: torch.Tensor | None = None

    def _channels(self) -> int:
        return sum(stage_channels(self))

    def _build_network(self) -> nn.Module:
        return FeatureAutoencoderNetwork(self._channels(), self.hidden_channels, self.latent_channels)

    def _training_inputs(self, features: list[torch.Tensor]) -> torch.Tensor:
        return patch_grid(features)

    def _prepare(self, train_inputs: torch.Tensor) -> None:
        mean, std = channel_statistics(train_inputs)
        self.feature_mean_, self.feature_std_ = mean.to(self.device_), std.to(self.device_)

    def _standardise(self, grid: torch.Tensor) -> torch.Tensor:
        return (grid.float() - self.feature_mean_) / self.feature_std_

    def _error_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised grid -> (B, h, w) mean squared reconstruction error per position."""
        return (self.network_(x) - x).pow(2).mean(1)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self._error_maps(self._standardise(batch)).mean()

    def _input_maps(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._error_maps(self._standardise(inputs))

    @classmethod
    def params_of_older_files(cls, params: dict) -> dict:
        return {"position_statistics": False, **params}  # files from before the option scored raw errors

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {"feature_mean": self.feature_mean_, "feature_std": self.feature_std_}

    def _set_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.feature_mean_ = tensors["feature_mean"].float()
        self.feature_std_ = tensors["feature_std"].float()
