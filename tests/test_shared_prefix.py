"""A batch's common prompt start prefilled once (``shared_prefix``): the same keys, values and logits
as the batch prefilled whole, bit for bit, and the same greedy answers through ``generate_batch``."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import numpy as np
import pytest
from random_adapters import ALL, make_adapter
from tiny_models import build_model

from mlx_med.adapters.live import load_with_adapters
from mlx_med.evaluation import shared_prefix
from mlx_med.evaluation.batch_cache import InPlaceKVCache
from mlx_med.evaluation.decoding import preset
from mlx_med.evaluation.generate import GenerationProfile, generate_batch
from mlx_med.evaluation.shared_prefix import SharedPrefixModel, describe, sharing_applies
from mlx_med.serve.scheduler import Scheduler
from mlx_med.serve.schemas import Sampling

# The demo model's widths (SmolLM2-135M: 576 wide, 9 query heads over 3 key heads of 64, MLP 1536) in two
# layers: the shapes whose products OpenBLAS sends to its regular kernels, as in a real eval.
WIDE = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "intermediate_size": 1536, "num_hidden_layers": 2}
START = 300  # longer than OpenBLAS's GEMM_Q (320 with its AVX-512 and Zen kernels) once a row's own tokens follow


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory, tiny_tokenizer_dir):
    """A demo-wide two-layer llama and the study's pair of rank-8 adapters on every projection."""
    folder = tmp_path_factory.mktemp("wide-llama")
    model_dir = build_model(folder / "model", "llama", tiny_tokenizer_dir, seed=5, overrides=WIDE)
    make_adapter(model_dir, folder / "pt", rank=8, lora_alpha=16, keys=ALL, seed=1, phase="pt", std=0.05)
    make_adapter(model_dir, folder / "sft", rank=8, lora_alpha=16, keys=ALL, seed=2, phase="sft", std=0.05)
    return model_dir, folder / "sft", folder / "pt"


