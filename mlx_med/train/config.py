"""``TrainConfig``: everything one training phase (PT or SFT) needs, as a tree of dataclasses.

Filled by ``mlx_med.config.load_config(TrainConfig, recipe.yaml, flags)``; the resolved tree is
written to the run directory as ``run.yaml``. No mlx here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mlx_med.errors import ConfigError


@dataclass
class DataConfig:
    """Where the examples come from and how they become token batches."""

    train: Path | None = None  # JSONL / JSON / .txt file, or a directory of them
    valid: Path | None = None  # held-out file; None = split val_ratio off train
    val_ratio: float = 0.05  # share of train held out when no valid file is given
    skip_bad: bool = False  # count and skip malformed records instead of failing
    # SFT only
    system_prompt: str | None = None  # added to conversations that have no system turn
    overlong: Literal["truncate", "drop"] = "truncate"  # conversations longer than max_seq_len
    # PT only: tokenized corpora are cached here by content hash (None = ~/.cache/mlx-med/tokens)
    cache_dir: Path | None = None


@dataclass
class LoraConfig:
    """The adapter: where it goes and how big it is. Scale = alpha / rank (alpha / √rank with rsLoRA)."""

    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    num_layers: int = -1  # adapt the last N transformer blocks; -1 = all
    # Module names inside a block (``q_proj`` or ``self_attn.q_proj``); empty = every linear layer
    # of attention and MLP.
    target_modules: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    """AdamW and the batch it steps on."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # clip the global gradient norm; None = off
    batch_size: int = 4  # sequences per step on each process
    grad_accumulation: int = 1  # micro-batches summed into one optimizer step


@dataclass
class ScheduleConfig:
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio`` × learning_rate at the last step."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class EvalConfig:
    """Validation loss on the held-out split."""

    every: int = 50  # steps between validations (and always at the last step); 0 = only at the end
    max_batches: int = 25  # batches per validation (as mlx-lm); -1 = the whole validation split
    batch_size: int | None = None  # None = optim.batch_size
    early_stopping_patience: int | None = None  # stop after N validations without improvement
    early_stopping_min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (a final one is always written); 0 = only at the end
    keep: int = 2  # newest checkpoints kept on disk


@dataclass
class TrainConfig:
    """One training phase. ``iters`` counts optimizer steps (each of ``grad_accumulation`` micro-batches)."""

    phase: Literal["pt", "sft"] = "pt"
    model: Path | None = None  # MLX (or HF safetensors) model folder; quantized = QLoRA
    output: Path | None = None  # the run directory
    on_top_of: Path | None = None  # SFT only: a PT run dir applied (frozen) under the new adapter
    iters: int = 100
    max_seq_len: int = 512  # PT: packed block size; SFT: longest conversation kept
    seed: int = 0
    grad_checkpoint: bool = False  # recompute block activations in backward (less memory, ~30% slower)
    log_every: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def _check_numbers(self) -> None:
        """Every float setting finite and in its range (nan passes ``x <= 0`` checks, so test explicitly)."""
        o, lo, sc, ev, ck = self.optim, self.lora, self.schedule, self.eval, self.checkpoint
        _need(_finite(o.learning_rate) and o.learning_rate > 0, "optim.learning_rate", "a positive number",
              o.learning_rate)
        _need(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
        _need(_finite(o.beta1) and 0 <= o.beta1 < 1, "optim.beta1", "in [0, 1)", o.beta1)
        _need(_finite(o.beta2) and 0 <= o.beta2 < 1, "optim.beta2", "in [0, 1)", o.beta2)
        _need(_finite(o.eps) and o.eps > 0, "optim.eps", "a positive number", o.eps)
        _need(o.grad_clip is None or (_finite(o.grad_clip) and o.grad_clip > 0), "optim.grad_clip",
              "a positive number or null (off)", o.grad_clip)
        _need(_finite(lo.alpha) and lo.alpha > 0, "lora.alpha", "a positive number", lo.alpha)
        _need(_finite(sc.min_lr_ratio) and 0 <= sc.min_lr_ratio <= 1, "schedule.min_lr_ratio", "in [0, 1]",
              sc.min_lr_ratio)
        _need(ev.early_stopping_patience is None or ev.early_stopping_patience >= 1, "eval.early_stopping_patience",
              "at least 1 or null (off)", ev.early_stopping_patience)
        _need(_finite(ev.early_stopping_min_delta) and ev.early_stopping_min_delta >= 0,
              "eval.early_stopping_min_delta", ">= 0", ev.early_stopping_min_delta)
        _need(ev.every >= 0 or ev.every == -1, "eval.every", ">= 0 (or -1: never)", ev.every)
        _need(ck.every >= 0, "checkpoint.every", ">= 0", ck.every)
        _need(ck.keep >= 1, "checkpoint.keep", "at least 1", ck.keep)

    def check(self) -> None:
        """Raise ``ConfigError`` naming the setting for values that cannot work."""
        if self.model is None:
            raise ConfigError("no model: pass --model MODEL_DIR or set 'model:' in the recipe")
        if self.data.train is None:
            raise ConfigError("no training data: pass --data PATH or set 'data.train:' in the recipe")
        if self.output is None:
            raise ConfigError("no run directory: pass -o RUN_DIR or set 'output:' in the recipe")
        positive = {"iters": self.iters, "max_seq_len": self.max_seq_len, "lora.rank": self.lora.rank,
                    "optim.batch_size": self.optim.batch_size,
                    "optim.grad_accumulation": self.optim.grad_accumulation, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"'{name}' must be at least 1, got {value}")
        if self.max_seq_len < 2:
            raise ConfigError(f"'max_seq_len' must be at least 2, got {self.max_seq_len}")
        if not 0.0 <= self.data.val_ratio < 1.0:
            raise ConfigError(f"'data.val_ratio' must be in [0, 1), got {self.data.val_ratio}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"'lora.dropout' must be in [0, 1), got {self.lora.dropout}")
        self._check_numbers()
        if self.schedule.warmup_steps < 0 or self.schedule.warmup_steps >= self.iters:
            raise ConfigError(f"'schedule.warmup_steps' must be in [0, iters={self.iters}), "
                              f"got {self.schedule.warmup_steps}")
        if self.on_top_of is not None and self.phase != "sft":
            raise ConfigError("--on-top-of stacks an SFT adapter on a PT run; it needs --phase sft")
        if self.lora.num_layers == 0 or self.lora.num_layers < -1:
            raise ConfigError(f"'lora.num_layers' must be -1 (all) or at least 1, got {self.lora.num_layers}")


def _need(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"'{name}' must be {rule}, got {value}")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def match_target_modules(requested: list[str], available: list[str]) -> list[str]:
    """Block-relative module paths for ``q_proj`` / ``self_attn.q_proj`` style names (empty = all).

    Raises:
        ConfigError: naming a requested module that matches no available one.
    """
    if not requested:
        return list(available)
    keys: list[str] = []
    for name in requested:
        matches = [a for a in available if a == name or a.endswith("." + name)]
        if not matches:
            raise ConfigError(f"lora.target_modules: no linear layer named {name!r} in a block "
                              f"(available: {', '.join(available)})")
        keys += [m for m in matches if m not in keys]
    return keys
