"""A batch's common prompt start prefilled once vs every row prefilled whole, same model, same prompts.

The demo model (the bundled GGUF, converted; or ``--model``) with two random rank-8 adapters attached
live answers the first ``--n`` rows of an eval set under the default medical system prompt, greedy,
through ``generate_batch``: once per side at model-wide α 0.5 (batch ``--batch-size``) and once as a
mixed batch of α 0, 0.5 and 1. The sides alternate in one process (``MLX_MED_SHARED_PREFIX`` is read
at each call), ``--repeats`` times each after a warm-up, and print prefill and wall seconds, the
prompt tokens not computed again, and whether the answers are identical.

The last line is ``ratio: <whole rows' seconds ÷ shared start's seconds>`` (best run of each side,
summed over both batches): above 1, sharing is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "demo" / "eval_toyhom_zh.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="eval JSONL (its first --n rows)")
    parser.add_argument("--n", type=int, default=12, help="eval rows")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="new tokens per answer (prefill is the point)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import convert_demo, write_random_adapters

    from mlx_med.backend import detect_backend
    from mlx_med.evaluation.decoding import preset
    from mlx_med.evaluation.generate import GenerationProfile, generate_batch
    from mlx_med.evaluation.run_config import load_for_eval
    from mlx_med.evaluation.runner import load_eval_rows, system_text
    from mlx_med.evaluation.shared_prefix import describe, sharing_applies

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or convert_demo(tmp / "smollm2")
        write_random_adapters(model, tmp)
        loaded, live = load_for_eval(model, sft=tmp / "sft", pt=tmp / "pt", alpha=0.5)
        rows = load_eval_rows(args.data, args.n).rows
        system = system_text("default", "auto", rows)
        conversations = [[m for m in row.messages if m["role"] != "assistant"] for row in rows]
        decoding = preset("greedy").with_overrides(max_new_tokens=args.max_new_tokens)
        mixed = [{"sft": a, "pt": 1 - a} for a in (0.0, 0.5, 1.0) for _ in conversations]
        print(f"model: {model} | {detect_backend().describe()}")
        print(f"shared prompt start: {describe()}; applies here: {sharing_applies(loaded.model)}")
        print(f"{len(rows)} rows of {args.data.name}, default system prompt, {args.max_new_tokens} new tokens, "
              f"batch {args.batch_size} (α 0.5) and {3 * args.batch_size} (α 0, 0.5, 1 mixed), greedy")

        def run(side: str, quiet: bool = False) -> tuple[float, list[str]]:
            os.environ["MLX_MED_SHARED_PREFIX"] = side
            total, texts = 0.0, []
            for convs, batch, weights in ((conversations, args.batch_size, None),
                                          (conversations * 3, 3 * args.batch_size, mixed)):
                profile = GenerationProfile()
                start = time.perf_counter()
                results = generate_batch(loaded.model, loaded.tokenizer, convs, decoding, batch_size=batch,
                                         system=system, progress=False, profile=profile,
                                         live=live if weights else None, row_weights=weights)
                seconds = time.perf_counter() - start
                total += seconds
                texts += [r.text for r in results]
                if not quiet:
                    print(f"  {'shared' if side == 'on' else 'whole '} {len(convs):3d} rows: {seconds:6.2f} s "
                          f"(prefill {profile.prompt_s:.2f} s of {profile.prompt_tokens} prompt tokens, "
                          f"{profile.shared_prompt_tokens} not computed again)")
            return total, texts

        run("on", quiet=True)  # warm-up: packing, kernels, first-call compilation
        run("off", quiet=True)
        best = {"on": float("inf"), "off": float("inf")}
        answers = {}
        for _ in range(args.repeats):
            for side in ("on", "off"):
                seconds, answers[side] = run(side)
                best[side] = min(best[side], seconds)
        same = sum(a == b for a, b in zip(answers["on"], answers["off"]))
        print(f"whole rows: {best['off']:.2f} s; shared start: {best['on']:.2f} s (best of {args.repeats}); "
              f"answers identical: {same}/{len(answers['on'])}")
    print(f"ratio: {best['off'] / best['on']:.3f}")


if __name__ == "__main__":
    main()
