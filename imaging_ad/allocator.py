"""Keep freed tensor memory in the C heap instead of handing it back to the kernel (glibc on Linux).

A CNN forward pass on the CPU allocates and frees activation buffers of 1-40 MB per layer and batch.
glibc serves allocations above its mmap threshold (128 KB, adapting up to 32 MB) with fresh ``mmap``
pages and unmaps them on free, so every batch pays the kernel to map and zero the same memory again:
with ``tf_efficientnet_lite0`` at 256 px on 2 cores about 45% of the forward time was system time, and
raising the threshold and the trim threshold doubled backbone throughput (25 -> 50 images/s) and sped
up PatchCore predict 1.75x (benchmarks/RESULTS.md). The cost is a peak resident size a few hundred MB
higher, because freed buffers stay mapped for reuse.

Applied once per process when a backbone is created. Set ``IMAGING_AD_MALLOC_TUNING=0`` to leave the
allocator alone; glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``GLIBC_TUNABLES``
settings, when present, are respected as well.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above the largest activation buffer of the supported backbones and batch sizes, below int's range.
_THRESHOLD_BYTES = 1 << 30

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


@functools.cache
def tune_allocator_for_tensors() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were changed."""
    if os.environ.get("IMAGING_AD_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    changed = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES)
    )
    logger.debug("glibc mmap/trim thresholds raised to %d bytes: %s", _THRESHOLD_BYTES, changed)
    return changed
