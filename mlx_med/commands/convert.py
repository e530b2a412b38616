"""``mlx-med convert``: a Hugging Face folder or a GGUF file → an MLX model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from mlx_med.commands.options import config_option, force_option


@dataclass
class ConvertConfig:
    """Settings of ``mlx-med convert`` (YAML keys = these names)."""

    q_bits: int | None = None  # quantize (affine) to this many bits; None keeps float weights
    q_group_size: int = 64  # weights per quantization group: 32, 64 or 128
    dtype: str | None = None  # float16, bfloat16 or float32; None keeps the stored dtype


@click.command("convert")
@click.option("--hf-path", type=click.Path(path_type=Path),
              help="Local Hugging Face model folder (config.json, *.safetensors, tokenizer).")
@click.option("--gguf", "gguf_path", type=click.Path(path_type=Path),
              help="A llama/qwen2/qwen3 GGUF file (F16, F32, Q8_0, Q4_0, Q4_1); quantized weights stay quantized.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="MLX model folder to create.")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="With --hf-path: quantize linear/embedding layers to this many bits (affine).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="With --q-bits: weights per quantization group. [default: 64]")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast float weights to this dtype. [default: as stored in the source]")
@force_option
@config_option
@click.option("--quiet", is_flag=True, help="Print only the output folder.")
def command(hf_path: Path | None, gguf_path: Path | None, out_dir: Path, q_bits: str | None,
            q_group_size: str | None, dtype: str | None, force: bool, config_path: Path | None,
            quiet: bool) -> None:
    """Convert a Hugging Face checkpoint or a GGUF file into an MLX model folder.

    \b
    Examples:
      mlx-med convert --hf-path Qwen2.5-14B-Instruct -o base-4bit --q-bits 4 --q-group-size 64
      mlx-med convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2
    The output loads with mlx-med (train, chat, eval) and with plain mlx_lm.load.
    """
    from mlx_med.config import load_config
    from mlx_med.errors import UserError

    if (hf_path is None) == (gguf_path is None):
        raise UserError("give exactly one source: --hf-path DIR or --gguf FILE.gguf")
    cfg = load_config(ConvertConfig, config_path, {
        "q_bits": int(q_bits) if q_bits else None,
        "q_group_size": int(q_group_size) if q_group_size else None,
        "dtype": dtype,
    })
    if gguf_path is not None:
        if cfg.q_bits is not None:
            raise UserError("--q-bits applies to --hf-path; a GGUF keeps its own quantization")
        from mlx_med.convert.gguf import convert_gguf
        from mlx_med.io import check_output_dir

        check_output_dir(out_dir, force=force, inputs=[gguf_path])  # before any reading

        out = convert_gguf(gguf_path, out_dir, dtype=cfg.dtype, force=force)
    else:
        from mlx_med.convert.hf import convert_hf
        from mlx_med.io import check_output_dir

        check_output_dir(out_dir, force=force, inputs=[hf_path])  # before any reading

        out = convert_hf(hf_path, out_dir, q_bits=cfg.q_bits, q_group_size=cfg.q_group_size,
                         dtype=cfg.dtype, force=force)
    if quiet:
        click.echo(str(out))
        return
    click.echo(_describe(out))


def _describe(folder: Path) -> str:
    """One line: where, which architecture, how quantized, how big."""
    import json

    config = json.loads((folder / "config.json").read_text())
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    q = config.get("quantization")
    how = f"{q['bits']}-bit (group {q['group_size']})" if q else config.get("torch_dtype", "float")
    return f"wrote {folder}: {config.get('model_type')}, {config.get('num_hidden_layers')} layers, {how}, {size:.1f} MB"
