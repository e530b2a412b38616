"""``mlx-med inspect``: where the SFT and PT adapters interfere, per module, and a suggested α schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from mlx_med.commands.options import config_option, force_option

DEFAULT_ALPHA = 0.5  # the study's even mix, as in `fuse` and the pipeline


@dataclass
class InspectConfig:
    """Settings of ``mlx-med inspect`` (YAML keys = these names)."""

    sft: Path | None = None  # SFT run or adapter dir
    pt: Path | None = None  # PT run or adapter dir
    alpha: float = DEFAULT_ALPHA  # the merge's α for the cancellation columns
    model: Path | None = None  # base model folder, for ‖ΔW‖/‖W‖ (optional)
    top: float = 0.2  # share of entries by magnitude counted as "large" for the sign conflict


@click.command("inspect")
@click.option("--sft", type=click.Path(path_type=Path), help="SFT training run (or adapter dir).")
@click.option("--pt", type=click.Path(path_type=Path), help="PT training run (or adapter dir).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to create: interference.csv, interference.png, summary.md, suggested_schedule.yaml.")
@click.option("--alpha", type=float, help=f"α of the merge whose cancellation is measured. [default: {DEFAULT_ALPHA}]")
@click.option("--model", type=click.Path(path_type=Path),
              help="Base model folder: adds ‖ΔW‖/‖W‖ (reads only the adapted weights).")
@click.option("--top", type=float, help="Share of entries, by magnitude, that counts as large for the sign "
                                        "conflict (TIES' density). [default: 0.2]")
@force_option
@config_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the output folder.")
def command(sft, pt, out_dir, alpha, model, top, force, config_path, quiet) -> None:
    """Measure where the SFT and PT adapters interfere and suggest an α schedule (a heuristic).

    \b
    Per module both adapters update, from the LoRA factors: ‖ΔW‖ of each (÷ ‖W‖ with --model), their
    cosine, subspace overlap, sign conflict of large entries, and how much a merge at --alpha cancels.
    A stacked SFT run is compared by its own ΔW (what it added on top of PT). Examples:
      mlx-med inspect --sft runs/sft --pt runs/pt -o runs/inspect
      mlx-med inspect --sft runs/sft --pt runs/pt --model base --alpha 0.7 -o runs/inspect-0.7
    Check the suggested schedule with: mlx-med sweep alpha ... --alpha-schedule DIR/suggested_schedule.yaml
    """
    from mlx_med.config import load_config

    cfg = load_config(InspectConfig, config_path, {"sft": sft, "pt": pt, "alpha": alpha, "model": model, "top": top})
    from mlx_med.adapters.interference_summary import inspect_pair
    from mlx_med.errors import UserError

    if cfg.sft is None or cfg.pt is None:
        raise UserError("give --sft RUN and --pt RUN (or sft:/pt: in the config)")
    summary = inspect_pair(cfg.sft, cfg.pt, out_dir, alpha=cfg.alpha, model=cfg.model, top_fraction=cfg.top,
                           force=force)
    click.echo(str(out_dir) if quiet else summary.read_text(encoding="utf-8") + f"\nwritten to {out_dir}/")

