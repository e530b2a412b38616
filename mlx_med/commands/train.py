"""``mlx-med train --phase pt|sft``: one LoRA training phase into a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_med.commands.options import compute_policy_option, config_option, force_option


@click.command("train")
@click.option("--phase", type=click.Choice(["pt", "sft"]), default=None,
              help="pt: continued pre-training on raw text (packed); sft: chats, loss on assistant tokens. "
                   "[default: the recipe's, else pt]")
@click.option("--model", type=click.Path(path_type=Path),
              help="MLX model folder (mlx-med convert output); a quantized base trains as QLoRA.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Training data: JSONL/JSON/.txt file or a directory of them.")
@click.option("--valid", type=click.Path(path_type=Path),
              help="Validation data. [default: hold out data.val_ratio of --data]")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), help="Run directory to create.")
@click.option("--iters", type=int, help="Optimizer steps to train for.")
@click.option("--batch-size", type=int, help="Sequences per step on each process.")
@click.option("--max-seq-len", type=int, help="PT: packed block length; SFT: longest conversation (tokens).")
@click.option("--lora-rank", type=int, help="LoRA rank r.")
@click.option("--lora-alpha", type=float, help="LoRA alpha; scale = alpha / r (alpha / √r with --rslora).")
@click.option("--rslora/--no-rslora", default=None, help="Rank-stabilised scaling alpha / √r.")
@click.option("--lora-layers", type=int, help="Adapt only the last N transformer blocks (-1 = all).")
@click.option("--learning-rate", type=float, help="Peak AdamW learning rate (after warmup).")
@click.option("--grad-accumulation", type=int, help="Micro-batches summed into one optimizer step.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None,
              help="Recompute activations in the backward pass: less memory, slower.")
@click.option("--seed", type=int, help="Seed for LoRA init, data order and dropout.")
@click.option("--on-top-of", type=click.Path(path_type=Path),
              help="SFT only: apply this PT run's adapter (frozen) under the new one. [default: base alone]")
@click.option("--system-prompt", help="SFT: system prompt added to conversations that have none.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue the run in this directory from its newest checkpoint (its run.yaml is the config).")
@force_option
@config_option
@compute_policy_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or log lines; print only the run directory.")
@click.option("--json-log", is_flag=True, help="Print each metrics record as a JSON line on stdout (for scripts).")
def command(phase, model, data, valid, out_dir, iters, batch_size, max_seq_len, lora_rank, lora_alpha, rslora,
            lora_layers, learning_rate, grad_accumulation, grad_checkpoint, seed, on_top_of, system_prompt,
            resume_dir, force, config_path, quiet, json_log) -> None:
    """Train a LoRA adapter: continued pre-training (pt) or supervised fine-tuning (sft).

    \b
    The run directory holds adapters.safetensors + adapter_config.json (loadable by mlx_lm too),
    run.yaml, metrics.jsonl, loss_curve.png, checkpoints/ and done.json when finished. Examples:
      mlx-med train --phase pt  --model base --data pt.jsonl  -o runs/pt  --iters 200
      mlx-med train --phase sft --model base --data sft.jsonl -o runs/sft -c configs/demo-sft.yaml
      mlx-med train --phase sft --model base --data sft.jsonl -o runs/sft-stacked --on-top-of runs/pt
      mlx-med train --resume runs/pt                     # after Ctrl-C or a crash
    Runs unchanged under mlx.launch (data parallel; rank 0 writes):
      mlx.launch -n 2 --backend ring -- mlx-med train --phase pt --model base --data pt.jsonl -o runs/pt
    """
    from mlx_med.config import load_config
    from mlx_med.errors import UserError
    from mlx_med.train.config import TrainConfig
    from mlx_med.train.trainer import load_run_config, run_training

    overrides = {
        "phase": phase, "model": model, "data.train": data, "data.valid": valid, "output": out_dir,
        "iters": iters, "optim.batch_size": batch_size, "max_seq_len": max_seq_len, "lora.rank": lora_rank,
        "lora.alpha": lora_alpha, "lora.use_rslora": rslora, "lora.num_layers": lora_layers,
        "optim.learning_rate": learning_rate, "optim.grad_accumulation": grad_accumulation,
        "grad_checkpoint": grad_checkpoint, "seed": seed, "on_top_of": on_top_of,
        "data.system_prompt": system_prompt,
    }
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
    if resume_dir is not None:
        if out_dir is not None and Path(out_dir) != Path(resume_dir):
            raise UserError("--resume RUN_DIR continues that directory; do not also pass a different -o")
        if force:
            raise UserError("--resume and --force contradict each other (continue vs start over)")
        overrides.pop("output")
        cfg = load_run_config(resume_dir, overrides)
    else:
        cfg = load_config(TrainConfig, config_path, overrides)
    out = run_training(cfg, quiet=quiet or json_log, json_log=json_log, resume=resume_dir is not None,
                       force=force)
    if quiet:
        click.echo(str(out))
