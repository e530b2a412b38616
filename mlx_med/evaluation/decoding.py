"""Decoding settings shared by eval, sweeps and chat, and their translation to mlx-lm samplers."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from mlx_med.errors import ConfigError


@dataclass(frozen=True)
class DecodingConfig:
    """Sampling settings. ``temperature == 0`` means greedy (deterministic)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):  # nan passes the range checks
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ConfigError("top_k must be >= 0 and max_new_tokens >= 1")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_overrides(self, **values) -> DecodingConfig:
        return replace(self, **{k: v for k, v in values.items() if v is not None})


PRESETS: dict[str, DecodingConfig] = {
    "greedy": DecodingConfig(),
    # LLaMA-Factory's generating_args defaults (the study's "practical" configuration).
    "llamafactory": DecodingConfig(temperature=0.95, top_p=0.7, top_k=50, max_new_tokens=1024),
    "balanced": DecodingConfig(temperature=0.7, top_p=0.9),
    "creative": DecodingConfig(temperature=1.0, top_p=0.95),
}


def preset(name: str) -> DecodingConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown decoding preset {name!r} (choose from {', '.join(PRESETS)})") from None


def make_sampler(cfg: DecodingConfig):
    """An mlx-lm sampler for ``cfg`` (greedy argmax when temperature is 0)."""
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    if cfg.greedy:
        return mlx_make_sampler(temp=0.0)
    top_p = 0.0 if cfg.top_p >= 1.0 else cfg.top_p
    return mlx_make_sampler(temp=cfg.temperature, top_p=top_p, top_k=cfg.top_k, min_p=cfg.min_p)


def make_logits_processors(cfg: DecodingConfig) -> list:
    from mlx_lm.sample_utils import make_logits_processors as mlx_processors

    if cfg.repetition_penalty == 1.0:
        return []
    return mlx_processors(repetition_penalty=cfg.repetition_penalty)


def cap_to_window(decoding: DecodingConfig, model_config: dict, quiet: bool = False) -> DecodingConfig:
    """``decoding`` with ``max_new_tokens`` at most the model's context window (with a notice).

    Tokens past the window are not generated meaningfully; asking for them only costs time and memory.
    """
    window = model_config.get("max_position_embeddings") or model_config.get("max_sequence_length")
    if not isinstance(window, int) or window <= 0 or decoding.max_new_tokens <= window:
        return decoding
    if not quiet:
        import sys

        print(f"note: max_new_tokens {decoding.max_new_tokens} is more than the model's context window "
              f"({window} tokens); capped to {window}", file=sys.stderr)
    return replace(decoding, max_new_tokens=window)
