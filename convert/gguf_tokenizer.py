"""A Hugging Face tokenizer folder built from a GGUF file's ``tokenizer.*`` metadata.

A GGUF carries no tokenizer.json: the vocabulary, merges, token types, special token ids and chat
template are metadata under llama.cpp's key names. transformers already knows how to turn those into
its fast tokenizers (byte-level BPE, sentencepiece, unigram, with the right pre-tokenizer split for
``tokenizer.ggml.pre``); we hand it the metadata ``mx.load`` read, so no GGUF reader or torch is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_med.convert.files import make_portable, read_json, write_tokenizer_config

from mlx_med.errors import UserError

SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}


def _transformers_gguf():
    """transformers' GGUF tokenizer converter (its module moved in transformers 5)."""
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def plain(value: Any) -> Any:
    """A metadata value as Python data (mx.load gives scalars and numeric lists as mx arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def tokenizer_settings(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tokenizer_dict, tokenizer_config)`` in transformers' GGUF vocabulary, from raw metadata."""
    mapping, _ = _transformers_gguf()
    meta = {k: plain(v) for k, v in metadata.items() if k.startswith("tokenizer.")}
    tokenizer = {name: meta[f"tokenizer.{key}"] for key, name in mapping["tokenizer"].items()
                 if f"tokenizer.{key}" in meta}
    config = {name: meta[f"tokenizer.{key}"] for key, name in mapping["tokenizer_config"].items()
              if f"tokenizer.{key}" in meta}
    if "tokens" not in tokenizer or "tokenizer_type" not in tokenizer:
        raise UserError("the GGUF has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if tokenizer["tokenizer_type"] == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    tokens = tokenizer["tokens"]
    for name, key in SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    return tokenizer, config


def write_gguf_tokenizer(metadata: dict[str, Any], architecture: str, out_dir: Path) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) into ``out_dir``.

    Args:
        metadata: the GGUF metadata as returned by ``mx.load(path, return_metadata=True)``.
        architecture: ``general.architecture`` (picks sentencepiece variants).
        out_dir: folder to write into.

    Returns:
        The tokenizer_config written.

    Raises:
        UserError: no tokenizer metadata, or a tokenizer type transformers cannot build.
    """
    from transformers import PreTrainedTokenizerFast

    _, convert = _transformers_gguf()
    tokenizer_dict, config = tokenizer_settings(metadata)
    try:
        backend, extra = convert(architecture, tokenizer_dict)
    except (ValueError, KeyError) as err:
        raise UserError(f"cannot build a tokenizer from the GGUF metadata: {err}") from None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra})
    tokenizer.save_pretrained(str(out_dir))
    written = make_portable(read_json(out_dir / "tokenizer_config.json"), out_dir)
    write_tokenizer_config(out_dir, written)
    return written
