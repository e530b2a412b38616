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
None when no candidate gives MLX's bits: the attention then stays MLX's graph. A prefill's attention
has two more calibrations: up to how many keys its sums are one chain (``calibrate_prefill``), and the
cut the BLAS's drivers make past that, call by call (``calibrate_long_prefill``).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class BlasSums(NamedTuple):
    """One candidate rule (``cpu_kernels.cpp``: ``BlasSums``), in the kernel's argument order."""

    block: int  # OpenBLAS's GEMM_Q, where its level-3 driver cuts inner sums (0: one chain)
    unroll: int  # its GEMM_UNROLL_M, which rounds the block before the last
    small_scores: bool  # scores within its small-matrix permit take sgemm_small_kernel_tn's sums
    threaded: bool = False  # the threaded driver's cut: the block before the last is half, rounded up

    def describe(self) -> str:
        cut = f"cut at {self.block}, unroll {self.unroll}" if self.block else "uncut"
        cut += ", threaded driver" if self.block and self.threaded else ""
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
# one chain: the fused kernel's BlasSums(0, 1, False). Above it the drivers cut sums (``LongPrefill`` below).
# ``calibrate_prefill`` finds the longest checked key count.
PREFILL_SUMS = BlasSums(0, 1, False)
PREFILL_KEYS = (320, 256, 192, 128, 64)  # candidate limits, longest first (x86 OpenBLAS: GEMM_Q 320)
# OpenBLAS's small-matrix scores (the transposed-A kernel: keys x queries up to 1200) add otherwise; a
# call that small stays MLX's graph (a short chat turn's prefill, a shared start's short remainder).
SMALL_SCORES = 1200
# (queries, keys) pairs checked besides queries == keys at every key count: a shared start's pass and
# a prompt's remainder after it, whose queries are fewer than their keys
PREFILL_PAIRS = ((24, 64), (24, 150), (40, 100), (9, 300), (100, 257), (200, 320), (129, 192))


def prefill_shape_fits(limit: int, count: int, length: int, dim: int) -> bool:
    """Whether the fused kernel was checked for a prefill of ``count`` queries a head over ``length`` keys
    of head size ``dim`` under ``limit`` (``calibrate_prefill``'s outcome; 0: none)."""
    return count > 1 and dim in HEAD_DIMS and length <= limit and count * length > SMALL_SCORES


def prefill_shapes(limit: int) -> list[tuple[int, int]]:
    """(queries, keys) shapes a prefill calibration up to ``limit`` keys checks: every key count from the
    first past the small-matrix scores to 128 as long as its queries, every third beyond, and the pairs."""
    first = int(SMALL_SCORES ** 0.5) + 1
    lengths = sorted({*range(first, min(limit, 128) + 1), *range(129, limit + 1, 3), limit})
    return [(n, n) for n in lengths] + [(q, k) for q, k in PREFILL_PAIRS if k <= limit and q * k > SMALL_SCORES]


def agrees_prefill(module, dim: int, shapes, seed: int, sums: BlasSums | LongPrefill = PREFILL_SUMS) -> bool:
    """Whether the fused kernel equals MLX's causal attention on each (queries, keys), stopping at the
    first that differs. ``sums``: the same for every shape, or a ``LongPrefill`` that picks each call's."""
    scale = dim ** -0.5
    longest = max(k for _, k in shapes)
    parts = mx.random.split(mx.random.key(seed), 3)
    queries = mx.random.normal((1, 3, longest, dim), key=parts[0]) * 2
    keys = mx.random.normal((1, 1, longest, dim), key=parts[1])
    values = mx.random.normal((1, 1, longest, dim), key=parts[2])
    for count, length in shapes:
        q, k, v = queries[:, :, :count], keys[:, :, :length], values[:, :, :length]
        call = sums.sums(count, length, dim) if isinstance(sums, LongPrefill) else sums
        ours = module.decode_attention(q, k, v, None, 3, scale, *call)
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        if not mx.array_equal(ours, theirs).item():
            return False
    return True


def calibrate_prefill(module) -> int:
    """The longest of ``PREFILL_KEYS`` up to which the fused kernel equals MLX's attention on every prefill
    shape checked (both head sizes), or 0: then every prefill keeps MLX's graph."""
    with mx.stream(mx.cpu):
        for limit in PREFILL_KEYS:
            if all(agrees_prefill(module, dim, prefill_shapes(limit), seed) for seed, dim in enumerate(HEAD_DIMS)):
                return limit
    return 0


