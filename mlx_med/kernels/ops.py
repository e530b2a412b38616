"""The kernels as MLX functions with gradients, and their place in mlx-lm's models.

``swiglu`` and ``scaled_dot_product_attention`` have the signatures of mlx-lm's own (the names its
llama/qwen2/qwen3 modules call) and give bit for bit the same values and gradients. They take the
vectorized path for fp32 on the CPU and call mlx-lm's originals for anything else (GPU streams, other
dtypes, quantized KV caches, attention sinks), so putting them in a model module's namespace never
changes what it computes.
"""

from __future__ import annotations

import importlib
import sys
import types

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
            return module.softmax_vjp(output, cotangent)  # MLX's Softmax::vjp, op for op

        @mx.custom_function
        def causal_softmax(x):
            return module.causal_softmax(x)

        @causal_softmax.vjp
        def causal_softmax_vjp(x, cotangent, output):
            return module.causal_softmax_vjp(output, cotangent)

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


class CoreWithKernels(types.ModuleType):
    """``mlx.core`` as mlx-lm's generate module sees it once the kernels are in: every name is MLX's
    except ``logsumexp``, which takes the kernels for a last-axis fp32 reduction on the CPU. mlx-lm's
    ``BatchGenerator`` normalizes every decode step's vocabulary-wide logits with it (there is no hook
    to pass another), and MLX's CPU logsumexp costs as much as a seventh of a batched step."""

    def __init__(self, kernels: Kernels):
        super().__init__(mx.__name__, mx.__doc__)
        self._kernels = kernels

    def __getattr__(self, name: str):
        return getattr(mx, name)

    def logsumexp(self, a, axis=None, keepdims: bool = False, *, stream=None):
        if (stream is None and isinstance(axis, int) and a.ndim >= 1 and axis in (-1, a.ndim - 1)
                and a.shape[-1] > 0 and on_cpu_f32(a)):
            out = self._kernels.logsumexp(a)
            return out if keepdims else out.squeeze(-1)
        return mx.logsumexp(a, axis=axis, keepdims=keepdims, stream=stream)


def generate_module() -> types.ModuleType:
    """The module ``mlx_lm.generate`` (the package's attribute of that name is its function)."""
    return importlib.import_module("mlx_lm.generate")


def install_generation(kernels: Kernels) -> bool:
    """Give mlx-lm's generate module the kernels' logsumexp (``CoreWithKernels``), once per process and
    only while its ``mx`` is ``mlx.core`` itself. Returns whether it is in."""
    generate = generate_module()
    if generate.mx is mx:
        setattr(generate, ORIGINALS, {"mx": mx})
        generate.mx = CoreWithKernels(kernels)
    return isinstance(generate.mx, CoreWithKernels)


def uninstall(model: nn.Module) -> None:
    """Give the model's module, and mlx-lm's generate module, back mlx-lm's own functions (benchmarks
    compare the two in one run)."""
    for module in (sys.modules[type(model).__module__], generate_module()):
        for name, function in getattr(module, ORIGINALS, {}).items():
            setattr(module, name, function)
        if hasattr(module, ORIGINALS):
            delattr(module, ORIGINALS)


def mlx_causal_softmax(scores: mx.array) -> mx.array:
    """MLX's CPU attention fallback for ``mask="causal"``: where(mask, scores, finfo.min), then softmax."""
    queries, keys = scores.shape[-2:]
    visible = mx.arange(keys - queries, keys)[:, None] >= mx.arange(0, keys)[None]
    return mx.softmax(mx.where(visible, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype)),
                      axis=-1, precise=True)


def self_check(kernels: Kernels) -> str | None:
    """Compare with MLX on special values and random data (values and gradients); None when identical.

    Every kernel is checked on a small input and on one large enough to be split over threads
    (``cpu_kernels.cpp``: ``for_row_ranges``)."""
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    def random(seed: int, shape, scale: float = 1.0) -> mx.array:
        return mx.random.normal(shape, key=mx.random.key(seed)) * scale

    def gradients(fn, inputs: tuple, seed: int):
        """d/d(inputs) of sum(fn(*inputs) * w), w random: every output weighs differently."""
        weights = random(seed, fn(*inputs).shape)
        return mx.grad(lambda *xs: (fn(*xs) * weights).sum(), argnums=tuple(range(len(inputs))))(*inputs)

    special = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 0.49999997, 88.0, -88.0, 88.1, -88.1, 200.0, -200.0,
               float("inf"), -float("inf"), float("nan")]
    gate = mx.concatenate([mx.array(special), mx.random.uniform(-100, 100, (4093,), key=mx.random.key(0))])
    big_gate = mx.random.uniform(-30, 30, (257, 600), key=mx.random.key(4))
    # name -> (ours, MLX's, inputs)
    cases = {}
    for label, g in {"": gate, " (threaded)": big_gate}.items():
        cases[f"swiglu{label}"] = (kernels.swiglu, mlx_swiglu, (g, random(1, g.shape)))
    for label, shape in {"": (4, 3, 5, 37), " (threaded)": (3, 97, 701)}.items():
        scores = random(2, shape, 8)
        cases[f"softmax{label}"] = (kernels.softmax, lambda x: mx.softmax(x, axis=-1, precise=True), (scores,))
        cases[f"logsumexp{label}"] = (kernels.logsumexp, lambda x: mx.logsumexp(x, axis=-1, keepdims=True), (scores,))
    for label, shape in {" (prefill)": (2, 3, 7, 7), " (cached keys)": (2, 3, 5, 9), " (more queries)": (1, 2, 9, 4),
                         " (threaded)": (2, 3, 3, 160, 160)}.items():
        cases[f"causal softmax{label}"] = (kernels.causal_softmax, mlx_causal_softmax, (random(9, shape, 8),))
    for label, shape in {"": (3, 5, 37), " (threaded)": (70, 1001)}.items():
        targets = mx.random.randint(-shape[-1], shape[-1], shape[:-1], key=mx.random.key(7))  # < 0: from the end
        cases[f"cross-entropy{label}"] = (
            lambda x, t=targets.astype(mx.int32): kernels.cross_entropy(x, t),
            lambda x, t=targets: nn.losses.cross_entropy(x, t), (random(6, shape, 6),))
    for seed, (name, (ours, theirs, inputs)) in enumerate(cases.items()):
        for what, a, b in ((name, ours(*inputs), theirs(*inputs)),
                           (f"{name} gradient", gradients(ours, inputs, seed), gradients(theirs, inputs, seed))):
            a, b = (list(x) if isinstance(x, tuple) else [x] for x in (a, b))
            if not all(mx.array_equal(x, y, equal_nan=True).item() for x, y in zip(a, b)):
                return f"{what} differs from MLX {mx.__version__}'s"
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
