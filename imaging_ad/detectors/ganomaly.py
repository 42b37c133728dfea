"""GANomaly (Akcay et al., 2018): an encoder-decoder-encoder generator trained adversarially.

The generator encodes an image to a latent code ``z``, decodes it to a reconstruction and encodes
that again to ``z_hat``; a discriminator judges images against reconstructions. Trained on normal
images only, the second encoding of an abnormal image lands far from its first: the image score is
the latent distance ``mean((z - z_hat)^2)``, the heatmap the per-pixel reconstruction error. Losses
and weights follow the paper: feature-matching adversarial (1), L1 reconstruction (50), latent (1).
``score="reconstruction"`` ranks by the top reconstruction errors instead of the latent distance.
Known to be weaker than feature-based detectors on real data; it is here to be measured honestly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.layers import (
    BOTTLENECK_GRID,
    image_decoder,
    image_encoder,
    resize_to,
    stage_widths,
    top_mean,
)
from imaging_ad.detectors.registry import register_detector
from imaging_ad.detectors.trained import ImageSpaceDetector

#: "latent" is the paper's score; "reconstruction" (mean of the top reconstruction errors) ranks small
#: local defects better on the synthetic textures of the tests
SCORES = ("latent", "reconstruction")


def _encoder(image_size: int, width: int, out: int) -> nn.Sequential:
    """(B, 3, S, S) -> (B, out, 1, 1): stride-2 stages down to 4 x 4, then a 4 x 4 valid convolution."""
    return nn.Sequential(
        image_encoder(image_size, width),
        nn.Conv2d(stage_widths(image_size, width)[-1], out, BOTTLENECK_GRID),
    )


class Generator(nn.Module):
    """Encoder -> decoder -> second encoder."""

    def __init__(self, latent: int, width: int, image_size: int) -> None:
        super().__init__()
        top = stage_widths(image_size, width)[-1]
        self.encoder = _encoder(image_size, width, latent)
        self.expand = nn.Sequential(  # 1 x 1 code -> 4 x 4 grid
            nn.ConvTranspose2d(latent, top, BOTTLENECK_GRID, bias=False),
            nn.BatchNorm2d(top),
            nn.ReLU(inplace=True),
        )
        self.decoder = image_decoder(image_size, width, top)
        self.second_encoder = _encoder(image_size, width, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        fake = resize_to(self.decoder(self.expand(z)), x.shape[-2:])
        return fake, z.flatten(1), self.second_encoder(fake).flatten(1)


class Discriminator(nn.Module):
    def __init__(self, width: int, image_size: int) -> None:
        super().__init__()
        self.features = _encoder(image_size, width, 8 * width)
        self.classify = nn.Linear(8 * width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x).flatten(1)
        return self.classify(F.leaky_relu(features, 0.2))[:, 0], features


class GanomalyNetwork(nn.Module):
    def __init__(self, latent: int, width: int, image_size: int) -> None:
        super().__init__()
        self.generator = Generator(latent, width, image_size)
        self.discriminator = Discriminator(width, image_size)


@register_detector("ganomaly")
class Ganomaly(ImageSpaceDetector):
    """GANomaly: encoder-decoder-encoder generator with a discriminator; score = latent distance.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.trained.TrainedDetector`):

    image_size, learning_rate
        as for every detector, with GANomaly's defaults: 64 px images, 2e-4 (GAN training).
    latent_size, width
        size of the latent code, and channels of the first stage.
    adversarial_weight, reconstruction_weight, latent_weight
        weights of the generator's three losses (feature matching, image L1, latent L2).
    score
        ``"latent"`` (the paper's) or ``"reconstruction"`` (mean of the highest ``top_fraction`` of the
        pixel error).
    top_fraction
        share of pixels the reconstruction score averages.
    """

    # measured: benchmarks/RESULTS.md, "Issue 19 item 3" (2026-12-02)
    recommended = False
    not_recommended_because = (
        "mean image AUROC 0.64 over the six benchmark datasets against "
        "PatchCore's 0.87; 0.61 on chest_xray, 0.44 on busi (PatchCore 0.87, 0.93)"
    )

    def __init__(
        self,
        *,
        image_size: int = 64,
        learning_rate: float = 2e-4,
        latent_size: int = 100,
        width: int = 16,
        adversarial_weight: float = 1.0,
        reconstruction_weight: float = 50.0,
        latent_weight: float = 1.0,
        score: str = "latent",
        top_fraction: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(image_size=image_size, learning_rate=learning_rate, **kwargs)
        self.latent_size = latent_size
        self.width = width
        self.adversarial_weight = adversarial_weight
        self.reconstruction_weight = reconstruction_weight
        self.latent_weight = latent_weight
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score
        self.top_fraction = top_fraction

    def _build_network(self) -> nn.Module:
        return GanomalyNetwork(self.latent_size, self.width, self.preprocessor_.image_size)

    def _configure_optimizers(self) -> None:
        betas = (0.5, 0.999)  # the DCGAN setting GANomaly uses
        self.generator_optimizer_ = torch.optim.Adam(
            self.network_.generator.parameters(), lr=self.learning_rate, betas=betas
        )
        self.discriminator_optimizer_ = torch.optim.Adam(
            self.network_.discriminator.parameters(), lr=self.learning_rate, betas=betas
        )

    def _generator_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fake, z, z_hat = self.network_.generator(x)
        return fake, (fake - x).abs().mean(), (z - z_hat).pow(2).mean()

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Generator loss without the adversarial term (the discriminator keeps changing): early stopping
        watches how well held-out normals are reconstructed and re-encoded."""
        _, reconstruction, latent = self._generator_terms(batch)
        return self.reconstruction_weight * reconstruction + self.latent_weight * latent

    def _train_step(self, batch: torch.Tensor) -> float:
        discriminator = self.network_.discriminator
        fake, reconstruction, latent = self._generator_terms(batch)
        # generator: match the discriminator's features of real images, reconstruct, re-encode
        self.generator_optimizer_.zero_grad(set_to_none=True)
        with torch.no_grad():
            _, real_features = discriminator(batch)
        _, fake_features = discriminator(fake)
        adversarial = (real_features - fake_features).pow(2).mean()
        loss = (
            self.adversarial_weight * adversarial
            + self.reconstruction_weight * reconstruction
            + self.latent_weight * latent
        )
        loss.backward()
        self.generator_optimizer_.step()
        # discriminator: real normals against the reconstructions
        self.discriminator_optimizer_.zero_grad(set_to_none=True)
        real_logits, _ = discriminator(batch)
        fake_logits, _ = discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        d_loss.backward()
        self.discriminator_optimizer_.step()
        # a discriminator that has won teaches nothing: restart it (as the paper)
        if float(d_loss.detach()) < 1e-5:
            for module in discriminator.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return float(loss.detach())

    def _score(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = features[0].float()
        fake, z, z_hat = self.network_.generator(x)
        maps = (fake - x).abs().mean(1)
        if self.score == "reconstruction":
            return top_mean(maps, self.top_fraction), maps
        return (z - z_hat).pow(2).mean(1), maps
