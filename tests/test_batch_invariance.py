"""The batch-invariance probe: does a row's matmul result depend on the rows multiplied beside it?"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_med.backend import INVARIANCE_ROWS, gemm_batch_invariance


def test_row_by_row_product_is_invariant():
    # each row on its own: nothing beside it can change its bits
    def rowwise(x, w):
        return mx.concatenate([x[i:i + 1] @ w.T for i in range(x.shape[0])])

    result = gemm_batch_invariance(rows=40, inner=32, outer=16, matmul=rowwise)
    assert result.invariant and result.max_diff == 0.0 and result.differing == ()
    assert result.describe().startswith("yes")


def test_a_batch_size_dependent_product_is_caught():
    # what a kernel with row blocks does: rows outside whole blocks of 12 take another rounding path
    def blocked(x, w):
        out = x @ w.T
        whole = x.shape[0] // 12 * 12
        tail = (out[whole:] * (1 + 2.0 ** -20)) if whole < x.shape[0] else out[whole:]
        return mx.concatenate([out[:whole], tail])

    result = gemm_batch_invariance(rows=48, inner=32, outer=16, matmul=blocked)
    assert not result.invariant and result.max_diff > 0
    assert result.differing == tuple(n for n in INVARIANCE_ROWS if n < 48 and n % 12)
    assert "at 1, 5, 13, 33 rows" in result.describe()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS core selection is a Linux x86 fact")
def test_doctor_reports_openblas_avx2_kernels_as_not_batch_invariant():
    # The real peer: OpenBLAS's Haswell kernels (what AVX2-only CPUs such as Zen 3 run) round a row
    # differently by where the batch's row blocks fall. Only a DYNAMIC_ARCH OpenBLAS can be told to use them.
    flags = open("/proc/cpuinfo").read()
    probe = subprocess.run([sys.executable, "-m", "mlx_med.cli", "doctor", "--size", "64"],
                           env={**os.environ, "OPENBLAS_CORETYPE": "Haswell"}, capture_output=True, text=True,
                           check=True).stdout
    if "DYNAMIC_ARCH" not in probe or " avx2" not in flags or " fma" not in flags:
        pytest.skip("needs a DYNAMIC_ARCH OpenBLAS under MLX on an AVX2 CPU")
    assert "blas core: HASWELL (" in probe, probe  # the core running now, not the start-up verdict's copy
    line = next(ln for ln in probe.splitlines() if ln.startswith("batch invariance: "))
    assert line.startswith("batch invariance: no (") and "rows" in line, probe
