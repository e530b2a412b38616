"""``mlx-med plot RUN``: (re)draw a training run's loss curve, also while it is still training."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("plot")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="PNG to write. [default: RUN_DIR/loss_curve.png]")
def command(run_dir: Path, out: Path | None) -> None:
    """Render train and validation loss of RUN_DIR (from metrics.jsonl) to loss_curve.png."""
    from mlx_med.train.plots import plot_loss_curve

    click.echo(str(plot_loss_curve(run_dir, out)))
