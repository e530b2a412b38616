"""Schedule search: coordinate search over a schedule's default and rule α finds a known synthetic
optimum within its budget, honours constraints, breaks ties towards 0.5, continues from cached
points; the CLI on a tiny model writes a loadable best_schedule.yaml whose metrics equal ``eval``'s."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from random_adapters import write_pair, write_search_data

import mlx_med  # noqa: F401
from mlx_med.errors import ConfigError
from mlx_med.evaluation.alpha_search import parse_constraint
from mlx_med.evaluation.schedule_search import coordinate_search


def synthetic(vector) -> dict:
    """Objective peaks at (default, rule) = (0.3, 0.8); safety falls with both."""
    a, b = vector
    return {"rouge-l": 50 - 100 * (a - 0.3) ** 2 - 100 * (b - 0.8) ** 2, "safety": 100 - 50 * a - 50 * b}


def test_coordinate_search_finds_the_optimum_of_two_coordinates_within_budget():
    calls = []

    def evaluate(vector):
        calls.append(vector)
        return synthetic(vector)

    result = coordinate_search(evaluate, (0.5, 0.2), "rouge-l", [], budget=21)
    assert len(calls) == 21 and len(set(calls)) == 21 and len(result.points) == 21
    assert calls[0] == (0.5, 0.2)  # from the file's values
    assert abs(result.best[0] - 0.3) <= 1 / 32 and abs(result.best[1] - 0.8) <= 1 / 32
    assert result.points[result.best]["rouge-l"] == max(r["rouge-l"] for r in result.points.values())
    # one coordinate moves at a time: each new point differs from an earlier one in one coordinate
    for n, vector in enumerate(calls[1:], 1):
        assert any(sum(x != y for x, y in zip(vector, earlier)) == 1 for earlier in calls[:n])
    # a bigger budget gets closer
    larger = coordinate_search(synthetic, (0.5, 0.2), "rouge-l", [], budget=41)
    assert synthetic(larger.best)["rouge-l"] > synthetic(result.best)["rouge-l"]


def test_a_constraint_that_excludes_the_optimum_moves_the_choice():
    free = coordinate_search(synthetic, (0.5, 0.2), "rouge-l", [], budget=21)
    bound = coordinate_search(synthetic, (0.5, 0.2), "rouge-l", [parse_constraint("safety>=55")], budget=21)
    assert synthetic(free.best)["safety"] < 55  # the optimum (0.3, 0.8) has safety 45
    assert bound.feasible[bound.best] and sum(bound.best) <= 0.9
    assert bound.points[bound.best]["rouge-l"] == max(r["rouge-l"] for v, r in bound.points.items() if bound.feasible[v])
    assert "safety>=55 (safety >= 55)" in bound.reason
    # references: pt / sft are the all-0 / all-1 vectors, base is measured once; none count in the budget
    bases = []

    def base():
        bases.append(1)
        return {"rouge-l": 0.0, "safety": 60.0}

    ref = coordinate_search(synthetic, (0.5, 0.2), "rouge-l", [parse_constraint("safety>=base"),
                                                                 parse_constraint("rouge-l>=0.5*pt")], budget=9, base=base)
    assert bases == [1] and len(ref.points) == 9
    assert ref.references["pt"] == synthetic((0.0, 0.0)) and ref.feasible[ref.best] and sum(ref.best) <= 0.8
    none = coordinate_search(synthetic, (0.5, 0.2), "rouge-l", [parse_constraint("safety>200")], budget=5)
    assert "no evaluated schedule meets every constraint" in none.reason


def test_ties_go_to_values_closer_to_half_and_ppl_is_minimised():
    flat = coordinate_search(lambda v: {"accuracy": 40.0}, (0.2, 0.9), "accuracy", [], budget=9)
    assert flat.best == (0.5, 0.5)
    ppl = coordinate_search(lambda v: {"ppl": 10 + v[0] + 2 * v[1]}, (0.5, 0.5), "ppl", [], budget=9)
    assert ppl.best == (0.0, 0.0)


def test_a_larger_budget_continues_from_the_cached_points():
    cache: dict = {}
    fresh = []

    def cached(vector):
        if vector not in cache:
            fresh.append(vector)
            cache[vector] = synthetic(vector)
        return cache[vector]

    small = coordinate_search(cached, (0.5, 0.2), "rouge-l", [], budget=9)
    assert len(fresh) == 9
    large = coordinate_search(cached, (0.5, 0.2), "rouge-l", [], budget=21)
    assert len(fresh) == 21 and list(small.points) == list(large.points)[:9]
    assert large.best == coordinate_search(synthetic, (0.5, 0.2), "rouge-l", [], budget=21).best
    with pytest.raises(ConfigError, match="--budget must be at least 3"):
        coordinate_search(synthetic, (0.5, 0.2), "rouge-l", [], budget=2)
    with pytest.raises(ConfigError, match="--objective bleu-4: not measured"):
        coordinate_search(synthetic, (0.5, 0.2), "bleu-4", [], budget=3)


def test_sweep_alpha_search_with_a_schedule_writes_best_schedule(tiny_llama, tmp_path):
    from mlx_med.adapters.schedule import load_schedule
    from mlx_med.cli import cli

    write_pair(tiny_llama, tmp_path)
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({"default": 0.5, "rules": [
        {"layers": "1", "modules": ["gate_proj", "up_proj", "down_proj"], "alpha": 0.5}]}), encoding="utf-8")
    mcq, ppl = write_search_data(tmp_path)
    out = tmp_path / "search"
    args = ["sweep", "alpha", "--model", str(tiny_llama), "--sft", str(tmp_path / "sft"), "--pt", str(tmp_path / "pt"),
            "--alpha-schedule", str(schedule), "--mcq-data", str(mcq), "--ppl-data", str(ppl), "--ppl-block-size", "8",
            "--search", "--objective", "ppl", "--constraint", "accuracy>=0", "--budget", "5", "-o", str(out), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    choice = json.loads((out / "alpha_search.json").read_text(encoding="utf-8"))
    points = choice["points"]
    assert choice["evaluated"] == len(points) == 5 and set(choice["coordinates"]) == {"default", "rule0"}
    assert len({p["rule0"] for p in points}) > 1 and len({p["default"] for p in points}) > 1  # both coordinates move
    assert all({"default", "rule0", "ppl", "accuracy", "accuracy_norm"} <= set(p) for p in points)
    header = (out / "alpha_search.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"point", "default", "rule0", "ppl"} <= set(header)
    best = load_schedule(out / "best_schedule.yaml")
    picked = next(p for p in points if p["picked"] == "✓")
    assert (best.default, best.rules[0].alpha) == (picked["default"], picked["rule0"])
    assert picked["ppl"] == min(p["ppl"] for p in points)  # ppl is minimised; the constraint holds everywhere
    assert best.rules[0].layers == [(1, 1)] and best.rules[0].modules == ["gate_proj", "up_proj", "down_proj"]
    assert (out / "alpha_search.png").stat().st_size > 0
    from mlx_med.evaluation.report import build_report

    assert "**Search picked the schedule default = " in build_report([out])
    # the chosen point's MCQ metrics are eval's with best_schedule.yaml on the same live model
    direct = CliRunner().invoke(cli, ["eval", "--suite", "mcq", "--model", str(tiny_llama), "--sft", str(tmp_path / "sft"),
                                      "--pt", str(tmp_path / "pt"), "--alpha-schedule", str(out / "best_schedule.yaml"),
                                      "--data", str(mcq), "-o", str(tmp_path / "direct"), "-q"])
    assert direct.exit_code == 0, direct.output
    metrics = json.loads((tmp_path / "direct" / "metrics.json").read_text(encoding="utf-8"))
    assert (picked["accuracy"], picked["accuracy_norm"]) == (metrics["accuracy"], metrics["accuracy_norm"])
    folder = out / ("schedule_" + "_".join(repr(float(picked[k])) for k in ("default", "rule0")))
    scores = [json.loads(line)["scores"] for line in (tmp_path / "direct" / "mcq_predictions.jsonl").open()]
    cached = [json.loads(line)["scores"] for line in (folder / "mcq_predictions.jsonl").open()]
    assert len(scores) == len(cached) == 2 and all(a == pytest.approx(b) for a, b in zip(cached, scores))
    # the rule changes the model: the same default with another rule α gives another perplexity
    by_vector = {(p["default"], p["rule0"]): p["ppl"] for p in points}
    groups: dict = {}
    for vector in by_vector:
        groups.setdefault(vector[0], []).append(vector)
    same_default = max(groups.values(), key=len)
    assert len(same_default) == 3 and len({by_vector[v] for v in same_default}) == 3
    # a larger budget continues: the 5 points are read back, only new ones are computed
    stamp = (folder / "mcq.json").stat().st_mtime_ns
    again = CliRunner().invoke(cli, [a if a != "5" else "7" for a in args])
    assert again.exit_code == 0, again.output
    more = json.loads((out / "alpha_search.json").read_text(encoding="utf-8"))["points"]
    assert len(more) == 7 and [(p["default"], p["rule0"]) for p in more[:5]] == list(by_vector)
    assert (folder / "mcq.json").stat().st_mtime_ns == stamp
