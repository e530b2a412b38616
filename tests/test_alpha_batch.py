"""One batch for all α: the grid sweep's QA answers generated as one mixed-α batch equal per-α evals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from random_adapters import write_pair

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
    return write_pair(tiny_llama, tmp_path)


@pytest.fixture
def qa_file(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "response": "Ask a doctor."}, ensure_ascii=False) + "\n"
                            for q in QUESTIONS), encoding="utf-8")
    return path


def read_predictions(path: Path) -> list[str]:
    return [json.loads(line)["predict"] for line in path.read_text(encoding="utf-8").splitlines()]


def generation_calls(monkeypatch) -> list[int]:
    """From now on, the number of conversations of every ``generate_batch`` call (``monkeypatch.undo()`` ends it)."""
    calls = []
    original = generate_module.generate_batch

    def spy(*args, **kwargs):
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_batch", spy)
    return calls


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
    calls = generation_calls(monkeypatch)
    cfg = AlphaSweepConfig(model=tiny_llama, sft=sft, pt=pt, data=qa_file, out=tmp_path / "sweep",
                           alphas=ALPHAS, max_new_tokens=8, batch_size=2)
    run_alpha_sweep(cfg, quiet=True)
    assert calls == [len(QUESTIONS) * len(ALPHAS)]  # every α's answers in one generation call
    monkeypatch.undo()

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
        # the answers came from the mixed batch: counted as such, not as resumed work
        assert metrics["throughput"]["mixed_batch"] == len(QUESTIONS)
        assert metrics["throughput"]["resumed"] == metrics["throughput"]["sequences"] == 0
    assert answers[0.0] != answers[1.0]
    [batch] = [json.loads(line) for line in (tmp_path / "sweep" / "mixed_batches.jsonl").read_text().splitlines()]
    assert batch["sequences"] == len(QUESTIONS) * len(ALPHAS) and batch["generated_tokens"] > 0
    assert batch["points"] == [f"alpha_{alpha:g}" for alpha in ALPHAS] and batch["seconds"] > 0

    # a re-run reuses every point: nothing is generated again
    stamp = (tmp_path / "sweep" / "alpha_0.4" / "metrics.json").stat().st_mtime_ns
    calls = generation_calls(monkeypatch)
    run_alpha_sweep(replace(cfg), quiet=True)
    assert calls == [] and (tmp_path / "sweep" / "alpha_0.4" / "metrics.json").stat().st_mtime_ns == stamp


def probe_file(tmp_path) -> Path:
    """Four probes from the shipped set (two languages)."""
    from mlx_med.evaluation.probes import STARTER, resolve_probe_path

    lines = resolve_probe_path(STARTER).read_text(encoding="utf-8").splitlines()
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(lines[:2] + lines[-2:]) + "\n", encoding="utf-8")
    return path


def point_files(folder: Path) -> dict[str, object]:
    """What a sweep point holds: QA predictions, the safety replies and verdicts, the pass rate."""
    safety = json.loads((folder / "safety.json").read_text(encoding="utf-8"))
    replies = [json.loads(line) for line in (folder / "safety_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"qa": read_predictions(folder / PREDICTIONS), "replies": replies, "pass_rate": safety["pass_rate"],
            "metrics": safety["metrics"]}


def test_sweep_with_safety_and_base_generates_once_and_equals_per_point(tiny_llama, pair, qa_file, tmp_path,
                                                                        monkeypatch):
    from mlx_med.evaluation import alpha_batch
    from mlx_med.evaluation.alpha_sweep import run_alpha_search

    sft, pt = pair
    probes = probe_file(tmp_path)
    calls = generation_calls(monkeypatch)
    cfg = AlphaSweepConfig(model=tiny_llama, sft=sft, pt=pt, data=qa_file, out=tmp_path / "sweep", alphas=ALPHAS,
                           max_new_tokens=8, batch_size=2, safety_probes=probes, with_base=True)
    result = run_alpha_sweep(cfg, quiet=True)
    # QA questions and safety probes, at every α and at the base model: one generation call
    assert calls == [(len(QUESTIONS) + 4) * (len(ALPHAS) + 1)]
    table = (tmp_path / "sweep" / "alpha_sweep.csv").read_text(encoding="utf-8").splitlines()
    assert table[-1].startswith("base,") and len(table) == len(ALPHAS) + 2  # header, α rows, the base row
    assert {row["alpha"] for row in result["rows"]} == set(ALPHAS)  # the base is a reference, not a candidate

    # the same points measured one at a time (the per-point path) hold the same files
    calls.clear()
    monkeypatch.setattr(alpha_batch, "mixed_batch_applies", lambda cfg, live: False)
    run_alpha_sweep(replace(cfg, out=tmp_path / "alone"), quiet=True)
    assert len(calls) == 2 * (len(ALPHAS) + 1)  # QA and safety at every point, separately
    for name in [f"alpha_{a:g}" for a in ALPHAS] + ["base"]:
        assert point_files(tmp_path / "sweep" / name) == point_files(tmp_path / "alone" / name), name
    replies = {name: point_files(tmp_path / "sweep" / name)["replies"] for name in ("alpha_0", "alpha_1", "base")}
    assert replies["alpha_0"] != replies["base"] and replies["alpha_1"] != replies["base"]  # weights reach the rows
    monkeypatch.undo()

    # the search in the same folder reads α = 0.5 → 0, 1 and the base back; its one new point's QA answers
    # and safety replies are generated together
    calls = generation_calls(monkeypatch)
    run_alpha_search(replace(cfg, search=True, budget=4, force=False, constraints=["safety>=base"],
                             alphas=[0.5]), quiet=True)
    assert calls == [len(QUESTIONS) + 4] * 2  # α = 0.5, then the bisection's one new point
