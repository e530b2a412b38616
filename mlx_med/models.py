"""Load an MLX (or HF safetensors) model folder for training, evaluation or chat.

Stands on ``mlx_lm.load``; adds config normalisation (``hf_config.normalize_for_mlx``), the backend's
compute policy (``backend.prepare_for_compute``: fp32 on CPU, quantized/bf16 on GPUs) and errors
that name the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn

from mlx_med.backend import Backend, detect_backend, prepare_for_compute
from mlx_med.errors import UserError
from mlx_med.hf_config import normalize_for_mlx, offline_hub


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict[str, Any]
    path: Path
    backend: Backend


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder, with a clear error when it is missing or unreadable."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise UserError(f"model folder not found: {model_dir}")
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (is this a model folder? convert it with mlx-med convert)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def load_model(model_dir: str | Path, backend: Backend | None = None, compute: bool = True) -> LoadedModel:
    """Load model + tokenizer from ``model_dir``.

    Args:
        model_dir: an MLX folder (``mlx-med convert`` output) or an HF safetensors folder.
        backend: compute policy; detected when None.
        compute: apply the backend's compute policy (dequantize + fp32 on CPU). Pass False to get
            the weights exactly as stored (fuse, export).
    """
    offline_hub()
    from mlx_lm.utils import load as mlx_load

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir}: no *.safetensors weights")
    fixes = {k: v for k, v in normalize_for_mlx(config).items() if config.get(k) != v}
    try:
        # Never run code shipped with a model folder (auto_map), and never ask about it on stdin.
        model, tokenizer = mlx_load(str(model_dir), model_config=fixes, trust_remote_code=False,
                                    tokenizer_config={"trust_remote_code": False})
    except ValueError as err:
        raise UserError(f"{model_dir}: cannot load model: {err}") from None
    except RuntimeError as err:  # MLX's "[load_safetensors] ... incomplete download or corrupt file?"
        raise UserError(f"{model_dir}: cannot read the weights: {err}") from None
    backend = backend or detect_backend()
    if compute:
        model = prepare_for_compute(model, backend)
    return LoadedModel(model, tokenizer, {**config, **fixes}, model_dir, backend)
