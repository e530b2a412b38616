"""``mlx-med merge``: the SFT and PT adapters → one new adapter, weighted in ΔW space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from mlx_med.commands.options import alpha_schedule_option, config_option, force_option


@dataclass
class MergeConfig:
    """Settings of ``mlx-med merge`` (YAML keys = these names)."""

    sft: Path | None = None  # SFT run or adapter dir
    pt: Path | None = None  # PT run or adapter dir
    alpha: float | None = None  # w_sft = alpha, w_pt = 1 - alpha
    w_sft: float | None = None  # independent weights instead of alpha
    w_pt: float | None = None
    alpha_schedule: Path | None = None  # α per layer range / module type instead of alpha
    method: str = "linear"  # linear (exact) | svd | ties | dare
    rank: int | None = None  # output rank for svd/ties/dare
    density: float | None = None  # fraction kept by ties/dare
    seed: int = 0  # seed of dare's random masks


@click.command("merge")
@click.option("--sft", type=click.Path(path_type=Path), help="SFT training run (or adapter dir).")
@click.option("--pt", type=click.Path(path_type=Path), help="PT training run (or adapter dir).")
@click.option("--alpha", type=float, help="Weight of the SFT model, in [0, 1]: w_sft = ALPHA, w_pt = 1 − ALPHA.")
@click.option("--w-sft", type=float, help="Weight of the SFT model (with --w-pt, instead of --alpha).")
@click.option("--w-pt", type=float, help="Weight of the PT model (with --w-sft, instead of --alpha).")
@alpha_schedule_option
@click.option("--method", default=None,
              help="linear: exact (rank r_sft + r_pt); svd: exact ΔW truncated to --rank; ties/dare: "
                   "sparsified task vectors (--density), truncated to --rank. [default: linear]")
@click.option("--rank", type=int, help="Output rank for svd/ties/dare. [default: max rank (svd), sum of ranks]")
@click.option("--density", type=float, help="Fraction of each ΔW kept by ties/dare, in (0, 1].")
@click.option("--seed", type=int, help="Seed of dare's random drop masks. [default: 0]")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Adapter directory to create (usable by fuse, eval, chat and mlx_lm).")
@force_option
@config_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the output directory.")
def command(sft, pt, alpha, w_sft, w_pt, alpha_schedule, method, rank, density, seed, out_dir, force, config_path, quiet) -> None:
    """Merge an SFT and a PT adapter: ΔW = w_sft·ΔW_sft + w_pt·ΔW_pt (each ΔW = scale·B·A of its own).

    \b
    If the SFT run was trained on top of the PT run (stacked), the SFT model's ΔW is ΔW_pt + ΔW_sft_own,
    so --alpha A gives ΔW_pt + A·ΔW_sft_own. Adapters on different bases or targets are refused.
    Writes the adapter and merge_report.json (per-module retained energy and error). Examples:
      mlx-med merge --sft runs/sft --pt runs/pt --alpha 0.5 -o merged
      mlx-med merge --sft runs/sft --pt runs/pt --alpha 0.7 --method svd --rank 16 -o merged-r16
      mlx-med merge --sft runs/sft --pt runs/pt --w-sft 1 --w-pt 0.5 --method ties --density 0.3 -o m
    """
    from mlx_med.config import load_config

    cfg = load_config(MergeConfig, config_path, {
        "sft": sft, "pt": pt, "alpha": alpha, "w_sft": w_sft, "w_pt": w_pt, "alpha_schedule": alpha_schedule,
        "method": method, "rank": rank,
        "density": density, "seed": seed,
    })
    from mlx_med.adapters.merge import METHODS, merge_adapters, write_merged
    from mlx_med.adapters.mix import resolve_mix
    from mlx_med.errors import UserError

    if cfg.sft is None or cfg.pt is None:
        raise UserError("give --sft RUN and --pt RUN (or sft:/pt: in the config)")
    if cfg.method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    from mlx_med.io import check_output_dir

    check_output_dir(out_dir, force=force, inputs=[cfg.sft, cfg.pt])  # before any loading
    if cfg.alpha is None and cfg.w_sft is None and cfg.w_pt is None and cfg.alpha_schedule is None:
        raise UserError("missing --alpha (w_sft = alpha, w_pt = 1 − alpha), --w-sft/--w-pt or --alpha-schedule")
    mix = resolve_mix(None, cfg.sft, cfg.pt, cfg.alpha, cfg.w_sft, cfg.w_pt, cfg.alpha_schedule)
    adapters, weights = mix.adapters, mix.weights
    result = merge_adapters(adapters, weights, cfg.method, rank=cfg.rank, density=cfg.density,
                            seed=cfg.seed, progress=not quiet, schedule=mix.schedule)
    write_merged(result, out_dir, force=force, inputs=[cfg.sft, cfg.pt])
    if quiet:
        click.echo(str(out_dir))
        return
    summary = result.summary()
    click.echo(f"merged {adapters['sft'].path} (w_sft={weights['sft']:g}) + {adapters['pt'].path} "
               f"(w_pt={weights['pt']:g}) with {cfg.method}: rank {summary['rank']}, {summary['modules']} modules")
    if mix.schedule is not None:
        click.echo(f"{mix.schedule.describe()}: weights above are the default, rules set others per module")
    if result.coefficients != weights:
        click.echo(f"SFT was trained stacked on PT: ΔW = {result.coefficients['pt']:g}·ΔW_pt + "
                   f"{result.coefficients['sft']:g}·ΔW_sft_own")
    if cfg.method != "linear":
        for line in _per_layer_lines(result.modules):
            click.echo(line)
        click.echo(f"retained energy: min {summary['min_energy']:.4f}, mean {summary['mean_energy']:.4f}; "
                   f"relative error: max {summary['max_rel_error']:.4f}, mean {summary['mean_rel_error']:.4f}; "
                   f"distance from the exact weighted sum: max {summary['max_rel_diff_linear']:.4f}")
    click.echo(f"wrote {out_dir} (adapters.safetensors, adapter_config.json, merge_report.json)")


def _per_layer_lines(modules) -> list[str]:
    """One line per decoder layer: the worst module's retained energy and errors."""
    from mlx_med.adapters.format import layer_index, module_type

    by_layer: dict[str, list] = {}
    for m in modules:
        index = layer_index(m.module)
        by_layer.setdefault(m.module if index is None else str(index), []).append(m)
    lines = []
    for layer, items in sorted(by_layer.items(), key=lambda kv: (len(kv[0]), kv[0])):
        worst = min(items, key=lambda m: m.energy)
        lines.append(f"  layer {layer}: energy min {worst.energy:.4f} ({module_type(worst.module)}), "
                     f"rel error max {max(m.rel_error for m in items):.4f}, "
                     f"vs exact sum max {max(m.rel_diff_linear for m in items):.4f}")
    return lines
