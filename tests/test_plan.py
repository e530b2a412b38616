import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_med.cli import cli
from mlx_med.errors import ConfigError, UserError
from mlx_med.train.plan import (
    GB,
    PlanSettings,
    estimate,
    fit_table,
    format_plan,
    read_model_shape,
    shape_from_config,
    usable_fraction,
)

REPO = Path(__file__).resolve().parents[1]
QWEN_14B = REPO / "configs" / "models" / "qwen2.5-14b.json"
SMOLLM2 = REPO / "configs" / "models" / "smollm2-135m.json"

# Small enough to count by hand: per block q 64x64, k/v 64x32, o 64x64, gate/up 64x128, down 128x64.
SMALL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
         "tie_word_embeddings": False}
BLOCK_WEIGHTS = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # 36864
PARAMS = 2 * (BLOCK_WEIGHTS + 2 * 64) + 2 * 256 * 64 + 64  # blocks + norms, embed + lm_head, final norm


def small_shape(**changes):
    return shape_from_config({**SMALL, **changes}, "small.json")


def test_parameter_count_and_cpu_weights_are_fp32():
    shape = small_shape()
    assert shape.parameter_count() == PARAMS == 106816
    plan = estimate(shape, PlanSettings(), "cpu")
    assert plan.part("base weights").bytes == 4 * PARAMS
    assert plan.compute_dtype == "float32"
    # A stored 4-bit model is still dequantized to fp32 on the CPU backend.
    quantized = small_shape(quantization={"bits": 4, "group_size": 64})
    assert estimate(quantized, PlanSettings(), "cpu").part("base weights").bytes == 4 * PARAMS


def test_gpu_weights_quantized_by_hand():
    # 4-bit, group 64: half a byte per weight + (fp16 scale + fp16 bias) per 64 weights along `in`.
    def q4(rows, cols):
        return rows * cols // 2 + rows * (cols // 64) * 4

    linears = 2 * (q4(64, 64) + 2 * q4(32, 64) + q4(64, 64) + 2 * q4(128, 64))
    # down_proj has in = 128: two groups per row.
    linears += 2 * q4(64, 128)
    embed_and_head = 2 * q4(256, 64)
    norms = (2 * 2 * 64 + 64) * 2  # bf16
    expected = linears + embed_and_head + norms
    plan = estimate(small_shape(), PlanSettings(q_bits=4, q_group_size=64), "gpu")
    assert plan.part("base weights").bytes == expected
    assert plan.compute_dtype == "bfloat16"
    # Not quantized on the GPU: bf16, 2 bytes per parameter.
    assert estimate(small_shape(), PlanSettings(q_bits=0), "gpu").part("base weights").bytes == 2 * PARAMS


def test_stored_quantization_block_with_per_module_override():
    # mlx-med convert --gguf writes Q4_1 as 4-bit group 32 with an 8-bit embedding override.
    quant = {"group_size": 32, "bits": 4, "mode": "affine",
             "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}
    shape = small_shape(tie_word_embeddings=True, quantization=quant)
    assert (shape.stored_bits, shape.stored_group_size) == (4, 32)
    got = estimate(shape, PlanSettings(), "gpu").part("base weights").bytes
    uniform = estimate(shape, PlanSettings(q_bits=4, q_group_size=32), "gpu").part("base weights").bytes
    # The embedding (256 x 64) costs 1 byte instead of 0.5 per weight; scales are the same.
    assert got - uniform == 256 * 64 // 2


def test_qwen_14b_config_numbers_and_lora_count():
    shape = read_model_shape(QWEN_14B)
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers) == (5120, 13824, 48)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size) == (40, 8, 128, 152064)
    assert not shape.tie_word_embeddings and shape.qkv_bias
    assert round(shape.parameter_count() / 1e9, 2) == 14.77  # Qwen2.5-14B: 14.7B parameters
    plan = estimate(shape, PlanSettings(q_bits=4, lora_rank=16, batch_size=1, max_seq_len=1024), "gpu")
    # rank 16 x 48 blocks x sum(in + out) over q, k, v, o, gate, up, down
    per_block = (5120 + 5120) + 2 * (5120 + 1024) + (5120 + 5120) + 3 * (5120 + 13824)
    assert plan.lora_params == 16 * 48 * per_block == 68_812_800
    assert plan.part("LoRA").bytes == 16 * plan.lora_params  # fp32 params, grads, AdamW m and v
    assert 8.2 < plan.part("base weights").bytes / GB < 8.4  # ~0.56 bytes per parameter


