"""Prefill a batch whose prompts start alike (a chat template, a system prompt) by computing that start once.

An eval's prompts share their chat template and system prompt: on the demo's Chinese QA set under
the default medical prompt, 287 of each prompt's 350-490 tokens; without a system prompt, the
template's own 24 (SmolLM2's default system line). mlx-lm's ``BatchGenerator`` prefills a batch of
prompts right-padded, every row from position 0, so the rows' keys and values over that common start
are the same numbers computed once per row. ``SharedPrefixModel`` wraps the model the generator
calls and, on the first prefill call of a fresh batch, computes the start once per distinct set of
adapter weights among the rows (or takes it from an earlier batch, below), writes it into every
row's cache, then prefills only the rest of each prompt.

**The same bits.** The start's pass attends over as many keys as the batch does (zeros past the
start, masked out exactly as the batch masks its later tokens), so each attention sum has the
batch's length, and so the BLAS cuts it into the same blocks (OpenBLAS cuts sums longer than its
GEMM_Q, at a point set by their length: ``kernels.attention_sums``); masked weights are exact zeros,
which add nothing. The projections' sums run over the model's width whatever the number of rows.
What does depend on the shape is the kernel: OpenBLAS gives small products (M·N·K up to 100³) to
other kernels, which round otherwise. So the start's pass repeats each group's row as often as its
thinnest product (a LoRA factor's 16 columns: a 24-token start takes 5 rows) needs to stay above that
size, and the rest's pass is taken only where its products stay above it too. Then every key, value
and logit is bit for bit the unshared batch's (``tests/test_shared_prefix.py``).

**Kept for later batches.** Where every attention of the batch, the start's pass and the rest's runs
mlx-med's fused prefill kernel (``kernels.fused_prefill_keys``: up to 320 keys on OpenBLAS's AVX-512
kernels), each attention sum is one fma chain over the keys its query sees, whatever the batch's
width, so a start's keys and values are the same in every batch. Those are kept (``KeptStarts``, by
start and weights) and a later batch that begins with one takes it without a pass: a generation's
template start is computed once per α, not once per batch (the server's, once per α and system
prompt for as long as it runs).

Only fp32 on the CPU with mlx-med's kernels, and only where the BLAS gives a row of a matmul the same
bits whatever its place in the call (``rows_round_alike``: OpenBLAS's AVX-512 kernels and the reference
BLAS do; its AVX2 kernels, HASWELL and ZEN, do not, and there every row is prefilled whole).
``MLX_MED_SHARED_PREFIX=off`` prefills every row whole.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlx_med import switches
from mlx_med.kernels.attention_sums import SMALL_WORK, prefill_shape_fits

# A shorter common start is not worth a pass of its own (the chat template's first line)
MIN_SHARED_TOKENS = 16
# Starts kept for a generation's later batches, in bytes of keys and values (a server's system prompts × α)
KEPT_START_BYTES = 256 * 2**20


def describe(env=os.environ) -> str:
    """Whether generation prefills a common prompt start once (``doctor``'s ``shared prompt start:`` line)."""
    if switches.SHARED_PREFIX.is_off(env):
        return f"off ({switches.SHARED_PREFIX.name}={env[switches.SHARED_PREFIX.name]})"
    ignored = switches.SHARED_PREFIX.ignored(env)
    return ("prefilled once per batch where the bits stay the same (fp32, CPU, a BLAS whose rows round alike), "
            "kept for later batches where the prefill attention is fused (see kernels)"
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


@dataclass
class StartPlan:
    """How one prefill call shares its rows' common start (``SharedPrefixModel._plan``)."""

    tokens: tuple[int, ...]  # the start
    groups: list[list[int]]  # the batch's rows, grouped by their adapter weights
    keys: list[tuple]  # each group's weights, as a key of ``SharedPrefixModel.starts``
    weights: list[dict] | None  # each row's weights; None: every row runs the model-wide ones
    found: dict[int, list]  # group -> its start's per-layer (keys, values) kept from a batch before
    copies: int  # rows each missing group takes in the start's pass (past OpenBLAS's small-matrix size)
    kept: bool  # the start's keys and values are the same in any batch (fused attention): kept for later

    @property
    def missing(self) -> list[int]:
        """The groups whose start is computed now."""
        return [g for g in range(len(self.groups)) if g not in self.found]


class KeptStarts:
    """Starts' keys and values kept for later batches, least recently used dropped past ``limit`` bytes."""

    def __init__(self, limit: int = KEPT_START_BYTES):
        self.limit, self.size = limit, 0
        self.entries: OrderedDict[tuple, list[tuple[mx.array, mx.array]]] = OrderedDict()

    def get(self, key: tuple):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def lengths(self, weights: tuple, tokens: list[int]) -> set[int]:
        """The lengths of the kept starts of ``weights`` that ``tokens`` begins with."""
        return {len(start) for start, key in self.entries if key == weights and list(start) == tokens[:len(start)]}

    def put(self, key: tuple, layers: list[tuple[mx.array, mx.array]]) -> None:
        self.entries[key] = layers
        self.size += sum(k.nbytes + v.nbytes for k, v in layers)
        while self.size > self.limit and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.size -= sum(k.nbytes + v.nbytes for k, v in dropped)


class SharedPrefixModel:
    """The model as mlx-lm's ``BatchGenerator`` sees it: a fresh batch's prefill computes the rows'
    common start once per distinct adapter weights, or takes it from an earlier batch (module
    docstring); every other call is the model's.

    Args:
        model: the mlx-lm model (live adapters attached or not).
        live: its ``LiveAdapters`` when rows carry their own weights (``row_weights``), else None.
        row_weights: returns the weights of the current batch's rows (``RowWeightedModel.current_weights``),
            or None when every row runs the model-wide weights.
    """

    def __init__(self, model, live=None, row_weights=None):
        from mlx_med.kernels import fused_prefill_keys

        self.model, self.live, self.row_weights = model, live, row_weights
        self.shapes = _shapes(model)
        self.narrowest = narrowest_product(model)
        self.fused_keys = fused_prefill_keys(model)  # prefills up to this many keys add width-free sums
        # by start tokens and per-row weights: model-wide weights are not in the key, so they stay as they
        # are for this wrapper's life (one generation; the server runs per-row weights throughout)
        self.starts = KeptStarts()
        self.shared_tokens = 0  # prompt tokens not computed again (the profile's)
        self.start_passes = 0  # passes over a start (the rest came from kept starts)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        plan = self._plan(inputs, cache)
        if plan is None:
            return self.model(inputs, cache=cache, **kwargs)
        starts = dict(plan.found)  # taken before the pass: keeping its starts may drop kept ones
        if plan.missing:
            starts.update(self._start_pass(plan, inputs.shape[1], len(cache)))
        group_of = [0] * inputs.shape[0]
        for g, rows in enumerate(plan.groups):
            for row in rows:
                group_of[row] = g
        index = mx.array(group_of)
        by_group = [starts[g] for g in range(len(plan.groups))]
        for layer, per_group in zip(cache, zip(*by_group)):  # per layer, each group's (keys, values)
            keys, values = zip(*per_group)
            layer.update_and_fetch(mx.concatenate(keys)[index], mx.concatenate(values)[index])
        length = len(plan.tokens)
        self.shared_tokens += length * (inputs.shape[0] - plan.copies * len(plan.missing))
        return self.model(inputs[:, length:], cache=cache, **kwargs)

    def _start_pass(self, plan: StartPlan, width: int, layers: int) -> dict[int, list]:
        """Compute the start of each missing group (``plan.copies`` rows each) in one pass whose attention
        sees ``width`` keys; returns group -> per-layer (keys, values) of one row, kept if ``plan.kept``."""
        length = len(plan.tokens)
        if plan.weights is not None:  # the start's pass: its rows run their group's weights
            self.live.set_row_weights([plan.weights[plan.groups[g][0]] for g in plan.missing
                                       for _ in range(plan.copies)])
        wide = [WideKVCache(width) for _ in range(layers)]
        rows = len(plan.missing) * plan.copies
        self.model(mx.repeat(mx.array([plan.tokens]), rows, axis=0), cache=wide)
        if plan.weights is not None:
            self.live.set_row_weights(plan.weights)
        self.start_passes += 1
        starts = {}
        for i, g in enumerate(plan.missing):
            row = i * plan.copies
            start = [(one.keys[row: row + 1, :, :length], one.values[row: row + 1, :, :length]) for one in wide]
            if plan.kept:  # copied out of the pass's buffers, which are then freed
                start = [(mx.contiguous(k), mx.contiguous(v)) for k, v in start]
                mx.eval(start)
                self.starts.put((plan.tokens, plan.keys[g]), start)
            starts[g] = start
        return starts

    def _plan(self, inputs, cache) -> StartPlan | None:
        """How this call shares its rows' common start, or None: no sharing."""
        # only the first prefill call of a fresh batch of plain KV caches (no sliding window)
        if (inputs.ndim != 2 or inputs.shape[1] <= MIN_SHARED_TOKENS or cache is None
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
        row_keys = [tuple(sorted(w.items())) for w in weights] if weights is not None else [()] * rows
        by_key: dict[tuple, list[int]] = {}
        for row, key in enumerate(row_keys):
            by_key.setdefault(key, []).append(row)
        keys, groups = list(by_key), list(by_key.values())
        # the longest start kept for one of the groups that every row begins with, else the rows' own
        kept_lengths = {n for key in keys for n in self.starts.lengths(key, first) if n <= start}
        if kept_lengths and self._width_free(width, max(kept_lengths)):
            start, kept = max(kept_lengths), True
        else:
            kept = self._width_free(width, start)
        tokens = tuple(first[:start])
        found = {g: self.starts.get((tokens, key)) for g, key in enumerate(keys)} if kept else {}
        found = {g: start_kv for g, start_kv in found.items() if start_kv is not None}
        missing = len(groups) - len(found)
        copies = self._copies(start, missing)
        computed = copies * missing
        if computed > rows or (computed == rows and not kept) or not self._large_enough(start, rows, width, kept):
            return None  # a start's pass as big as the batch's saves nothing (unless later batches take it)
        return StartPlan(tokens, groups, keys, weights, found, copies, kept)

    def _width_free(self, width: int, start: int) -> bool:
        """Whether a start of ``start`` tokens has the same keys and values in a batch of any width: the
        batch's prefill, the start's pass and the rest's all run the fused attention, whose sums are
        one chain from zero over the keys a query sees (exact zeros after them add nothing)."""
        head_dim = self.shapes[2]
        return all(prefill_shape_fits(self.fused_keys, queries, width, head_dim)
                   for queries in (width, start, width - start))

    def _copies(self, start: int, groups: int) -> int:
        """Rows each group takes in the start's pass so that its thinnest product (the LoRA factors'
        or the narrowest projection's) stays out of OpenBLAS's small-matrix kernels."""
        one = start * self.narrowest * self.shapes[0]
        return max(1, -(-(SMALL_WORK + 1) // (one * max(groups, 1))))

    def _large_enough(self, start: int, rows: int, width: int, fused: bool) -> bool:
        """Whether every product of the rest's pass stays out of OpenBLAS's small-matrix kernels (the
        attention's too, unless the fused kernel runs it; the start's pass is sized by ``_copies``)."""
        hidden, repeats, head_dim = self.shapes
        rest = width - start
        products = [rows * rest * self.narrowest * hidden]  # the rest's projections and LoRA factors
        if not fused:
            products += [repeats * start * width * head_dim,  # attention scores and sums, the start's queries
                         repeats * rest * width * head_dim]  # the rest's
        return min(products) > SMALL_WORK
