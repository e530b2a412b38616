"""GGUF → MLX → Hugging Face parity on the demo model: logits and greedy continuations, MLX vs transformers.

Usage: python scripts/verify_export_parity.py [--gguf FILE] [--dtype float32 bfloat16] [--tokens 20]

Converts the GGUF with ``mlx-med convert``'s function, exports with ``mlx-med export``'s, then on 5
chat prompts compares the MLX model (mlx_med.models.load_model: dequantized, fp32 on CPU) with
``transformers.AutoModelForCausalLM`` on the exported folder: max |Δlogit| and top-1 agreement over
every prompt position, and greedy continuations token by token. Figures go into docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [  # open questions, so that answers run past the 20 compared tokens
    "What is the capital of France, and what is it famous for?",
    "Give three tips for staying healthy.",
    "What are the common symptoms of the flu?",
    "Explain what high blood pressure is in simple words.",
    "Write a short poem about the sea.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the demo SmolLM2)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="export dtypes to check")
    parser.add_argument("--tokens", type=int, default=20, help="greedy tokens per prompt")
    args = parser.parse_args()

    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm.generate import generate_step
    from mlx_med.convert.export import export_hf
    from mlx_med.convert.gguf import convert_gguf, demo_gguf
    from transformers import AutoModelForCausalLM

    from mlx_med.models import load_model

    work = Path(tempfile.mkdtemp(prefix="parity-"))
    mlx_dir = convert_gguf(args.gguf or demo_gguf(), work / "mlx")
    loaded = load_model(mlx_dir)
    tok = loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]

    start = time.perf_counter()
    mlx_logits = [np.array(loaded.model(mx.array([ids]))[0]) for ids in prompts]
    mlx_greedy = []
    for ids in prompts:
        out = []
        for token, _ in generate_step(mx.array(ids), loaded.model, max_tokens=args.tokens):
            out.append(int(token))
            if out[-1] in tok.eos_token_ids:  # both sides stop at eos, as chat and generate do
                break
        mlx_greedy.append(out)
    print(f"mlx: {time.perf_counter() - start:.1f}s")

    for dtype in args.dtype:
        hf_dir = work / f"hf-{dtype}"
        report = export_hf(mlx_dir, hf_dir, dtype=dtype)
        for line in report.summary():
            print(line)
        model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        max_delta, agree, total = 0.0, 0, 0
        same_tokens, same_prompts, compared = 0, 0, 0
        with torch.no_grad():
            for ids, ref, greedy in zip(prompts, mlx_logits, mlx_greedy):
                logits = model(torch.tensor([ids])).logits[0].numpy()
                max_delta = max(max_delta, float(np.abs(logits - ref).max()))
                agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                total += len(ids)
                gen = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
                prefix = next((i for i, (a, b) in enumerate(zip(gen, greedy)) if a != b), min(len(gen), len(greedy)))
                same_tokens += prefix
                same_prompts += int(gen == greedy)
                if gen != greedy:  # show how close the two candidates were where they parted
                    step = model(torch.tensor([ids + greedy[:prefix]])).logits[0, -1]
                    top = torch.topk(step, 2).values
                    print(f"  diverged at token {prefix}: top-2 logit margin {float(top[0] - top[1]):.2e}")
                compared += len(greedy)
        print(f"{dtype}: max |Δlogit| {max_delta:.2e}, top-1 agreement {agree}/{total} "
              f"({100 * agree / total:.1f}%), greedy: {same_prompts}/{len(prompts)} continuations identical "
              f"({same_tokens}/{compared} tokens before a first divergence; lengths "
              f"{[len(g) for g in mlx_greedy]}, max {args.tokens})")
    print("first answer (mlx):", tok.decode(mlx_greedy[0]))


if __name__ == "__main__":
    main()
