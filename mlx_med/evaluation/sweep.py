"""Sweeps over one loaded model: the decoding grid here, the merge weight α in ``alpha_sweep``.

Each setting is an ordinary eval folder (``generated_predictions.jsonl`` + ``metrics.json``) under
the sweep folder, so a sweep that stops half-way resumes: finished settings whose inputs match are
read back, an interrupted one resumes from its partial predictions.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mlx_med.errors import ConfigError, UserError
from mlx_med.evaluation.decoding import DecodingConfig
from mlx_med.evaluation.runner import METRICS, STATE, EvalConfig
from mlx_med.evaluation.tables import markdown_table, metrics_row

DECODING_KEYS = tuple(f.name for f in fields(DecodingConfig))
SWEEP_MARKER = "sweep.json"


@dataclass
class DecodingSweepConfig(EvalConfig):
    """An eval (model, data, adapters, base preset) plus the grid of decoding values to try."""

    grid: dict[str, Any] = field(default_factory=dict)  # {"temperature": [0, 0.7], "top_p": [0.9, 1.0]}


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
    cfg.validate()
    grid = normalise_grid(cfg.grid)
    out = open_sweep_dir(Path(cfg.out), "decoding", cfg.force)
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    if loaded is None:
        loaded, _ = cfg.load()
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


def eval_or_reuse(cfg: EvalConfig, loaded, quiet: bool,
                  perplexity: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """``run_eval`` for one sweep setting, or its ``metrics.json`` when it already ran with these inputs.

    ``perplexity``: gives this setting's perplexity when the eval runs (``run_eval`` then does not
    measure it); not called when the metrics are reused."""
    from mlx_med.evaluation.runner import run_eval

    metrics = finished_metrics(cfg)
    if metrics is not None:
        return metrics
    out = Path(cfg.out)
    return run_eval(replace(cfg, force=True) if (out / METRICS).exists() else cfg, quiet=quiet, loaded=loaded,
                    perplexity=perplexity() if perplexity is not None else None)


def finished_metrics(cfg: EvalConfig) -> dict[str, Any] | None:
    """The setting's ``metrics.json`` when it finished with these inputs (and ``force`` is off), else None."""
    from mlx_med.evaluation.runner import run_state

    out = Path(cfg.out)
    if not cfg.force and (out / METRICS).exists() and (out / STATE).exists():
        try:
            if json.loads((out / STATE).read_text(encoding="utf-8")) == run_state(cfg, cfg.decoding()):
                return json.loads((out / METRICS).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    return None


def _effective(decoding: DecodingConfig) -> tuple:
    """Settings that change greedy output are few: a greedy point equals any other with these equal."""
    if decoding.greedy:
        return ("greedy", decoding.repetition_penalty, decoding.max_new_tokens)
    return tuple(getattr(decoding, k) for k in DECODING_KEYS)


def open_sweep_dir(out: Path, kind: str, force: bool) -> Path:
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
