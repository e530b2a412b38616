"""How this machine's BLAS adds the attention matmuls' inner sums, found by trying against MLX.

The fused decode attention (``cpu_kernels.cpp``: ``decode_attention``) reproduces MLX's CPU attention
bit for bit only if it adds each matmul output's products the way the BLAS under MLX does. OpenBLAS's
level-3 driver makes one fma chain from zero over the inner dimension and cuts it into blocks once it
is longer than the library's GEMM_Q (320 with its Zen and AVX-512 kernels; other builds may not cut
at all, hence the uncut candidate). Its AVX-512 builds (SKYLAKEX, COOPERLAKE and later) also send
small products to a small-matrix kernel; for the scores (up to 1200 keys) that one runs 16 chains per
output and adds them by a fixed tree. None of that is exported, so ``calibrate`` tries candidate
rules on key counts that tell them apart, then checks the one that matched on every key count up to
``EVERY_LENGTH_UNTIL`` and on every 61st beyond, up to the longest the fused kernel is given
(``DECODE_LIMIT``): about 1 s, once per machine (the outcome is recorded with the kernels' self-check).
None when no candidate gives MLX's bits: the attention then stays MLX's graph.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class BlasSums(NamedTuple):
    """One candidate rule (``cpu_kernels.cpp``: ``BlasSums``), in the kernel's argument order."""

    block: int  # OpenBLAS's GEMM_Q, where its level-3 driver cuts inner sums (0: one chain)
    unroll: int  # its GEMM_UNROLL_M, which rounds the block before the last
    small_scores: bool  # scores within its small-matrix permit take sgemm_small_kernel_tn's sums

    def describe(self) -> str:
        cut = f"cut at {self.block}, unroll {self.unroll}" if self.block else "uncut"
        return f"BLAS sums {cut}" + (", small-matrix scores" if self.small_scores else "")


# The fused kernel takes one query per head (a decode step) over at most this many keys x head
# features per call: every shape below it is checked here. (OpenBLAS also runs such calls on one
# thread, so its threaded driver, which cuts sums its own way, never enters.)
DECODE_LIMIT = 1 << 18
HEAD_DIMS = (64, 128)  # the head sizes checked (the fused kernel takes no other)
# GEMM_Q values by GEMM_UNROLL_M values, each without and with the small-matrix scores
_CUTS = ((0, 1),) + tuple((block, unroll) for block in (320, 384, 256, 192, 128, 448, 512, 640, 768, 1024)
                          for unroll in (8, 16, 4, 2, 1, 32))
CANDIDATES = tuple(BlasSums(block, unroll, small) for block, unroll in _CUTS for small in (False, True))
# key counts that tell the candidates apart (each just above, at or between blocks; 1200 and 1201 on
# either side of the small-matrix permit; 37 and 1199 end in a partial group of four keys)
PROBE_KEYS = (37, 129, 193, 257, 300, 321, 383, 385, 449, 500, 513, 641, 700, 769, 1000, 1025, 1199, 1200, 1201,
              1500, 2049, 4096)
# Every key count up to here is checked (three blocks of any candidate up to 320); beyond it, every 61st.
# Checking all 4096 takes 4.5 s on a 2-core CPU (MLX's own attention, the reference, is the cost).
EVERY_LENGTH_UNTIL = 1024


def fits(queries: mx.array, keys: mx.array) -> bool:
    """Whether the fused kernel was checked for these shapes ((B, H, L, D) queries, (B, Hkv, S, D) keys)."""
    dim = queries.shape[-1]
    return queries.shape[2] == 1 and dim in HEAD_DIMS and keys.shape[2] * dim <= DECODE_LIMIT


def probe_lengths(dim: int) -> list[int]:
    """The key counts that tell the candidates apart, for one head size."""
    return [n for n in PROBE_KEYS if n * dim <= DECODE_LIMIT]


def checked_lengths(dim: int) -> list[int]:
    """The key counts a calibration checks for one head size."""
    limit = DECODE_LIMIT // dim
    beyond = range(EVERY_LENGTH_UNTIL + 61, limit + 1, 61)
    return sorted({*range(1, min(limit, EVERY_LENGTH_UNTIL) + 1), *beyond, limit})


def probe_inputs(dim: int, seed: int):
    """One query per head (3 heads sharing a KV head) over a key cache as long as the limit allows."""
    length = DECODE_LIMIT // dim
    parts = mx.random.split(mx.random.key(seed), 3)
    queries = mx.random.normal((1, 3, 1, dim), key=parts[0]) * 2
    keys = mx.random.normal((1, 1, length, dim), key=parts[1])
    values = mx.random.normal((1, 1, length, dim), key=parts[2])
    return queries, keys, values


