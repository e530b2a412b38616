"""Choosing α by a bounded search instead of eyeballing a sweep: ``mlx-med sweep alpha --search``.

The method is bisection on a dyadic grid of [0, 1]: evaluate α = 0.5, 0 and 1; then, with step
h = 0.25, evaluate the two neighbours α* ± h of the current best point α* (those not yet evaluated),
halve h and repeat until ``budget`` points have been evaluated. Each round narrows the bracket
around the best point by half, as golden-section search does, but on a fixed grid, so every point
of a smaller budget is also a point of a larger one: the evaluations are cached (in the point's
folder) and a re-run with a larger budget continues where the last one stopped. For a unimodal
objective the result is within the last step of the optimum; a multimodal one can be missed.

The best point is the one that meets every constraint and has the best objective (maximised; ``ppl``
minimised); ties go to the α closer to 0.5. When no point meets every constraint, the one that
breaks the fewest wins (the reason says so). Constraints read ``METRIC OP [FACTOR*]REF`` with OP one
of ``>= <= > <`` and REF a number, ``base`` (both adapter weights 0), ``pt`` (α = 0) or ``sft``
(α = 1), e.g. ``safety>=base`` or ``ppl<=1.05*pt``; references are measured on the same live model.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_med.errors import ConfigError

MINIMISED = frozenset({"ppl"})
REFERENCES = {"pt": 0.0, "sft": 1.0}  # α of the named references; "base" is measured apart
START = (0.5, 0.0, 1.0)
FINEST_STEP = 1 / 1024
_CONSTRAINT = re.compile(r"^\s*([A-Za-z][\w.()\-]*)\s*(>=|<=|>|<)\s*(?:([0-9.eE+\-]+)\s*\*\s*)?([A-Za-z]+|[0-9.eE+\-]+)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


@dataclass(frozen=True)
class Constraint:
    """``metric op factor × reference`` (reference: a number or a named point)."""

    text: str
    metric: str
    op: str
    factor: float
    reference: str | float

    def bound(self, references: dict[str, dict[str, Any]]) -> float:
        """The right-hand side's value, given the reference points' rows."""
        if isinstance(self.reference, float):
            return self.factor * self.reference
        value = references[self.reference].get(self.metric)
        if value is None:
            raise ConfigError(f"--constraint {self.text}: the {self.reference} point has no {self.metric!r}")
        return self.factor * float(value)

    def holds(self, row: dict[str, Any], references: dict[str, dict[str, Any]]) -> bool:
        value = row.get(self.metric)
        if value is None:
            raise ConfigError(f"--constraint {self.text}: no {self.metric!r} measured "
                              f"(measured: {', '.join(k for k, v in row.items() if v is not None)})")
        return _OPS[self.op](float(value), self.bound(references))


def parse_constraint(text: str) -> Constraint:
    """``"safety>=base"``, ``"ppl<=1.05*pt"``, ``"accuracy>40"`` → ``Constraint``.

    Raises:
        ConfigError: for anything else.
    """
    match = _CONSTRAINT.match(text)
    if not match:
        raise ConfigError(f"--constraint {text!r}: expected METRIC OP [FACTOR*]REF, e.g. safety>=base or ppl<=1.05*pt")
    metric, op, factor, ref = match.groups()
    try:
        reference: str | float = float(ref)
    except ValueError:
        reference = ref.lower()
        if reference not in (*REFERENCES, "base"):
            raise ConfigError(f"--constraint {text!r}: reference must be a number, base, pt or sft, got {ref!r}") from None
    try:
        scale = float(factor) if factor else 1.0
    except ValueError:
        raise ConfigError(f"--constraint {text!r}: {factor!r} is not a number") from None
    return Constraint(text.strip(), metric, op, scale, reference)


@dataclass
class SearchResult:
    """Every evaluated point (α → row), the reference rows, the choice and why."""

    points: dict[float, dict[str, Any]]
    references: dict[str, dict[str, Any]]
    alpha: float
    reason: str
    feasible: dict[float, bool] = field(default_factory=dict)


def search_alpha(evaluate: Callable[[float], dict[str, Any]], objective: str, constraints: list[Constraint],
                 budget: int, base: Callable[[], dict[str, Any]] | None = None) -> SearchResult:
    """Find the best α with at most ``budget`` evaluations of ``evaluate`` (see the module docstring).

    Args:
        evaluate: α → row of metrics (called once per α; the caller caches across runs).
        objective: the row key to maximise (``ppl`` is minimised).
        constraints: from ``parse_constraint``.
        budget: most α evaluations (at least 3: α = 0.5, 0, 1 start the search).
        base: returns the base model's row, for constraints on ``base`` (not counted in the budget).

    Raises:
        ConfigError: budget below 3, an objective or constraint metric that is not measured.
    """
    if budget < len(START):
        raise ConfigError(f"--budget must be at least {len(START)} (the search starts at α = 0.5, 0 and 1), got {budget}")
    points: dict[float, dict[str, Any]] = {}
    for alpha in START:
        points[alpha] = evaluate(alpha)
    check_objective(points[0.5], objective)
    references = {name: points[a] for name, a in REFERENCES.items()}
    references.update(base_reference(constraints, base))

    def rank(alpha: float) -> tuple:
        return (*merit(points[alpha], objective, constraints, references), -abs(alpha - 0.5), -alpha)

    step = 0.25
    while len(points) < budget and step >= FINEST_STEP:
        best = max(points, key=rank)
        for alpha in (best - step, best + step):
            if 0.0 <= alpha <= 1.0 and alpha not in points and len(points) < budget:
                points[alpha] = evaluate(alpha)
        step /= 2
    feasible = feasibility(points, constraints, references)
    best = max(points, key=rank)
    return SearchResult(dict(sorted(points.items())), references, best,
                        choice_reason(points[best], feasible[best], feasible, objective, constraints, references,
                                      noun="α", noun_one="α", chosen=f"α={best:g}"), feasible)


# Shared by the 1-D search here and the coordinate search over α schedules (schedule_search.py).


def check_objective(row: dict[str, Any], objective: str) -> None:
    """Raise ``ConfigError`` when the first measured row has no value for ``objective``."""
    if row.get(objective) is None:
        measured = ", ".join(k for k, v in row.items() if v is not None and k != "alpha")
        raise ConfigError(f"--objective {objective}: not measured by this sweep (measured: {measured})")


def names_base(constraints: list[Constraint]) -> bool:
    """Whether a constraint compares with the base model (``safety>=base``): then the base is measured."""
    return any(c.reference == "base" for c in constraints)


def base_reference(constraints: list[Constraint], base: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    """``{"base": row}`` when a constraint names the base model (measured once, outside the budget), else {}."""
    if not names_base(constraints):
        return {}
    if base is None:
        raise ConfigError("a constraint names 'base' but no base model can be evaluated here")
    return {"base": base()}


def merit(row: dict[str, Any], objective: str, constraints: list[Constraint], references) -> tuple[int, float]:
    """(−constraints broken, objective with ``ppl`` negated): the leading keys of both searches' ranking."""
    broken = sum(not c.holds(row, references) for c in constraints)
    return -broken, float(row[objective]) * (-1 if objective in MINIMISED else 1)


