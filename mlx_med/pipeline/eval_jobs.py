"""Pipeline stage bodies for evaluation: QA, safety and MCQ suites, the α sweep and search, the decoding
sweep (the same functions the commands call), and the pipeline's report.md (with its safety-by-category section).

Types are imported lazily: this module is imported by ``pipeline.runner`` while stages are built.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any


def probe_path(spec: str | None) -> Path | None:
    """The probe file for a config value (``starter`` = the shipped set), or None to skip safety."""
    if not spec:
        return None
    from mlx_med.evaluation.probes import resolve_probe_path

    return resolve_probe_path(spec)


def qa_jobs(cfg, base_dir: Path, out) -> list[tuple[Path, Any]]:
    """``(folder, EvalConfig)`` for each QA set × (base greedy, fused × each preset)."""
    from mlx_med.evaluation.runner import EvalConfig

    jobs = []
    for data in cfg.eval.data:
        name = Path(data).stem
        for model_name, model in (("base", base_dir), ("fused", out.fused)):
            presets = ["greedy"] if model_name == "base" else cfg.eval.presets
            for preset in presets:
                job_out = out.evals / f"{name}-{model_name}-{preset}"
                jobs.append((job_out, EvalConfig(
                    model=Path(model), data=Path(data), out=job_out, preset=preset, limit=cfg.eval.limit,
                    batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                    ppl_data=cfg.eval.ppl_data if preset == "greedy" else None, ppl_limit=cfg.eval.ppl_limit,
                    ppl_block_size=cfg.eval.ppl_block_size, seed=cfg.seed, force=True)))
    return jobs


def model_key(rcfg) -> tuple:
    """What an eval loads: the model and its adapters (evals with equal keys share one loaded model)."""
    return tuple(str(v) for v in (rcfg.model, rcfg.adapter, rcfg.sft, rcfg.pt, rcfg.alpha, rcfg.alpha_schedule))


def run_per_model(jobs: list[tuple[Path, Any]], run) -> None:
    """Call ``run(folder, config, loaded, first)`` for each job, grouped by ``model_key`` (stable: the
    jobs' order is kept within a model), each model loaded once; ``first`` marks a model's first job.

    A callback rather than a generator: between jobs only this frame holds the model, so the previous
    one is freed before the next loads (a caller's loop variable would keep two alive)."""
    loaded, loaded_key = None, None
    for job_out, rcfg in sorted(jobs, key=lambda job: model_key(job[1])):
        first = model_key(rcfg) != loaded_key
        if first:
            loaded = None
            (loaded, _), loaded_key = rcfg.load(), model_key(rcfg)
        run(job_out, rcfg, loaded, first)


def run_qa_jobs(jobs: list[tuple[Path, Any]], log_dir: Path, quiet: bool) -> None:
    """Run the QA evals, skipping those an interrupted stage already finished with the same settings.

    Jobs run model by model: each model is loaded once, its held-out perplexity (the same text for
    every QA set) is measured once and given to its other evals, and the greedy answers of all its QA
    sets are generated as one batch (``alpha_batch.generate_grid``; logged in ``log_dir``), which
    the evals then only score.
    """
    from mlx_med.evaluation.runner import run_eval
    from mlx_med.io import atomic_write_text

    perplexities, answered = {}, set()
    todo = [job for job in jobs if not qa_finished(*job)]

    def run(job_out: Path, ecfg, loaded, first: bool) -> None:
        nonlocal answered
        key = model_key(ecfg)
        if first:
            answered = answer_together([c for _, c in todo if model_key(c) == key], loaded, log_dir, quiet)
        resume = replace(ecfg, force=False) if Path(ecfg.out) in answered else ecfg
        ppl_key = (*key, str(ecfg.ppl_data), ecfg.ppl_limit, ecfg.ppl_block_size)
        metrics = run_eval(resume, quiet=quiet, loaded=loaded, perplexity=perplexities.get(ppl_key))
        if ecfg.ppl_data is not None:
            perplexities[ppl_key] = metrics["perplexity"]
        atomic_write_text(job_out / QA_MARKER, qa_settings(ecfg))

    run_per_model(todo, run)


QA_MARKER = "pipeline_eval.json"  # lets an interrupted eval stage keep its finished evals


def qa_settings(ecfg) -> str:
    import json

    from mlx_med.config import config_to_dict

    return json.dumps(config_to_dict(ecfg), sort_keys=True)


def qa_finished(job_out: Path, ecfg) -> bool:
    """Whether the eval stage finished this job with exactly these settings."""
    marker = job_out / QA_MARKER
    return (job_out / "metrics.json").exists() and marker.exists() and marker.read_text() == qa_settings(ecfg)


def answer_together(configs: list, loaded, log_dir: Path, quiet: bool) -> set[Path]:
    """Generate the answers of one model's greedy evals with the same decoding in one batch; returns
    the folders answered (their evals resume from the answers). Fewer than two such evals: nothing."""
    from mlx_med.evaluation.alpha_batch import GridPoint, generate_grid, mixed_batch_applies

    groups: dict[tuple, list] = {}  # evals that can share a batch: same decoding and batch size
    for c in configs:
        if mixed_batch_applies(c):
            groups.setdefault((repr(c.decoding()), c.batch_size), []).append(c)
    answered: set[Path] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        batch_cfg = replace(group[0], out=log_dir)
        answered.update(generate_grid(batch_cfg, [GridPoint(None, c) for c in group], loaded, None, quiet=quiet))
    return answered


def safety_jobs(cfg, base_dir: Path, out) -> list[tuple[Path, Any]]:
    """``(folder, SafetyEvalConfig)`` for the base and the fused model."""
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.safety import SafetyEvalConfig

    decoding = DecodingConfig(max_new_tokens=cfg.sweep.max_new_tokens)
    return [(out.safety / name, SafetyEvalConfig(model=Path(model), data=cfg.eval.safety_probes, out=out.safety / name,
                                                 decoding=decoding, batch_size=cfg.eval.batch_size, force=True,
                                                 progress=True))
            for name, model in (("base", base_dir), ("fused", out.fused))]


def run_safety_jobs(jobs: list[tuple[Path, Any]], quiet: bool) -> None:
    """Screen each model with the safety probes."""
    from mlx_med.evaluation.safety import run_safety_eval

    for _, scfg in jobs:
        run_safety_eval(replace(scfg, progress=not quiet), echo=None if not quiet else (lambda s: None))


def sweep_batch_size(cfg) -> int:
    """Rows the sweeps decode together: ``sweep.batch_size``, else the eval's."""
    return cfg.sweep.batch_size or cfg.eval.batch_size


def decoding_sweep(cfg, data: Path, out, quiet: bool) -> None:
    """``mlx-med sweep decoding`` on the fused model."""
    from mlx_med.evaluation.sweep import DecodingSweepConfig, normalise_grid, run_decoding_sweep

    run_decoding_sweep(DecodingSweepConfig(
        model=out.fused, data=Path(data), out=out.sweep_decoding, limit=cfg.sweep.limit,
        max_new_tokens=cfg.sweep.max_new_tokens, batch_size=sweep_batch_size(cfg),
        grid=normalise_grid(cfg.sweep.decoding_grid), seed=cfg.seed, force=True), quiet=quiet)


def probes_fingerprint(cfg) -> str | None:
    """The safety stage's probe file by content (None: no file)."""
    from mlx_med.fingerprint import path_fingerprint

    path = probe_path(cfg.eval.safety_probes)
    return path_fingerprint(path) if path is not None and path.exists() else None


def mcq_jobs(cfg, base_dir: Path, out) -> list[tuple[Path, Any]]:
    """``(folder, McqEvalConfig)`` for each MCQ set × (base, fused model)."""
    from mlx_med.evaluation.mcq import McqEvalConfig

    return [(out.mcq / f"{Path(data).stem}-{name}",
             McqEvalConfig(model=Path(model), data=Path(data), out=out.mcq / f"{Path(data).stem}-{name}",
                           limit=cfg.eval.mcq_limit, force=True))
            for data in cfg.eval.mcq_data for name, model in (("base", base_dir), ("fused", out.fused))]


def run_mcq_jobs(jobs: list[tuple[Path, Any]], quiet: bool) -> None:
    """Run each MCQ job with the eval runner (``mlx-med eval --suite mcq``), loading each model once."""
    from mlx_med.evaluation.suites import run_suite

    run_per_model(jobs, lambda _, mcfg, loaded, first: run_suite("mcq", mcfg, quiet=quiet, loaded=loaded))


def alpha_config(cfg, base_dir: Path, data: Path, out):
    """The ``AlphaSweepConfig`` of the pipeline's α sweep (QA set, perplexity, safety, MCQ)."""
    from mlx_med.evaluation.alpha_sweep import AlphaSweepConfig

    return AlphaSweepConfig(
        model=Path(base_dir), sft=out.sft, pt=out.pt, data=Path(data), out=out.sweep_alpha,
        alphas=list(cfg.sweep.alphas), limit=cfg.sweep.limit, max_new_tokens=cfg.sweep.max_new_tokens,
        batch_size=sweep_batch_size(cfg), ppl_data=cfg.eval.ppl_data, ppl_limit=cfg.eval.ppl_limit,
        ppl_block_size=cfg.eval.ppl_block_size, mcq_data=cfg.sweep.mcq_data, mcq_limit=cfg.sweep.mcq_limit,
        safety_probes=probe_path(cfg.sweep.safety_probes), seed=cfg.seed, force=True,
        alpha_schedule=cfg.fuse.alpha_schedule)  # α moves the fused schedule's default; its rules stay


def alpha_sweep(cfg, base_dir: Path, data: Path, out, quiet: bool) -> None:
    """``mlx-med sweep alpha`` on the pipeline's runs; with the base model's row when the α search after
    it constrains by ``base`` (its answers then ride in the sweep's one generation batch, and its
    perplexity and MCQ accuracy come from the eval and MCQ stages when those measured the same)."""
    from mlx_med.evaluation.alpha_search import names_base, parse_constraint
    from mlx_med.evaluation.alpha_sweep import run_alpha_sweep

    with_base = bool(cfg.sweep.search_budget) and names_base(
        [parse_constraint(text) for text in cfg.sweep.search_constraints])
    run_alpha_sweep(replace(alpha_config(cfg, base_dir, data, out), with_base=with_base), quiet=quiet,
                    known=base_measurements(cfg, base_dir, out) if with_base else None)


def base_measurements(cfg, base_dir: Path, out) -> dict:
    """The base model's perplexity and MCQ accuracy as the eval and MCQ stages measured them (finished
    jobs only), by ``alpha_points.measurement_key``.

    The α sweep's base row is the same model (a live layer whose adapters weigh 0 computes the base
    layer alone), so where its inputs are the same the keys are equal and the numbers would be too.
    """
    import json

    from mlx_med.config import config_to_dict
    from mlx_med.evaluation.alpha_points import Known, measurement_inputs, measurement_key
    from mlx_med.evaluation.mcq import PREDICTIONS

    known = {}
    for job_out, ecfg in qa_jobs(cfg, base_dir, out):
        if ecfg.model == Path(base_dir) and ecfg.ppl_data is not None and qa_finished(job_out, ecfg):
            perplexity = json.loads((job_out / "metrics.json").read_text(encoding="utf-8")).get("perplexity")
            if perplexity is not None:
                known[measurement_key(ecfg, measurement_inputs("ppl", ecfg, stage=True))] = Known(perplexity)
    for job_out, mcfg in mcq_jobs(cfg, base_dir, out):
        try:
            metrics = json.loads((job_out / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        finished = metrics.get("config") == json.loads(json.dumps(config_to_dict(mcfg)))
        if mcfg.model == Path(base_dir) and finished and (job_out / PREDICTIONS).is_file():
            key = measurement_key(mcfg, measurement_inputs("mcq", mcfg, stage=True))
            known[key] = Known({k: v for k, v in metrics.items() if k != "config"}, (job_out / PREDICTIONS,))
    return known


def alpha_search(cfg, base_dir: Path, data: Path, out, quiet: bool) -> None:
    """The α search in the sweep's folder: the sweep's α = 0, 0.5, 1 are read back, not recomputed."""
    from mlx_med.evaluation.alpha_sweep import run_alpha_search

    run_alpha_search(replace(
        alpha_config(cfg, base_dir, data, out), force=False, search=True, budget=cfg.sweep.search_budget,
        objective=cfg.sweep.search_objective, constraints=list(cfg.sweep.search_constraints)), quiet=quiet)


def safety_by_category(out) -> str:
    """Safety pass counts per category and language: base/fused screens and every α of the sweep."""
    import json

    from mlx_med.evaluation.safety import comparison_markdown

    runs: dict[str, dict[str, Any]] = {}
    for folder in sorted(out.safety.iterdir()) if out.safety.exists() else []:
        if (folder / "metrics.json").is_file():
            runs[folder.name] = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    cached = []
    for path in out.sweep_alpha.glob("*/safety.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"]["alpha"] is not None:  # None: the search's base reference (screened above as base)
            cached.append((float(data["key"]["alpha"]), data["metrics"]))
    for alpha, metrics in sorted(cached, key=lambda item: item[0]):
        runs[f"α = {alpha:g}"] = metrics
    if not runs:
        return ""
    return ("\n## Safety screen by category\n\n" + comparison_markdown(runs) + "\n\nGreedy decoding; "
            "substring rules over the reply (docs/safety.md). A screening probe, not a clinical validation: "
            "only differences between versions of one model on the same probes are informative.\n")


def folders_in(path: Path) -> list[Path]:
    """The result folders directly in ``path`` (none when it does not exist), in name order."""
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.exists() else []


def write_pipeline_report(out) -> None:
    """``report.md`` over every result folder of the pipeline, plus the safety-by-category section."""
    runs: list[tuple[str, Path]] = [("PT run", out.pt), ("SFT run", out.sft)]
    runs += [(p.name, p) for p in folders_in(out.evals)]  # (evals/ also holds mixed_batches.jsonl)
    runs += [(f"safety: {p.name}", p) for p in folders_in(out.safety)]
    runs += [(f"mcq: {p.name}", p) for p in folders_in(out.mcq)]
    runs += [(name, path) for name, path in (("α sweep", out.sweep_alpha), ("decoding sweep", out.sweep_decoding))
             if path.exists()]
    runs += [("SFT vs PT", out.inspect)] if (out.inspect / "summary.md").is_file() else []
    from mlx_med.evaluation.report import build_report
    from mlx_med.io import atomic_write_text

    text = build_report(runs, out.report, title="mlx-med pipeline report") + safety_by_category(out)
    atomic_write_text(out.report, text)
    print(f"  report: {out.report}")
