"""Options shared by several verbs, so each flag is spelled and documented once."""

from __future__ import annotations

from pathlib import Path

import click


def _recipe(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    from mlx_med.resources import resolve_recipe

    return None if value is None else resolve_recipe(value)


config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path), callback=_recipe,
    help="YAML recipe, or the name of a shipped one (demo, demo-pt, qwen2.5-14b-pt, ...); "
         "flags given on the command line override its values.",
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


def _start_compute(warn_slow_blas: bool):
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        import os

        from mlx_med.blas import warn_if_slow_blas

        if value is not None:  # the environment carries it to every loader and to distributed ranks
            os.environ["MLX_MED_COMPUTE_POLICY"] = value
        if warn_slow_blas and not ctx.resilient_parsing:
            warn_if_slow_blas()

    return callback


def compute_policy_option(warn_slow_blas: bool = True):
    """``--compute-policy auto|fp32|accelerator`` (default: ``$MLX_MED_COMPUTE_POLICY``, else auto).

    Args:
        warn_slow_blas: also print the one-line warning when this run will use the reference BLAS on a
            Linux CPU (long commands: train, eval, sweep, chat, pipeline).
    """
    return click.option(
        "--compute-policy", type=click.Choice(["auto", "fp32", "accelerator"]), default=None,
        expose_value=False, callback=_start_compute(warn_slow_blas),
        help="auto: bf16 with quantized weights kept on Apple GPUs/CUDA, fp32 dequantized on CPU; "
             "fp32 or accelerator force one path everywhere.  [default: $MLX_MED_COMPUTE_POLICY, else auto]",
    )
