"""Answers of several evals as one batch: an α sweep's points, or a model's QA sets.

Instead of one generation pass per eval, every answer still missing (each QA question and each safety
probe, at each point) goes into one ``generate_batch`` call. In an α sweep the points are α values
(and, when asked, the base model with both weights 0), and each row decodes at its own point's adapter
weights (``{"sft": α, "pt": 1 − α}``, see ``row_weights``); in the pipeline's eval stage the points are
one model's QA sets, so rows differ only in their questions. Short safety replies and long QA answers
share every decode step, and a finished row's slot is refilled from the queue: on a CPU a decode step
of 24 or 64 rows takes little longer than one of 12 (the weights are read once per step). The QA
answers land in each point's ``predictions.partial.jsonl`` exactly as an interrupted eval leaves them,
so the runner then only scores them (``run_eval`` resumes); the safety replies are scored into the
point's ``safety.json`` as the per-point screen would. Predictions files, metrics and caches are the
per-point path's, and greedy answers are the per-point ones (``tests/test_alpha_batch.py``,
``tests/test_pipeline.py``; up to the rare near-tie a neighbour's padding can flip in any batched
generation, see ``generate``).

Only greedy decoding without an α schedule goes this way: a sampled run draws its tokens for the
batch it is in (a mixed batch would give other draws than the per-point runs whose caches it
shares), and a schedule's per-module α is not a per-row weight.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mlx_med.evaluation.runner import (
    METRICS,
    PARTIAL,
    EvalConfig,
    append_prediction,
    load_eval_rows,
    open_partial,
    prepare_out_dir,
    run_state,
    system_text,
)
from mlx_med.evaluation.sweep import finished_metrics

MIXED_LOG = "mixed_batches.jsonl"  # in the sweep (or evals) folder: one line per mixed batch (rows, tokens, seconds)

# Rows decoded together in the mixed batch: the eval's batch size times the number of points, up to
# this (more rows make the decode GEMMs more efficient on a CPU; the KV caches grow with every row).
MAX_MIXED_ROWS = 64


@dataclass
class GridPoint:
    """One point of the grid: its eval settings (folder, QA set, limit) and the adapter weights its rows
    decode at (None: the model as loaded)."""

    weights: dict[str, float] | None
    setting: EvalConfig


def mixed_batch_applies(cfg: EvalConfig, live=None) -> bool:
    """Whether answers can be generated as one batch (greedy, no α schedule)."""
    return cfg.decoding().greedy and cfg.alpha_schedule is None and (live is None or live.schedule is None)


def generate_grid(cfg: EvalConfig, points: list[GridPoint], loaded, live, probes=None,
                  quiet: bool = False) -> list[Path]:
    """Generate the QA answers and safety replies that ``points`` still miss, in one batch.

    Points whose eval (or safety screen) already finished with the same inputs are left alone; the
    others get their missing QA answers appended to ``<point>/predictions.partial.jsonl`` and their
    safety screen written to ``<point>/safety.json``.

    Args:
        cfg: the batch's settings: decoding and batch size (shared by every point), and the folder
            (``cfg.out``) whose ``mixed_batches.jsonl`` logs the batch.
        points: the grid; each point's QA set and limit are its own setting's.
        loaded, live: the model, with the SFT/PT pair attached live when points carry weights.
        probes: safety probes screened at every point (None: no screen).
        quiet: no progress bar.

    Returns:
        The folders of the points generated here: run their evals with ``force=False`` so they
        resume, and read their safety screens from the cache.
    """
    from mlx_med.evaluation.alpha_points import cached_safety, safety_or_reuse
    from mlx_med.evaluation.decoding import cap_to_window
    from mlx_med.evaluation.generate import generate_batch, with_system
    from mlx_med.evaluation.safety import probe_conversations

    decoding = cap_to_window(cfg.decoding(), getattr(loaded, "config", None) or {}, quiet)
    # the safety screen generates with the uncapped settings: it joins only when the cap changes nothing
    screen = probes is not None and decoding == cfg.decoding()
    evalsets: dict[tuple, object] = {}  # (QA set, limit) -> its rows, read once
    jobs: list[tuple[Path, str, object]] = []  # (point folder, "qa" | "safety", eval row | probe index)
    conversations, weights = [], []
    for point in points:
        setting, out = point.setting, Path(point.setting.out)
        if setting.data is not None and finished_metrics(setting) is None:
            key = (str(setting.data), setting.limit)
            if key not in evalsets:
                evalsets[key] = load_eval_rows(setting.data, setting.limit)
            evalset = evalsets[key]
            force = setting.force or (out / METRICS).exists()  # as ``eval_or_reuse``: a stale eval is redone
            done = prepare_out_dir(out, run_state(setting, setting.decoding()), force)
            todo = [row for row in evalset.rows if row.index not in done]
            system = system_text(setting.system, setting.lang, todo) if todo else None
            for row in todo:
                jobs.append((out, "qa", row))
                conversations.append(with_system(row.messages, system))
                weights.append(point.weights)
        if screen and cached_safety(setting) is None:
            for i, conversation in enumerate(probe_conversations(probes, setting.system)):
                jobs.append((out, "safety", i))
                conversations.append(conversation)
                weights.append(point.weights)
    folders = list(dict.fromkeys(out for out, _, _ in jobs))
    if not jobs:
        return folders
    if not quiet:
        print(f"generating the answers of {len(folders)} points in one batch ({len(jobs)} rows)")
    replies: dict[Path, list[str | None]] = {}
    with ExitStack() as stack:
        files = {out: stack.enter_context(open_partial(out / PARTIAL))
                 for out in dict.fromkeys(out for out, kind, _ in jobs if kind == "qa")}

        tokens = 0

        def keep(i: int, result) -> None:
            nonlocal tokens
            tokens += result.generation_tokens
            out, kind, item = jobs[i]
            if kind == "qa":
                append_prediction(files[out], item, result, mixed_batch=True)
            else:
                replies.setdefault(out, [None] * len(probes))[item] = result.text

        batch_size = min(cfg.batch_size * len(folders), max(MAX_MIXED_ROWS, cfg.batch_size))
        start = time.perf_counter()
        weighted = any(w is not None for w in weights)
        generate_batch(loaded.model, loaded.tokenizer, conversations, decoding, batch_size=batch_size,
                       progress=not quiet, on_result=keep, live=live if weighted else None,
                       row_weights=weights if weighted else None)
        seconds = time.perf_counter() - start
    log_mixed_batch(Path(cfg.out), {
        "points": [str(f.name) for f in folders], "sequences": len(jobs), "generated_tokens": tokens,
        "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 3) if seconds > 0 else 0.0,
        "batch_size": batch_size})
    for point in points:
        out = Path(point.setting.out)
        if out in replies:
            safety_or_reuse(point.setting, probes, loaded, quiet, replies=replies[out])
    return folders


def log_mixed_batch(folder: Path, record: dict) -> None:
    """Append one mixed batch's throughput to ``<folder>/mixed_batches.jsonl`` (the points'
    ``metrics.json`` count these answers under ``throughput.mixed_batch``, not as their own work)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / MIXED_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
