"""``mlx-med chat``: talk to a model (optionally with adapters mixed live) in the terminal or a pipe."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mlx_med.commands.options import alpha_option, alpha_schedule_option, compute_policy_option, config_option


@click.command("chat")
@config_option
@compute_policy_option()
@click.option("--model", "model", type=click.Path(), help="Model folder (mlx-med convert / fuse output).")
@click.option("--adapter", type=click.Path(), help="One adapter or training run directory to apply.")
@click.option("--sft", type=click.Path(), help="SFT run directory, mixed live with --pt (needs --pt).")
@click.option("--pt", type=click.Path(), help="PT run directory, mixed live with --sft (needs --sft).")
@alpha_option
@alpha_schedule_option
@click.option("--system", help="System prompt replacing the default medical-assistant one ('' for none, @FILE to read it).")
@click.option("--lang", type=click.Choice(["en", "zh"]), help="Language of the default system prompt.  [default: en]")
@click.option("--temp", "temperature", type=float, help="Sampling temperature; 0 is greedy.  [default: 0.7]")
@click.option("--top-p", type=float, help="Nucleus sampling top_p (1 = off).  [default: 0.9]")
@click.option("--top-k", type=int, help="Keep only the k most likely tokens (0 = off).  [default: 0]")
@click.option("--repetition-penalty", type=float, help="Penalise repeated tokens (1 = off).  [default: 1.0]")
@click.option("--max-new-tokens", type=int, help="Longest answer, in tokens.  [default: 256]")
@click.option("--context", type=int, help="Context window in tokens (default: the model's); oldest turns are dropped to fit.")
@click.option("--seed", type=int, help="Random seed for sampling.  [default: 0]")
@click.option("--json", "as_json", is_flag=True, help="Piped mode: print one JSON object per answer.")
@click.option("--no-history", is_flag=True, help="Answer every message on its own, without earlier turns.")
@click.option("-q", "--quiet", is_flag=True, help="No start-up banner.")
def command(config_path, model, adapter, sft, pt, alpha, alpha_schedule, system, lang, temperature, top_p, top_k,
            repetition_penalty, max_new_tokens, context, seed, as_json, no_history, quiet) -> None:
    """Chat with a model: streamed answers, multi-turn history, slash commands (/help).

    \b
    With a terminal on stdin it is an interactive REPL (readline editing, Ctrl-C stops an answer,
    Ctrl-D quits). Otherwise it reads one message per line and prints one answer per line, with
    newlines inside an answer written as \\n (or one JSON object per line with --json):
      printf 'What is hypertension?\\nHow is it treated?\\n' | mlx-med chat --model base --temp 0
    """
    from mlx_med.adapters.mix import check_mix_flags
    from mlx_med.chat.session import ChatConfig
    from mlx_med.config import load_config
    from mlx_med.errors import UserError

    cfg = load_config(ChatConfig, config_path, {
        "model": model, "adapter": adapter, "sft": sft, "pt": pt, "alpha": alpha, "alpha_schedule": alpha_schedule,
        "system": system, "lang": lang,
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty,
        "max_new_tokens": max_new_tokens, "context": context, "seed": seed,
    })
    if not cfg.model:
        raise UserError("--model DIR is required (or 'model:' in the --config file)")
    check_mix_flags(cfg.adapter, cfg.sft, cfg.pt, cfg.alpha, schedule=cfg.alpha_schedule)
    decoding = cfg.decoding()  # validate flags before spending seconds on loading
    system = cfg.system_prompt()
    interactive = sys.stdin.isatty() and not as_json
    run(cfg, decoding, system, interactive, as_json, not no_history, quiet)


def run(cfg, decoding, system: str | None, interactive: bool, as_json: bool, keep_history: bool,
        quiet: bool) -> None:
    import time

    from mlx_med.adapters.live import load_with_adapters, print_notes
    from mlx_med.backend import seed_everything
    from mlx_med.chat.repl import run_interactive, run_piped
    from mlx_med.chat.session import ChatSession, context_window

    start = time.perf_counter()
    loaded, adapters = load_with_adapters(cfg.model, adapter=cfg.adapter, sft=cfg.sft, pt=cfg.pt, alpha=cfg.alpha,
                                          alpha_schedule=cfg.alpha_schedule)
    seconds = time.perf_counter() - start
    seed_everything(cfg.seed)
    window = context_window(loaded.config, cfg.context)
    session = ChatSession(loaded.model, loaded.tokenizer, decoding, system=system, window=window, adapters=adapters)
    if not quiet:
        click.echo(banner(loaded, adapters, session, seconds), err=True)
    print_notes(adapters)
    if interactive:
        run_interactive(session, history_file=_history_file())
    else:
        run_piped(session, iter(sys.stdin.readline, ""), sys.stdout, sys.stderr, as_json, keep_history)


def banner(loaded, adapters, session, seconds: float) -> str:
    """Start-up lines: model, adapters, α, device, dtype, context, decoding, load time."""
    from mlx.utils import tree_flatten

    params = sum(v.size for _, v in tree_flatten(loaded.model.parameters()))
    arch = loaded.config.get("model_type", "?")
    mix = adapters.describe() if adapters is not None else "none"
    if session.alpha is not None:
        mix += " (/alpha A switches live)"
    b = loaded.backend
    return "\n".join([
        f"model: {loaded.path} ({arch}, {params / 1e6:.1f}M parameters, context {session.window} tokens)",
        f"adapters: {mix}",
        f"device: {b.device} ({b.accelerator}), dtype {b.dtype_name}; loaded in {seconds:.1f} s",
        f"decoding: {session.settings_text()}",
    ])


def _history_file() -> Path:
    """Where typed lines are kept between sessions (``$XDG_STATE_HOME/mlx-med/chat_history``)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "mlx-med" / "chat_history"

