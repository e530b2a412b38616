"""mlx-med's environment switches: one reading rule, and a value a switch does not know is ignored
and said so (never a failed import)."""

from __future__ import annotations

import os
import subprocess
import sys

from mlx_med import switches

ON_WORDS = ("", "on", "1", "true", "yes", "auto")


def test_switch_values():
    malloc = switches.MALLOC
    assert malloc.is_off({"MLX_MED_MALLOC": "System"}) and malloc.is_off({"MLX_MED_MALLOC": " off "})
    assert not malloc.is_off({}) and not malloc.is_off({"MLX_MED_MALLOC": "on"})
    assert malloc.ignored({}) is None and malloc.ignored({"MLX_MED_MALLOC": "0"}) is None
    assert malloc.ignored({"MLX_MED_MALLOC": "1"}) is None  # asked for explicitly: the default, on
    assert malloc.ignored({"MLX_MED_MALLOC": "sytem"}) == (
        "MLX_MED_MALLOC=sytem ignored (known values: system, off, 0, none; unset for the default)")
    for value in ("scalar", "avx2"):  # read by the kernels themselves
        assert switches.KERNELS.ignored({"MLX_MED_KERNELS": value}) is None
    assert not switches.KERNELS.is_off({"MLX_MED_KERNELS": "scalar"})
    assert switches.BLAS.is_off({"MLX_MED_BLAS": "stock"})
    # the words every switch takes
    for switch in (switches.BLAS, switches.KERNELS, switches.MALLOC, switches.BATCH_CACHE, switches.PACKED_WEIGHTS,
                   switches.SHARED_PREFIX):
        assert all(switch.is_off({switch.name: word}) for word in ("off", "0", "none", "OFF"))
        assert not any(switch.is_off({switch.name: word}) for word in ON_WORDS)
    assert switches.kernel_threads_ignored({}) is None
    assert switches.kernel_threads_ignored({"MLX_MED_KERNEL_THREADS": "4"}) is None
    for bad in ("four", "0", "-1", "4x", "", "٣"):
        assert switches.kernel_threads_ignored({"MLX_MED_KERNEL_THREADS": bad}) == (
            f"MLX_MED_KERNEL_THREADS={bad} ignored (a whole number >= 1)")


def test_unknown_values_leave_the_defaults_and_say_so():
    # read while mlx_med is imported, before mlx: a typo must neither fail the import nor pass silently
    code = ("import mlx_med; from mlx_med.blas import preload_blas; from mlx_med.malloc import tune_malloc; "
            "print(preload_blas().note); print(tune_malloc().tuned, tune_malloc().note)")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "MLX_MED_BLAS": "fastest", "MLX_MED_MALLOC": "sytem"})
    assert done.returncode == 0, done.stderr
    blas, malloc = done.stdout.strip().splitlines()
    assert "MLX_MED_BLAS=fastest ignored" in blas and "MLX_MED_MALLOC=sytem ignored" in malloc
    if sys.platform.startswith("linux") and "preloaded" in subprocess.run(
            [sys.executable, "-c", "import mlx_med; from mlx_med.blas import preload_blas; print(preload_blas().note)"],
            capture_output=True, text=True, timeout=120, env=env).stdout:
        assert "preloaded" in blas and malloc.startswith("True")  # both ran as without the variables
