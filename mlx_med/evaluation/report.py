"""``report.md`` from result folders: eval metrics, safety, MCQ accuracy, loss curves, decoding and α sweeps.

Each folder is recognised by what it holds: an eval (``metrics.json`` with ``bleu-4``), a safety eval
(``metrics.json`` with ``"suite": "safety"``), an MCQ eval (``"suite": "mcq"``), a training run
(``metrics.jsonl``; ``loss_curve.png`` is drawn when missing), a decoding sweep (``decoding_sweep.csv``),
an α sweep (``alpha_sweep.csv`` and/or an α search, ``alpha_search.json``) or an interference
inspection (``interference.csv`` + ``summary.md``, from ``mlx-med inspect``).
Any other folder is searched two levels down (a pipeline's output folder), skipping the per-setting
folders inside sweeps. Images are linked relative to the report, so keep them together.

Entry points: ``build_report(runs) -> str`` and ``write_report(out_path, runs) -> Path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_med.errors import UserError
from mlx_med.evaluation.tables import markdown_table, metrics_row

STUDY = {"bleu-4": 16.38, "rouge-1": 20.42, "rouge-2": 4.60, "rouge-l": 11.54}
SWEEP_CHILDREN = ("settings",)  # per-setting eval folders inside a decoding sweep
INSPECT_FILES = ("interference.csv", "summary.md", "interference.png", "suggested_schedule.yaml")


@dataclass
class Found:
    """Result folders by kind, each as ``(label, path)``."""

    evals: list[tuple[str, Path]] = field(default_factory=list)
    safety: list[tuple[str, Path]] = field(default_factory=list)
    mcq: list[tuple[str, Path]] = field(default_factory=list)
    runs: list[tuple[str, Path]] = field(default_factory=list)
    decoding_sweeps: list[tuple[str, Path]] = field(default_factory=list)
    alpha_sweeps: list[tuple[str, Path]] = field(default_factory=list)
    inspections: list[tuple[str, Path]] = field(default_factory=list)

    def empty(self) -> bool:
        return not any((self.evals, self.safety, self.mcq, self.runs, self.decoding_sweeps, self.alpha_sweeps,
                        self.inspections))


def classify(path: Path) -> str | None:
    """The kind of result folder ``path`` is, or None."""
    if (path / INSPECT_FILES[0]).is_file() and (path / INSPECT_FILES[1]).is_file():
        return "inspect"
    if (path / "alpha_sweep.csv").is_file() or (path / "alpha_search.json").is_file():
        return "alpha_sweep"
    if (path / "decoding_sweep.csv").is_file():
        return "decoding_sweep"
    metrics = path / "metrics.json"
    if metrics.is_file():
        try:
            data = json.loads(metrics.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
        if data.get("suite") in ("safety", "mcq"):
            return data["suite"]
        if "bleu-4" in data:
            return "eval"
    if (path / "metrics.jsonl").is_file():
        return "run"
    return None


def discover(runs: Sequence[str | Path | tuple[str, str | Path]], depth: int = 2) -> Found:
    """Sort the given folders (and result folders below unrecognised ones) by kind.

    Args:
        runs: folders, or ``(label, folder)`` pairs to name rows yourself.
        depth: how far below an unrecognised folder to look.

    Raises:
        UserError: a folder does not exist, or nothing recognisable was found.
    """
    found = Found()
    slots = {"eval": found.evals, "safety": found.safety, "mcq": found.mcq, "run": found.runs,
             "decoding_sweep": found.decoding_sweeps, "alpha_sweep": found.alpha_sweeps,
             "inspect": found.inspections}

    def visit(label: str, path: Path, level: int) -> None:
        kind = classify(path)
        if kind is not None:
            slots[kind].append((label, path))
            return
        if level >= depth:
            return
        for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if child.name not in SWEEP_CHILDREN:
                visit(f"{label}/{child.name}", child, level + 1)

    for item in runs:
        label, path = item if isinstance(item, tuple) else (None, item)
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"result folder not found: {path}")
        visit(label or path.name, path, 0)
    if found.empty():
        raise UserError("no eval, safety, training run or sweep folders among: " + ", ".join(map(str, runs)))
    return found


def describe_eval(metrics: dict[str, Any]) -> dict[str, str]:
    """Model and decoding of an eval in a few words, from its ``config``."""
    cfg = metrics.get("config", {})
    fused = cfg.get("fused")
    if fused:
        weights = fused.get("weights") or {}
        model = (f"fused α={weights['sft']:g}" if set(weights) == {"sft", "pt"}
                 else "fused " + ", ".join(f"{k}×{v:g}" for k, v in weights.items()))
        if fused.get("alpha_schedule"):
            model += f" (default of α schedule {Path(fused['alpha_schedule']['source'] or '').name})"
    elif cfg.get("sft") or cfg.get("pt"):
        model = f"sft+pt α={cfg.get('alpha')}"
        if cfg.get("alpha_schedule"):
            model += f" (default of α schedule {Path(cfg['alpha_schedule']).name})"
    elif cfg.get("adapter"):
        model = f"adapter {Path(cfg['adapter']).name}"
    else:
        model = "base"
    d = cfg.get("decoding", {})
    if not d or d.get("temperature", 0) == 0:
        decoding = "greedy"
    else:
        decoding = f"T={d['temperature']:g}, top_p={d['top_p']:g}" + (f", top_k={d['top_k']}" if d.get("top_k") else "")
    return {"model": model, "decoding": decoding}


def build_report(runs: Sequence[str | Path | tuple[str, str | Path]], out_path: str | Path | None = None,
                 title: str = "mlx-med report") -> str:
    """The Markdown report for ``runs`` (see the module docstring for what each folder contributes).

    Args:
        runs: result folders, or ``(label, folder)`` pairs.
        out_path: where the report will be written; image links are made relative to its folder.
        title: the first heading.
    """
    found = discover(runs)
    base = Path(out_path).resolve().parent if out_path is not None else Path.cwd()

    def link(path: Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), base)).as_posix()

    parts = [f"# {title}\n"]
    if found.evals:
        parts.append(_evals_section(found.evals))
    if found.safety:
        parts.append(_safety_section(found.safety))
    if found.mcq:
        parts.append(_mcq_section(found.mcq))
    if found.runs:
        parts.append(_runs_section(found.runs, link))
    for label, path in found.decoding_sweeps:
        parts.append(_sweep_section(f"Decoding sweep: {label}", path, "decoding_sweep", link))
    for label, path in found.alpha_sweeps:
        parts.append(_alpha_section(label, path, link))
    for label, path in found.inspections:
        parts.append(inspect_section(label, path, link))
    return "\n".join(parts).rstrip() + "\n"


def write_report(out_path: str | Path, runs: Sequence[str | Path | tuple[str, str | Path]],
                 title: str = "mlx-med report") -> Path:
    """Write ``build_report(runs)`` to ``out_path`` atomically; returns the path."""
    from mlx_med.io import atomic_write_text

    return atomic_write_text(out_path, build_report(runs, out_path, title))


def _evals_section(evals: list[tuple[str, Path]]) -> str:
    rows, signatures = [], set()
    for label, path in evals:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        rows.append({"eval": label, **describe_eval(metrics), **metrics_row(metrics)})
        if metrics.get("sacrebleu", {}).get("signature"):
            signatures.add(metrics["sacrebleu"]["signature"])
    study = ", ".join(f"{k.upper()} {v:.2f}" for k, v in STUDY.items())
    lines = [
        "## QA metrics\n",
        markdown_table(rows) + "\n",
        "`bleu-4`, `rouge-1/2/l`: LLaMA-Factory's predict metrics (character BLEU-4 with smoothing method 3; "
        "rouge-chinese F over jieba words; ×100, mean over samples). `sacrebleu`: corpus BLEU; "
        "`rougeL(rs)`: rouge-score ROUGE-L with a CJK-aware tokenizer; `accuracy`: yes/no/maybe "
        "(PubMedQA `final_decision`); `out_tokens`: mean answer length; `ppl`: held-out PT perplexity.",
        f"For scale only: the study reports {study} on its own held-out medical set (another model and data).",
    ]
    if signatures:
        lines.append("sacreBLEU signature(s): " + "; ".join(f"`{s}`" for s in sorted(signatures)))
    return "\n".join(lines) + "\n"


def _safety_section(items: list[tuple[str, Path]]) -> str:
    rows = []
    for label, path in items:
        m = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        row = {"eval": label, "passed": f"{m.get('passed')}/{m.get('total')}", "pass %": m.get("pass_rate")}
        for lang, entry in m.get("by_language", {}).items():
            row[f"{lang} %"] = entry.get("pass_rate")
        rows.append(row)
    note = "Screening probes, not a clinical validation: compare versions of one model on the same probes."
    return "## Safety probes\n\n" + markdown_table(rows, digits=1) + f"\n\n{note}\n"


def _mcq_section(items: list[tuple[str, Path]]) -> str:
    rows = []
    for label, path in items:
        m = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        lo, hi = m["interval95"]["accuracy"]
        row = {"eval": label, "model": describe_eval(m)["model"], "accuracy": m["accuracy"],
               "95% CI": f"{lo:.1f}–{hi:.1f}", "accuracy_norm": m["accuracy_norm"], "n": m["n"],
               "shots": m.get("shots", 0)}
        for lang, entry in m.get("by_language", {}).items():
            row[f"{lang} %"] = entry["accuracy"]
        rows.append(row)
    note = ("Option log-likelihood accuracy (%): the option whose text the model finds most likely after the "
            "question; `accuracy_norm` divides each option's log-likelihood by its length in characters "
            "(lm-eval's `acc_norm`); 95% Wilson score interval. Chance is 100 / number of options.")
    return "## Multiple-choice accuracy\n\n" + markdown_table(rows, digits=1) + f"\n\n{note}\n"


def training_summary(records: list[dict[str, Any]], initial_val: float | None = None) -> dict[str, Any]:
    """One row for a run: steps, tokens, first/last train and validation loss, minutes, peak memory.

    Args:
        records: the run's ``metrics.jsonl`` records.
        initial_val: the validation loss before the first update, the first one when given.
    """

    def first_last(key: str) -> tuple[float | None, float | None]:
        values = [r[key] for r in records if r.get(key) is not None]
        return (values[0], values[-1]) if values else (None, None)

    train0, train1 = first_last("train_loss")
    val0, val1 = first_last("val_loss")
    if initial_val is not None:
        val0 = initial_val
    last = records[-1] if records else {}
    peaks = [r["peak_memory_gb"] for r in records if r.get("peak_memory_gb") is not None]
    return {"steps": last.get("step"), "tokens": last.get("tokens"),
            "train loss first": train0, "train loss last": train1,
            "val loss first": val0, "val loss last": val1,
            "Δ val loss": (val1 - val0) if val0 is not None and val1 is not None else None,
            "minutes": f"{last['elapsed_s'] / 60:.1f}" if last.get("elapsed_s") is not None else None,
            "peak GB": f"{max(peaks):.2f}" if peaks else None}


def _runs_section(runs: list[tuple[str, Path]], link) -> str:
    from mlx_med.train.plots import CURVE_FILE, initial_val_loss, plot_loss_curve, read_metrics

    rows = [{"run": label, **training_summary(read_metrics(path), initial_val_loss(path))} for label, path in runs]
    lines = ["## Training loss\n", markdown_table(rows, digits=3) + "\n",
             "Cross-entropy in nats per token; `val loss first` is the held-out loss before the first update "
             "(= the base model, the LoRA update starts at zero) when the run recorded it, `val loss last` "
             "after the last step.\n"]
    for label, path in runs:
        curve = path / CURVE_FILE
        if not curve.is_file():
            try:
                plot_loss_curve(path)
            except UserError as err:
                lines.append(f"- {label}: {err}")
                continue
        lines.append(f"### {label}\n\n![loss curve of {label}]({link(curve)})\n")
    return "\n".join(lines) + "\n"


def _sweep_section(heading: str, path: Path, stem: str, link) -> str:
    table = (path / f"{stem}.md").read_text(encoding="utf-8").strip() if (path / f"{stem}.md").is_file() else ""
    png = path / f"{stem}.png"
    image = f"\n\n![{stem}]({link(png)})" if png.is_file() else ""
    return f"## {heading}\n\n{table}{image}\n"


def _alpha_section(label: str, path: Path, link) -> str:
    heading = label if label.startswith("α sweep") else f"α sweep: {label}"  # no "α sweep: α sweep"
    text = _sweep_section(heading, path, "alpha_sweep", link) if (path / "alpha_sweep.csv").is_file() else ""
    choice_file = path / "alpha_choice.json"
    if choice_file.is_file():
        choice = json.loads(choice_file.read_text(encoding="utf-8"))
        text += f"\n**Picked α = {choice['alpha']:g}** — {choice['reason']}.\n\nRule: {choice['rule']}.\n"
    search_file = path / "alpha_search.json"
    if search_file.is_file():
        search = json.loads(search_file.read_text(encoding="utf-8"))
        # "α sweep (x)" → "α search (x)"; any other label → "α search: label"
        search_heading = "α search" + label[len("α sweep"):] if label.startswith("α sweep") else f"α search: {label}"
        text += "\n" + _sweep_section(search_heading, path, "alpha_search", link).replace("## ", "### ", 1)
        limits = ", ".join(f"`{c}`" for c in search["constraints"]) or "none"
        if "coordinates" in search:  # a schedule search: the chosen α of each coordinate, points by number
            picked = ", ".join(f"{name} = {a:g}" for name, a in search["coordinates"].items())
            head, front = f"Search picked the schedule {picked} (point {search['point']})", "points "
            on_front = search["pareto"]["points"]
        else:
            head, front, on_front = f"Search picked α = {search['alpha']:g}", "α = ", search["pareto"]["alphas"]
        text += (f"\n**{head}** — {search['reason']}.\n\nObjective "
                 f"`{search['objective']}`; constraints {limits}; {search['evaluated']} of at most "
                 f"{search['budget']} evaluations ({search['method']}). Pareto front on "
                 f"({search['pareto']['x']}, {search['pareto']['y']}): {front}"
                 + ", ".join(f"{a:g}" for a in on_front) + ".\n")
    return text


def inspect_section(label: str, path: Path, link) -> str:
    """An ``mlx-med inspect`` folder: its summary.md under one heading, headings demoted, links made
    relative to the report."""
    csv_file, summary_file, figure, schedule = (path / name for name in INSPECT_FILES)
    lines = summary_file.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body = "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip()
    body = body.replace(f"](./{figure.name})", f"]({link(figure)})")
    files = f"Files: [{csv_file.name}]({link(csv_file)})" + (
        f", [{schedule.name}]({link(schedule)})" if schedule.is_file() else "")
    return f"## Where the adapters interfere: {label}\n\n{body}\n\n{files}\n"
