"""Time the README's first command end to end: ``bash scripts/demo.sh`` on the embedded demo model.

Runs the demo into a fresh output folder (so no stage is skipped), then prints the wall time of each
pipeline stage (from the pipeline's own state file), the total, and the training figures a user sees
in the report. The demo's budget on a 2-core Linux CPU is 15 minutes; the last line is
``ratio: <wall / budget>`` (below 1 is within budget).

    python scripts/bench_demo.py                 # fresh run into a temporary folder
    python scripts/bench_demo.py --out runs/demo-bench --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mlx-med-demo-")) / "demo"
    if out.exists():
        shutil.rmtree(out)

    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "-o", str(out), "-q"], cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"demo.sh failed with exit code {proc.returncode}")

    state = json.loads((out / ".pipeline" / "state.json").read_text())
    print(f"\n{'stage':<14} {'seconds':>8}")
    for name, entry in state.items():
        print(f"{name:<14} {entry['seconds']:>8.1f}")
    staged = sum(entry["seconds"] for entry in state.values())
    print(f"{'(stages)':<14} {staged:>8.1f}")
    print(f"{'(setup etc.)':<14} {wall - staged:>8.1f}")
    for phase in ("pt", "sft"):
        done = json.loads((out / phase / "done.json").read_text())
        print(f"{phase}: val loss {done['initial_val_loss']:.3f} -> {done['final_val_loss']:.3f}, "
              f"{done['tokens_seen']} tokens in {done['train_seconds']:.0f} s")
    print(f"report: {out / 'report.md'}")
    print(f"demo wall time: {wall:.0f} s ({wall / 60:.1f} min), budget {BUDGET_S} s")
    if args.out is None and not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    print(f"ratio: {wall / BUDGET_S:.3f}")


if __name__ == "__main__":
    main()
