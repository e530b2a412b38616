"""mlx_med.malloc: freed memory stays in the process, so a step's buffers do not page-fault again."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from mlx_med.malloc import SWITCH_ENV, user_choice

# 12 rounds of two 64 MB MLX buffers, allocated, used and freed, as a training step's activations are;
# prints the minor page faults of the last 8 rounds (the first ones grow the heap).
WORKLOAD = """
import resource
import mlx_med
import mlx.core as mx
from mlx_med.malloc import tune_malloc

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

for i in range(12):
    if i == 4:
        start = faults()
    x = mx.ones((1 << 24,))
    mx.eval(x * 2.0)
    del x
print(faults() - start, tune_malloc().tuned)
"""


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


def _faults(**env: str) -> tuple[int, bool]:
    # the caller's own allocator settings would decide the outcome: each run sets only what it tests
    clean = {k: v for k, v in os.environ.items()
             if k not in (SWITCH_ENV, "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", WORKLOAD], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), out[1] == "True"


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt: Linux only")
def test_freed_buffers_are_reused_without_page_faults():
    tuned, applied = _faults()
    system, left = _faults(**{SWITCH_ENV: "system"})
    assert applied and not left
    # glibc's defaults map and unmap each 64 MB block: 16k pages per buffer, two buffers a round
    assert system > 8 * 16_000, system
    assert tuned < 8 * 1_000, (tuned, system)


def test_the_users_own_allocator_settings_are_left_alone():
    assert user_choice({}) is None
    assert user_choice({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    assert user_choice({SWITCH_ENV: "system"}) == f"{SWITCH_ENV}=system"
    assert user_choice({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_ is set"
    assert "glibc.malloc.mmap_threshold" in user_choice({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt: Linux only")
def test_a_user_threshold_keeps_glibc_as_set():
    faults, applied = _faults(MALLOC_MMAP_THRESHOLD_="65536")
    assert not applied
    assert faults > 8 * 16_000, faults
