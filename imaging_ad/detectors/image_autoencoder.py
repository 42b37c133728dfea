"""Image-space convolutional autoencoder (L2 + SSIM), optionally with a pretrained encoder.

The classic reconstruction detector: learn to reproduce normal images through a narrow bottleneck;
where an image cannot be reproduced it is probably abnormal. Trained on L2 plus structural
dissimilarity (SSIM compares local means, contrasts and structure, so it punishes a missing texture
that plain L2 forgives); the heatmap is the per-pixel SSIM (or L2) error. ``encoder="backbone"``
starts the encoder from the timm backbone's ImageNet stages (transfer learning, fine-tuned at a
tenth of the learning rate) instead of from scratch. The default heatmap is L2: on textures the
reconstruction is blurry everywhere, and SSIM then flags the whole texture (measured on the
synthetic textures of the tests: L2 ranks every pasted defect above every clean image, SSIM does not).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.layers import (
    BOTTLENECK_GRID,
    conv_block,
    image_decoder,
    image_encoder,
    resize_to,
    stage_widths,
    top_mean,
)
from imaging_ad.detectors.registry import register_detector
from imaging_ad.detectors.trained import ImageSpaceDetector

ENCODERS = ("scratch", "backbone")
HEATMAPS = ("ssim", "l2")


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-(x * x) / (2 * sigma * sigma))
    weights = weights / weights.sum()
    return weights[:, None] * weights[None, :]


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float, window: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of two (B, C, H, W) batches (Wang et al. 2004; Gaussian 11x11 window, reflected
    borders so the map keeps the image's size), averaged over channels -> (B, H, W)."""
    channels = x.shape[1]
    kernel = window.to(x.device, x.dtype).expand(channels, 1, *window.shape)
    pad = window.shape[-1] // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2)
    )
    return ssim.mean(1)


class ConvAutoencoder(nn.Module):
    """(B, 3, S, S) -> (B, 3, S, S) through a (B, latent, 4, 4) bottleneck."""

    def __init__(self, image_size: int, latent: int, width: int, pretrained: nn.Module | None = None) -> None:
        super().__init__()
        self.pretrained = pretrained  # the backbone's stages to stride 16, or None to start from scratch
        if pretrained is None:
            self.encoder = image_encoder(image_size, width)
            top = stage_widths(image_size, width)[-1]
        else:
            channels = pretrained.info.channels[-1]
            self.encoder = nn.Sequential(
                conv_block(channels, 8 * width, kernel=1), nn.AdaptiveAvgPool2d(BOTTLENECK_GRID)
            )
            top = 8 * width
        self.bottleneck = nn.Conv2d(top, latent, 1)
        self.decoder = image_decoder(image_size, width, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pretrained(x)[-1] if self.pretrained is not None else x
        return resize_to(self.decoder(self.bottleneck(self.encoder(h))), x.shape[-2:])


@register_detector("image_ae")
class ImageAutoencoder(ImageSpaceDetector):
    """A conv autoencoder on the image itself (L2 + SSIM loss); the reconstruction error is the heatmap.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.trained.TrainedDetector`):

    latent_channels, width
        channels of the 4 x 4 bottleneck, and of the first stage (doubling per stage, capped at 8x).
    encoder
        ``"scratch"`` or ``"backbone"`` (the timm backbone's pretrained stages, fine-tuned).
    ssim_weight
        weight of the structural dissimilarity in the training loss.
    heatmap
        ``"l2"`` or ``"ssim"`` error map.
    top_fraction
        the image score is the mean of the map's highest ``top_fraction`` of pixels.
    """

    # measured: benchmarks/RESULTS.md, "Issue 19 item 3" (2026-12-02)
    recommended = False
    not_recommended_because = (
        "mean image AUROC 0.54 over the six benchmark datasets against "
        "PatchCore's 0.87; below chance on busi (0.43) and head_ct (0.26)"
    )

    def __init__(
        self,
        *,
        latent_channels: int = 64,
        width: int = 16,
        encoder: str = "scratch",
        ssim_weight: float = 1.0,
        heatmap: str = "l2",
        top_fraction: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if heatmap not in HEATMAPS:
            raise ValueError(f"heatmap must be one of {HEATMAPS}, got {heatmap!r}")
        self.latent_channels = latent_channels
        self.width = width
        self.encoder = encoder
        self.ssim_weight = ssim_weight
        self.heatmap = heatmap
        self.top_fraction = top_fraction
        self._window = gaussian_window()

    def _build_network(self) -> nn.Module:
        size = self.preprocessor_.image_size
        pretrained = (
            copy.deepcopy(self.extractor_).requires_grad_(True) if self.encoder == "backbone" else None
        )
        return ConvAutoencoder(size, self.latent_channels, self.width, pretrained)

    def _configure_optimizers(self) -> None:
        network = self.network_
        groups = [{"params": [p for n, p in network.named_parameters() if not n.startswith("pretrained.")]}]
        if network.pretrained is not None:
            groups.append({"params": network.pretrained.parameters(), "lr": self.learning_rate / 10})
        self.optimizer_ = torch.optim.Adam(groups, lr=self.learning_rate, weight_decay=self.weight_decay)

    def _data_range(self) -> float:
        # [0, 1] intensities after the backbone's normalisation span 1 / std
        return 1.0 / min(self.preprocessor_.std)

    def _squared_error(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return (reconstruction - x).pow(2).mean(1)

    def _dissimilarity(self, x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Per-pixel 1 - SSIM, (B, H, W)."""
        return 1 - ssim_map(reconstruction, x, self._data_range(), self._window)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        reconstruction = self.network_(batch)
        loss = self._squared_error(batch, reconstruction).mean()
        if self.ssim_weight:
            loss = loss + self.ssim_weight * self._dissimilarity(batch, reconstruction).mean()
        return loss

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = features[0].float()
        reconstruction = self.network_(x)
        # only the map that is asked for: SSIM's five windowed convolutions are not free at predict time
        error = self._dissimilarity if self.heatmap == "ssim" else self._squared_error
        maps = error(x, reconstruction)
        return top_mean(maps, self.top_fraction), maps
