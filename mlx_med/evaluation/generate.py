"""Batched generation for chat prompts, on mlx-lm's ``BatchGenerator`` (continuous batching).

Prompts are chat-templated, tokenized and sorted by length (longest first) so that each prefill
batch pads little; results come back in the caller's order. Under greedy decoding the output is
token-for-token what sequential ``mlx_lm.generate_step`` gives (``tests/test_generate.py``). No
printing here: the only output is an optional tqdm bar on stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mlx_med.errors import UserError
from mlx_med.evaluation.decoding import DecodingConfig, make_logits_processors, make_sampler

# Used when a tokenizer has no chat template (base models): a plain, documented layout.
PLAIN_TEMPLATE_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass
class GenerationResult:
    """One completion.

    Attributes:
        text: the completion decoded without special tokens (LLaMA-Factory's ``predict``).
        prompt_tokens: prompt length in tokens (after the chat template).
        generation_tokens: tokens generated, the stop token not counted.
        finish_reason: ``"stop"`` (end-of-turn token) or ``"length"`` (hit max_new_tokens).
        prompt: the templated prompt, decoded with special tokens (LLaMA-Factory's ``prompt``).
    """

    text: str
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str = "stop"
    prompt: str = ""


def with_system(messages: Sequence[dict], system: str | None) -> list[dict]:
    """``messages`` with ``system`` as the first turn, unless they already carry a system turn."""
    messages = [dict(m) for m in messages]
    if system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def encode_chat(tokenizer, messages: Sequence[dict], system: str | None = None) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ready for the assistant turn.

    Tokenizers without a chat template (base models) get ``"User: ...\\nAssistant:"`` lines.
    """
    messages = with_system(messages, system)
    if not messages:
        raise UserError("cannot generate from an empty conversation")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 may hand back a BatchEncoding instead of a list
        if hasattr(ids, "keys") and "input_ids" in ids:
            ids = ids["input_ids"]
        return list(ids)
    lines = [f"{PLAIN_TEMPLATE_ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    text = "\n".join(lines) + "\nAssistant:"
    return list(tokenizer.encode(text))


def generate_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    decoding: DecodingConfig,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
    on_result: Callable[[int, GenerationResult], None] | None = None,
) -> list[GenerationResult]:
    """Generate one assistant reply per conversation, several sequences at a time.

    Args:
        model: an mlx-lm model (adapters applied or not).
        tokenizer: mlx-lm ``TokenizerWrapper``.
        conversations: each a list of ``{"role", "content"}`` turns ending where the assistant
            should speak (no trailing assistant turn).
        decoding: sampling settings; ``decoding.seed`` seeds MLX's RNG when sampling.
        batch_size: sequences decoded together (also the prefill batch size).
        system: system prompt added to conversations that have none.
        progress: show a tqdm bar (sequences done, generated tokens/s) on stderr.
        on_result: called as ``on_result(index, result)`` as soon as a sequence finishes, in
            completion order (the eval runner appends it to disk so an interrupted run resumes).

    Returns:
        One ``GenerationResult`` per conversation, in the input order.
    """
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if not conversations:
        return []
    prompts = [encode_chat(tokenizer, conv, system) for conv in conversations]
    # Longest first: neighbours in a prefill batch have similar lengths (little padding) and an
    # out-of-memory shows up at the start rather than after an hour.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if not decoding.greedy:
        mx.random.seed(decoding.seed)

    gen = BatchGenerator(
        model,
        max_tokens=decoding.max_new_tokens,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        sampler=make_sampler(decoding),
        logits_processors=make_logits_processors(decoding),
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    bar = _progress_bar(len(prompts), progress)
    results: list[GenerationResult | None] = [None] * len(prompts)
    try:
        uids = gen.insert([prompts[i] for i in order], [decoding.max_new_tokens] * len(order))
        index_of = dict(zip(uids, order))
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        generated = 0
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":  # the stop token itself is not part of the answer
                    tokens[r.uid].append(r.token)
                    generated += 1
                if r.finish_reason is None:
                    continue
                i = index_of[r.uid]
                ids = tokens.pop(r.uid)
                results[i] = GenerationResult(
                    text=tokenizer.decode(ids, skip_special_tokens=True),
                    prompt_tokens=len(prompts[i]),
                    generation_tokens=len(ids),
                    finish_reason=r.finish_reason,
                    prompt=tokenizer.decode(prompts[i], skip_special_tokens=False),
                )
                if on_result is not None:
                    on_result(i, results[i])
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.set_postfix_str(f"{generated / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s")
    finally:
        gen.close()
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="seq", leave=False, dynamic_ncols=True)
