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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_med.errors import UserError
from mlx_med.io import atomic_write_json

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1


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
        return sorted(k[: -len(".lora_a")] for k in self.weights if k.endswith(".lora_a"))

    def delta(self, module: str) -> mx.array:
        """ΔW (out × in) of one module, in fp32."""
        a, b = self.factors(module)
        return self.scale * (a @ b).T

    def factors(self, module: str) -> tuple[mx.array, mx.array]:
        """``(lora_a (in × r), lora_b (r × out))`` of one module in fp32, unscaled: ΔW = scale · (a @ b)ᵀ."""
        key_a, key_b = factor_keys(module)
        return self.weights[key_a].astype(mx.float32), self.weights[key_b].astype(mx.float32)

    def config_json(self) -> dict[str, Any]:
        return {
            "fine_tune_type": "lora",
            "num_layers": self.num_layers,
            "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": self.keys},
            "mlx_med": dataclasses.asdict(self.meta),
        }


def factor_keys(module: str) -> tuple[str, str]:
    """The safetensors keys of one module's factors: ``(lora_a key, lora_b key)``."""
    return f"{module}.lora_a", f"{module}.lora_b"


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
    keys = params.get("keys") or sorted({_within_layer(m) for m in _modules(weights)})
    return Adapter(rank=rank, scale=scale, num_layers=int(config.get("num_layers", 0)), keys=list(keys),
                   weights=weights, meta=meta, dropout=float(params.get("dropout", 0.0)), path=path)


def write_adapter(adapter: Adapter, out_dir: str | Path) -> Path:
    """Write weights and config into ``out_dir`` (each file atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp.safetensors"
    mx.save_safetensors(str(tmp), adapter.weights, metadata={"format": "mlx"})
    tmp.replace(out_dir / WEIGHTS_FILE)
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


def _modules(weights: dict[str, Any]) -> list[str]:
    return sorted(k[: -len(".lora_a")] for k in weights if k.endswith(".lora_a"))


def _within_layer(module: str) -> str:
    parts = module.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[i + 2:])
    return module
