"""PNG plots of the decoding and α sweeps (matplotlib Agg, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = ("bleu-4", "rouge-l")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    from mlx_med.io import atomic_save_figure

    return atomic_save_figure(fig, out)


def plot_decoding_sweep(rows: list[dict[str, Any]], keys: list[str], out: Path) -> Path:
    """BLEU-4 and ROUGE-L against the first grid key, one line per combination of the other keys."""
    plt = _pyplot()
    x_key, series_keys = keys[0], keys[1:]
    series: dict[str, list[tuple[float, dict]]] = {}
    for row in rows:
        name = ", ".join(f"{k}={row[k]:g}" for k in series_keys) or "all"
        series.setdefault(name, []).append((row[x_key], row))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.5 * len(PANELS), 4), dpi=110)
    for ax, metric in zip(axes, PANELS):
        for name, points in series.items():
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            ys = [p[1].get(metric) for p in points]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{metric} (LLaMA-Factory, ×100)")
        ax.set_title(f"{metric} vs {x_key}")
        ax.grid(alpha=0.3)
    if len(series) > 1:
        axes[-1].legend(fontsize=8)
    fig.suptitle("decoding sweep")
    fig.tight_layout()
    return _save(fig, out)


def plot_alpha_sweep(rows: list[dict[str, Any]], metric: str, picked: float | None, out: Path) -> Path:
    """QA scores (left axis) and held-out perplexity (right axis) against α; safety pass rate if present."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["alpha"])
    alphas = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    shown = [m for m in dict.fromkeys([metric, *PANELS]) if any(r.get(m) is not None for r in rows)]
    for m in shown:
        ax.plot(alphas, [r.get(m) for r in rows], marker="o", label=f"{m} (QA)")
    if any(r.get("safety") is not None for r in rows):
        ax.plot(alphas, [r.get("safety") for r in rows], marker="s", linestyle="--", color="tab:green",
                label="safety pass rate (%)")
    ax.set_xlabel("α  (ΔW = α·ΔW_sft + (1−α)·ΔW_pt)")
    ax.set_ylabel("score (×100)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any(r.get("ppl") is not None for r in rows):
        right = ax.twinx()
        line = right.plot(alphas, [r.get("ppl") for r in rows], marker="^", color="tab:red",
                          label="held-out PT perplexity")
        right.set_ylabel("perplexity (lower = more retained)")
        handles += line
        labels += [line[0].get_label()]
    if picked is not None:
        ax.axvline(picked, color="gray", linestyle=":", linewidth=1.5)
        ax.annotate(f"picked α={picked:g}", (picked, ax.get_ylim()[1]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8, color="gray")
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_title("α sweep: QA vs knowledge retention")
    fig.tight_layout()
    return _save(fig, out)


def plot_alpha_search(rows: list[dict[str, Any]], x: str, y: str, picked: float, front: list[float], out: Path,
                      base: dict[str, Any] | None = None, key: str = "alpha") -> Path:
    """The searched points in the (objective, trade-off metric) plane: Pareto front joined, choice marked.

    ``key`` names the column that identifies a point (``alpha``; ``point`` for a schedule search),
    which ``picked`` and ``front`` hold.
    """
    name = "α" if key == "alpha" else key
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
    usable = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    for feasible, marker, label in (("✓", "o", "meets the constraints"), ("✗", "x", "breaks a constraint")):
        pts = [r for r in usable if r.get("feasible", "✓") == feasible]
        if pts:
            ax.scatter([r[x] for r in pts], [r[y] for r in pts], marker=marker, label=label)
    on_front = sorted((r for r in usable if r[key] in front), key=lambda r: r[x])
    if len(on_front) > 1:
        ax.plot([r[x] for r in on_front], [r[y] for r in on_front], linestyle="--", color="gray", label="Pareto front")
    for r in usable:
        ax.annotate(f"{name}={r[key]:g}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    chosen = [r for r in usable if r[key] == picked]
    if chosen:
        ax.scatter([chosen[0][x]], [chosen[0][y]], s=160, facecolors="none", edgecolors="tab:red",
                   label=f"picked {name}={picked:g}")
    if base is not None and base.get(x) is not None and base.get(y) is not None:
        ax.scatter([base[x]], [base[y]], marker="s", color="black", label="base model")
    ax.set_xlabel(f"{x} (objective{', lower is better' if x == 'ppl' else ''})")
    ax.set_ylabel(y + (" (lower is better)" if y == "ppl" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(("α" if key == "alpha" else "schedule") + " search: evaluated points")
    fig.tight_layout()
    return _save(fig, out)
