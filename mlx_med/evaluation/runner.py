"""The eval runner: eval JSONL → batched generation → ``generated_predictions.jsonl`` + ``metrics.json``.

Rows are chat records (``{"messages": [...]}``, last assistant turn = reference) or
``{"prompt", "response"|"output"|"label"}``; bad rows are counted and reported, never fatal.
Finished predictions are appended to ``OUT/predictions.partial.jsonl`` as they come, so an
interrupted run picks up where it stopped when started again with the same settings. Models are
never mutated here beyond applying the requested adapters.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlx_med.adapters.schedule import effective_alpha
from mlx_med.config import config_to_dict
from mlx_med.errors import UserError
from mlx_med.evaluation.decoding import DecodingConfig, cap_to_window, preset
from mlx_med.evaluation.run_config import RunConfig, fused_from
from mlx_med.evaluation.tables import format_metrics_table

PREDICTIONS = "generated_predictions.jsonl"
METRICS = "metrics.json"
PARTIAL = "predictions.partial.jsonl"
STATE = "eval_state.json"
LABEL_KEYS = ("final_decision",)


@dataclass
class EvalConfig(RunConfig):
    """The QA suite (and perplexity): what to evaluate, on what, and how to decode. Flags > YAML > defaults."""

    data: Path | None = None  # eval JSONL
    preset: str = "greedy"  # decoding preset (mlx_med.evaluation.decoding.PRESETS); fields below override it
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    batch_size: int = 8
    limit: int | None = None  # first N valid rows
    system: str | None = None  # system prompt added to rows without one
    lang: Literal["auto", "zh", "en"] = "auto"  # sacreBLEU tokenizer choice
    ppl_data: Path | None = None  # held-out PT text: perplexity (knowledge retention)
    ppl_block_size: int = 512
    ppl_limit: int | None = 100  # PT records used for perplexity
    force: bool = False  # replace a finished eval in `out`

    def decoding(self) -> DecodingConfig:
        """The preset with this config's explicit decoding fields on top."""
        return preset(self.preset).with_overrides(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens, seed=self.seed,
        )

    def validate(self) -> None:
        self.check_run()
        self.decoding()  # raises on bad values


@dataclass
class EvalRow:
    """One eval item: the conversation up to the reference answer."""

    index: int
    source: str
    messages: list[dict[str, str]]
    reference: str
    label: str | None = None


@dataclass
class EvalSet:
    rows: list[EvalRow]
    bad: int = 0
    bad_reasons: list[str] = field(default_factory=list)


def load_eval_rows(path: str | Path, limit: int | None = None) -> EvalSet:
    """Eval rows from ``path``; bad records are counted (with the first reasons), not raised."""
    from mlx_med.data.readers import SkipReport, iter_examples

    report = SkipReport()
    rows: list[EvalRow] = []
    for example in iter_examples(path, kind="chat", skip_bad=True, report=report):
        messages = list(example.messages)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        label = next((str(example.meta[k]) for k in LABEL_KEYS if example.meta.get(k) is not None), None)
        rows.append(EvalRow(len(rows), example.source, messages[:last], messages[last]["content"], label))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        why = f" ({report.summary()})" if report.skipped else ""
        raise UserError(f"{path}: no usable eval rows{why}")
    return EvalSet(rows, report.skipped, report.reasons)


