"""One process of a distributed training test: ``mlx.launch -n 2 ... distributed_worker.py WATCH REPORTS CONFIG...``.

Trains with ``run_training`` on each config in turn, then writes ``REPORTS/writes-<rank>.json``: every file it created,
replaced or opened for writing under WATCH (Python audit events, plus MLX's native savers). A file rather than
stdout, because the launcher does not always forward a process's last lines before it exits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

WRITE_EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree", "os.unlink"}


def main() -> None:
    import mlx.core as mx

    from mlx_med.config import load_config
    from mlx_med.train.config import TrainConfig
    from mlx_med.train.trainer import run_training

    watch, reports = str(Path(sys.argv[1]).resolve()), Path(sys.argv[2])
    configs = [Path(p) for p in sys.argv[3:]]
    writes: list[str] = []

    def note(path) -> None:
        text = str(Path(str(path)).resolve()) if isinstance(path, (str, Path)) else ""
        if text.startswith(watch):
            writes.append(text)

    def audit(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, Path)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags and flags & 0o3):
                note(args[0])
        elif event in WRITE_EVENTS and args:
            note(args[0])

    for name in ("save_safetensors", "savez", "save"):
        native = getattr(mx, name)

        def wrapped(path, *args, _native=native, **kwargs):
            note(path)
            return _native(path, *args, **kwargs)

        setattr(mx, name, wrapped)
    sys.addaudithook(audit)
    for config in configs:
        run_training(load_config(TrainConfig, config), quiet=True)
    rank = mx.distributed.init().rank()
    (reports / f"writes-{rank}.json").write_text(json.dumps(sorted(set(writes))))


if __name__ == "__main__":
    main()
