"""Batched generation: greedy equals sequential mlx-lm greedy, order kept, sampling reproducible."""

from __future__ import annotations

import pytest

import mlx_med  # noqa: F401
from mlx_med.evaluation.decoding import DecodingConfig, make_sampler
from mlx_med.evaluation.generate import encode_chat, generate_batch, with_system

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
