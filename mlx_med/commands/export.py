"""``mlx-med export``: an MLX model folder → a verified Hugging Face checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from mlx_med.commands.options import config_option, force_option


@dataclass
class ExportConfig:
    """Settings of ``mlx-med export`` (YAML keys = these names)."""

    dtype: str = "bfloat16"  # dtype of the exported weights: bfloat16, float16 or float32
    max_shard_size: str = "5GB"  # largest safetensors shard; bigger models get an index file


@click.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Hugging Face folder to create (transformers / vLLM / llama.cpp converters load it).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Dtype of the exported weights (quantized sources are dequantized). [default: bfloat16]")
@click.option("--max-shard-size", default=None, help="Largest shard, e.g. 5GB, 500MB, 2GiB. [default: 5GB]")
@force_option
@config_option
@click.option("--quiet", is_flag=True, help="Print only the output folder.")
def command(model_dir: Path, out_dir: Path, dtype: str | None, max_shard_size: str | None, force: bool,
            config_path: Path | None, quiet: bool) -> None:
    """Export MODEL_DIR (an MLX folder, quantized or not, fused or not) as a Hugging Face checkpoint.

    \b
    Weights are dequantized and written as safetensors in --dtype, with config.json (no MLX
    quantization keys), tokenizer, chat template and generation_config. The folder is checked
    against transformers' own key list before it replaces OUT. Example:
      mlx-med export fused -o fused-hf --dtype bfloat16
    """
    from mlx_med.config import load_config

    cfg = load_config(ExportConfig, config_path, {"dtype": dtype, "max_shard_size": max_shard_size})
    from mlx_med.convert.export import export_hf
    from mlx_med.io import check_output_dir

    check_output_dir(out_dir, force=force, inputs=[model_dir])  # before any loading
    report = export_hf(model_dir, out_dir, dtype=cfg.dtype, max_shard_size=cfg.max_shard_size, force=force)
    if quiet:
        click.echo(str(report.out_dir))
        return
    for line in report.summary():
        click.echo(line)