def prompts(vocab: int, start: int, rest: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    common = rng.integers(1, vocab, start).tolist()
    return [common + rng.integers(1, vocab, n).tolist() for n in rest]


def prefill(model, batch: list[list[int]]):
    """The batch prefilled as mlx-lm's ``BatchGenerator`` does (right padded, the last token held back),
    then one decode step: (per-layer keys and values, that step's logits)."""
    layers = len(model.layers)
    rows = [[InPlaceKVCache(len(batch), 512) for _ in range(layers)] for _ in batch]
    cache = [InPlaceKVCache.merge([r[i] for r in rows]) for i in range(layers)]
    heads = [p[:-1] for p in batch]
    width = max(map(len, heads))
    padding = [width - len(p) for p in heads]
    for c in cache:
        c.prepare(lengths=[len(p) for p in heads], right_padding=padding)
    model(mx.array([p + [0] * (width - len(p)) for p in heads]), cache=cache)
    for c in cache:
        c.finalize()
    logits = model(mx.array([[p[-1]] for p in batch]), cache=cache)[:, -1]
    kv = [np.array(a) for c in cache for a in c.keys_and_values()]
    mx.eval(logits)
    return kv, np.array(logits)


def test_common_start_prefilled_once_gives_the_batch_bits(wide_pair):
    """Keys, values and the next logits equal the whole batch's, model-wide and per-row weights alike;
    the start is computed once per distinct weights."""
    model_dir, sft, pt = wide_pair
    loaded, live = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.3)
    model = loaded.model
    if not sharing_applies(model):
        pytest.skip("this BLAS rounds a row by its place in the call (or no kernels): rows are prefilled whole")
    vocab = model.args.vocab_size
    batch = prompts(vocab, START, [40, 75, 12, 60])

    whole = prefill(model, batch)
    shared = SharedPrefixModel(model)
    ours = prefill(shared, batch)
    assert shared.shared_tokens == START * 3  # one pass over the start instead of four
    for a, b in zip(whole[0], ours[0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole[1], ours[1])

    weights = [{"sft": a, "pt": 1 - a} for a in (0.0, 1.0, 0.0, 1.0)]
    live.set_row_weights(weights)
    whole = prefill(model, batch)
    shared = SharedPrefixModel(model, live, row_weights=lambda: weights)
    ours = prefill(shared, batch)
    assert shared.shared_tokens == START * 2  # once per α
    for a, b in zip(whole[0], ours[0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole[1], ours[1])
    # and the per-row weights are the batch's again afterwards (the same logits as before sharing)
    np.testing.assert_array_equal(prefill(model, batch)[1], whole[1])


def test_short_start_is_shared_through_a_padded_pass(wide_pair):
    """A start too short for OpenBLAS's regular kernels in one row (24 tokens: the chat template's own
    line; 64 tokens) is computed in a pass that repeats its row past that size: the same bits, with the
    fused prefill attention and with MLX's graph (there the 64-token one: the 24 queries' attention is a
    small product). A pass as big as the batch, or no common start, shares nothing."""
    model_dir, sft, pt = wide_pair
    loaded, live = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.3)
    if not sharing_applies(loaded.model):
        pytest.skip("this BLAS rounds a row by its place in the call (or no kernels)")
    vocab = loaded.model.args.vocab_size
    for fused in (True, False):
        for start, rest in ((64, [40, 75, 60]), (24, [130, 140, 120, 150, 135, 128, 144, 139])):
            batch = prompts(vocab, start, rest, seed=start)
            shared = SharedPrefixModel(loaded.model)
            if not fused:
                shared.fused_keys = 0  # as on OpenBLAS's AVX2 kernels: MLX's attention graph
            elif shared.fused_keys == 0:
                continue  # no fused prefill here (test_kernels says why)
            whole, ours = prefill(loaded.model, batch), prefill(shared, batch)
            copies = -(-(100 ** 3 + 1) // (start * 16 * 576))  # rows the start's pass takes (16 LoRA columns)
            if fused or start == 64:
                assert shared.start_passes == 1 and shared.shared_tokens == start * (len(rest) - copies)
            else:  # MLX's graph: the 24 queries' attention scores (3 x 24 x 174 x 64) are a small product
                assert shared.start_passes == 0 and shared.shared_tokens == 0
            for a, b in zip(whole[0], ours[0]):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(whole[1], ours[1])
    # per-row weights: one padded pass for both α, as big as the batch: taken only where the start is kept
    batch = prompts(vocab, 24, [130, 140, 120, 150, 135, 128], seed=7)
    weights = [{"sft": a, "pt": 1 - a} for a in (0.0, 1.0, 0.0, 1.0, 0.0, 1.0)]
    live.set_row_weights(weights)
    whole = prefill(loaded.model, batch)
    shared = SharedPrefixModel(loaded.model, live, row_weights=lambda: weights)
    ours = prefill(shared, batch)
    assert shared.start_passes == (1 if shared.fused_keys else 0) and shared.shared_tokens == 0  # 3 rows per α
    np.testing.assert_array_equal(whole[1], ours[1])
    live.clear_row_weights()
    for batch in (prompts(vocab, 24, [130, 140, 120]), prompts(vocab, 0, [300, 310, 305])):
        shared = SharedPrefixModel(loaded.model)
        whole, ours = prefill(loaded.model, batch), prefill(shared, batch)
        assert shared.shared_tokens == 0 and shared.start_passes == 0  # 5 rows' pass for 3 rows; no start
        np.testing.assert_array_equal(whole[1], ours[1])


def test_start_kept_for_later_batches(wide_pair):
    """Under the fused prefill attention a start's keys and values do not depend on the batch's width:
    later batches (other widths, other rows) take the kept start without a pass, bit for bit, and a
    new α computes only its own; a kept start longer than a batch's common start is not taken."""
    model_dir, sft, pt = wide_pair
    loaded, live = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.3)
    if not sharing_applies(loaded.model):
        pytest.skip("this BLAS rounds a row by its place in the call (or no kernels)")
    model = loaded.model
    rng = np.random.default_rng(11)
    template = rng.integers(1, model.args.vocab_size, 24).tolist()

    def batch(rest):
        return [template + rng.integers(1, model.args.vocab_size, n).tolist() for n in rest]

    weights: list[dict] = []
    shared = SharedPrefixModel(model, live, row_weights=lambda: weights)
    if shared.fused_keys == 0:
        pytest.skip("no fused prefill attention here (test_kernels says why): each batch computes its start")
    plans = [(batch([130, 140, 120, 150, 135, 128, 144, 139]), (0.0,) * 8, 1, 24 * 3),
             (batch([60, 50, 70, 80]), (0.0,) * 4, 1, 24 * 4),  # narrower: no pass at all
             (batch([200, 210, 190, 205, 199, 201]), (0.0, 1.0) * 3, 2, 24 * (6 - 5)),  # α 1 new: its 5-row pass
             (batch([100, 90, 95, 97]), (1.0, 0.0) * 2, 2, 24 * 4),
             (batch([61]) * 4, (0.0, 1.0) * 2, 2, 24 * 4)]  # one prompt at two α (a sweep's last batch)
    for rows, alphas, passes, shared_tokens in plans:
        weights[:] = [{"sft": a, "pt": 1 - a} for a in alphas]
        live.set_row_weights(weights)
        whole = prefill(model, rows)
        before = shared.shared_tokens
        ours = prefill(shared, rows)
        assert (shared.start_passes, shared.shared_tokens - before) == (passes, shared_tokens)
        for a, b in zip(whole[0], ours[0]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(whole[1], ours[1])
    # rows that share only 20 of the kept 24 tokens: the kept start does not apply; their own is computed
    rows = [r[:20] + [1] + r[21:] for r in batch([130, 140, 120, 150, 135, 128, 144, 139])]
    weights[:] = [{"sft": 0.0, "pt": 1.0}] * 8
    live.set_row_weights(weights)
    whole, ours = prefill(model, rows), prefill(shared, rows)
    assert shared.start_passes == 3
    np.testing.assert_array_equal(whole[1], ours[1])
    live.clear_row_weights()


def test_keeping_a_start_may_drop_one_the_batch_takes(wide_pair):
    """With room for one kept start, a batch that takes α 0's kept start and computes α 1's (whose keeping
    drops α 0's) still gets both, bit for bit."""
    model_dir, sft, pt = wide_pair
    loaded, live = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.3)
    if not sharing_applies(loaded.model):
        pytest.skip("this BLAS rounds a row by its place in the call (or no kernels)")
    weights: list[dict] = []
    shared = SharedPrefixModel(loaded.model, live, row_weights=lambda: weights)
    if shared.fused_keys == 0:
        pytest.skip("no fused prefill attention here (test_kernels says why): each batch computes its start")
    shared.starts.limit = 1
    vocab = loaded.model.args.vocab_size
    for rest, alphas in (([130, 140, 120, 150, 135, 128], (0.0,) * 6), ([100, 90, 95, 97, 99, 91], (0.0, 1.0) * 3)):
        rows = prompts(vocab, 24, rest, seed=9)
        weights[:] = [{"sft": a, "pt": 1 - a} for a in alphas]
        live.set_row_weights(weights)
        whole, ours = prefill(loaded.model, rows), prefill(shared, rows)
        np.testing.assert_array_equal(whole[1], ours[1])
    assert shared.start_passes == 2 and len(shared.starts.entries) == 1
    live.clear_row_weights()


def test_kept_starts_drop_the_least_recently_used():
    kept = shared_prefix.KeptStarts(limit=3 * 2 * 4 * 10)  # three starts of 10 floats a key and a value
    layer = [(mx.zeros((10,)), mx.zeros((10,)))]
    for n in range(4):
        kept.put(((1, 2, n), ()), layer)
        if n == 1:
            assert kept.get(((1, 2, 0), ())) is layer  # used again: now the most recent
    assert kept.get(((1, 2, 1), ())) is None and kept.get(((1, 2, 0), ())) is layer
    assert kept.size == 3 * 80 and kept.lengths((), [1, 2, 3, 4]) == {3}


def test_generate_batch_shares_the_start_and_answers_alike(wide_pair, tiny_tokenizer_dir, monkeypatch):
    """Through the generator (continuous batching, per-row α): the same greedy tokens with the switch on
    and off, and the profile counts the tokens not computed again."""
    model_dir, sft, pt = wide_pair
    loaded, live = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.5)
    if not sharing_applies(loaded.model):
        pytest.skip("this BLAS rounds a row by its place in the call (or no kernels)")
    system = " ".join(["You are a careful medical assistant; answer briefly and say when to see a doctor."] * 12)
    conversations = [[{"role": "user", "content": f"Question {i}: what helps a {w} headache?"}]
                     for i, w in enumerate(["mild", "sudden", "daily", "morning", "tension", "cluster"])]
    weights = [{"sft": a, "pt": 1 - a} for a in (0.0, 1.0) for _ in conversations]
    decoding = preset("greedy").with_overrides(max_new_tokens=6)
    answers = {}
    for switch in ("on", "off"):
        monkeypatch.setenv("MLX_MED_SHARED_PREFIX", switch)
        profile = GenerationProfile()
        results = generate_batch(loaded.model, loaded.tokenizer, conversations * 2, decoding, batch_size=6,
                                 system=system, progress=False, profile=profile, live=live, row_weights=weights)
        answers[switch] = [(r.text, r.generation_tokens) for r in results]
        assert (profile.shared_prompt_tokens > 0) == (switch == "on")
    assert answers["on"] == answers["off"]


