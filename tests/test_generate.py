"""Batched generation: greedy equals sequential mlx-lm greedy, order kept, sampling reproducible."""

from __future__ import annotations

import io

import pytest

import mlx_med  # noqa: F401
from mlx_med.evaluation.decoding import DecodingConfig, make_sampler
from mlx_med.evaluation.generate import (
    DecodeStep,
    GenerationProfile,
    GenerationProgress,
    candidate_sampler,
    encode_chat,
    generate_batch,
    top_candidates,
    with_system,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Is aspirin indicated after a stroke?"}],
    [{"role": "user", "content": "高血压患者应该注意什么？"}],
    [{"role": "user", "content": "fever"}],
    [{"role": "user", "content": "The patient presented with fever, cough and shortness of breath for three days. "
                                 "What should be done?"}],
    [{"role": "user", "content": "糖尿病"}],
    [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "chest pain"}],
]


@pytest.fixture
def loaded(tiny_model):
    from mlx_med.models import load_model

    return load_model(tiny_model)


def sequential_greedy(model, tokenizer, messages, max_tokens):
    """Reference: mlx-lm's one-sequence generate_step, stopping at an end-of-turn token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    prompt = mx.array(encode_chat(tokenizer, messages))
    out = []
    for token, _ in generate_step(prompt, model, max_tokens=max_tokens, sampler=make_sampler(DecodingConfig())):
        if token in tokenizer.eos_token_ids:
            break
        out.append(int(token))
    return out


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_batch_equals_sequential(loaded, batch_size):
    decoding = DecodingConfig(max_new_tokens=12)
    results = generate_batch(loaded.model, loaded.tokenizer, CONVERSATIONS, decoding,
                             batch_size=batch_size, progress=False)
    assert len(results) == len(CONVERSATIONS)
    for conv, result in zip(CONVERSATIONS, results):
        expected = sequential_greedy(loaded.model, loaded.tokenizer, conv, 12)
        assert result.text == loaded.tokenizer.decode(expected, skip_special_tokens=True)
        assert result.generation_tokens == len(expected)
        assert result.prompt_tokens == len(encode_chat(loaded.tokenizer, conv))
        assert result.finish_reason == ("length" if len(expected) == 12 else "stop")
        assert "<|im_start|>" in result.prompt


@pytest.mark.parametrize("prefill_batch_size", [1, 2, 6])
def test_greedy_equals_sequential_whatever_the_prefill_bucket(loaded, prefill_batch_size):
    decoding = DecodingConfig(max_new_tokens=10)
    profile = GenerationProfile()
    results = generate_batch(loaded.model, loaded.tokenizer, CONVERSATIONS, decoding, batch_size=6,
                             prefill_batch_size=prefill_batch_size, progress=False, profile=profile)
    expected = [sequential_greedy(loaded.model, loaded.tokenizer, conv, 10) for conv in CONVERSATIONS]
    assert [r.text for r in results] == [loaded.tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    # the profile counts what was done: every prompt token prefilled (the last one of each prompt is
    # the first decode input) and every generated token
    assert profile.prompt_tokens == sum(len(encode_chat(loaded.tokenizer, c)) - 1 for c in CONVERSATIONS)
    assert profile.generated_tokens == sum(len(e) for e in expected)
    assert 0 < profile.prompt_s + profile.decode_s <= profile.wall_s
    # one record per decode step: a row per response (the stop token's included), every prefill in one
    stops = sum(r.finish_reason == "stop" for r in results)
    assert len(profile.steps) == profile.decode_steps
    assert sum(step.rows for step in profile.steps) == profile.generated_tokens + stops
    assert sum(step.prefilled for step in profile.steps) == profile.prompt_tokens
    assert abs(sum(step.seconds for step in profile.steps) - profile.decode_s) < 1e-6


def test_steady_steps_leave_out_what_their_timer_cannot_see():
    """Steps after a prefill or after a change of rows are not timed alone (mlx-lm runs a step ahead)."""
    steps = [DecodeStep(8, 0.1, prefilled=300), DecodeStep(16, 0.2, prefilled=300), DecodeStep(16, 0.01),
             DecodeStep(16, 0.3), DecodeStep(16, 0.3), DecodeStep(12, 0.25), DecodeStep(12, 0.2),
             DecodeStep(4, 0.1), DecodeStep(4, 0.1)]
    profile = GenerationProfile(steps=steps)
    assert profile.steady_steps() == [steps[3], steps[4], steps[6], steps[8]]
    assert profile.steady_steps(min_rows=12) == [steps[3], steps[4], steps[6]]
    assert profile.steady_steps(min_rows=32) == []


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (40, 0.7), (40, 0.05), (200, 0.95)])
def test_top_candidates_keep_what_mlx_lm_keeps(top_k, top_p):
    """Same kept tokens and values as mlx-lm's top-p then top-k over the sorted vocabulary."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p

    mx.random.seed(1)
    logits = mx.random.normal((6, 1000)) * mx.array([0.5, 1, 2, 4, 8, 16])[:, None]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    reference = apply_top_k(apply_top_p(logprobs, top_p) if top_p < 1 else logprobs, top_k)
    ids, values = top_candidates(logprobs, top_k, top_p)
    for row in range(logprobs.shape[0]):
        want = {i: v for i, v in enumerate(reference[row].tolist()) if v != float("-inf")}
        got = {i: v for i, v in zip(ids[row].tolist(), values[row].tolist()) if v != float("-inf")}
        assert got == want
    assert (values[:, :-1] >= values[:, 1:]).all().item()  # most likely first


