"""Put LoRA layers on a loaded model, optionally on top of a frozen, already-trained adapter.

Stands on mlx-lm: ``linear_to_lora_layers`` wraps each target ``nn.Linear`` / ``nn.QuantizedLinear``
in a ``LoRALinear`` (y = W₀x + scale · (x A) B, A: in × r, B: r × out, B = 0 at init), which works on
a quantized base, i.e. QLoRA. Scale follows PEFT: alpha / rank, or alpha / √rank with rsLoRA.

Stacking (SFT on top of PT): the PT adapter is loaded with mlx-lm's ``load_adapters``, frozen, and
its layers become ``FrozenLoRALinear``; the new SFT ``LoRALinear`` wraps that layer, so the model
computes W₀x + ΔW_pt x + ΔW_sft x while only the SFT matrices train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from mlx_med.adapters.format import Adapter, lora_scale, read_adapter
from mlx_med.errors import ConfigError, UserError
from mlx_med.train.config import LoraConfig, match_target_modules

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


@dataclass
class LoraPlan:
    """What ``apply_lora`` did: the keys inside a block, how many blocks, and the scale."""

    keys: list[str]
    num_layers: int
    rank: int
    scale: float
    dropout: float


class FrozenLoRALinear(LoRALinear):
    """A trained LoRA layer kept fixed (no dropout); a new LoRA can be stacked on it."""

    def __call__(self, x):
        return self.linear(x) + (self.scale * ((x @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def to_lora(self, r: int, scale: float, dropout: float) -> LoRALinear:
        """Called by mlx-lm's ``linear_to_lora_layers``: a fresh LoRA whose base is this layer."""
        new = LoRALinear(self.lora_a.shape[0], self.lora_b.shape[1], r=r, dropout=dropout, scale=scale)
        new.linear = self
        return new


def linear_modules(block: nn.Module) -> list[str]:
    """Paths of the linear layers inside one transformer block (a stacked LoRA counts as one)."""
    names = []
    for name, module in block.named_modules():
        if isinstance(module, FrozenLoRALinear):
            names.append(name)
        elif isinstance(module, LINEAR_TYPES) and not name.endswith(".linear"):
            names.append(name)
    return sorted(names)


def resolve_targets(model: nn.Module, requested: list[str]) -> list[str]:
    """Map ``q_proj`` / ``self_attn.q_proj`` style names to block-relative paths.

    Raises:
        ConfigError: a requested name matches no linear layer (the available ones are listed).
    """
    return match_target_modules(requested, linear_modules(model.layers[0]))


def apply_lora(model: nn.Module, cfg: LoraConfig) -> LoraPlan:
    """Freeze ``model`` and wrap the target layers of its last ``cfg.num_layers`` blocks in LoRA.

    Raises:
        ConfigError: more layers requested than the model has, or unknown target modules.
    """
    total = len(model.layers)
    num_layers = total if cfg.num_layers == -1 else cfg.num_layers
    if num_layers > total:
        raise ConfigError(f"lora.num_layers: requested {num_layers} layers but the model only has {total}")
    model.freeze()
    keys = resolve_targets(model, cfg.target_modules)
    scale = lora_scale(cfg.alpha, cfg.rank, cfg.use_rslora)
    linear_to_lora_layers(model, num_layers, {"rank": cfg.rank, "scale": scale, "dropout": cfg.dropout,
                                              "keys": keys})
    return LoraPlan(keys, num_layers, cfg.rank, scale, cfg.dropout)


def apply_frozen_adapter(model: nn.Module, adapter_dir: Path) -> Adapter:
    """Load a trained adapter into ``model`` and freeze it, ready for ``apply_lora`` on top.

    Returns:
        The adapter as read from disk (for provenance: fingerprint, phase).
    """
    adapter = read_adapter(adapter_dir)
    if adapter.meta.stacked_on:
        raise UserError(f"{adapter_dir}: is itself stacked on {adapter.meta.stacked_on.get('path')}; "
                        "stack on a PT run trained on the base alone")
    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as err:
        raise UserError(f"{adapter_dir}: does not fit this model: {err}") from None
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = FrozenLoRALinear  # same fields; changes only the forward and to_lora
    model.freeze()
    return adapter
