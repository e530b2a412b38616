"""One point of an α sweep or search: every requested measurement of the live model at one mix, cached.

``SweepPoints.at(α)`` switches the live SFT/PT mix to α and returns the point's row (QA headline
metrics, ``ppl``, ``safety``, ``accuracy``/``accuracy_norm``); ``SweepPoints.base()`` does the same
with both adapter weights at 0 (the base model, for constraints such as ``safety>=base``). Under an
α schedule (``alpha_schedule``) α moves the schedule's default at every point and its rules stay. Each
measurement is stored in the point's folder with the inputs it came from and read back when they
still match, so a re-run (or a search with a larger budget) only computes what is new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from mlx_med.errors import UserError
from mlx_med.evaluation.sweep import eval_or_reuse, open_sweep_dir
from mlx_med.evaluation.tables import metrics_row


@dataclass(frozen=True)
class Known:
    """A measurement another run already made of the same model and adapters on the same inputs (the
    pipeline's eval and MCQ stages measure the base model the sweep's base row would measure again):
    its metrics and the files written with them, used instead of measuring."""

    metrics: dict[str, Any]
    files: tuple[Path, ...] = ()


# What each cached measurement of a point depends on besides model and adapters: each input's field in a
# sweep point's config (AlphaSweepConfig), and the same input's field in the config of the stage that
# measures it on its own (EvalConfig for perplexity, McqEvalConfig for MCQ, which the sweep also builds
# from this map), so that a stage's measurement and a point's get one key.
MEASUREMENT_INPUTS = {
    "ppl": {"ppl_data": "ppl_data", "ppl_limit": "ppl_limit", "ppl_block_size": "ppl_block_size"},
    "mcq": {"mcq_data": "data", "mcq_limit": "limit", "mcq_shots": "shots", "mcq_shots_data": "shots_data",
            "system": "system"},
}


def measurement_inputs(name: str, cfg, *, stage: bool = False) -> list[Any]:
    """The inputs of measurement ``name`` read off a sweep point's config, or with ``stage`` off the
    config of the stage that measures it alone, in the same order."""
    return [getattr(cfg, stage_field if stage else point_field)
            for point_field, stage_field in MEASUREMENT_INPUTS[name].items()]


def measurement_key(run_cfg, inputs) -> str:
    """The key of a measurement: ``run_cfg``'s model, adapters and α (``adapter_fingerprint``) and its
    inputs (files by content). Equal keys, equal results: the same arithmetic on the same numbers."""
    from mlx_med.fingerprint import path_fingerprint

    return json.dumps({**run_cfg.adapter_fingerprint(),
                       "inputs": [path_fingerprint(v) if isinstance(v, Path) else v for v in inputs]}, sort_keys=True)


class SweepPoints:
    """The live model of an α sweep and the cached measurements of its points."""

    def __init__(self, cfg, out: Path, loaded, live, probes, mcq, quiet: bool, known: dict[str, Known] | None = None):
        self.cfg, self.out, self.loaded, self.live, self.probes, self.mcq, self.quiet = (
            cfg, out, loaded, live, probes, mcq, quiet)
        self.known = known or {}  # measurement_key -> a measurement made elsewhere, used instead of measuring
        self.schedule = live.schedule  # kept: ``base`` drops it from the live mix, ``at`` brings it back
        self.answered: set[Path] = set()  # point folders whose answers ``answer_together`` generated

    @classmethod
    def open(cls, cfg, quiet: bool = False, loaded=None, live=None, first_alpha: float | None = None,
             known: dict[str, Known] | None = None) -> SweepPoints:
        """Check every input, open the sweep folder and load the model with the pair attached live.

        Args:
            cfg: an ``AlphaSweepConfig`` (validated by the caller).
            quiet: no progress bars.
            loaded, live: an already loaded model and its ``LiveAdapters`` (both or neither).
            first_alpha: the mix to load with (None: the schedule's default or ``DEFAULT_ALPHA``).
            known: measurements made elsewhere, by ``measurement_key`` (a point's perplexity or MCQ
                accuracy with the same key is taken from there, even under ``force``).
        """
        from mlx_med.evaluation.run_config import load_for_eval

        probes = None
        if cfg.safety_probes is not None:
            from mlx_med.evaluation.probes import load_probes, resolve_probe_path

            probes = load_probes(resolve_probe_path(cfg.safety_probes))  # "starter" = the shipped set
        if cfg.ppl_data is not None:
            from mlx_med.evaluation.perplexity import load_ppl_texts

            load_ppl_texts(cfg.ppl_data, cfg.ppl_limit)  # fail on bad PT text before the first α
        mcq = None
        if cfg.mcq_data is not None:
            from mlx_med.evaluation.mcq import McqEvalConfig, load_items

            mcq_cfg = McqEvalConfig(**{stage_field: getattr(cfg, point_field)
                                       for point_field, stage_field in MEASUREMENT_INPUTS["mcq"].items()})
            mcq = (mcq_cfg, *load_items(mcq_cfg))
        out = open_sweep_dir(Path(cfg.out), "alpha", cfg.force)
        if loaded is None:
            loaded, live = load_for_eval(cfg.model, sft=cfg.sft, pt=cfg.pt, alpha=first_alpha,
                                         alpha_schedule=cfg.alpha_schedule)
        if live is None:
            raise UserError("the α sweep needs the SFT/PT pair attached live (mlx_med.adapters.live)")
        return cls(cfg, out, loaded, live, probes, mcq, quiet, known)

    def at(self, alpha: float) -> dict[str, Any]:
        """The row of point α (measured now, or read back from ``alpha_<α>/``)."""
        if self.schedule is not None and self.live.schedule is None:  # dropped by ``base``
            self.live.mix.schedule = self.schedule
        self.live.set_alpha(alpha)  # live: the next forward pass uses the new mix (a schedule's rules stay)
        self.answer_together([alpha])  # this point's QA answers and safety replies share one batch
        return {"alpha": alpha, **self._measure(self.setting(alpha))}

    def setting(self, alpha: float):
        """The eval config of point α (folder ``alpha_<α>/``)."""
        return replace(self.cfg, alpha=alpha, out=self.out / f"alpha_{alpha:g}")

    def answer_together(self, alphas: list[float], base: bool = False) -> None:
        """Generate the QA answers and safety replies of every α (and, with ``base``, of the base model)
        in one mixed batch (``alpha_batch``) when that applies (greedy, no schedule); the points'
        measurements then only score them. Otherwise each point generates its own."""
        from mlx_med.adapters.schedule import alpha_weights
        from mlx_med.evaluation.alpha_batch import GridPoint, generate_grid, mixed_batch_applies

        if not mixed_batch_applies(self.cfg, self.live):
            return
        points = [GridPoint(alpha_weights(alpha), self.setting(alpha)) for alpha in alphas]
        if base:
            points.append(GridPoint({"sft": 0.0, "pt": 0.0}, self.base_setting()))
        points = [p for p in points if Path(p.setting.out) not in self.answered]  # generated earlier in this run
        self.answered.update(generate_grid(self.cfg, points, self.loaded, self.live, self.probes, self.quiet))

    def at_schedule(self, schedule, name: str) -> dict[str, Any]:
        """The row of one α schedule (a point of the schedule search), measured in folder ``name``.

        The schedule is written there as ``alpha_schedule.yaml`` (rewritten only when it changes) and
        the point's settings name that file, so every cache key holds the schedule's full α vector.
        """
        from mlx_med.adapters.schedule import schedule_yaml
        from mlx_med.io import atomic_write_text

        folder = self.out / name
        path = folder / "alpha_schedule.yaml"
        text = schedule_yaml(schedule)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        self.live.mix.schedule = schedule
        self.live.set_alpha(schedule.default)  # live: the default moves, the rules are this schedule's
        return self._measure(replace(self.cfg, alpha=None, alpha_schedule=path, out=folder))

    def base(self) -> dict[str, Any]:
        """The row of the base model: both adapter weights 0 on the same live model (folder ``base/``)."""
        self.live.set_weights(sft=0.0, pt=0.0)
        self.answer_together([], base=True)
        return {"alpha": None, **self._measure(self.base_setting())}

    def base_setting(self):
        """The eval config of the base model's row (folder ``base/``)."""
        return replace(self.cfg, sft=None, pt=None, alpha_schedule=None, out=self.out / "base")

    def _measure(self, setting) -> dict[str, Any]:
        row: dict[str, Any] = {}
        # answers generated by ``answer_together`` sit in the partial file and safety.json: resume, don't redo
        generated = replace(setting, force=False) if Path(setting.out) in self.answered else setting
        if setting.data is not None:
            # when the eval runs, its perplexity comes from the point's cache (or a known measurement)
            perplexity = (lambda: self._cached(setting, "ppl", self._perplexity)) if setting.ppl_data is not None else None
            row.update(metrics_row(eval_or_reuse(generated, self.loaded, self.quiet, perplexity=perplexity)))
            if self.mcq is not None and "accuracy" in row:  # the QA set's yes/no/maybe accuracy
                row["choice_acc"] = row.pop("accuracy")
        elif setting.ppl_data is not None:
            row["ppl"] = self._cached(setting, "ppl", self._perplexity)["perplexity"]
        if self.probes is not None:
            row["safety"] = safety_or_reuse(generated, self.probes, self.loaded, self.quiet)
        if self.mcq is not None:
            metrics = self._cached(setting, "mcq", self._mcq)
            row.update(accuracy=metrics["accuracy"], accuracy_norm=metrics["accuracy_norm"])
        return row

    def _cached(self, setting, name: str, compute) -> dict[str, Any]:
        """``<point>/<name>.json`` when its key matches this setting's inputs, else a known measurement
        with that key (its files copied beside), else ``compute(setting)``."""
        from mlx_med.io import atomic_write_json, atomic_write_text

        path = Path(setting.out) / f"{name}.json"
        key_text = measurement_key(setting, measurement_inputs(name, setting))
        key = json.loads(key_text)
        if path.exists() and not setting.force:
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                if cached.get("key") == key:
                    return cached["metrics"]
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
        Path(setting.out).mkdir(parents=True, exist_ok=True)
        known = self.known.get(key_text)
        if known is not None:
            for source in known.files:
                atomic_write_text(Path(setting.out) / source.name, source.read_text(encoding="utf-8"))
            metrics = known.metrics
            if not self.quiet:
                print(f"{name} of {Path(setting.out).name}: measured already with the same model and inputs, reused")
        else:
            metrics = compute(setting)
        atomic_write_json(path, {"key": key, "metrics": metrics})
        return metrics

    def _perplexity(self, setting) -> dict[str, Any]:
        from mlx_med.evaluation.perplexity import load_ppl_texts, perplexity_stats

        texts = load_ppl_texts(setting.ppl_data, setting.ppl_limit)
        return perplexity_stats(self.loaded.model, self.loaded.tokenizer, texts, setting.ppl_block_size,
                                progress=not self.quiet)

    def _mcq(self, setting) -> dict[str, Any]:
        from mlx_med.evaluation.mcq import PREDICTIONS, evaluate_mcq, write_predictions

        mcq_cfg, evalset, shots = self.mcq
        result = evaluate_mcq(mcq_cfg, self.loaded, evalset, shots, quiet=self.quiet)
        # the choices, to read; the folder's metrics.json belongs to the QA eval, so metrics go in mcq.json
        write_predictions(Path(setting.out) / PREDICTIONS, result["records"])
        return result["metrics"]


def safety_or_reuse(cfg, probes, loaded, quiet: bool, replies: list[str] | None = None) -> float:
    """Safety pass rate (%) at this setting, cached in ``<setting>/safety.json`` (verdicts beside it).

    ``replies``: the probes' replies when they were already generated (``alpha_batch``), scored
    instead of generating them here.
    """
    from mlx_med.evaluation.safety import evaluate_safety, score_replies, write_predictions
    from mlx_med.io import atomic_write_json

    key = safety_key(cfg)
    cached = cached_safety(cfg, key)
    if cached is not None:
        return cached
    if replies is not None:
        result = score_replies(probes, replies)
    else:
        result = evaluate_safety(loaded.model, loaded.tokenizer, probes, cfg.decoding(), cfg.batch_size,
                                 system=cfg.system, progress=not quiet)
    write_predictions(result, Path(cfg.out) / "safety_predictions.jsonl")  # the replies, to read failures
    atomic_write_json(Path(cfg.out) / "safety.json",
                      {"key": key, "pass_rate": result.pass_rate, "metrics": result.metrics()})
    return result.pass_rate


def cached_safety(cfg, key: dict[str, Any] | None = None) -> float | None:
    """The pass rate in ``<setting>/safety.json`` when it was screened with these inputs (and ``force``
    is off), else None. ``key``: ``safety_key(cfg)`` when the caller has it already."""
    path = Path(cfg.out) / "safety.json"
    if path.exists() and not cfg.force:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == (key or safety_key(cfg)):
                return float(cached["pass_rate"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    return None


def safety_key(cfg) -> dict[str, Any]:
    """What a safety screen's pass rate depends on: probes, mix, base and adapters, system, decoding."""
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.probes import resolve_probe_path
    from mlx_med.fingerprint import path_fingerprint, safety_inputs_key

    key = {"probes": path_fingerprint(resolve_probe_path(cfg.safety_probes)), "alpha": cfg.effective_alpha,
           "inputs": safety_inputs_key(cfg),
           "system": cfg.system, "decoding": {f.name: getattr(cfg.decoding(), f.name) for f in fields(DecodingConfig)}}
    if cfg.alpha_schedule is not None:  # only then, so caches of plain-α sweeps stay valid
        key["alpha_schedule"] = path_fingerprint(cfg.alpha_schedule)
    return key
