"""mlx-med's vectorized CPU kernels: built here, and bit for bit MLX's values and gradients.

Every comparison is exact (``array_equal``): the kernels' contract is MLX's own arithmetic, so the
pipeline's greedy outputs and metrics do not move when they are switched on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_med.kernels import cpu_kernels
from mlx_med.kernels.build import unsupported_reason
from mlx_med.kernels.install import ORIGINALS, CoreWithKernels, generate_module, uninstall
from mlx_med.kernels.ops import attention

UNSUPPORTED = unsupported_reason()
pytestmark = pytest.mark.skipif(UNSUPPORTED is not None, reason=f"kernels not built here: {UNSUPPORTED}")


@pytest.fixture(scope="module")
def kernels():
    found, reason = cpu_kernels()
    assert found is not None, f"the kernels must build and match MLX on Linux x86-64: {reason}"
    return found


def same(a, b) -> bool:
    return mx.array_equal(a, b, equal_nan=True).item()


def test_swiglu_and_softmax_equal_mlx_on_every_kind_of_value(kernels):
    from mlx_lm.models.activations import swiglu

    special = mx.array([0.0, -0.0, 1e-38, -1e-38, 1e-45, 0.5, -0.5, 0.49999997, -0.49999997, 87.99, 88.0,
                        -88.0, 88.00001, -88.00001, 1e4, -1e4, float("inf"), -float("inf"), float("nan")])
    # Every exponent the polynomial sees, and random mantissas: 1M values over (-120, 120).
    wide = mx.random.uniform(-120, 120, (1000, 1000), key=mx.random.key(3))
    for gate in (special, wide, wide[:, 3:997]):  # odd widths take the scalar tail
        up = mx.random.normal(gate.shape, key=mx.random.key(4))
        assert same(kernels.swiglu(gate, up), swiglu(gate, up))
    for scores in (wide[:50] / 4, wide[:, :13], mx.where(wide[:8] > 100, -mx.inf, wide[:8]),
                   mx.broadcast_to(special, (3, special.size)), wide.T[:, :200]):  # transposed: not contiguous
        assert same(kernels.softmax(scores), mx.softmax(scores, axis=-1, precise=True))
    assert kernels.isa in ("avx2+fma, avx512f attention", "avx2+fma", "scalar")


def test_swiglu_gradients_equal_mlx_autodiff(kernels):
    from mlx_lm.models.activations import swiglu

    gate = mx.random.normal((33, 70), key=mx.random.key(5)) * 6
    up = mx.random.normal((33, 70), key=mx.random.key(6))
    weights = mx.random.normal((33, 70), key=mx.random.key(7))

    def grads(fn):
        return mx.grad(lambda g, u: (fn(g, u) * weights).sum(), argnums=(0, 1))(gate, up)

    for ours, theirs in zip(grads(kernels.swiglu), grads(swiglu)):
        assert same(ours, theirs)


def test_logsumexp_and_cross_entropy_equal_mlx_values_and_gradients(kernels):
    from mlx_med.kernels import cross_entropy, logsumexp

    logits = mx.random.normal((4, 7, 1001), key=mx.random.key(8)) * 9
    edge = mx.array([[0.0] * 5, [-mx.inf] * 5, [mx.inf, 1.0, 2.0, 3.0, 4.0], [float("nan"), 1.0, 2.0, 3.0, 4.0],
                     [1e30, -1e30, 0.0, 88.0, -88.0]])
    for x in (logits, edge, logits[..., ::2]):  # the strided view is copied first
        assert same(logsumexp(x), mx.logsumexp(x, axis=-1))
        assert same(logsumexp(x, keepdims=True), mx.logsumexp(x, axis=-1, keepdims=True))
    targets = mx.random.randint(0, 1001, (4, 7), key=mx.random.key(9))
    for reduction in ("none", "sum", "mean"):
        ours = cross_entropy(logits, targets, reduction=reduction)
        assert same(ours, nn.losses.cross_entropy(logits, targets, reduction=reduction))
    weights = mx.random.uniform(shape=(4, 7), key=mx.random.key(10))

    def gradient(loss):
        return mx.grad(lambda x: (loss(x, targets) * weights).sum())(logits)

    assert same(gradient(cross_entropy), gradient(nn.losses.cross_entropy))
    assert same(mx.grad(lambda x: (logsumexp(x) * weights).sum())(logits),
                mx.grad(lambda x: (mx.logsumexp(x, axis=-1) * weights).sum())(logits))


def test_fused_cross_entropy_equals_mlx_on_every_target_form(kernels):
    from mlx_med.kernels import cross_entropy

    # the SFT loss's 2-D (positions, vocab) logits, large enough to be split over threads
    logits = mx.random.normal((300, 2003), key=mx.random.key(20)) * 7
    weights = mx.random.uniform(shape=(300,), key=mx.random.key(21))
    for targets in (mx.random.randint(0, 2003, (300,), key=mx.random.key(22)),
                    mx.random.randint(-2003, 0, (300,), key=mx.random.key(23)),  # counted from the end, as MLX
                    mx.random.randint(0, 2003, (300,), key=mx.random.key(24)).astype(mx.uint32)):
        assert same(cross_entropy(logits, targets), nn.losses.cross_entropy(logits, targets))
        ours = mx.grad(lambda x, t=targets: (cross_entropy(x, t) * weights).sum())(logits)
        theirs = mx.grad(lambda x, t=targets: (nn.losses.cross_entropy(x, t) * weights).sum())(logits)
        assert same(ours, theirs)
    # a target outside the vocabulary: NaN for that row (MLX would read outside the row), the rest exact
    targets = mx.array([1, 5000, 3])
    loss = cross_entropy(logits[:3], targets)
    assert mx.isnan(loss[1]).item() and same(loss[::2], nn.losses.cross_entropy(logits[:3:2], targets[::2]))
    # probabilities as targets are MLX's work
    probabilities = mx.softmax(mx.random.normal((4, 9), key=mx.random.key(25)), axis=-1)
    small = logits[:4, :9]
    assert same(cross_entropy(small, probabilities), nn.losses.cross_entropy(small, probabilities))


def test_rms_norm_equals_mlx_values_and_gradients(kernels):
    x = mx.random.normal((3, 40, 96), key=mx.random.key(40)) * 4
    x[0, 0] = 0.0  # r = 1 / sqrt(eps)
    x[1, 1] = 1e19  # the squares overflow: inf, 0 * inf
    weight = mx.random.normal((96,), key=mx.random.key(41))
    cotangent = mx.random.normal(x.shape, key=mx.random.key(42))
    for eps in (1e-5, 1e-6):
        def theirs(x, w, eps=eps):
            return mx.fast.rms_norm(x, w, eps)

        ours = kernels.rms_norm(eps)
        for xs in (x, x[:, ::2], x.transpose(1, 0, 2)):  # strided and transposed views are copied first
            assert same(ours(xs, weight), theirs(xs, weight))
        _, grads_ours = mx.vjp(ours, [x, weight], [cotangent])
        _, grads_theirs = mx.vjp(theirs, [x, weight], [cotangent])
        for a, b in zip(grads_ours, grads_theirs, strict=True):
            assert same(a, b)


@pytest.mark.parametrize("offset", [0, 513, "per-row"])
@pytest.mark.parametrize("dims, base, scale", [(32, 10000.0, 1.0), (24, 1e5, 0.25)])
def test_rope_equals_mlx_values_and_gradients(kernels, offset, dims, base, scale):
    x = mx.random.normal((3, 4, 6, 32), key=mx.random.key(43)) * 3
    offsets = mx.array([0, 5, 900]) if offset == "per-row" else offset

    def theirs(x):
        return mx.fast.rope(x, dims, traditional=False, base=base, scale=scale, offset=offsets)

    rope = kernels.rope(dims, base, scale)

    def ours(x):
        return rope(x, offsets if isinstance(offsets, mx.array) else mx.array(offsets, dtype=mx.int32))

    for xs in (x, x.transpose(0, 2, 1, 3)):  # mlx-lm passes the (B, L, H, D) projection transposed
        assert same(ours(xs), theirs(xs))
    cotangent = mx.random.normal(x.shape, key=mx.random.key(44))
    assert same(mx.vjp(ours, [x], [cotangent])[1][0], mx.vjp(theirs, [x], [cotangent])[1][0])


def test_norm_and_rope_layers_take_the_kernels_and_give_them_back(kernels):
    from mlx_lm.models.rope_utils import Llama3RoPE

    from mlx_med.kernels.install import KernelRMSNorm, KernelRoPE, install_layers

    model = nn.Module()
    model.norm, model.rope = nn.RMSNorm(16), nn.RoPE(8, base=10000.0)
    model.llama3 = Llama3RoPE(8, base=10000.0, scaling_config={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    before = dict(nn.utils.tree_flatten(model.parameters()))
    assert install_layers(model, kernels) == ["RMSNorm", "RoPE"]
    assert isinstance(model.norm, KernelRMSNorm) and isinstance(model.rope, KernelRoPE)
    assert type(model.llama3) is Llama3RoPE  # its own frequencies: MLX's
    assert dict(nn.utils.tree_flatten(model.parameters())).keys() == before.keys()
    x = mx.random.normal((2, 3, 5, 16), key=mx.random.key(45))
    assert same(model.norm(x), mx.fast.rms_norm(x, model.norm.weight, model.norm.eps))
    assert same(model.norm(x.astype(mx.bfloat16)), mx.fast.rms_norm(x.astype(mx.bfloat16), model.norm.weight,
                                                                     model.norm.eps))
    uninstall(model)
    assert type(model.norm) is nn.RMSNorm and type(model.rope) is nn.RoPE


def test_kernel_threads_follow_the_cpu_affinity_or_the_environment(kernels):
    assert kernels.module.threads() == max(1, min(len(os.sched_getaffinity(0)), 8))
    code = ("import mlx_med; from mlx_med.kernels import cpu_kernels; k, why = cpu_kernels(); "
            "print(k.module.threads() if k else 0, why, sep='\\n')")
    default = str(kernels.module.threads())
    # the self-check (large inputs included) passes with any split; a value that is not a whole
    # number >= 1 leaves the default, and the kernels' status line (doctor's) says it was ignored
    for value, threads in (("1", "1"), ("3", "3"), (" 2 ", "2"), ("abc", default), ("2abc", default),
                           ("0", default), ("-3", default)):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MLX_MED_KERNEL_THREADS": value})
        assert done.returncode == 0, done.stderr
        used, why = done.stdout.strip().split("\n")
        assert used == threads, (value, done.stdout)
        assert (f"MLX_MED_KERNEL_THREADS={value} ignored" in why) == (threads == default and value.strip() != default)


def test_other_dtypes_and_devices_use_mlx_without_loading_the_kernels(monkeypatch):
    import mlx_med.kernels as kernels_module

    def must_not_load():
        raise AssertionError("the kernels were loaded for work they do not take")

    monkeypatch.setattr(kernels_module, "cpu_kernels", must_not_load)
    logits = mx.random.normal((3, 50), key=mx.random.key(12)).astype(mx.bfloat16)
    targets = mx.array([1, 7, 49])
    assert same(kernels_module.cross_entropy(logits, targets), nn.losses.cross_entropy(logits, targets))
    assert same(kernels_module.logsumexp(logits), mx.logsumexp(logits, axis=-1))


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("q_len", [1, 5, 9])  # 9: as many queries as keys (prefill, training)
@pytest.mark.parametrize("mask_kind", [None, "causal", "bool", "additive"])
def test_attention_equals_mlx_fast_sdpa_values_and_gradients(kernels, n_kv_heads, q_len, mask_kind):
    batch, heads, keys_len, dim = 3, 4, 9, 16
    key = mx.random.split(mx.random.key(11), 4)
    q = mx.random.normal((batch, heads, q_len, dim), key=key[0])
    k = mx.random.normal((batch, n_kv_heads, keys_len, dim), key=key[1])
    v = mx.random.normal((batch, n_kv_heads, keys_len, dim), key=key[2])
    if mask_kind == "bool":  # left padding, as mlx-lm's batch KV cache makes it
        mask = mx.arange(keys_len)[None, None, None, :] >= mx.array([0, 2, 4])[:, None, None, None]
    elif mask_kind == "additive":
        mask = mx.random.normal((q_len, keys_len), key=key[3])
    else:
        mask = mask_kind
    scale = dim ** -0.5

    def ours(q, k, v):
        return attention(kernels, q, k, v, scale, mask)

    def theirs(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    assert same(ours(q, k, v), theirs(q, k, v))
    cotangent = mx.random.normal(q.shape, key=key[3])
    _, grads_ours = mx.vjp(ours, [q, k, v], [cotangent])
    _, grads_theirs = mx.vjp(theirs, [q, k, v], [cotangent])
    for a, b in zip(grads_ours, grads_theirs):
        assert same(a, b)


@pytest.fixture
def fused_only(monkeypatch):
    """Fail any attention that falls back to MLX's graph: the fused decode kernel must take it."""
    import mlx_med.kernels.ops as ops

    def graph_attention(*args, **kwargs):
        raise AssertionError("took MLX's attention graph, not the fused decode kernel")

    monkeypatch.setattr(ops, "graph_attention", graph_attention)


