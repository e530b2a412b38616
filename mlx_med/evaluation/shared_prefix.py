"""Prefill a batch whose prompts start alike (a system prompt) by computing that start once.

An eval's prompts share their chat template and system prompt: on the demo's Chinese QA set under
the default medical prompt, 287 of each prompt's 350-490 tokens (without a system prompt, only the
template's own 24, too short to share under the rule below). mlx-lm's ``BatchGenerator`` prefills a
batch of prompts right-padded, every row from position 0, so the rows' keys and values over that
common start are the same numbers computed once per row. ``SharedPrefixModel`` wraps the model the generator calls and, on the first
prefill call of a fresh batch, computes the start once per distinct set of adapter weights among
the rows, writes it into every row's cache, then prefills only the rest of each prompt.

**The same bits.** The one-row pass over the start attends over as many keys as the batch does
(zeros past the start, masked out exactly as the batch masks its later tokens), so each attention
sum has the batch's length, and so the BLAS cuts it into the same blocks (OpenBLAS cuts sums longer
than its GEMM_Q, at a point set by their length: ``kernels.attention_sums``); masked weights are exact
zeros, which add nothing. The projections' sums run over the model's width whatever the number of
rows. What does depend on the shape is the kernel: OpenBLAS gives small products (M·N·K up to 100³)
to other kernels, which round otherwise, so the shared path is taken only where every product of it
(the start's and the rest's projections, LoRA factors and attention) stays above that size. Then
every key, value and logit is bit for bit the unshared batch's (``tests/test_shared_prefix.py``; on
the demo model a 64-token start shared with its LoRA products of 16 columns differs in the 5th
digit, one of 129 tokens or more gives the same bits).

Only fp32 on the CPU with mlx-med's kernels, and only where the BLAS gives a row of a matmul the same
bits whatever its place in the call (``rows_round_alike``: OpenBLAS's AVX-512 kernels and the reference
BLAS do; its AVX2 kernels, HASWELL and ZEN, do not, and there every row is prefilled whole).
``MLX_MED_SHARED_PREFIX=off`` prefills every row whole.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlx_med import switches

# OpenBLAS hands products with M·N·K up to this to its small-matrix kernels (other sums)
SMALL_PRODUCT = 100 ** 3
# A shorter common start is not worth a pass of its own (the chat template's first line)
MIN_SHARED_TOKENS = 16


def describe(env=os.environ) -> str:
    """Whether generation prefills a common prompt start once (``doctor``'s ``shared prompt start:`` line)."""
    if switches.SHARED_PREFIX.is_off(env):
        return f"off ({switches.SHARED_PREFIX.name}={env[switches.SHARED_PREFIX.name]})"
    ignored = switches.SHARED_PREFIX.ignored(env)
    return ("prefilled once per batch where the bits stay the same (fp32, CPU, a BLAS whose rows round alike)"
            + (f"; {ignored}" if ignored else ""))


def sharing_applies(model) -> bool:
    """Whether ``model``'s prefill can share a common start here (see the module docstring)."""
    from mlx_med.kernels import cpu_kernels
    from mlx_med.kernels.ops import on_cpu_f32

    if switches.SHARED_PREFIX.is_off(os.environ) or mx.default_device() != mx.cpu or cpu_kernels()[0] is None:
        return False
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(embedding, "weight", None)
    return (weight is not None and on_cpu_f32(weight) and _shapes(model) is not None
            and rows_round_alike())


@functools.cache
def rows_round_alike() -> bool:
    """Whether this BLAS gives each row of a matmul the same bits whatever the row's place in the call and
    the call's row count (above the small-product size): what computing a start in a call of its own needs.

    OpenBLAS's AVX-512 kernels do; its AVX2 kernels (HASWELL, ZEN) add by a product's place in the
    call, and there the start stays in the batch's call. Probed once, on the shapes of a prefill's
    projections, LoRA factors and attention, with its own random key (sampling's generator untouched).
    """
    key = mx.random.key(1204)
    with mx.stream(mx.cpu):
        for rows, part, n, k in ((1000, 129, 16, 576), (1200, 150, 64, 576), (900, 129, 576, 576),
                                 (700, 300, 1536, 576), (640, 200, 576, 1536), (1300, 260, 400, 64),
                                 (1300, 260, 64, 400)):
            k1, k2, key = mx.random.split(key, 3)
            x = mx.random.normal((rows, k), key=k1)
            w = mx.random.normal((k, n), key=k2)
            whole = x @ w
            for start in (0, 37, rows - part):
                if not mx.array_equal(whole[start: start + part], x[start: start + part] @ w).item():
                    return False
    return True


def _shapes(model) -> tuple[int, int, int] | None:
    """(hidden size, query heads per key head, head size) of an mlx-lm model."""
    args = getattr(model, "args", None)
    try:
        hidden, heads = int(args.hidden_size), int(args.num_attention_heads)
        kv_heads = int(getattr(args, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(args, "head_dim", None) or hidden // heads)
    except (AttributeError, TypeError, ValueError):
        return None
    return hidden, heads // kv_heads, head_dim


def narrowest_product(model) -> int | None:
    """The fewest columns any of ``model``'s matmuls produces: a projection's outputs, or the rank of
    a LoRA factor (live adapters: all of them stacked; mlx-lm's ``LoRALinear``). None: no projections."""
    from mlx_med.adapters.live import MultiLoRALinear

    widths = []
    for _, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            widths.append(module.rank)
        elif hasattr(module, "lora_a"):
            widths.append(module.lora_a.shape[-1])
        elif isinstance(module, nn.Linear | nn.QuantizedLinear):
            widths.append(module.weight.shape[0])
    return min(widths, default=None)


class WideKVCache(KVCache):
    """A cache for the one-row pass over a common start: attention sees ``width`` keys (the batch's),
    zeros past those written, masked out like the batch's later tokens."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def update_and_fetch(self, keys, values):
        n = keys.shape[2]
        if self.keys is None:
            self.keys = mx.zeros((*keys.shape[:2], self.width, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((*values.shape[:2], self.width, values.shape[3]), values.dtype)
        self.keys[:, :, self.offset: self.offset + n] = keys
        self.values[:, :, self.offset: self.offset + n] = values
        self.offset += n
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        queries = mx.arange(self.offset, self.offset + N)[:, None]
        return queries >= mx.arange(self.width)[None]  # the causal mask, as wide as the batch's


class SharedPrefixModel:
    """The model as mlx-lm's ``BatchGenerator`` sees it: a fresh batch's prefill computes the rows'
    common start once per distinct adapter weights (module docstring); every other call is the model's.

    Args:
        model: the mlx-lm model (live adapters attached or not).
        live: its ``LiveAdapters`` when rows carry their own weights (``row_weights``), else None.
        row_weights: returns the weights of the current batch's rows (``RowWeightedModel.current_weights``),
            or None when every row runs the model-wide weights.
    """

    def __init__(self, model, live=None, row_weights=None):
        self.model, self.live, self.row_weights = model, live, row_weights
        self.shapes = _shapes(model)
        self.narrowest = narrowest_product(model)
        self.shared_tokens = 0  # prompt tokens not computed again (the profile's)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        plan = self._plan(inputs, cache)
        if plan is None:
            return self.model(inputs, cache=cache, **kwargs)
        start, groups, weights = plan
        tokens = inputs[:1, :start]
        if weights is not None:  # the start's pass: one row per distinct weights
            self.live.set_row_weights([weights[rows[0]] for rows in groups])
        wide = [WideKVCache(inputs.shape[1]) for _ in cache]
        self.model(mx.repeat(tokens, len(groups), axis=0), cache=wide)
        if weights is not None:
            self.live.set_row_weights(weights)
        group_of = [0] * inputs.shape[0]
        for g, rows in enumerate(groups):
            for row in rows:
                group_of[row] = g
        index = mx.array(group_of)
        for layer, one in zip(cache, wide):
            layer.update_and_fetch(one.keys[index, :, :start], one.values[index, :, :start])
        self.shared_tokens += start * (inputs.shape[0] - len(groups))
        return self.model(inputs[:, start:], cache=cache, **kwargs)

    def _plan(self, inputs, cache):
        """(common start, rows grouped by weights, each row's weights or None), or None: no sharing."""
        # only the first prefill call of a fresh batch of plain KV caches (no sliding window)
        if (inputs.ndim != 2 or inputs.shape[1] <= MIN_SHARED_TOKENS or inputs.shape[0] < 2 or cache is None
                or self.shapes is None or self.narrowest is None
                or any(not isinstance(c, BatchKVCache) or c.keys is not None for c in cache)):
            return None
        rows, width = inputs.shape
        padding = getattr(cache[0], "_right_padding", None)
        lengths = [width] * rows if padding is None else [width - p for p in padding.tolist()]
        ids = inputs.tolist()
        start = min(lengths) - 1  # every row keeps a token of its own
        first = ids[0]
        for other in ids[1:]:
            same = 0
            while same < start and other[same] == first[same]:
                same += 1
            start = same
        if start < MIN_SHARED_TOKENS:
            return None
        weights = self.row_weights() if self.row_weights is not None else None
        keys = [tuple(sorted(w.items())) for w in weights] if weights is not None else [()] * rows
        groups: dict[tuple, list[int]] = {}
        for row, key in enumerate(keys):
            groups.setdefault(key, []).append(row)
        if len(groups) == rows or not self._large_enough(start, rows, width):
            return None
        return start, list(groups.values()), weights

    def _large_enough(self, start: int, rows: int, width: int) -> bool:
        """Whether every product of the shared path stays out of OpenBLAS's small-matrix kernels."""
        hidden, repeats, head_dim = self.shapes
        rest = width - start
        products = (
            start * self.narrowest * hidden,  # the start's projections and LoRA factors (one row)
            rows * rest * self.narrowest * hidden,  # the rest's
            repeats * start * width * head_dim,  # attention scores and sums, the start's queries
            repeats * rest * width * head_dim,  # the rest's
        )
        return min(products) > SMALL_PRODUCT
