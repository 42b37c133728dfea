"""Reverse distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022), sized for a CPU.

The frozen pretrained backbone is the teacher. Its feature maps at two scales (strides 16 and 32), each
averaged over a small neighbourhood (as PatchCore's patch features), are fused by a trainable one-class
bottleneck into one compact embedding on a coarser grid, and a trainable student decoder reconstructs
the teacher's maps from it, coarse to fine. Trained on normal images only, the student learns to
reproduce normal content; where the teacher sees something the embedding cannot carry — a crack, a
lesion — the student's features point elsewhere. The heatmap is one minus the cosine similarity of
teacher and student per position, summed over the scales on the finer grid (standardised per position
on held-out normals, ``position_statistics``); the image score is the mean of its highest
``top_fraction`` of positions.

Unlike the paper (a WideResNet-50 teacher at strides 4-16, a ResNet decoder, 200 epochs on a GPU), the
teacher here is whatever backbone the registry serves (EfficientNet-Lite offline), and the bottleneck
and decoder are a few convolution blocks (``width``), so that an epoch over 700 images at 256 px takes
seconds on two cores; the teacher's features are cached once, so epochs cost only the small student.
What was measured to choose this (``benchmarks/RESULTS.md``, 2026-12-03, mean over six datasets):
EfficientNet-Lite's stride-4 and stride-8 maps have 24 and 40 channels (likely too few for a cosine
to tell texture noise from a defect), and the finest scale cost most of every epoch; strides 16 and 32 (112 and
320 channels), averaged over 3 x 3 neighbourhoods, rank images better and train several times faster,
so the same time buys many more epochs. The cosine compares the teacher's raw (unstandardised)
features, as in the paper: standardising each channel first was measured worse (with the earlier
stride-4/8/16 teacher, magnetic_tile image AUROC 0.58 against 0.74), because it lifts channels that
carry mostly noise to the weight of the informative ones and the student cannot predict noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imaging_ad.detectors.layers import conv_block, resize_to
from imaging_ad.detectors.params import Interval, ParameterError
from imaging_ad.detectors.registry import register_detector
from imaging_ad.detectors.trained import MapScoredDetector, stage_channels


def local_average(maps: list[torch.Tensor], neighbourhood: int) -> list[torch.Tensor]:
    """Each map averaged over ``neighbourhood`` x ``neighbourhood`` cells (borders average only the cells
    inside, as PatchCore's aggregation; 1: unchanged)."""
    k = neighbourhood
    if k == 1:
        return maps
    return [F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False) for m in maps]


def cosine_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """1 - cosine(teacher, student) per position, one (B, h, w) map per scale."""
    return [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student, strict=True)]


def summed_on_finest(distances: list[torch.Tensor]) -> torch.Tensor:
    """Per-scale maps, finest first -> their sum on the finest grid (B, h, w): the raw heatmap."""
    grid = distances[0].shape[-2:]
    return sum(resize_to(d[:, None], grid)[:, 0] for d in distances)


class OneClassBottleneck(nn.Module):
    """Teacher maps at several strides -> one embedding at twice the coarsest stride.

    Each scale is brought to the coarsest grid by strided 3 x 3 blocks (one per halving), the scales
    are concatenated and fused by a strided block: the "one-class embedding" the student decodes."""

    def __init__(self, channels: list[int], strides: list[int], width: int, embedding: int) -> None:
        super().__init__()
        coarsest = max(strides)
        branches = []
        for c, s in zip(channels, strides, strict=True):
            halvings = round(math.log2(coarsest / s))
            layers = [conv_block(c if i == 0 else width, width, stride=2) for i in range(halvings)]
            branches.append(nn.Sequential(*layers) if layers else conv_block(c, width, kernel=1))
        self.branches = nn.ModuleList(branches)
        self.fuse = nn.Sequential(
            conv_block(width * len(channels), embedding, stride=2), conv_block(embedding, embedding)
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        grid = maps[-1].shape[-2:]  # odd grids: strided convs round; every branch meets on the coarsest
        return self.fuse(
            torch.cat([resize_to(b(m), grid) for b, m in zip(self.branches, maps, strict=True)], 1)
        )


class StudentDecoder(nn.Module):
    """Embedding -> one reconstructed teacher map per scale, coarsest first, doubling the grid each time
    (bilinear upsampling then 3 x 3 blocks: cheaper than transposed convolutions, and no checkerboard)."""

    def __init__(self, channels: list[int], embedding: int, widths: list[int]) -> None:
        super().__init__()
        stages, heads, previous = [], [], embedding
        for c, w in zip(reversed(channels), reversed(widths), strict=True):
            stages.append(nn.Sequential(conv_block(previous, w), conv_block(w, w)))
            heads.append(nn.Conv2d(w, c, 1))
            previous = w
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, embedding: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        x, outputs = embedding, []
        for stage, head, grid in zip(self.stages, self.heads, reversed(grids), strict=True):
            x = stage(F.interpolate(x, size=grid, mode="bilinear", align_corners=False))
            outputs.append(head(x))
        return outputs[::-1]  # finest first, like the teacher's maps


class ReverseDistillationNetwork(nn.Module):
    def __init__(self, channels: list[int], strides: list[int], width: int) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(strides))]  # finest scale narrowest: it costs most
        embedding = 2 * widths[-1]
        self.bottleneck = OneClassBottleneck(channels, strides, widths[-1], embedding)
        self.decoder = StudentDecoder(channels, embedding, widths)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.bottleneck(maps), [tuple(m.shape[-2:]) for m in maps])