def decode_mask(kind, batch: int, length: int, key):
    if kind == "bool":  # left padding, as mlx-lm's batch KV cache makes it (one row sees a single key)
        padding = mx.array([0, length // 3, length - 1][:batch])
        return mx.arange(length)[None, None, None, :] >= padding[:, None, None, None]
    if kind == "additive":
        return mx.random.normal((1, 1, 1, length), key=key) * 3
    return kind


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 2), (10, 2)])  # 3, 1, 3 + 1, 3 + 2 rows per KV head
@pytest.mark.parametrize("mask_kind", [None, "causal", "bool", "additive"])
def test_decode_attention_equals_mlx_over_cache_views(kernels, fused_only, dim, heads, kv_heads, mask_kind):
    from mlx_med.kernels.attention_sums import DECODE_LIMIT

    assert kernels.attention_sums is not None, "this machine's BLAS must be matched (python -m mlx_med.kernels)"
    batch, longest = 3, DECODE_LIMIT // dim
    key = mx.random.split(mx.random.key(dim + heads), 4)
    q = mx.random.normal((batch, heads, 1, dim), key=key[0]) * 2
    # a KV cache with room to spare: the attention gets views of its first `length` positions
    cache_k, cache_v = (mx.random.normal((batch, kv_heads, longest + 9, dim), key=k) for k in key[1:3])
    scale = dim ** -0.5
    # 321, 700: longer than OpenBLAS's GEMM_Q on x86 (sums cut); 1199, 1201: either side of its AVX-512
    # small-matrix scores (1199: a partial group of four keys)
    for length in (1, 40, 321, 700, 1199, 1201, longest):
        k, v = cache_k[:, :, :length], cache_v[:, :, :length]
        mask = decode_mask(mask_kind, batch, length, key[3])
        assert same(attention(kernels, q, k, v, scale, mask),
                    mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)), length


