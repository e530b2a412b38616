"""``mlx-med fuse``: base model + adapter(s) at weight α → a fused MLX model folder (and optionally HF)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from mlx_med.commands.options import alpha_schedule_option, config_option, force_option


@dataclass
class FuseConfig:
    """Settings of ``mlx-med fuse`` (YAML keys = these names)."""

    model: Path | None = None  # base model folder the adapters were trained on
    sft: Path | None = None  # SFT run (with pt)
    pt: Path | None = None  # PT run (with sft)
    adapter: Path | None = None  # or one adapter dir (a run, merged or imported adapter)
    alpha: float | None = None  # w_sft = alpha, w_pt = 1 - alpha, in [0, 1]
    w_sft: float | None = None  # explicit weights instead of alpha (any finite numbers)
    w_pt: float | None = None
    alpha_schedule: Path | None = None  # α per layer range / module type instead of alpha
    dtype: str = "bfloat16"  # dtype of the fused (dequantized) weights: bfloat16, float16, float32
    requantize: bool = False  # quantize fused layers of a quantized base again
    export_hf: Path | None = None  # also export the fused model as a Hugging Face checkpoint here


@click.command("fuse")
@click.option("--model", type=click.Path(path_type=Path), help="Base model folder the adapters were trained on.")
@click.option("--sft", type=click.Path(path_type=Path), help="SFT training run (with --pt and --alpha).")
@click.option("--pt", type=click.Path(path_type=Path), help="PT training run (with --sft and --alpha).")
@click.option("--adapter", type=click.Path(path_type=Path),
              help="Or one adapter dir (run, merged or imported), fused with weight 1.")
@click.option("--alpha", type=float, help="Weight of the SFT model, in [0, 1]: w_sft = ALPHA, w_pt = 1 − ALPHA.")
@click.option("--w-sft", type=float, help="Weight of the SFT model (with --w-pt, instead of --alpha).")
@click.option("--w-pt", type=float, help="Weight of the PT model (with --w-sft, instead of --alpha).")
@alpha_schedule_option
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Fused MLX model folder to create.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Dtype of the fused, dequantized weights (and the other unquantized ones). [default: bfloat16]")
@click.option("--requantize", is_flag=True, default=None,
              help="On a quantized base, quantize the fused layers again and print the error that adds "
                   "(by default they stay dequantized, so the adapter is not rounded away).")
@click.option("--export-hf", type=click.Path(path_type=Path),
              help="Also export the fused model as a Hugging Face checkpoint to this folder (in --dtype).")
@force_option
@config_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the output folder(s).")
@click.option("-v", "--verbose", is_flag=True, help="Print one line per fused layer.")
def command(model, sft, pt, adapter, alpha, w_sft, w_pt, alpha_schedule, out_dir, dtype, requantize, export_hf, force,
            config_path, quiet, verbose) -> None:
    """Fuse adapters into the base weights: W' = W + w_sft·ΔW_sft + w_pt·ΔW_pt.

    \b
    A stacked SFT run (trained on top of PT) gives W + ΔW_pt + ALPHA·ΔW_sft_own. Quantized layers
    touched by the adapters are dequantized and kept in --dtype unless --requantize. Examples:
      mlx-med fuse --model base --sft runs/sft --pt runs/pt --alpha 0.5 -o fused
      mlx-med fuse --model base --adapter merged -o fused --dtype float32 --export-hf fused-hf
    """
    from mlx_med.config import load_config

    cfg = load_config(FuseConfig, config_path, {
        "model": model, "sft": sft, "pt": pt, "adapter": adapter, "alpha": alpha, "w_sft": w_sft,
        "w_pt": w_pt, "alpha_schedule": alpha_schedule, "dtype": dtype, "requantize": requantize, "export_hf": export_hf,
    })
    from mlx_med.adapters.fuse import fuse_model
    from mlx_med.errors import UserError

    if cfg.model is None:
        raise UserError("give --model BASE_DIR (the base the adapters were trained on)")
    if cfg.adapter is not None and any(v is not None for v in (cfg.alpha, cfg.w_sft, cfg.w_pt, cfg.alpha_schedule)):
        raise UserError("--alpha/--alpha-schedule/--w-sft/--w-pt weigh an --sft/--pt pair; "
                        "an --adapter is fused with weight 1")
    if cfg.export_hf is not None and cfg.export_hf.exists() and not force:
        raise UserError(f"{cfg.export_hf} already exists; pass --force to replace it")
    from mlx_med.io import check_output_dir

    inputs = [cfg.model, cfg.adapter, cfg.sft, cfg.pt]
    check_output_dir(out_dir, force=force, inputs=inputs)  # before any loading
    if cfg.export_hf is not None:
        check_output_dir(cfg.export_hf, force=force, inputs=inputs, flag="--export-hf")
    report = fuse_model(
        cfg.model, out_dir, adapter=cfg.adapter, sft=cfg.sft, pt=cfg.pt, alpha=cfg.alpha,
        dtype=cfg.dtype, requantize=cfg.requantize, force=force, w_sft=cfg.w_sft, w_pt=cfg.w_pt,
        alpha_schedule=cfg.alpha_schedule,
    )
    if quiet:
        click.echo(str(report.out_dir))
    else:
        if verbose:
            for layer in report.layers:
                extra = (f", requantized: error/‖ΔW‖ {layer.requant_error:.3f}, ΔW kept {layer.delta_kept:.3f}"
                         if layer.requantized else "")
                click.echo(f"  {layer.module}: ‖ΔW‖/‖W‖ {layer.delta_rel:.4f}{extra}")
        for line in report.summary():
            click.echo(line)
    if cfg.export_hf is not None:
        from mlx_med.convert.export import export_hf as export

        hf = export(report.out_dir, cfg.export_hf, dtype=cfg.dtype, force=force)
        if quiet:
            click.echo(str(hf.out_dir))
        else:
            for line in hf.summary():
                click.echo(line)