@register_detector("reverse_distillation")
class ReverseDistillation(MapScoredDetector):
    """A student decoder that reconstructs the frozen backbone's multi-scale features from a one-class
    bottleneck; 1 - cosine(teacher, student) per position, summed over scales, is the heatmap.

    Hyperparameters (besides those of :class:`~imaging_ad.detectors.trained.MapScoredDetector`):

    teacher_strides
        the teacher's stages the student reconstructs, by stride, finest first (each a halving of the
        next): ``(16, 32)`` by default; the paper's finer ``(4, 8, 16)`` was measured worse with
        EfficientNet-Lite teachers (see the module's notes).
    width
        channels of the decoder's finest stage (coarser stages get more); sets the network's cost.
    neighbourhood
        side of the local average taken of each teacher map before the student sees it and the cosine
        compares it (1: none).
    epochs, learning_rate, patience, train_batch_size
        as :class:`~imaging_ad.detectors.trained.TrainedDetector`'s, with this network's defaults: small
        batches (8), since on a CPU more, smaller steps learn more from the same time budget, and up to
        250 epochs with patience 20: small sets (80-110 images) need many epochs to learn from, large ones
        stop at the time cap (``max_train_minutes``, 8) or early.
    position_statistics
        on, as for the other map-scored detectors: over the six benchmark datasets it raised mean image
        AUROC 0.865 -> 0.878, pixel AUROC 0.764 -> 0.767 and AUPRO 0.543 -> 0.547 against the raw map
        of the same fit (``benchmarks/RESULTS.md``, 2026-12-03).
    """

    # recommended: over the six benchmark datasets its mean image AUROC, pixel AUROC and AUPRO are at
    # least PatchCore's (0.878 / 0.767 / 0.547 against 0.868 / 0.757 / 0.523, RESULTS.md 2026-12-03);
    # it costs minutes of training where PatchCore fits in seconds
    param_constraints = {"width": Interval(4, 512), "neighbourhood": Interval(1, 15)}

    def __init__(
        self,
        *,
        teacher_strides: tuple[int, ...] = (16, 32),
        width: int = 64,
        neighbourhood: int = 3,
        epochs: int = 250,
        learning_rate: float = 2e-3,
        patience: int = 20,
        train_batch_size: int = 8,
        position_statistics: bool = True,
        **kwargs,
    ) -> None:
        # small batches: on a CPU the budget is compute, and more, smaller steps learn more from it
        super().__init__(
            position_statistics=position_statistics,
            epochs=epochs,
            learning_rate=learning_rate,
            patience=patience,
            train_batch_size=train_batch_size,
            **kwargs,
        )
        # a list from a JSON file or the CLI; anything else is left for validate_params to refuse by name
        self.teacher_strides = (
            tuple(teacher_strides) if isinstance(teacher_strides, list) else teacher_strides
        )
        self.feature_strides = self.teacher_strides  # the stages the base extracts
        self.width = width
        self.neighbourhood = neighbourhood
        self._grids: list[tuple[int, int]] | None = None

    @classmethod
    def params_of_older_files(cls, params: dict) -> dict:
        # files from before these options reconstructed strides 4, 8 and 16, not averaged
        return {"teacher_strides": (4, 8, 16), "neighbourhood": 1, **params}

    def validate_params(self) -> None:
        super().validate_params()
        strides = self.teacher_strides
        if not strides or any(b != 2 * a for a, b in zip(strides, strides[1:], strict=False)):
            raise ParameterError(
                f"reverse_distillation: teacher_strides must be one or more strides, finest first, each "
                f"twice the one before (e.g. (16, 32) or (4, 8, 16)), got {strides!r}"
            )

    def _build_network(self) -> nn.Module:
        return ReverseDistillationNetwork(stage_channels(self), list(self.feature_strides), self.width)

    # the cache holds every scale of an image flattened into one row; _teacher_maps splits it again
    def _training_inputs(self, features: list[torch.Tensor]) -> torch.Tensor:
        self._grids = [tuple(int(n) for n in f.shape[-2:]) for f in features]
        return torch.cat([f.flatten(1) for f in local_average(features, self.neighbourhood)], 1)

    def _teacher_maps(self, rows: torch.Tensor) -> list[torch.Tensor]:
        sizes = [c * h * w for c, (h, w) in zip(stage_channels(self), self._grids, strict=True)]
        return [
            part.reshape(-1, c, h, w)  # -1: an exported graph keeps a dynamic batch
            for part, c, (h, w) in zip(rows.split(sizes, 1), stage_channels(self), self._grids, strict=True)
        ]

    def _distances(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher maps -> 1 - cosine(teacher, student) per position, one map per scale."""
        return cosine_distances(teacher, self.network_(teacher))

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return sum(d.mean() for d in self._distances(self._teacher_maps(batch)))

    def _input_maps(self, inputs: torch.Tensor) -> torch.Tensor:
        return summed_on_finest(self._distances([m.float() for m in self._teacher_maps(inputs)]))
