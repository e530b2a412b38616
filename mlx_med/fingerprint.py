"""Content fingerprints of model folders, adapters and data files, and the cache keys built on them.

A fingerprint is a sha256 over every byte that matters (weights, config, tokenizer), streamed in
1 MiB chunks. Hashing a multi-GB model takes seconds, so each file's hash is cached by
(absolute path, size, mtime_ns), in memory and in ``~/.cache/mlx-med/fingerprints.json``
(``MLX_MED_CACHE`` moves it): an unchanged file is never read twice, a changed one always is.

Used to refuse merging adapters trained on different bases, to resume an eval only with the same
model, and as the key of every reused result (eval resume, sweep points, safety cache, pipeline
stages): ``cache_key`` adds the mlx-med version, so an upgrade never reuses an older result.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "chat_template.jinja", "generation_config.json")
_memory: dict[str, str] = {}


def file_stamp(path: str | Path) -> str:
    """``real path|size|mtime_ns`` of a file: what says it is unchanged without reading it (raises
    ``OSError`` when it cannot be stat'ed)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


def file_fingerprint(path: str | Path, full: bool = True) -> str:
    """sha256 (16 hex digits) of a file's bytes, cached by path, size and mtime.

    Args:
        path: the file.
        full: kept for callers of the old sampled hash; every byte is hashed either way.
    """
    path = Path(path)
    stamp = file_stamp(path)
    cached = _memory.get(stamp) or _disk_cache().get(stamp)
    if cached:
        _memory[stamp] = cached
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    value = digest.hexdigest()[:16]
    _memory[stamp] = value
    if path.stat().st_size >= CHUNK:  # small files are cheaper to re-read than to cache on disk
        _store(stamp, value)
    return value


def model_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of an MLX or HF model folder (or one .gguf file): config, tokenizer and all weights."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        return file_fingerprint(model_dir)
    digest = hashlib.sha256()
    names = [n for n in MODEL_FILES if (model_dir / n).is_file()]
    weights = sorted(p.name for p in model_dir.glob("*.safetensors")) + sorted(p.name for p in model_dir.glob("*.gguf"))
    for name in names + weights:
        digest.update(name.encode())
        digest.update(file_fingerprint(model_dir / name).encode())
    return digest.hexdigest()[:16]


def path_fingerprint(path: str | Path) -> str:
    """Fingerprint of a data file, of every file under a directory, or of every file a glob matches."""
    path = Path(path)
    digest = hashlib.sha256()
    if not path.exists() and glob.has_magic(str(path)):  # a glob such as data/pt_*.jsonl
        for match in sorted(glob.glob(str(path))):
            digest.update(os.fsencode(match))
            digest.update(path_fingerprint(match).encode())
        return digest.hexdigest()[:16]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not _ours(p))
    for file in files:
        digest.update(os.fsencode(file.relative_to(path) if path.is_dir() else file.name))
        digest.update(file_fingerprint(file).encode())
    return digest.hexdigest()[:16]


def optional_fingerprint(path: str | Path | None) -> str | None:
    """``path_fingerprint`` of an existing path, None for None or a missing path."""
    if path is None or not str(path):
        return None
    path = Path(path)
    if not path.exists() and not glob.has_magic(str(path)):
        return None
    return path_fingerprint(path)


def cache_key(**parts: Any) -> str:
    """Hash of ``parts`` (fingerprints, settings) and the mlx-med version: the key of a reusable result."""
    from mlx_med import __version__

    blob = json.dumps({"parts": parts, "mlx_med": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ours(path: Path) -> bool:
    """Bookkeeping files mlx-med writes into folders (locks, markers): not part of their content."""
    return path.name in (".mlx-med", ".mlx-med.lock")


def _cache_path() -> Path:
    from mlx_med.io import cache_dir

    return cache_dir() / "fingerprints.json"


def _disk_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(stamp: str, value: str) -> None:
    """Add one entry to the on-disk cache; a read-only or full disk only costs re-hashing later."""
    with contextlib.suppress(OSError):
        from mlx_med.io import atomic_write_json

        cache = _disk_cache()
        if len(cache) > 5000:  # bounded: drop the oldest half
            cache = dict(list(cache.items())[2500:])
        cache[stamp] = value
        atomic_write_json(_cache_path(), cache)


def safety_inputs_key(cfg: Any) -> str:
    """Key of what a cached safety screen depends on besides probes and decoding: model and adapters.

    ``cfg`` is any config with ``model`` and optional ``adapter`` / ``sft`` / ``pt`` paths (eval and
    sweep configs); missing paths count as absent.
    """
    model = getattr(cfg, "model", None)
    return cache_key(model=model_fingerprint(model) if model is not None and Path(model).exists() else None,
                     adapters={name: optional_fingerprint(getattr(cfg, name, None)) for name in ("adapter", "sft", "pt")})