def serve_together(model, live, batch: list[list[int]], weights: list[dict], max_tokens: int = 5,
                   later: tuple[list[int], dict] | None = None):
    """The server's scheduler given ``batch`` as requests that arrive together (one prefill call), greedy,
    then ``later`` (a prompt and its weights) alone once those finished: (each request's tokens, the
    scheduler's ``shared_prefix``)."""
    async def run():
        scheduler = Scheduler(model, live, stop_tokens=[], vocab_size=model.args.vocab_size, batch_size=len(batch))
        greedy = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=None)

        async def answer(job):
            tokens, finish = [], None
            while finish is None:
                event = await asyncio.wait_for(job.queue.get(), timeout=120)
                assert not isinstance(event, BaseException), event
                token, finish = event
                tokens.append(token)
            return tokens

        jobs = [scheduler.submit(prompt, w, greedy) for prompt, w in zip(batch, weights)]
        scheduler.start()  # after the submits: the worker takes all of them in its first step
        answers = [await answer(job) for job in jobs]
        if later is not None:
            answers.append(await answer(scheduler.submit(*later, greedy)))
        scheduler.stop()
        return answers, scheduler.shared_prefix

    return asyncio.run(run())


def test_server_requests_arriving_together_share_the_start(wide_pair, monkeypatch):
    """``mlx-med serve``'s scheduler runs the same engine: requests that arrive together and begin alike
    (a client's system prompt) compute that start once per α, with the same greedy tokens as without."""
    model_dir, sft, pt = wide_pair
    loaded, live = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.5)
    if not sharing_applies(loaded.model):
        pytest.skip("this BLAS rounds a row by its place in the call (or no kernels)")
    batch = prompts(loaded.model.args.vocab_size, START, [40, 75, 12, 60], seed=3)
    weights = [{"sft": a, "pt": 1 - a} for a in (0.0, 1.0, 0.0, 1.0)]
    probe = mx.array([batch[0][:20]])
    before = np.array(loaded.model(probe))
    monkeypatch.setenv("MLX_MED_SHARED_PREFIX", "on")
    shared_answers, shared = serve_together(loaded.model, live, batch, weights)
    # a stopped scheduler hands the model back at its model-wide α (not its last rows' weights)
    np.testing.assert_array_equal(np.array(loaded.model(probe)), before)
    assert shared is not None and shared.shared_tokens == START * 2  # once per α instead of once per row
    monkeypatch.setenv("MLX_MED_SHARED_PREFIX", "off")
    whole_answers, none = serve_together(loaded.model, live, batch, weights)
    assert none is None
    assert shared_answers == whole_answers and all(len(a) == 5 for a in whole_answers)


