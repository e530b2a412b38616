"""Training checkpoints: adapter, optimizer state and loop counters, written atomically.

``<run>/checkpoints/step-0000120/`` holds ``adapters.safetensors`` (trainable weights),
``optimizer.safetensors`` (AdamW moments, step counter, learning rate) and ``state.json`` (step,
data position, early-stopping and log-window counters). A checkpoint directory is built under a
temporary name and renamed into place, so a kill at any moment leaves only whole checkpoints.
Randomness needs no saved state: data order is seeded per epoch and dropout per micro-batch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from mlx_med.errors import UserError

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` and delete all but the newest ``keep`` ones."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())),
                            metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict[str, Any]:
    """Restore adapter weights and optimizer state in place; return the saved loop state.

    Raises:
        UserError: the checkpoint does not match the model's trainable parameters.
    """
    weights = mx.load(str(path / "adapters.safetensors"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        raise UserError(f"{path}: checkpoint does not match this run's adapter (e.g. missing {missing}); "
                        "was the LoRA configuration changed?")
    model.load_weights(list(weights.items()), strict=False)
    saved = mx.load(str(path / "optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())

    def restore(key: str, value: mx.array) -> mx.array:
        if key not in saved:
            raise UserError(f"{path}: optimizer state lacks {key}")
        return saved[key]

    # In place: compiled update functions hold a reference to this very dict.
    optimizer.state.update(tree_map_with_path(restore, optimizer.state))
    for key in ("step", "learning_rate"):
        if key in saved:
            optimizer.state[key] = saved[key]
    mx.eval(model.trainable_parameters(), optimizer.state)
    return json.loads((path / "state.json").read_text())
