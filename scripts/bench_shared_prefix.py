"""A batch's common prompt start prefilled once vs every row prefilled whole, same model, same prompts.

The demo model (the bundled GGUF, converted; or ``--model``) with two random rank-8 adapters attached
live answers the first ``--n`` rows of an eval set under the default medical system prompt, greedy,
through ``generate_batch``: once per side at model-wide α 0.5 (batch ``--batch-size``) and once as a
mixed batch of α 0, 0.5 and 1. The sides alternate in one process (``MLX_MED_SHARED_PREFIX`` is read
at each call), ``--repeats`` times each after a warm-up, and print prefill and wall seconds, the
prompt tokens not computed again, and whether the answers are identical.

Then the server's scheduler (``mlx-med serve``'s engine): the first ``--batch-size`` prompts as requests
arriving together, half at α 0.5 and half at α 1 (the start is computed once per α), timed to the
last token, with each request's time to first token; its answers are compared too.

The last line is ``ratio: <whole rows' seconds ÷ shared start's seconds>`` (best run of each side,
summed over the two ``generate_batch`` batches; the server's figures are printed beside it): above 1,
sharing is faster.
"""

from __future__ import annotations

import argparse
import asyncio
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
    from mlx_med.evaluation.generate import GenerationProfile, encode_chat, generate_batch
    from mlx_med.evaluation.run_config import load_for_eval
    from mlx_med.evaluation.runner import load_eval_rows, system_text
    from mlx_med.evaluation.shared_prefix import describe, sharing_applies
    from mlx_med.serve.scheduler import Scheduler
    from mlx_med.serve.schemas import Sampling

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

        requests = conversations[: args.batch_size]
        prompts = [encode_chat(loaded.tokenizer, conv, system) for conv in requests]
        alphas = [(0.5, 1.0)[i % 2] for i in range(len(prompts))]  # the server's mix and one other

        def serve(side: str, quiet: bool = False) -> tuple[float, list[list[int]]]:
            """The server's scheduler, ``len(prompts)`` requests arriving together at ``alphas``."""
            os.environ["MLX_MED_SHARED_PREFIX"] = side

            async def clients():
                scheduler = Scheduler(loaded.model, live, sorted(loaded.tokenizer.eos_token_ids),
                                      loaded.model.args.vocab_size, batch_size=len(prompts))
                greedy = Sampling(temperature=0.0, top_p=1.0, top_k=0, max_tokens=args.max_new_tokens, seed=None)
                start = time.perf_counter()
                jobs = [scheduler.submit(p, {"sft": a, "pt": 1 - a}, greedy) for p, a in zip(prompts, alphas)]
                first = []

                async def read(job) -> list[int]:
                    mine, finish = [], None
                    while finish is None:
                        event = await job.queue.get()
                        if isinstance(event, BaseException):
                            raise event
                        if not mine:
                            first.append(time.perf_counter() - start)
                        token, finish = event
                        mine.append(token)
                    return mine

                scheduler.start()
                tokens = await asyncio.gather(*(read(job) for job in jobs))
                seconds = time.perf_counter() - start
                scheduler.stop()
                return seconds, first, tokens, scheduler.shared_prefix

            seconds, first, tokens, shared = asyncio.run(clients())
            if not quiet:
                print(f"  {'shared' if side == 'on' else 'whole '} server, {len(prompts)} requests at "
                      f"α 0.5 and 1: {seconds:6.2f} s, first token after {min(first):.2f}–{max(first):.2f} s "
                      f"({shared.shared_tokens if shared else 0} prompt tokens not computed again)")
            return seconds, tokens

        run("on", quiet=True)  # warm-up: packing, kernels, first-call compilation
        run("off", quiet=True)
        serve("on", quiet=True)
        best = {"on": float("inf"), "off": float("inf")}
        served = {"on": float("inf"), "off": float("inf")}
        answers, replies = {}, {}
        for _ in range(args.repeats):
            for side in ("on", "off"):
                seconds, answers[side] = run(side)
                best[side] = min(best[side], seconds)
                seconds, replies[side] = serve(side)
                served[side] = min(served[side], seconds)
        same = sum(a == b for a, b in zip(answers["on"], answers["off"]))
        print(f"whole rows: {best['off']:.2f} s; shared start: {best['on']:.2f} s (best of {args.repeats}); "
              f"answers identical: {same}/{len(answers['on'])}")
        same = sum(a == b for a, b in zip(replies["on"], replies["off"]))
        print(f"server: whole rows {served['off']:.2f} s; shared start {served['on']:.2f} s "
              f"({served['off'] / served['on']:.3f}x); replies identical: {same}/{len(replies['on'])}")
    print(f"ratio: {best['off'] / best['on']:.3f}")


if __name__ == "__main__":
    main()