# ---- a prefill over more keys than PREFILL_KEYS[0]: the BLAS's cut, matched per call --------------------
# Past its GEMM_Q a prefill's weighted values (M·N·K = queries x head size x keys per query head) are cut
# into blocks by whichever driver OpenBLAS picks for that call: its small-matrix kernel up to 100^3 (AVX-512
# builds: one chain), its one-thread driver up to THREAD_WORK (the block before the last rounded to
# GEMM_UNROLL_M), its threaded driver beyond (halved, rounded up) when it runs on more than one thread.
# ``LongPrefill`` holds that rule's numbers; ``calibrate_long_prefill`` finds them by trying candidates
# against MLX on shapes that tell them apart, then checks the match over every 41st key count (about 1.5 s
# on a 2-core CPU, once per machine).
LONG_PREFILL_KEYS = 1024
THREAD_WORK = 65536 * 4  # OpenBLAS's SMP_THRESHOLD_MIN x GEMM_MULTITHREAD_THRESHOLD (interface/gemm.c)
# OpenBLAS's x86-64 small-matrix permit (M·N·K; AVX-512 builds): products up to it may take a small-matrix
# kernel's sums. The one figure for every product here (the packed projections, a shared start's pass).
SMALL_WORK = 100 ** 3


class LongPrefill(NamedTuple):
    """How this machine's BLAS adds a prefill's weighted values over more keys than one chain covers."""

    keys: int  # the most keys checked
    block: int  # GEMM_Q
    unroll: int  # GEMM_UNROLL_M
    small_work: int  # products up to this M·N·K take the small-matrix kernel (one chain); 0: none
    threaded: bool  # products past THREAD_WORK take the threaded driver

    def sums(self, count: int, length: int, dim: int) -> BlasSums:
        """The sums of a prefill call of ``count`` queries a head over ``length`` keys of size ``dim``."""
        work = count * length * dim
        if length <= self.block or work <= self.small_work:
            return PREFILL_SUMS
        return BlasSums(self.block, self.unroll, False, self.threaded and work > THREAD_WORK)

    def describe(self) -> str:
        driver = "threaded driver" if self.threaded else "one-thread driver"
        small = ", small products one chain" if self.small_work else ""
        return f"up to {self.keys} keys cut at {self.block} ({driver}{small})"


LONG_CANDIDATES = tuple(LongPrefill(LONG_PREFILL_KEYS, block, unroll, small, threaded)
                        for small in (SMALL_WORK, 0) for threaded in (True, False)
                        for block in (320, 256, 384, 448, 512) for unroll in (16, 8))
# (queries, keys) that tell the candidates apart at head size 64: squares between one and two blocks
# (where the drivers round the cut differently) and past two; few queries on either side of the small
# kernel's permit (39 x 400 x 64 is under 100^3, 40 x 400 x 64 over) and of the threaded driver's
LONG_PROBES = ((333, 333), (400, 400), (449, 449), (641, 641), (700, 700), (39, 400), (40, 400), (9, 341),
               (12, 351), (24, 700), (100, 333), (200, 1024))


def long_prefill_shapes(keys: int, dim: int) -> list[tuple[int, int]]:
    """(queries, keys) a long-prefill calibration checks: squares over every 41st key count past the
    one-chain limit (odd and even), fewer queries over a few key counts (a shared start's pass and its
    remainder), the probes scaled to ``dim``."""
    first = PREFILL_KEYS[0] + 1
    squares = [(n, n) for n in sorted({*range(first, keys + 1, 41), keys})]
    few = [(q, k) for k in (first, 400, 517, keys) for q in range(2, 80, 11)]
    return [(q, k) for q, k in squares + few + long_probes(dim) if k <= keys and q * k > SMALL_SCORES]


