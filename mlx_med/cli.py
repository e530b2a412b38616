"""The ``mlx-med`` command line: a click group whose verbs live in ``mlx_med/commands/``.

Each module there defines ``command`` (a click command) or ``commands`` (a list of them). They
import only click and config at module level; mlx and models are imported inside the command, so
``mlx-med --help`` is instant. User mistakes (``UserError``) and OS errors (missing files, full or
read-only disks, permissions) print one line naming the file and exit 2.
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
    """Turn ``UserError``, any ``OSError`` and Ctrl-C into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except OSError as err:  # missing file, permission, full or read-only disk ...: one line naming the file
            click.echo(f"error: {os_error_line(err)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


def os_error_line(err: OSError) -> str:
    """``cannot use FILE: No space left on device`` (the file first, so it is never lost in the text)."""
    reason = err.strerror or str(err)
    if err.filename is None:
        return reason
    other = f" -> {err.filename2}" if err.filename2 else ""
    return f"{err.filename}{other}: {reason}"


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
    from mlx_med.hf_config import offline_hub

    offline_hub()  # before any command imports transformers: no command waits on a network
    cli(prog_name="mlx-med")


if __name__ == "__main__":
    main()
