"""Option log-likelihoods for multiple-choice items: one forward over the prompt, the options as a batch.

Prompt layout follows lm-eval's MMLU/MedQA tasks: the question, one ``"A. text"`` line per option,
then ``"Answer:"``. It is sent as the user turn through the tokenizer's chat template (the way the
model was tuned), few-shot examples as earlier user/assistant turns (lm-eval's
``--fewshot_as_multiturn``). Each option's continuation is its letter and text as listed
(``"B. text"``), so the letter choice and a length-normalised score are both defined. Tokenizers
without a chat template get ``"User: ...\\nAssistant:"`` lines and a leading space on the
continuation (lm-eval's target delimiter).

Tokens are split as lm-eval splits them: the continuation is ``encode(context + continuation)``
minus the first ``len(encode(context))`` tokens. The score of an option is the sum of its
continuation tokens' log-probabilities (natural log, float32).

The batched path runs the shared prompt once into an mlx-lm KV cache, copies that cache across a
batch of options and scores all options with one more forward; ``shared_prefix=False`` scores each
option with its own full forward (the plain way, and the check in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlx_med.data.mcq import McqItem
from mlx_med.evaluation.generate import PLAIN_TEMPLATE_ROLES, with_system


@dataclass(frozen=True)
class EncodedItem:
    """An item tokenized for scoring: the shared prompt and one continuation per option."""

    prefix: list[int]
    continuations: list[list[int]]
    texts: list[str]  # the continuation strings (without the leading delimiter): acc_norm's lengths


def question_text(item: McqItem) -> str:
    """The question with its lettered options and the ``Answer:`` cue (lm-eval's MMLU layout)."""
    lines = [item.question] + [f"{letter}. {text}" for letter, text in item.options.items()]
    return "\n".join(lines) + "\nAnswer:"


def option_text(item: McqItem, letter: str) -> str:
    """The continuation scored for ``letter``: ``"B. text"``."""
    return f"{letter}. {item.options[letter]}"


def item_messages(item: McqItem, shots: Sequence[McqItem] = (), system: str | None = None) -> list[dict]:
    """The conversation up to the answer: shots as earlier turns, then the question."""
    messages: list[dict] = []
    for shot in shots:
        messages.append({"role": "user", "content": question_text(shot)})
        messages.append({"role": "assistant", "content": option_text(shot, shot.answer)})
    messages.append({"role": "user", "content": question_text(item)})
    return with_system(messages, system)


def encode_item(tokenizer, item: McqItem, shots: Sequence[McqItem] = (), system: str | None = None) -> EncodedItem:
    """Tokenize the prompt and every option's continuation (lm-eval's context/continuation split)."""
    messages = item_messages(item, shots, system)
    templated = bool(getattr(tokenizer, "chat_template", None))
    if templated:
        context = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        delimiter = ""

        def encode(text: str) -> list[int]:  # the template writes its own special tokens
            return list(tokenizer.encode(text, add_special_tokens=False))
    else:
        lines = [f"{PLAIN_TEMPLATE_ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages]
        context = "\n".join(lines) + "\nAssistant:"
        delimiter = " "

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text))
    prefix = encode(context)
    texts = [option_text(item, letter) for letter in item.options]
    continuations = []
    for text in texts:
        whole = encode(context + delimiter + text)
        continuations.append(whole[len(prefix):] or whole[-1:])
    return EncodedItem(prefix, continuations, texts)


def score_options(model, encoded: EncodedItem, shared_prefix: bool = True) -> list[float]:
    """Summed log-probability of each continuation given the prefix.

    Args:
        model: an mlx-lm model (live adapters may be attached).
        encoded: from ``encode_item``.
        shared_prefix: one forward over the prefix into a KV cache, then all options as one batch;
            False: one full forward per option (no cache).

    Returns:
        One float per option, in option order.
    """
    import mlx.core as mx

    from mlx_med.evaluation.batch_cache import fresh_kv_cache
    from mlx_med.kernels import logsumexp

    # the batched path copies plain KV caches; other cache kinds (rotating, SSM) score per option
    cache = fresh_kv_cache(model) if shared_prefix else None
    if cache is None:
        return [_score_full(model, encoded.prefix, c) for c in encoded.continuations]
    logits = model(mx.array(encoded.prefix)[None], cache=cache)[0, -1].astype(mx.float32)
    first = logits - logsumexp(logits)
    conts = encoded.continuations
    totals = first[mx.array([c[0] for c in conts])]
    longest = max(len(c) for c in conts)
    if longest > 1:
        batch = len(conts)
        for layer in cache:  # the prompt's keys/values, once per option (a real copy: each row is written)
            layer.keys = mx.repeat(layer.keys[..., : layer.offset, :], batch, axis=0)
            layer.values = mx.repeat(layer.values[..., : layer.offset, :], batch, axis=0)
        width = longest - 1
        # right padding: causal attention never lets a real token see a pad that comes after it
        inputs = mx.array([c[:-1] + [0] * (width - len(c) + 1) for c in conts])
        targets = mx.array([c[1:] + [0] * (width - len(c) + 1) for c in conts])
        mask = mx.array([[1.0] * (len(c) - 1) + [0.0] * (width - len(c) + 1) for c in conts])
        out = model(inputs, cache=cache).astype(mx.float32)
        picked = mx.take_along_axis(out, targets[..., None], axis=-1).squeeze(-1) - logsumexp(out)
        totals = totals + (picked * mask).sum(axis=-1)
    return totals.tolist()


def _score_full(model, prefix: list[int], continuation: list[int]) -> float:
    import mlx.core as mx

    from mlx_med.kernels import logsumexp

    tokens = mx.array(prefix + continuation)[None]
    logits = model(tokens[:, :-1])[0, len(prefix) - 1:].astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.array(continuation)[:, None], axis=-1).squeeze(-1)
    return (picked - logsumexp(logits)).sum().item()


def pick(scores: Sequence[float], lengths: Sequence[int] | None = None) -> int:
    """Index of the best option: highest score, or highest score per character (lm-eval's ``acc_norm``:
    ``argmax(ll / len(choice))`` with ``len`` the continuation's length in characters). First wins ties."""
    values = list(scores) if lengths is None else [s / max(n, 1) for s, n in zip(scores, lengths)]
    return max(range(len(values)), key=lambda i: (values[i], -i))
