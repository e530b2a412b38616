"""``mlx-med eval``: batched generation on an eval set, LLaMA-Factory BLEU-4/ROUGE and standard scores."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_med.commands.options import (
    alpha_option,
    alpha_schedule_option,
    compute_policy_option,
    config_option,
    force_option,
)


def decoding_options(func):
    """Decoding flags shared by ``eval`` and the sweeps (each overrides the chosen preset)."""
    options = [
        click.option("--preset", help="Decoding preset: greedy | llamafactory (LLaMA-Factory's defaults: "
                     "temperature 0.95, top_p 0.7, top_k 50) | balanced | creative.  [default: greedy]"),
        click.option("--temperature", "--temp", "temperature", type=float,
                     help="Sampling temperature; 0 is greedy (overrides the preset)."),
        click.option("--top-p", type=float, help="Nucleus sampling top_p, 1 = off (overrides the preset)."),
        click.option("--top-k", type=int, help="Keep the k most likely tokens, 0 = off (overrides the preset)."),
        click.option("--min-p", type=float, help="Min-p sampling threshold, 0 = off (overrides the preset)."),
        click.option("--repetition-penalty", type=float, help="Penalise repeated tokens, 1 = off."),
        click.option("--max-new-tokens", type=int, help="Longest answer in tokens (overrides the preset; "
                     "greedy: 256, llamafactory: 1024)."),
        click.option("--seed", type=int, help="Random seed for sampling.  [default: 0]"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func):
    """Model and adapter flags shared by ``eval`` and the sweeps."""
    options = [
        click.option("--model", type=click.Path(path_type=Path), help="Base model folder (MLX or HF safetensors)."),
        click.option("--adapter", type=click.Path(path_type=Path), help="One adapter / training run directory to apply."),
        click.option("--sft", type=click.Path(path_type=Path), help="SFT run, mixed live with --pt at weight --alpha."),
        click.option("--pt", type=click.Path(path_type=Path), help="PT run, mixed live with --sft."),
        alpha_option,
        alpha_schedule_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("eval")
@config_option
@model_options
@compute_policy_option()
@click.option("--data", type=click.Path(path_type=Path),
              help="Eval JSONL: {\"messages\": [...]} (last assistant turn = reference) or "
                   "{\"prompt\", \"response\"|\"output\"|\"label\"}. For --suite safety: a probe file (default: starter set).")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Output folder: generated_predictions.jsonl, metrics.json. Re-running resumes an interrupted eval.")
@click.option("--suite", type=click.Choice(["qa", "safety", "mcq"]), default="qa", show_default=True,
              help="qa: BLEU-4/ROUGE against references; safety: the safety screening probes; "
                   "mcq: multiple-choice accuracy by option log-likelihood.")
@click.option("--limit", type=int, help="Evaluate only the first N rows.")
@click.option("--batch-size", type=int, help="Sequences generated together.  [default: 8]")
@click.option("--shots", type=int, help="--suite mcq: solved examples shown before each question.  [default: 0]")
@click.option("--shots-data", type=click.Path(path_type=Path),
              help="--suite mcq: dev split the shots come from (default: other items of --data).")
@decoding_options
@click.option("--system", help="System prompt added to rows that have none (default: none, as in the study).")
@click.option("--lang", type=click.Choice(["auto", "zh", "en"]),
              help="Language for sacreBLEU's tokenizer (zh or 13a).  [default: auto, from the references]")
@click.option("--ppl-data", type=click.Path(path_type=Path),
              help="Held-out PT text (JSONL/txt): also report its perplexity (knowledge retention).")
@click.option("--ppl-limit", type=int, help="PT records used for perplexity.  [default: 100]")
@click.option("--ppl-block-size", type=int, help="Tokens per perplexity block.  [default: 512]")
@click.option("--predictions", type=click.Path(path_type=Path),
              help="Score an existing generated_predictions.jsonl (ours or LLaMA-Factory's) instead of generating.")
@force_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table (for scripts).")
def command(config_path, model, adapter, sft, pt, alpha, alpha_schedule, data, out, suite, limit, batch_size, shots,
            shots_data, preset,
            temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed, system, lang,
            ppl_data, ppl_limit, ppl_block_size, predictions, force, quiet) -> None:
    """Generate answers for an eval set and score them (BLEU-4/ROUGE as LLaMA-Factory computes them).

    \b
    Examples:
      mlx-med eval --model base --data data/demo/eval_toyhom_zh.jsonl -o evals/base --limit 20
      mlx-med eval --model base --adapter runs/sft --data eval.jsonl -o evals/sft --preset llamafactory
      mlx-med eval --model base --sft runs/sft --pt runs/pt --alpha 0.7 --data eval.jsonl -o evals/a07
      mlx-med eval --suite safety --model base --adapter runs/sft -o evals/safety
      mlx-med eval --suite mcq --model base --sft runs/sft --pt runs/pt --alpha 0.5 \\
        --data data/demo/mcq_mmlu_med_en.jsonl -o evals/mcq --shots 3
      mlx-med eval --predictions llamafactory_out/generated_predictions.jsonl -o evals/lf
    """
    from mlx_med.config import load_config
    from mlx_med.errors import UserError

    overrides = {
        "model": model, "adapter": adapter, "sft": sft, "pt": pt, "alpha": alpha, "alpha_schedule": alpha_schedule,
        "data": data, "out": out,
        "limit": limit, "batch_size": batch_size, "system": system, "force": force or None,
    }
    decoding = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
                "repetition_penalty": repetition_penalty, "max_new_tokens": max_new_tokens, "seed": seed}
    if predictions is not None:
        from mlx_med.evaluation.runner import score_predictions

        score_predictions(predictions, out, lang=lang or "auto", quiet=quiet, force=force)
        return
    from mlx_med.evaluation.suites import run_suite, suite_config

    per_suite = {
        "qa": {**decoding, "preset": preset, "lang": lang, "ppl_data": ppl_data, "ppl_limit": ppl_limit,
               "ppl_block_size": ppl_block_size},
        "safety": {"data": str(data) if data else None, "progress": False if quiet else None},
        "mcq": {"shots": shots, "shots_data": shots_data},
    }
    if suite == "mcq" and batch_size is not None:  # the options of one question are the batch
        raise UserError("--batch-size does not apply to --suite mcq (each question's options form one batch)")
    cfg = load_config(suite_config(suite), config_path, {**overrides, **per_suite[suite]})
    if suite == "safety":  # the safety config nests its decoding settings: preset, then the flags on top
        from mlx_med.evaluation.decoding import preset as named_preset

        cfg.decoding = (named_preset(preset) if preset else cfg.decoding).with_overrides(**decoding)
    from mlx_med.io import check_output_dir, check_output_location, mark_dir, output_lock

    inputs = [cfg.model, cfg.adapter, cfg.sft, cfg.pt, cfg.alpha_schedule, cfg.data,
              getattr(cfg, "ppl_data", None), getattr(cfg, "shots_data", None)]
    if suite != "qa":  # written whole after loading (atomic_output_dir): -o is checked before loading
        if cfg.out is not None:  # (a missing -o is named by the suite)
            check_output_dir(cfg.out, force=cfg.force, inputs=inputs)
        run_suite(suite, cfg, quiet=quiet)
        return
    cfg.validate()  # a missing -o is named before its location is checked
    # Where it may write is checked here, before loading; what it may replace, by the runner (resume/--force).
    check_output_location(cfg.out, inputs=inputs)
    with output_lock(cfg.out):  # one eval per folder at a time
        run_suite(suite, cfg, quiet=quiet)
        mark_dir(cfg.out)
    if not quiet:
        click.echo(f"wrote {Path(cfg.out) / 'generated_predictions.jsonl'} and metrics.json")