def run_eval(cfg: EvalConfig, quiet: bool = False, loaded=None,
             perplexity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.model`` (+ adapters) on ``cfg.data``; write predictions and metrics to ``cfg.out``.

    Args:
        cfg: what to run; ``cfg.out`` may hold an interrupted run with the same settings (resumed).
        quiet: no progress bar and no printed table.
        loaded: an already loaded ``LoadedModel`` to use instead of loading ``cfg.model`` (sweeps
            reuse one model; the adapters it carries are the caller's business).
        perplexity: this same model's ``perplexity_stats`` on ``cfg.ppl_data`` (same limit and block
            size), already measured by the caller (the pipeline measures it once per model).

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    cfg.validate()
    decoding = cfg.decoding()
    evalset = load_eval_rows(cfg.data, cfg.limit)
    out = Path(cfg.out)
    state = run_state(cfg, decoding)
    done = prepare_out_dir(out, state, cfg.force)
    todo = [row for row in evalset.rows if row.index not in done]
    if not quiet and done:
        print(f"resuming: {len(done)} of {len(evalset.rows)} predictions already in {out / PARTIAL}")
    if loaded is None:
        loaded, _ = cfg.load()
    decoding = cap_to_window(decoding, getattr(loaded, "config", None) or {}, quiet)

    start = time.perf_counter()
    generated = _generate(loaded, todo, decoding, cfg, out / PARTIAL, quiet)
    seconds = time.perf_counter() - start
    done.update(generated)

    records = [done[row.index] for row in evalset.rows]
    from mlx_med.evaluation.metrics import compute_metrics
    from mlx_med.io import atomic_write_json, atomic_write_text

    atomic_write_text(out / PREDICTIONS, "".join(
        json.dumps({"prompt": r["prompt"], "predict": r["predict"], "label": r["label"]}, ensure_ascii=False) + "\n"
        for r in records
    ))
    metrics = compute_metrics(
        [r["predict"] for r in records], [r["label"] for r in records],
        labels=[row.label for row in evalset.rows],
        generation_tokens=[r["generation_tokens"] for r in records], lang=cfg.lang,
    )
    new_tokens = sum(r["generation_tokens"] for r in generated.values())
    # answers an α sweep's mixed batch generated for this point (its own figures: mixed_batches.jsonl)
    mixed = sum(1 for r in records if r.get("mixed_batch") and r["index"] not in generated)
    metrics["throughput"] = {"sequences": len(generated), "generated_tokens": new_tokens, "seconds": round(seconds, 3),
                             "tokens_per_s": round(new_tokens / seconds, 3) if seconds > 0 else 0.0,
                             "batch_size": cfg.batch_size, "resumed": len(records) - len(generated) - mixed,
                             "mixed_batch": mixed}
    metrics["finish_reasons"] = _count(r["finish_reason"] for r in records)
    metrics["bad_rows"] = {"count": evalset.bad, "first": evalset.bad_reasons}
    if cfg.ppl_data is not None:
        if perplexity is None:
            from mlx_med.evaluation.perplexity import load_ppl_texts, perplexity_stats

            texts = load_ppl_texts(cfg.ppl_data, cfg.ppl_limit)
            perplexity = perplexity_stats(loaded.model, loaded.tokenizer, texts, cfg.ppl_block_size,
                                          progress=not quiet)
        metrics["perplexity"] = perplexity
    metrics["config"] = {**config_to_dict(cfg), "decoding": config_to_dict(decoding),
                         "alpha": effective_alpha(cfg.alpha, cfg.alpha_schedule)}
    fused = fused_from(cfg.model)
    if fused is not None:
        metrics["config"]["fused"] = fused
    atomic_write_json(out / METRICS, metrics)
    (out / PARTIAL).unlink(missing_ok=True)
    if not quiet:
        print(format_metrics_table({str(out): metrics}))
        if evalset.bad:
            print(f"skipped {evalset.bad} bad row(s); first: {evalset.bad_reasons[0]}")
    return metrics


def score_predictions(path: str | Path, out: str | Path | None = None, lang: str = "auto",
                      quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """Score an existing ``generated_predictions.jsonl`` (ours or LLaMA-Factory's) without generating.

    Args:
        path: JSONL with ``predict`` and ``label`` per line (``prompt`` is ignored).
        out: folder for ``metrics.json`` (nothing is written when None).
        lang: sacreBLEU tokenizer choice (``auto``, ``zh``, ``en``).
        quiet: print nothing.
        force: replace an existing ``metrics.json`` in ``out``.

    Raises:
        DataError: a line that is not JSON or lacks a string ``predict``/``label``.
    """
    from mlx_med.errors import DataError
    from mlx_med.evaluation.metrics import compute_metrics
    from mlx_med.io import atomic_write_json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"predictions file not found: {path}")
    if out is not None and (Path(out) / METRICS).exists() and not force:
        raise UserError(f"{Path(out) / METRICS} already exists; pass --force to replace it")
    predictions, labels = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, number, None, f"invalid JSON ({err.msg})") from None
            for key in ("predict", "label"):
                if not isinstance(record.get(key), str):
                    raise DataError(path, number, key, "missing or not a string")
            predictions.append(record["predict"])
            labels.append(record["label"])
    if not predictions:
        raise UserError(f"{path}: no predictions")
    metrics = compute_metrics(predictions, labels, lang=lang)
    metrics["config"] = {"predictions": str(path)}
    if out is not None:
        atomic_write_json(Path(out) / METRICS, metrics)
    if not quiet:
        print(format_metrics_table({str(path): metrics}))
    return metrics


