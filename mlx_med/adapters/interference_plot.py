"""``interference.png``: heatmaps of layer × module type for the measures of an ``Interference``.

Five panels share the grid (rows = layers, columns = module types in the adapter's order): cosine of
ΔW_sft and ΔW_pt (diverging, centred on 0, scaled to the largest |cosine| so that weak structure
shows), input- and output-subspace overlap (0 to their largest value), sign conflict among large entries (white = 0.5, unrelated), and
the share of energy the merge at the chosen α cancels (negative = the parts reinforce). Red means
conflict in every panel but the overlap. Drawn with matplotlib's Agg backend and written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mlx_med.adapters.interference import Interference, type_order

PANELS = (  # (measure, title, colormap, range: fixed, None = symmetric around 0, "max" = 0 to the largest)
    ("cosine", "cosine(ΔW_sft, ΔW_pt)", "RdBu", None),
    ("overlap_in", "input-subspace overlap", "viridis", "max"),
    ("overlap_out", "output-subspace overlap", "viridis", "max"),
    ("sign_conflict", "sign conflict (large entries)", "RdBu_r", (0.0, 1.0)),  # white = 0.5 = unrelated
    ("cancelled", "cancelled at α", "RdBu_r", None),
)


def grid(result: Interference, measure: str) -> tuple[np.ndarray, list[int], list[str]]:
    """``(values (layers × types), layers, types)`` of one measure; NaN where a cell has no module."""
    rows = [r for r in result.modules if r.layer is not None]
    layers = sorted({r.layer for r in rows})
    types = type_order(rows)
    values = np.full((len(layers), len(types)), np.nan)
    for row in rows:
        value = getattr(row, measure)
        values[layers.index(row.layer), types.index(row.type)] = np.nan if value is None else value
    return values, layers, types


def plot_interference(result: Interference, out: Path) -> Path:
    """Draw the heatmaps into ``out`` (PNG); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    _, layers, types = grid(result, "cosine")
    height = max(3.5, 0.22 * len(layers) + 1.8)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.0 * len(PANELS) + 1, height), dpi=110, squeeze=False)
    for ax, (measure, title, cmap, limits) in zip(axes[0], PANELS):
        values, _, _ = grid(result, measure)
        if limits is None or limits == "max":
            finite = np.abs(values[np.isfinite(values)])
            bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            limits = (-bound, bound) if limits is None else (0.0, bound)
        image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest")
        ax.set_title(title if measure != "cancelled" else f"cancelled at α = {result.alpha:g}", fontsize=9)
        ax.set_xticks(range(len(types)), types, rotation=60, ha="right", fontsize=7)
        step = max(1, math.ceil(len(layers) / 16))
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03).ax.tick_params(labelsize=7)
    label = "SFT (own ΔW, stacked on PT)" if result.stacked else "SFT"
    fig.suptitle(f"{label} {result.sft.name} vs PT {result.pt.name}: where the adapters interfere", fontsize=10)
    fig.tight_layout()
    from mlx_med.io import atomic_save_figure

    return atomic_save_figure(fig, out)
