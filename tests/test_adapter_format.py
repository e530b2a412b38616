import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_med.adapters.format import Adapter, AdapterMeta, lora_scale, read_adapter, write_adapter
from mlx_med.errors import UserError


def make_adapter() -> Adapter:
    mx.random.seed(0)
    weights = {
        "model.layers.0.self_attn.q_proj.lora_a": mx.random.normal((64, 4)),
        "model.layers.0.self_attn.q_proj.lora_b": mx.random.normal((4, 32)),
    }
    return Adapter(rank=4, scale=lora_scale(8, 4), num_layers=2, keys=["self_attn.q_proj"], weights=weights,
                   meta=AdapterMeta(phase="pt", lora_alpha=8, target_modules=["q_proj"]))


def test_round_trip_and_delta(tmp_path):
    adapter = make_adapter()
    write_adapter(adapter, tmp_path / "run")
    back = read_adapter(tmp_path / "run")
    assert back.rank == 4 and back.scale == 2.0 and back.meta.phase == "pt"
    assert back.modules() == ["model.layers.0.self_attn.q_proj"]
    a = np.array(adapter.weights["model.layers.0.self_attn.q_proj.lora_a"])
    b = np.array(adapter.weights["model.layers.0.self_attn.q_proj.lora_b"])
    np.testing.assert_allclose(np.array(back.delta("model.layers.0.self_attn.q_proj")), 2.0 * (a @ b).T, rtol=1e-5)
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj"] and cfg["fine_tune_type"] == "lora"


def test_rslora_scale():
    assert lora_scale(16, 4, use_rslora=True) == 8.0


def test_read_errors(tmp_path):
    with pytest.raises(UserError, match="adapter directory not found"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="missing adapter_config.json"):
        read_adapter(tmp_path / "run")
    write_adapter(make_adapter(), tmp_path / "ok")
    (tmp_path / "ok" / "adapters.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot read safetensors"):
        read_adapter(tmp_path / "ok")
