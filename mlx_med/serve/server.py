"""Start-up: load the model with its adapters live, build the app, bind, print the URL, serve until Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

from mlx_med.errors import UserError
from mlx_med.serve.config import ServeConfig

LOOPBACK_NAMES = ("localhost",)


def check_host(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in LOOPBACK_NAMES
    if not loopback and not api_key:
        raise UserError(f"--host {host} makes the server reachable from other machines; "
                        "give --api-key KEY too (clients then send 'Authorization: Bearer KEY')")


def build_state(cfg: ServeConfig):
    """Load the model and adapters and wire the scheduler, catalog and limits together."""
    import mlx.core as mx

    from mlx_med.adapters.live import load_with_adapters, print_notes
    from mlx_med.chat.session import context_window
    from mlx_med.kernels import pack_projections
    from mlx_med.serve.app import ServerState
    from mlx_med.serve.mixes import MixCatalog
    from mlx_med.serve.scheduler import Scheduler
    from mlx_med.serve.schemas import Defaults

    loaded, live = load_with_adapters(cfg.model, adapter=cfg.adapter, sft=cfg.sft, pt=cfg.pt, alpha=cfg.alpha)
    # Weights loading left lazy belong to this thread's stream; the scheduler's thread could not
    # evaluate them ("There is no Stream(cpu, 0) in current thread").
    mx.eval(loaded.model.parameters())
    print_notes(live)
    print(f"mlx-med serve: {pack_projections(loaded.model)}", file=sys.stderr)
    names = list(live.adapters) if live is not None else []
    catalog = MixCatalog(adapters=names, weights=live.weights if live is not None else {},
                         paths={n: str(a.path or n) for n, a in (live.adapters.items() if live else [])})
    tokenizer = loaded.tokenizer
    vocab = int(loaded.config.get("vocab_size") or 0)  # 0: top_k is not applied
    scheduler = Scheduler(loaded.model, live, sorted(tokenizer.eos_token_ids), vocab, cfg.batch_size)
    defaults = Defaults(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                        max_tokens_limit=cfg.max_tokens_limit)
    return ServerState(tokenizer=tokenizer, scheduler=scheduler, catalog=catalog, defaults=defaults,
                       system=cfg.system_prompt(), window=context_window(loaded.config, cfg.context),
                       api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes, log_prompts=cfg.log_prompts)


def check_config(cfg: ServeConfig) -> None:
    """Everything that can be refused before the model is loaded."""
    from mlx_med.adapters.mix import check_adapter_choice
    from mlx_med.evaluation.decoding import DecodingConfig

    if not cfg.model:
        raise UserError("--model DIR is required (or 'model:' in the --config file)")
    check_adapter_choice(cfg.adapter, cfg.sft, cfg.pt, alpha=cfg.alpha)
    check_host(cfg.host, cfg.api_key)
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {cfg.port}")
    for name in ("batch_size", "max_tokens", "max_tokens_limit", "max_body_bytes"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_tokens > cfg.max_tokens_limit:
        raise UserError(f"max_tokens ({cfg.max_tokens}) is above max_tokens_limit ({cfg.max_tokens_limit})")
    DecodingConfig(temperature=cfg.temperature, top_p=cfg.top_p)  # same ranges as chat's
    cfg.system_prompt()  # --system @FILE must exist


def serve(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C; in-flight requests get a few seconds to finish, then are cancelled."""
    import uvicorn

    from mlx_med.serve.app import create_app

    check_config(cfg)
    state = build_state(cfg)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(2048)  # clients that connect right after the URL is printed wait for uvicorn, not refused
    except OSError as err:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {err.strerror or err}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    ids = state.catalog.model_ids() + (["merged@A"] if state.catalog.pair else [])
    alpha = state.catalog.alpha
    print(f"serving http://{shown}:{port}/v1  models: {', '.join(ids)}"
          + (f"  (merged = α {alpha:g})" if alpha is not None else ""), flush=True)
    print("Ctrl-C stops the server", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the shutdown was clean
        pass
    finally:
        sock.close()
    print("server stopped", file=sys.stderr, flush=True)
