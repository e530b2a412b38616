"""PEFT interop against the real peft library (torch CPU): export → PeftModel, peft → import."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from random_adapters import ALL, ATTN, make_adapter

from mlx_med.adapters.format import read_adapter
from mlx_med.adapters.live import load_with_adapters
from mlx_med.adapters.peft_io import export_peft, import_peft
from mlx_med.cli import cli
from mlx_med.errors import UserError

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOKENS = [[5, 17, 42, 99, 3, 250, 7, 11]]


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def mlx_logits(model_dir, adapter_dir) -> np.ndarray:
    loaded, _ = load_with_adapters(model_dir, adapter=adapter_dir)
    return np.array(loaded.model(mx.array(TOKENS)))


def test_export_loads_in_peft_with_same_logits(tmp_path, tiny_model):
    make_adapter(tiny_model, tmp_path / "run", rank=4, lora_alpha=8, keys=ALL, seed=1)
    result = CliRunner().invoke(cli, ["export-adapter", str(tmp_path / "run"), "-o", str(tmp_path / "peft"),
                                      "--base-model", str(tiny_model)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(tiny_model)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    model = peft.PeftModel.from_pretrained(hf_model(tiny_model), str(tmp_path / "peft"))
    ours = mlx_logits(tiny_model, tmp_path / "run")
    np.testing.assert_allclose(torch_logits(model), ours, atol=1e-4)
    assert np.abs(ours - torch_logits(hf_model(tiny_model))).max() > 1e-2  # the adapter matters


def test_peft_adapter_imports_and_matches(tmp_path, tiny_llama):
    """A peft adapter with per-module ranks, alphas and rsLoRA imports exactly."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4}, use_rslora=True,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(tiny_llama), config).eval()
    model.save_pretrained(str(tmp_path / "peft"))
    want = torch_logits(model)
    result = CliRunner().invoke(cli, ["import-adapter", str(tmp_path / "peft"), "-o", str(tmp_path / "ours"),
                                      "--base", str(tiny_llama)])
    assert result.exit_code == 0, result.output
    adapter = read_adapter(tmp_path / "ours")
    assert adapter.rank == 4 and adapter.meta.phase == "imported" and adapter.meta.base_fingerprint
    np.testing.assert_allclose(mlx_logits(tiny_llama, tmp_path / "ours"), want, atol=1e-4)


def test_round_trip_is_exact(tmp_path, tiny_llama):
    original = make_adapter(tiny_llama, tmp_path / "run", rank=3, lora_alpha=6, keys=ATTN, seed=2)
    export_peft(tmp_path / "run", tmp_path / "peft")
    back = import_peft(tmp_path / "peft", tmp_path / "back")
    assert back.rank == 3 and back.scale == pytest.approx(original.scale)
    for module in original.modules():
        np.testing.assert_allclose(np.array(back.delta(module)), np.array(original.delta(module)), atol=1e-6)


def test_stacked_export_combines_pt(tmp_path, tiny_llama):
    make_adapter(tiny_llama, tmp_path / "pt", rank=4, keys=ATTN, seed=3)
    make_adapter(tiny_llama, tmp_path / "sft", rank=2, keys=ATTN, seed=4, phase="sft", stacked_on=tmp_path / "pt")
    result = export_peft(tmp_path / "sft", tmp_path / "peft", base_model=str(tiny_llama))
    assert result.rank == 6 and result.combined_with == str(tmp_path / "pt")
    model = peft.PeftModel.from_pretrained(hf_model(tiny_llama), str(tmp_path / "peft"))
    np.testing.assert_allclose(torch_logits(model), mlx_logits(tiny_llama, tmp_path / "sft"), atol=1e-4)
    own = export_peft(tmp_path / "sft", tmp_path / "own", own_only=True)
    assert own.rank == 2 and own.combined_with is None


def test_partial_layers_use_layers_to_transform(tmp_path, tiny_llama):
    adapter = make_adapter(tiny_llama, None, keys=ATTN, seed=5)
    adapter.weights = {k: v for k, v in adapter.weights.items() if ".layers.1." in k}
    from mlx_med.adapters.format import write_adapter

    write_adapter(adapter, tmp_path / "run")
    export_peft(tmp_path / "run", tmp_path / "peft", base_model=str(tiny_llama))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    model = peft.PeftModel.from_pretrained(hf_model(tiny_llama), str(tmp_path / "peft"))
    np.testing.assert_allclose(torch_logits(model), mlx_logits(tiny_llama, tmp_path / "run"), atol=1e-4)


def test_import_refusals(tmp_path, tiny_llama, tiny_qwen2):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(tiny_llama), config).save_pretrained(str(tmp_path / "mts"))
    with pytest.raises(UserError, match="modules_to_save"):
        import_peft(tmp_path / "mts", tmp_path / "x")
    dora = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(tiny_llama), dora).save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(UserError, match="DoRA"):
        import_peft(tmp_path / "dora", tmp_path / "x")
    make_adapter(tiny_llama, tmp_path / "ours", seed=6)
    with pytest.raises(UserError, match="already an mlx-lm/mlx-med adapter"):
        import_peft(tmp_path / "ours", tmp_path / "x")
    # peft saves the full lm_head next to its LoRA: not representable as an adapter.
    head = peft.LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(tiny_llama), head).save_pretrained(str(tmp_path / "head"))
    with pytest.raises(UserError, match="lm_head.base_layer.weight' is not a LoRA A/B matrix"):
        import_peft(tmp_path / "head", tmp_path / "x")
    # A module the base does not have is named.
    plain = peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(tiny_llama), plain).save_pretrained(str(tmp_path / "plain"))
    path = tmp_path / "plain" / "adapter_model.safetensors"
    renamed = {k.replace("q_proj", "qkv_proj"): v for k, v in mx.load(str(path)).items()}
    mx.save_safetensors(str(path), renamed)
    with pytest.raises(UserError, match="qkv_proj, which is not a linear layer of"):
        import_peft(tmp_path / "plain", tmp_path / "x", base=tiny_qwen2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        import_peft(tmp_path / "empty", tmp_path / "x")


@pytest.mark.parametrize("field, patterns, message", [
    ("alpha_pattern", {"(a+)+$": 8}, "is not a safe module pattern"),
    ("alpha_pattern", {"q_proj[": 8}, "is not a valid regex"),
    ("alpha_pattern", {"q_proj": float("nan")}, "not a positive number"),
    ("rank_pattern", {"q_proj": 2.5}, "not a positive integer"),
])
def test_hostile_peft_patterns_are_refused_in_one_line(tmp_path, tiny_llama, field, patterns, message):
    make_adapter(tiny_llama, tmp_path / "run", keys=ATTN)
    export_peft(tmp_path / "run", tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = patterns
    config_path.write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["import-adapter", str(tmp_path / "peft"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
    assert "adapter_config.json" in result.output and f"'{field}'" in result.output
    assert not (tmp_path / "out").exists()