def test_lora_targets_and_layers():
    shape = small_shape()
    full = estimate(shape, PlanSettings(lora_rank=4), "cpu")
    assert full.lora_params == 4 * 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    qv = estimate(shape, PlanSettings(lora_rank=4, target_modules=["q_proj", "self_attn.v_proj"]), "cpu")
    assert qv.lora_params == 4 * 2 * ((64 + 64) + (64 + 32))
    last = estimate(shape, PlanSettings(lora_rank=4, lora_layers=1), "cpu")
    assert last.lora_params * 2 == full.lora_params
    # Blocks below the lowest adapted one keep no activations.
    assert last.activations_off * 2 == full.activations_off
    with pytest.raises(ConfigError, match="no linear layer named"):
        estimate(shape, PlanSettings(target_modules=["lm_head"]), "cpu")
    with pytest.raises(ConfigError, match="lora_layers"):
        estimate(shape, PlanSettings(lora_layers=3), "cpu")


def test_checkpointing_activations_and_logits():
    shape = read_model_shape(SMOLLM2)
    off = estimate(shape, PlanSettings(batch_size=2, max_seq_len=512), "cpu")
    on = estimate(shape, PlanSettings(batch_size=2, max_seq_len=512, grad_checkpoint=True), "cpu")
    assert on.part("activations").bytes < off.part("activations").bytes / 5
    # With checkpointing: each block's input (fp32) plus one block recomputed.
    one_block = off.activations_off / 30
    assert on.activations_on == pytest.approx(30 * 2 * 512 * 576 * 4 + one_block)
    assert off.peak_bytes - on.peak_bytes == pytest.approx(off.activations_off - on.activations_on)
    # Logits: batch x seq x vocab in the compute dtype, four copies.
    assert off.part("logits").bytes == 4 * 2 * 512 * 49152 * 4
    gpu = estimate(shape, PlanSettings(batch_size=2, max_seq_len=512, q_bits=4), "gpu")
    assert gpu.part("logits").bytes == 4 * 2 * 512 * 49152 * 2
    # Activations grow faster than linearly in the sequence length (attention probabilities).
    short = estimate(shape, PlanSettings(batch_size=2, max_seq_len=256), "cpu")
    assert off.activations_off > 2 * short.activations_off


def test_fit_table_thresholds():
    shape = read_model_shape(QWEN_14B)
    plan = estimate(shape, PlanSettings(q_bits=4, batch_size=1, max_seq_len=1024, lora_rank=16,
                                        grad_checkpoint=True), "gpu")
    assert usable_fraction("gpu", 16) == pytest.approx(2 / 3) and usable_fraction("gpu", 64) == 0.75
    table = {size: (usable, verdict) for size, usable, verdict in fit_table(plan)}
    assert list(table) == [16, 24, 32, 64]
    for size, (usable, verdict) in table.items():
        expected = "fits" if plan.peak_gb <= 0.9 * usable else "tight" if plan.peak_gb <= usable else "no"
        assert verdict == expected, size
    assert table[64] == (48.0, "fits") and table[64][0] > plan.peak_gb
    assert table[16][0] < plan.peak_gb  # a checkpointed 14B QLoRA step does not fit a 16 GB Mac


