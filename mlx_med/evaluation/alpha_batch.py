"""The QA answers of an α sweep's grid generated as one batch: each row decodes at its own α.

Instead of one generation pass per α, every (α, question) pair still to answer goes into one
``generate_batch`` call with per-row adapter weights (``{"sft": α, "pt": 1 − α}``, see
``row_weights``). The answers land in each point's ``predictions.partial.jsonl`` exactly as an
interrupted per-α eval leaves them, so the runner then only scores them (``run_eval`` resumes):
predictions files, metrics and caches are the per-α path's. Greedy answers are token-for-token the
per-α ones (``tests/test_alpha_batch.py``).

Only greedy decoding without an α schedule goes this way: a sampled run draws its tokens for the
batch it is in (a mixed batch would give other draws than the per-α runs whose caches it shares),
and a schedule's per-module α is not a per-row weight.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from mlx_med.adapters.schedule import alpha_weights
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

# Rows decoded together in the mixed batch: the eval's batch size times the number of α, up to this
# (more rows make the decode GEMMs more efficient on a CPU; the KV caches grow with every row).
MAX_MIXED_ROWS = 64


def mixed_batch_applies(cfg: EvalConfig, live) -> bool:
    """Whether the grid's QA answers can be generated as one batch (greedy, no α schedule)."""
    return cfg.data is not None and cfg.decoding().greedy and cfg.alpha_schedule is None and live.schedule is None


def generate_alpha_grid(cfg: EvalConfig, settings: dict[float, EvalConfig], loaded, live,
                        quiet: bool = False) -> list[float]:
    """Answer the QA set at every α of ``settings`` (α → that point's eval config) in one batch.

    Points whose eval already finished with the same inputs are left alone (the sweep reuses them);
    the others get their missing answers appended to ``<point>/predictions.partial.jsonl``.

    Returns:
        The α whose answers were generated here: run their evals with ``force=False`` so they resume.
    """
    from mlx_med.evaluation.decoding import cap_to_window
    from mlx_med.evaluation.generate import generate_batch, with_system

    evalset = load_eval_rows(cfg.data, cfg.limit)
    decoding = cap_to_window(cfg.decoding(), getattr(loaded, "config", None) or {}, quiet)
    jobs = []  # (α, out, row) per answer to generate
    conversations, weights = [], []
    for alpha, setting in settings.items():
        if finished_metrics(setting) is not None:
            continue
        out = Path(setting.out)
        force = setting.force or (out / METRICS).exists()  # as ``eval_or_reuse``: a stale eval is redone
        done = prepare_out_dir(out, run_state(setting, setting.decoding()), force)
        todo = [row for row in evalset.rows if row.index not in done]
        system = system_text(setting.system, setting.lang, todo) if todo else None
        for row in todo:
            jobs.append((alpha, out, row))
            conversations.append(with_system(row.messages, system))
            weights.append(alpha_weights(alpha))
    generated = sorted({alpha for alpha, _, _ in jobs})
    if not jobs:
        return generated
    if not quiet:
        print(f"generating the answers of {len(generated)} α in one batch ({len(jobs)} rows)")
    with ExitStack() as stack:
        files = {out: stack.enter_context(open_partial(out / PARTIAL)) for out in {out for _, out, _ in jobs}}

        def keep(i: int, result) -> None:
            _, out, row = jobs[i]
            append_prediction(files[out], row, result)

        rows = max(MAX_MIXED_ROWS, cfg.batch_size)
        generate_batch(loaded.model, loaded.tokenizer, conversations, decoding,
                       batch_size=min(cfg.batch_size * len(generated), rows), progress=not quiet,
                       on_result=keep, live=live, row_weights=weights)
    return generated