def test_decode_attention_skips_only_what_every_row_masks(kernels, fused_only):
    """The kernel does not read the keys all query heads of a KV head mask out before their first visible
    one (left padding); heads with other prefixes, and a row that sees nothing, must still be MLX's."""
    batch, heads, kv_heads, length, dim = 3, 6, 2, 700, 64
    key = mx.random.split(mx.random.key(33), 3)
    q = mx.random.normal((batch, heads, 1, dim), key=key[0]) * 2
    k, v = (mx.random.normal((batch, kv_heads, length, dim), key=x) for x in key[1:3])
    # per (row, head) padding: heads of one KV head with different prefixes (the shortest one counts),
    # on both sides of OpenBLAS's GEMM_Q cut; batch row 2's first head masks every key
    padding = mx.array([[0, 5, 9, 330, 331, 640], [400, 333, 12, 699, 321, 500], [700, 650, 1, 2, 3, 4]])
    mask = mx.arange(length)[None, None, None, :] >= padding[:, :, None, None]
    scale = dim ** -0.5
    assert same(attention(kernels, q, k, v, scale, mask),
                mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))


def test_decode_attention_gradients_are_mlx_s(kernels):
    batch, heads, kv_heads, length, dim = 2, 6, 2, 500, 64
    key = mx.random.split(mx.random.key(21), 4)
    q = mx.random.normal((batch, heads, 1, dim), key=key[0])
    k, v = (mx.random.normal((batch, kv_heads, length, dim), key=x) for x in key[1:3])
    mask = decode_mask("bool", batch, length, None)
    scale = dim ** -0.5
    cotangent = mx.random.normal(q.shape, key=key[3])
    _, ours = mx.vjp(lambda *x: attention(kernels, *x, scale, mask), [q, k, v], [cotangent])
    _, theirs = mx.vjp(lambda *x: mx.fast.scaled_dot_product_attention(*x, scale=scale, mask=mask), [q, k, v],
                       [cotangent])
    for a, b in zip(ours, theirs):
        assert same(a, b)


