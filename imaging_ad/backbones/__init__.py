"""Pretrained timm backbones as frozen feature extractors, with their weight source and preprocessing."""

from imaging_ad.backbones.bundled import BUNDLED, BundledWeights, register_bundled_weights
from imaging_ad.backbones.errors import BackboneError, BackboneWeightsUnavailableError
from imaging_ad.backbones.registry import (
    DEFAULT_BACKBONE,
    BackboneNormalization,
    FeatureExtractor,
    WeightSource,
    check_bundled_remap,
    create_backbone,
    feature_reductions,
    list_backbones,
    load_classifier,
    read_state_dict,
)

__all__ = [
    "BUNDLED",
    "register_bundled_weights",
    "DEFAULT_BACKBONE",
    "BackboneError",
    "BackboneNormalization",
    "BackboneWeightsUnavailableError",
    "BundledWeights",
    "FeatureExtractor",
    "WeightSource",
    "check_bundled_remap",
    "create_backbone",
    "feature_reductions",
    "list_backbones",
    "load_classifier",
    "read_state_dict",
]
