"""``mlx-med plan``: predicted peak memory of a training run, before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_med.commands.options import config_option


@click.command("plan")
@click.option("--model", type=click.Path(path_type=Path),
              help="Model folder or a config.json file (e.g. configs/models/qwen2.5-14b.json). "
                   "[default: the recipe's model]")
@click.option("--backend", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="gpu: Metal/CUDA, quantized base kept (QLoRA), bf16 compute; cpu: MLX CPU backend, "
                   "base dequantized to fp32; auto: what this machine runs.")
@click.option("--q-bits", type=click.Choice(["0", "2", "3", "4", "5", "6", "8"]), default=None,
              help="Assume the base quantized to this many bits (0 = not quantized). "
                   "[default: as stored in config.json]")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Weights per quantization group with --q-bits. [default: 64]")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default=None,
              help="Compute dtype on the gpu backend (the cpu backend always computes in float32). [default: bfloat16]")
@click.option("--batch-size", type=int, help="Sequences per step. [default: the recipe's, else 4]")
@click.option("--max-seq-len", type=int, help="Tokens per sequence. [default: the recipe's, else 512]")
@click.option("--lora-rank", type=int, help="LoRA rank r. [default: the recipe's, else 8]")
@click.option("--lora-layers", type=int, help="Adapt only the last N blocks (-1 = all). [default: the recipe's, else -1]")
@click.option("--target-modules",
              help="Comma-separated linear layers to adapt (q_proj,v_proj,...). [default: every attention and MLP linear]")
@click.option("--lora-dropout", type=float, help="LoRA dropout (adds a mask and an input copy per module).")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None,
              help="Recompute block activations in the backward pass (keeps only block inputs).")
@click.option("--grad-accumulation", type=int, help="Micro-batches per optimizer step (keeps a gradient sum).")
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), default=None,
              help="Optimizer whose state is counted. [default: adamw, as mlx-med train uses]")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON (bytes per part, peak_gb, fits).")
@config_option
def command(model, backend, q_bits, q_group_size, dtype, batch_size, max_seq_len, lora_rank, lora_layers,
            target_modules, lora_dropout, grad_checkpoint, grad_accumulation, optimizer, as_json,
            config_path) -> None:
    """Predict peak memory of LoRA/QLoRA training from config.json alone and say whether it fits.

    \b
    Prints base weights, LoRA params + grads + AdamW state, activations (with and without
    gradient checkpointing) and logits, a line `peak: <number> GB`, and a fit table for
    16/24/32/64 GB machines. Nothing is loaded or downloaded. Examples:
      mlx-med plan --model configs/models/qwen2.5-14b.json --q-bits 4 --max-seq-len 1024 \\
          --batch-size 1 --lora-rank 16 --backend gpu
      mlx-med plan -c configs/qwen2.5-14b-pt.yaml --backend gpu   # uses configs/models/qwen2.5-14b.json
      mlx-med plan -c configs/demo-pt.yaml --model runs/demo/base --backend cpu
      mlx-med plan --model base-4bit --grad-checkpoint
    """
    from mlx_med.train.plan import estimate, fit_table, format_plan, read_model_shape

    overrides = {"batch_size": batch_size, "max_seq_len": max_seq_len, "lora_rank": lora_rank,
                 "lora_layers": lora_layers, "lora_dropout": lora_dropout, "grad_checkpoint": grad_checkpoint,
                 "grad_accumulation": grad_accumulation, "optimizer": optimizer, "dtype": dtype,
                 "q_bits": None if q_bits is None else int(q_bits),
                 "q_group_size": None if q_group_size is None else int(q_group_size),
                 "target_modules": None if target_modules is None
                 else [t.strip() for t in target_modules.split(",") if t.strip()]}
    from mlx_med.errors import UserError

    settings, recipe_model = _settings(config_path, overrides)
    note = None
    if model is None and recipe_model is None and config_path is not None:
        model = _architecture_for(config_path)
        if model is not None:
            note = f"the recipe names no model; planning {model.name}"
            if settings.q_bits is None:  # the shipped recipes are QLoRA recipes on a 4-bit, group-64 base
                settings.q_bits, settings.q_group_size = 4, overrides["q_group_size"] or 64
                note += f" as a {settings.q_bits}-bit base (--q-bits to change)"
    model = model or recipe_model
    if model is None:
        from mlx_med.resources import shipped_path

        known = ", ".join(str(p) for p in sorted(shipped_path("configs", "models").glob("*.json")))
        raise UserError("give --model MODEL_DIR_OR_CONFIG_JSON (or a recipe that names a model)"
                        + (f"; architectures shipped: {known}" if known else ""))
    if recipe_model is not None and model == recipe_model and not Path(model).exists():
        raise UserError(f"{config_path}: model {model} is not on this machine; pass --model with its "
                        "config.json (e.g. configs/models/qwen2.5-14b.json) to plan without it")
    shape = read_model_shape(model)
    device = backend
    if backend == "auto":
        from mlx_med.backend import detect_backend

        device = detect_backend().device
    plan = estimate(shape, settings, device)
    if as_json:
        click.echo(json.dumps({
            "model": shape.source, "device": device, "compute_dtype": plan.compute_dtype,
            "weights_policy": plan.weights_policy, "lora_params": plan.lora_params,
            "parts": {p.name: p.bytes for p in plan.parts},
            "activations_no_checkpointing": plan.activations_off,
            "activations_checkpointing": plan.activations_on,
            "peak_gb": round(plan.peak_gb, 4),
            "fits": {f"{size}GB": verdict for size, _, verdict in fit_table(plan)},
        }, indent=2))
        return
    if note:
        click.echo(f"note: {note}")
    click.echo(format_plan(plan))


def _architecture_for(recipe: Path) -> Path | None:
    """``configs/models/<name>.json`` for a recipe ``configs/<name>-pt.yaml`` / ``-sft.yaml``, if shipped."""
    name = recipe.stem
    for suffix in ("-pt", "-sft"):
        name = name.removesuffix(suffix)
    candidate = recipe.parent / "models" / f"{name}.json"
    return candidate if candidate.is_file() else None


def _settings(config_path: Path | None, overrides: dict):
    """``PlanSettings`` from a training recipe (if any) with flags on top, and the recipe's model."""
    from mlx_med.train.plan import PlanSettings, settings_from_recipe

    if config_path is None:
        return PlanSettings(**{k: v for k, v in overrides.items() if v is not None}), None
    from mlx_med.config import load_config
    from mlx_med.train.config import TrainConfig

    cfg = load_config(TrainConfig, config_path)
    return settings_from_recipe(cfg, overrides), cfg.model