def test_fused_attention_takes_only_the_checked_shapes():
    from mlx_med.kernels.attention_sums import DECODE_LIMIT, fits

    query = mx.zeros((2, 4, 1, 64))
    assert fits(query, mx.zeros((2, 2, DECODE_LIMIT // 64, 64)))
    assert not fits(query, mx.zeros((2, 2, DECODE_LIMIT // 64 + 1, 64)))  # beyond the checked lengths
    assert not fits(mx.zeros((2, 4, 2, 64)), mx.zeros((2, 2, 9, 64)))  # more than one query: MLX's graph
    assert not fits(mx.zeros((2, 4, 1, 16)), mx.zeros((2, 2, 9, 16)))  # a head size the calibration skips


def prefill_mask(kind, batch: int, queries: int, length: int, key):
    """A prefill's mask over `length` keys for its last `queries` positions; "bool" as mlx-lm's batch cache
    makes it (causal, and left padding of 0, a third and all but one key: that row's early queries see
    nothing, so their softmax spreads over every key)."""
    if kind == "bool":
        padding = mx.array([0, length // 3, length - 1][:batch])
        position = mx.arange(length - queries, length)[:, None]
        keys = mx.arange(length)[None]
        return (keys <= position)[None, None] & (keys >= padding[:, None, None, None])
    if kind == "additive":
        return mx.random.normal((1, 1, queries, length), key=key) * 3
    return kind


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (10, 2)])
@pytest.mark.parametrize("mask_kind", [None, "causal", "bool", "additive"])
def test_prefill_attention_equals_mlx_over_cache_views(kernels, fused_only, dim, heads, kv_heads, mask_kind):
    """A generation's prefill (a call with a KV cache) takes the fused kernel up to the calibrated key
    count: every prompt as long as its keys, and a shared start's pass and the rest of a prompt after it
    (fewer queries than keys)."""
    limit = kernels.prefill_keys
    if not limit:  # OpenBLAS's AVX2 kernels (HASWELL, ZEN) add a prefill's sums by a row's place in the call
        pytest.skip("this BLAS's prefill sums were not matched here: every prefill keeps MLX's graph")
    batch = 3
    key = mx.random.split(mx.random.key(dim + heads + 1), 4)
    q_all = mx.random.normal((batch, heads, limit, dim), key=key[0]) * 2
    cache_k, cache_v = (mx.random.normal((batch, kv_heads, limit + 7, dim), key=k) for k in key[1:3])
    scale = dim ** -0.5
    for queries, length in ((35, 35), (100, 100), (151, 151), (limit, limit), (24, 150), (9, 300), (140, 150)):
        q = q_all[:, :, :queries]
        k, v = cache_k[:, :, :length], cache_v[:, :, :length]
        mask = prefill_mask(mask_kind, batch, queries, length, key[3])
        assert same(attention(kernels, q, k, v, scale, mask, cached=True),
                    mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)), (queries, length)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("mask_kind", ["causal", "bool"])
def test_long_prefill_attention_equals_mlx_past_the_blas_cut(kernels, fused_only, monkeypatch, dim, mask_kind):
    """Past the one-chain limit a prefill takes the fused kernel under the BLAS's cut as matched here
    (``attention_sums.LongPrefill``): the same bits as MLX's graph for prompts as long as their keys, between
    one and two blocks and past two, and for fewer queries on either side of the small-matrix permit."""
    rule = kernels.long_prefill
    if rule is None:
        pytest.skip("no cut of this BLAS was matched here (its prefill sums depend on a row's place, or it "
                    "was not checked): prefills past the one-chain limit keep MLX's graph")
    import mlx_med.kernels.ops as ops

    taken = []
    original = ops.fused_attention

    def fused_attention(kernels, q, k, v, scale, mask, sums):
        taken.append(sums)
        return original(kernels, q, k, v, scale, mask, sums)

    monkeypatch.setattr(ops, "fused_attention", fused_attention)
    batch, heads, kv_heads = 3, 9, 3
    key = mx.random.split(mx.random.key(dim + 5), 3)
    q_all = mx.random.normal((batch, heads, 700, dim), key=key[0]) * 2
    cache_k, cache_v = (mx.random.normal((batch, kv_heads, 707, dim), key=k) for k in key[1:])
    scale = dim ** -0.5
    shapes = ((333, 333), (401, 401), (641, 641), (700, 700), (40 * 64 // dim, 400), (20, 700), (7, 500))
    for queries, length in shapes:
        q = q_all[:, :, :queries]
        k, v = cache_k[:, :, :length], cache_v[:, :, :length]
        mask = prefill_mask(mask_kind, batch, queries, length, None)
        assert same(attention(kernels, q, k, v, scale, mask, cached=True),
                    mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)), (queries, length)
    assert len(taken) == len(shapes), "every one of these shapes takes the fused kernel"
    assert any(sums.block for sums in taken), "and some of them the BLAS's cut"


def test_long_prefill_calibration_would_catch_another_driver(kernels):
    """The rule found here gives MLX's bits on its probes; the other driver's rounding, no small-matrix
    kernel or another GEMM_Q would not, so the calibration tells them apart."""
    from mlx_med.kernels import attention_sums

    rule = kernels.long_prefill
    if rule is None:
        pytest.skip("no cut of this BLAS was matched here: nothing to tell apart")
    probes = attention_sums.long_probes(64)
    assert attention_sums.agrees_prefill(kernels.module, 64, probes, seed=11, sums=rule)
    for other in (rule._replace(threaded=not rule.threaded), rule._replace(small_work=0 if rule.small_work else
                                                                          attention_sums.SMALL_WORK),
                  rule._replace(block=rule.block + 64)):
        assert not attention_sums.agrees_prefill(kernels.module, 64, probes, seed=11, sums=other), other


def test_long_prefill_rule_picks_the_sums_of_each_call():
    from mlx_med.kernels.attention_sums import PREFILL_SUMS, BlasSums, LongPrefill, prefill_sums

    rule = LongPrefill(1024, 320, 16, 100 ** 3, True)
    assert rule.sums(400, 400, 64) == BlasSums(320, 16, False, True)  # past the small kernel and the thread cut
    assert rule.sums(39, 400, 64) == PREFILL_SUMS  # 39 x 400 x 64 is under 100^3: the small kernel's one chain
    assert rule.sums(300, 300, 64) == PREFILL_SUMS  # within one block
    assert LongPrefill(1024, 320, 16, 0, True).sums(9, 341, 64) == BlasSums(320, 16, False, False)  # one thread

    def picked(queries, keys, limit=320, long=rule, dim=64):
        return prefill_sums(limit, long, mx.zeros((1, 3, queries, dim)), mx.zeros((1, 1, keys, dim)))

    assert picked(150, 150) == PREFILL_SUMS and picked(500, 500) == BlasSums(320, 16, False, True)
    assert picked(500, 500, long=None) is None  # no cut matched: MLX's graph
    assert picked(1025, 1025) is None  # more keys than the calibration checked
    assert picked(1, 500) is None  # one query: the decode rule decides
    assert picked(2, 500) is None  # within OpenBLAS's small-matrix scores (2 x 500 <= 1200)
    assert picked(500, 500, dim=16) is None  # a head size the calibration skips


@pytest.fixture
def training_calls(kernels, monkeypatch) -> list[tuple[int, int]]:
    """(queries, keys) of each call that takes the fused training attention, appended as it runs; a call
    without a cache must never take the prefill's (gradient-less) route."""
    import mlx_med.kernels.ops as ops

    def fused_attention(*args, **kwargs):
        raise AssertionError("a call without a cache took the generation's fused kernel")

    calls = []
    original = ops.training_attention

    def counted(kernels, queries, keys, *args):
        calls.append((queries.shape[2], keys.shape[2]))
        return original(kernels, queries, keys, *args)

    monkeypatch.setattr(ops, "fused_attention", fused_attention)
    monkeypatch.setattr(ops, "training_attention", counted)
    return calls


def mlx_attention_and_gradients(q, k, v, cotangent, scale, attend):
    return mx.vjp(lambda q, k, v: attend(q, k, v, scale=scale, mask="causal"), [q, k, v], [cotangent])


def test_attention_without_a_cache_is_fused_only_where_its_gradient_was_matched(kernels, training_calls, monkeypatch):
    """Training and scoring call attention without a cache. A causal call takes the fused forward and
    gradient where that gradient was matched here; a masked one, or any where it was not, keeps the graph.
    Either way the output and gradients are MLX's own."""
    q, k, v, cotangent = (mx.random.normal((2, 4, 150, 64), key=mx.random.key(seed)) for seed in (1, 2, 3, 4))

    def ours(q, k, v, scale, mask):
        return attention(kernels, q, k, v, scale, mask)

    theirs = mlx_attention_and_gradients(q, k, v, cotangent, 0.125, mx.fast.scaled_dot_product_attention)
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(kernels, "training_keys", 0)
        training_calls.clear()
        result = mlx_attention_and_gradients(q, k, v, cotangent, 0.125, ours)
        assert training_calls == ([(150, 150)] if fused and kernels.training_keys else [])
        assert all(same(a, b) for a, b in zip(result[0] + result[1], theirs[0] + theirs[1]))
    keep = mx.random.uniform(shape=(2, 1, 150, 150), key=mx.random.key(5)) > 0.3
    assert same(attention(kernels, q, k, v, 0.125, keep),
                mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=keep))
    assert training_calls == []


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (10, 2)])
def test_training_attention_gradients_equal_mlx_autodiff(kernels, training_calls, dim, heads, kv_heads):
    """Up to the calibrated key count a training step's causal attention (no cache) is fused forward and
    backward past OpenBLAS's small-matrix permit, and its output and its gradients w.r.t. queries, keys and
    values are MLX's to the last bit: square blocks, fewer queries than keys, keys and values laid out as the
    model hands them over (heads transposed out of (B, L, heads, D)). Smaller products keep the graph (where
    MLX's own sums depend on that layout), with the same bits. Past the one-chain keys, where the long
    prefill's cut was matched for the gradient too, square blocks take the fused kernel with that cut."""
    from mlx_med.kernels.attention_sums import PREFILL_KEYS, training_shape_fits

    limit = kernels.training_keys
    if not limit:
        pytest.skip("this BLAS's gradient sums were not matched here: training keeps MLX's graph")
    one_chain = min(limit, PREFILL_KEYS[0])
    shapes = [(36, 36), (100, 100), (151, 151), (one_chain, one_chain), (24, 150), (140, 150), (100, 257),
              (333, 333), (449, 449), (300, 400)]
    longest = max(k for _, k in shapes)
    batch, scale = 2, dim ** -0.5
    key = mx.random.split(mx.random.key(dim + heads), 4)
    q_all = mx.random.normal((batch, heads, longest, dim), key=key[0]) * 2
    k_all, v_all = (mx.random.normal((batch, longest, kv_heads, dim), key=k).transpose(0, 2, 1, 3) for k in key[1:3])
    c_all = mx.random.normal((batch, heads, longest, dim), key=key[3])

    def ours(q, k, v, scale, mask):
        return attention(kernels, q, k, v, scale, mask)

    for queries, length in shapes:
        q, c = q_all[:, :, :queries], c_all[:, :, :queries]
        k, v = k_all[:, :, :length], v_all[:, :, :length]
        result = mlx_attention_and_gradients(q, k, v, c, scale, ours)
        theirs = mlx_attention_and_gradients(q, k, v, c, scale, mx.fast.scaled_dot_product_attention)
        for name, a, b in zip(("output", "d_queries", "d_keys", "d_values"), result[0] + result[1],
                              theirs[0] + theirs[1]):
            assert same(a, b), (name, queries, length)
    fused = [(q, k) for q, k in shapes if training_shape_fits(limit, q, k, dim)]
    assert training_calls == fused and (one_chain, one_chain) in fused and (36, 36) not in fused
    assert ((449, 449) in fused) == (limit > PREFILL_KEYS[0]) and (300, 400) not in fused


def test_training_calibration_finds_this_limit_and_would_catch_another_order(kernels):
    """The calibration finds the limit the loaded kernels use, and tells a gradient whose query heads' shares
    of d_keys and d_values are added in another order (each one's own sums unchanged) from MLX's."""
    from mlx_med.kernels import attention_sums

    found = attention_sums.calibrate_training(kernels.module, kernels.prefill_keys, kernels.long_prefill)
    assert found == kernels.training_keys
    # within the one-chain keys the gradient's sums are one chain each, as the prefill's are, and past them cut
    # as the long prefill's: wherever those matched, these do
    assert found == (attention_sums.LONG_PREFILL_KEYS if kernels.long_prefill else kernels.prefill_keys)
    if not found:
        pytest.skip("this BLAS's gradient sums were not matched here: training keeps MLX's graph")

    class PerHead:
        """attention_vjp with every query head given its own copy of its KV head, then the shares folded."""

        def __init__(self, fold):
            self.fold = fold
            self.decode_attention = kernels.module.decode_attention  # the forward as loaded

        def attention_vjp(self, q, k, v, cotangent, scale, *sums):
            repeats = q.shape[1] // k.shape[1]
            expanded = [mx.repeat(x, repeats, axis=1) for x in (k, v)]
            dq, dk, dv = kernels.module.attention_vjp(q, *expanded, cotangent, scale, *sums)

            def shares(g):
                g = mx.unflatten(g, 1, (k.shape[1], repeats))
                return [g[:, :, h] for h in range(repeats)]

            return dq, self.fold(shares(dk)), self.fold(shares(dv))

    shapes = attention_sums.training_shapes(min(found, attention_sums.PREFILL_KEYS[0]), 64)
    in_order = PerHead(lambda parts: (parts[0] + parts[1]) + parts[2])
    reversed_order = PerHead(lambda parts: parts[0] + (parts[1] + parts[2]))
    assert attention_sums.agrees_training(in_order, 64, shapes, seed=7)
    assert not attention_sums.agrees_training(reversed_order, 64, shapes, seed=7)


def test_training_gradients_past_one_chain_are_cut_as_the_long_prefill_s(kernels):
    """Past the one-chain keys the gradient's sums are cut as the long prefill's rule says: the calibration
    tells that cut from one chain over every key and from the other driver's cut, with the forward right."""
    from mlx_med.kernels import attention_sums

    long = kernels.long_prefill
    if kernels.training_keys <= attention_sums.PREFILL_KEYS[0]:
        pytest.skip("the gradient past the one-chain keys was not matched here: longer blocks keep MLX's graph")

    class GradientCut:
        """The loaded kernels, with the gradient's sums cut by ``rule`` instead of the one asked for."""

        def __init__(self, rule):
            self.rule = rule
            self.decode_attention = kernels.module.decode_attention

        def attention_vjp(self, q, k, v, cotangent, scale, *asked):
            sums = self.rule.sums(q.shape[2], k.shape[2], q.shape[3])
            return kernels.module.attention_vjp(q, k, v, cotangent, scale, sums.block, sums.unroll, sums.threaded)

    shapes = attention_sums.long_training_shapes(64)
    assert attention_sums.agrees_training(GradientCut(long), 64, shapes, seed=9, long=long)
    uncut = long._replace(block=attention_sums.LONG_PREFILL_KEYS)
    other_driver = long._replace(threaded=not long.threaded)
    assert not attention_sums.agrees_training(GradientCut(uncut), 64, shapes, seed=9, long=long)
    assert not attention_sums.agrees_training(GradientCut(other_driver), 64, shapes, seed=9, long=long)


def test_prefill_calibration_finds_this_blas_limit_and_would_catch_a_cut(kernels):
    from mlx_med.kernels import attention_sums

    found = attention_sums.calibrate_prefill(kernels.module)
    assert found == kernels.prefill_keys
    shapes = attention_sums.prefill_shapes(found or attention_sums.PREFILL_KEYS[0])
    if not found:  # then not even the shortest limit agreed
        assert not attention_sums.agrees_prefill(kernels.module, 64, attention_sums.prefill_shapes(64), seed=7)
        return
    assert found in attention_sums.PREFILL_KEYS
    assert attention_sums.agrees_prefill(kernels.module, 64, shapes, seed=7)
    # sums cut into blocks shorter than the keys (a BLAS with a smaller GEMM_Q) differ on those shapes
    cut = attention_sums.BlasSums(64, 16, False)
    assert not attention_sums.agrees_prefill(kernels.module, 64, shapes, seed=7, sums=cut)


def test_fused_prefill_takes_only_the_checked_shapes():
    from mlx_med.kernels.attention_sums import SMALL_SCORES, prefill_sums

    def fits(queries, keys, dim=64, limit=320):  # no rule past the one-chain limit
        return prefill_sums(limit, None, mx.zeros((1, 3, queries, dim)), mx.zeros((1, 1, keys, dim))) is not None

    assert fits(150, 150) and fits(24, 320) and fits(2, SMALL_SCORES // 2 + 1, limit=SMALL_SCORES)
    assert not fits(1, 300)  # one query: the decode rule decides
    assert not fits(34, 34) and not fits(8, 150)  # within OpenBLAS's small-matrix scores
    assert not fits(100, 321)  # more keys than the calibration checked
    assert not fits(150, 150, limit=0)  # no limit found on this BLAS
    assert not fits(150, 150, dim=16)  # a head size the calibration skips


# what the kernels report as their instruction set when MLX_MED_KERNELS forces a narrower path
FORCED_ISA = {"avx2": "avx2+fma", "scalar": "scalar"}


def fma32(a, b, c):
    """fp32 fma through float64: the product is exact there, so only a sum's rounding can be doubled
    (one in about 2^29 sums; the inputs below are fixed)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def openblas_small_tn_scores(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The scores q @ keys^T as OpenBLAS's AVX-512 sgemm_small_kernel_tn adds them (its source, read
    op by op): 16 lane chains over the features (a partial last block's missing lanes add +0), reduced
    pairwise for keys in whole groups of four (REDUCE_4), by folding halves for the others
    (_mm512_reduce_add_ps)."""
    length, dim = keys.shape
    lanes = np.zeros((length, 16), np.float32)
    for d0 in range(0, dim, 16):
        for lane in range(16):
            d = d0 + lane
            lanes[:, lane] = fma32(q[d], keys[:, d], lanes[:, lane]) if d < dim else lanes[:, lane] + np.float32(0)
    pairwise, halves = lanes.copy(), lanes.copy()
    for width in (1, 2, 4, 8):
        pairwise[:, 0:16:2 * width] = pairwise[:, 0:16:2 * width] + pairwise[:, width:16:2 * width]
    for half in (8, 4, 2, 1):
        halves[:, :half] = halves[:, :half] + halves[:, half:2 * half]
    grouped = length & ~3
    return np.concatenate([pairwise[:grouped, 0], halves[grouped:, 0]])


@pytest.mark.parametrize("isa", ["this CPU's", "avx2", "scalar"])
def test_small_matrix_scores_are_openblas_s_on_any_blas(kernels, isa):
    """The fused kernel's small-matrix scores follow that OpenBLAS kernel's source on every machine
    (the calibration only reaches them on an AVX-512 OpenBLAS), on every code path."""
    if isa != "this CPU's" and kernels.isa != FORCED_ISA[isa]:
        # the loops are picked once per process: ask a child
        if isa == "avx2" and kernels.isa == "scalar":
            pytest.skip("this CPU has no AVX2")
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{__file__}::test_small_matrix_scores_are_openblas_s_on_any_blas[{isa}]"],
                              capture_output=True, text=True, env={**os.environ, "MLX_MED_KERNELS": isa},
                              timeout=300)
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
        return
    rng = np.random.default_rng(7)
    for dim, length in ((64, 37), (64, 300), (128, 256), (40, 45)):  # 40: a partial block of 16 lanes
        q = rng.standard_normal((1, 3, 1, dim)).astype(np.float32)
        keys = rng.standard_normal((1, 1, length, dim)).astype(np.float32)
        values = rng.standard_normal((1, 1, length, dim)).astype(np.float32)
        scale = np.float32(dim ** -0.5)
        expected = []
        for head in range(3):
            scores = openblas_small_tn_scores(scale * q[0, head, 0], keys[0, 0])
            weights = np.array(mx.softmax(mx.array(scores)))
            out = np.zeros(dim, np.float32)
            for s in range(length):  # weights @ values: one chain (no BLAS cuts a sum of at most 300)
                out = fma32(weights[s], values[0, 0, s], out)
            expected.append(out)
        ours = kernels.module.decode_attention(mx.array(q), mx.array(keys), mx.array(values), None, 0, float(scale),
                                               0, 1, True)
        assert np.array_equal(np.array(ours)[0, :, 0], np.stack(expected)), (dim, length)

    def fused(dim, length, small):
        parts = mx.random.split(mx.random.key(dim + length), 3)
        q, k, v = (mx.random.normal(shape, key=key) for shape, key in
                   zip([(1, 3, 1, dim), (1, 1, length, dim), (1, 1, length, dim)], parts))
        return kernels.module.decode_attention(q, k, v, None, 0, dim ** -0.5, 0, 1, small)

    # the permit: up to 1200 keys and from 32 features (outside it, one chain per score)
    assert not same(fused(64, 1200, True), fused(64, 1200, False))
    assert same(fused(64, 1201, True), fused(64, 1201, False))
    assert same(fused(16, 100, True), fused(16, 100, False))


def test_calibration_finds_this_blas_rule_and_would_catch_another(kernels):
    from mlx_med.kernels import attention_sums

    found = attention_sums.calibrate(kernels.module)
    assert found == kernels.attention_sums
    inputs = attention_sums.probe_inputs(64, seed=5)
    assert attention_sums.agrees(kernels.module, found, *inputs, attention_sums.probe_lengths(64))
    # the other rules (uncut sums where this BLAS cuts them, or the reverse; the small-matrix scores
    # where it has none, or the reverse) differ on the probes
    other_cut = found._replace(block=0, unroll=1) if found.block else found._replace(block=320, unroll=8)
    other_scores = found._replace(small_scores=not found.small_scores)
    for other in (other_cut, other_scores):
        assert not attention_sums.agrees(kernels.module, other, *inputs, attention_sums.probe_lengths(64)), other


@pytest.fixture
def fused_queries(kernels, monkeypatch) -> list[int]:
    """The queries per head of each call that takes the fused attention, appended as it runs (skips where
    no prefill sums of this BLAS were matched: there a prefill keeps MLX's graph)."""
    import mlx_med.kernels.ops as ops

    if not kernels.prefill_keys:
        pytest.skip("no prefill sums of this BLAS were matched here: prefills keep MLX's graph")
    queries = []
    original = ops.fused_attention

    def counted(*args):
        queries.append(args[1].shape[2])
        return original(*args)

    monkeypatch.setattr(ops, "fused_attention", counted)
    return queries


def test_perplexity_through_the_fused_prefill_is_mlx_s(head64_llama, fused_queries):
    """Perplexity's blocks run into a KV cache, so their causal attention takes the fused prefill kernel
    where this BLAS's prefill sums were matched, and the summed NLL is MLX's own to the last bit."""
    from mlx_med.evaluation.perplexity import token_nll
    from mlx_med.models import load_model

    loaded = load_model(head64_llama)
    texts = ["Fever with a stiff neck needs urgent care. " * 9, "高血压患者应低盐饮食，规律服药。" * 7, "Rest."]
    ours = token_nll(loaded.model, loaded.tokenizer, texts, block_size=48)
    assert fused_queries and all(n > 1 for n in fused_queries), "every block's attention must take the fused prefill"
    uninstall(loaded.model)
    fused_queries.clear()
    try:
        theirs = token_nll(loaded.model, loaded.tokenizer, texts, block_size=48)
    finally:
        load_model(head64_llama)
    assert not fused_queries
    assert ours == theirs and ours[1] > 96, (ours, theirs)


@pytest.mark.parametrize("head_on_answers", [False, True])
def test_validation_through_the_fused_prefill_is_the_training_loss(head64_llama, fused_queries, head_on_answers):
    """A validation batch takes no gradient, so its forward runs into a fresh KV cache and its attention takes
    the fused prefill kernel where this BLAS's prefill sums were matched; its loss is the training loss's
    to the last bit, for the plain masked loss (PT) and SFT's head on answer positions only."""
    import mlx.optimizers as optim

    from mlx_med.adapters.lora import apply_lora
    from mlx_med.data.batches import Batch
    from mlx_med.models import load_model
    from mlx_med.train.config import LoraConfig
    from mlx_med.train.step import StepRunner, checkpoint_blocks, split_head

    model = load_model(head64_llama).model
    apply_lora(model, LoraConfig(rank=4))
    model.eval()
    runner = StepRunner(model, optim.AdamW(1e-3), 1.0, split_head(model) if head_on_answers else None)
    tokens = np.random.default_rng(2).integers(3, 400, size=(2, 41))
    mask = np.ones((2, 40), dtype=np.float32)
    mask[:, :15] = 0  # a prompt the loss does not score
    arrays = runner.arrays(Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=mask))
    ours = [a.item() for a in runner.validation_loss(model, *arrays)]
    assert fused_queries and all(n > 1 for n in fused_queries), "every block's attention must take the fused prefill"
    fused_queries.clear()
    theirs = [a.item() for a in runner.loss(model, *arrays)]
    assert not fused_queries, "a training forward takes the training attention, not the cached prefill's"
    assert ours == theirs and theirs[1] == 50, (ours, theirs)
    checkpoint_blocks(model)  # --grad-checkpoint's blocks hand the cache through mx.checkpoint
    assert [a.item() for a in runner.validation_loss(model, *arrays)] == theirs


@pytest.mark.parametrize("length", [150, 400])
def test_training_gradients_through_the_fused_attention_are_mlx_s(kernels, head64_llama, training_calls, length):
    """A training forward (no cache) takes the fused training attention in every block where its gradient
    was matched here (within the one-chain keys and, where the long prefill's cut was matched for it, past
    them), and the loss and every parameter's gradient equal the model's without mlx-med's kernels (MLX's
    own) to the last bit."""
    from mlx.utils import tree_flatten

    from mlx_med.models import load_model

    if length > kernels.training_keys:
        pytest.skip(f"this BLAS's gradient sums were not matched here for {length} keys: training keeps MLX's graph")
    loaded = load_model(head64_llama)
    tokens = mx.array(np.random.default_rng(3).integers(3, 400, size=(2, length + 1)))

    def loss(model):
        return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()

    def loss_and_gradients():
        value, grads = nn.value_and_grad(loaded.model, loss)(loaded.model)
        return [value] + [g for _, g in sorted(tree_flatten(grads), key=lambda item: item[0])]

    ours = loss_and_gradients()
    blocks = len(loaded.model.layers)
    assert training_calls == [(length, length)] * blocks, "every block's attention must take the fused training kernel"
    uninstall(loaded.model)
    training_calls.clear()
    try:
        theirs = loss_and_gradients()
    finally:
        load_model(head64_llama)
    assert not training_calls
    assert len(ours) == len(theirs) > blocks
    assert all(same(a, b) for a, b in zip(ours, theirs))


def test_decoding_through_the_fused_attention_is_mlx_lm_s(kernels, head64_llama, monkeypatch):
    import mlx_med.kernels.ops as ops
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.generate import generate_batch
    from mlx_med.models import load_model

    fused_calls = []
    original = ops.fused_attention

    def counted(*args):
        fused_calls.append(args[1].shape[2])  # the queries of each head: 1 in a decode step
        return original(*args)

    monkeypatch.setattr(ops, "fused_attention", counted)
    loaded = load_model(head64_llama)
    tokens = mx.array(np.random.default_rng(1).integers(3, 400, size=(2, 12)))
    conversations = [[{"role": "user", "content": text}] for text in
                     ("fever and cough", "高血压患者应低盐饮食", "Is aspirin indicated after a stroke? " * 6)]

    def outputs():
        texts = [r.text for r in generate_batch(loaded.model, loaded.tokenizer, conversations,
                                                DecodingConfig(max_new_tokens=12), batch_size=3, progress=False)]
        return texts, model_outputs(loaded.model, tokens)

    texts, ours = outputs()
    assert 1 in fused_calls, "the decode steps must go through the fused attention"
    # and the prompts' prefill, where this BLAS's prefill sums were matched
    assert any(n > 1 for n in fused_calls) == bool(kernels.prefill_keys)
    uninstall(loaded.model)
    fused_calls.clear()
    try:
        their_texts, theirs = outputs()
    finally:
        load_model(head64_llama)
    assert not fused_calls
    assert texts == their_texts
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert same(a, b), f"output {i} (3 logits, then the gradients by parameter name) differs"


def model_outputs(model, tokens):
    """Prefill logits (causal mask), two cached decode steps, and the gradients of a loss."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    outputs = [model(tokens, cache=cache)]
    for _ in range(2):
        outputs.append(model(mx.argmax(outputs[-1][:, -1:], axis=-1), cache=cache))

    def loss(m):
        logits = m(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    return outputs + [g for _, g in sorted(nn.utils.tree_flatten(grads))]


def test_model_with_kernels_equals_mlx_lm(kernels, tiny_model):
    from mlx_med.models import load_model

    loaded = load_model(tiny_model)
    module = sys.modules[type(loaded.model).__module__]
    assert getattr(module, ORIGINALS), "the CPU fp32 path must put the kernels in the model"
    tokens = mx.array(np.random.default_rng(0).integers(3, 400, size=(2, 12)))
    try:
        ours = model_outputs(loaded.model, tokens)
        uninstall(loaded.model)
        assert not hasattr(module, ORIGINALS)
        theirs = model_outputs(loaded.model, tokens)
    finally:
        load_model(tiny_model)  # reinstalled for the tests after this one
    assert len(ours) == len(theirs) > 3
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert same(a, b), f"output {i} (3 logits, then the gradients by parameter name) differs"


def test_batched_greedy_generation_identical(kernels, tiny_llama):
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.generate import generate_batch
    from mlx_med.models import load_model

    loaded = load_model(tiny_llama)
    conversations = [[{"role": "user", "content": text}] for text in
                     ("fever and cough", "高血压患者应低盐饮食", "Is aspirin indicated after a stroke? " * 6)]

    def texts():
        return [r.text for r in generate_batch(loaded.model, loaded.tokenizer, conversations,
                                               DecodingConfig(max_new_tokens=12), batch_size=3, progress=False)]

    assert isinstance(generate_module().mx, CoreWithKernels), "the CPU fp32 path puts the logsumexp in mlx-lm's decoding"
    ours = texts()
    uninstall(loaded.model)
    assert generate_module().mx is mx
    try:
        assert texts() == ours
    finally:
        load_model(tiny_llama)


def test_decoding_logsumexp_is_mlx_s_and_only_takes_cpu_fp32_last_axis_work(kernels):
    core = CoreWithKernels(kernels)
    assert core.array is mx.array and core.async_eval is mx.async_eval  # every other name is mlx.core's
    logits = mx.random.normal((7, 3001), key=mx.random.key(30)) * 10
    logits[2, 5] = mx.inf
    for x in (logits, logits.T, logits.astype(mx.bfloat16), logits[0]):
        for axis in (-1, x.ndim - 1, 0):
            for keepdims in (True, False):
                assert same(core.logsumexp(x, axis=axis, keepdims=keepdims),
                            mx.logsumexp(x, axis=axis, keepdims=keepdims))
    assert same(core.logsumexp(logits), mx.logsumexp(logits))  # all axes: MLX's


def test_a_module_with_its_own_swiglu_keeps_it(kernels, monkeypatch):
    import types

    from mlx_lm.models.base import scaled_dot_product_attention

    from mlx_med.kernels.install import install

    def clipped_swiglu(gate, x):  # a model's own variant under the shared name
        return nn.silu(mx.minimum(gate, 7.0)) * x

    module = types.ModuleType("fake_arch")
    module.swiglu, module.scaled_dot_product_attention = clipped_swiglu, scaled_dot_product_attention
    monkeypatch.setitem(sys.modules, "fake_arch", module)
    model = type("Model", (nn.Module,), {"__module__": "fake_arch"})()
    assert install(model, kernels) == ["scaled_dot_product_attention"]
    assert module.swiglu is clipped_swiglu and module.scaled_dot_product_attention is not scaled_dot_product_attention
    uninstall(model)
    assert module.scaled_dot_product_attention is scaled_dot_product_attention


def kernels_report(env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "mlx_med.kernels"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_narrower_loops_also_equal_mlx(kernels, isa):
    # The loops CPUs without AVX-512 (avx2) or without AVX2 (scalar) run, checked by the same self-check
    # every load runs.
    if isa == "avx2" and kernels.isa in ("avx2+fma", "scalar"):
        pytest.skip("this process's load already checked the AVX2 loops, or this CPU has none")
    report = kernels_report({"MLX_MED_KERNELS": isa})
    assert report.startswith(f"kernels: mlx-med ({FORCED_ISA[isa]}, ")
    # their fused decode attention matches the same BLAS rule
    sums = kernels.attention_sums
    assert sums is None or f"decode attention fused ({sums.describe()})" in report


def test_off_switch_and_failed_build_keep_mlx_kernels(tmp_path):
    assert kernels_report({"MLX_MED_KERNELS": "off"}) == "kernels: MLX (MLX_MED_KERNELS=off)"
    report = kernels_report({"CXX": "/bin/false", "MLX_MED_CACHE": str(tmp_path)})
    assert report.startswith("kernels: MLX (could not build the kernels: false exited with 1")
    assert not list(tmp_path.rglob("*.so")), "a failed build leaves no module behind"
    # a $CXX that is not there: said in one line, no traceback (every CPU model load goes through this)
    assert kernels_report({"CXX": str(tmp_path / "no-such-g++"), "MLX_MED_CACHE": str(tmp_path)}) == \
        f"kernels: MLX ($CXX={tmp_path / 'no-such-g++'} is not an executable)"


def test_concurrent_first_builds_make_one_module(tmp_path):
    # Two processes starting on a machine without the module: one builds under the lock, the other waits
    # and loads that build; no temporary file is left behind.
    env = {**os.environ, "MLX_MED_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-m", "mlx_med.kernels"], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    reports = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert reports[0].startswith(tuple(f"kernels: mlx-med ({isa}, built "
                                       for isa in ("avx2+fma", "avx2+fma, avx512f attention", "scalar"))), reports
    assert " cached " in reports[1], reports
    files = [p for p in (tmp_path / "kernels").rglob("*")
             if p.is_file() and p.name not in (".build.lock", "self-check.json")]
    assert len(files) == 1 and files[0].suffix == ".so", files


def child_kernels_reason(env: dict, module: bool = False) -> str:
    """What a fresh process says of the kernels: a command's load (``cpu_kernels``) or ``-m mlx_med.kernels``."""
    command = ["-m", "mlx_med.kernels"] if module else [
        "-c", "import mlx_med; from mlx_med.kernels import cpu_kernels; print(cpu_kernels()[1])"]
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_self_check_outcome_is_recorded_and_read_back(kernels, tmp_path):
    import json
    import shutil

    from mlx_med.kernels.build import module_path
    from mlx_med.kernels.check import VERDICTS

    built = module_path()  # built by the fixture; copied so this test's records stay in tmp_path
    copy = tmp_path / built.relative_to(built.parents[2])
    copy.parent.mkdir(parents=True)
    shutil.copy2(built, copy)
    env = {**os.environ, "MLX_MED_CACHE": str(tmp_path)}
    env.pop("MLX_MED_KERNELS", None)
    assert child_kernels_reason(env).endswith("checked against MLX now")
    assert child_kernels_reason(env).endswith("matched MLX in an earlier check here")
    # The record decides: a mismatch recorded under this machine's key keeps MLX's kernels, unchecked.
    records_path = copy.parent / VERDICTS
    records = json.loads(records_path.read_text())
    key, entry = next(iter(records.items()))
    assert len(records) == 1 and entry == {"mismatch": None, "attention_sums": entry["attention_sums"],
                                           "prefill_keys": entry["prefill_keys"],
                                           "long_prefill": entry["long_prefill"],
                                           "training_keys": entry["training_keys"]}
    assert entry["attention_sums"] == list(kernels.attention_sums), "the calibration is recorded with the check"
    assert entry["prefill_keys"] == kernels.prefill_keys, "so is the prefill's"
    assert entry["long_prefill"] == (list(kernels.long_prefill) if kernels.long_prefill else None), \
        "and the long prefill's"
    assert entry["training_keys"] == kernels.training_keys, "and the training attention's"
    records_path.write_text(json.dumps({key: {"mismatch": "swiglu differs (planted)"}}))
    assert "swiglu differs (planted); kept MLX's kernels" in child_kernels_reason(env)
    # python -m mlx_med.kernels (and doctor) check afresh and replace the record, and drop the packed
    # projections' recorded calibrations with it
    from mlx_med.kernels.packed import RECORD

    (copy.parent / RECORD).write_text("{}")
    assert child_kernels_reason(env, module=True).endswith("checked against MLX now)")
    assert json.loads(records_path.read_text()) == {key: entry}
    assert not (copy.parent / RECORD).exists()
    records_path.write_text(json.dumps({key: {"mismatch": None}}))  # an older record, without the calibration
    assert child_kernels_reason(env).endswith("checked against MLX now")
    older = {"mismatch": None, "attention_sums": entry["attention_sums"]}  # one without the prefill's
    records_path.write_text(json.dumps({key: older}))
    assert child_kernels_reason(env).endswith("checked against MLX now")
    from mlx_med.kernels.check import CheckOutcome

    # a record from before the long prefill's calibration is not an outcome: it is checked again
    assert CheckOutcome.from_record(entry) is not None
    assert CheckOutcome.from_record({k: v for k, v in entry.items() if k != "long_prefill"}) is None
    records_path.write_text("{ not json")  # a broken record is checked again, not trusted
    assert child_kernels_reason(env).endswith("checked against MLX now")


def test_self_check_key_follows_cpu_blas_threads_and_module(kernels, tmp_path, monkeypatch):
    import shutil

    import mlx_med.blas as blas
    import mlx_med.blas_check as blas_check
    from mlx_med.kernels.build import module_path
    from mlx_med.kernels.check import check_key

    module = tmp_path / "module.so"
    shutil.copy2(module_path(), module)
    monkeypatch.delenv("MLX_MED_KERNEL_THREADS", raising=False)
    key = check_key(kernels, module)
    assert check_key(kernels, module) == key
    monkeypatch.setenv("MLX_MED_KERNEL_THREADS", "1")
    assert check_key(kernels, module) != key
    monkeypatch.delenv("MLX_MED_KERNEL_THREADS")
    monkeypatch.setattr(blas_check, "cpu_identity", lambda cpuinfo=None: "another-cpu")
    assert check_key(kernels, module) != key
    monkeypatch.undo()
    # the BLAS under MLX decides how the attention's sums are cut: another library, or a forced core
    monkeypatch.setattr(blas, "preload_blas", lambda: blas.BlasStatus(str(module), "another BLAS", threads="2"))
    assert check_key(kernels, module) != key
    monkeypatch.undo()
    forced = os.environ.get("OPENBLAS_CORETYPE", "")  # another core than the one this run may force already
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Zen" if forced.lower() == "haswell" else "Haswell")
    assert check_key(kernels, module) != key
    monkeypatch.undo()
    module.write_bytes(module.read_bytes() + b"\0")  # a rebuilt module
    assert check_key(kernels, module) != key
