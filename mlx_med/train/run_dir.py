"""What a training run directory holds and when it may be started, resumed, replaced or skipped.

``run.yaml`` (the resolved config), ``metrics.jsonl``, ``checkpoints/``, the adapter files and, once
finished, ``done.json`` with a key over config, model, data and world size. No mlx here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from mlx_med.config import config_to_dict, load_config
from mlx_med.errors import UserError
from mlx_med.fingerprint import file_fingerprint, model_fingerprint
from mlx_med.io import (
    LOCK,
    atomic_write_text,
    check_output_dir,
    check_output_location,
    clean_leftovers,
    has_content,
)
from mlx_med.train.checkpoints import CHECKPOINTS
from mlx_med.train.config import TrainConfig
from mlx_med.train.datasets import data_fingerprint
from mlx_med.train.plots import METRICS_FILE, read_metrics

DONE_FILE = "done.json"
RUN_CONFIG = "run.yaml"
# Settings that may change between a run and its resumption (they do not change the math so far).
RESUMABLE_CHANGES = {"output", "iters", "log_every", "eval.every", "eval.max_batches", "eval.batch_size",
                     "eval.early_stopping_patience", "eval.early_stopping_min_delta", "checkpoint.every",
                     "checkpoint.keep"}


def load_run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The ``run.yaml`` a run was started with (plus flag overrides), e.g. to resume it."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RUN_CONFIG}; is this a training run directory?")
    return load_config(TrainConfig, path, {**(overrides or {}), "output": str(run_dir)})


def completed_run(cfg: TrainConfig) -> Path | None:
    """The run directory if it holds a finished run of exactly these inputs, else None (cheap)."""
    out = Path(cfg.output) if cfg.output else None
    if out is None or not (out / DONE_FILE).is_file():
        return None
    try:
        done = json.loads((out / DONE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return out if done.get("inputs_key") == inputs_key(cfg, done.get("world_size", 1)) else None


def inputs_key(cfg: TrainConfig, world_size: int) -> str:
    """Hash of everything that determines the trained adapter: config, model, data, world size."""
    parts = {k: v for k, v in config_to_dict(cfg).items() if k != "output"}
    prints = {"model": model_fingerprint(cfg.model) if cfg.model and Path(cfg.model).is_dir() else None,
              "train": optional_print(data_fingerprint, cfg.data.train), "valid": optional_print(data_fingerprint, cfg.data.valid),
              "on_top_of": adapter_fingerprint(cfg.on_top_of) if cfg.on_top_of else None}
    blob = json.dumps({"config": parts, "inputs": prints, "world": world_size}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def clean_run_leftovers(out: Path) -> None:
    """Remove what killed runs left: ``.step-*.partial`` checkpoints and temp adapter/metrics files."""
    clean_leftovers(out / CHECKPOINTS, ".step-")
    clean_leftovers(out, ".")


def clear_run_dir(out: Path) -> None:
    """Empty an (already checked) run directory for ``--force``, keeping the lock file we hold."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_run_dir(out: Path, cfg: TrainConfig, resume: bool, force: bool) -> None:
    """Raise ``UserError`` when ``out`` cannot be started, resumed or replaced as asked (cheap: no loading)."""
    if resume:  # resuming only adds to an existing run folder
        if not out.is_dir():
            raise UserError(f"cannot resume: {out} does not exist")
        if (out / RUN_CONFIG).is_file():
            check_resumable(out, cfg)
        return
    inputs = [cfg.model, cfg.data.train, cfg.data.valid, cfg.on_top_of]
    check_output_location(out, inputs=inputs)  # first: a refusal that --force cannot lift
    if out.exists() and not force and (not out.is_dir() or has_content(out)):
        raise UserError(f"{out} already exists; pass --force to replace it or --resume {out} to continue it")
    check_output_dir(out, force=force, inputs=inputs)


def truncate_metrics(out: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (a killed run may have written some)."""
    path = out / METRICS_FILE
    if path.is_file():
        kept = [json.dumps(r) + "\n" for r in read_metrics(out) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(kept))


def optional_print(fingerprint, path) -> str | None:
    """A fingerprint, or None for a missing path (the run itself reports that error)."""
    try:
        return fingerprint(path) if path is not None else None
    except UserError:
        return None


def adapter_fingerprint(run_dir: Path) -> str | None:
    weights = Path(run_dir) / "adapters.safetensors"
    return file_fingerprint(weights) if weights.is_file() else None


def check_resumable(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that would make the continuation a different run."""
    saved = flatten_config(config_to_dict(load_run_config(out)))
    now = flatten_config(config_to_dict(cfg))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise UserError(f"cannot resume {out} with changed settings ({details}); start a new run instead")


def flatten_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat
