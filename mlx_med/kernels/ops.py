"""The kernels as MLX functions with gradients, and their place in mlx-lm's models.

``swiglu`` and ``scaled_dot_product_attention`` have the signatures of mlx-lm's own (the names its
llama/qwen2/qwen3 modules call) and give bit for bit the same values and gradients. They take the
vectorized path for fp32 on the CPU and call mlx-lm's originals for anything else (GPU streams, other
dtypes, quantized KV caches, attention sinks), so putting them in a model module's namespace never
changes what it computes.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn

from mlx_med.kernels.build import Built, load

ORIGINALS = "__mlx_med_kernels_originals__"  # set on a model module while the kernels are in it


class Kernels:
    """The compiled module wrapped as differentiable MLX functions."""

    def __init__(self, module):
        self.module = module
        self.isa = module.isa()

        @mx.custom_function
        def swiglu(gate, up):
            return module.swiglu(gate, up)

        @swiglu.vjp
        def swiglu_vjp(primals, cotangent, output):
            gate, up = primals
            return module.swiglu_vjp(gate, up, cotangent)

        @mx.custom_function
        def softmax(x):
            return module.softmax(x)

        @softmax.vjp
        def softmax_vjp(x, cotangent, output):
            sv = output * cotangent  # MLX's Softmax::vjp, op for op
            return sv - output * mx.sum(sv, axis=-1, keepdims=True)

        @mx.custom_function
        def logsumexp(x):
            return module.logsumexp(x)

        @logsumexp.vjp
        def logsumexp_vjp(x, cotangent, output):  # one input: the primal itself, not a tuple
            return cotangent * softmax(x)  # MLX's LogSumExp::vjp

        self.swiglu = swiglu
        self.softmax = softmax
        self.logsumexp = logsumexp


def on_cpu_f32(*arrays: mx.array) -> bool:
    return mx.default_device() == mx.cpu and all(a.dtype == mx.float32 for a in arrays)


def attention(kernels: Kernels, queries, keys, values, scale: float, mask):
    """MLX's CPU ``scaled_dot_product_attention`` (its fallback graph, op for op) with our softmax.

    Shapes ``[B, heads, L, D]``; ``mask`` None, ``"causal"`` or an array broadcastable to the scores.
    """
    n_q_heads, n_kv_heads = queries.shape[1], keys.shape[1]
    q = mx.array(scale, dtype=queries.dtype) * queries
    n_repeats = n_q_heads // n_kv_heads
    k, v = keys, values
    if n_repeats > 1:
        q = mx.unflatten(q, 1, (n_kv_heads, n_repeats))
        k, v = mx.expand_dims(k, 2), mx.expand_dims(v, 2)
    scores = q @ mx.swapaxes(k, -1, -2)
    if isinstance(mask, str):  # "causal" (the caller passes no other string)
        offset = k.shape[-2] - q.shape[-2]
        mask = mx.arange(offset, q.shape[-2] + offset)[:, None] >= mx.arange(0, k.shape[-2])[None]
    elif mask is not None:
        if mask.dtype != mx.bool_:
            mask = mask.astype(queries.dtype)
        mask = mx.broadcast_to(mask, (*queries.shape[:-1], keys.shape[-2]))
        if n_repeats > 1:
            mask = mx.unflatten(mask, -3, (n_kv_heads, n_repeats))
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
    out = kernels.softmax(scores) @ v
    return mx.flatten(out, 1, 2) if n_repeats > 1 else out


def cross_entropy(kernels: Kernels, logits: mx.array, targets: mx.array) -> mx.array:
    """``nn.losses.cross_entropy(logits, targets)`` for class-index targets as MLX computes it on the CPU,
    op for op, with the kernels' logsumexp."""
    shifted = logits - mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    score = mx.take_along_axis(shifted, mx.expand_dims(targets, -1), -1).squeeze(-1)
    return kernels.logsumexp(shifted).squeeze(-1) - score


