"""Options shared by several verbs, so each flag is spelled and documented once."""

from __future__ import annotations

from pathlib import Path

import click

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path),
    help="YAML recipe; flags given on the command line override its values.",
)
force_option = click.option("--force", is_flag=True, help="Replace an existing output directory.")
# DEFAULT_ALPHA lives in mlx_med.adapters.mix (the help text names it; importing it here would load MLX).
alpha_option = click.option(
    "--alpha", type=float,
    help="SFT weight α in [0, 1]: ΔW = α·ΔW_sft + (1−α)·ΔW_pt.  [default: 0.5]",
)
alpha_schedule_option = click.option(
    "--alpha-schedule", type=click.Path(path_type=Path),
    help="YAML: α per layer range / module type ({default: A, rules: [{layers, modules, alpha}]}); "
         "--alpha then sets its default.",
)
