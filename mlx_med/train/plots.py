"""``loss_curve.png`` of a run: train and validation loss against the optimizer step (matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_med.errors import UserError

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (killed run) is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE} (is this a training run directory?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def initial_val_loss(run_dir: Path) -> float | None:
    """The validation loss measured before step 1 (from ``done.json``, else the newest checkpoint), or None."""
    run_dir = Path(run_dir)
    states = sorted((run_dir / "checkpoints").glob("step-*/state.json"), reverse=True)
    for path in (run_dir / "done.json", *states):
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("initial_val_loss")
        except (OSError, json.JSONDecodeError):
            continue
        if value is not None:
            return float(value)
    return None


def _default_title(run_dir: Path) -> str:
    """``<run name> (<phase>)``, the phase read from the run's adapter_config.json when it has one."""
    try:
        phase = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))["mlx_med"]["phase"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return run_dir.name
    return f"{run_dir.name} ({phase})"


def plot_loss_curve(run_dir: Path, out: Path | None = None, title: str | None = None) -> Path:
    """Render train (line) and validation (markers) loss of ``run_dir`` to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    before = initial_val_loss(run_dir)
    if before is not None:  # step 0: the base model (the LoRA update starts at zero)
        val.insert(0, (0, before))
    if not train and not val:
        raise UserError(f"{run_dir / METRICS_FILE}: no loss values to plot yet")
    out = Path(out) if out is not None else run_dir / CURVE_FILE
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.5)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or _default_title(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from mlx_med.io import atomic_save_figure

    return atomic_save_figure(fig, out)
