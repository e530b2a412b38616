"""Local Hugging Face checkpoint folder → MLX model folder, optionally quantized (affine).

mlx-lm builds and loads the model (any architecture it supports), casts and quantizes it
(``quantize_model``) and writes the shards (``save_model``); this module adds the checks that give clear
errors (missing/corrupt shards, unsupported architecture, already-quantized source), the transformers-5
config fix-up (``rope_parameters`` → top-level ``rope_theta``, so plain ``mlx_lm.load`` reads it right),
verbatim copies of the tokenizer, chat template and generation_config, and an atomic output folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx_med.convert.files import copy_tokenizer_files, weight_files

from mlx_med.errors import UserError
from mlx_med.hf_config import normalize_for_mlx
from mlx_med.io import atomic_output_dir
from mlx_med.models import read_model_config

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)


def check_architecture(config: dict, where: Path) -> None:
    """Raise a ``UserError`` naming the model type when mlx-lm has no implementation of it."""
    from mlx_lm.utils import _get_classes

    if "model_type" not in config:
        raise UserError(f"{where}/config.json: no 'model_type' (is this a causal LM checkpoint?)")
    try:
        _get_classes(config)
    except ValueError:
        raise UserError(
            f"{where}/config.json: model_type '{config['model_type']}' is not supported by mlx-lm "
            "(supported include llama, mistral, qwen2, qwen3, gemma, phi3)"
        ) from None


def convert_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    q_bits: int | None = None,
    q_group_size: int = 64,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Convert a local HF folder (single or sharded safetensors) into an MLX folder.

    Args:
        hf_dir: folder with ``config.json``, ``model*.safetensors`` (+ index) and a tokenizer.
        out_dir: MLX folder to create; written to a temp dir and renamed at the end.
        q_bits: quantize linear and embedding layers to this many bits (affine); None keeps floats.
        q_group_size: quantization group size (32, 64 or 128).
        dtype: cast floating weights to ``float16``/``bfloat16``/``float32`` first; None keeps them as stored.
        force: replace an existing ``out_dir``.

    Returns:
        ``out_dir``, loadable by ``mlx_med.models.load_model`` and by plain ``mlx_lm.load``.

    Raises:
        UserError: missing or corrupt files, unsupported architecture, bad quantization settings.
    """
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if q_bits is not None and q_bits not in Q_BITS:
        raise UserError(f"--q-bits must be one of {Q_BITS}, not {q_bits}")
    if q_group_size not in Q_GROUP_SIZES:
        raise UserError(f"--q-group-size must be one of {Q_GROUP_SIZES}, not {q_group_size}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    config = normalize_for_mlx(read_model_config(hf_dir))
    check_architecture(config, hf_dir)
    weight_files(hf_dir)
    if q_bits is not None and config.get("quantization"):
        raise UserError(f"{hf_dir} is already quantized ({config['quantization']}); convert it without --q-bits")

    try:
        # Lazy: weights are read from the source shards only as each output shard is written.
        model, config = load_model(hf_dir, lazy=True, model_config=config)
    except ValueError as err:
        raise UserError(f"{hf_dir}: cannot load model: {err}") from None
    if dtype is not None:
        cast = getattr(model, "cast_predicate", lambda _: True)  # some models keep e.g. router weights fp32
        target = DTYPES[dtype]
        model.update(tree_map_with_path(
            lambda k, v: v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        ))
        config["torch_dtype"] = dtype
    if q_bits is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its own bits-per-weight line
            model, config = quantize_model(model, config, q_group_size, q_bits, mode="affine")

    with atomic_output_dir(out_dir, force) as tmp:
        save_model(tmp, model, donate_model=True)
        save_config(dict(config), tmp / "config.json")
        copy_tokenizer_files(hf_dir, tmp)
        if (hf_dir / "generation_config.json").is_file():
            shutil.copy2(hf_dir / "generation_config.json", tmp / "generation_config.json")
        _check_written(tmp)
    return out_dir


def _check_written(folder: Path) -> None:
    """The index mlx-lm wrote must name exactly the tensors in the shards."""
    from mlx_med.convert.files import INDEX_FILE, read_safetensors_header

    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    names: set[str] = set()
    for shard in set(index.values()):
        names |= set(read_safetensors_header(folder / shard)[0])
    if names != set(index):
        raise UserError(f"conversion check failed: shards and index differ at {sorted(names ^ set(index))[:5]}")
