"""PT data: tokenize raw text once (cached by content hash), EOS between documents, pack into blocks.

The corpus becomes one token stream ``doc₁ EOS doc₂ EOS …``. Window ``k`` is
``stream[k·B : k·B + B + 1]`` (B = block size): its first B tokens are inputs, its last B are
targets, so consecutive windows share one token and every token of the stream is a target exactly
once. No padding; only the last partial window (< B targets) of the training stream is left out,
and reported. Documents attend across EOS inside a window, as in GPT-style pre-training packing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_med.data.batches import Batch
from mlx_med.data.readers import SkipReport, iter_examples
from mlx_med.errors import UserError
from mlx_med.fingerprint import path_fingerprint

CACHE_VERSION = 1  # bump when the tokenization rule below changes


@dataclass
class TokenStream:
    """All documents of a corpus, tokenized, EOS-terminated, concatenated."""

    tokens: np.ndarray  # int32
    starts: np.ndarray  # int64 offset of each document in ``tokens``
    skipped: int = 0  # bad records skipped (``skip_bad``)

    @property
    def documents(self) -> int:
        return len(self.starts)

    def document(self, i: int) -> np.ndarray:
        end = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.tokens)
        return self.tokens[self.starts[i] : end]

    def select(self, doc_ids: np.ndarray) -> TokenStream:
        """A new stream of the chosen documents, in the given order."""
        docs = [self.document(int(i)) for i in doc_ids]
        starts = np.cumsum([0] + [len(d) for d in docs[:-1]]).astype(np.int64)
        tokens = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        return TokenStream(tokens, starts)

    @staticmethod
    def concat(streams: list[TokenStream]) -> TokenStream:
        offsets = np.cumsum([0] + [len(s.tokens) for s in streams[:-1]])
        return TokenStream(np.concatenate([s.tokens for s in streams]),
                           np.concatenate([s.starts + o for s, o in zip(streams, offsets)]).astype(np.int64),
                           sum(s.skipped for s in streams))

    def split(self, val_ratio: float, seed: int) -> tuple[TokenStream, TokenStream]:
        """Hold out whole documents (at least one) so no validation text is also trained on."""
        if self.documents < 2:
            raise UserError("cannot hold out validation text from a single document; pass --valid PATH "
                            "or set data.val_ratio: 0")
        n_val = min(self.documents - 1, max(1, round(self.documents * val_ratio)))
        order = np.random.default_rng([seed, 0x5EED]).permutation(self.documents)
        return self.select(np.sort(order[n_val:])), self.select(np.sort(order[:n_val]))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: two tokenizers with equal hashes encode alike."""
    digest = hashlib.sha256()
    from mlx_med.data.sft import hf_tokenizer

    backend = hf_tokenizer(tokenizer)
    inner = getattr(backend, "backend_tokenizer", None)
    if inner is not None and hasattr(inner, "to_str"):
        digest.update(inner.to_str().encode())
    else:  # slow tokenizers: the vocabulary is the best stable summary
        digest.update(json.dumps(sorted(backend.get_vocab().items())).encode())
    digest.update(f"{tokenizer.eos_token_id}|{getattr(backend, 'bos_token_id', None)}".encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-med" / "tokens"


def encode_document(text: str, tokenizer) -> list[int]:
    """The tokenizer's own encoding (BOS if it adds one) plus one EOS."""
    ids = tokenizer.encode(text)
    eos = tokenizer.eos_token_id
    return ids if ids and ids[-1] == eos else [*ids, eos]


def load_token_stream(path: Path, tokenizer, cache_dir: Path | None = None, skip_bad: bool = False,
                      write_cache: bool = True) -> TokenStream:
    """Tokenize every PT document under ``path`` once; later calls read ``<cache_dir>/<hash>.npz``.

    The hash covers the data's bytes, the tokenizer and the tokenization rule, so editing any of
    them re-tokenizes and re-running or resuming a phase never does. ``write_cache=False`` reads
    the cache but never writes it (the non-zero ranks of a distributed run).

    Raises:
        DataError: a bad record (unless ``skip_bad``), naming file, line and field.
        UserError: no documents, or a tokenizer without EOS.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; PT packing needs one to separate documents")
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path not found: {path}")
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{path_fingerprint(path)}|{tokenizer_fingerprint(tokenizer)}|{skip_bad}".encode()
    ).hexdigest()[:24]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_dir / f"{key}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as data:
                return TokenStream(data["tokens"], data["starts"], int(data["skipped"]))
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    report = SkipReport()
    docs = [np.asarray(encode_document(ex.text, tokenizer), np.int32)
            for ex in iter_examples(path, kind="text", skip_bad=skip_bad, report=report)]
    if not docs:
        raise UserError(f"{path}: no text documents to train on")
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]]).astype(np.int64)
    stream = TokenStream(np.concatenate(docs), starts, report.skipped)
    if not write_cache:
        return stream
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npz"
    np.savez(tmp, tokens=stream.tokens, starts=stream.starts, skipped=stream.skipped)
    os.replace(tmp, cached)
    return stream


class PackedDataset:
    """A token stream cut into ``block_size``-target windows; one example = one window.

    With ``keep_tail`` (validation) the last partial window is kept as a shorter example, padded and
    masked when batched, so every held-out token is scored.
    """

    def __init__(self, stream: TokenStream, block_size: int, seed: int = 0, keep_tail: bool = False):
        self.stream, self.block_size, self.seed = stream, block_size, seed
        n = len(stream.tokens)
        self.full_windows = max(0, (n - 1) // block_size)
        tail = n - 1 - self.full_windows * block_size
        self.has_tail = keep_tail and tail > 0
        self.dropped_tokens = 0 if keep_tail else max(0, tail)

    def __len__(self) -> int:
        return self.full_windows + int(self.has_tail)

    @property
    def target_tokens(self) -> int:
        return len(self.stream.tokens) - 1 - self.dropped_tokens

    def window(self, k: int) -> np.ndarray:
        start = k * self.block_size
        return self.stream.tokens[start : start + self.block_size + 1]

    def epoch_batches(self, epoch: int, global_batch: int) -> list[np.ndarray]:
        """A fresh permutation of the windows each epoch; the last incomplete batch is left out."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        count = len(order) // global_batch
        return [order[i * global_batch : (i + 1) * global_batch] for i in range(count)]

    def eval_batches(self, batch_size: int) -> list[np.ndarray]:
        ids = np.arange(len(self))
        return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]

    def collate(self, ids: np.ndarray) -> Batch:
        windows = [self.window(int(k)) for k in ids]
        width = self.block_size
        inputs = np.zeros((len(windows), width), np.int32)
        targets = np.zeros((len(windows), width), np.int32)
        mask = np.zeros((len(windows), width), np.float32)
        for i, w in enumerate(windows):
            length = len(w) - 1
            inputs[i, :length], targets[i, :length], mask[i, :length] = w[:-1], w[1:], 1.0
        return Batch(inputs, targets, mask, sum(len(w) - 1 for w in windows))
