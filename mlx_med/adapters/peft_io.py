"""LoRA adapters to and from Hugging Face PEFT's format, exactly (same ΔW either side).

PEFT folder: ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``use_rslora``,
``target_modules``, ``base_model_name_or_path``, …) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r × in) and ``….lora_B.weight`` (out × r), ΔW =
scaling · B @ A with scaling = lora_alpha / r (/ √r with rsLoRA).

Ours (mlx-lm's layout): lora_a (in × r), lora_b (r × out), ΔW = scale · (lora_a @ lora_b)ᵀ. Hence
A = lora_aᵀ, B = lora_bᵀ, lora_alpha = scale · r. Module paths are the same on both sides for the
llama/qwen2/mistral families (``model.layers.N.self_attn.q_proj``).

Import handles what PEFT allows beyond one rank and one alpha: ``rank_pattern`` (per-module ranks are
zero-padded to the largest, which leaves ΔW unchanged) and ``alpha_pattern`` / rsLoRA (the per-module
scaling is folded into lora_b). What a LoRA adapter dir cannot hold is refused with the reason:
DoRA, ``modules_to_save`` (fully trained layers), LoRA biases, embedding LoRA, fan_in_fan_out layers.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_med.adapters.format import (
    Adapter,
    AdapterMeta,
    factor_weights,
    layer_index,
    lora_scale,
    module_type,
    read_adapter,
    runtime_versions,
    within_layer,
    write_adapter,
)
from mlx_med.errors import UserError
from mlx_med.io import atomic_output_dir, atomic_write_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class PeftExport:
    out_dir: Path
    rank: int
    lora_alpha: float
    modules: int
    combined_with: str | None = None  # the PT run a stacked SFT adapter was combined with
    notes: list[str] = field(default_factory=list)


def export_peft(
    src: str | Path,
    out_dir: str | Path,
    base_model: str | None = None,
    own_only: bool = False,
    force: bool = False,
) -> PeftExport:
    """Write the adapter (run dir or adapter dir) ``src`` as a PEFT LoRA folder.

    Args:
        src: an mlx-med/mlx-lm adapter or training run directory.
        out_dir: the PEFT folder to create.
        base_model: ``base_model_name_or_path`` to record (default: the adapter's recorded base).
            Point it at the HF export of the base (``mlx-med export``) to load with
            ``PeftModel.from_pretrained``.
        own_only: for an SFT run trained stacked on a PT run, export only its own ΔW. By default the
            PT adapter is combined in (rank r_pt + r_sft, exact), so the PEFT adapter is the SFT model.
        force: replace an existing ``out_dir``.
    """
    from mlx_med.adapters.merge import combine_stacked

    adapter = read_adapter(src)
    result = PeftExport(Path(out_dir), adapter.rank, 0.0, 0)
    if adapter.meta.stacked_on and not own_only:
        adapter, parent = combine_stacked(adapter)
        result.combined_with = str(parent)
        result.notes.append(
            f"{src} was trained on top of {result.combined_with}: exported both as one adapter "
            f"(rank {adapter.rank}), i.e. the SFT model; pass --own-only for its own ΔW alone"
        )
    modules = adapter.modules()
    if not modules:
        raise UserError(f"{src}: the adapter has no LoRA weights")
    tensors = {}
    for module in modules:
        a, b = adapter.raw_factors(module)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.T
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.T
    leaves = sorted({module_type(m) for m in modules})
    layers = sorted({i for i in (layer_index(m) for m in modules) if i is not None})
    total = _base_layer_count(base_model or adapter.meta.base_model)
    all_layers = layers == list(range(total)) if total else (layers and layers == list(range(layers[-1] + 1)))
    lora_alpha = adapter.scale * adapter.rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": adapter.dropout,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": leaves,
        "layers_to_transform": None if all_layers or not layers else layers,
        "layers_pattern": None,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_model or adapter.meta.base_model or None,
        "revision": None,
    }
    with atomic_output_dir(out_dir, force=force) as tmp:
        mx.save_safetensors(str(tmp / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
        atomic_write_json(tmp / PEFT_CONFIG, config)
    result.lora_alpha, result.modules, result.rank = lora_alpha, len(modules), adapter.rank
    return result


def import_peft(src: str | Path, out_dir: str | Path, base: str | Path | None = None, force: bool = False) -> Adapter:
    """Convert a PEFT LoRA folder (LLaMA-Factory, MedicalGPT, peft) into an mlx-med adapter dir.

    Args:
        src: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        out_dir: the adapter dir to create.
        base: the MLX model folder it will be used with; when given, every module is checked against
            it (present, same shape) and its fingerprint recorded, so merge/fuse can verify pairs.
        force: replace an existing ``out_dir``.
    """
    src = Path(src)
    config = _read_peft_config(src)
    raw = _read_peft_weights(src)
    rslora = bool(config.get("use_rslora", False))
    default_alpha = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}
    _check_patterns(config, src / "adapter_config.json")
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in raw.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _LORA_KEY.match(name)
        if not match:
            raise UserError(f"{src / PEFT_WEIGHTS}: tensor {key!r} is not a LoRA A/B matrix "
                            "(bias, embedding or fully trained module); only plain LoRA can be imported")
        pairs.setdefault(match["module"], {})[match["which"]] = value
    incomplete = sorted(m for m, p in pairs.items() if set(p) != {"A", "B"})
    if incomplete:
        raise UserError(f"{src / PEFT_WEIGHTS}: {incomplete[0]} has only lora_{next(iter(pairs[incomplete[0]]))}")
    if not pairs:
        raise UserError(f"{src / PEFT_WEIGHTS}: no LoRA weights")

    ranks = {m: p["A"].shape[0] for m, p in pairs.items()}
    for module, p in pairs.items():
        if p["B"].shape[1] != ranks[module]:
            raise UserError(f"{src / PEFT_WEIGHTS}: {module}: lora_A has rank {ranks[module]} but lora_B "
                            f"{p['B'].shape[1]}")
    rank = max(ranks.values())
    # One global scale (the most common per-module scaling); other modules fold the ratio into B.
    scales = {m: lora_scale(_pattern_value(alpha_pattern, m, default_alpha), ranks[m], rslora) for m in pairs}
    scale = Counter(scales.values()).most_common(1)[0][0]
    weights = {}
    for module, p in sorted(pairs.items()):
        a = p["A"].astype(mx.float32).T  # (in, r_m)
        b = p["B"].astype(mx.float32).T * (scales[module] / scale)  # (r_m, out)
        pad = rank - ranks[module]
        if pad:
            a = mx.concatenate([a, mx.zeros((a.shape[0], pad))], axis=1)
            b = mx.concatenate([b, mx.zeros((pad, b.shape[1]))], axis=0)
        weights.update(factor_weights(module, a, b))

    keys = sorted({within_layer(m) for m in pairs})
    layers = sorted({i for i in (layer_index(m) for m in pairs) if i is not None})
    uniform = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1
    meta = AdapterMeta(
        phase="imported",
        base_model=str(base) if base else str(config.get("base_model_name_or_path") or ""),
        lora_alpha=default_alpha if uniform else scale * rank,
        use_rslora=rslora if uniform else False,
        target_modules=sorted({module_type(m) for m in pairs}),
        versions=runtime_versions(),
        extra={"peft": {"source": str(src), "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                        "use_rslora": rslora, "rank_pattern": config.get("rank_pattern") or {},
                        "alpha_pattern": alpha_pattern,
                        "base_model_name_or_path": config.get("base_model_name_or_path")}},
    )
    adapter = Adapter(rank=rank, scale=scale, num_layers=(layers[-1] + 1) if layers else 0, keys=keys,
                      weights=weights, meta=meta, dropout=float(config.get("lora_dropout", 0.0) or 0.0))
    if base is not None:
        _check_against_base(adapter, Path(base))
    with atomic_output_dir(out_dir, force=force) as tmp:
        write_adapter(adapter, tmp)
    adapter.path = Path(out_dir)
    return adapter


def _read_peft_config(src: Path) -> dict[str, Any]:
    path = src / PEFT_CONFIG
    if not src.is_dir():
        raise UserError(f"PEFT adapter folder not found: {src}")
    if not path.is_file():
        raise UserError(f"{src}: no {PEFT_CONFIG} (is this a PEFT adapter folder?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if "lora_parameters" in config:
        raise UserError(f"{src}: this is already an mlx-lm/mlx-med adapter, not a PEFT one (use it directly)")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise UserError(f"{path}: peft_type {kind!r}; only LoRA adapters can be imported")
    refusals = {
        "use_dora": "DoRA adapters have a magnitude vector that plain LoRA cannot hold",
        "modules_to_save": "modules_to_save means fully trained layers (e.g. embed_tokens/lm_head) that a LoRA "
                           "adapter cannot hold; fuse it with peft's merge_and_unload and convert the model",
        "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layers) is not supported",
        "lora_bias": "LoRA biases are not supported",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise UserError(f"{path}: {key} is set: {why}")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={config['bias']!r}: trained biases are not supported (only bias='none')")
    return config


def _read_peft_weights(src: Path) -> dict[str, mx.array]:
    path = src / PEFT_WEIGHTS
    if not path.is_file():
        if (src / "adapter_model.bin").is_file():
            raise UserError(f"{src}: only adapter_model.bin (pickle); re-save it with safetensors "
                            "(PeftModel.save_pretrained(dir, safe_serialization=True))")
        raise UserError(f"{src}: no {PEFT_WEIGHTS}")
    try:
        return mx.load(str(path))
    except Exception as err:  # mlx raises RuntimeError/ValueError for corrupt files
        raise UserError(f"{path}: cannot read safetensors ({err})") from None


def _check_against_base(adapter: Adapter, base: Path) -> None:
    import mlx.nn as nn

    from mlx_med.adapters.live import layer_dims
    from mlx_med.fingerprint import model_fingerprint
    from mlx_med.models import load_model

    named = dict(load_model(base, compute=False).model.named_modules())
    for module in adapter.modules():
        layer = named.get(module)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            raise UserError(f"the PEFT adapter targets {module}, which is not a linear layer of {base}")
        out_dims, in_dims = layer_dims(layer)
        if adapter.dims(module) != (in_dims, out_dims):
            a_in, a_out = adapter.dims(module)
            raise UserError(f"{module}: the PEFT adapter is {a_in}→{a_out} but {base} has "
                            f"{in_dims}→{out_dims} (adapter for another model?)")
    adapter.meta.base_fingerprint = model_fingerprint(base)


def _check_patterns(config: dict[str, Any], where: Path) -> None:
    """Refuse ``alpha_pattern`` / ``rank_pattern`` entries before their keys are used as regexes.

    A key must be a short regex that compiles and has no nested quantifier (``(a+)+`` can take
    exponential time); a value must be a finite positive number (an integer for ranks).
    """
    for name in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise UserError(f"{where}: field '{name}' must be a mapping of module patterns to numbers")
        for key, value in patterns.items():
            if not isinstance(key, str) or not key or len(key) > 200 or _NESTED_QUANTIFIER.search(key):
                raise UserError(f"{where}: field '{name}': pattern {str(key)[:60]!r} is not a safe module pattern")
            try:
                re.compile(key)
            except re.error as err:
                raise UserError(f"{where}: field '{name}': pattern {key!r} is not a valid regex ({err})") from None
            number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            if number is None or not math.isfinite(number) or number <= 0 or (
                    name == "rank_pattern" and number != int(number)):
                raise UserError(f"{where}: field '{name}': {key!r} maps to {value!r}, not a positive "
                                f"{'integer' if name == 'rank_pattern' else 'number'}")


_NESTED_QUANTIFIER = re.compile(r"[+*}?]\)*[+*{]|\)[+*{?]")  # a quantified group (or stacked quantifiers)


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """PEFT's ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return default


def _base_layer_count(base: str | None) -> int | None:
    if not base or not (Path(base) / "config.json").is_file():
        return None
    try:
        return int(json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"])
    except (KeyError, ValueError, json.JSONDecodeError):
        return None
