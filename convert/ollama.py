"""An Ollama ``Modelfile`` beside exported GGUF files (FROM, ADAPTER, SYSTEM, TEMPLATE, stop tokens).

``mlx-med export … --format gguf --ollama DIR`` writes ``DIR/Modelfile`` with ``FROM`` the model file;
``mlx-med export-adapter … --format gguf --ollama DIR`` then adds (or replaces) its ``ADAPTER`` line.
Ollama applies an adapter at scale 1 and takes one, so a weighted mix is exported as one adapter
(``mlx-med merge --alpha``) for Ollama, while llama.cpp takes both files with ``--lora-scaled``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlx_med.errors import UserError
from mlx_med.io import atomic_write_text
from mlx_med.prompts import system_prompt

MODELFILE = "Modelfile"

# Ollama's Go-template form of the ChatML template (Qwen, SmolLM2): what the GGUF's Jinja template does.
CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


def _relative(target: Path, folder: Path) -> str:
    """``./model.gguf`` when the file is in or under ``folder`` (Ollama resolves paths from the Modelfile)."""
    rel = os.path.relpath(target.resolve(), folder.resolve())
    return rel if rel.startswith("..") else f"./{rel}"


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def stop_tokens(gguf_path: Path) -> tuple[list[str], str | None]:
    """The end-of-generation token texts (eos, eot) and the chat template of a model GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    tokens = value("tokenizer.ggml.tokens") or []
    template = value("tokenizer.chat_template")
    stops = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        token_id = value(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens) and tokens[token_id] not in stops:
            stops.append(tokens[token_id])
    if template and "<|im_end|>" in template and "<|im_end|>" in tokens and "<|im_end|>" not in stops:
        stops.append("<|im_end|>")
    return stops, template


def write_model_modelfile(folder: Path, model_gguf: Path, language: str = "en") -> Path:
    """``folder/Modelfile`` with FROM the model GGUF, the default medical system prompt and its stop tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    stops, template = stop_tokens(model_gguf)
    lines = [f"FROM {_relative(model_gguf, folder)}"]
    if template and "<|im_start|>" in template:
        lines.append(f"TEMPLATE {_quote(CHATML_TEMPLATE)}")
    lines.append(f"SYSTEM {_quote(system_prompt(language))}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path = folder / MODELFILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def add_adapter(folder: Path, adapter_gguf: Path) -> Path:
    """Set the ``ADAPTER`` line of ``folder/Modelfile`` (written by the model export) to ``adapter_gguf``."""
    path = folder / MODELFILE
    if not path.is_file():
        raise UserError(f"{path} not found: export the base model first, e.g. "
                        f"mlx-med export BASE --format gguf -o {folder}/base.gguf --ollama {folder}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("ADAPTER ")]
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("FROM ")), 0)
    lines.insert(at, f"ADAPTER {_relative(adapter_gguf, folder)}")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def create_command(folder: Path, name: str) -> str:
    """The line that registers the model with Ollama."""
    return f"ollama create {name} -f {folder / MODELFILE}"
