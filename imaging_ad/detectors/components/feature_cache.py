"""Feature maps of chosen training images, kept from the fit's own backbone pass for cross-fitted
calibration, within a memory budget: the images that fit in it are not read or run through the backbone
a second time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class FeatureCache:
    """Keeps the features of the ``wanted`` images (positions in the fit's image list) offered to it, while
    they fit in ``max_bytes``; :meth:`missing` lists the wanted ones it could not keep."""

    def __init__(self, wanted: Iterable[int], max_bytes: int) -> None:
        self.wanted = set(wanted)
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._kept: dict[int, tuple[list[torch.Tensor], tuple[int, int]]] = {}

    def offer(self, start: int, features: list[torch.Tensor], sizes: list[tuple[int, int]]) -> None:
        """The features of a batch whose first image is at position ``start``."""
        for j, size in enumerate(sizes):
            if start + j not in self.wanted:
                continue
            maps = [f[j].detach().to("cpu", copy=True) for f in features]
            cost = sum(m.numel() * m.element_size() for m in maps)
            if self.used_bytes + cost > self.max_bytes:
                continue
            self._kept[start + j] = (maps, size)
            self.used_bytes += cost

    def missing(self) -> list[int]:
        return sorted(self.wanted - set(self._kept))

    def batches(
        self, batch_size: int, device: torch.device
    ) -> Iterator[tuple[list[torch.Tensor], list[int], list[tuple[int, int]]]]:
        """(feature maps on ``device``, positions, original sizes), a batch at a time, releasing as it goes."""
        positions = sorted(self._kept)
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            kept = [self._kept.pop(p) for p in chunk]
            features = [torch.stack([maps[s] for maps, _ in kept]).to(device) for s in range(len(kept[0][0]))]
            yield features, chunk, [size for _, size in kept]
        self.used_bytes = 0
