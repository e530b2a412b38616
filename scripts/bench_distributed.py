"""Data-parallel training throughput: 1 process vs 2 local ranks under ``mlx.launch`` (ring, loopback).

Both runs train the same PT recipe with the same global batch: 1 process × batch 2B (OpenBLAS may
use every core) against 2 ranks × batch B (one BLAS thread each, so together they use the same
cores). Tokens/s is the global rate logged by rank 0. On one small machine this measures the
overhead of the ring all-reduce and of splitting the same cores, not a speed-up; across machines
each rank brings its own cores and the gain approaches the number of machines when the step is
long compared to the all-reduce of the LoRA gradients (a few MB).

Prints both figures and, last, ``ratio: <2-rank tokens/s ÷ 1-process tokens/s>``.

    python scripts/bench_distributed.py                  # SmolLM2-135M from the bundled GGUF
    python scripts/bench_distributed.py --model DIR --steps 10 --batch-size 2 --max-seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench_train import default_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(cmd_prefix: list[str], env: dict, model: Path, a, out: Path, batch: int) -> list[dict]:
    args = ["-m", "mlx_med.cli", "train", "--phase", "pt", "--model", str(model), "--data", a.data, "-o", str(out),
            "--iters", str(a.steps), "--batch-size", str(batch), "--max-seq-len", str(a.max_seq_len),
            "-c", str(out.parent / "bench.yaml"), "--force", "--json-log"]
    proc = subprocess.run([*cmd_prefix, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        sys.exit(f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steady(records: list[dict]) -> float:
    """Global tokens/s over every logged window but the first (warm-up)."""
    return (records[-1]["tokens"] - records[0]["tokens"]) / (records[-1]["elapsed_s"] - records[0]["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="MLX model folder [default: SmolLM2-135M from the GGUF]")
    parser.add_argument("--data", default="data/demo/pt_*.jsonl")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1, help="Per rank; the single process gets 2x.")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--workdir", type=Path)
    a = parser.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_distributed."))
    work.mkdir(parents=True, exist_ok=True)
    model = a.model or default_model(work)
    (work / "bench.yaml").write_text(f"log_every: 2\ndata:\n  val_ratio: 0.0\n  cache_dir: {work / 'cache'}\n"
                                     "checkpoint:\n  every: 0\n")
    cores = os.cpu_count() or 1
    single = train([sys.executable], {**os.environ, "OPENBLAS_NUM_THREADS": str(cores)}, model, a,
                   work / "one", 2 * a.batch_size)
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    ranks = train([launcher, "-n", "2", "--backend", "ring", "--starting-port", str(free_port()),
                   "--python", sys.executable, "--"],
                  {**os.environ, "OPENBLAS_NUM_THREADS": str(max(1, cores // 2))}, model, a, work / "two",
                  a.batch_size)
    one_tps, two_tps = steady(single), steady(ranks)
    same = abs(single[-1]["train_loss"] - ranks[-1]["train_loss"]) / abs(single[-1]["train_loss"])
    print(f"model {model}, PT, global batch {2 * a.batch_size} x {a.max_seq_len}, {a.steps} steps, {cores} cores")
    print(f"1 process  (batch {2 * a.batch_size}, {cores} BLAS threads): {one_tps:8.1f} tok/s  "
          f"final loss {single[-1]['train_loss']:.4f}")
    print(f"2 ranks    (batch {a.batch_size} each, ring on loopback): {two_tps:8.1f} tok/s  "
          f"final loss {ranks[-1]['train_loss']:.4f}  (relative loss difference {same:.1e})")
    print(f"ratio: {two_tps / one_tps:.2f}")


if __name__ == "__main__":
    main()
