"""The adapter directory: mlx-lm's layout plus an ``mlx_med`` block of provenance.

A run or adapter directory holds::

    adapters.safetensors   keys "<module path>.lora_a" (in, r) and "<module path>.lora_b" (r, out),
                           e.g. "model.layers.3.self_attn.q_proj.lora_a" (mlx-lm's convention)
    adapter_config.json    mlx-lm's fields (fine_tune_type, num_layers,
                           lora_parameters {rank, scale, dropout, keys}) + "mlx_med": AdapterMeta

so ``mlx_lm.load(model, adapter_path=DIR)`` works on it too. The low-rank update of one module is
ΔW (out × in) = scale · (lora_a @ lora_b)ᵀ, scale = lora_alpha / rank (PEFT convention;
lora_alpha / √rank with rsLoRA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_med.errors import UserError
from mlx_med.io import atomic_write_json, save_safetensors

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1
A_SUFFIX, B_SUFFIX = ".lora_a", ".lora_b"  # the only place these key names are spelled
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class AdapterMeta:
    """Provenance that merge/fuse/eval rely on. ``phase``: pt, sft, merged or imported."""

    phase: str
    base_model: str = ""
    base_fingerprint: str = ""
    lora_alpha: float = 16.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    # Set when SFT was trained with a frozen PT adapter applied: {"path", "fingerprint", "phase"}.
    stacked_on: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. merge method and weights
    format: int = FORMAT_VERSION


@dataclass
class Adapter:
    """One LoRA adapter in memory. ``keys`` are module paths inside a layer (``self_attn.q_proj``)."""

    rank: int
    scale: float
    num_layers: int
    keys: list[str]
    weights: dict[str, mx.array]
    meta: AdapterMeta
    dropout: float = 0.0
    path: Path | None = None

    def modules(self) -> list[str]:
        """Full module paths that carry an update, in a stable order."""
        return modules_of(self.weights)

    def has(self, module: str) -> bool:
        return module + A_SUFFIX in self.weights

    def raw_factors(self, module: str) -> tuple[mx.array, mx.array]:
        """The stored (lora_a: in × r, lora_b: r × out), as stored (dtype, no scale)."""
        return self.weights[module + A_SUFFIX], self.weights[module + B_SUFFIX]

    def dims(self, module: str) -> tuple[int, int]:
        """(in, out) of the layer this module's update is for."""
        a, b = self.raw_factors(module)
        return a.shape[0], b.shape[1]

    def factors(self, module: str) -> tuple[mx.array, mx.array]:
        """(A: in × r, B: r × out) in fp32 with the scale folded into B, so ΔW = (A @ B)ᵀ."""
        a, b = self.raw_factors(module)
        return a.astype(mx.float32), b.astype(mx.float32) * self.scale

    def delta(self, module: str) -> mx.array:
        """ΔW (out × in) of one module, in fp32: the one place an update is formed from its factors."""
        a, b = self.factors(module)
        return (a @ b).T

    def config_json(self) -> dict[str, Any]:
        return {
            "fine_tune_type": "lora",
            "num_layers": self.num_layers,
            "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": self.keys},
            "mlx_med": dataclasses.asdict(self.meta),
        }


def factor_keys(module: str) -> tuple[str, str]:
    """The safetensors keys of one module's factors: ``(lora_a key, lora_b key)``."""
    return module + A_SUFFIX, module + B_SUFFIX


def lora_scale(lora_alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / √r with rsLoRA."""
    return lora_alpha / (math.sqrt(rank) if use_rslora else rank)


def read_adapter(path: str | Path) -> Adapter:
    """Load an adapter directory (ours, or a plain mlx-lm one)."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise UserError(f"adapter directory not found: {path}")
    if not weights_path.is_file() and (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{path}: a PEFT adapter; import it first: mlx-med import-adapter {path} -o ADAPTER_DIR")
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise UserError(f"{path}: missing {needed.name} (is this a training run or adapter directory?)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        params = config["lora_parameters"]
        rank, scale = int(params["rank"]), float(params["scale"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{config_path}: not a LoRA adapter config ({type(err).__name__}: {err})") from None
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{config_path}: fine_tune_type {config['fine_tune_type']!r} is not supported (only lora)")
    try:
        weights = mx.load(str(weights_path))
    except Exception as err:  # mlx raises RuntimeError/ValueError for corrupt files
        raise UserError(f"{weights_path}: cannot read safetensors ({err})") from None
    raw_meta = config.get("mlx_med") or {"phase": "imported", "lora_alpha": scale * rank}
    known = {f.name for f in dataclasses.fields(AdapterMeta)}
    meta = AdapterMeta(**{k: v for k, v in raw_meta.items() if k in known})
    keys = params.get("keys") or sorted({within_layer(m) for m in modules_of(weights)})
    return Adapter(rank=rank, scale=scale, num_layers=int(config.get("num_layers", 0)), keys=list(keys),
                   weights=weights, meta=meta, dropout=float(params.get("dropout", 0.0)), path=path)


def write_adapter(adapter: Adapter, out_dir: str | Path) -> Path:
    """Write weights and config into ``out_dir`` (each file atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{WEIGHTS_FILE}.{os.getpid()}.w.tmp.safetensors"  # per process: no two writers share it
    try:
        save_safetensors(tmp, adapter.weights, metadata={"format": "mlx"})
        tmp.replace(out_dir / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(out_dir / CONFIG_FILE, adapter.config_json())
    adapter.path = out_dir
    return out_dir


def runtime_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlx", "mlx-lm", "mlx-med", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def factor_weights(module: str, a: Any, b: Any) -> dict[str, Any]:
    """The two weight-file entries of one module's factors (lora_a: in × r, lora_b: r × out)."""
    return {module + A_SUFFIX: a, module + B_SUFFIX: b}


def modules_of(weights: dict[str, Any]) -> list[str]:
    """Module paths that carry factors in a weights dict, sorted."""
    return sorted(k[: -len(A_SUFFIX)] for k in weights if k.endswith(A_SUFFIX))


def layer_index(module: str) -> int | None:
    """The decoder layer number in a module path (``model.layers.3.mlp.up_proj`` → 3), or None."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def within_layer(module: str) -> str:
    """The path inside its decoder layer (``model.layers.3.mlp.up_proj`` → ``mlp.up_proj``)."""
    match = _LAYER.search(module)
    return module[match.end():] if match else module


def module_type(module: str) -> str:
    """The last name of a module path (``model.layers.3.mlp.up_proj`` → ``up_proj``)."""
    return module.rsplit(".", 1)[-1]
