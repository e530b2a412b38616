"""Cheap, stable fingerprints of model folders and data files.

Used to refuse merging adapters trained on different bases, and to skip pipeline stages whose inputs
did not change. A model's fingerprint hashes config.json, every safetensors header (names, shapes,
dtypes, offsets) and the first and last 64 KiB of each weights file, so two fine-tunes of one
architecture differ while a multi-GB checkpoint is fingerprinted in milliseconds.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

SAMPLE = 64 * 1024


def file_fingerprint(path: str | Path, full: bool = True) -> str:
    """sha256 of a file's bytes (``full``) or of its size, head and tail (large weights)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if full or size <= 2 * SAMPLE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            digest.update(f.read(SAMPLE))
            f.seek(size - SAMPLE)
            digest.update(f.read(SAMPLE))
    return digest.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of an MLX or HF model folder (config + weights files)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in ("config.json",):
        if (model_dir / name).exists():
            digest.update((model_dir / name).read_bytes())
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.gguf"))
    for path in weights:
        digest.update(path.name.encode())
        digest.update(file_fingerprint(path, full=False).encode())
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
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(os.fsencode(file.relative_to(path) if path.is_dir() else file.name))
        digest.update(file_fingerprint(file).encode())
    return digest.hexdigest()[:16]
