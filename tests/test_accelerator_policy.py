"""The accelerator code path (what Apple GPUs and CUDA run: quantized base kept, bf16 compute), on CPU.

``--compute-policy accelerator`` forces it here, so every test run trains on a quantized base (QLoRA):
convert --q-bits 4 → PT → SFT → fuse → HF export → eval, with the fp32 path's invariants at bf16
tolerances: validation loss falls, fused = base + ΔW, exported logits match transformers.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_med.adapters.mix import load_pair
from mlx_med.backend import dequantized_weight, detect_backend
from mlx_med.cli import cli
from mlx_med.models import load_model

TEXT = "Diabetes mellitus requires regular monitoring of blood glucose and a careful diet. "
CHATS = [
    [{"role": "user", "content": "Is aspirin used after a stroke?"},
     {"role": "assistant", "content": "Yes, for secondary prevention."}],
    [{"role": "user", "content": "Fever and cough for three days?"},
     {"role": "assistant", "content": "See a doctor if breathing becomes difficult."}],
] * 4
# bf16 keeps 8 significant bits: a stored weight is off by up to 2^-9 of its size (2^-8 leaves room for
# the dequantized base being rounded too). Logits computed in bf16 through two blocks and the head: within
# 2^-4 of the logit scale of transformers' fp32 logits on the same exported weights (0.07 of 2.2 measured
# here). The same fused model computed in fp32 is within 2^-7 (0.008 measured): what is left is the export
# rounding the layers still quantized (embedding, head) to bf16, so the rest is the bf16 compute.
BF16_WEIGHT_RTOL = 2.0**-8
BF16_LOGIT_RTOL = 2.0**-4
EXPORT_LOGIT_RTOL = 2.0**-7


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--compute-policy", "accelerator"] if args[0] in
                                {"train", "eval"} else list(args))
    assert result.exit_code == 0, result.output
    return result.output


def dense(layer) -> np.ndarray:
    return np.array(dequantized_weight(layer))  # the project's one dequantization rule (fp32 math)


@pytest.mark.slow
def test_qlora_end_to_end_on_the_accelerator_path(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MED_COMPUTE_POLICY", "accelerator")  # restored after the test
    backend = detect_backend()
    assert backend.quantized_compute and backend.compute_dtype == mx.bfloat16 and backend.policy == "accelerator"

    base = tmp_path / "base"
    invoke("convert", "--hf-path", str(tiny_llama), "-o", str(base), "--q-bits", "4", "--q-group-size", "32",
           "--dtype", "bfloat16", "--quiet")
    loaded = load_model(base)
    assert isinstance(dict(loaded.model.named_modules())["model.layers.0.self_attn.q_proj"], nn.QuantizedLinear)
    assert loaded.model.model.norm.weight.dtype == mx.bfloat16  # computed in bf16, not dequantized to fp32

    pt_data, sft_data = tmp_path / "pt.jsonl", tmp_path / "sft.jsonl"
    pt_data.write_text("".join(json.dumps({"text": TEXT * (2 + i % 3)}) + "\n" for i in range(12)))
    sft_data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"log_every: 1\neval:\n  every: 6\ndata:\n  cache_dir: {tmp_path / 'cache'}\n  val_ratio: 0.25\n")
    common = ["--model", str(base), "--iters", "6", "--batch-size", "2", "--lora-rank", "4",
              "--learning-rate", "1e-2", "-c", str(recipe), "--quiet"]
    invoke("train", "--phase", "pt", "--data", str(pt_data), "-o", str(tmp_path / "pt"), "--max-seq-len", "32",
           *common)
    invoke("train", "--phase", "sft", "--data", str(sft_data), "-o", str(tmp_path / "sft"), "--max-seq-len", "64",
           *common)
    for phase in ("pt", "sft"):
        run = tmp_path / phase
        assert "compute bfloat16, quantized weights kept quantized (policy accelerator)" in (run / "run.yaml").read_text()
        done = json.loads((run / "done.json").read_text())
        last_val = [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                    if "val_loss" in x][-1]
        assert last_val < done["initial_val_loss"], (phase, done["initial_val_loss"], last_val)

    fused, hf = tmp_path / "fused", tmp_path / "hf"
    invoke("fuse", "--model", str(base), "--sft", str(tmp_path / "sft"), "--pt", str(tmp_path / "pt"),
           "--alpha", "0.5", "-o", str(fused), "--export-hf", str(hf))
    base_layers = dict(load_model(base, compute=False).model.named_modules())
    fused_layers = dict(load_model(fused, compute=False).model.named_modules())
    adapters = load_pair(tmp_path / "sft", tmp_path / "pt")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        want = dense(base_layers[module]) + 0.5 * np.array(adapters["sft"].delta(module)) \
            + 0.5 * np.array(adapters["pt"].delta(module))
        got = dense(fused_layers[module])
        assert fused_layers[module].weight.dtype == mx.bfloat16
        np.testing.assert_allclose(got, want, rtol=0, atol=BF16_WEIGHT_RTOL * np.abs(want).max())
        # the adapters moved the weights by more than the tolerance, so the check above has teeth
        assert np.abs(got - dense(base_layers[module])).max() > 2 * BF16_WEIGHT_RTOL * np.abs(want).max()

    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    tokens = [[5, 17, 42, 99, 3, 64, 8]]
    ours = np.array(load_model(fused).model(mx.array(tokens)).astype(mx.float32))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() <= BF16_LOGIT_RTOL * np.abs(theirs).max(), np.abs(ours - theirs).max()
    fp32 = np.array(load_model(fused, backend=detect_backend("fp32")).model(mx.array(tokens)))
    np.testing.assert_allclose(fp32, theirs, rtol=0, atol=EXPORT_LOGIT_RTOL * np.abs(theirs).max())

    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("".join(json.dumps({"prompt": c[0]["content"], "response": c[1]["content"]}) + "\n"
                                 for c in CHATS[:2]))
    invoke("eval", "--model", str(fused), "--data", str(eval_data), "-o", str(tmp_path / "eval"),
           "--max-new-tokens", "8", "--quiet")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics and len((tmp_path / "eval" / "generated_predictions.jsonl").read_text().splitlines()) == 2
