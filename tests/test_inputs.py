"""The read-ahead behind the inference stream and fitting: order, errors per item and early exit."""

import threading
import time

import numpy as np

from imaging_ad.inference import batches, read_ahead, stacked
from imaging_ad.preprocess import Preprocessor


def _images(n: int) -> list[np.ndarray]:
    return [np.full((20, 20), (i * 10) % 256, np.uint8) for i in range(n)]


def test_read_ahead_keeps_order_and_reads_ahead(monkeypatch):
    loaded_order = []
    pre = Preprocessor(image_size=32, intensity="full_range", mean=(0,) * 3, std=(1,) * 3)
    original = Preprocessor.__call__

    def recording(self, record):
        loaded_order.append(int(record[0, 0]))
        return original(self, record)

    monkeypatch.setattr(Preprocessor, "__call__", recording)
    stream = read_ahead(_images(8), pre, workers=2, depth=3)
    first = next(stream)
    time.sleep(0.2)
    assert len(loaded_order) >= 3  # the pool went ahead while the consumer was busy
    values = [round(float(first.image[0, 0, 0]) * 255)] + [
        round(float(e.image[0, 0, 0]) * 255) for e in stream
    ]
    assert values == [i * 10 for i in range(8)]


def test_a_bad_item_becomes_its_own_error_in_place():
    pre = Preprocessor(image_size=32)
    items = [np.zeros((20, 20), np.uint8), "/no/such/file.png", np.zeros((20, 20), np.uint8)]
    loaded = list(read_ahead(items, pre))
    assert [entry.error is None for entry in loaded] == [True, False, True]
    assert "/no/such/file.png" in loaded[1].error and loaded[1].exception is not None
    groups = list(batches(loaded, batch_size=2))
    assert [len(g) for g in groups] == [3] and stacked(groups[0]).shape == (2, 3, 32, 32)


def test_reading_threads_end_when_the_consumer_stops_early():
    before = threading.active_count()
    stream = read_ahead(_images(50), Preprocessor(image_size=32), workers=2, depth=2)
    next(stream)
    stream.close()
    deadline = time.time() + 2
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
