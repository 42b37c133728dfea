"""Give freed memory back to the system after a request that decoded large images.

glibc keeps freed blocks in its arenas; after a batch of 25-megapixel images a long-running demo
would otherwise stay ~200 MB larger per request pattern (measured: 1216 MB resident after three
batches, 1030 MB after trimming). A no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
