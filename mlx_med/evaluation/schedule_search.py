"""Choosing the α of each layer group of a schedule: ``sweep alpha --search --alpha-schedule FILE.yaml``.

The coordinates are the schedule's ``default`` and each rule's ``alpha`` (in file order). Coordinate
search runs the bounded 1-D method of ``alpha_search`` on one coordinate at a time, the others fixed
at the best point so far: starting from the file's values, the first cycle evaluates α = 0.5, 0 and
1 for each coordinate in turn; every later cycle evaluates, for each coordinate in turn, the two
neighbours ± h of its current best value. A cycle that improves nothing halves h (from 0.25, as the
1-D bisection does); the search stops when the budget is spent or h falls below 1/1024. Every point
is a full vector and is evaluated once (cached on disk in the point's folder, keyed by the schedule
written there), and the order of evaluation does not depend on the budget, so a re-run with a larger
budget continues where the last one stopped.

The choice follows the 1-D rules: meet every constraint (else break the fewest), best objective
(maximised; ``ppl`` minimised), ties to the values closer to 0.5 (summed over coordinates). The
references ``pt`` and ``sft`` are the all-0 and all-1 vectors (the plain PT and SFT models), measured
only when a constraint names them and not counted in the budget, as the ``base`` model is not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mlx_med.errors import ConfigError
from mlx_med.evaluation.alpha_search import (
    FINEST_STEP,
    START,
    Constraint,
    base_reference,
    check_objective,
    choice_reason,
    feasibility,
    merit,
)

Vector = tuple[float, ...]
FIRST_STEP = 0.25


@dataclass
class CoordinateResult:
    """Every evaluated vector (in evaluation order) → row, the references, the choice and why."""

    points: dict[Vector, dict[str, Any]]
    references: dict[str, dict[str, Any]]
    best: Vector
    reason: str
    feasible: dict[Vector, bool] = field(default_factory=dict)
    cycles: int = 0


def coordinate_search(evaluate: Callable[[Vector], dict[str, Any]], start: Vector, objective: str,
                      constraints: list[Constraint], budget: int,
                      base: Callable[[], dict[str, Any]] | None = None) -> CoordinateResult:
    """Find the best α vector with at most ``budget`` evaluations of ``evaluate`` (see the module docstring).

    Args:
        evaluate: vector of α (one per coordinate) → row of metrics; called once per vector.
        start: the vector the search starts from (the schedule file's values).
        objective: the row key to maximise (``ppl`` is minimised).
        constraints: from ``alpha_search.parse_constraint``.
        budget: most vectors evaluated (at least 3), the start included.
        base: returns the base model's row, for constraints on ``base`` (not counted in the budget).

    Raises:
        ConfigError: budget below 3, an objective or constraint metric that is not measured.
    """
    if budget < len(START):
        raise ConfigError(f"--budget must be at least {len(START)}, got {budget}")
    start = tuple(float(a) for a in start)
    seen: dict[Vector, dict[str, Any]] = {}

    def measured(vector: Vector) -> dict[str, Any]:
        if vector not in seen:
            seen[vector] = evaluate(vector)
        return seen[vector]

    points = {start: measured(start)}
    check_objective(points[start], objective)
    references = {name: measured((value,) * len(start)) for name, value in (("pt", 0.0), ("sft", 1.0))
                  if any(c.reference == name for c in constraints)}
    references.update(base_reference(constraints, base))

    def rank(vector: Vector) -> tuple:
        closeness = tuple(-abs(a - 0.5) for a in vector)
        return (*merit(points[vector], objective, constraints, references), sum(closeness), closeness,
                tuple(-a for a in vector))

    best, step, cycles = start, None, 0
    while len(points) < budget and (step is None or step >= FINEST_STEP):
        before = best
        for i in range(len(start)):
            values = START if step is None else (best[i] - step, best[i] + step)
            for value in values:
                vector = best[:i] + (value,) + best[i + 1:]
                if 0.0 <= value <= 1.0 and vector not in points and len(points) < budget:
                    points[vector] = measured(vector)
            best = max(points, key=rank)
        cycles += 1
        if step is None:
            step = FIRST_STEP
        elif best == before:
            step /= 2
    feasible = feasibility(points, constraints, references)
    reason = choice_reason(points[best], feasible[best], feasible, objective, constraints, references,
                           noun="schedules", noun_one="schedule", chosen="the chosen one")
    return CoordinateResult(points, references, best, reason, feasible, cycles)


def coordinate_names(schedule) -> list[str]:
    """Column names of the coordinates: ``default``, then ``rule0``, ``rule1``, … (the rules' file order)."""
    return ["default"] + [f"rule{i}" for i in range(len(schedule.rules))]


def schedule_at(schedule, vector: Vector):
    """The schedule with its default and rule α set from ``vector`` (layers and modules unchanged)."""
    default, *alphas = vector
    rules = [replace(rule, alpha=alpha) for rule, alpha in zip(schedule.rules, alphas)]
    return replace(schedule.with_default(default), rules=rules)


def run_schedule_search(cfg, schedule, quiet: bool = False, loaded=None, live=None) -> dict[str, Any]:
    """``sweep alpha --search`` with a schedule that has rules: coordinate search on the live model.

    Writes ``alpha_search.{csv,md,png}`` (every evaluated schedule, a column per coordinate, and the
    base reference when a constraint names it), ``alpha_search.json`` (the choice, its reason, the
    settings) and ``best_schedule.yaml`` (the chosen schedule, in the format ``load_schedule`` reads).
    Each point is measured in ``schedule_<α>_<α>…/`` (the schedule it ran with beside its results).

    Returns:
        ``{"rows": [...], "choice": {"schedule", "alpha", "reason", ...}}``.
    """
    from mlx_med.adapters.schedule import schedule_yaml
    from mlx_med.evaluation.alpha_points import SweepPoints
    from mlx_med.evaluation.alpha_search import pareto_front, parse_constraint
    from mlx_med.evaluation.sweep import write_table_files
    from mlx_med.evaluation.sweep_plots import plot_alpha_search
    from mlx_med.evaluation.tables import markdown_table
    from mlx_med.io import atomic_write_json, atomic_write_text

    constraints = [parse_constraint(text) for text in cfg.constraints]
    objective = cfg.objective or cfg.main_metric()
    names = coordinate_names(schedule)
    points = SweepPoints.open(cfg, quiet, loaded, live)

    def evaluate(vector: Vector) -> dict[str, Any]:
        if not quiet:
            print("[search] " + ", ".join(f"{n}={a:g}" for n, a in zip(names, vector)))
        row = points.at_schedule(schedule_at(schedule, vector), "schedule_" + "_".join(repr(a) for a in vector))
        return {k: v for k, v in row.items() if k != "alpha"}

    start = (schedule.default, *(rule.alpha for rule in schedule.rules))
    result = coordinate_search(evaluate, start, objective, constraints, cfg.budget, base=points.base)
    rows = [{"point": n, **dict(zip(names, vector)), **row, "feasible": "✓" if result.feasible[vector] else "✗",
             "picked": "✓" if vector == result.best else ""}
            for n, (vector, row) in enumerate(result.points.items(), 1)]
    picked = next(r["point"] for r in rows if r["picked"])
    reference_rows = [{**row, "point": "base"} for name, row in result.references.items() if name == "base"]
    y_metric = next((c.metric for c in constraints if c.metric != objective), None) or next(
        (k for k in ("safety", "ppl", "accuracy", "rouge-l") if k != objective and rows[0].get(k) is not None), objective)
    front = [r["point"] for r in pareto_front(rows, objective, y_metric)]
    chosen = schedule_at(schedule, result.best)
    choice = {"schedule": chosen.to_json() | {"source": str(cfg.alpha_schedule)}, "alpha": chosen.default,
              "coordinates": dict(zip(names, result.best)), "point": picked, "reason": result.reason,
              "objective": objective, "constraints": [c.text for c in constraints], "budget": cfg.budget,
              "evaluated": len(rows), "cycles": result.cycles,
              "method": "coordinate search over the schedule's default and rule α: the α search's bisection on "
                        "one coordinate at a time from the file's values; ties → values closer to 0.5",
              "pareto": {"x": objective, "y": y_metric, "points": front},
              "references": dict(result.references), "points": rows}
    out = points.out
    write_table_files(out, "alpha_search", rows + reference_rows)
    atomic_write_json(out / "alpha_search.json", choice)
    atomic_write_text(out / "best_schedule.yaml", schedule_yaml(chosen))
    plot_alpha_search(rows, objective, y_metric, picked, front, out / "alpha_search.png",
                      base=reference_rows[0] if reference_rows else None, key="point")
    if not quiet:
        print(markdown_table(rows + reference_rows))
        print("picked " + ", ".join(f"{n} = {a:g}" for n, a in zip(names, result.best)) + f": {result.reason}")
        print(f"wrote {out / 'alpha_search.csv'}, alpha_search.md, alpha_search.png, alpha_search.json "
              "and best_schedule.yaml")
    return {"rows": rows, "choice": choice}