def agrees(module, sums: BlasSums, queries, keys, values, lengths) -> bool:
    """Whether the fused kernel with ``sums`` equals MLX's attention over each prefix length of the keys."""
    scale = queries.shape[-1] ** -0.5
    results = []
    for length in lengths:
        k, v = keys[:, :, :length], values[:, :, :length]  # views, as a KV cache hands them over
        ours = module.decode_attention(queries, k, v, None, 0, scale, *sums)
        theirs = mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=None)
        results.append(mx.array_equal(ours, theirs))
        if len(results) == 64:  # evaluate in groups: a lazy graph of thousands of attentions is slow to build
            if not mx.all(mx.stack(results)).item():
                return False
            results = []
    return not results or mx.all(mx.stack(results)).item()


def calibrate(module) -> BlasSums | None:
    """The rule with which ``module.decode_attention`` equals MLX's attention on every shape ``fits``
    admits, or None."""
    with mx.stream(mx.cpu):
        inputs = {dim: probe_inputs(dim, seed) for seed, dim in enumerate(HEAD_DIMS)}
        for sums in CANDIDATES:
            if all(agrees(module, sums, *inputs[dim], probe_lengths(dim)) for dim in HEAD_DIMS):
                if all(agrees(module, sums, *inputs[dim], checked_lengths(dim)) for dim in HEAD_DIMS):
                    return sums
                return None  # it fits the probes but not everywhere: no rule of ours is this BLAS's
    return None


# ---- a prefill's attention (several queries per head over at most PREFILL_KEYS[0] keys) ----------------
# There each matmul is big enough for OpenBLAS's level-3 driver (threaded or not), which adds one fma
# chain from zero over the inner dimension until the sum is longer than its GEMM_Q; the scores' inner
# dimension is the head size, the weighted values' the key count. So below this BLAS's GEMM_Q every sum is
# one chain: the fused kernel's BlasSums(0, 1, False). Above it the threaded driver cuts sums its own way,
# so a prefill with more keys keeps MLX's graph. ``calibrate_prefill`` finds the longest checked key count.
PREFILL_SUMS = BlasSums(0, 1, False)
PREFILL_KEYS = (320, 256, 192, 128, 64)  # candidate limits, longest first (x86 OpenBLAS: GEMM_Q 320)
# OpenBLAS's small-matrix scores (the transposed-A kernel: keys x queries up to 1200) add otherwise; a
# call that small stays MLX's graph (a short chat turn's prefill, a shared start's short remainder).
SMALL_SCORES = 1200
# (queries, keys) pairs checked besides queries == keys at every key count: a shared start's pass and
# a prompt's remainder after it, whose queries are fewer than their keys
PREFILL_PAIRS = ((24, 64), (24, 150), (40, 100), (9, 300), (100, 257), (200, 320), (129, 192))


def fits_prefill(limit: int, queries: mx.array, keys: mx.array) -> bool:
    """Whether the fused kernel was checked for a prefill of these shapes under ``limit``
    (``calibrate_prefill``'s outcome; 0: none)."""
    return prefill_shape_fits(limit, queries.shape[2], keys.shape[2], queries.shape[-1])


def prefill_shape_fits(limit: int, count: int, length: int, dim: int) -> bool:
    """``fits_prefill`` for ``count`` queries a head over ``length`` keys of head size ``dim``."""
    return count > 1 and dim in HEAD_DIMS and length <= limit and count * length > SMALL_SCORES


def prefill_shapes(limit: int) -> list[tuple[int, int]]:
    """(queries, keys) shapes a prefill calibration up to ``limit`` keys checks: every key count from the
    first past the small-matrix scores to 128 as long as its queries, every third beyond, and the pairs."""
    first = int(SMALL_SCORES ** 0.5) + 1
    lengths = sorted({*range(first, min(limit, 128) + 1), *range(129, limit + 1, 3), limit})
    return [(n, n) for n in lengths] + [(q, k) for q, k in PREFILL_PAIRS if k <= limit and q * k > SMALL_SCORES]


def agrees_prefill(module, dim: int, shapes, seed: int, sums: BlasSums = PREFILL_SUMS) -> bool:
    """Whether the fused kernel with ``sums`` equals MLX's causal attention on each (queries, keys)."""
    scale = dim ** -0.5
    longest = max(k for _, k in shapes)
    parts = mx.random.split(mx.random.key(seed), 3)
    queries = mx.random.normal((1, 3, longest, dim), key=parts[0]) * 2
    keys = mx.random.normal((1, 1, longest, dim), key=parts[1])
    values = mx.random.normal((1, 1, longest, dim), key=parts[2])
    results = []
    for count, length in shapes:
        q, k, v = queries[:, :, :count], keys[:, :, :length], values[:, :, :length]
        ours = module.decode_attention(q, k, v, None, 3, scale, *sums)
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        results.append(mx.array_equal(ours, theirs))
    return mx.all(mx.stack(results)).item()


def calibrate_prefill(module) -> int:
    """The longest of ``PREFILL_KEYS`` up to which the fused kernel equals MLX's attention on every prefill
    shape checked (both head sizes), or 0: then every prefill keeps MLX's graph."""
    with mx.stream(mx.cpu):
        for limit in PREFILL_KEYS:
            if all(agrees_prefill(module, dim, prefill_shapes(limit), seed) for seed, dim in enumerate(HEAD_DIMS)):
                return limit
    return 0
