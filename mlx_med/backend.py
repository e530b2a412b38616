"""Device, compute dtype, memory, seeds and GEMM probes (speed, batch invariance): the one place that knows
the backend.

Compute policy (``--compute-policy`` or ``MLX_MED_COMPUTE_POLICY``):

- ``accelerator``: keep quantized weights and compute in bf16 (QLoRA), what Apple GPUs and CUDA run;
- ``fp32``: dequantize quantized layers and compute in fp32;
- ``auto`` (default): ``accelerator`` on Metal/CUDA, ``fp32`` on the CPU backend, where bf16 GEMM and
  4-bit ``quantized_matmul`` run at a few GFLOP/s while fp32 GEMM goes through BLAS at hundreds.

Choosing ``accelerator`` on a CPU runs the GPU users' code path (slowly); the test suite does so.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_med.errors import UserError

POLICY_ENV = "MLX_MED_COMPUTE_POLICY"
POLICIES = ("auto", "fp32", "accelerator")


@dataclass(frozen=True)
class Backend:
    device: str  # "cpu" or "gpu"
    accelerator: str  # "Metal", "CUDA" or "none"
    compute_dtype: mx.Dtype
    quantized_compute: bool  # keep QuantizedLinear layers as they are
    policy: str = "auto"  # the compute policy asked for (one of POLICIES)

    @property
    def dtype_name(self) -> str:
        return str(self.compute_dtype).replace("mlx.core.", "")

    def compute_path(self) -> dict[str, str | bool]:
        """What results computed here depend on: the device and the arithmetic, not the policy's name
        (``auto`` and ``fp32`` on a CPU take the same path)."""
        return {"device": self.device, "accelerator": self.accelerator, "dtype": self.dtype_name,
                "quantized_compute": self.quantized_compute}

    def describe(self) -> str:
        kept = "kept quantized" if self.quantized_compute else "dequantized"
        return (f"{self.device} ({self.accelerator}), compute {self.dtype_name}, quantized weights {kept} "
                f"(policy {self.policy})")


def compute_policy(policy: str | None = None) -> str:
    """``policy`` if given, else ``$MLX_MED_COMPUTE_POLICY``, else ``auto``; a bad value is a UserError."""
    chosen = policy or os.environ.get(POLICY_ENV) or "auto"
    if chosen not in POLICIES:
        source = "--compute-policy" if policy else POLICY_ENV
        raise UserError(f"{source}={chosen}: expected one of {', '.join(POLICIES)}")
    return chosen


def detect_backend(policy: str | None = None) -> Backend:
    """The backend MLX will run on, and the compute path the policy gives on it.

    Args:
        policy: ``auto``, ``fp32`` or ``accelerator``; None reads ``MLX_MED_COMPUTE_POLICY``.
    """
    policy = compute_policy(policy)
    if mx.metal.is_available():
        device, accelerator = "gpu", "Metal"
    elif hasattr(mx, "cuda") and mx.cuda.is_available():
        device, accelerator = "gpu", "CUDA"
    else:
        device, accelerator = "cpu", "none"
    quantized = policy == "accelerator" or (policy == "auto" and device == "gpu")
    return Backend(device, accelerator, mx.bfloat16 if quantized else mx.float32, quantized, policy)


def prepare_for_compute(model: nn.Module, backend: Backend | None = None) -> nn.Module:
    """Apply the backend's compute policy to a loaded model, in place.

    On CPU: dequantize quantized layers, cast floating weights to fp32, and route SwiGLU and attention
    through mlx-med's vectorized kernels (``mlx_med.kernels``: MLX's results, faster). Elsewhere: unchanged.
    """
    backend = backend or detect_backend()
    if backend.quantized_compute:
        return model
    model = dequantize_fp32(model)
    model.set_dtype(backend.compute_dtype)
    if backend.device == "cpu":
        from mlx_med.kernels import use_cpu_kernels

        use_cpu_kernels(model)
    return model


def dequantized_weight(layer: nn.Module) -> mx.array:
    """A (quantized) linear or embedding layer's weight in fp32: the one dequantization rule.

    The math runs in fp32 from the stored scales and biases (usually fp16): dequantizing with fp16
    scales would round every weight to fp16, an error as large as a LoRA update. Compute, fuse and HF
    export all use this rule, so a fused model minus its base is exactly the update.
    """
    if not isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return layer.weight.astype(mx.float32)
    biases = layer.get("biases")
    return mx.dequantize(layer.weight, layer.scales.astype(mx.float32),
                         None if biases is None else biases.astype(mx.float32),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


def dequantize_fp32(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a plain fp32 one (``dequantized_weight``'s rule), in place."""
    from mlx_lm.utils import dequantize_model

    quantized = [m for m in model.modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    for m in quantized:  # mlx-lm dequantizes in the scales' dtype: make that fp32
        m.scales = m.scales.astype(mx.float32)
        if m.get("biases") is not None:
            m.biases = m.biases.astype(mx.float32)
    return dequantize_model(model) if quantized else model


def gemm_gflops(n: int = 1024, repeats: int = 5, dtype: mx.Dtype = mx.float32) -> float:
    """Measured n×n×n matmul throughput in GFLOP/s (best of ``repeats``)."""
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def gemm_reference(earlier: float = 0.0, n: int = 1024) -> float:
    """The fp32 GEMM figure a benchmark divides by: the higher of a fresh ``gemm_gflops(n)`` and
    ``earlier`` (the reading taken before the timed work). On a shared box a busy moment lowers one
    reading (seen: 78 and 140 GFLOP/s minutes apart on the same 2 cores), and a low peak flatters every
    share of it."""
    return max(earlier, gemm_gflops(n))


@dataclass(frozen=True)
class BatchInvariance:
    """Whether a row's matmul result depends on the rows multiplied beside it (see ``gemm_batch_invariance``)."""

    invariant: bool
    max_diff: float  # the largest |difference| between a row computed in a smaller batch and in the full one
    differing: tuple[int, ...]  # the smaller batches' row counts whose rows differed

    def describe(self) -> str:
        if self.invariant:
            return "yes (a row's GEMM result does not depend on how many rows are multiplied with it)"
        counts = ", ".join(str(n) for n in self.differing)
        return (f"no (a row's GEMM result changes with the batch's row count, by up to {self.max_diff:.1e} "
                f"at {counts} rows: batched and one-at-a-time greedy answers can differ where two tokens "
                "nearly tie)")


# Row counts of the smaller batches: below, at and past the row blocks BLAS kernels work in (4, 8, 12, 16).
INVARIANCE_ROWS = (1, 5, 12, 13, 24, 33)


def gemm_batch_invariance(rows: int = 64, inner: int = 576, outer: int = 1536, dtype: mx.Dtype = mx.float32,
                          matmul=None) -> BatchInvariance:
    """Multiply the first n rows of a ``rows``-row batch by a weight (a decode step's ``x @ W.T``) for each
    n in ``INVARIANCE_ROWS``, and compare bit for bit with the same rows of the full product.

    Batch generation relies on this when it promises the answers of one-at-a-time generation: some BLAS
    kernels (OpenBLAS's AVX2 ones, e.g. Haswell and Zen) give a row different roundings depending on
    where the batch's row blocks and thread split put it; the AVX-512 ones (SkylakeX, Cooperlake) do not.
    ``matmul`` replaces ``x @ w.T`` (tests).
    """
    matmul = matmul or (lambda x, w: x @ w.T)
    key_x, key_w = mx.random.split(mx.random.key(0))
    x = mx.random.normal((rows, inner), key=key_x).astype(dtype)
    w = (mx.random.normal((outer, inner), key=key_w) * inner ** -0.5).astype(dtype)
    full = matmul(x, w)
    max_diff, differing = 0.0, []
    for n in (n for n in INVARIANCE_ROWS if n < rows):
        diff = mx.abs(matmul(x[:n], w).astype(mx.float32) - full[:n].astype(mx.float32)).max().item()
        if diff > 0:
            max_diff, differing = max(max_diff, diff), [*differing, n]
    return BatchInvariance(not differing, max_diff, tuple(differing))


def numpy_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """numpy's own fp32 n×n×n matmul throughput (its bundled BLAS): a yardstick for this CPU."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def system_memory_gb() -> float | None:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def reset_peak_memory() -> None:
    mx.reset_peak_memory()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def platform_line() -> str:
    return f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
