"""Options shared by several verbs, so each flag is spelled and documented once."""

from __future__ import annotations

from pathlib import Path

import click

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path),
    help="YAML recipe; flags given on the command line override its values.",
)
force_option = click.option("--force", is_flag=True, help="Replace an existing output directory.")
