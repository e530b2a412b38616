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
from mlx_med.io import save_safetensors

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: optim.Optimizer,
                    state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` and delete all but the newest ``keep`` ones."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    try:
        save_safetensors(tmp / "adapters.safetensors", dict(tree_flatten(model.trainable_parameters())),
                         metadata={"format": "mlx"})
        save_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Only whole checkpoints count and the newest ``keep`` survive, so the last good one is never deleted
    # (a diverged step is never saved: see loop.train).
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


class CheckpointUnreadable(UserError):
    """A checkpoint folder whose files are missing, truncated or corrupt (a resume tries an older one)."""


def read_checkpoint(path: Path) -> tuple[dict[str, mx.array], dict[str, mx.array], dict[str, Any]]:
    """Adapter weights, optimizer arrays and loop state of one checkpoint, all read before any is used.

    Raises:
        CheckpointUnreadable: a file is missing or does not parse, or a weight is NaN/inf.
    """
    try:
        weights = mx.load(str(path / "adapters.safetensors"))
        saved = mx.load(str(path / "optimizer.safetensors"))
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointUnreadable(f"{path}: cannot read ({err})") from None
    for name, value in weights.items():
        if not mx.all(mx.isfinite(value)).item():
            raise CheckpointUnreadable(f"{path}: weight {name} holds NaN/inf")
    return weights, saved, state


def load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict[str, Any]:
    """Restore adapter weights and optimizer state in place; return the saved loop state.

    Raises:
        CheckpointUnreadable: the checkpoint's files are missing or corrupt (nothing was changed).
        UserError: the checkpoint does not match the model's trainable parameters.
    """
    weights, saved, state = read_checkpoint(path)
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        raise UserError(f"{path}: checkpoint does not match this run's adapter (e.g. missing {missing}); "
                        "was the LoRA configuration changed?")
    model.load_weights(list(weights.items()), strict=False)
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
    return state