def long_probes(dim: int) -> list[tuple[int, int]]:
    """``LONG_PROBES`` for head size ``dim``: as many query x head-size products on either side of the
    drivers' thresholds (the queries scaled from 64), each past the small-matrix scores."""
    scaled = ((max(2, q * 64 // dim), k) for q, k in LONG_PROBES)
    return [(q, k) for q, k in scaled if q * k > SMALL_SCORES]


def calibrate_long_prefill(module) -> LongPrefill | None:
    """The rule with which the fused kernel equals MLX's attention on every long-prefill shape checked
    (both head sizes), or None: then prefills past ``PREFILL_KEYS[0]`` keys keep MLX's graph. Not tried
    with the scalar reference loops (``MLX_MED_KERNELS=scalar``), no faster than the graph on long prompts."""
    if module.isa() == "scalar":
        return None
    with mx.stream(mx.cpu):
        for rule in LONG_CANDIDATES:
            if all(agrees_prefill(module, dim, long_probes(dim), seed, rule) for seed, dim in enumerate(HEAD_DIMS)):
                checked = all(agrees_prefill(module, dim, long_prefill_shapes(rule.keys, dim), seed + 2, rule)
                              for seed, dim in enumerate(HEAD_DIMS))
                return rule if checked else None
    return None


def prefill_sums(limit: int, long: LongPrefill | None, queries: mx.array, keys: mx.array) -> BlasSums | None:
    """The sums with which the fused kernel gives MLX's bits for this prefill call, or None (not checked:
    MLX's graph). ``limit``: ``calibrate_prefill``'s one-chain limit; ``long``: ``calibrate_long_prefill``'s."""
    count, length, dim = queries.shape[2], keys.shape[2], queries.shape[-1]
    if prefill_shape_fits(limit, count, length, dim):
        return PREFILL_SUMS
    if long is not None and prefill_shape_fits(long.keys, count, length, dim):
        return long.sums(count, length, dim)
    return None


# ---- a training step's attention (no cache: its gradient is asked for) -----------------------------------
# MLX's autodiff of the attention graph runs four more matmuls per query head (dP = dout @ v^T, dv = P^T @
# dout, dq from dS @ k, dk from qs^T @ dS), whose inner dimensions are the head size, the queries and the
# keys: below the BLAS's GEMM_Q each of their sums is one fma chain from zero, as a prefill's are; past it
# the drivers cut them, and with as many queries as keys (a training step's attention) every product of a
# call has the same M·N·K, so the long prefill's rule (``LongPrefill.sums``) cuts them all. ``cpu_kernels.cpp``'s
# ``attention_vjp`` adds them so (the forward is the fused prefill kernel). Only products past OpenBLAS's
# small-matrix permit are fused: below it MLX's graph adds differently when keys and values come as a model
# hands them over (heads transposed out of (B, L, heads, D), not rows of a cache). ``calibrate_training``
# finds up to how many keys the forward and the gradients equal MLX's own on every shape checked, in both
# layouts.
TRAINING_PAIRS = ((100, 257), (129, 192), (64, 300))  # fewer queries than keys (aligned to the last keys)
TRAINING_PROBES = (127, 128, 129, 191, 192, 193, 255, 256, 257, 319, 320)  # either side of a block
# past the one-chain limit (as many queries as keys): either side of a cut's rounding (GEMM_UNROLL_M) and of
# two blocks, the longest checked, and every 61st between
LONG_TRAINING_PROBES = (321, 333, 384, 385, 400, 449, 639, 640, 641, 700, LONG_PREFILL_KEYS)


def training_shape_fits(limit: int, count: int, length: int, dim: int) -> bool:
    """Whether a causal attention of ``count`` queries a head over ``length`` keys of size ``dim`` without a
    cache is fused under ``limit`` (``calibrate_training``'s outcome; 0: none). Past the one-chain keys
    (``PREFILL_KEYS[0]``) only with as many queries as keys: the cut was checked for nothing else."""
    if length > PREFILL_KEYS[0] and count != length:
        return False
    return prefill_shape_fits(limit, count, length, dim) and count * length * dim > SMALL_WORK


def training_sums(long: LongPrefill | None, count: int, length: int, dim: int) -> BlasSums:
    """How the fused training attention adds the sums of a call of ``count`` queries over ``length`` keys:
    one chain each within the one-chain keys, the long prefill's cut past them."""
    return long.sums(count, length, dim) if long is not None and length > PREFILL_KEYS[0] else PREFILL_SUMS


def training_shapes(limit: int, dim: int) -> list[tuple[int, int]]:
    """(queries, keys) a training calibration up to ``limit`` keys checks for head size ``dim``: every 7th
    key count from the first past the small-matrix permit, the probes, the pairs."""
    first = next(n for n in range(1, limit + 2) if n * n * dim > SMALL_WORK)
    lengths = sorted({*range(first, limit + 1, 7), *(n for n in TRAINING_PROBES if first <= n <= limit), limit})
    shapes = [(n, n) for n in lengths] + [(q, k) for q, k in TRAINING_PAIRS if k <= limit]
    return [(q, k) for q, k in shapes if training_shape_fits(limit, q, k, dim)]


def long_training_shapes(dim: int) -> list[tuple[int, int]]:
    """(queries, keys) a training calibration past the one-chain keys checks: squares at the probes and
    every 61st key count up to ``LONG_PREFILL_KEYS``."""
    lengths = sorted({*LONG_TRAINING_PROBES, *range(PREFILL_KEYS[0] + 1, LONG_PREFILL_KEYS + 1, 61)})
    return [(n, n) for n in lengths if training_shape_fits(LONG_PREFILL_KEYS, n, n, dim)]


def agrees_training(module, dim: int, shapes, seed: int, long: LongPrefill | None = None) -> bool:
    """Whether the fused forward and ``module.attention_vjp`` equal MLX's causal attention and its gradients
    on each (queries, keys) (two batch rows, three query heads sharing a KV head; keys and values laid out
    as a cache's rows and as a model's transposed heads, shape by shape), stopping at the first that differs;
    past the one-chain keys with ``long``'s cut (``training_sums``)."""
    scale = dim ** -0.5
    longest = max(k for _, k in shapes)
    parts = mx.random.split(mx.random.key(seed), 4)
    queries = mx.random.normal((2, 3, longest, dim), key=parts[0]) * 2
    cotangent = mx.random.normal((2, 3, longest, dim), key=parts[3])
    as_rows = [mx.random.normal((2, 1, longest, dim), key=key) for key in parts[1:3]]
    as_heads = [mx.random.normal((2, longest, 1, dim), key=key).transpose(0, 2, 1, 3) for key in parts[1:3]]

    def mlx_attention(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    for i, (count, length) in enumerate(shapes):
        q, c = queries[:, :, :count], cotangent[:, :, :count]
        k, v = (x[:, :, :length] for x in (as_rows, as_heads)[i % 2])
        sums = training_sums(long, count, length, dim)
        ours = [module.decode_attention(q, k, v, None, 3, scale, *sums),
                *module.attention_vjp(q, k, v, c, scale, sums.block, sums.unroll, sums.threaded)]
        output, grads = mx.vjp(mlx_attention, [q, k, v], [c])
        if not all(mx.array_equal(a, b).item() for a, b in zip(ours, output + grads)):
            return False
    return True


def calibrate_training(module, prefill_limit: int, long: LongPrefill | None = None) -> int:
    """The longest of ``PREFILL_KEYS`` within ``prefill_limit`` (the forward's, ``calibrate_prefill``) up to
    which the fused forward and gradient equal MLX's on every training shape checked (both head sizes), or
    0: then a training step's attention keeps MLX's graph. Where that is the whole one-chain limit and the
    long prefill's cut was found (``long``), ``LONG_PREFILL_KEYS`` if the gradients past it match with that
    cut too."""
    with mx.stream(mx.cpu):
        for limit in (n for n in PREFILL_KEYS if n <= prefill_limit):
            if all(agrees_training(module, dim, training_shapes(limit, dim), seed) for seed, dim in enumerate(HEAD_DIMS)):
                break
        else:
            return 0
        if limit < PREFILL_KEYS[0] or long is None:
            return limit
        past = all(agrees_training(module, dim, long_training_shapes(dim), seed + 2, long)
                   for seed, dim in enumerate(HEAD_DIMS))
        return LONG_PREFILL_KEYS if past else limit


def training_call_sums(limit: int, long: LongPrefill | None, queries: mx.array, keys: mx.array) -> BlasSums | None:
    """The sums with which a causal attention without a cache takes the fused kernel and its gradient, or
    None (MLX's graph). ``limit``: ``calibrate_training``'s; ``long``: ``calibrate_long_prefill``'s."""
    count, length, dim = queries.shape[2], keys.shape[2], queries.shape[-1]
    if not training_shape_fits(limit, count, length, dim):
        return None
    return training_sums(long, count, length, dim)