def test_no_sharing_where_rows_round_by_their_place(wide_pair, monkeypatch):
    """Where the BLAS rounds a row by its place in the call (OpenBLAS's AVX2 kernels: the probe says so
    under ``OPENBLAS_CORETYPE=Haswell`` and ``Zen``, where the bit test above fails), generation
    prefills every row whole."""
    model_dir, sft, pt = wide_pair
    loaded, _ = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.5)
    monkeypatch.setattr(shared_prefix, "rows_round_alike", lambda: False)
    assert not sharing_applies(loaded.model)
    system = " ".join(["Answer briefly and say when to see a doctor."] * 30)
    profile = GenerationProfile()
    generate_batch(loaded.model, loaded.tokenizer, [[{"role": "user", "content": f"Question {i}?"}] for i in range(4)],
                   preset("greedy").with_overrides(max_new_tokens=2), batch_size=4, system=system,
                   progress=False, profile=profile)
    assert profile.shared_prompt_tokens == 0


def test_switch_and_doctor_line(monkeypatch):
    assert describe({"MLX_MED_SHARED_PREFIX": "off"}) == "off (MLX_MED_SHARED_PREFIX=off)"
    note = describe({"MLX_MED_SHARED_PREFIX": "maybe"})
    assert note.startswith("prefilled once") and "MLX_MED_SHARED_PREFIX=maybe ignored" in note
    monkeypatch.setenv("MLX_MED_SHARED_PREFIX", "off")
    assert not shared_prefix.sharing_applies(object())


def test_server_keeps_a_start_for_a_later_request(wide_pair, monkeypatch):
    """Under the fused prefill attention the scheduler keeps a start computed for requests that arrived
    together: a request arriving alone later takes it (no pass), with the same tokens as without."""
    model_dir, sft, pt = wide_pair
    loaded, live = load_with_adapters(model_dir, sft=sft, pt=pt, alpha=0.5)
    if not sharing_applies(loaded.model):
        pytest.skip("this BLAS rounds a row by its place in the call (or no kernels)")
    if SharedPrefixModel(loaded.model).fused_keys == 0:
        pytest.skip("no fused prefill attention here (test_kernels says why): starts are not kept")
    batch = prompts(loaded.model.args.vocab_size, 120, [60, 80, 70, 75, 130], seed=4)
    weights = [{"sft": 0.5, "pt": 0.5}] * 4
    later = (batch[4], {"sft": 0.5, "pt": 0.5})
    monkeypatch.setenv("MLX_MED_SHARED_PREFIX", "on")
    shared_answers, shared = serve_together(loaded.model, live, batch[:4], weights, later=later)
    assert (shared.start_passes, shared.shared_tokens) == (1, 120 * 3 + 120)  # the later one: no pass
    monkeypatch.setenv("MLX_MED_SHARED_PREFIX", "off")
    whole_answers, _ = serve_together(loaded.model, live, batch[:4], weights, later=later)
    assert shared_answers == whole_answers and all(len(a) == 5 for a in whole_answers)
