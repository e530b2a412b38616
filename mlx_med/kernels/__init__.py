"""mlx-med's CPU kernels: SwiGLU, the attention softmax, RMSNorm, RoPE, the cross-entropy and
logsumexp, with their gradients, and a decode step's (or a generation's prefill's) whole attention,
bit for bit MLX's.

MLX's x86 CPU build evaluates ``exp`` one float at a time (a Cephes polynomial calling libm's
``fma`` per term), and runs RMSNorm, RoPE and the masked attention softmax as graphs of small ops on
one thread, so these cost more than their matmuls in a batched decode step. ``cpu_kernels.cpp``
computes the same arithmetic in one pass each, the exp with AVX2 + FMA (picked at run time; a scalar
loop elsewhere), large inputs split by rows over the CPUs: the same bits, 2-20x faster per op.
Values and gradients are checked against MLX's on every load (``check.self_check``); on any
difference, or when the module cannot be built here, mlx-med keeps MLX's kernels. The fused attention
replaces MLX's BLAS calls too, so it is used only where ``attention_sums.calibrate`` (a decode step) and
``calibrate_prefill`` (a prefill) found how this machine's BLAS adds their products.

Generation also runs its projections over weights packed once, with OpenBLAS's own per-core kernel
(``pack_projections``; ``packed.py`` and ``packed_gemm.cpp``), checked against MLX's matmul on the
model's own weights first. The row-splitting kernels and the packed projections share one pool of
helper threads (``worker_pool.h``).

``MLX_MED_KERNELS=off`` keeps MLX's kernels (``scalar``: the reference loop, no AVX2; ``avx2``: no AVX-512);
``MLX_MED_KERNEL_THREADS=N`` caps the threads one call uses (default: this process's CPUs, at most 8).
The CPU fp32 compute path turns the kernels on for every model it prepares
(``backend.prepare_for_compute``: ``use_cpu_kernels``); ``cross_entropy`` and ``logsumexp`` here take
them wherever their input is fp32 on the CPU. Metal and CUDA never use them.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn

from mlx_med import switches

KERNELS_ENV = switches.KERNELS.name


@functools.cache
def cpu_kernels():
    """(kernels or None, one line saying which and why), built and checked once per process."""
    if switches.KERNELS.is_off(os.environ):
        return None, f"{KERNELS_ENV}={os.environ[KERNELS_ENV]}"
    from mlx_med.kernels.ops import load_kernels

    kernels, reason = load_kernels()
    ignored = [note for note in (switches.KERNELS.ignored(os.environ), switches.kernel_threads_ignored(os.environ))
               if note]
    return kernels, "; ".join([reason, *ignored])


def recheck_cpu_kernels():
    """``cpu_kernels()``, checked against MLX afresh rather than trusting an earlier check's record
    (``mlx-med doctor``, ``python -m mlx_med.kernels``). A process that loaded them already keeps its answer."""
    from mlx_med.kernels.build import module_path, unsupported_reason
    from mlx_med.kernels.check import forget_self_checks

    if cpu_kernels.cache_info().currsize == 0 and unsupported_reason() is None \
            and not switches.KERNELS.is_off(os.environ):
        forget_self_checks(module_path())
    return cpu_kernels()


def use_cpu_kernels(model: nn.Module) -> str:
    """Route ``model``'s SwiGLU and attention, and the logsumexp of mlx-lm's batched decoding, through
    the kernels when they are usable; says what ran."""
    kernels, reason = cpu_kernels()
    if kernels is None:
        return f"MLX's ({reason})"
    from mlx_med.kernels.install import install, install_generation, install_layers

    names = install(model, kernels) + install_layers(model, kernels)
    names += ["mlx-lm's decoding logsumexp"] if install_generation(kernels) else []
    return f"mlx-med's for {', '.join(names)} ({reason})"


def fused_prefill_keys(model: nn.Module) -> int:
    """Up to how many keys ``model``'s prefill attention (a call with a KV cache) runs the fused kernel,
    whose sums are one fma chain from zero whatever the call's shape (``attention_sums.prefill_shape_fits``
    says which shapes); 0 where its attention is MLX's graph (no kernels here, none installed in the
    model's module, or a BLAS whose sums the calibration did not match)."""
    kernels = cpu_kernels()[0]
    if kernels is None:
        return 0
    from mlx_med.kernels.install import routes_attention

    return kernels.prefill_keys if routes_attention(model) else 0


