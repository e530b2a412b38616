"""Sweeps over one loaded model: a decoding grid, and the merge weight α switched live.

Each setting is an ordinary eval folder (``generated_predictions.jsonl`` + ``metrics.json``) under
the sweep folder, so a sweep that stops half-way resumes: finished settings whose inputs match are
read back, an interrupted one resumes from its partial predictions.

α rule (``pick_alpha``): among the α whose held-out PT perplexity is at most ``1 + ppl_tolerance``
times the lowest perplexity of the sweep, and (with safety probes) whose safety pass rate is at most
``safety_margin`` points below the SFT-only adapter's (α = 1), pick the one with the highest QA
``metric`` (ROUGE-L by default); ties go to the larger α. When no α meets both limits, the safety
limit is kept and the perplexity limit dropped (the choice says so).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mlx_med.adapters.schedule import check_alpha
from mlx_med.errors import ConfigError, UserError
from mlx_med.evaluation.decoding import DecodingConfig
from mlx_med.evaluation.runner import METRICS, STATE, EvalConfig, markdown_table, metrics_row

DECODING_KEYS = tuple(f.name for f in fields(DecodingConfig))
SWEEP_MARKER = "sweep.json"
DEFAULT_ALPHAS = "0,0.1,...,1"


@dataclass
class DecodingSweepConfig(EvalConfig):
    """An eval (model, data, adapters, base preset) plus the grid of decoding values to try."""

    grid: dict[str, Any] = field(default_factory=dict)  # {"temperature": [0, 0.7], "top_p": [0.9, 1.0]}


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
    """An eval of the SFT/PT pair at each α, perplexity on held-out PT text, optional safety probes."""

    alphas: Any = DEFAULT_ALPHAS  # "0,0.1,...,1" or a list of numbers
    safety_probes: Path | None = None
    rule: AlphaRule = field(default_factory=AlphaRule)


# ---------------------------------------------------------------- parsing


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """``["temperature=0,0.7", "top_p=0.9,1"]`` → ``{"temperature": [0.0, 0.7], "top_p": [0.9, 1.0]}``."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--grid {spec!r}: expected NAME=V1,V2,... (e.g. temperature=0,0.7)")
        if key in grid:
            raise ConfigError(f"--grid {key} given twice")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def normalise_grid(grid: dict[str, Any]) -> dict[str, list[Any]]:
    """Check names against ``DecodingConfig`` and convert values to the field types."""
    if not grid:
        raise ConfigError("the decoding sweep needs at least one --grid NAME=V1,V2,...")
    types = {f.name: f.type for f in fields(DecodingConfig)}
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if key not in types:
            raise ConfigError(f"grid: unknown decoding setting {key!r} (choose from {', '.join(DECODING_KEYS)})")
        values = values if isinstance(values, (list, tuple)) else [values]
        cast = int if types[key] in (int, "int") else float
        try:
            out[key] = [cast(float(v)) if cast is int else cast(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"grid: {key} values must be numbers, got {values}") from None
        if len(set(out[key])) != len(out[key]):
            raise ConfigError(f"grid: {key} lists a value twice")
    return out


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


def setting_slug(values: dict[str, Any]) -> str:
    """Folder name for one grid point: ``temperature=0.7_top_p=0.9``."""
    return "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


# ---------------------------------------------------------------- running


def run_decoding_sweep(cfg: DecodingSweepConfig, quiet: bool = False, loaded=None) -> list[dict[str, Any]]:
    """Evaluate every point of ``cfg.grid`` and write ``decoding_sweep.{csv,md,png}`` to ``cfg.out``.

    Greedy points (temperature 0) differing only in sampling knobs are generated once and reused.

    Returns:
        One row per grid point: the grid values, the headline metrics and ``reused_from``.
    """
    from mlx_med.evaluation.runner import load_for_eval

    cfg.validate()
    grid = normalise_grid(cfg.grid)
    out = _open_sweep_dir(Path(cfg.out), "decoding", cfg.force)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    if loaded is None:
        loaded, _ = load_for_eval(cfg.model, cfg.adapter, cfg.sft, cfg.pt, cfg.alpha, cfg.alpha_schedule)
    rows, done = [], {}
    for n, point in enumerate(points, 1):
        setting = replace(cfg, out=out / "settings" / setting_slug(point), **point)
        decoding = setting.decoding()
        key = _effective(decoding)
        if not quiet:
            print(f"[{n}/{len(points)}] {setting_slug(point)}")
        if key in done:
            metrics, reused = done[key]
        else:
            metrics, reused = eval_or_reuse(setting, loaded, quiet), None
            done[key] = (metrics, setting_slug(point))
        rows.append({**point, **metrics_row(metrics),
                     "tokens_per_s": metrics.get("throughput", {}).get("tokens_per_s"),
                     "reused_from": reused})
    write_table_files(out, "decoding_sweep", rows)
    from mlx_med.evaluation.sweep_plots import plot_decoding_sweep

    plot_decoding_sweep(rows, list(grid), out / "decoding_sweep.png")
    if not quiet:
        print(markdown_table(rows))
        print(f"wrote {out / 'decoding_sweep.csv'}, decoding_sweep.md and decoding_sweep.png")
    return rows


def run_alpha_sweep(cfg: AlphaSweepConfig, quiet: bool = False, loaded=None, live=None) -> dict[str, Any]:
    """QA metrics, held-out perplexity (and safety) at each α, switching α live; pick α by ``cfg.rule``.

    Writes ``alpha_sweep.{csv,md,png}`` and ``alpha_choice.json`` to ``cfg.out``, one eval folder per α.

    Returns:
        ``{"rows": [...], "choice": {"alpha", "reason", "rule"}}``.
    """
    from mlx_med.evaluation.runner import load_for_eval, load_ppl_texts

    cfg.validate()
    alphas = parse_alphas(cfg.alphas)
    if cfg.sft is None or cfg.pt is None:
        raise ConfigError("the α sweep needs --sft RUN and --pt RUN")
    if cfg.ppl_data is None and not quiet:
        print("note: no --ppl-data: the α rule will use QA (and safety) only")
    out = _open_sweep_dir(Path(cfg.out), "alpha", cfg.force)
    probes = _load_probes(cfg.safety_probes)
    if cfg.ppl_data is not None:
        load_ppl_texts(cfg.ppl_data, cfg.ppl_limit)  # fail on bad PT text before the first α
    if loaded is None:
        loaded, live = load_for_eval(cfg.model, sft=cfg.sft, pt=cfg.pt, alpha=alphas[0],
                                     alpha_schedule=cfg.alpha_schedule)
    if live is None:
        raise UserError("the α sweep needs the SFT/PT pair attached live (mlx_med.adapters.live)")
    rows = []
    for n, alpha in enumerate(alphas, 1):
        live.set_alpha(alpha)  # live: the next forward pass uses the new mix (a schedule's rules stay)
        if not quiet:
            print(f"[{n}/{len(alphas)}] α = {alpha:g}")
        setting = replace(cfg, alpha=alpha, out=out / f"alpha_{alpha:g}")
        metrics = eval_or_reuse(setting, loaded, quiet)
        row = {"alpha": alpha, **metrics_row(metrics)}
        if probes is not None:
            row["safety"] = safety_or_reuse(setting, probes, loaded, quiet)
        rows.append(row)
    alpha, reason = pick_alpha(rows, cfg.rule)
    for row in rows:
        row["picked"] = "✓" if row["alpha"] == alpha else ""
    choice = {"alpha": alpha, "reason": reason, "rule": cfg.rule.describe(),
              "rule_settings": {f.name: getattr(cfg.rule, f.name) for f in fields(AlphaRule)}}
    from mlx_med.evaluation.sweep_plots import plot_alpha_sweep
    from mlx_med.io import atomic_write_json

    write_table_files(out, "alpha_sweep", rows)
    atomic_write_json(out / "alpha_choice.json", choice)
    plot_alpha_sweep(rows, cfg.rule.metric, alpha, out / "alpha_sweep.png")
    if not quiet:
        print(markdown_table(rows))
        print(f"picked α = {alpha:g}: {reason}")
        print(f"wrote {out / 'alpha_sweep.csv'}, alpha_sweep.md, alpha_sweep.png and alpha_choice.json")
    return {"rows": rows, "choice": choice}


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


def eval_or_reuse(cfg: EvalConfig, loaded, quiet: bool) -> dict[str, Any]:
    """``run_eval`` for one sweep setting, or its ``metrics.json`` when it already ran with these inputs."""
    from mlx_med.evaluation.runner import _state, run_eval

    out = Path(cfg.out)
    if not cfg.force and (out / METRICS).exists() and (out / STATE).exists():
        try:
            if json.loads((out / STATE).read_text(encoding="utf-8")) == _state(cfg, cfg.decoding()):
                return json.loads((out / METRICS).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    return run_eval(replace(cfg, force=True) if (out / METRICS).exists() else cfg, quiet=quiet, loaded=loaded)


def safety_or_reuse(cfg: AlphaSweepConfig, probes, loaded, quiet: bool) -> float:
    """Safety pass rate (%) at this setting, cached in ``<setting>/safety.json`` (verdicts beside it)."""
    from mlx_med.evaluation.safety import evaluate_safety, resolve_probe_path, write_predictions
    from mlx_med.fingerprint import path_fingerprint, safety_inputs_key
    from mlx_med.io import atomic_write_json

    path = Path(cfg.out) / "safety.json"
    key = {"probes": path_fingerprint(resolve_probe_path(cfg.safety_probes)), "alpha": cfg.alpha,
           "inputs": safety_inputs_key(cfg),
           "system": cfg.system, "decoding": {f.name: getattr(cfg.decoding(), f.name) for f in fields(DecodingConfig)}}
    if cfg.alpha_schedule is not None:  # only then, so caches of plain-α sweeps stay valid
        key["alpha_schedule"] = path_fingerprint(cfg.alpha_schedule)
    if path.exists() and not cfg.force:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                return float(cached["pass_rate"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    result = evaluate_safety(loaded.model, loaded.tokenizer, probes, cfg.decoding(), cfg.batch_size,
                             system=cfg.system, progress=not quiet)
    write_predictions(result, Path(cfg.out) / "safety_predictions.jsonl")  # the replies, to read failures
    atomic_write_json(path, {"key": key, "pass_rate": result.pass_rate, "metrics": result.metrics()})
    return result.pass_rate


def _load_probes(path: Path | None):
    if path is None:
        return None
    from mlx_med.evaluation.safety import load_probes, resolve_probe_path

    return load_probes(resolve_probe_path(path))  # "starter" = the shipped starter set


def _effective(decoding: DecodingConfig) -> tuple:
    """Settings that change greedy output are few: a greedy point equals any other with these equal."""
    if decoding.greedy:
        return ("greedy", decoding.repetition_penalty, decoding.max_new_tokens)
    return tuple(getattr(decoding, k) for k in DECODING_KEYS)


def _open_sweep_dir(out: Path, kind: str, force: bool) -> Path:
    """Create the sweep folder, or reopen one of the same kind (finished settings are reused)."""
    from mlx_med.io import atomic_write_json, has_content

    marker = out / SWEEP_MARKER
    if out.exists() and has_content(out):
        previous = None
        if marker.exists():
            try:
                previous = json.loads(marker.read_text(encoding="utf-8")).get("kind")
            except json.JSONDecodeError:
                previous = None
        if previous != kind and not force:
            raise UserError(f"{out} already exists and is not a {kind} sweep folder; pass --force to use it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"kind": kind})
    return out


def write_table_files(out: Path, stem: str, rows: list[dict[str, Any]]) -> None:
    """``<stem>.csv`` and ``<stem>.md`` from the sweep rows (atomically)."""
    from mlx_med.io import atomic_write_text

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    atomic_write_text(out / f"{stem}.csv", buffer.getvalue())
    atomic_write_text(out / f"{stem}.md", markdown_table(rows) + "\n")