def test_candidate_sampler_draws_only_kept_tokens_with_their_frequencies():
    import mlx.core as mx
    import numpy as np

    decoding = DecodingConfig(temperature=1.0, top_k=3, top_p=0.9)
    sampler = candidate_sampler(decoding)
    probs = mx.array([0.5, 0.3, 0.15, 0.05])
    logprobs = mx.broadcast_to(mx.log(probs), (20000, 4))
    mx.random.seed(0)
    counts = np.bincount(np.array(sampler(logprobs)), minlength=4) / 20000
    # top-p 0.9 keeps 0.5, 0.3, 0.15 (mass above 0.15 is 0.8 < 0.9); renormalized over 0.95
    assert counts[3] == 0
    np.testing.assert_allclose(counts[:3], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], atol=0.015)
    assert candidate_sampler(DecodingConfig()) is None  # greedy stays mlx-lm's argmax
    assert candidate_sampler(DecodingConfig(temperature=0.7, top_p=0.9)) is None  # no top-k bound


def test_sampling_is_reproducible_with_seed_and_callback_sees_all(loaded):
    decoding = DecodingConfig(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3)
    seen = {}
    first = generate_batch(loaded.model, loaded.tokenizer, CONVERSATIONS, decoding, batch_size=3,
                           progress=False, on_result=lambda i, r: seen.__setitem__(i, r.text))
    second = generate_batch(loaded.model, loaded.tokenizer, CONVERSATIONS, decoding, batch_size=3, progress=False)
    assert [r.text for r in first] == [r.text for r in second]
    assert seen == {i: r.text for i, r in enumerate(first)}


def test_system_prompt_is_added_once(loaded):
    conv = [{"role": "user", "content": "hi"}]
    assert with_system(conv, "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    assert len(with_system(CONVERSATIONS[-1], "Be brief.")) == 2  # already has one
    with_sys = encode_chat(loaded.tokenizer, conv, system="Be brief.")
    assert len(with_sys) > len(encode_chat(loaded.tokenizer, conv))


def test_empty_input_gives_empty_output(loaded):
    assert generate_batch(loaded.model, loaded.tokenizer, [], DecodingConfig(), progress=False) == []


def test_progress_counts_a_stopped_rows_unused_budget():
    bar = GenerationProgress(rows=4, max_new_tokens=10, file=io.StringIO())
    for _ in range(3):
        bar.token()
    assert bar.bar.n == 3
    bar.row_done(3)  # stopped after 3 of its 10 tokens: all 10 are done
    assert bar.bar.n == 10 and bar.bar.total == 40
    bar.refresh(3)
    assert bar.bar.postfix.startswith("1/4 seq, ")
    bar.close()


def test_generation_bar_ends_at_its_whole_budget(loaded, monkeypatch):
    import mlx_med.evaluation.generate as generate

    closed = []

    class Recording(generate.GenerationProgress):
        def close(self):
            closed.append((self.bar.n, self.bar.total, self.rows_done))
            super().close()

    monkeypatch.setattr(generate, "GenerationProgress", Recording)
    generate_batch(loaded.model, loaded.tokenizer, CONVERSATIONS, DecodingConfig(max_new_tokens=12), batch_size=4)
    assert closed == [(len(CONVERSATIONS) * 12, len(CONVERSATIONS) * 12, len(CONVERSATIONS))]
