"""``mlx-med pipeline``: the whole study, stage by stage, resumable."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_med.commands.options import compute_policy_option, config_option


@click.command("pipeline")
@config_option
@compute_policy_option()
@click.option("-o", "--output", "output", type=click.Path(path_type=Path),
              help="Output folder for every stage and report.md (overrides 'output:').")
@click.option("--alpha", type=float, help="Merge weight of the SFT adapter (overrides 'fuse.alpha').")
@click.option("--restart", is_flag=True, help="Forget finished stages and run everything again.")
@click.option("-q", "--quiet", is_flag=True, help="Only stage headers, no progress bars.")
def command(config_path: Path | None, output: Path | None, alpha: float | None, restart: bool, quiet: bool) -> None:
    """Convert → PT → SFT → inspect → merge + fuse → HF export → eval (QA, MCQ) → α sweep + search → report.md.

    Stages whose outputs are complete and whose inputs did not change are skipped, so running the
    same command again (or after Ctrl-C) continues where it stopped.

    \b
      mlx-med pipeline -c demo                         # the shipped demo on SmolLM2-135M, from any folder
      mlx-med pipeline -c configs/demo.yaml            # the same recipe file, in a checkout
      mlx-med pipeline -c configs/demo.yaml -o runs/x  # somewhere else
    """
    from mlx_med.config import load_config
    from mlx_med.pipeline.runner import PipelineConfig, run_pipeline

    if config_path is None:
        raise click.UsageError("pass -c CONFIG.yaml (for the demo: -c demo)")
    cfg = load_config(PipelineConfig, config_path, {"output": output, "fuse.alpha": alpha})
    report = run_pipeline(cfg, quiet=quiet, restart=restart)
    click.echo(f"report: {report}")
