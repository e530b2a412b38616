"""SVD merge of two LoRA adapters: mlx-med vs peft's add_weighted_adapter(combination_type="svd").

Both truncate w_sft·ΔW_sft + w_pt·ΔW_pt to rank r on every adapted layer of a SmolLM2-135M-shaped
model (hidden 576, MLP 1536, 9 heads / 3 KV heads; --layers decoder blocks, all 7 linear modules).
peft forms the dense ΔW and runs a full SVD per module; mlx-med works on the low-rank factors (QR of
each side, SVD of a (r₁+r₂)² core). The script checks both give the same truncated ΔW, prints both
throughputs (modules/s) and ends with ``ratio: <ours ÷ peft>``.

    python scripts/bench_merge.py [--layers 2] [--rank 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mlx_med  # noqa: F401  (BLAS preload before mlx, which is imported inside main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks (SmolLM2 has 30)")
    parser.add_argument("--rank", type=int, default=8, help="rank of each adapter and of the result")
    args = parser.parse_args()

    import mlx.core as mx
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlx_med.adapters.format import Adapter, AdapterMeta
    from mlx_med.adapters.merge import merge_adapters, to_numpy
    from mlx_med.adapters.mix import pair_weights

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=256)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora, adapter_name="sft")
    model.add_adapter("pt", lora)
    for p in model.parameters():  # peft's non-default init gives B ≠ 0 for the second adapter too
        p.requires_grad_(False)

    adapters = {}
    for name in ("sft", "pt"):
        weights = {}
        for path, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                weights[f"{path}.lora_a"] = mx.array(module.lora_A[name].weight.numpy().T.copy())
                weights[f"{path}.lora_b"] = mx.array(module.lora_B[name].weight.numpy().T.copy())
        adapters[name] = Adapter(rank=args.rank, scale=2.0, num_layers=args.layers, keys=targets,
                                 weights=weights, meta=AdapterMeta(phase=name))
    n_modules = len(adapters["sft"].modules())

    start = time.perf_counter()
    model.add_weighted_adapter(["sft", "pt"], [0.5, 0.5], "mix", combination_type="svd", svd_rank=args.rank)
    peft_seconds = time.perf_counter() - start

    start = time.perf_counter()
    ours = merge_adapters(adapters, pair_weights(0.5), "svd", rank=args.rank).adapter
    our_seconds = time.perf_counter() - start

    # Same truncated ΔW (up to the sign/rotation freedom of the factors, which ΔW does not see).
    path = "model.layers.0.mlp.down_proj"
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    theirs = layer.get_delta_weight("mix").detach().numpy()
    mine = to_numpy(ours.delta(path))
    diff = np.linalg.norm(mine - theirs) / np.linalg.norm(theirs)
    print(f"{n_modules} modules, rank {args.rank}: relative difference of the truncated ΔW (mlx-med vs peft) "
          f"on {path}: {diff:.2e}")
    peer, ours_rate = n_modules / peft_seconds, n_modules / our_seconds
    print(f"peft add_weighted_adapter(svd): {peft_seconds:.2f} s, {peer:.1f} modules/s")
    print(f"mlx-med merge --method svd:     {our_seconds:.2f} s, {ours_rate:.1f} modules/s")
    print(f"ratio: {ours_rate / peer:.2f}")


if __name__ == "__main__":
    main()
