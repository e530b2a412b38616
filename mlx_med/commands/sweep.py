"""``mlx-med sweep decoding|alpha``: metrics over a decoding grid, or over the merge weight α (live)."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_med.commands.eval import decoding_options, model_options
from mlx_med.commands.options import compute_policy_option, config_option, force_option


def common_options(func):
    """Eval flags both sweeps share."""
    options = [
        click.option("--data", type=click.Path(path_type=Path), help="Eval JSONL (as for mlx-med eval)."),
        click.option("-o", "--out", type=click.Path(path_type=Path),
                     help="Sweep folder; re-running it reuses finished settings and resumes an interrupted one."),
        click.option("--limit", type=int, help="Evaluate only the first N rows at each setting."),
        click.option("--batch-size", type=int, help="Sequences generated together.  [default: 8]"),
        click.option("--system", help="System prompt added to rows that have none."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def mcq_axis_options(func):
    """``sweep alpha``: MCQ accuracy as an axis."""
    options = [
        click.option("--mcq-data", type=click.Path(path_type=Path),
                     help="MCQ JSONL: option log-likelihood accuracy at each α (then --data is optional)."),
        click.option("--mcq-limit", type=int, help="Score only the first N MCQ items at each α."),
        click.option("--mcq-shots", type=int, help="Solved MCQ examples before each question.  [default: 0]"),
        click.option("--mcq-shots-data", type=click.Path(path_type=Path),
                     help="Dev split the MCQ shots come from (default: other items of --mcq-data)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def search_options(func):
    """``sweep alpha --search``: a bounded search for α instead of the grid."""
    options = [
        click.option("--search", is_flag=True, default=None,
                     help="Search α (bisection on a dyadic grid, cached points) instead of sweeping --alphas."),
        click.option("--objective", help="Search: column to maximise (rouge-l, bleu-4, accuracy, "
                     "accuracy_norm, safety; ppl is minimised).  [default: rouge-l, or accuracy without --data]"),
        click.option("--constraint", "constraints", multiple=True, metavar="METRIC>=[F*]REF",
                     help="Search: a limit every chosen α must meet, REF = base | pt | sft | a number, "
                          "e.g. 'safety>=base' or 'ppl<=1.05*pt'; repeatable."),
        click.option("--budget", type=int, help="Search: at most N α evaluations (>= 3).  [default: 8]"),
        click.option("--with-base", is_flag=True, default=None,
                     help="Grid: also measure the base model (both adapter weights 0) as a reference row, in the "
                          "same generation batch; a later --search in the folder reuses it for 'safety>=base'."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _overrides(**values) -> dict:
    force = values.pop("force", None)
    return {**values, "force": force or None}


@click.group("sweep")
def command() -> None:
    """Sweep decoding settings or the SFT/PT merge weight α; tables, CSV and plots per sweep."""


@command.command("decoding")
@config_option
@compute_policy_option()
@model_options
@common_options
@click.option("--grid", "grids", multiple=True, metavar="NAME=V1,V2,...",
              help="Values of one decoding setting (temperature, top_p, top_k, min_p, repetition_penalty, "
                   "max_new_tokens, seed); repeat for a full grid.")
@decoding_options
@force_option
@click.option("-q", "--quiet", is_flag=True, help="No progress and no table.")
def decoding(config_path, model, adapter, sft, pt, alpha, alpha_schedule, data, out, limit, batch_size, system, grids,
             preset, temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed, force, quiet) -> None:
    """Metrics at every point of a decoding grid → decoding_sweep.csv / .md / .png.

    \b
    Settings not in the grid come from --preset and the other decoding flags. Greedy points
    (temperature 0) that differ only in sampling knobs are generated once.
    Example:
      mlx-med sweep decoding --model base --adapter runs/sft --data eval.jsonl -o sweeps/dec --limit 50 \\
        --grid temperature=0,0.3,0.7,0.95 --grid top_p=0.7,0.9,1.0
    """
    from mlx_med.config import load_config
    from mlx_med.evaluation.sweep import DecodingSweepConfig, parse_grid, run_decoding_sweep

    cfg = load_config(DecodingSweepConfig, config_path, _overrides(
        model=model, adapter=adapter, sft=sft, pt=pt, alpha=alpha, alpha_schedule=alpha_schedule, data=data,
        out=out, limit=limit, batch_size=batch_size, system=system, preset=preset, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        force=force, grid=parse_grid(list(grids)) if grids else None,
    ))
    with _locked(cfg):
        run_decoding_sweep(cfg, quiet=quiet)


@command.command("alpha")
@config_option
@compute_policy_option()
@click.option("--model", type=click.Path(path_type=Path), help="Base model folder (MLX or HF safetensors).")
@click.option("--sft", type=click.Path(path_type=Path), help="SFT run directory.")
@click.option("--pt", type=click.Path(path_type=Path), help="PT run directory.")
@click.option("--alpha-schedule", type=click.Path(path_type=Path),
              help="YAML α schedule: the grid moves its default and keeps its rules; --search with rules "
                   "searches the default and each rule's α (→ best_schedule.yaml).")
@common_options
@click.option("--alphas", help="α values: a list (0,0.5,1) or a range A,B,...,C with step B−A.  "
                               "[default: 0,0.1,...,1]")
@click.option("--ppl-data", type=click.Path(path_type=Path),
              help="Held-out PT text: perplexity at each α (knowledge retention).")
@click.option("--ppl-limit", type=int, help="PT records used for perplexity.  [default: 100]")
@click.option("--ppl-block-size", type=int, help="Tokens per perplexity block.  [default: 512]")
@click.option("--safety-probes", type=click.Path(path_type=Path),
              help="Safety probe file ('starter' = the shipped set): adds the safety pass rate at each α as a third axis.")
@click.option("--metric", help="QA metric the α rule maximises.  [default: rouge-l]")
@click.option("--ppl-tolerance", type=float,
              help="α rule: allowed relative rise over the sweep's lowest perplexity.  [default: 0.1]")
@click.option("--safety-margin", type=float,
              help="α rule: allowed drop in safety pass rate (points) below α=1.  [default: 5]")
@mcq_axis_options
@search_options
@decoding_options
@force_option
@click.option("-q", "--quiet", is_flag=True, help="No progress and no table.")
def alpha(config_path, model, sft, pt, alpha_schedule, data, out, limit, batch_size, system, alphas, ppl_data,
          ppl_limit, ppl_block_size, safety_probes, metric, ppl_tolerance, safety_margin, mcq_data, mcq_limit,
          mcq_shots, mcq_shots_data, search, objective, constraints, budget, with_base, preset, temperature, top_p, top_k,
          min_p, repetition_penalty, max_new_tokens, seed, force, quiet) -> None:
    """QA metrics, perplexity, safety and MCQ accuracy at each α, switched live → alpha_sweep.* and the picked α.

    \b
    Rule: the highest --metric among α whose perplexity is ≤ (1 + --ppl-tolerance) × the sweep's
    lowest and whose safety pass rate is ≥ the α=1 rate − --safety-margin; ties → larger α.
    With --search: at most --budget evaluations, the best --objective among the α meeting every
    --constraint, ties → α closer to 0.5 → alpha_search.* (every point, Pareto plot, the choice);
    with an --alpha-schedule that has rules, coordinate search over its default and rule α →
    also best_schedule.yaml.
    Examples:
      mlx-med sweep alpha --model base --sft runs/sft --pt runs/pt --alphas 0,0.25,...,1 \\
        --data eval.jsonl --ppl-data pt_heldout.jsonl -o sweeps/alpha --limit 50
      mlx-med sweep alpha --model base --sft runs/sft --pt runs/pt --mcq-data mcq.jsonl \\
        --safety-probes starter --search --objective accuracy --constraint "safety>=base" --budget 7 -o sweeps/s
    """
    from mlx_med.config import load_config
    from mlx_med.evaluation.alpha_sweep import AlphaSweepConfig, run_alpha_search, run_alpha_sweep

    cfg = load_config(AlphaSweepConfig, config_path, _overrides(
        model=model, sft=sft, pt=pt, alpha_schedule=alpha_schedule, data=data, out=out, limit=limit,
        batch_size=batch_size, system=system,
        alphas=alphas, ppl_data=ppl_data, ppl_limit=ppl_limit, ppl_block_size=ppl_block_size,
        safety_probes=safety_probes, preset=preset, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
        force=force, **{"rule.metric": metric, "rule.ppl_tolerance": ppl_tolerance,
                        "rule.safety_margin": safety_margin},
        mcq_data=mcq_data, mcq_limit=mcq_limit, mcq_shots=mcq_shots, mcq_shots_data=mcq_shots_data,
        search=search, objective=objective, constraints=list(constraints) or None, budget=budget,
        with_base=with_base,
    ))
    with _locked(cfg):
        (run_alpha_search if cfg.search else run_alpha_sweep)(cfg, quiet=quiet)


def _locked(cfg):
    """Check where the sweep writes (before loading) and hold its folder for the sweep's life."""
    from mlx_med.io import check_output_location, output_lock

    cfg.validate()  # a missing -o is named before its location is checked
    inputs = [cfg.model, cfg.adapter, cfg.sft, cfg.pt, cfg.alpha_schedule, cfg.data, cfg.ppl_data]
    inputs += [getattr(cfg, name, None) for name in ("mcq_data", "mcq_shots_data", "safety_probes")]
    check_output_location(cfg.out, inputs=inputs)
    return output_lock(cfg.out)
