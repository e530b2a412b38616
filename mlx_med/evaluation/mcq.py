"""The MCQ suite: option log-likelihood accuracy, ``mlx-med eval --suite mcq``.

Writes ``mcq_predictions.jsonl`` (one line per item: id, choice, per-option scores, answer, correct)
and ``metrics.json``: ``accuracy`` and ``accuracy_norm`` (percent; the latter ranks options by
log-likelihood per character, lm-eval's ``acc_norm``), 95% Wilson score intervals for both, and the
same per category and per language. How items are formatted and scored: ``mcq_scoring``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_med.data.mcq import McqItem, McqSet, read_mcq
from mlx_med.errors import ConfigError
from mlx_med.evaluation.run_config import RunConfig, fused_from

PREDICTIONS = "mcq_predictions.jsonl"
METRICS = "metrics.json"
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass
class McqEvalConfig(RunConfig):
    """Settings of ``mlx-med eval --suite mcq`` (YAML keys = field names; flags override)."""

    data: Path | None = None  # MCQ JSONL
    shots: int = 0  # few-shot examples before each question
    shots_data: Path | None = None  # dev split the shots come from (default: other items of `data`)
    limit: int | None = None  # first N valid items
    system: str | None = None  # none | default | @FILE | text (mlx_med.prompts.resolve_system)
    force: bool = False

    def validate(self) -> None:
        self.check_run()
        if self.shots < 0:
            raise ConfigError(f"shots must be >= 0, got {self.shots}")


@dataclass
class McqResult:
    """Per-item records (``mcq_predictions.jsonl`` lines) and the throughput of the scoring."""

    records: list[dict[str, Any]]
    seconds: float


def pick_shots(items: Sequence[McqItem], pool: Sequence[McqItem], k: int) -> list[list[McqItem]]:
    """The ``k`` examples shown before each item: the first ``k`` of ``pool`` that are not the item itself."""
    if k == 0:
        return [[] for _ in items]
    if len(pool) < k:
        raise ConfigError(f"--shots {k}: the shots file has only {len(pool)} usable items")
    head = list(pool[: k + 1])
    return [[s for s in head if s.id != item.id or s.question != item.question][:k] for item in items]


def score_items(model, tokenizer, items: Sequence[McqItem], shots: Sequence[Sequence[McqItem]] | None = None,
                system: str | None = None, progress: bool = False, shared_prefix: bool = True) -> McqResult:
    """Score every option of every item; return one record per item.

    Args:
        model: an mlx-lm model (adapters attached or not); it is not modified.
        tokenizer: its tokenizer wrapper (chat template applied when it has one).
        items: the questions.
        shots: per item, the solved examples shown before it (none when None).
        system: system prompt text, or None for the template's own.
        progress: a tqdm bar on stderr.
        shared_prefix: the batched path (see ``mcq_scoring.score_options``).
    """
    from mlx_med.evaluation.mcq_scoring import encode_item, pick, score_options

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="mcq", unit="item", leave=False, dynamic_ncols=True)
    records = []
    start = time.perf_counter()
    for n, item in enumerate(items):
        encoded = encode_item(tokenizer, item, shots[n] if shots else (), system)
        scores = score_options(model, encoded, shared_prefix=shared_prefix)
        letters = list(item.options)
        choice = letters[pick(scores)]
        choice_norm = letters[pick(scores, [len(t) for t in encoded.texts])]
        records.append({
            "id": item.id, "choice": choice, "scores": dict(zip(letters, scores)), "answer": item.answer,
            "correct": choice == item.answer, "choice_norm": choice_norm, "correct_norm": choice_norm == item.answer,
            "lang": item.lang, "category": item.category,
        })
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return McqResult(records, time.perf_counter() - start)


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion, in percent (0–100); ``(0, 100)`` when ``total`` is 0."""
    if total == 0:
        return 0.0, 100.0
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def accuracy_entry(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"n", "accuracy", "accuracy_norm", "interval95"}`` of some prediction records (percent)."""
    n = len(records)
    right = sum(bool(r["correct"]) for r in records)
    right_norm = sum(bool(r["correct_norm"]) for r in records)
    return {
        "n": n,
        "accuracy": 100 * right / n if n else 0.0,
        "accuracy_norm": 100 * right_norm / n if n else 0.0,
        "interval95": {"accuracy": list(wilson_interval(right, n)), "accuracy_norm": list(wilson_interval(right_norm, n))},
    }


def mcq_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall, per-category and per-language accuracy (raw and length-normalised) with Wilson 95% intervals."""
    def grouped(key: str) -> dict[str, Any]:
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(r.get(key) or "(none)", []).append(r)
        return {name: accuracy_entry(rows) for name, rows in groups.items()}

    return {"suite": "mcq", **accuracy_entry(records), "interval": "wilson score, 95%",
            "by_category": grouped("category"), "by_language": grouped("lang")}


