"""α search: a known synthetic optimum within the budget, constraints that move the choice, ties to 0.5,
continuation from cached points, constraint parsing, and the CLI on a tiny model with live α."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from random_adapters import write_pair, write_search_data

import mlx_med  # noqa: F401
from mlx_med.errors import ConfigError
from mlx_med.evaluation.alpha_search import pareto_front, parse_constraint, search_alpha


def synthetic(alpha: float) -> dict:
    """Objective peaks at α = 0.3; the safety pass rate falls linearly with α."""
    return {"alpha": alpha, "rouge-l": 50 - 100 * (alpha - 0.3) ** 2, "safety": 100 - 100 * alpha,
            "ppl": 10 + 5 * alpha}


def counted(fn):
    calls = []

    def evaluate(alpha):
        calls.append(alpha)
        return fn(alpha)
    return evaluate, calls


def test_search_finds_the_optimum_of_a_known_objective_within_budget():
    evaluate, calls = counted(synthetic)
    result = search_alpha(evaluate, "rouge-l", [], budget=9)
    assert len(calls) == 9 and len(set(calls)) == 9 and len(result.points) == 9
    assert abs(result.alpha - 0.3) <= 1 / 32 + 1e-12  # within the last step of the bisection
    # the choice is the best point that was evaluated, and no evaluated point is better
    assert result.points[result.alpha]["rouge-l"] == max(r["rouge-l"] for r in result.points.values())
    # a bigger budget gets closer
    assert abs(search_alpha(synthetic, "rouge-l", [], budget=15).alpha - 0.3) < abs(result.alpha - 0.3)


def test_a_constraint_that_excludes_the_optimum_moves_the_choice():
    bases = []

    def base():
        bases.append(1)
        return {"alpha": None, "rouge-l": 10.0, "safety": 80.0, "ppl": 9.0}

    free = search_alpha(synthetic, "rouge-l", [], budget=9)
    bound = search_alpha(synthetic, "rouge-l", [parse_constraint("safety>=base")], budget=9, base=base)
    assert bases == [1]  # the reference is measured once
    assert free.alpha > 0.2 and 0.15 <= bound.alpha <= 0.2  # safety ≥ 80 ⇔ α ≤ 0.2
    assert bound.feasible[bound.alpha] and not bound.feasible[0.5]
    assert "safety>=base (safety >= 80)" in bound.reason
    # a ratio to a named α point: ppl ≤ 1.01 × ppl(α=0) = 10.1 ⇔ α ≤ 0.02
    tight = search_alpha(synthetic, "rouge-l", [parse_constraint("ppl<=1.01*pt")], budget=9)
    assert tight.alpha <= 0.02 and tight.feasible[tight.alpha]
    # nothing feasible: the point breaking the fewest constraints wins, and the reason says so
    none = search_alpha(synthetic, "rouge-l", [parse_constraint("safety>200")], budget=5)
    assert "no evaluated α meets every constraint" in none.reason


def test_ties_go_to_the_alpha_closer_to_half_and_ppl_is_minimised():
    assert search_alpha(lambda a: {"alpha": a, "accuracy": 40.0}, "accuracy", [], budget=7).alpha == 0.5
    assert search_alpha(synthetic, "ppl", [], budget=5).alpha == 0.0


def test_a_larger_budget_continues_from_the_cached_points():
    cache: dict[float, dict] = {}
    fresh = []

    def cached(alpha):
        if alpha not in cache:
            fresh.append(alpha)
            cache[alpha] = synthetic(alpha)
        return cache[alpha]

    small = search_alpha(cached, "rouge-l", [], budget=5)
    assert len(fresh) == 5
    large = search_alpha(cached, "rouge-l", [], budget=9)
    assert len(fresh) == 9  # only 4 new evaluations
    assert set(small.points) <= set(large.points)
    assert large.alpha == search_alpha(synthetic, "rouge-l", [], budget=9).alpha


def test_constraint_parsing_and_errors():
    c = parse_constraint(" ppl <= 1.05*pt ")
    assert (c.metric, c.op, c.factor, c.reference) == ("ppl", "<=", 1.05, "pt")
    assert parse_constraint("accuracy>40").reference == 40.0
    assert parse_constraint("rouge-l>=sft").metric == "rouge-l"
    for bad in ("safety", "safety=>base", "safety>=nobody", "ppl<=x*pt"):
        with pytest.raises(ConfigError, match="--constraint"):
            parse_constraint(bad)
    with pytest.raises(ConfigError, match="--budget must be at least 3"):
        search_alpha(synthetic, "rouge-l", [], budget=2)
    with pytest.raises(ConfigError, match="--objective bleu-4: not measured"):
        search_alpha(synthetic, "bleu-4", [], budget=3)
    with pytest.raises(ConfigError, match="no 'accuracy' measured"):
        search_alpha(synthetic, "rouge-l", [parse_constraint("accuracy>1")], budget=3)


def test_pareto_front():
    rows = [{"alpha": 0, "rouge-l": 1, "safety": 9}, {"alpha": 0.5, "rouge-l": 5, "safety": 5},
            {"alpha": 0.75, "rouge-l": 4, "safety": 4}, {"alpha": 1, "rouge-l": 9, "safety": 1}]
    assert [r["alpha"] for r in pareto_front(rows, "rouge-l", "safety")] == [0, 0.5, 1]
    assert [r["alpha"] for r in pareto_front(rows, "rouge-l", "ppl")] == []


def test_sweep_alpha_search_cli_with_mcq_and_live_alpha(tiny_llama, tmp_path):
    from mlx_med.cli import cli

    write_pair(tiny_llama, tmp_path)
    mcq, ppl = write_search_data(tmp_path)
    out = tmp_path / "search"
    args = ["sweep", "alpha", "--model", str(tiny_llama), "--sft", str(tmp_path / "sft"), "--pt", str(tmp_path / "pt"),
            "--mcq-data", str(mcq), "--ppl-data", str(ppl), "--ppl-block-size", "8", "--search",
            "--objective", "accuracy_norm", "--constraint", "ppl<=1000*pt", "--constraint", "accuracy>=base",
            "--budget", "4", "-o", str(out), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    choice = json.loads((out / "alpha_search.json").read_text(encoding="utf-8"))
    assert choice["evaluated"] == 4 and len(choice["points"]) == 4
    assert choice["alpha"] in [p["alpha"] for p in choice["points"]]
    assert choice["constraints"] == ["ppl<=1000*pt", "accuracy>=base"] and choice["reason"]
    assert (out / "alpha_search.png").stat().st_size > 0 and (out / "alpha_search.csv").exists()
    assert (out / "base" / "mcq.json").exists() and (out / "alpha_0.5" / "mcq_predictions.jsonl").exists()
    from mlx_med.evaluation.report import build_report

    report = build_report([out])
    assert f"**Search picked α = {choice['alpha']:g}**" in report and "alpha_search.png" in report
    for point in choice["points"]:
        assert {"accuracy", "accuracy_norm", "ppl"} <= set(point)
    # the α=0.5 point's accuracy is the MCQ suite's at α=0.5 (same live mix, same scorer)
    direct = CliRunner().invoke(cli, ["eval", "--suite", "mcq", "--model", str(tiny_llama), "--sft", str(tmp_path / "sft"),
                                      "--pt", str(tmp_path / "pt"), "--alpha", "0.5", "--data", str(mcq),
                                      "-o", str(tmp_path / "direct"), "-q"])
    assert direct.exit_code == 0, direct.output
    metrics = json.loads((tmp_path / "direct" / "metrics.json").read_text(encoding="utf-8"))
    at_half = next(p for p in choice["points"] if p["alpha"] == 0.5)
    assert at_half["accuracy"] == metrics["accuracy"] and at_half["accuracy_norm"] == metrics["accuracy_norm"]
    scores = [json.loads(line)["scores"] for line in (tmp_path / "direct" / "mcq_predictions.jsonl").open()]
    cached = [json.loads(line)["scores"] for line in (out / "alpha_0.5" / "mcq_predictions.jsonl").open()]
    assert len(cached) == len(scores) == 2
    assert all(a == pytest.approx(b) for a, b in zip(cached, scores))
    # a larger budget continues: the 4 points are read back, only new ones are computed
    stamp = (out / "alpha_0.5" / "mcq.json").stat().st_mtime_ns
    again = CliRunner().invoke(cli, [a if a != "4" else "6" for a in args])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "alpha_search.json").read_text(encoding="utf-8"))["evaluated"] == 6
    assert (out / "alpha_0.5" / "mcq.json").stat().st_mtime_ns == stamp


def test_grid_sweep_with_mcq_only_needs_no_qa_set(tiny_llama, tmp_path):
    from mlx_med.cli import cli

    write_pair(tiny_llama, tmp_path)
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(json.dumps({"question": "Which organ pumps blood?", "options": {"A": "heart", "B": "kidney"},
                               "answer": "A"}) + "\n", encoding="utf-8")
    ppl = tmp_path / "held.jsonl"
    ppl.write_text(json.dumps({"text": "Hypertension is treated with lifestyle changes."}) + "\n", encoding="utf-8")
    out = tmp_path / "grid"
    base = ["sweep", "alpha", "--model", str(tiny_llama), "--sft", str(tmp_path / "sft"), "--pt", str(tmp_path / "pt"),
            "-o", str(out), "-q"]
    missing = CliRunner().invoke(cli, base + ["--alphas", "0,1"])
    assert missing.exit_code != 0 and "--data" in missing.output and "--mcq-data" in missing.output
    result = CliRunner().invoke(cli, base + ["--alphas", "0,0.5,1", "--mcq-data", str(mcq), "--ppl-data", str(ppl),
                                             "--ppl-block-size", "8"])
    assert result.exit_code == 0, result.output
    choice = json.loads((out / "alpha_choice.json").read_text(encoding="utf-8"))
    assert choice["rule_settings"]["metric"] == "accuracy"
    header = (out / "alpha_sweep.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"alpha", "ppl", "accuracy", "accuracy_norm"} <= set(header) and "rouge-l" not in header
    assert (out / "alpha_1" / "ppl.json").exists() and not (out / "alpha_1" / "metrics.json").exists()
