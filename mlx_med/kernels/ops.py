"""The compiled kernels as differentiable MLX functions (``Kernels``), MLX's CPU attention graph
around their softmax, the cross-entropy, and loading them (built, then checked against MLX by
``check.self_check``). Where they go in a model: ``install``."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_med.kernels.attention_sums import (
    BlasSums,
    LongPrefill,
    fits,
    prefill_sums,
    training_call_sums,
)
from mlx_med.kernels.build import Built, load


class Kernels:
    """The compiled module wrapped as differentiable MLX functions."""

    def __init__(self, module):
        self.module = module
        self.isa = module.isa()
        # how the BLAS adds the attention matmuls' sums here (``attention_sums``); None: keep MLX's graph
        self.attention_sums: BlasSums | None = None
        # the most keys a prefill's attention is fused over with one chain per sum, whatever the call's shape
        # (``attention_sums.calibrate_prefill``); 0: none
        self.prefill_keys = 0
        # past those keys, the BLAS's cut as matched here (``attention_sums.calibrate_long_prefill``); None: none
        self.long_prefill: LongPrefill | None = None
        # the most keys a causal attention without a cache (training) is fused over, forward and gradient
        # (``attention_sums.calibrate_training``); 0: none
        self.training_keys = 0
        # how OpenBLAS cuts a projection's sums here (``packed.calibrate``), the (N, K) shapes checked
        # and those that gave MLX's bits under it; None: not calibrated yet
        self.packed_cut = None
        self.module_file: Path | None = None  # the built module, beside which outcomes are recorded
        self.packed_checked: set[tuple[int, int]] = set()
        self.packed_shapes: set[tuple[int, int]] = set()
        # of those, per shape, the row counts under OpenBLAS's small-matrix size taken too (``packed.small_rows``)
        self.packed_small_rows: dict[tuple[int, int], frozenset[int]] = {}
        # live LoRA factors' (N, K) shapes checked under that cut: their small row counts, None where they
        # did not match (``packed_factors.pack_factor``)
        self.packed_factors: dict[tuple[int, int], frozenset[int] | None] = {}

        @mx.custom_function
        def swiglu(gate, up):
            return module.swiglu(gate, up)

        @swiglu.vjp
        def swiglu_vjp(primals, cotangent, output):
            gate, up = primals
            return module.swiglu_vjp(gate, up, cotangent)

        def from_output(forward, backward):
            """A one-input function whose gradient the module computes from its output and cotangent."""
            function = mx.custom_function(lambda x: forward(x))
            function.vjp(lambda x, cotangent, output: backward(output, cotangent))
            return function

        softmax = from_output(module.softmax, module.softmax_vjp)  # MLX's Softmax::vjp, op for op
        causal_softmax = from_output(module.causal_softmax, module.causal_softmax_vjp)

        @mx.custom_function
        def logsumexp(x):
            return module.logsumexp(x)

        @logsumexp.vjp
        def logsumexp_vjp(x, cotangent, output):  # one input: the primal itself, not a tuple
            return cotangent * softmax(x)  # MLX's LogSumExp::vjp

        @mx.custom_function
        def cross_entropy(logits, targets):
            return module.cross_entropy(logits, targets)

        @cross_entropy.vjp
        def cross_entropy_vjp(primals, cotangent, output):
            logits, targets = primals
            # no gradient for the class indices (MLX raises if asked; nothing here asks)
            return module.cross_entropy_vjp(logits, targets, cotangent), mx.zeros_like(targets)

        self.swiglu = swiglu
        self.softmax = softmax
        self.causal_softmax = causal_softmax
        self.logsumexp = logsumexp
        self.cross_entropy = cross_entropy
        self._ropes: dict = {}
        self._norms: dict = {}

    def rope(self, dims: int, base: float, scale: float):
        """``mx.fast.rope(x, dims, traditional=False, base=, scale=, offset=)`` as ``f(x, offset)``
        (x ``(B, N, T, D)``, offset int32 of shape () or (B,)), with its gradient; one per setting."""
        key = (dims, base, scale)
        if key not in self._ropes:
            module = self.module

            @mx.custom_function
            def rope(x, offset):
                return module.rope(x, offset, dims, base, scale)

            @rope.vjp
            def rope_vjp(primals, cotangent, output):
                offset = primals[1]  # positions: no gradient
                return module.rope_vjp(cotangent, offset, dims, base, scale), mx.zeros_like(offset)

            self._ropes[key] = rope
        return self._ropes[key]

    def rms_norm(self, eps: float):
        """``mx.fast.rms_norm(x, weight, eps)`` as ``f(x, weight)``, with its gradients; one per eps."""
        if eps not in self._norms:
            module = self.module

            # x goes in twice: MLX's autodiff adds the input's two gradient parts (through x * r and
            # through x * x) to its other cotangents (the residual stream's) one at a time, and a
            # float sum depends on that order; two inputs get them added the same way.
            @mx.custom_function
            def rms_norm_parts(x, x_squared, weight):
                return module.rms_norm(x, weight, eps)

            @rms_norm_parts.vjp
            def rms_norm_vjp(primals, cotangent, output):
                x, _, weight = primals
                through_product, through_square = module.rms_norm_vjp(x, weight, cotangent, eps)
                # the weight's, as MLX's Multiply and Broadcast vjps give it: (x * r) * c summed over rows
                # (x * r exactly: the kernel with a weight of ones); lazy, so frozen weights cost nothing
                normed = module.rms_norm(x, mx.ones_like(weight), eps)
                rows = tuple(range(x.ndim - 1))
                d_weight = mx.sum(normed * cotangent, axis=rows, keepdims=True).squeeze(rows)
                return through_product, through_square, d_weight

            def rms_norm(x, weight):
                return rms_norm_parts(x, x, weight)

            self._norms[eps] = rms_norm
        return self._norms[eps]


def on_cpu_f32(*arrays: mx.array) -> bool:
    return mx.default_device() == mx.cpu and all(a.dtype == mx.float32 for a in arrays)


def attention(kernels: Kernels, queries, keys, values, scale: float, mask, cached: bool = False):
    """MLX's CPU ``scaled_dot_product_attention``: one fused pass (``fused_attention``) for a decode step
    and, in a call with a KV cache, a prefill, where the BLAS's sums were matched here; a causal call without
    a cache (a training step's) fused forward and backward (``training_attention``) where its gradient was
    matched here; else its fallback graph, op for op, with our softmax. Shapes ``[B, heads, L, D]``;
    ``mask`` None, ``"causal"`` or an array broadcastable to the scores.
    """
    if kernels.attention_sums is not None and fits(queries, keys):
        return fused_attention(kernels, queries, keys, values, scale, mask, kernels.attention_sums)
    if cached:
        sums = prefill_sums(kernels.prefill_keys, kernels.long_prefill, queries, keys)
        if sums is not None:
            return fused_attention(kernels, queries, keys, values, scale, mask, sums)
    elif isinstance(mask, str):
        sums = training_call_sums(kernels.training_keys, kernels.long_prefill, queries, keys)
        if sums is not None:
            return training_attention(kernels, queries, keys, values, scale, sums)
    return graph_attention(kernels, queries, keys, values, scale, mask)


def training_attention(kernels: Kernels, queries, keys, values, scale: float, sums: BlasSums):
    """A causal attention whose gradient is asked for: the fused prefill kernel forward, and its gradient in
    one pass (``cpu_kernels.cpp``: ``attention_vjp``), each the same bits as MLX's graph and its autodiff on
    the shapes ``training_call_sums`` admits, adding the sums as it says. MLX's graph would keep the
    attention weights of every block for the backward pass and run each of its six matmuls as one BLAS call
    per query head; this keeps the inputs and computes the weights again."""
    scale = float(np.float32(scale))  # the graph multiplies by the scale as an fp32 array
    module = kernels.module

    @mx.custom_function
    def fused(q, k, v):
        return module.decode_attention(q, k, v, None, 3, scale, *sums)

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        return module.attention_vjp(*primals, cotangent, scale, sums.block, sums.unroll, sums.threaded)

    return fused(queries, keys, values)


def fused_attention(kernels: Kernels, queries, keys, values, scale: float, mask, sums: BlasSums):
    """The fused kernel (``cpu_kernels.cpp``: ``decode_attention``) adding its sums as ``sums`` says, the
    same bits as the graph on the shapes they were matched for; its gradient, should one be asked for,
    is the graph's."""
    if mask is None:
        mask_array, kind = None, 0
    elif isinstance(mask, str):
        mask_array, kind = None, 3  # "causal"
    elif mask.dtype == mx.bool_:
        mask_array, kind = mask, 1
    else:
        mask_array, kind = mask.astype(queries.dtype), 2
    scale = float(np.float32(scale))  # the graph multiplies by the scale as an fp32 array

    @mx.custom_function
    def fused(q, k, v):
        return kernels.module.decode_attention(q, k, v, mask_array, kind, scale, *sums)

    @fused.vjp
    def fused_vjp(primals, cotangent, output):
        return mx.vjp(lambda q, k, v: graph_attention(kernels, q, k, v, scale, mask), list(primals), [cotangent])[1]

    return fused(queries, keys, values)


def graph_attention(kernels: Kernels, queries, keys, values, scale: float, mask):
    """MLX's CPU attention fallback graph, op for op, with our softmax."""
    n_q_heads, n_kv_heads = queries.shape[1], keys.shape[1]
    q = mx.array(scale, dtype=queries.dtype) * queries
    n_repeats = n_q_heads // n_kv_heads
    k, v = keys, values
    if n_repeats > 1:
        q = mx.unflatten(q, 1, (n_kv_heads, n_repeats))
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ mx.swapaxes(k, -1, -2)
    if isinstance(mask, str):  # "causal" (the caller passes no other string): mask and softmax in one pass
        weights = kernels.causal_softmax(scores)
    else:
        if mask is not None:
            if mask.dtype != mx.bool_:
                mask = mask.astype(queries.dtype)
            mask = mx.broadcast_to(mask, (*queries.shape[:-1], keys.shape[-2]))
            if n_repeats > 1:
                mask = mx.unflatten(mask, -3, (n_kv_heads, n_repeats))
            if mask.dtype == mx.bool_:
                scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
            else:
                scores = scores + mask
        weights = kernels.softmax(scores)
    out = weights @ v
    return mx.flatten(out, 1, 2) if n_repeats > 1 else out


def cross_entropy(kernels: Kernels, logits: mx.array, targets: mx.array) -> mx.array:
    """``nn.losses.cross_entropy(logits, targets)`` for class-index targets as MLX computes it on the CPU
    (shift by the row maximum, logsumexp, minus the target's score; its autodiff gradient), in one pass
    per row without the shifted copy of the logits."""
    return kernels.cross_entropy(logits, targets.astype(mx.int32))


def load_kernels() -> tuple[Kernels | None, str]:
    """The kernels if they build, load and match MLX here; else None and why.

    Whether they match is read from an earlier check on this machine when one was recorded
    (``check.recorded_self_check``)."""
    from mlx_med.kernels.check import recorded_self_check

    built: Built = load()
    if built.module is None:
        return None, built.reason
    try:
        kernels = Kernels(built.module)
        kernels.module_file = built.path
        with mx.stream(mx.cpu):
            outcome, recorded = recorded_self_check(kernels, built.path)
    except (TypeError, RuntimeError, ValueError) as err:  # e.g. a nanobind that cannot pass mx.array
        return None, f"{built.path}: unusable with this MLX: {err}"
    if outcome.mismatch:
        return None, f"{built.path}: {outcome.mismatch}; kept MLX's kernels"
    kernels.attention_sums = sums = outcome.attention_sums
    kernels.prefill_keys = outcome.prefill_keys
    kernels.long_prefill = outcome.long_prefill
    kernels.training_keys = outcome.training_keys
    decode = (f"decode attention fused ({sums.describe()})" if sums
              else "decode attention: MLX's graph (no rule of ours gave this BLAS's sums)")
    prefill = (f"prefill attention fused up to {outcome.prefill_keys} keys" if outcome.prefill_keys
               else "prefill attention: MLX's graph")
    if outcome.long_prefill is not None:
        prefill += f" and {outcome.long_prefill.describe()}"
    training = (f"training attention fused up to {outcome.training_keys} keys" if outcome.training_keys
                else "training attention: MLX's graph")
    if outcome.training_keys > outcome.prefill_keys:
        training += f" (cut as the prefill's past {outcome.prefill_keys})"
    return kernels, f"{kernels.isa}, {built.reason}, {decode}, {prefill}, {training}, " + (
        "matched MLX in an earlier check here" if recorded else "checked against MLX now")
