"""``mlx-med export``: an MLX model folder → a verified Hugging Face checkpoint, or one GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from mlx_med.commands.options import config_option, force_option

OLLAMA_HELP = ("Also write DIR/Modelfile for Ollama (FROM, a system prompt, stop tokens; export-adapter adds "
               "ADAPTER) and print the `ollama create` line.")


@dataclass
class ExportConfig:
    """Settings of ``mlx-med export`` (YAML keys = these names)."""

    format: str = "hf"  # hf (a transformers checkpoint folder) or gguf (one file for llama.cpp/Ollama)
    dtype: str = "bfloat16"  # hf: dtype of the exported weights: bfloat16, float16 or float32
    max_shard_size: str = "5GB"  # hf: largest safetensors shard; bigger models get an index file
    outtype: str = "f16"  # gguf: f32, f16, bf16 or q8_0 for the weight matrices (norms stay f32)


@click.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Hugging Face folder to create, or the .gguf file with --format gguf.")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default=None,
              help="hf: transformers checkpoint folder; gguf: one file for llama.cpp, Ollama, LM Studio. [default: hf]")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="HF: dtype of the exported weights (quantized sources are dequantized). [default: bfloat16]")
@click.option("--max-shard-size", default=None, help="HF: largest shard, e.g. 5GB, 500MB, 2GiB. [default: 5GB]")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
              help="GGUF: type of the weight matrices (norms and biases stay f32). [default: f16]")
@click.option("--ollama", "ollama_dir", type=click.Path(path_type=Path), help="GGUF: " + OLLAMA_HELP)
@force_option
@config_option
@click.option("--quiet", is_flag=True, help="Print only the output path.")
def command(model_dir: Path, out_dir: Path, fmt: str | None, dtype: str | None, max_shard_size: str | None,
            outtype: str | None, ollama_dir: Path | None, force: bool, config_path: Path | None, quiet: bool) -> None:
    """Export MODEL_DIR (an MLX folder, quantized or not, fused or not) as a Hugging Face checkpoint or GGUF.

    \b
    HF: weights are dequantized and written as safetensors in --dtype, with config.json (no MLX
    quantization keys), tokenizer, chat template and generation_config, checked against
    transformers' own key list before it replaces OUT.
    GGUF: the file llama.cpp's convert_hf_to_gguf.py would write (llama, qwen2, qwen3), tokenizer
    and chat template in the metadata. Examples:
      mlx-med export fused -o fused-hf --dtype bfloat16
      mlx-med export fused --format gguf -o fused.gguf --outtype q8_0 --ollama ollama/
    """
    from mlx_med.config import load_config
    from mlx_med.errors import UserError

    cfg = load_config(ExportConfig, config_path, {"format": fmt, "dtype": dtype, "max_shard_size": max_shard_size,
                                                  "outtype": outtype})
    if cfg.format == "gguf":
        from mlx_med.convert.gguf_export import export_gguf

        report = export_gguf(model_dir, out_dir, outtype=cfg.outtype, force=force)
        click.echo(str(report.path) if quiet else "\n".join(report.summary()))
        if ollama_dir is not None:
            from mlx_med.convert.ollama import create_command, write_model_modelfile

            modelfile = write_model_modelfile(ollama_dir, report.path)
            click.echo(f"wrote {modelfile}; register it with Ollama:")
            click.echo(create_command(ollama_dir, out_dir.stem))
        return
    if cfg.format != "hf":
        raise UserError(f"format must be hf or gguf, not {cfg.format!r}")
    if ollama_dir is not None:
        raise UserError("--ollama needs --format gguf")
    from mlx_med.convert.export import export_hf
    from mlx_med.io import check_output_dir

    check_output_dir(out_dir, force=force, inputs=[model_dir])  # before any loading
    report = export_hf(model_dir, out_dir, dtype=cfg.dtype, max_shard_size=cfg.max_shard_size, force=force)
    if quiet:
        click.echo(str(report.out_dir))
        return
    for line in report.summary():
        click.echo(line)
