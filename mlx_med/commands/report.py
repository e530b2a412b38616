"""``mlx-med report``: one report.md from eval, safety, training-run and sweep folders."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("report.md"), show_default=True,
              help="Markdown file to write (images are linked relative to it).")
@click.option("--title", default="mlx-med report", show_default=True, help="First heading of the report.")
def command(run_dirs, out, title) -> None:
    """Assemble report.md: metrics table, safety, loss curves, decoding and α sweep plots.

    \b
    RUN_DIRS are eval folders, training runs, sweep folders, inspect folders, or folders holding them (searched two
    levels down). Example:
      mlx-med report evals/base evals/sft runs/pt runs/sft sweeps/alpha sweeps/dec -o report.md
    """
    from mlx_med.evaluation.report import write_report

    path = write_report(out, list(run_dirs), title=title)
    click.echo(f"wrote {path}")