def feasibility(points: dict[Any, dict[str, Any]], constraints: list[Constraint], references) -> dict[Any, bool]:
    """Point → whether its row meets every constraint."""
    return {p: all(c.holds(row, references) for c in constraints) for p, row in points.items()}


def choice_reason(row: dict[str, Any], ok: bool, feasible: dict[Any, bool], objective: str,
                  constraints: list[Constraint], references, noun: str, noun_one: str, chosen: str) -> str:
    """Why the chosen point won, in words (``noun``/``noun_one``: "α"/"α" or "schedules"/"schedule";
    ``chosen``: how to name the choice)."""
    word = "lowest" if objective in MINIMISED else "highest"
    value = row[objective]
    limits = "; ".join(f"{c.text} ({c.metric} {c.op} {c.bound(references):.3g})" for c in constraints)
    count = len(feasible)
    if not constraints:
        return f"{word} {objective} ({value:.3g}) among {count} evaluated {noun}"
    if ok:
        return (f"{word} {objective} ({value:.3g}) among the {sum(feasible.values())} of {count} evaluated "
                f"{noun} that meet {limits}")
    return (f"no evaluated {noun_one} meets every constraint ({limits}); {chosen} breaks the fewest and has the "
            f"{word} {objective} ({value:.3g}) among those")


def pareto_front(rows: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """Rows not dominated on (x, y), both maximised except ``ppl`` (minimised); sorted by x."""
    def sign(key: str) -> float:
        return -1.0 if key in MINIMISED else 1.0

    usable = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = []
    for r in usable:
        rx, ry = sign(x) * r[x], sign(y) * r[y]
        dominated = any(sign(x) * o[x] >= rx and sign(y) * o[y] >= ry and (sign(x) * o[x] > rx or sign(y) * o[y] > ry)
                        for o in usable)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r[x])
