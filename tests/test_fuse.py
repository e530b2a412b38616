"""Fusing: fused − base = w_sft·ΔW_sft + w_pt·ΔW_pt on plain and quantized bases; CLI; HF export."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from random_adapters import ALL, ATTN, make_adapter

from mlx_med.adapters.format import write_adapter
from mlx_med.adapters.fuse import fuse_model
from mlx_med.adapters.merge import merge_adapters
from mlx_med.adapters.mix import load_pair, pair_weights
from mlx_med.cli import cli
from mlx_med.errors import UserError
from mlx_med.models import load_model


@pytest.fixture(scope="module")
def quantized_base(tmp_path_factory, tiny_llama):
    """The tiny llama quantized to 4 bits (group 32) and saved as an MLX folder."""
    from mlx_lm.utils import load, quantize_model, save

    model, tokenizer, config = load(str(tiny_llama), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    out = tmp_path_factory.mktemp("tiny-llama-q4")
    save(out, tiny_llama, model, tokenizer, config, donate_model=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("fuse-runs")
    make_adapter(tiny_llama, root / "pt", rank=4, lora_alpha=8, keys=ALL, seed=1, phase="pt")
    make_adapter(tiny_llama, root / "sft", rank=2, lora_alpha=16, keys=ATTN, seed=2, phase="sft")
    return root


def weights_of(model_dir) -> dict[str, nn.Module]:
    return dict(load_model(model_dir, compute=False).model.named_modules())


def dense(layer) -> np.ndarray:
    if isinstance(layer, nn.QuantizedLinear):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
        return np.array(w.astype(mx.float32))
    return np.array(layer.weight.astype(mx.float32))


def expected_delta(runs, module, w_sft, w_pt) -> np.ndarray:
    adapters = load_pair(runs / "sft", runs / "pt")
    total = w_pt * np.array(adapters["pt"].delta(module))
    if f"{module}.lora_a" in adapters["sft"].weights:
        total = total + w_sft * np.array(adapters["sft"].delta(module))
    return total


def test_fused_minus_base_is_weighted_delta(runs, tiny_llama, tmp_path):
    report = fuse_model(tiny_llama, tmp_path / "fused", sft=runs / "sft", pt=runs / "pt", alpha=0.3,
                        dtype="float32")
    base, fused = weights_of(tiny_llama), weights_of(tmp_path / "fused")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        got = dense(fused[module]) - dense(base[module])
        np.testing.assert_allclose(got, expected_delta(runs, module, 0.3, 0.7), atol=1e-5)
    np.testing.assert_array_equal(np.array(fused["lm_head"].weight), np.array(base["lm_head"].weight))
    assert len(report.layers) == 14 and (tmp_path / "fused" / "fuse_report.json").is_file()
    saved = json.loads((tmp_path / "fused" / "fuse_report.json").read_text())
    assert saved["weights"] == {"sft": 0.3, "pt": pytest.approx(0.7)}


def test_quantized_base_dequantizes_touched_layers(runs, quantized_base, tmp_path):
    fuse_model(quantized_base, tmp_path / "fused", sft=runs / "sft", pt=runs / "pt", alpha=0.5, dtype="float32")
    base, fused = weights_of(quantized_base), weights_of(tmp_path / "fused")
    module = "model.layers.1.self_attn.v_proj"
    assert isinstance(base[module], nn.QuantizedLinear) and type(fused[module]) is nn.Linear
    np.testing.assert_allclose(dense(fused[module]) - dense(base[module]), expected_delta(runs, module, 0.5, 0.5),
                               atol=1e-5)
    assert isinstance(fused["lm_head"], nn.QuantizedLinear)  # untouched layers stay quantized
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["quantization"][module] is False and config["quantization"]["bits"] == 4


def test_requantize_reports_error(runs, quantized_base, tmp_path):
    report = fuse_model(quantized_base, tmp_path / "fused", sft=runs / "sft", pt=runs / "pt", alpha=0.5,
                        requantize=True)
    fused = weights_of(tmp_path / "fused")
    assert isinstance(fused["model.layers.0.self_attn.q_proj"], nn.QuantizedLinear)
    assert all(r.requantized and r.requant_error > 0 and r.delta_kept is not None for r in report.layers)
    assert any("re-quantized 14 layers" in line for line in report.summary())
    loaded = load_model(tmp_path / "fused")  # loads and runs
    assert loaded.model(mx.array([[1, 2, 3]])).shape[-1] > 0


def test_linear_merge_reproduces_fuse(runs, tiny_llama, tmp_path):
    with pytest.raises(UserError, match="target different modules"):  # sft adapts attention only
        merge_adapters(load_pair(runs / "sft", runs / "pt"), pair_weights(0.6))
    make_adapter(tiny_llama, tmp_path / "sft-all", rank=2, lora_alpha=16, keys=ALL, seed=4, phase="sft")
    merged = merge_adapters(load_pair(tmp_path / "sft-all", runs / "pt"), pair_weights(0.6)).adapter
    write_adapter(merged, tmp_path / "merged")
    fuse_model(tiny_llama, tmp_path / "a", sft=tmp_path / "sft-all", pt=runs / "pt", alpha=0.6, dtype="float32")
    fuse_model(tiny_llama, tmp_path / "b", adapter=tmp_path / "merged", dtype="float32")
    a, b = weights_of(tmp_path / "a"), weights_of(tmp_path / "b")
    for module in merged.modules():
        np.testing.assert_allclose(dense(a[module]), dense(b[module]), atol=1e-6)


def test_dtype_and_refusals(runs, tiny_llama, tmp_path):
    fuse_model(tiny_llama, tmp_path / "bf16", adapter=runs / "pt")
    fused = weights_of(tmp_path / "bf16")
    assert fused["model.layers.0.self_attn.q_proj"].weight.dtype == mx.bfloat16
    assert fused["model.norm"].weight.dtype == mx.bfloat16  # one dtype for the whole model
    with pytest.raises(UserError, match="already exists"):
        fuse_model(tiny_llama, tmp_path / "bf16", adapter=runs / "pt")
    with pytest.raises(UserError, match="is the base model folder itself"):
        fuse_model(tiny_llama, tiny_llama, adapter=runs / "pt", force=True)
    with pytest.raises(UserError, match="--dtype must be one of"):
        fuse_model(tiny_llama, tmp_path / "x", adapter=runs / "pt", dtype="int8")
    with pytest.raises(UserError, match="missing --alpha"):
        fuse_model(tiny_llama, tmp_path / "x", sft=runs / "sft", pt=runs / "pt", alpha=None)


def test_cli_fuse_and_export_hf(runs, tiny_llama, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    out, hf = tmp_path / "fused", tmp_path / "fused-hf"
    result = CliRunner().invoke(cli, ["fuse", "--model", str(tiny_llama), "--sft", str(runs / "sft"), "--pt",
                                      str(runs / "pt"), "--alpha", "0.5", "-o", str(out), "--dtype", "float32",
                                      "--export-hf", str(hf)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and str(hf) in result.output
    tokens = [[5, 17, 42, 99, 3]]
    ours = np.array(load_model(out).model(mx.array(tokens)))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    theirs = model(torch.tensor(tokens)).logits.detach().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    bad = CliRunner().invoke(cli, ["fuse", "--model", str(tiny_llama), "--adapter", str(runs / "pt"),
                                   "--alpha", "0.5", "-o", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "fused with weight 1" in bad.output
