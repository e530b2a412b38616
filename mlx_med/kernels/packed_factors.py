"""Live adapters' stacked LoRA factors packed for generation, like the base weights (``packed``).

A mixed-α batch's live adapters add two thin products per projection (``adapters.live``:
``(x @ A) * C`` and its ``@ B``). From about 41 rows some of them pass OpenBLAS's small-matrix size
(64 x 16 x 1536: down_proj's ``x @ A``, gate and up's ``t @ B``), and MLX hands those to OpenBLAS's
threaded driver, whose idle threads sleep and are woken for each call: 90 wake-ups a 64-row step of
the demo model. Packed (``f.T`` as the weight, so the check compares with MLX's own ``x @ f``), they
run OpenBLAS's kernel on mlx-med's worker pool instead, with the driver's bits: checked once per shape
and process like a model's weights (``packed.matches_mlx``, then ``packed.small_rows`` under 100^3);
a shape that does not match keeps MLX's product.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_med.kernels.ops import Kernels
from mlx_med.kernels.packed import PackedWeight, matches_mlx, small_rows


def pack_factor(kernels: Kernels, factor: mx.array) -> PackedWeight | None:
    """A live LoRA factor ``f`` (K, N), as in ``x @ f``, packed under the model's cut, or None (no cut
    yet, not fp32 2-D, or its shape does not give MLX's bits)."""
    cut = kernels.packed_cut
    if cut is None or factor.ndim != 2 or factor.dtype != mx.float32:
        return None
    weight = factor.T  # a view: x @ weight.T is MLX's x @ factor, the call being matched
    shape = tuple(weight.shape)
    if shape not in kernels.packed_factors:
        matched = matches_mlx(kernels, cut, weight)
        kernels.packed_factors[shape] = frozenset(small_rows(kernels, cut, weight)) if matched else None
    rows = kernels.packed_factors[shape]
    if rows is None:
        return None
    return PackedWeight(kernels.module.pack_weight(weight, *cut), weight, cut, kernels, rows)


def pack_live_factors(model: nn.Module, kernels: Kernels) -> int:
    """Pack the factors of every live multi-adapter layer (those with a ``pack_factors`` method, which
    hands it ``pack_factor``); the number of layers that took packed factors. Needs the model's own
    weights packed first (``packed.pack_for_generation`` sets the cut)."""
    layers = [layer for _, layer in model.named_modules() if callable(getattr(layer, "pack_factors", None))]
    with mx.stream(mx.cpu):
        return sum(layer.pack_factors(lambda factor: pack_factor(kernels, factor)) for layer in layers)
