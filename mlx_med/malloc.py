"""Keep freed memory in the process on Linux (glibc), so each step's buffers do not page-fault.

MLX's CPU allocator keeps at most 32 MB of freed buffers and hands the rest back to ``free``. glibc
then returns large blocks to the kernel (``munmap`` for blocks over its mmap threshold, which never
exceeds 32 MB; heap trimming for the rest), so the next training or generation step maps them
again and the kernel zeroes every 4 KB page on first touch. Measured on the demo model (2-core CPU):
49k page faults per PT step (a 100 MB logits buffer and its gradient among them), 2.3M over one
eval-sized generation run, 0.2-0.3 CPU-s of kernel time per PT step.

``tune_malloc`` raises glibc's mmap threshold and trim threshold to ``KEEP_BYTES`` with ``mallopt``:
blocks up to that size come from the heap and freed memory stays there for the next step. The cost
is a higher resident size (the heap's high-water mark stays mapped: +200 MB on the demo's PT run).
Nothing numerical changes: the same buffers, from another place. Measured: an eval-sized generation
run 0.91x the time (prefill's large buffers); training steps lose their faults but not wall time.

Left alone: non-glibc systems, and any process whose user has chosen the thresholds (glibc's
``MALLOC_MMAP_THRESHOLD_``-style variables or ``GLIBC_TUNABLES``) or set ``MLX_MED_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from mlx_med import switches

SWITCH_ENV = switches.MALLOC.name  # "system": keep glibc's own settings
KEEP_BYTES = 1 << 30  # blocks up to 1 GB from the heap; up to 1 GB of free heap kept mapped
# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# the user's own choice of what tune_malloc sets: glibc's variables and tunables for the two thresholds
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                 "glibc.malloc.mmap_max")


@dataclass(frozen=True)
class MallocStatus:
    tuned: bool
    note: str  # what was done, or why not (``doctor`` prints it)


def user_choice(env: Mapping[str, str]) -> str | None:
    """Why glibc's allocator is left as the user set it, or None when mlx-med may tune it."""
    if switches.MALLOC.is_off(env):
        return f"{SWITCH_ENV}={env[SWITCH_ENV]}"
    for name in USER_VARIABLES:
        if name in env:
            return f"{name} is set"
    tunables = env.get("GLIBC_TUNABLES", "")
    for name in USER_TUNABLES:
        if name in tunables:
            return f"GLIBC_TUNABLES sets {name}"
    return None


@functools.lru_cache(maxsize=1)
def tune_malloc() -> MallocStatus:
    """Apply the thresholds once per process (Linux with glibc only); say what was done."""
    status = _tune()
    ignored = switches.MALLOC.ignored(os.environ)
    return MallocStatus(status.tuned, f"{status.note}; {ignored}") if ignored else status


def _tune() -> MallocStatus:
    if not sys.platform.startswith("linux"):
        return MallocStatus(False, "system allocator (not Linux)")
    why = user_choice(os.environ)
    if why is not None:
        return MallocStatus(False, f"glibc's own settings ({why})")
    try:
        libc = ctypes.CDLL(None)
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return MallocStatus(False, "system allocator (not glibc)")
    version.restype = ctypes.c_char_p
    applied = mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    if not applied:
        return MallocStatus(False, f"glibc {version().decode()} refused the thresholds; its defaults stay")
    return MallocStatus(True, f"glibc {version().decode()}, freed memory kept for reuse up to "
                              f"{KEEP_BYTES >> 20} MB ({SWITCH_ENV}=system for glibc's defaults)")
