"""Time the README's first command end to end: ``bash scripts/demo.sh`` on the embedded demo model.

Runs the demo into a fresh output folder (so no stage is skipped), then prints the wall time of each
pipeline stage (from the pipeline's own state file), the total, and the training figures a user sees
in the report. With ``--repeats N`` the demo runs N times, one after the other, and the table has a
column per run and the median (a shared 2-core box drifts by up to 10% per stage between runs). The
demo's budget on a 2-core Linux CPU is 15 minutes; the last line is ``ratio: <median wall / budget>``
(below 1 is within budget).

    python scripts/bench_demo.py                 # fresh run into a temporary folder
    python scripts/bench_demo.py --out runs/demo-bench --keep
    python scripts/bench_demo.py --repeats 2     # two runs, per-stage median
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 15 * 60


def run_demo(out: Path) -> tuple[float, dict[str, float]]:
    """One demo run into ``out`` (replaced; checked by ``main``): its wall time and each stage's seconds."""
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "-o", str(out), "-q"], cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"demo.sh failed with exit code {proc.returncode}")
    state = json.loads((out / ".pipeline" / "state.json").read_text())
    return wall, {name: entry["seconds"] for name, entry in state.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one); with --repeats, "
                                                  "runs go to OUT-1, OUT-2, ...")
    parser.add_argument("--keep", action="store_true", help="keep the output folder(s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs, one after the other (default 1)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    base = args.out or Path(tempfile.mkdtemp(prefix="mlx-med-demo-")) / "demo"
    outs = [base] if args.repeats == 1 else [base.with_name(f"{base.name}-{i + 1}") for i in range(args.repeats)]
    from mlx_med.io import is_mlx_med_dir

    for out in outs:  # each run starts from an empty folder: replace only what mlx-med wrote
        if out.exists() and not is_mlx_med_dir(out):
            sys.exit(f"{out} exists and is not an mlx-med output folder; choose another --out")

    runs = [run_demo(out) for out in outs]
    walls = [wall for wall, _ in runs]
    names = list(runs[0][1])
    columns = [f"run {i + 1}" for i in range(len(runs))] + (["median"] if len(runs) > 1 else [])

    def row(label: str, values: list[float]) -> str:
        cells = values + ([statistics.median(values)] if len(values) > 1 else [])
        return f"{label:<14} " + " ".join(f"{v:>8.1f}" for v in cells)

    print(f"\n{'stage':<14} " + " ".join(f"{c:>8}" for c in columns))
    for name in names:
        print(row(name, [stages.get(name, 0.0) for _, stages in runs]))
    staged = [sum(stages.values()) for _, stages in runs]
    print(row("(stages)", staged))
    print(row("(setup etc.)", [w - s for w, s in zip(walls, staged)]))
    for out in outs:
        for phase in ("pt", "sft"):
            done = json.loads((out / phase / "done.json").read_text())
            print(f"{out.name} {phase}: val loss {done['initial_val_loss']:.3f} -> {done['final_val_loss']:.3f}, "
                  f"{done['tokens_seen']} tokens in {done['train_seconds']:.0f} s")
        print(f"report: {out / 'report.md'}")
    wall = statistics.median(walls)
    each = ", ".join(f"{w:.0f}" for w in walls)
    print(f"demo wall time: {wall:.0f} s ({wall / 60:.1f} min; runs: {each} s), budget {BUDGET_S} s")
    if args.out is None and not args.keep:
        shutil.rmtree(base.parent, ignore_errors=True)
    print(f"ratio: {wall / BUDGET_S:.3f}")


if __name__ == "__main__":
    main()
