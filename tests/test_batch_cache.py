"""The in-place batch KV cache: what the model reads is mlx-lm's ``BatchKVCache``'s, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

import mlx_med  # noqa: F401
from mlx_med.evaluation.batch_cache import InPlaceBatchKVCache, InPlaceKVCache, describe, in_place_caches

HEADS, DIM = 2, 4


def visible(cache) -> list[np.ndarray]:
    """Each row's keys and values past its left padding (what attention does not mask out)."""
    keys, values = cache.keys_and_values()
    pads = cache.left_padding.tolist()
    return [np.asarray(a[row, :, pad:]) for row, pad in enumerate(pads) for a in (keys, values)]


def assert_same_cache(ours, theirs):
    assert ours.size() == theirs.size()
    assert ours.left_padding.tolist() == theirs.left_padding.tolist()
    assert ours.offset.tolist() == theirs.offset.tolist()
    ours_k, _ = ours.keys_and_values()
    theirs_k, _ = theirs.keys_and_values()
    assert ours_k.shape == theirs_k.shape
    for a, b in zip(visible(ours), visible(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    n = ours.size()
    assert mx.array_equal(ours.make_mask(1, return_array=True), theirs.make_mask(1, return_array=True)).item()
    assert n == ours_k.shape[2]


def prefilled(lengths: list[int], rows: int, seed: int, tokens: int = 0):
    """The same prompt batch in both caches, prefilled right-padded as mlx-lm's prompt batch does."""
    rng = np.random.default_rng(seed)
    pair = (InPlaceKVCache.merge([InPlaceKVCache(rows, tokens) for _ in lengths]),
            BatchKVCache.merge([KVCache() for _ in lengths]))
    width = max(lengths)
    padding = [width - n for n in lengths]
    keys = mx.array(rng.normal(size=(len(lengths), HEADS, width, DIM)).astype(np.float32))
    values = mx.array(rng.normal(size=(len(lengths), HEADS, width, DIM)).astype(np.float32))
    for cache in pair:
        cache.prepare(lengths=lengths, right_padding=padding)
        cache.update_and_fetch(keys, values)
        cache.finalize()
    return pair


def step(pair, seed: int):
    rng = np.random.default_rng(seed)
    rows = pair[0].offset.shape[0]
    new = [mx.array(rng.normal(size=(rows, HEADS, 1, DIM)).astype(np.float32)) for _ in range(2)]
    for cache in pair:
        cache.update_and_fetch(*new)


def test_refills_removals_and_growth_keep_mlx_lm_s_visible_entries(monkeypatch):
    moves = []
    original = InPlaceBatchKVCache._reallocate
    monkeypatch.setattr(InPlaceBatchKVCache, "_reallocate",
                        lambda self, *a: (moves.append(a), original(self, *a))[1])
    ours, theirs = prefilled([5, 9, 3], rows=6, seed=0)
    assert isinstance(ours, InPlaceBatchKVCache)
    assert_same_cache(ours, theirs)
    for t in range(4):
        step((ours, theirs), seed=10 + t)
    assert_same_cache(ours, theirs)

    # a shorter batch joins (right-aligned, padded on the left), then a longer one (the window grows left)
    for lengths, seed in (([2, 4], 1), ([30, 7], 2)):
        new_ours, new_theirs = prefilled(lengths, rows=6, seed=seed)
        ours.extend(new_ours)
        theirs.extend(new_theirs)
        assert_same_cache(ours, theirs)
        step((ours, theirs), seed=20 + seed)
        assert_same_cache(ours, theirs)
    assert moves, "the row capacity grew once, to the generator's batch size"
    assert ours.keys.shape[0] == 7  # 7 rows > 6 asked: grown to what was needed

    # removals in the middle and at the ends; the shared left padding is trimmed by both
    for keep in ([0, 2, 3, 4, 5, 6], [1, 2, 4, 5], [0, 1, 2]):
        for cache in (ours, theirs):
            cache.filter(keep)
        assert_same_cache(ours, theirs)
        step((ours, theirs), seed=len(keep))
        assert_same_cache(ours, theirs)
    # the rows without left padding leave: the rest share some, which is trimmed
    keep = [row for row, pad in enumerate(theirs.left_padding.tolist()) if pad > 0]
    assert 0 < len(keep) < theirs.offset.shape[0]
    start = ours.start
    for cache in (ours, theirs):
        cache.filter(keep)
    assert_same_cache(ours, theirs)
    assert ours.start > start, "the trim moved the window instead of copying"

    # past the token capacity: one reallocation, same entries
    moves.clear()
    for t in range(300):
        step((ours, theirs), seed=100 + t)
    assert moves and ours.keys.shape[2] >= ours.size()
    assert_same_cache(ours, theirs)

    extracted_ours, extracted_theirs = ours.extract(1), theirs.extract(1)
    for a, b in ((extracted_ours.keys, extracted_theirs.keys), (extracted_ours.values, extracted_theirs.values)):
        assert mx.array_equal(a, b).item()

    ours.filter([])  # (mlx-lm's batches drop an emptied cache instead)
    assert ours.size() == 0 and ours.keys is None and ours.offset.dtype == theirs.offset.dtype


def test_refills_in_place_write_only_the_new_rows():
    ours, _ = prefilled([6, 6], rows=4, seed=3)
    joined, _ = prefilled([3], rows=4, seed=4)
    ours.extend(joined)  # grows to 4 rows once
    buffer = ours.keys
    joined, _ = prefilled([2], rows=4, seed=5)
    ours.extend(joined)
    step((ours,), seed=6)
    mx.eval(ours.keys)
    assert ours.keys is buffer and ours.keys.shape[0] == 4


def test_models_with_other_caches_keep_mlx_lm_s(monkeypatch):
    class SlidingWindowModel:
        layers = [object()]

        def make_cache(self):
            from mlx_lm.models.cache import RotatingKVCache

            return [RotatingKVCache(max_size=16)]

    assert in_place_caches(SlidingWindowModel(), rows=4, prompts=2) is None
    monkeypatch.setenv("MLX_MED_BATCH_CACHE", "mlx-lm")

    class PlainModel:
        layers = [object(), object()]

    assert in_place_caches(PlainModel(), rows=4, prompts=2) is None
    monkeypatch.delenv("MLX_MED_BATCH_CACHE")
    caches = in_place_caches(PlainModel(), rows=4, prompts=2)
    assert [[type(c) for c in prompt] for prompt in caches] == [[InPlaceKVCache] * 2] * 2
    assert caches[0][0] is not caches[1][0]


def test_doctor_line_says_which_cache_and_names_an_unknown_value():
    assert describe({}).startswith("in place")
    assert describe({"MLX_MED_BATCH_CACHE": "mlx-lm"}) == "mlx-lm's BatchKVCache (MLX_MED_BATCH_CACHE=mlx-lm)"
    note = describe({"MLX_MED_BATCH_CACHE": "mlxlm"})
    assert note.startswith("in place") and "MLX_MED_BATCH_CACHE=mlxlm ignored" in note


@pytest.fixture(params=["tiny_llama", "head64_llama"])
def model(request):
    """A tiny llama, and one whose decode steps take mlx-med's fused attention (strided cache views)."""
    from mlx_med.models import load_model

    return request.param, load_model(request.getfixturevalue(request.param)).model


def test_continuous_batching_gives_mlx_lm_s_logits_bit_for_bit(model, monkeypatch):
    """mlx-lm's ``BatchGenerator`` as the engine drives it: rows finish at different steps and are
    refilled, new rows longer and shorter than the running ones, a row past 256 tokens; every
    sequence's log-probabilities at every step equal those with mlx-lm's own cache."""
    from mlx_lm.generate import BatchGenerator

    import mlx_med.kernels.ops as ops

    name, model = model
    calls = {"filter": 0, "extend_longer": 0, "fused_attention": 0}
    original_attention = ops.fused_attention

    def counted_attention(*args):
        calls["fused_attention"] += 1
        return original_attention(*args)

    monkeypatch.setattr(ops, "fused_attention", counted_attention)
    original_filter, original_extend = InPlaceBatchKVCache.filter, InPlaceBatchKVCache.extend

    def counted_filter(self, keep):
        calls["filter"] += list(keep) != list(range(len(keep)))
        return original_filter(self, keep)

    def counted_extend(self, other):
        calls["extend_longer"] += self.keys is not None and other._idx > self._idx
        return original_extend(self, other)

    monkeypatch.setattr(InPlaceBatchKVCache, "filter", counted_filter)
    monkeypatch.setattr(InPlaceBatchKVCache, "extend", counted_extend)
    rng = np.random.default_rng(7)
    lengths = [12, 4, 40, 7, 3, 25, 60, 9, 5, 33, 2, 18]
    prompts = [rng.integers(3, 400, size=n).tolist() for n in lengths]
    max_tokens = [6, 30, 3, 17, 9, 24, 5, 12, 270, 8, 15, 4]

    def run(caches):
        gen = BatchGenerator(model, max_tokens=300, completion_batch_size=4, prefill_batch_size=2)
        uids = gen.insert(prompts, max_tokens, caches=caches)
        steps = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                steps[r.uid].append((r.token, r.logprobs))
        gen.close()
        return [steps[uid] for uid in uids]

    ours = run(in_place_caches(model, 4, len(prompts)))
    theirs = run(None)
    assert calls["filter"] and calls["extend_longer"], "the removals and the longer refills were exercised"
    if name == "head64_llama":
        assert calls["fused_attention"], "the fused attention read the in-place cache's views"
    assert [len(s) for s in ours] == max_tokens
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert [t for t, _ in a] == [t for t, _ in b], f"sequence {i}: tokens differ"
        for j, ((_, x), (_, y)) in enumerate(zip(a, b)):
            assert mx.array_equal(x, y).item(), f"sequence {i}, step {j}: log-probabilities differ"


def test_a_cache_with_room_for_its_tokens_never_grows_while_decoding(monkeypatch):
    """With the tokens a row will hold known (the longest prompt plus the new tokens), decoding past
    mlx-lm's 256-token steps reallocates nothing and the visible entries stay mlx-lm's."""
    moves = []
    original = InPlaceBatchKVCache._reallocate
    monkeypatch.setattr(InPlaceBatchKVCache, "_reallocate",
                        lambda self, *a: (moves.append(a), original(self, *a))[1])
    new_tokens = 300
    ours, theirs = prefilled([5, 9, 3], rows=4, seed=3, tokens=9 + new_tokens)
    capacity = ours.keys.shape[2]
    assert capacity == 512  # 309 tokens, rounded up to mlx-lm's 256-token step, from the start
    for t in range(new_tokens):
        step((ours, theirs), seed=100 + t)
    assert not moves and ours.keys.shape[2] == capacity
    assert_same_cache(ours, theirs)

    grown, _ = prefilled([5, 9, 3], rows=4, seed=3)  # without: grown at 256 tokens
    for _ in range(new_tokens):
        grown.update_and_fetch(*(mx.zeros((3, HEADS, 1, DIM)) for _ in range(2)))
    assert moves
