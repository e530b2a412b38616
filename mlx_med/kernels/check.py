"""``self_check``: every kernel against the MLX op it replaces, values and gradients, exactly."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_med.kernels.ops import Kernels


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
    for label, shape in {"": (3, 4, 5, 24), " (threaded)": (4, 9, 300, 64)}.items():
        x = random(11, shape, 3)
        weight = random(12, shape[-1:])
        for eps in (1e-5, 1e-6):
            cases[f"RMSNorm{label} eps={eps:g}"] = (kernels.rms_norm(eps), lambda x, w, e=eps: mx.fast.rms_norm(x, w, e),
                                                   (x, weight))
        # a pre-norm residual block (x + g(norm(x))): x's cotangent parts are added in MLX's order
        cases[f"RMSNorm in a residual block{label}"] = (
            lambda x, w, f=kernels.rms_norm(1e-5): x + mx.tanh(f(x, w)),
            lambda x, w: x + mx.tanh(mx.fast.rms_norm(x, w, 1e-5)), (x, weight))
        for dims, base, scale, offset in ((shape[-1], 10000.0, 1.0, mx.array(7)), (shape[-1] - 8, 1e5, 0.5,
                                                                                mx.arange(shape[0]) * 37)):
            cases[f"RoPE{label} dims={dims} base={base:g} scale={scale:g}"] = (
                lambda x, o=offset.astype(mx.int32), f=kernels.rope(dims, base, scale): f(x, o),
                lambda x, o=offset, d=dims, b=base, s=scale: mx.fast.rope(x, d, traditional=False, base=b, scale=s,
                                                                         offset=o), (x,))
    for seed, (name, (ours, theirs, inputs)) in enumerate(cases.items()):
        for what, a, b in ((name, ours(*inputs), theirs(*inputs)),
                           (f"{name} gradient", gradients(ours, inputs, seed), gradients(theirs, inputs, seed))):
            a, b = (list(x) if isinstance(x, tuple) else [x] for x in (a, b))
            if not all(mx.array_equal(x, y, equal_nan=True).item() for x, y in zip(a, b)):
                return f"{what} differs from MLX {mx.__version__}'s"
    return None