def model_functions(kernels: Kernels, module) -> dict:
    """Drop-in replacements for a model module's ``swiglu`` and ``scaled_dot_product_attention``, for
    each name that *is* mlx-lm's shared function (a module defining its own, e.g. a clipped SwiGLU,
    keeps it)."""
    from mlx_lm.models import activations, base

    original_swiglu = getattr(module, "swiglu", None)
    original_sdpa = getattr(module, "scaled_dot_product_attention", None)
    if original_swiglu is not activations.swiglu:
        original_swiglu = None
    if original_sdpa is not base.scaled_dot_product_attention:
        original_sdpa = None
    replaced = {}
    if original_swiglu is not None:
        def swiglu(gate, x):
            if on_cpu_f32(gate, x) and gate.shape == x.shape:
                return kernels.swiglu(gate, x)
            return original_swiglu(gate, x)

        replaced["swiglu"] = swiglu
    if original_sdpa is not None:
        def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
            if sinks is None and not hasattr(cache, "bits") and on_cpu_f32(queries, keys, values) and (
                    mask is None or (isinstance(mask, str) and mask == "causal")
                    or (isinstance(mask, mx.array) and mask.dtype in (mx.bool_, mx.float32) and mask.ndim <= 4)):
                return attention(kernels, queries, keys, values, scale, mask)
            return original_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

        replaced["scaled_dot_product_attention"] = scaled_dot_product_attention
    return replaced


def install(model: nn.Module, kernels: Kernels) -> list[str]:
    """Route a model's SwiGLU and attention through the kernels. mlx-lm's model modules call these two
    by module-level name, so the names are rebound in the module that defines the model's class, once
    (every model of that architecture in this process shares it; the originals are kept for
    ``uninstall``). Returns the names rebound."""
    module = sys.modules[type(model).__module__]
    if not hasattr(module, ORIGINALS):
        replaced = model_functions(kernels, module)
        setattr(module, ORIGINALS, {name: getattr(module, name) for name in replaced})
        for name, function in replaced.items():
            setattr(module, name, function)
    return sorted(getattr(module, ORIGINALS))


def uninstall(model: nn.Module) -> None:
    """Give the model's module back mlx-lm's own functions (benchmarks compare the two in one run)."""
    module = sys.modules[type(model).__module__]
    for name, function in getattr(module, ORIGINALS, {}).items():
        setattr(module, name, function)
    if hasattr(module, ORIGINALS):
        delattr(module, ORIGINALS)


def self_check(kernels: Kernels) -> str | None:
    """Compare with MLX on special values and random data (values and gradients); None when identical."""
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    special = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 0.49999997, 88.0, -88.0, 88.1, -88.1, 200.0, -200.0,
               float("inf"), -float("inf"), float("nan")]
    key = mx.random.key(0)
    gate = mx.concatenate([mx.array(special), mx.random.uniform(-100, 100, (4093,), key=key)])
    up = mx.random.normal(gate.shape, key=mx.random.key(1))
    checks = {"swiglu": (kernels.swiglu(gate, up), mlx_swiglu(gate, up))}

    def loss(fn):
        return lambda g, u: (fn(g, u) * mx.arange(gate.size) / gate.size).sum()

    checks["swiglu gradient"] = (mx.grad(loss(kernels.swiglu), argnums=(0, 1))(gate, up),
                                 mx.grad(loss(mlx_swiglu), argnums=(0, 1))(gate, up))
    scores = mx.random.normal((4, 3, 5, 37), key=mx.random.key(2)) * 8
    weights = mx.random.normal(scores.shape, key=mx.random.key(3))
    for name, ours, theirs in (("softmax", kernels.softmax, lambda x: mx.softmax(x, axis=-1, precise=True)),
                               ("logsumexp", kernels.logsumexp, lambda x: mx.logsumexp(x, axis=-1, keepdims=True))):
        checks[name] = (ours(scores), theirs(scores))
        checks[f"{name} gradient"] = (mx.grad(lambda x, f=ours: (f(x) * weights).sum())(scores),
                                      mx.grad(lambda x, f=theirs: (f(x) * weights).sum())(scores))
    for name, (ours, theirs) in checks.items():
        ours, theirs = (list(x) if isinstance(x, tuple) else [x] for x in (ours, theirs))
        if not all(mx.array_equal(a, b, equal_nan=True).item() for a, b in zip(ours, theirs)):
            return f"{name} differs from MLX {mx.__version__}'s"
    return None


def load_kernels() -> tuple[Kernels | None, str]:
    """The kernels if they build, load and match MLX here; else None and why."""
    built: Built = load()
    if built.module is None:
        return None, built.reason
    try:
        kernels = Kernels(built.module)
        with mx.stream(mx.cpu):
            mismatch = self_check(kernels)
    except (TypeError, RuntimeError, ValueError) as err:  # e.g. a nanobind that cannot pass mx.array
        return None, f"{built.path}: unusable with this MLX: {err}"
    if mismatch:
        return None, f"{built.path}: {mismatch}; kept MLX's kernels"
    return kernels, f"{kernels.isa}, {built.reason}"
