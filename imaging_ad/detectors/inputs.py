"""What a detector accepts as images, turned into preprocessed batches (optionally in worker processes)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils.data import Dataset

from imaging_ad.io import ImageRecord
from imaging_ad.io.items import ImageInput, item_path, to_record
from imaging_ad.preprocess import Preprocessor

#: a random transform of one preprocessed (3, S, S) image tensor, used when training networks
Augmentation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    images: torch.Tensor
    original_sizes: list[tuple[int, int]]
    paths: list[str | None]


class PreprocessedImages(Dataset):
    """Reads and preprocesses lazily, so only one batch of pixels is in memory at a time."""

    def __init__(
        self, items: list[ImageInput], preprocessor: Preprocessor, augment: Augmentation | None = None
    ) -> None:
        self.items = items
        self.preprocessor = preprocessor
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[int, int], str | None]:
        item = self.items[index]
        record = to_record(item)
        size = record.meta.size if isinstance(record, ImageRecord) else tuple(record.shape[:2])
        image = self.preprocessor(record)
        if self.augment is not None:
            image = self.augment(image)
        return image, size, item_path(item)


def collate(samples: list[tuple[torch.Tensor, tuple[int, int], str | None]]) -> Batch:
    images, sizes, paths = zip(*samples, strict=True)
    return Batch(torch.stack(images), list(sizes), list(paths))


T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Produce ``items`` in a background thread, ``depth`` ahead of the consumer.

    Decoding and resizing (Pillow, OpenCV, NumPy) release the GIL, so the next batch is read while the
    model runs on this one without the start-up and copying cost of worker processes. Exceptions are
    re-raised in the consumer, in order."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            buffer.put(error)

    thread = threading.Thread(target=produce, name="imaging_ad-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # unblock a producer waiting on a full buffer so the thread can finish
        while thread.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