def test_cli_contract_line(tmp_path):
    args = ["plan", "--model", str(QWEN_14B), "--q-bits", "4", "--max-seq-len", "1024", "--batch-size", "1",
            "--lora-rank", "16", "--backend", "gpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    peaks = re.findall(r"^peak: ([0-9.]+) GB$", result.output, flags=re.M)
    assert len(peaks) == 1
    plan = estimate(read_model_shape(QWEN_14B),
                    PlanSettings(q_bits=4, max_seq_len=1024, batch_size=1, lora_rank=16), "gpu")
    assert float(peaks[0]) == pytest.approx(plan.peak_gb, abs=0.006)
    for word in ("base weights", "LoRA", "activations", "logits", "16 GB", "64 GB", "QLoRA"):
        assert word in result.output
    as_json = json.loads(CliRunner().invoke(cli, args + ["--json"]).output)
    assert as_json["peak_gb"] == pytest.approx(plan.peak_gb, abs=1e-4)
    assert set(as_json["fits"]) == {"16GB", "24GB", "32GB", "64GB"}


def test_cli_reads_a_model_folder_and_auto_backend(tiny_qwen2):
    result = CliRunner().invoke(cli, ["plan", "--model", str(tiny_qwen2), "--max-seq-len", "64"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^peak: [0-9.]+ GB$", result.output, flags=re.M)
    assert "backend: cpu" in result.output  # this machine has no Metal/CUDA


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({k: v for k, v in SMALL.items() if k != "hidden_size"}))
    for path, message in [(empty, "no config.json"), (tmp_path / "missing", "not found"),
                          (bad, "not valid JSON"), (partial, "missing 'hidden_size'")]:
        result = CliRunner().invoke(cli, ["plan", "--model", str(path), "--backend", "cpu"])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert str(path.name) in result.output
    result = CliRunner().invoke(cli, ["plan", "--model", str(SMOLLM2), "--batch-size", "0", "--backend", "cpu"])
    assert result.exit_code == 2 and "'batch_size' must be at least 1" in result.output
    with pytest.raises(UserError):
        read_model_shape(empty)


def test_recipe_settings_with_flags_on_top(tmp_path):
    pytest.importorskip("mlx_med.train.config")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {SMOLLM2}\nmax_seq_len: 256\ngrad_checkpoint: true\n"
                      "lora:\n  rank: 4\n  num_layers: 10\noptim:\n  batch_size: 2\n")
    result = CliRunner().invoke(cli, ["plan", "-c", str(recipe), "--backend", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    want = estimate(read_model_shape(SMOLLM2), PlanSettings(batch_size=2, max_seq_len=256, lora_rank=4,
                                                            lora_layers=10, grad_checkpoint=True), "cpu")
    assert json.loads(result.output)["peak_gb"] == pytest.approx(want.peak_gb, abs=1e-4)
    flagged = CliRunner().invoke(cli, ["plan", "-c", str(recipe), "--backend", "cpu", "--batch-size", "1",
                                       "--no-grad-checkpoint"])
    assert "batch 1 x seq 256" in flagged.output and "grad checkpointing off" in flagged.output
    missing = tmp_path / "far.yaml"
    missing.write_text("model: /nowhere/qwen2.5-14b-4bit\n")
    result = CliRunner().invoke(cli, ["plan", "-c", str(missing), "--backend", "gpu"])
    assert result.exit_code == 2 and "is not on this machine" in result.output


def test_estimate_is_close_to_a_measured_tiny_step(tiny_llama):
    """One real LoRA step on the tiny fixture: the estimate is within a generous factor of the peak."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_med.models import load_model

    model = load_model(tiny_llama).model  # fp32 on the CPU backend
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 8, "scale": 2.0, "dropout": 0.0})

    def loss_fn(model, inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets).astype(mx.float32).mean()

    step = nn.value_and_grad(model, loss_fn)
    optimizer = optim.AdamW(learning_rate=1e-4)
    tokens = mx.random.randint(0, model.args.vocab_size, (4, 129))
    peaks = []
    for _ in range(2):
        mx.eval(tokens)
        mx.reset_peak_memory()
        loss, grads = step(model, tokens[:, :-1], tokens[:, 1:])
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        peaks.append(mx.get_peak_memory())
    plan = estimate(read_model_shape(tiny_llama), PlanSettings(batch_size=4, max_seq_len=128), "cpu")
    assert 0.67 < plan.peak_bytes / peaks[-1] < 1.5, (plan.peak_bytes, peaks)
    assert "peak:" in format_plan(plan)


def test_shipped_14b_recipe_plans_without_a_model(monkeypatch):
    pytest.importorskip("mlx_med.train.config")
    recipe = REPO / "configs" / "qwen2.5-14b-pt.yaml"
    if not recipe.is_file():
        pytest.skip("14B recipe not present")
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(cli, ["plan", "-c", str(recipe), "--backend", "gpu"])
    assert result.exit_code == 0, result.output
    assert "the recipe names no model; planning qwen2.5-14b.json as a 4-bit base" in result.output
    assert "grad checkpointing on" in result.output
    peak = float(re.search(r"^peak: ([0-9.]+) GB$", result.output, flags=re.M).group(1))
    assert 9 < peak < 16  # 8.3 GB of 4-bit weights + LoRA, checkpointed activations and logits