def pack_projections(model: nn.Module) -> str:
    """Pack ``model``'s projection weights for generation on the CPU (``packed.pack_for_generation``:
    OpenBLAS's own kernel over weights packed once, MLX's bits), and its live adapters' LoRA factors
    (``packed_factors``); says what was done.
    ``MLX_MED_PACKED_WEIGHTS=off`` keeps MLX's matmul (and no second copy of the weights)."""
    switch = switches.PACKED_WEIGHTS
    if switch.is_off(os.environ):
        return f"projections: MLX's matmul ({switch.name}={os.environ[switch.name]})"
    if mx.default_device() != mx.cpu:
        return "projections: MLX's matmul (not on the CPU)"
    from mlx_med.kernels.packed import pack_for_generation
    from mlx_med.kernels.packed_factors import pack_live_factors

    kernels = cpu_kernels()[0]
    note = pack_for_generation(model, kernels)
    if kernels is not None and kernels.packed_cut is not None:
        factors = pack_live_factors(model, kernels)
        if factors:
            note += f"; live adapters' factors packed in {factors} layers"
    return note


def describe_packing() -> str:
    """Whether generation packs projection weights here (``doctor``'s ``packed projections:`` line)."""
    switch = switches.PACKED_WEIGHTS
    if switch.is_off(os.environ):
        return f"off ({switch.name}={os.environ[switch.name]}): MLX's matmul"
    kernels, reason = cpu_kernels()
    if kernels is None:
        return f"off: no kernels ({reason})"
    usable, core = kernels.module.openblas_core()
    ignored = switch.ignored(os.environ)
    return ((f"OpenBLAS's {core} kernel over weights packed once, for generation" if usable
             else f"off: MLX's matmul ({core})") + (f"; {ignored}" if ignored else ""))


def usable_kernels(*arrays: mx.array):
    """The kernels when every array is fp32 on the CPU and they load, else None (checked in that order:
    a GPU run never builds them)."""
    from mlx_med.kernels.ops import on_cpu_f32

    return cpu_kernels()[0] if on_cpu_f32(*arrays) else None


def cross_entropy(logits: mx.array, targets: mx.array, reduction: str = "none") -> mx.array:
    """``nn.losses.cross_entropy(logits, targets, reduction=)`` for class-index targets: the same values
    and gradients, one fused pass per row on the CPU (other targets go to MLX's)."""
    kernels = usable_kernels(logits)
    if kernels is None or targets.ndim != logits.ndim - 1 or not mx.issubdtype(targets.dtype, mx.integer):
        return nn.losses.cross_entropy(logits, targets, reduction=reduction)
    from mlx_med.kernels.ops import cross_entropy as kernel_cross_entropy

    loss = kernel_cross_entropy(kernels, logits, targets)
    if reduction == "sum":
        return mx.sum(loss)
    if reduction == "mean":
        return mx.mean(loss)
    if reduction != "none":
        raise ValueError(f"Invalid reduction {reduction!r}: one of 'none', 'mean', 'sum'.")  # as MLX's
    return loss


def logsumexp(x: mx.array, keepdims: bool = False) -> mx.array:
    """``mx.logsumexp(x, axis=-1, keepdims=)``, vectorized on the CPU."""
    kernels = usable_kernels(x)
    if kernels is None:
        return mx.logsumexp(x, axis=-1, keepdims=keepdims)
    out = kernels.logsumexp(x)
    return out if keepdims else out.squeeze(-1)
