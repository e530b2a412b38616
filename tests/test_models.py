import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_med.errors import UserError
from mlx_med.hf_config import normalize_for_hf, normalize_for_mlx
from mlx_med.models import load_model


def test_rope_parameters_lifted_for_mlx():
    cfg = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    out = normalize_for_mlx(cfg)
    assert out["rope_theta"] == 100000.0 and "rope_scaling" not in out
    assert cfg == {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}


def test_hf_config_drops_quantization_and_sets_dtype():
    out = normalize_for_hf({"rope_theta": 5e5, "quantization": {"bits": 4}, "quantization_config": {}}, "bfloat16")
    assert "quantization" not in out and "quantization_config" not in out
    assert out["rope_parameters"] == {"rope_theta": 5e5, "rope_type": "default"}
    assert out["torch_dtype"] == "bfloat16"


def test_load_model_uses_lifted_rope_theta(tiny_llama, tmp_path):
    """A transformers-5 style config (rope_parameters only) must give the same logits as rope_theta."""
    moved = tmp_path / "t5"
    shutil.copytree(tiny_llama, moved)
    cfg = json.loads((moved / "config.json").read_text())
    theta = 500.0
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (moved / "config.json").write_text(json.dumps(cfg))
    ref = tmp_path / "ref"
    shutil.copytree(tiny_llama, ref)
    cfg_ref = json.loads((ref / "config.json").read_text())
    cfg_ref["rope_theta"] = theta
    (ref / "config.json").write_text(json.dumps(cfg_ref))
    tokens = mx.array([[5, 17, 42, 7, 99, 3, 64, 8]])
    a = np.array(load_model(moved).model(tokens))
    b = np.array(load_model(ref).model(tokens))
    c = np.array(load_model(tiny_llama).model(tokens))
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - c).max() > 1e-3  # the theta really matters, so the check above can fail


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_truncated_weights_are_a_user_error(tmp_path, tiny_llama):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])  # an interrupted download
    with pytest.raises(UserError, match=r"model: cannot read the weights: .*corrupt"):
        load_model(model)