def load_items(cfg: McqEvalConfig) -> tuple[McqSet, list[list[McqItem]]]:
    """The items to score and, per item, its shots (bad rows of either file are skipped and counted)."""
    evalset = read_mcq(cfg.data, cfg.limit)
    if cfg.shots:
        pool = read_mcq(cfg.shots_data).items if cfg.shots_data is not None else read_mcq(cfg.data).items
        return evalset, pick_shots(evalset.items, pool, cfg.shots)
    return evalset, [[] for _ in evalset.items]


def evaluate_mcq(cfg: McqEvalConfig, loaded, evalset: McqSet, shots, quiet: bool = True) -> dict[str, Any]:
    """Score ``evalset`` with an already loaded model; return the metrics and the records (not written)."""
    from mlx_med.prompts import resolve_system

    system = resolve_system(cfg.system, texts=[i.question for i in evalset.items])
    result = score_items(loaded.model, loaded.tokenizer, evalset.items, shots, system, progress=not quiet)
    metrics = mcq_metrics(result.records)
    metrics["bad_rows"] = {"count": evalset.bad, "first": evalset.bad_reasons}
    metrics["shots"] = cfg.shots
    metrics["throughput"] = {"items": len(result.records), "seconds": round(result.seconds, 3),
                             "items_per_s": round(len(result.records) / result.seconds, 3) if result.seconds else 0.0}
    return {"metrics": metrics, "records": result.records}


def write_predictions(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """One prediction record per line (atomically)."""
    from mlx_med.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_mcq(out: Path, metrics: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    """``mcq_predictions.jsonl`` and ``metrics.json`` into ``out`` (each written atomically)."""
    from mlx_med.io import atomic_write_json

    write_predictions(out / PREDICTIONS, records)
    atomic_write_json(out / METRICS, metrics)


def run_mcq_eval(cfg: McqEvalConfig, quiet: bool = False, loaded=None) -> dict[str, Any]:
    """``mlx-med eval --suite mcq``: score ``cfg.data`` and write predictions and metrics to ``cfg.out``.

    Args:
        cfg: the settings.
        quiet: no progress bar and no printed summary.
        loaded: an already loaded model (sweeps reuse one; its adapters are the caller's business).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        UserError: missing settings, a missing or empty MCQ file, or an existing output folder without force.
    """
    from mlx_med.config import config_to_dict
    from mlx_med.io import atomic_output_dir

    cfg.validate()
    evalset, shots = load_items(cfg)
    with atomic_output_dir(cfg.out, force=cfg.force) as tmp:
        if loaded is None:
            loaded, _ = cfg.load()
        result = evaluate_mcq(cfg, loaded, evalset, shots, quiet)
        metrics = {**result["metrics"], "config": {**config_to_dict(cfg), "alpha": cfg.effective_alpha}}
        fused = fused_from(cfg.model)
        if fused is not None:
            metrics["config"]["fused"] = fused
        write_mcq(tmp, metrics, result["records"])
    if not quiet:
        print(summary_line(metrics))
        if evalset.bad:
            print(f"skipped {evalset.bad} bad row(s); first: {evalset.bad_reasons[0]}")
        print(f"wrote {Path(cfg.out) / PREDICTIONS} and {METRICS}")
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """One line: accuracy with its interval, length-normalised accuracy, per-language accuracy."""
    lo, hi = metrics["interval95"]["accuracy"]
    langs = ", ".join(f"{k} {v['accuracy']:.1f}% (n={v['n']})" for k, v in metrics["by_language"].items())
    return (f"MCQ accuracy {metrics['accuracy']:.1f}% (95% CI {lo:.1f}–{hi:.1f}, n={metrics['n']}), "
            f"length-normalised {metrics['accuracy_norm']:.1f}%; by language: {langs}")
