"""Build a phase's train and validation datasets from the paths in ``TrainConfig.data``.

A data path is a file, a directory of data files, or a glob pattern (``data/demo/pt_*.jsonl``)
whose matches are read in sorted order.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from mlx_med.data.packing import PackedDataset, TokenStream, load_token_stream
from mlx_med.data.readers import SkipReport, iter_examples
from mlx_med.data.sft import ChatDataset, encode_examples, split_chats
from mlx_med.errors import UserError
from mlx_med.fingerprint import path_fingerprint
from mlx_med.train.config import TrainConfig


@dataclass
class PhaseData:
    train: Any  # PackedDataset | ChatDataset
    valid: Any | None
    fingerprints: dict[str, dict[str, str]]  # {"train": {"path", "fingerprint"}, "valid": ...}
    notes: list[str] = field(default_factory=list)  # human-readable summary lines for the log


def expand_data_path(path: str | Path) -> list[Path]:
    """The files or directories a data setting names (a glob pattern may match several).

    Raises:
        UserError: nothing exists there.
    """
    text = str(path)
    if glob.has_magic(text):
        matches = [Path(p) for p in sorted(glob.glob(text))]
        if not matches:
            raise UserError(f"data pattern matches no file: {text}")
        return matches
    if not Path(text).exists():
        raise UserError(f"data path not found: {text}")
    return [Path(text)]


def data_fingerprint(path: str | Path) -> str:
    """Content fingerprint of everything a data setting names."""
    prints = [path_fingerprint(p) for p in expand_data_path(path)]
    return prints[0] if len(prints) == 1 else hashlib.sha256("|".join(prints).encode()).hexdigest()[:16]


def build_phase_data(cfg: TrainConfig, tokenizer, write_cache: bool = True) -> PhaseData:
    """Tokenize (PT: pack; SFT: template + mask) the training data and the validation split.

    Args:
        write_cache: store the PT token cache (only one process of a distributed run writes).
    """
    d = cfg.data
    fingerprints = {"train": {"path": str(d.train), "fingerprint": data_fingerprint(d.train)}}
    if d.valid is not None:
        fingerprints["valid"] = {"path": str(d.valid), "fingerprint": data_fingerprint(d.valid)}
    builder = _pt if cfg.phase == "pt" else _sft
    train, valid, notes = builder(cfg, tokenizer, write_cache)
    return PhaseData(train, valid, fingerprints, notes)


def _pt(cfg: TrainConfig, tokenizer, write_cache: bool):
    d, block = cfg.data, cfg.max_seq_len

    def stream_of(setting) -> TokenStream:
        return TokenStream.concat([load_token_stream(p, tokenizer, d.cache_dir, d.skip_bad, write_cache)
                                   for p in expand_data_path(setting)])

    stream = stream_of(d.train)
    notes = [f"PT data {d.train}: {stream.documents} documents, {len(stream.tokens)} tokens"
             + (f" ({stream.skipped} bad records skipped)" if stream.skipped else "")]
    if d.valid is not None:
        val_stream = stream_of(d.valid)
    elif d.val_ratio > 0:
        stream, val_stream = stream.split(d.val_ratio, cfg.seed)
        notes.append(f"held out {val_stream.documents} document(s) for validation (val_ratio {d.val_ratio})")
    else:
        val_stream = None
    train = PackedDataset(stream, block, seed=cfg.seed)
    if len(train) == 0:
        raise UserError(f"{d.train}: {len(stream.tokens)} tokens do not fill one block of {block}; "
                        "lower --max-seq-len or add text")
    notes.append(f"packed into {len(train)} blocks of {block} tokens, no padding"
                 + (f"; {train.dropped_tokens} tail tokens unused" if train.dropped_tokens else ""))
    valid = PackedDataset(val_stream, block, seed=cfg.seed, keep_tail=True) if val_stream is not None else None
    if valid is not None:
        notes.append(f"validation: {valid.target_tokens} tokens in {len(valid)} block(s)")
    return train, valid, notes


def _sft(cfg: TrainConfig, tokenizer, write_cache: bool):  # noqa: ARG001 (chats are not cached)
    d = cfg.data
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{cfg.model}: the tokenizer has no chat template; SFT needs one "
                        "(add chat_template to tokenizer_config.json)")

    def encode(setting):
        report = SkipReport()
        examples = chain.from_iterable(iter_examples(p, kind="chat", skip_bad=d.skip_bad, report=report)
                                       for p in expand_data_path(setting))
        chats, lengths = encode_examples(examples, tokenizer, cfg.max_seq_len, d.overlong, d.system_prompt)
        note = f"SFT data {setting}: {lengths.summary(cfg.max_seq_len)}"
        if report.skipped:
            note += f"; {report.skipped} bad record(s) skipped"
        return chats, note

    chats, note = encode(d.train)
    notes = [note]
    if not chats:
        raise UserError(f"{d.train}: no conversation fits max_seq_len={cfg.max_seq_len}; raise --max-seq-len")
    if d.valid is not None:
        val_chats, note = encode(d.valid)
        notes.append(note)
    elif d.val_ratio > 0:
        chats, val_chats = split_chats(chats, d.val_ratio, cfg.seed)
        notes.append(f"held out {len(val_chats)} conversation(s) for validation (val_ratio {d.val_ratio})")
    else:
        val_chats = None
    train = ChatDataset(chats, seed=cfg.seed)
    notes.append(f"{len(train)} training conversations, {train.target_tokens} assistant tokens to learn")
    valid = ChatDataset(val_chats, seed=cfg.seed) if val_chats else None
    return train, valid, notes
