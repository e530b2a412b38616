"""The ``mlx-med`` command line: a click group whose verbs live in ``mlx_med/commands/``.

Each module there defines ``command`` (a click command) or ``commands`` (a list of them). They
import only click and config at module level; mlx and models are imported inside the command, so
``mlx-med --help`` is instant. User mistakes (``UserError``) print one line and exit 2.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

import mlx_med
from mlx_med import commands
from mlx_med.errors import UserError


class FriendlyGroup(click.Group):
    """Turn ``UserError`` (and a few OS errors on user paths) into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            click.echo(f"error: {err.strerror or err}: {err.filename}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(mlx_med.__version__, prog_name="mlx-med")
def cli() -> None:
    """Adapt a language model to medicine on your own machine (MLX).

    \b
    Typical flow:
      mlx-med convert --gguf model.gguf -o base          # or --hf-path DIR [--q-bits 4]
      mlx-med train --phase pt  --model base --data pt.jsonl  -o runs/pt
      mlx-med train --phase sft --model base --data sft.jsonl -o runs/sft
      mlx-med fuse --model base --sft runs/sft --pt runs/pt --alpha 0.5 -o fused
      mlx-med eval --model fused --data eval.jsonl -o eval
      mlx-med chat --model fused
    """


def _register(group: click.Group) -> None:
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        for command in getattr(module, "commands", None) or [getattr(module, "command", None)]:
            if command is not None:
                group.add_command(command)


_register(cli)


def main() -> None:
    cli(prog_name="mlx-med")


if __name__ == "__main__":
    main()
