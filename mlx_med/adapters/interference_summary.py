"""Words, tables and a suggested α schedule from an ``Interference`` analysis.

Writes ``interference.csv`` (one row per module), ``summary.md`` (which layers and module types conflict
most and least, with the figure) and ``suggested_schedule.yaml``.

The schedule is a heuristic, to be checked with ``mlx-med sweep alpha --alpha-schedule``: layers are
grouped into about six contiguous bands; in each band × module type whose mean cosine between ΔW_sft
and ΔW_pt is negative, α is lowered in proportion, α_cell = α · (1 + cos), rounded to 0.05 (the
lowering the issue of cancellation suggests: where SFT pulls against PT, give PT's side more weight
instead of letting the two cancel). Cells whose α would change by less than 0.05 keep the default, so
adapters that barely interfere get an empty rule list.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from mlx_med.adapters.interference import (
    COLUMNS,
    TOP_FRACTION,
    Interference,
    ModuleInterference,
    analyse_pair,
    type_order,
)

CSV_FILE = "interference.csv"
FIGURE_FILE = "interference.png"
SUMMARY_FILE = "summary.md"
SCHEDULE_FILE = "suggested_schedule.yaml"
BANDS = 6  # layer bands in the suggested schedule
STEP = 0.05  # α granularity of the schedule


def csv_text(result: Interference) -> str:
    """``interference.csv``: the columns of ``COLUMNS``, one row per module, blanks for missing values."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in result.modules:
        writer.writerow({k: _cell(v) for k, v in row.row().items()})
    return buffer.getvalue()


def by_key(rows: list[ModuleInterference], key: str, measure: str = "cosine") -> dict[object, float]:
    """Mean of ``measure`` over the modules sharing ``key`` (``layer`` or ``type``), NaNs skipped."""
    groups: dict[object, list[float]] = {}
    for row in rows:
        value = getattr(row, measure)
        if getattr(row, key) is not None and value is not None and not math.isnan(value):
            groups.setdefault(getattr(row, key), []).append(value)
    return {k: statistics.fmean(v) for k, v in groups.items()}


def layer_bands(layers: list[int], bands: int = BANDS) -> list[tuple[int, int]]:
    """Contiguous ``(first, last)`` layer ranges, about ``bands`` of them, covering ``layers``."""
    if not layers:
        return []
    low, high = min(layers), max(layers)
    width = max(1, math.ceil((high - low + 1) / bands))
    return [(start, min(start + width - 1, high)) for start in range(low, high + 1, width)]


def suggest_schedule(result: Interference) -> list[dict[str, object]]:
    """Rules ``{"layers": "a-b", "modules": [...], "alpha": x}`` (see the module docstring); may be empty."""
    rows = [r for r in result.modules if r.layer is not None]
    types = type_order(rows)
    cells: list[tuple[tuple[int, int], str, float]] = []
    for band in layer_bands([r.layer for r in rows]):
        for kind in types:
            values = [r.cosine for r in rows
                      if r.type == kind and band[0] <= r.layer <= band[1] and not math.isnan(r.cosine)]
            if not values:
                continue
            cosine = statistics.fmean(values)
            alpha = _round(result.alpha * (1.0 + cosine)) if cosine < 0 else result.alpha
            if result.alpha - alpha >= STEP - 1e-9:
                cells.append((band, kind, alpha))
    # one rule per band and α (the module types that share it), then adjacent bands with equal rules merged
    rules: list[dict[str, object]] = []
    for band in sorted({c[0] for c in cells}):
        for alpha in sorted({c[2] for c in cells if c[0] == band}):
            kinds = [c[1] for c in cells if c[0] == band and c[2] == alpha]
            rule = {"layers": band, "modules": kinds if len(kinds) < len(types) else None, "alpha": alpha}
            previous = next((r for r in reversed(rules) if r["modules"] == rule["modules"] and r["alpha"] == alpha
                             and r["layers"][1] + 1 == band[0]), None)
            if previous is not None:
                previous["layers"] = (previous["layers"][0], band[1])
            else:
                rules.append(rule)
    return [{"layers": _range(r["layers"]), **({"modules": r["modules"]} if r["modules"] else {}),
             "alpha": r["alpha"]} for r in rules]


