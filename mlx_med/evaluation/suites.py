"""One entry point for every eval suite: ``run_suite(name, cfg)``.

| suite | config | writes |
|---|---|---|
| ``qa`` | ``runner.EvalConfig`` (+ perplexity with ``ppl_data``) | ``generated_predictions.jsonl``, ``metrics.json`` |
| ``safety`` | ``safety.SafetyEvalConfig`` | ``safety_predictions.jsonl``, ``metrics.json``, ``report.md`` |
| ``mcq`` | ``mcq.McqEvalConfig`` | ``mcq_predictions.jsonl``, ``metrics.json`` |

Every config extends ``run_config.RunConfig`` (model, adapters, α, data, out), so a new suite is a
config class, a ``run_*`` function and one line in ``SUITES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlx_med.errors import UserError
from mlx_med.evaluation.run_config import RunConfig


def _qa(cfg, quiet: bool, loaded) -> dict[str, Any]:
    from mlx_med.evaluation.runner import run_eval

    return run_eval(cfg, quiet=quiet, loaded=loaded)


def _safety(cfg, quiet: bool, loaded) -> dict[str, Any]:
    from dataclasses import replace

    from mlx_med.evaluation.safety import run_safety_eval

    if loaded is not None:
        raise UserError("the safety suite loads its own model")
    return run_safety_eval(replace(cfg, progress=cfg.progress and not quiet),
                           echo=(lambda s: None) if quiet else None)


def _mcq(cfg, quiet: bool, loaded) -> dict[str, Any]:
    from mlx_med.evaluation.mcq import run_mcq_eval

    return run_mcq_eval(cfg, quiet=quiet, loaded=loaded)


def suite_config(name: str) -> type[RunConfig]:
    """The config class of suite ``name``."""
    if name == "qa":
        from mlx_med.evaluation.runner import EvalConfig

        return EvalConfig
    if name == "safety":
        from mlx_med.evaluation.safety import SafetyEvalConfig

        return SafetyEvalConfig
    if name == "mcq":
        from mlx_med.evaluation.mcq import McqEvalConfig

        return McqEvalConfig
    raise UserError(f"unknown eval suite {name!r} (choose from {', '.join(SUITES)})")


SUITES: dict[str, Callable[[Any, bool, Any], dict[str, Any]]] = {"qa": _qa, "safety": _safety, "mcq": _mcq}


def run_suite(name: str, cfg: RunConfig, quiet: bool = False, loaded=None) -> dict[str, Any]:
    """Run suite ``name`` with ``cfg`` (an instance of ``suite_config(name)``); return its metrics.

    Args:
        name: ``qa``, ``safety`` or ``mcq``.
        cfg: the suite's settings.
        quiet: no progress bars and no printed tables.
        loaded: an already loaded model to reuse (qa, mcq); None loads ``cfg.model`` with its adapters.
    """
    if not isinstance(cfg, suite_config(name)):
        raise UserError(f"suite {name!r} needs a {suite_config(name).__name__}, got {type(cfg).__name__}")
    return SUITES[name](cfg, quiet, loaded)
