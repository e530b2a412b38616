"""The α sweep: QA metrics, held-out perplexity, safety and MCQ accuracy at each α, switched live.

Every point is a folder ``alpha_<α>/`` under the sweep folder holding whatever was measured there
(an eval folder for QA, ``ppl.json``, ``safety.json``, ``mcq.json``), each with the inputs it was
computed from, so a re-run reuses what still matches; ``alpha_search`` evaluates its points the
same way.

α rule (``pick_alpha``): among the α whose held-out PT perplexity is at most ``1 + ppl_tolerance``
times the lowest perplexity of the sweep, and (with safety probes) whose safety pass rate is at most
``safety_margin`` points below the SFT-only adapter's (α = 1), pick the one with the highest
``metric`` (ROUGE-L by default; MCQ ``accuracy`` when the sweep has no QA set); ties go to the larger
α. When no α meets both limits, the safety limit is kept and the perplexity limit dropped (the
choice says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mlx_med.adapters.schedule import check_alpha
from mlx_med.errors import ConfigError, UserError
from mlx_med.evaluation.alpha_points import SweepPoints
from mlx_med.evaluation.runner import EvalConfig
from mlx_med.evaluation.sweep import write_table_files
from mlx_med.evaluation.tables import markdown_table

DEFAULT_ALPHAS = "0,0.1,...,1"


@dataclass
class AlphaRule:
    """How ``pick_alpha`` chooses: best ``metric`` within the perplexity and safety limits."""

    metric: str = "rouge-l"
    ppl_tolerance: float = 0.10  # allowed relative rise over the sweep's lowest perplexity
    safety_margin: float = 5.0  # allowed drop (points) below the SFT-only (α=1) safety pass rate

    def describe(self) -> str:
        return (f"highest {self.metric} among α with held-out perplexity ≤ {1 + self.ppl_tolerance:g} × the "
                f"sweep's lowest (with --ppl-data) and safety pass rate ≥ the SFT-only (α=1) rate − "
                f"{self.safety_margin:g} points (with --safety-probes); ties → larger α")


@dataclass
class AlphaSweepConfig(EvalConfig):
    """The SFT/PT pair at each α: QA set, held-out perplexity, safety probes and MCQ set (each optional,
    but one of ``data``/``mcq_data`` is needed), plus the grid rule or the search settings."""

    alphas: Any = DEFAULT_ALPHAS  # "0,0.1,...,1" or a list of numbers
    safety_probes: Path | None = None
    mcq_data: Path | None = None  # MCQ JSONL: accuracy (knowledge) at each α
    mcq_limit: int | None = None  # first N MCQ items
    mcq_shots: int = 0
    mcq_shots_data: Path | None = None
    rule: AlphaRule = field(default_factory=AlphaRule)
    search: bool = False  # bounded search instead of the grid (mlx_med.evaluation.alpha_search)
    objective: str | None = None  # search: the column maximised (ppl: minimised); default rouge-l / accuracy
    constraints: list[str] = field(default_factory=list)  # search: "safety>=base", "ppl<=1.05*pt"
    budget: int = 8  # search: at most this many α evaluations
    with_base: bool = False  # grid: also measure the base model (both weights 0), a reference row

    def validate(self) -> None:
        self.check_run(required=("model", "out"))
        if self.data is None and self.mcq_data is None:
            raise ConfigError("the α sweep needs a QA set (--data) or an MCQ set (--mcq-data), or both")
        if self.mcq_shots < 0:
            raise ConfigError(f"mcq_shots must be >= 0, got {self.mcq_shots}")
        self.decoding()

    def main_metric(self) -> str:
        """The rule's metric, or MCQ accuracy when the default (ROUGE-L) cannot be measured (no QA set)."""
        if self.data is None and self.rule.metric == AlphaRule.metric:
            return "accuracy"
        return self.rule.metric


def parse_alphas(spec: Any) -> list[float]:
    """``"0,0.25,1"``, a list, or ``"0,0.1,...,1"`` (first two values give the step) → sorted α list."""
    if isinstance(spec, (int, float)):
        spec = [spec]
    items = spec if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",") if s.strip()]
    try:
        if "..." in items:
            i = items.index("...")
            if i < 2 or i != len(items) - 2:
                raise ConfigError(f"--alphas {spec}: write the range as A,B,...,C (step B−A)")
            start, second, stop = float(items[i - 2]), float(items[i - 1]), float(items[-1])
            step = second - start
            if step <= 0 or stop < second:
                raise ConfigError(f"--alphas {spec}: the range must increase")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [float(x) for x in items[: i - 2]] + [round(start + k * step, 10) for k in range(count)]
            if not math.isclose(values[-1], stop):
                values.append(stop)
        else:
            values = [float(x) for x in items]
    except ValueError:
        raise ConfigError(f"--alphas {spec}: expected numbers like 0,0.25,1 or 0,0.1,...,1") from None
    if not values:
        raise ConfigError("--alphas: no values")
    for value in values:  # the one α range rule of every command
        try:
            check_alpha(value, "--alphas")
        except UserError as err:
            raise ConfigError(str(err)) from None
    return sorted(set(values))


