"""The glibc allocator tuning: freed tensor buffers are reused instead of mapped and zeroed again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from imaging_ad import allocator

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc on Linux only"
)

# Allocates, touches and frees a 32 MB tensor 40 times, as a forward pass does with its activations,
# and prints the minor page faults that cost.
_CHURN = """
import resource, torch
from imaging_ad.allocator import tune_allocator_for_tensors
print(tune_allocator_for_tensors())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    buffer = torch.ones(8 * 1024 * 1024)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _churn_page_faults(**env: str) -> tuple[str, int]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "IMAGING_AD_MALLOC"))
    }
    out = subprocess.run(
        [sys.executable, "-c", _CHURN], env=clean | env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@glibc_linux
def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in_again() -> None:
    applied, tuned_faults = _churn_page_faults()
    skipped, default_faults = _churn_page_faults(IMAGING_AD_MALLOC_TUNING="0")
    assert (applied, skipped) == ("True", "False")
    # 32 MB is 8192 pages: by default every round faults them in again; tuned, the cost is a fixed
    # 50-60k faults here (the heap growing once), whatever the number of rounds
    assert default_faults > 40 * 8192 * 0.8
    assert tuned_faults < default_faults / 4


@pytest.mark.parametrize(
    "setting", [("IMAGING_AD_MALLOC_TUNING", "off"), ("MALLOC_MMAP_THRESHOLD_", "131072")]
)
def test_tuning_is_left_out_when_disabled_or_the_user_tuned_glibc(monkeypatch, setting) -> None:
    monkeypatch.setenv(*setting)
    allocator.tune_allocator_for_tensors.cache_clear()
    try:
        assert allocator.tune_allocator_for_tensors() is False
    finally:
        allocator.tune_allocator_for_tensors.cache_clear()
