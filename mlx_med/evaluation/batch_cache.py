"""A batch KV cache that refills its rows in place: mlx-lm's ``BatchKVCache``, without its copies.

mlx-lm's ``BatchGenerator`` (continuous batching) removes finished rows from its decode batch and
appends newly prefilled ones. Its ``BatchKVCache`` does each of those as new arrays: a gather of the
kept rows, a trim of the shared left padding as a view (which the next token's write then copies
whole), and for every refill a padded concatenation of the whole cache with the new rows, often
padded first on both sides. Each is a copy of every layer's keys and values (64 rows × 250 tokens of
the demo model: 0.7 GB), into freshly allocated memory that the kernel must zero page by page.
Profiled on the demo's α sweep (304 answers, 64 rows; 2-core AVX2 box), those copies took 41 s of
its 379 s; with this cache the batch took 370.4 s instead of 415.6 s, with 1.03M page faults instead
of 3.58M, and the same 304 answers.

``InPlaceBatchKVCache`` keeps one buffer per layer with room for the batch's rows (the generator's
batch size) and a window ``[start, start + size)`` on the token axis:

- a refill writes only the new rows into free rows of the buffer (right-aligned, as mlx-lm pads);
- removing rows is one gather of whole rows into a buffer of the same capacity (moving only the
  later rows inside the buffer measured 3x slower: MLX copies them out and back, strided);
- trimming the shared left padding moves ``start``; a new row longer than the batch moves it back;
- a token's keys are written into the buffer; it grows (one copy) only when the window reaches its end.

What the model reads is the same: per layer, keys and values ``[rows, heads, size, dim]`` whose every
visible entry (past each row's left padding) equals mlx-lm's, the same left padding, offsets and
masks, rows in the same order. Padding entries (masked out) may hold other finite values, which add
exactly nothing to a softmax-weighted sum. So every logit is bit for bit what mlx-lm's cache gives
(``tests/test_batch_cache.py``). MLX writes a buffer in place when nothing else holds it (else it
copies, correctly, as before); finished rows' extracted caches are therefore copied out at once.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, dynamic_roll, make_prompt_cache

from mlx_med import switches


def describe(env=os.environ) -> str:
    """Which batch KV cache generation uses (``doctor``'s ``batch cache:`` line)."""
    if switches.BATCH_CACHE.is_off(env):
        return f"mlx-lm's BatchKVCache ({switches.BATCH_CACHE.name}={env[switches.BATCH_CACHE.name]})"
    ignored = switches.BATCH_CACHE.ignored(env)
    return "in place (rows refilled without copying the cache)" + (f"; {ignored}" if ignored else "")


def fresh_kv_cache(model) -> list[KVCache] | None:
    """A new per-layer cache for ``model`` where every layer takes mlx-lm's plain ``KVCache`` (not a
    sliding window, an SSM state, ...), else None. A forward into it takes no gradient, so its prefill
    attention may run the fused kernel (``kernels.ops.attention``): MCQ scoring, perplexity and
    training's validation run their forwards into one."""
    caches = make_prompt_cache(model)
    return caches if all(type(c) is KVCache for c in caches) else None


def uses_plain_kv_cache(model) -> bool:
    """Whether every layer of ``model`` takes mlx-lm's plain ``KVCache``: the caches that can be batched
    in place here, or copied row by row (MCQ scoring)."""
    return fresh_kv_cache(model) is not None


def in_place_caches(model, rows: int, prompts: int, tokens: int = 0) -> list[list[KVCache]] | None:
    """Per-layer caches for each of ``prompts`` prompts, whose batch caches refill in place (with room
    for ``tokens`` tokens a row when known: see ``InPlaceKVCache``); None (mlx-lm's own) for a model
    whose layers do not all take mlx-lm's plain ``KVCache`` or with ``MLX_MED_BATCH_CACHE=mlx-lm``."""
    if switches.BATCH_CACHE.is_off(os.environ) or not uses_plain_kv_cache(model):
        return None
    layers = len(make_prompt_cache(model))
    return [[InPlaceKVCache(rows, tokens) for _ in range(layers)] for _ in range(prompts)]


class InPlaceKVCache(KVCache):
    """mlx-lm's one-sequence ``KVCache``; batched (``merge``), it becomes an ``InPlaceBatchKVCache``.

    Args:
        rows: the rows a decode batch holds (the generator's batch size): the merged cache keeps
            room for that many, so refills never reallocate.
        tokens: the tokens a row holds at most (the longest prompt plus the new tokens), when known:
            the merged cache's buffers get room for that many when first (re)allocated, so decoding
            never grows them. Growing copies every layer's keys and values into fresh memory that the
            kernel zeroes page by page: 2.4 s for one decode step of 64 rows of the demo model at the
            256-token boundary, on a step of 0.2 s. 0: grow 256 tokens at a time (mlx-lm's step).
    """

    def __init__(self, rows: int = 1, tokens: int = 0):
        super().__init__()
        self.rows = rows
        self.tokens = tokens

    @classmethod
    def merge(cls, caches):
        return InPlaceBatchKVCache.from_batch(BatchKVCache.merge(caches), max(c.rows for c in caches),
                                              max(c.tokens for c in caches))


class InPlaceBatchKVCache(BatchKVCache):
    """``BatchKVCache`` over a row- and token-padded buffer, updated in place (module docstring).

    ``keys``/``values`` are the buffers ``[row capacity, heads, token capacity, dim]``; the batch is
    rows ``[0, len(offset))`` and tokens ``[start, start + _idx)`` of them (``keys_and_values``).
    """

    def __init__(self, left_padding: list[int], rows: int = 1, tokens: int = 0):
        super().__init__(left_padding)
        self.start = 0
        self.rows = rows
        self.tokens = tokens  # room a buffer gets at least (InPlaceKVCache's ``tokens``)

    @classmethod
    def from_batch(cls, batch: BatchKVCache, rows: int, tokens: int = 0) -> InPlaceBatchKVCache:
        """The same cache as mlx-lm's ``batch`` (whose buffers it takes over)."""
        cache = cls.__new__(cls)
        cache.__dict__.update(batch.__dict__)
        cache.start = 0
        cache.rows = rows
        cache.tokens = tokens
        return cache

    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    def _window(self, array: mx.array) -> mx.array:
        return array[: self.batch_size, :, self.start: self.start + self._idx]

    def keys_and_values(self):
        return self._window(self.keys), self._window(self.values)

    def _reallocate(self, rows: int, tokens: int, start: int) -> None:
        """New buffers of ``rows`` × ``tokens``, the batch's window copied to ``start``."""
        def moved(array):
            shape = (rows, array.shape[1], tokens, array.shape[3])
            fresh = mx.zeros(shape, array.dtype)
            fresh[: self.batch_size, :, start: start + self._idx] = self._window(array)
            return fresh

        self.keys, self.values = moved(self.keys), moved(self.values)
        self.start = start

    def _to_plain_layout(self) -> None:
        """Views with mlx-lm's layout (rows exactly the batch, the window from token 0)."""
        if self.keys is not None:
            self.keys = self.keys[: self.batch_size, :, self.start:]
            self.values = self.values[: self.batch_size, :, self.start:]
        self.start = 0

    def _tokens_for(self, length: int) -> int:
        length = max(length, self.tokens)
        return self.step * ((length + self.step - 1) // self.step)

    def update_and_fetch(self, keys, values):
        n = keys.shape[2]
        if self.keys is None:
            shape = (self.batch_size, keys.shape[1], self._tokens_for(n), keys.shape[3])
            self.keys = mx.zeros(shape, keys.dtype)
            self.values = mx.zeros((*shape[:3], values.shape[3]), values.dtype)
            self.start = 0
        elif self.start + self._idx + n > self.keys.shape[2]:
            self._reallocate(self.keys.shape[0], self._tokens_for(self._idx + n + 1), 0)
        end = self.start + self._idx
        self.keys[: self.batch_size, :, end: end + n] = keys
        self.values[: self.batch_size, :, end: end + n] = values
        self.offset = self.offset + n
        self._idx += n
        return self.keys_and_values()

    def finalize(self):
        # mlx-lm rolls each row right by its right padding over the whole token axis; here over the
        # buffer from ``start`` on: the same visible entries (what wraps around is padding either way)
        if self._right_padding is not None:
            padding = self._right_padding
            for name in ("keys", "values"):
                buffer = getattr(self, name)
                rolled = dynamic_roll(buffer[: self.batch_size, :, self.start:], padding[:, None], axis=2)
                buffer[: self.batch_size, :, self.start:] = rolled
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    def filter(self, batch_indices):
        keep = [int(i) for i in batch_indices]
        if not keep:
            self.keys = self.values = None
            self.offset, self.left_padding, self.start, self._idx = self.offset[:0], self.left_padding[:0], 0, 0
            return
        if self.keys is not None and keep != list(range(len(keep))):
            # One gather of whole rows into a buffer of the same capacity (the kept rows first, then
            # the others' stale rows as free rows). Moving only the later rows within the buffer
            # measured slower: MLX copies them out and back (strided), 3x the time of this gather.
            kept = set(keep)
            order = mx.array(keep + [row for row in range(self.keys.shape[0]) if row not in kept])
            self.keys = mx.take(self.keys, order, axis=0)
            self.values = mx.take(self.values, order, axis=0)
        self.offset = self.offset[keep]
        self.left_padding = self.left_padding[keep]
        # mlx-lm drops the padding all rows share; the window's start moves instead
        min_left_pad = min(self.left_padding.tolist())
        if min_left_pad > 0:
            if self.keys is not None:
                self.start += min_left_pad
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other):
        if self.keys is None or other.keys is None:
            # a batch not prefilled yet on either side: mlx-lm's way, on mlx-lm's layout
            for cache in (self, other):
                if isinstance(cache, InPlaceBatchKVCache):
                    cache._to_plain_layout()
            super().extend(other)
            return
        other_start = getattr(other, "start", 0)
        other_rows = other.offset.shape[0]
        shift = max(other._idx - self._idx, 0)  # the new rows are longer: the batch's window grows left
        size = self._idx + shift
        rows = self.batch_size + other_rows
        if rows > self.keys.shape[0] or shift > self.start:
            self._reallocate(max(rows, self.rows), self._tokens_for(size + 1) + shift, shift)
        self.start -= shift
        self.left_padding = self.left_padding + shift
        self._idx = size
        end = self.start + size
        for name in ("keys", "values"):
            buffer, theirs = getattr(self, name), getattr(other, name)
            new = theirs[:other_rows, :, other_start: other_start + other._idx]
            buffer[self.batch_size: rows, :, end - other._idx: end] = new
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([self.left_padding, other.left_padding + (size - other._idx)])

    def extract(self, idx):
        # a copy now: a lazy slice would keep the buffer from being written in place
        cache = KVCache()
        padding = self.left_padding.tolist()[idx]
        window = slice(self.start + padding, self.start + self._idx)
        cache.keys = mx.contiguous(self.keys[idx: idx + 1, :, window])
        cache.values = mx.contiguous(self.values[idx: idx + 1, :, window])
        cache.offset = cache.keys.shape[2]
        mx.async_eval(cache.keys, cache.values)
        return cache
