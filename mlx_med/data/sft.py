"""SFT data: conversations through the tokenizer's chat template, loss on assistant tokens only.

Every assistant turn is a target (multi-turn included): its content and the template's end-of-turn
text (e.g. ``<|im_end|>\\n``), so the model learns to stop. Everything else (system, user, the
``<|im_start|>assistant\\n`` header) is masked. Spans are found on the rendered text: the text
of the conversation up to turn i with a generation prompt must be a prefix of the text up to and
including turn i; the tokens that start inside that span are targets. The whole conversation is
tokenized once, exactly as ``apply_chat_template`` would.

Batches are length-bucketed: each epoch shuffles the examples, sorts them by length within chunks of
``BUCKET_CHUNK`` global batches, cuts batches and shuffles the batch order; padding stays small
while the order still changes every epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mlx_med.data.batches import Batch, pad_sequences
from mlx_med.data.readers import Example
from mlx_med.errors import UserError

BUCKET_CHUNK = 16  # global batches sorted together when bucketing by length


@dataclass
class EncodedChat:
    tokens: np.ndarray  # int32
    targets: np.ndarray  # bool per token: True where the token is learned (assistant text)
    source: str = ""


@dataclass
class LengthReport:
    """What the over-long policy did."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    sources: list[str] = field(default_factory=list)  # first few dropped/truncated, for the log

    def summary(self, limit: int) -> str:
        parts = [f"{self.kept} conversation(s) kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {limit} tokens")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (longer than {limit} tokens or no assistant token left)")
        return ", ".join(parts)


def with_system_prompt(messages: Sequence[dict], system_prompt: str | None) -> list[dict]:
    """Prepend ``system_prompt`` to conversations that have no system turn of their own."""
    messages = [dict(m) for m in messages]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def assistant_spans(messages: Sequence[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation text and the character spans of each assistant turn.

    Raises:
        UserError: when the chat template does not render the conversation incrementally (a
            prefix of the conversation does not render as a prefix of the text), naming the turn.
    """
    def render(msgs: Sequence[dict], generation_prompt: bool = False) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text, end_text = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if end_text.startswith(start_text) and full.startswith(end_text):
            spans.append((len(start_text), len(end_text)))
            continue
        # Templates that rewrite earlier turns (e.g. dropping reasoning): find the content itself.
        cursor = spans[-1][1] if spans else 0
        start = full.find(message["content"], cursor)
        if start < 0:
            raise UserError(f"the chat template does not reproduce assistant turn {i} verbatim; "
                            "cannot locate the tokens to learn")
        end = start + len(message["content"])
        eos = tokenizer.eos_token or ""
        if eos and full.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return full, spans


def encode_chat(messages: Sequence[dict], tokenizer, system_prompt: str | None = None) -> EncodedChat:
    """Token ids of the templated conversation and the per-token learn mask."""
    messages = with_system_prompt(messages, system_prompt)
    text, spans = assistant_spans(messages, tokenizer)
    backend = hf_tokenizer(tokenizer)
    try:
        enc = backend(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        return _encode_by_segments(text, spans, backend)
    starts = np.asarray([s for s, _ in offsets], np.int64)
    learn = np.zeros(len(ids), bool)
    for lo, hi in spans:
        learn |= (starts >= lo) & (starts < hi)
    return EncodedChat(np.asarray(ids, np.int32), learn)


def hf_tokenizer(tokenizer):
    """The transformers tokenizer inside mlx-lm's ``TokenizerWrapper`` (or ``tokenizer`` itself)."""
    from transformers import PreTrainedTokenizerBase

    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if isinstance(inner, PreTrainedTokenizerBase) else tokenizer


def _encode_by_segments(text: str, spans: list[tuple[int, int]], backend) -> EncodedChat:
    """Tokenizers without offsets: tokenize prompt and answer pieces separately."""
    ids: list[int] = []
    learn: list[bool] = []
    cursor = 0
    for lo, hi in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[cursor:lo], False), (text[lo:hi], True)):
            if piece:
                part = backend.encode(piece, add_special_tokens=False)
                ids += part
                learn += [flag] * len(part)
        cursor = hi
    return EncodedChat(np.asarray(ids, np.int32), np.asarray(learn, bool))


def encode_examples(
    examples: Iterable[Example],
    tokenizer,
    max_seq_len: int,
    overlong: Literal["truncate", "drop"] = "truncate",
    system_prompt: str | None = None,
) -> tuple[list[EncodedChat], LengthReport]:
    """Encode chats, applying the over-long policy (a sequence may hold ``max_seq_len`` + 1 tokens,
    i.e. ``max_seq_len`` inputs).

    ``examples`` must be conversations (``iter_examples(path, kind="chat")`` guarantees it).
    """
    out, report = [], LengthReport()
    limit = max_seq_len + 1
    for ex in examples:
        chat = encode_chat(ex.messages, tokenizer, system_prompt)
        chat.source = ex.source
        if len(chat.tokens) > limit:
            if overlong == "drop":
                report.dropped += 1
                _note(report, ex.source)
                continue
            chat = EncodedChat(chat.tokens[:limit], chat.targets[:limit], ex.source)
            report.truncated += 1
            _note(report, ex.source)
        if not chat.targets[1:].any():
            report.dropped += 1
            _note(report, ex.source)
            continue
        out.append(chat)
        report.kept += 1
    return out, report


def _note(report: LengthReport, source: str) -> None:
    if len(report.sources) < 5:
        report.sources.append(source)


class ChatDataset:
    """Encoded conversations, batched by similar length."""

    def __init__(self, chats: list[EncodedChat], seed: int = 0):
        self.chats, self.seed = chats, seed
        self.lengths = np.asarray([len(c.tokens) for c in chats])

    def __len__(self) -> int:
        return len(self.chats)

    @property
    def target_tokens(self) -> int:
        return int(sum(c.targets[1:].sum() for c in self.chats))

    def epoch_batches(self, epoch: int, global_batch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self))
        chunk = global_batch * BUCKET_CHUNK
        order = np.concatenate([sorted(order[i : i + chunk], key=lambda j: self.lengths[j])
                                for i in range(0, len(order), chunk)]) if len(order) else order
        count = len(order) // global_batch
        batches = [np.asarray(order[i * global_batch : (i + 1) * global_batch]) for i in range(count)]
        return [batches[i] for i in rng.permutation(count)]

    def eval_batches(self, batch_size: int) -> list[np.ndarray]:
        ids = np.argsort(self.lengths, kind="stable")
        return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]

    def collate(self, ids: np.ndarray) -> Batch:
        chats = [self.chats[int(i)] for i in ids]
        return pad_sequences([c.tokens for c in chats], [c.targets.astype(np.float32) for c in chats])


def split_chats(chats: list[EncodedChat], val_ratio: float, seed: int) -> tuple[list[EncodedChat], list[EncodedChat]]:
    """Hold out ``val_ratio`` of the conversations (at least one) for validation."""
    if len(chats) < 2:
        raise UserError("cannot hold out validation conversations from a single one; pass --valid PATH "
                        "or set data.val_ratio: 0")
    n_val = min(len(chats) - 1, max(1, round(len(chats) * val_ratio)))
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(chats))
    return [chats[i] for i in sorted(order[n_val:])], [chats[i] for i in sorted(order[:n_val])]
