"""Run a chain of stages, skipping those whose output is complete and whose inputs are unchanged.

Each stage declares its inputs as JSON-able data (config values, paths, upstream stage keys) and the
files that prove it finished. Its *key* is a hash of those inputs; a stage is skipped when the key
recorded in ``state.json`` matches and every declared output exists. Because a stage's inputs include
its upstream stages' keys, a changed upstream re-runs everything downstream of it. State is written
atomically after each stage, so Ctrl-C loses at most the stage in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_med.fingerprint import cache_key
from mlx_med.io import atomic_write_json


@dataclass
class Stage:
    name: str
    run: Callable[[], Any]
    inputs: dict[str, Any]
    outputs: list[Path]
    after: list[str] = field(default_factory=list)  # upstream stage names whose keys feed this one


@dataclass
class StageOutcome:
    name: str
    key: str
    skipped: bool
    seconds: float


class StageRunner:
    """Runs stages in order, recording completion in ``<state_dir>/state.json``."""

    def __init__(self, state_dir: str | Path, echo: Callable[[str], None] = print,
                 compute: dict[str, Any] | None = None):
        """``compute``: the compute path (``Backend.compute_path``) every stage's key includes, so a
        stage computed on another device or in other arithmetic runs again."""
        self.state_path = Path(state_dir) / "state.json"
        self.echo = echo
        self.compute = compute
        self.state: dict[str, dict[str, Any]] = (
            json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        )

    def key(self, stage: Stage, keys: dict[str, str]) -> str:
        upstream = {name: keys[name] for name in stage.after}
        if self.compute is None:
            return cache_key(inputs=stage.inputs, upstream=upstream)  # includes the mlx-med version
        return cache_key(inputs=stage.inputs, upstream=upstream, compute=self.compute)

    def is_complete(self, stage: Stage, key: str) -> bool:
        recorded = self.state.get(stage.name, {})
        return recorded.get("key") == key and all(Path(p).exists() for p in stage.outputs)

    def run(self, stages: list[Stage]) -> list[StageOutcome]:
        keys: dict[str, str] = {}
        outcomes = []
        total = len(stages)
        for index, stage in enumerate(stages, start=1):
            key = self.key(stage, keys)
            keys[stage.name] = key
            header = f"[{index}/{total}] {stage.name}"
            if self.is_complete(stage, key):
                self.echo(f"{header}: up to date, skipped")
                outcomes.append(StageOutcome(stage.name, key, True, 0.0))
                continue
            self.echo(f"{header} ...")
            start = time.perf_counter()
            stage.run()
            seconds = time.perf_counter() - start
            missing = [str(p) for p in stage.outputs if not Path(p).exists()]
            if missing:
                raise RuntimeError(f"stage {stage.name} finished without writing {', '.join(missing)}")
            self.state[stage.name] = {"key": key, "seconds": round(seconds, 2), "finished": time.time()}
            atomic_write_json(self.state_path, self.state)
            self.echo(f"{header}: done in {seconds:.1f}s")
            outcomes.append(StageOutcome(stage.name, key, False, seconds))
        return outcomes
