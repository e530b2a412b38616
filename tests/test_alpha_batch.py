"""One batch for all α: the grid sweep's QA answers generated as one mixed-α batch equal per-α evals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from random_adapters import ALL, make_adapter

import mlx_med  # noqa: F401
from mlx_med.evaluation import generate as generate_module
from mlx_med.evaluation.alpha_sweep import AlphaSweepConfig, run_alpha_sweep
from mlx_med.evaluation.decoding import preset
from mlx_med.evaluation.generate import generate_batch
from mlx_med.evaluation.run_config import load_for_eval
from mlx_med.evaluation.runner import PREDICTIONS, EvalConfig, run_eval

ALPHAS = [0.0, 0.4, 1.0]
QUESTIONS = ["What lowers blood pressure?", "Is aspirin indicated after a stroke?", "糖尿病怎么治疗？",
             "How is asthma treated in children?"]


@pytest.fixture
def pair(tiny_llama, tmp_path) -> tuple[Path, Path]:
    make_adapter(tiny_llama, tmp_path / "pt", rank=4, lora_alpha=8, keys=ALL, seed=1, phase="pt", std=0.3)
    make_adapter(tiny_llama, tmp_path / "sft", rank=4, lora_alpha=8, keys=ALL, seed=2, phase="sft", std=0.3)
    return tmp_path / "sft", tmp_path / "pt"


@pytest.fixture
def qa_file(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "response": "Ask a doctor."}, ensure_ascii=False) + "\n"
                            for q in QUESTIONS), encoding="utf-8")
    return path


def read_predictions(path: Path) -> list[str]:
    return [json.loads(line)["predict"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_batch_row_weights_equal_one_alpha_at_a_time(tiny_llama, pair):
    sft, pt = pair
    loaded, live = load_for_eval(tiny_llama, sft=sft, pt=pt, alpha=0.5)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    decoding = preset("greedy").with_overrides(max_new_tokens=8)
    mixed = generate_batch(loaded.model, loaded.tokenizer, conversations * len(ALPHAS), decoding, batch_size=5,
                           progress=False, live=live,
                           row_weights=[{"sft": a, "pt": 1 - a} for a in ALPHAS for _ in QUESTIONS])
    separate = []
    for alpha in ALPHAS:
        live.set_alpha(alpha)
        separate += generate_batch(loaded.model, loaded.tokenizer, conversations, decoding, batch_size=2,
                                   progress=False)
    assert [r.text for r in mixed] == [r.text for r in separate]
    assert [r.generation_tokens for r in mixed] == [r.generation_tokens for r in separate]
    texts = [r.text for r in separate]
    assert texts[: len(QUESTIONS)] != texts[-len(QUESTIONS):]  # α really changes the answers
    # the model-wide mix is back afterwards: α = 1 (set last) answers as before
    again = generate_batch(loaded.model, loaded.tokenizer, conversations, decoding, progress=False)
    assert [r.text for r in again] == texts[-len(QUESTIONS):]


def test_one_batch_sweep_predictions_equal_separate_evals(tiny_llama, pair, qa_file, tmp_path, monkeypatch):
    sft, pt = pair
    calls = []
    original = generate_module.generate_batch

    def spy(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_batch", spy)
    cfg = AlphaSweepConfig(model=tiny_llama, sft=sft, pt=pt, data=qa_file, out=tmp_path / "sweep",
                           alphas=ALPHAS, max_new_tokens=8, batch_size=2)
    run_alpha_sweep(cfg, quiet=True)
    assert calls == [len(QUESTIONS) * len(ALPHAS)]  # every α's answers in one generation call
    monkeypatch.setattr(generate_module, "generate_batch", original)

    answers = {}
    for alpha in ALPHAS:
        loaded, _ = load_for_eval(tiny_llama, sft=sft, pt=pt, alpha=alpha)
        out = tmp_path / f"separate_{alpha:g}"
        expected = run_eval(EvalConfig(model=tiny_llama, sft=sft, pt=pt, alpha=alpha, data=qa_file, out=out,
                                       max_new_tokens=8, batch_size=2), quiet=True, loaded=loaded)
        point = tmp_path / "sweep" / f"alpha_{alpha:g}"
        answers[alpha] = read_predictions(point / PREDICTIONS)
        assert answers[alpha] == read_predictions(out / PREDICTIONS)
        metrics = json.loads((point / "metrics.json").read_text(encoding="utf-8"))
        for key in ("bleu-4", "rouge-1", "rouge-l"):
            assert metrics[key] == expected[key]
        assert not (point / "predictions.partial.jsonl").exists()
    assert answers[0.0] != answers[1.0]

    # a re-run reuses every point: nothing is generated again
    stamp = (tmp_path / "sweep" / "alpha_0.4" / "metrics.json").stat().st_mtime_ns
    monkeypatch.setattr(generate_module, "generate_batch", spy)
    calls.clear()
    run_alpha_sweep(replace(cfg), quiet=True)
    assert calls == [] and (tmp_path / "sweep" / "alpha_0.4" / "metrics.json").stat().st_mtime_ns == stamp
