"""Batched generation for chat prompts, on mlx-lm's ``BatchGenerator`` (continuous batching).

Prompts are chat-templated, tokenized and sorted by length (longest first); mlx-lm prefills them a
few rows at a time (length buckets: neighbours have similar lengths, so a bucket pads little) while
up to ``batch_size`` rows decode together, and a finished row's slot is refilled from the queue.
A batch's common prompt start (the chat template and system prompt) is prefilled once per batch, where
that keeps every bit (``shared_prefix``). Sampling with a top-k bound draws from the k candidates only,
never sorting the vocabulary. Results
come back in the caller's order. Under greedy decoding the output is token-for-token what
sequential ``mlx_lm.generate_step`` gives (``tests/test_generate.py``), except where a row's padding
and neighbours move its logits in the last bits at a near-tie of its two best tokens (rare: one
reply in 220 in ``scripts/bench_sweep.py``). No printing here: the only output is an optional tqdm
bar on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

from mlx_med.errors import UserError
from mlx_med.evaluation.decoding import DecodingConfig, make_logits_processors, make_sampler

# Used when a tokenizer has no chat template (base models): a plain, documented layout.
PLAIN_TEMPLATE_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

# Rows per prefill batch. Prompts arrive sorted by length, so a bucket of 8 neighbours pads little,
# and 8 prompts of ~100+ tokens already give the GEMMs hundreds of rows: a whole 64-row batch in one
# prefill padded every prompt to the longest (about 1.5x the work on the demo eval set).
PREFILL_ROWS = 8


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


@dataclass(frozen=True)
class DecodeStep:
    """One decode step of a batch: ``rows`` new tokens in ``seconds`` (mlx-lm's decode timer);
    ``prefilled``: prompt tokens the same generator call prefilled after it."""

    rows: int
    seconds: float
    prefilled: int = 0


@dataclass
class GenerationProfile:
    """Where the time of one ``generate_batch`` call went (filled in when passed to it).

    ``prompt_s`` and ``decode_s`` are mlx-lm's own ``BatchGenerator`` timers (prefill; one decode
    step = forward + sampling, evaluated together); ``detokenize_s`` is ours; the rest of ``wall_s``
    is Python overhead (scheduling, bookkeeping, the first step of each refill). ``steps`` holds
    every decode step: its rows and seconds, and the prompt tokens prefilled in the same call.
    ``projections`` says how the model's projections ran (``kernels.pack_projections``).
    """

    prompt_tokens: int = 0
    shared_prompt_tokens: int = 0  # of those, tokens of a common start not computed again (``shared_prefix``)
    prompt_s: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    detokenize_s: float = 0.0
    wall_s: float = 0.0
    steps: list[DecodeStep] = field(default_factory=list)
    projections: str = ""

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.wall_s - self.prompt_s - self.decode_s - self.detokenize_s)

    def steady_steps(self, min_rows: int = 1) -> list[DecodeStep]:
        """The decode steps of at least ``min_rows`` rows whose timer saw one whole forward pass of them.

        mlx-lm's generator starts step t+1 asynchronously before returning step t, so a prefill in
        the same call waits for step t+1's forward (that time lands in the prefill's timer and step
        t+1 reads too little); a step after rows were added or removed waits for a forward over
        other rows than it returns. Kept: steps with as many rows as the step before, which
        prefilled nothing.
        """
        return [step for before, step in zip(self.steps, self.steps[1:])
                if step.rows >= min_rows and step.rows == before.rows and not before.prefilled]


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


def top_candidates(logprobs, top_k: int, top_p: float = 1.0):
    """The ``top_k`` most likely tokens per row, nucleus-filtered, without sorting the vocabulary.

    Same kept set and values as mlx-lm's ``apply_top_p`` then ``apply_top_k`` over the whole
    vocabulary: the top-k tokens are a prefix of the fully sorted order, so the probability mass
    above each of them is a cumulative sum over the candidates alone (the full-vocabulary total
    is a plain sum, no sort).

    Args:
        logprobs: ``(..., vocab)`` normalized log-probabilities.
        top_k: candidates kept per row (``0 < top_k < vocab``).
        top_p: nucleus threshold; 1 keeps all candidates.

    Returns:
        ``(ids, values)``, each ``(..., top_k)``, most likely first; dropped candidates hold -inf.
    """
    import mlx.core as mx

    ids = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., :top_k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)  # a sort of k values, not of the vocabulary
    ids, values = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
    if top_p < 1.0:
        probs = mx.exp(values.astype(mx.float32))
        total = mx.exp(logprobs.astype(mx.float32)).sum(axis=-1, keepdims=True)
        mass_above = mx.cumsum(probs, axis=-1) - probs
        values = mx.where(mass_above < top_p * total, values, mx.array(-float("inf"), values.dtype))
    return ids, values


def candidate_sampler(decoding: DecodingConfig):
    """A sampler drawing from the top-k candidate set (see ``top_candidates``), or None.

    None (use ``make_sampler``) for greedy decoding, no top-k bound, or min-p. The kept tokens and
    their probabilities are mlx-lm's; the random draw runs over k values instead of the vocabulary,
    so the same seed picks other (equally distributed) tokens than mlx-lm's sampler.
    """
    if decoding.greedy or decoding.top_k <= 0 or decoding.min_p:
        return None
    import mlx.core as mx

    fallback = make_sampler(decoding)
    inv_temp = 1.0 / decoding.temperature

    def sample(logprobs):
        if decoding.top_k >= logprobs.shape[-1]:
            return fallback(logprobs)
        ids, values = top_candidates(logprobs, decoding.top_k, decoding.top_p)
        choice = mx.random.categorical(values * inv_temp)
        return mx.take_along_axis(ids, choice[..., None], axis=-1).squeeze(-1)

    return sample


def generator_model(model, live=None, weights_by_uid: dict[int, dict[str, float]] | None = None):
    """The model as mlx-lm's ``BatchGenerator`` should call it, for ``generate_batch`` and the server alike.

    A fresh batch's common prompt start is prefilled once where that keeps every bit
    (``shared_prefix.SharedPrefixModel``); with ``weights_by_uid`` (uid → adapter weights, read at each
    forward) each row runs under its own weights (``row_weights.RowWeightedModel``; ``live`` None: the
    rows all run the model as it is).

    Returns:
        ``(model for the generator, the SharedPrefixModel or None)``: the latter counts the prompt
        tokens it did not compute again (``shared_tokens``).
    """
    from mlx_med.evaluation.row_weights import RowWeightedModel
    from mlx_med.evaluation.shared_prefix import SharedPrefixModel, sharing_applies

    per_row = weights_by_uid is not None and live is not None
    shared = SharedPrefixModel(model, live if per_row else None) if sharing_applies(model) else None
    outer = shared or model
    if weights_by_uid is not None:
        outer = RowWeightedModel(outer, live, weights_by_uid)
        if shared is not None and per_row:  # the start's pass runs once per distinct weights among the rows
            shared.row_weights = outer.current_weights
    return outer, shared


def generate_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    decoding: DecodingConfig,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
    on_result: Callable[[int, GenerationResult], None] | None = None,
    prefill_batch_size: int | None = None,
    profile: GenerationProfile | None = None,
    live=None,
    row_weights: Sequence[dict[str, float]] | None = None,
) -> list[GenerationResult]:
    """Generate one assistant reply per conversation, several sequences at a time.

    Args:
        model: an mlx-lm model (adapters applied or not).
        tokenizer: mlx-lm ``TokenizerWrapper``.
        conversations: each a list of ``{"role", "content"}`` turns ending where the assistant
            should speak (no trailing assistant turn).
        decoding: sampling settings; ``decoding.seed`` seeds MLX's RNG when sampling.
        batch_size: sequences decoded together.
        system: system prompt added to conversations that have none.
        progress: show a tqdm bar on stderr (``GenerationProgress``: percentage and ETA over the
            token budget, sequences done, generated tokens/s).
        on_result: called as ``on_result(index, result)`` as soon as a sequence finishes, in
            completion order (the eval runner appends it to disk so an interrupted run resumes).
        prefill_batch_size: prompts prefilled together (default ``min(batch_size, PREFILL_ROWS)``).
        profile: when given, filled with the time split of this call.
        live: the ``LiveAdapters`` attached to ``model``; needed with ``row_weights``.
        row_weights: adapter weights per conversation (e.g. ``{"sft": α, "pt": 1 − α}``): each row
            of the batch decodes under its own weights (``row_weights.RowWeightedModel``), so one
            batch answers at several α. The model-wide weights are restored afterwards.

    Returns:
        One ``GenerationResult`` per conversation, in the input order.
    """
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlx_med.evaluation.batch_cache import in_place_caches
    from mlx_med.kernels import pack_projections

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if row_weights is not None and (live is None or len(row_weights) != len(conversations)):
        raise UserError("row_weights needs the live adapters and one weights dict per conversation")
    started = time.perf_counter()
    if not conversations:
        return []
    prompts = [encode_chat(tokenizer, conv, system) for conv in conversations]
    # Longest first: neighbours in a prefill batch have similar lengths (little padding) and an
    # out-of-memory shows up at the start rather than after an hour.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    if not decoding.greedy:
        mx.random.seed(decoding.seed)

    projections = pack_projections(model)  # once per model: later calls find it packed
    if profile is not None:
        profile.projections = projections
    weights_by_uid: dict[int, dict[str, float]] = {}
    model, shared = generator_model(model, live, weights_by_uid if row_weights is not None else None)
    gen = BatchGenerator(
        model,
        max_tokens=decoding.max_new_tokens,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        sampler=candidate_sampler(decoding) or make_sampler(decoding),
        logits_processors=make_logits_processors(decoding),
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, prefill_batch_size or PREFILL_ROWS),
    )
    detokenize_s = 0.0
    bar = GenerationProgress(len(prompts), decoding.max_new_tokens) if progress else None
    results: list[GenerationResult | None] = [None] * len(prompts)
    try:
        with gen.stats() as stats:
            uids = gen.insert([prompts[i] for i in order], [decoding.max_new_tokens] * len(order),
                              caches=in_place_caches(model, batch_size, len(order),
                                                     tokens=max(map(len, prompts)) + decoding.max_new_tokens + 1))
            index_of = dict(zip(uids, order))
            if row_weights is not None:  # read at each forward, which starts after the inserts
                weights_by_uid.update({uid: row_weights[i] for uid, i in index_of.items()})
            tokens: dict[int, list[int]] = {uid: [] for uid in uids}
            generated = 0
            while True:
                with gen.stats() if profile is not None else nullcontext() as step:
                    responses = gen.next_generated()
                if not responses:
                    break
                if profile is not None:
                    profile.steps.append(DecodeStep(len(responses), step.decode_time, step.prompt_tokens))
                for r in responses:
                    if r.finish_reason != "stop":  # the stop token itself is not part of the answer
                        tokens[r.uid].append(r.token)
                        generated += 1
                        if bar is not None:
                            bar.token()
                    if r.finish_reason is None:
                        continue
                    i = index_of[r.uid]
                    ids = tokens.pop(r.uid)
                    tic = time.perf_counter()
                    results[i] = GenerationResult(
                        text=tokenizer.decode(ids, skip_special_tokens=True),
                        prompt_tokens=len(prompts[i]),
                        generation_tokens=len(ids),
                        finish_reason=r.finish_reason,
                        prompt=tokenizer.decode(prompts[i], skip_special_tokens=False),
                    )
                    detokenize_s += time.perf_counter() - tic
                    if on_result is not None:
                        on_result(i, results[i])
                    if bar is not None:
                        bar.row_done(len(ids))
                if bar is not None:
                    bar.refresh(generated)
    finally:
        gen.close()
        if row_weights is not None:
            live.clear_row_weights()
        if bar is not None:
            bar.close()
    if profile is not None:
        profile.prompt_tokens += stats.prompt_tokens
        profile.shared_prompt_tokens += shared.shared_tokens if shared is not None else 0
        profile.prompt_s += stats.prompt_time
        profile.decode_steps += stats.generation_steps
        profile.decode_s += stats.decode_time
        profile.generated_tokens += generated
        profile.detokenize_s += detokenize_s
        profile.wall_s += time.perf_counter() - started
    return results  # type: ignore[return-value]


class GenerationProgress:
    """The generation's tqdm bar on stderr. Its percentage and ETA count the token budget (rows x max new
    tokens; a row that stops early has its unused tokens counted when it stops), so the estimate follows
    the decode steps: rows finish in waves, and a bar counting rows extrapolated from the first to finish
    (an ETA of hours for a three-minute sweep). The rows done and the tokens/s are in its postfix."""

    def __init__(self, rows: int, max_new_tokens: int, file=None):
        from tqdm import tqdm

        self.rows, self.max_new_tokens, self.rows_done = rows, max_new_tokens, 0
        self.bar = tqdm(total=rows * max_new_tokens, desc="generate", leave=False,
                        dynamic_ncols=True, file=file,
                        bar_format="{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]")
        self.bar.set_postfix_str(f"0/{rows} seq", refresh=False)

    def token(self) -> None:
        """One generated token of a row still running."""
        self.bar.update(1)

    def row_done(self, generated: int) -> None:
        """A row ended after `generated` tokens: the rest of its budget is done too."""
        self.rows_done += 1
        self.bar.update(self.max_new_tokens - generated)

    def refresh(self, generated: int) -> None:
        """After a step: the rows done and the tokens generated per second so far."""
        rate = generated / max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{self.rows_done}/{self.rows} seq, {rate:.1f} tok/s")

    def close(self) -> None:
        self.bar.close()