def schedule_yaml(result: Interference, rules: list[dict[str, object]]) -> str:
    """``suggested_schedule.yaml`` text: ``default`` + ``rules``, with a header saying it is a heuristic."""
    lines = [
        "# Suggested α schedule from `mlx-med inspect` — a HEURISTIC, not a tuned result.",
        "# Rule: α lowered to α·(1 + cos) where the mean cosine of ΔW_sft and ΔW_pt is negative, per band of",
        "# layers × module type. Check it before use, e.g.:",
        f"#   mlx-med sweep alpha --model BASE --sft {result.sft} --pt {result.pt} --data EVAL.jsonl \\",
        f"#     --alpha-schedule {SCHEDULE_FILE} -o sweeps/schedule",
        f"default: {result.alpha:g}",
    ]
    if not rules:
        return "\n".join(lines + ["rules: []   # no band × module type interferes enough to move α by 0.05", ""])
    lines.append("rules:                       # applied in order; the last matching rule wins")
    for rule in rules:
        lines.append(f'  - layers: "{rule["layers"]}"')
        if "modules" in rule:
            lines.append(f"    modules: [{', '.join(rule['modules'])}]")
        lines.append(f"    alpha: {rule['alpha']:g}")
    return "\n".join(lines) + "\n"


def summary_markdown(result: Interference, rules: list[dict[str, object]]) -> str:
    """``summary.md``: plain-words findings, the figure, and the suggested schedule."""
    rows = result.modules
    cosines = [r.cosine for r in rows if not math.isnan(r.cosine)]
    layers, types = by_key(rows, "layer"), by_key(rows, "type")
    out = [f"# Where the adapters interfere: {result.sft.name} vs {result.pt.name}\n"]
    what = (f"SFT run `{result.sft}` (stacked on the PT run: its **own** ΔW_sft, what SFT added on top of PT, "
            f"is compared with ΔW_pt) and PT run `{result.pt}`" if result.stacked
            else f"SFT run `{result.sft}` and PT run `{result.pt}`")
    out.append(f"{what}: {len(rows)} shared modules in {len(layers)} layers, {len(types)} module types; "
               f"merge at α = {result.alpha:g} (coefficients sft × {result.coefficients['sft']:g}, "
               f"pt × {result.coefficients['pt']:g}). Analysed in {result.seconds:.1f} s.\n")
    for note in result.notes:
        out.append(f"- {note}")
    if result.only_sft or result.only_pt:
        out.append(f"- Not compared: {len(result.only_sft)} module(s) only SFT updates, {len(result.only_pt)} only "
                   "PT updates.\n")
    out.append("## In plain words\n")
    if cosines:
        negative = sum(c < 0 for c in cosines)
        cancelled = [r.cancelled for r in rows if not math.isnan(r.cancelled)]
        out.append(f"- Overall: the median cosine between ΔW_sft and ΔW_pt is {statistics.median(cosines):+.3f} "
                   f"(range {min(cosines):+.3f} to {max(cosines):+.3f}); {negative} of {len(cosines)} modules point "
                   f"against each other. {_strength(cosines)}")
        if cancelled:
            mean, low, high = (100 * x for x in (statistics.fmean(cancelled), min(cancelled), max(cancelled)))
            if mean >= 0:
                out.append(f"- At α = {result.alpha:g} the merge cancels {mean:.1f}% of the two weighted updates' "
                           f"energy on average (per module from {low:+.1f}% to {high:+.1f}%; 0 = orthogonal parts, "
                           "negative = they add up).")
            else:
                out.append(f"- At α = {result.alpha:g} the two weighted updates reinforce rather than cancel: the merged "
                           f"update has {-mean:.1f}% more energy than the parts' sum on average (`cancelled` per "
                           f"module from {low:+.1f}% to {high:+.1f}%; 0 = orthogonal parts, 100% = full cancellation).")
    if layers:
        n = max(1, min(3, len(layers) // 2))
        out.append(f"- Most conflict by layer (lowest mean cosine): {_ranked(layers, True, 'layer ', n)}.")
        out.append(f"- Least conflict by layer (highest mean cosine): {_ranked(layers, False, 'layer ', n)}.")
    if types:
        out.append("- Module types, from most to least conflict: "
                   + ", ".join(f"{k} ({v:+.3f})" for k, v in sorted(types.items(), key=lambda kv: kv[1])) + ".")
    worst = sorted((r for r in rows if not math.isnan(r.cosine)), key=lambda r: r.cosine)[:3]
    if worst:
        out.append("- Single modules that conflict most: "
                   + ", ".join(f"`{r.module}` ({r.cosine:+.3f})" for r in worst) + ".")
    overlap = by_key(rows, "type", "overlap_out")
    overlap_in = by_key(rows, "type", "overlap_in")
    conflict = by_key(rows, "type", "sign_conflict")
    if overlap:
        out.append(f"- Output-subspace overlap (mean cos² of principal angles; 1 = shared directions; unrelated "
                   f"rank-r updates of an n-wide output give about r/n): {_span(overlap)}; input subspace: "
                   f"{_span(overlap_in)}.")
    if conflict:
        out.append(f"- Sign conflict among entries in the top {100 * result.top_fraction:g}% of both updates "
                   f"(0.5 = unrelated): {_span(conflict)}.")
    if any(r.rel_sft is not None for r in rows):
        rel = [(r.rel_sft, r.rel_pt) for r in rows if r.rel_sft is not None]
        out.append(f"- Update size relative to the base weight, ‖ΔW‖/‖W‖: SFT median "
                   f"{statistics.median(x for x, _ in rel):.4f}, PT median {statistics.median(y for _, y in rel):.4f}.")
    out.append(f"\n![interference heatmaps](./{FIGURE_FILE})\n")
    out.append("Per-module numbers: `interference.csv` (columns explained in docs/inspect.md).\n")
    out.append("## Suggested α schedule (heuristic)\n")
    out.append("**A heuristic, not a result**: lower α where the adapters point against each other "
               f"(α·(1 + cos) per band of layers × module type). Written to `{SCHEDULE_FILE}`; check it against the "
               "plain α with `mlx-med sweep alpha --alpha-schedule` before using it.\n")
    out.append("```yaml\n" + "\n".join(line for line in schedule_yaml(result, rules).splitlines()
                                        if not line.startswith("#")) + "\n```\n")
    return "\n".join(out).rstrip() + "\n"


def _strength(cosines: list[float]) -> str:
    typical = statistics.median(abs(c) for c in cosines)
    if typical < 0.05:
        return "The updates are nearly orthogonal: they hardly interfere, and α mostly sets how much of each is kept."
    if statistics.median(cosines) < 0:
        return "They mostly pull the shared weights apart, so a merge cancels part of each."
    return "They mostly pull the shared weights the same way."


def _ranked(values: dict[object, float], low: bool, prefix: str = "", n: int = 3) -> str:
    order = sorted(values.items(), key=lambda kv: kv[1], reverse=not low)[:n]
    return ", ".join(f"{prefix}{k} ({v:+.3f})" for k, v in order)


def _span(values: dict[object, float]) -> str:
    low, high = min(values.items(), key=lambda kv: kv[1]), max(values.items(), key=lambda kv: kv[1])
    return f"from {low[1]:.3f} ({low[0]}) to {high[1]:.3f} ({high[0]})"


def _round(alpha: float) -> float:
    return round(max(0.0, round(alpha / STEP) * STEP), 4)


def _range(band: tuple[int, int]) -> str:
    return str(band[0]) if band[0] == band[1] else f"{band[0]}-{band[1]}"


def _cell(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def write_outputs(result: Interference, out_dir: Path) -> dict[str, Path]:
    """Write the CSV, the figure, the summary and the schedule into ``out_dir`` (an existing folder)."""
    from mlx_med.adapters.interference_plot import plot_interference
    from mlx_med.io import atomic_write_text

    rules = suggest_schedule(result)
    paths = {
        "csv": atomic_write_text(out_dir / CSV_FILE, csv_text(result)),
        "figure": plot_interference(result, out_dir / FIGURE_FILE),
        "summary": atomic_write_text(out_dir / SUMMARY_FILE, summary_markdown(result, rules)),
        "schedule": atomic_write_text(out_dir / SCHEDULE_FILE, schedule_yaml(result, rules)),
    }
    return paths


def inspect_pair(sft: str | Path, pt: str | Path, out_dir: str | Path, alpha: float = 0.5,
                 model: str | Path | None = None, top_fraction: float = TOP_FRACTION, force: bool = False) -> Path:
    """Analyse ``sft`` against ``pt`` and write the four files into ``out_dir`` (atomically); returns summary.md.

    The function behind ``mlx-med inspect`` and the pipeline's inspect stage.

    Raises:
        UserError: ``out_dir`` exists without ``force``, or the runs cannot be compared (``analyse_pair``).
    """
    from mlx_med.errors import UserError
    from mlx_med.io import atomic_output_dir

    if Path(out_dir).exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    result = analyse_pair(sft, pt, alpha=alpha, model=model, top_fraction=top_fraction)
    with atomic_output_dir(out_dir, force=force) as tmp:
        write_outputs(result, tmp)
    return Path(out_dir) / SUMMARY_FILE
