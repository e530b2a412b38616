"""Normalise ``config.json`` between transformers' and mlx-lm's conventions.

transformers 5.x writes RoPE settings as ``rope_parameters: {rope_theta, rope_type, ...}`` while
mlx-lm reads a top-level ``rope_theta`` (silently defaulting to 10000) and ``rope_scaling``. A
SmolLM2 folder saved by transformers 5 therefore loads in mlx-lm with wrong logits unless the key is
lifted. Older transformers read ``torch_dtype``, newer ``dtype``. Both directions are handled here.
``offline_hub`` keeps transformers and huggingface_hub off the network (mlx-med reads local folders).
"""

from __future__ import annotations

import copy
import os
from typing import Any

MLX_ONLY_KEYS = ("quantization", "quantization_config")


def normalize_for_mlx(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of an HF config with the keys mlx-lm reads filled in from their transformers-5 forms."""
    out = copy.deepcopy(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in out and "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default") and not out.get("rope_scaling"):
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def normalize_for_hf(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A copy of an MLX config fit for transformers: no MLX quantization keys, both RoPE forms, dtype."""
    out = {k: v for k, v in copy.deepcopy(config).items() if k not in MLX_ONLY_KEYS}
    if "rope_theta" in out and not isinstance(out.get("rope_parameters"), dict):
        params: dict[str, Any] = {"rope_theta": out["rope_theta"], "rope_type": "default"}
        if isinstance(out.get("rope_scaling"), dict):
            params.update(out["rope_scaling"])
            params.setdefault("rope_type", out["rope_scaling"].get("type", "default"))
        out["rope_parameters"] = params
    out["torch_dtype"] = dtype
    out["dtype"] = dtype
    return out


def offline_hub() -> None:
    """Keep transformers / huggingface_hub off the network: mlx-med only reads local folders.

    Set before they are imported (they read these at import); a user's own setting wins.
    """
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