def run_state(cfg: EvalConfig, decoding: DecodingConfig) -> dict[str, Any]:
    """What must match for a partial run to be resumed (or a sweep setting reused): inputs and
    decoding, not batch size."""
    from mlx_med import __version__
    from mlx_med.fingerprint import path_fingerprint

    return {
        **cfg.adapter_fingerprint(),
        "data": path_fingerprint(cfg.data),
        "limit": cfg.limit,
        "system": cfg.system,
        "decoding": config_to_dict(decoding),
        "mlx_med": __version__,  # an upgrade never resumes an older run's predictions
    }


def prepare_out_dir(out: Path, state: dict[str, Any], force: bool) -> dict[int, dict]:
    """Create ``out`` or reopen an interrupted run in it; return the predictions already made."""
    from mlx_med.io import atomic_write_json, has_content

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if force:
        for name in (PARTIAL, STATE, METRICS, PREDICTIONS):
            (out / name).unlink(missing_ok=True)
    elif (out / METRICS).exists():
        raise UserError(f"{out} already holds a finished eval ({METRICS}); pass --force to replace it")
    done: dict[int, dict] = {}
    if (out / PARTIAL).exists():
        try:
            previous = json.loads((out / STATE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            previous = None
        if previous != state:
            raise UserError(f"{out} holds an interrupted eval with different model, data or decoding "
                            "settings; pass --force to start over")
        done = read_partial(out / PARTIAL)
    elif out.exists() and has_content(out) and not force:
        raise UserError(f"{out} already exists and is not an eval folder; pass --force to use it anyway")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STATE, state)
    return done


def read_partial(path: Path) -> dict[int, dict]:
    """Predictions of an interrupted run, by row index; a torn last line is ignored."""
    done: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                done[int(record["index"])] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return done


def _generate(loaded, rows: list[EvalRow], decoding: DecodingConfig, cfg: EvalConfig, partial: Path,
              quiet: bool) -> dict[int, dict]:
    from mlx_med.evaluation.generate import generate_batch

    made: dict[int, dict] = {}
    if not rows:
        return made
    with open_partial(partial) as f:
        def keep(i: int, result) -> None:
            made[rows[i].index] = append_prediction(f, rows[i], result)

        generate_batch(loaded.model, loaded.tokenizer, [row.messages for row in rows], decoding,
                       batch_size=cfg.batch_size, system=system_text(cfg.system, cfg.lang, rows),
                       progress=not quiet, on_result=keep)
    return made


def open_partial(partial: Path):
    """``predictions.partial.jsonl`` opened for appending, a torn last line (interrupted write) ended first."""
    if partial.exists() and partial.stat().st_size and not partial.read_bytes().endswith(b"\n"):
        with open(partial, "a", encoding="utf-8") as f:
            f.write("\n")
    return open(partial, "a", encoding="utf-8")


def append_prediction(f, row: EvalRow, result, mixed_batch: bool = False) -> dict:
    """Append one finished answer (a ``GenerationResult``) to an open partial file; return its record.
    ``mixed_batch``: generated by an α sweep's mixed batch (``alpha_batch``), not by this eval."""
    record = {"index": row.index, "prompt": result.prompt, "predict": result.text, "label": row.reference,
              "prompt_tokens": result.prompt_tokens, "generation_tokens": result.generation_tokens,
              "finish_reason": result.finish_reason}
    if mixed_batch:
        record["mixed_batch"] = True
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    return record


def system_text(system: str | None, lang: str, rows: list[EvalRow]) -> str | None:
    """``--system`` for a QA set (``mlx_med.prompts.resolve_system``): ``default`` is the medical
    prompt in ``lang``, or in the language of the first rows when ``lang`` is ``auto``."""
    from mlx_med.prompts import resolve_system

    return resolve_system(system, lang=lang, texts=[m["content"] for row in rows[:8] for m in row.messages] or [""])


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts
