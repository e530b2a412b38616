"""MLX model folder (quantized or not, fused or not) → Hugging Face checkpoint, verified.

The model is built by mlx-lm (so per-layer quantization settings are honoured), quantized layers are
dequantized in fp32, and the weights are written shard by shard in the requested dtype with
``{"format": "pt"}`` metadata and a ``model.safetensors.index.json`` when there is more than one shard.
The folder is then checked before it replaces the output: shard headers against what was meant to be
written, and, where torch is installed, the key names and shapes against the transformers model built
on the meta device (so "missing/unexpected keys" cannot reach the user).

When the source was quantized, the report gives per layer the estimated quantization error of the
source weights (affine rounding: RMS error = RMS(scale)/√12, relative to the weight's RMS) and the
extra error of rounding the dequantized weights to the export dtype.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_med.convert.files import (
    INDEX_FILE,
    copy_tokenizer_files,
    read_json,
    read_safetensors_header,
    weight_files,
)

from mlx_med.errors import UserError
from mlx_med.hf_config import normalize_for_hf, normalize_for_mlx
from mlx_med.io import atomic_output_dir
from mlx_med.models import read_model_config

EXPORT_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class LayerQuantError:
    """Quantization figures for one quantized layer of the source model."""

    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    bits: int
    group_size: int
    quant_rel_rms: float  # estimated RMS(W_quantized - W_original) / RMS(W), from the scales
    export_rel_rms: float  # RMS(W_exported - W_dequantized) / RMS(W): rounding to the export dtype


@dataclass
class ExportReport:
    """What ``export_hf`` wrote and checked."""

    out_dir: Path
    files: list[str]
    dtype: str
    num_tensors: int
    total_bytes: int
    source_quantization: dict[str, Any] | None = None
    layer_errors: list[LayerQuantError] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Human-readable lines for the CLI."""
        shards = [f for f in self.files if f.endswith(".safetensors")]
        lines = [
            f"wrote {self.out_dir} ({self.num_tensors} tensors, {self.total_bytes / 1e9:.3f} GB {self.dtype}, "
            f"{len(shards)} shard(s))"
        ]
        lines += [f"check: {c}" for c in self.checks]
        if self.layer_errors:
            q = self.source_quantization or {}
            worst = max(self.layer_errors, key=lambda e: e.quant_rel_rms)
            mean = sum(e.quant_rel_rms for e in self.layer_errors) / len(self.layer_errors)
            export_worst = max(e.export_rel_rms for e in self.layer_errors)
            bits = "/".join(str(b) for b in sorted({e.bits for e in self.layer_errors}))
            lines.append(
                f"source was quantized ({bits}-bit, group {q.get('group_size')}): "
                f"{len(self.layer_errors)} layers dequantized; estimated quantization error "
                f"(relative RMS) mean {mean:.4f}, worst {worst.quant_rel_rms:.4f} ({worst.name}); "
                f"rounding to {self.dtype} adds at most {export_worst:.2e}"
            )
        return lines


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain integer (transformers' convention)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise UserError(f"--max-shard-size: cannot read {size!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * powers[unit])


def export_hf(
    model_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> ExportReport:
    """Write a Hugging Face checkpoint folder that ``transformers.AutoModelForCausalLM`` loads.

    Args:
        model_dir: an MLX model folder (``mlx-med convert``/``fuse`` output, quantized or not).
        out_dir: the HF folder to create; written to a temp dir and renamed at the end.
        dtype: ``bfloat16``, ``float16`` or ``float32`` for the exported weights.
        max_shard_size: largest shard (``"5GB"``, ``"500MB"`` or bytes); one file when everything fits.
        force: replace an existing ``out_dir``.

    Returns:
        An ``ExportReport`` (files written, checks passed, per-layer quantization errors).

    Raises:
        UserError: unknown dtype, broken source folder, or an export that fails its checks.
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from mlx_med.backend import dequantize_fp32

    dtype = dtype or "bfloat16"
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shard_limit = parse_size(max_shard_size)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    config = read_model_config(model_dir)
    weight_files(model_dir)
    fixes = {k: v for k, v in normalize_for_mlx(config).items() if config.get(k) != v}
    try:
        model, _ = load_model(model_dir, lazy=True, model_config=fixes)
    except ValueError as err:
        raise UserError(f"{model_dir}: cannot load model: {err}") from None

    quantized = _quantized_layers(model)
    model = dequantize_fp32(model)  # fp32 math, so the export dtype is the only rounding
    weights = dict(tree_flatten(model.parameters()))
    del model  # the dict now holds the only references, so written shards can be freed
    target = EXPORT_DTYPES[dtype]
    quantized_weights = {f"{name}.weight": (name, m) for name, m in quantized}
    layer_errors: list[LayerQuantError] = []

    shards = _plan_shards(weights, target.size, shard_limit)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    expected: dict[str, tuple[list[int], str]] = {}
    total = 0
    with atomic_output_dir(out_dir, force) as tmp:
        for name, keys in zip(names, shards):
            shard, errors = {}, []
            for key in keys:
                array = weights.pop(key)
                shard[key] = array.astype(target) if mx.issubdtype(array.dtype, mx.floating) else array
                expected[key] = (list(array.shape), SAFETENSORS_DTYPE[dtype])
                total += shard[key].nbytes
                if key in quantized_weights:
                    errors.append((*quantized_weights[key], *_layer_error(quantized_weights[key][1], array, target)))
            # One evaluation per shard: the dequantized weights live only while their shard is written.
            mx.eval(list(shard.values()) + [e for *_, q, x in errors for e in (q, x)])
            layer_errors += [LayerQuantError(n, m.bits, m.group_size, q.item(), x.item()) for n, m, q, x in errors]
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
            del shard, errors
        if len(names) > 1:
            weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        tied = "lm_head.weight" not in expected
        hf_config = {**normalize_for_hf({**config, **fixes}, dtype), "tie_word_embeddings": tied}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n")
        copy_tokenizer_files(model_dir, tmp)
        _write_generation_config(model_dir, tmp, hf_config)
        checks = _verify(tmp, names, expected, hf_config)
        files = sorted(p.name for p in tmp.iterdir())

    q = config.get("quantization")
    return ExportReport(out_dir, files, dtype, len(expected), total,
                        {k: v for k, v in q.items() if not isinstance(v, dict)} if q else None,
                        layer_errors, checks)


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def _layer_error(module: nn.Module, weight: mx.array, target: mx.Dtype) -> tuple[mx.array, mx.array]:
    """Lazy (quantization, export) relative RMS errors of one layer.

    Affine rounding to a step s has RMS error s/√12 (uniform rounding); both are relative to RMS(W).
    """
    rms_w = mx.sqrt(mx.mean(weight * weight))
    quant = mx.sqrt(mx.mean(module.scales * module.scales) / 12.0) / rms_w
    diff = weight.astype(target).astype(mx.float32) - weight
    return quant, mx.sqrt(mx.mean(diff * diff)) / rms_w


def _plan_shards(weights: dict[str, mx.array], itemsize: int, limit: int) -> list[list[str]]:
    """Split names into shards of at most ``limit`` bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = []
    size = 0
    for key, array in weights.items():
        nbytes = math.prod(array.shape) * (itemsize if mx.issubdtype(array.dtype, mx.floating) else array.itemsize)
        if not shards or size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_generation_config(model_dir: Path, out: Path, hf_config: dict[str, Any]) -> None:
    """generation_config.json whose eos ids include the tokenizer's eos (the chat turn end for chat models)."""
    gen = read_json(model_dir / "generation_config.json")
    eos: list[int] = []
    for source in (gen.get("eos_token_id"), hf_config.get("eos_token_id"), _tokenizer_eos_id(out)):
        for token in source if isinstance(source, list) else [source]:
            if isinstance(token, int) and token not in eos:
                eos.append(token)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key in ("bos_token_id", "pad_token_id"):
        if gen.get(key) is None and isinstance(hf_config.get(key), int):
            gen[key] = hf_config[key]
    gen.pop("transformers_version", None)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _tokenizer_eos_id(folder: Path) -> int | None:
    """The id of ``eos_token`` of the tokenizer in ``folder`` (from tokenizer.json), if it has one."""
    eos = read_json(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    tokenizer = read_json(folder / "tokenizer.json")
    if not isinstance(eos, str) or not tokenizer:
        return None
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == eos:
            return added["id"]
    return (tokenizer.get("model") or {}).get("vocab", {}).get(eos)


def _verify(folder: Path, shard_names: list[str], expected: dict[str, tuple[list[int], str]],
            hf_config: dict[str, Any]) -> list[str]:
    """Re-read what was written and compare it with what transformers expects. Raises on any mismatch."""
    written: dict[str, tuple[list[int], str]] = {}
    for name in shard_names:
        tensors, metadata = read_safetensors_header(folder / name)
        if metadata.get("format") != "pt":
            raise UserError(f"export check failed: {name} lacks {{'format': 'pt'}} metadata")
        written.update(tensors)
    if written != expected:
        bad = sorted(set(written) ^ set(expected)) or [k for k in expected if written.get(k) != expected[k]]
        raise UserError(f"export check failed: shards differ from the model's weights at {bad[:5]}")
    checks = [f"{len(written)} tensors re-read from {len(shard_names)} shard(s), names/shapes/dtype as intended"]
    meta_check = _check_against_transformers(folder, written, hf_config)
    if meta_check:
        checks.append(meta_check)
    return checks


def _check_against_transformers(folder: Path, written: dict[str, tuple[list[int], str]],
                                hf_config: dict[str, Any]) -> str | None:
    """Build the transformers model on the meta device (no memory) and compare its state-dict keys."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return None
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        return f"transformers key check skipped ({hf_config.get('model_type')}: {err})"
    wanted = {k: list(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        wanted.pop("lm_head.weight", None)
    missing = sorted(set(wanted) - set(written))
    unexpected = sorted(set(written) - set(wanted))
    shapes = [k for k in wanted if k in written and written[k][0] != wanted[k]]
    if missing or unexpected or shapes:
        raise UserError(
            f"export check failed against transformers {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {shapes[:5]}"
        )
    return f"keys and shapes match transformers {type(model).__name__} (no missing/unexpected keys)"