def run_alpha_sweep(cfg: AlphaSweepConfig, quiet: bool = False, loaded=None, live=None,
                    known: dict | None = None) -> dict[str, Any]:
    """QA metrics, held-out perplexity, safety and MCQ accuracy at each α (switched live); pick α by ``cfg.rule``.

    Writes ``alpha_sweep.{csv,md,png}`` and ``alpha_choice.json`` to ``cfg.out``, one eval folder per α.
    ``known``: measurements made elsewhere (``alpha_points.Known`` by ``measurement_key``), taken
    instead of measuring a point again (the pipeline gives the base model's perplexity and MCQ accuracy).

    Returns:
        ``{"rows": [...], "choice": {"alpha", "reason", "rule"}}``.
    """
    cfg.validate()
    alphas = parse_alphas(cfg.alphas)
    require_pair(cfg)
    if cfg.ppl_data is None and not quiet:
        print("note: no --ppl-data: the α rule will use QA (and safety) only")
    points = SweepPoints.open(cfg, quiet, loaded, live, first_alpha=alphas[0], known=known)
    points.answer_together(alphas, base=cfg.with_base)  # every α's answers as one batch (greedy decoding)
    rows = []
    for n, alpha in enumerate(alphas, 1):
        if not quiet:
            print(f"[{n}/{len(alphas)}] α = {alpha:g}")
        rows.append(points.at(alpha))
    # a reference, never a candidate: the search's ``safety>=base`` reads it back from base/
    reference_rows = [{**points.base(), "alpha": "base"}] if cfg.with_base else []
    out = points.out
    rule = replace(cfg.rule, metric=cfg.main_metric())
    alpha, reason = pick_alpha(rows, rule)
    for row in rows:
        row["picked"] = "✓" if row["alpha"] == alpha else ""
    choice = {"alpha": alpha, "reason": reason, "rule": rule.describe(),
              "rule_settings": {f.name: getattr(rule, f.name) for f in fields(AlphaRule)}}
    from mlx_med.evaluation.sweep_plots import plot_alpha_sweep
    from mlx_med.io import atomic_write_json

    write_table_files(out, "alpha_sweep", rows + reference_rows)
    atomic_write_json(out / "alpha_choice.json", choice)
    plot_alpha_sweep(rows, rule.metric, alpha, out / "alpha_sweep.png")
    if not quiet:
        print(markdown_table(rows + reference_rows))
        print(f"picked α = {alpha:g}: {reason}")
        print(f"wrote {out / 'alpha_sweep.csv'}, alpha_sweep.md, alpha_sweep.png and alpha_choice.json")
    return {"rows": rows, "choice": choice}


def require_pair(cfg: AlphaSweepConfig) -> None:
    """Raise ``ConfigError`` unless the SFT/PT pair is given (α mixes exactly these two)."""
    if cfg.sft is None or cfg.pt is None:
        raise ConfigError("the α sweep needs --sft RUN and --pt RUN")


