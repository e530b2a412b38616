"""``mlx-med serve``: an OpenAI-compatible local server in which every request picks its own α."""

from __future__ import annotations

import click

from mlx_med.commands.options import config_option


@click.command("serve")
@config_option
@click.option("--model", "model", type=click.Path(), help="Base model folder (mlx-med convert output).")
@click.option("--sft", type=click.Path(), help="SFT run directory, mixed per request with --pt (needs --pt).")
@click.option("--pt", type=click.Path(), help="PT run directory, mixed per request with --sft (needs --sft).")
@click.option("--alpha", type=float, help="Server-wide SFT weight α of the 'merged' model.  [default: 0.5]")
@click.option("--adapter", type=click.Path(), help="One adapter or training run directory instead of the pair.")
@click.option("--host", help="Address to listen on; anything but loopback needs --api-key.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Port (0: a free one, printed at start).  [default: 8080]")
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on every request.")
@click.option("--system", help="System prompt replacing the default medical-assistant one ('' for none, @FILE).")
@click.option("--lang", type=click.Choice(["en", "zh"]), help="Language of the default system prompt.  [default: en]")
@click.option("--max-tokens", type=int, help="New tokens when a request does not say.  [default: 256]")
@click.option("--batch-size", type=int, help="Requests decoded together; more wait for a slot.  [default: 8]")
@click.option("--context", type=int, help="Context window in tokens (default: the model's).")
@click.option("--log-prompts", is_flag=True, default=None, help="Log message bodies too (default: sizes only).")
def command(config_path, model, sft, pt, alpha, adapter, host, port, api_key, system, lang, max_tokens,
            batch_size, context, log_prompts) -> None:
    """Serve the model over the OpenAI HTTP API; each request picks its adapter mix.

    \b
    Model ids: merged (the server's α), merged@0.3, base, pt, sft; or model "merged" with an
    "alpha" field, or llama.cpp's "lora": [{"id": 0, "scale": 0.7}, {"id": 1, "scale": 0.3}].
      mlx-med serve --model base --sft runs/sft --pt runs/pt --alpha 0.5
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "merged", "alpha": 0.3, "messages": [{"role": "user", "content": "fever?"}]}'
    """
    from mlx_med.config import load_config
    from mlx_med.serve.config import ServeConfig
    from mlx_med.serve.server import serve

    cfg = load_config(ServeConfig, config_path, {
        "model": model, "sft": sft, "pt": pt, "alpha": alpha, "adapter": adapter, "host": host, "port": port,
        "api_key": api_key, "system": system, "lang": lang, "max_tokens": max_tokens, "batch_size": batch_size,
        "context": context, "log_prompts": log_prompts,
    })
    serve(cfg)
