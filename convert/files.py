"""Model-folder files shared by the converters: weight shards (checked before loading) and tokenizer files.

Errors name the file: a missing shard, an index that points nowhere and a corrupt safetensors header
are the usual ways a downloaded checkpoint is broken, and mlx/transformers report them obscurely.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlx_med.errors import UserError

INDEX_FILE = "model.safetensors.index.json"

# What a tokenizer (and its chat template) may consist of; copied verbatim between folders.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# transformers 5 saves this class name, which transformers 4 (and so vLLM and friends) cannot resolve;
# PreTrainedTokenizerFast is the same class under the name both versions know.
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """``({name: (shape, dtype)}, metadata)`` of a safetensors file, reading only its header.

    Raises:
        UserError: the file is missing or its header is corrupt (truncated download, not safetensors).
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{path}: weight file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
            return tensors, dict(f.metadata() or {})
    except SafetensorError as err:
        raise UserError(f"{path}: corrupt safetensors file ({err}); download or convert it again") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a model folder, each checked to exist and to have a readable header.

    Follows ``model.safetensors.index.json`` when present (every shard it names must exist), else
    takes ``model*.safetensors`` as mlx-lm does.

    Raises:
        UserError: naming the folder or file that is missing or broken.
    """
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index}: not a safetensors index ({err})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise UserError(f"{index} lists {len(missing)} missing shard(s): {', '.join(missing[:3])}")
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no model*.safetensors weights")
    for path in files:
        read_safetensors_header(path)
    return files


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and chat-template files of ``src`` into ``dst``, made loadable by transformers 4 and 5.

    ``tokenizer_config.json`` gets a class name both major versions know and the chat template inline
    (older readers ignore ``chat_template.jinja``). Returns the names copied.

    Raises:
        UserError: ``src`` has no tokenizer.
    """
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied and "vocab.json" not in copied:
        raise UserError(f"{src}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    for name in copied:
        shutil.copy2(src / name, dst / name)
    if "tokenizer_config.json" in copied:
        config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
        write_tokenizer_config(dst, make_portable(config, dst))
    return copied


def make_portable(tokenizer_config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``tokenizer_config`` with a portable class name and the folder's chat template inline."""
    out = dict(tokenizer_config)
    cls = out.get("tokenizer_class")
    out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS.get(cls, cls) if cls else "PreTrainedTokenizerFast"
    template = folder / "chat_template.jinja"
    if "chat_template" not in out and template.is_file():
        out["chat_template"] = template.read_text(encoding="utf-8")
    return out


def write_tokenizer_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or ``{}`` when it is absent; a clear error when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