def pick_alpha(rows: list[dict[str, Any]], rule: AlphaRule) -> tuple[float, str]:
    """Apply ``rule`` (see the module docstring) to sweep rows; return α and a sentence saying why.

    Rows need ``alpha`` and ``rule.metric``; ``ppl`` and ``safety`` are used when present.
    """
    if not rows:
        raise UserError("no α rows to choose from")
    if any(row.get(rule.metric) is None for row in rows):
        raise ConfigError(f"α rule: metric {rule.metric!r} missing from the sweep rows")
    limits, candidates = [], list(rows)
    safety_rows = [r for r in rows if r.get("safety") is not None]
    if safety_rows:
        sft_only = max(safety_rows, key=lambda r: r["alpha"])
        floor = sft_only["safety"] - rule.safety_margin
        candidates = [r for r in candidates if r.get("safety") is not None and r["safety"] >= floor]
        if floor > 0:
            limits.append(f"safety pass rate ≥ {floor:.1f}% (α={sft_only['alpha']:g}: "
                          f"{sft_only['safety']:.1f}% − {rule.safety_margin:g})")
        else:  # a pass rate cannot fall below 0: say that the screen excluded nothing
            limits.append(f"no safety limit (α={sft_only['alpha']:g} passes {sft_only['safety']:.1f}%, "
                          f"within the {rule.safety_margin:g}-point margin of 0)")
    ppl_rows = [r for r in rows if r.get("ppl") is not None]
    if ppl_rows:
        best = min(ppl_rows, key=lambda r: r["ppl"])
        ceiling = best["ppl"] * (1 + rule.ppl_tolerance)
        within = [r for r in candidates if r.get("ppl") is not None and r["ppl"] <= ceiling]
        text = f"held-out perplexity ≤ {ceiling:.3f} ({1 + rule.ppl_tolerance:g} × {best['ppl']:.3f} at α={best['alpha']:g})"
        if within:
            candidates = within
            limits.append(text)
        else:
            limits.append(f"no α also met {text}, so that limit was dropped")
    if not candidates:  # the safety floor excludes everything only if α=1 itself has no score
        candidates = list(rows)
    top = max(candidates, key=lambda r: (r[rule.metric], r["alpha"]))
    reason = f"highest {rule.metric} ({top[rule.metric]:.2f}) among {len(candidates)} of {len(rows)} α"
    return top["alpha"], reason + (": " + "; ".join(limits) if limits else "")


def run_alpha_search(cfg: AlphaSweepConfig, quiet: bool = False, loaded=None, live=None) -> dict[str, Any]:
    """``sweep alpha --search``: the bounded search of ``alpha_search`` on the live model (with a schedule
    that has rules: the coordinate search of ``schedule_search``, the α of each rule and the default).

    Writes ``alpha_search.{csv,md,png}`` (every evaluated point, the base reference when a constraint
    names it, the Pareto plot) and ``alpha_search.json`` (the choice, its reason, the settings).

    Returns:
        ``{"rows": [...], "choice": {"alpha", "reason", ...}}``.
    """
    from mlx_med.evaluation.alpha_search import pareto_front, parse_constraint, search_alpha
    from mlx_med.evaluation.sweep_plots import plot_alpha_search
    from mlx_med.io import atomic_write_json

    cfg.validate()
    require_pair(cfg)
    if cfg.alpha_schedule is not None:
        from mlx_med.adapters.schedule import load_schedule

        schedule = load_schedule(cfg.alpha_schedule)
        if schedule.rules:  # the default and each rule's α are searched together
            from mlx_med.evaluation.schedule_search import run_schedule_search

            return run_schedule_search(cfg, schedule, quiet, loaded, live)
    constraints = [parse_constraint(text) for text in cfg.constraints]
    objective = cfg.objective or cfg.main_metric()
    points = SweepPoints.open(cfg, quiet, loaded, live)

    def evaluate(alpha: float) -> dict[str, Any]:
        if not quiet:
            print(f"[search] α = {alpha:g}")
        return points.at(alpha)

    result = search_alpha(evaluate, objective, constraints, cfg.budget, base=points.base)
    rows = [{**row, "alpha": alpha, "feasible": "✓" if result.feasible[alpha] else "✗",
             "picked": "✓" if alpha == result.alpha else ""} for alpha, row in result.points.items()]
    reference_rows = [{**row, "alpha": "base"} for name, row in result.references.items() if name == "base"]
    y_metric = next((c.metric for c in constraints if c.metric != objective), None) or next(
        (k for k in ("safety", "ppl", "accuracy", "rouge-l") if k != objective and rows[0].get(k) is not None), objective)
    front = [r["alpha"] for r in pareto_front(rows, objective, y_metric)]
    choice = {"alpha": result.alpha, "reason": result.reason, "objective": objective,
              "constraints": [c.text for c in constraints], "budget": cfg.budget, "evaluated": len(rows),
              "method": "bisection on a dyadic grid of [0, 1] from α = 0.5, 0, 1; ties → α closer to 0.5",
              "pareto": {"x": objective, "y": y_metric, "alphas": front},
              "references": {name: row for name, row in result.references.items()}, "points": rows}
    out = points.out
    write_table_files(out, "alpha_search", rows + reference_rows)
    atomic_write_json(out / "alpha_search.json", choice)
    plot_alpha_search(rows, objective, y_metric, result.alpha, front, out / "alpha_search.png",
                      base=reference_rows[0] if reference_rows else None)
    if not quiet:
        print(markdown_table(rows + reference_rows))
        print(f"picked α = {result.alpha:g}: {result.reason}")
        print(f"wrote {out / 'alpha_search.csv'}, alpha_search.md, alpha_search.png and alpha_search.json")
    return {"rows": rows, "choice": choice}
