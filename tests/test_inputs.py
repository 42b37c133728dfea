"""The read-ahead thread behind predict and fit: order, errors and early exit."""

import itertools
import threading
import time

import pytest

from imaging_ad.detectors.inputs import prefetch


def test_prefetch_keeps_order_and_reads_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    time.sleep(0.2)
    assert len(produced) >= 3  # the thread went ahead while the consumer was busy
    assert list(stream) == [1, 2, 3, 4, 5]


def test_prefetch_reraises_the_producers_error_in_order():
    def items():
        yield "first"
        raise OSError("disk gone")

    stream = prefetch(items())
    assert next(stream) == "first"
    with pytest.raises(OSError, match="disk gone"):
        next(stream)


def test_prefetch_thread_ends_when_the_consumer_stops_early():
    before = threading.active_count()
    stream = prefetch(itertools.count(), depth=1)
    assert next(stream) == 0
    stream.close()
    deadline = time.time() + 2
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
