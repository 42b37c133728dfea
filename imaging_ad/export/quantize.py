"""int8 static quantisation of an exported graph's backbone, calibrated on normal images and refused when
it moves scores (opt-in: ``with_runtime(..., precision="int8", normals=...)``).

Only the convolutions are quantised (weights per channel, int8; activations uint8, ranges from the
calibration half of the normals): they are nearly all of the backbone's FLOPs, and CPUs with VNNI/AMX run
int8 convolutions several times faster than fp32. The head (nearest-neighbour distances, Mahalanobis
forms) stays fp32: its arithmetic is where small errors become score changes. The quantised graph is then
checked against the fp32 graph on the other half of the normals (held out from calibration): scores must
stay within :data:`INT8_SCORE_RTOL` relative and no verdict may change, else it is refused with the
measured gap (:class:`QuantizationRefused`). "Relative" is to the larger of the score and the image
threshold: standardised scores of normals sit around zero, where a plain relative change is unbounded
and says nothing about the verdict.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imaging_ad.export.errors import ExportError

#: largest change of a held-out normal's image score an int8 graph may make, relative to the larger of
#: the score and the image threshold
INT8_SCORE_RTOL = 0.02
INPUT_NAME = "images"


class QuantizationRefused(ExportError):
    """The int8 graph moves scores beyond the tolerance (the message has the measured gap)."""


@dataclass
class QuantizationCheck:
    """int8 against fp32 on held-out normals."""

    calibration_images: int
    held_out_images: int
    max_relative_score_difference: float
    median_relative_score_difference: float
    verdict_changes: int
    tolerance: float = INT8_SCORE_RTOL

    @property
    def accepted(self) -> bool:
        return self.max_relative_score_difference <= self.tolerance and self.verdict_changes == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "accepted": self.accepted}


class _Batches:
    """onnxruntime.quantization's CalibrationDataReader protocol over preprocessed images."""

    def __init__(self, images: np.ndarray, batch_size: int = 8) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}

    def rewind(self) -> None:  # pragma: no cover  (not needed by MinMax calibration)
        pass


def quantize_backbone(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Write ``out``: ``fp32`` with its Conv nodes statically quantised (QDQ, per-channel int8 weights,
    uint8 activations), ranges from ``calibration`` ``(N, 3, S, S)``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32))
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        raise ExportError(f"{fp32}: no convolutions to quantise")
    reader = _Batches(calibration)
    CalibrationDataReader.register(_Batches)
    quantize_static(
        str(fp32),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],
        nodes_to_quantize=convs,
    )


def compare(
    fp32_scores: np.ndarray, int8_scores: np.ndarray, threshold: float, n_calibration: int
) -> QuantizationCheck:
    scale = np.maximum(np.maximum(np.abs(fp32_scores), abs(threshold)), 1e-12)
    relative = np.abs(int8_scores - fp32_scores) / scale
    changes = int(np.sum((fp32_scores > threshold) != (int8_scores > threshold)))
    return QuantizationCheck(
        calibration_images=n_calibration,
        held_out_images=len(fp32_scores),
        max_relative_score_difference=float(relative.max()),
        median_relative_score_difference=float(np.median(relative)),
        verdict_changes=changes,
    )
