"""Fingerprints: content hashes that tell apart models differing anywhere, and the keys built on them."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from mlx_med.errors import UserError
from mlx_med.fingerprint import cache_key, file_fingerprint, model_fingerprint


def _change_middle(model_dir):
    """Overwrite one float in the middle of the weights file: same size, header and head/tail bytes."""
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2 // 4 * 4
    old = data[middle:middle + 4]
    data[middle:middle + 4] = struct.pack("<f", 0.123456) if old != struct.pack("<f", 0.123456) else b"\0\0\0\0"
    weights.write_bytes(bytes(data))
    return weights


def test_models_differing_in_one_middle_tensor_get_different_fingerprints(tmp_path, tiny_llama):
    a = tmp_path / "a"
    b = tmp_path / "b"
    shutil.copytree(tiny_llama, a)
    shutil.copytree(tiny_llama, b)
    assert (a / "model.safetensors").stat().st_size > 4 * 64 * 1024  # the middle is outside any head/tail sample
    assert model_fingerprint(a) == model_fingerprint(b)
    _change_middle(b)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_the_cache_follows_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MED_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * (2 << 20))
    first = file_fingerprint(path)
    assert json.loads((tmp_path / "cache" / "fingerprints.json").read_text())  # big files are cached on disk
    path.write_bytes(b"y" * (2 << 20))  # same size, new mtime
    assert file_fingerprint(path) != first


def test_cache_keys_carry_the_version(monkeypatch):
    import mlx_med

    key = cache_key(model="m", data="d")
    monkeypatch.setattr(mlx_med, "__version__", "999.0")
    assert cache_key(model="m", data="d") != key


def test_a_resumed_eval_refuses_a_swapped_model(tmp_path, tiny_llama):
    from mlx_med.evaluation.runner import EvalConfig, run_eval

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}"}) + "\n" for i in range(3)))
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    out = tmp_path / "eval"
    run_eval(EvalConfig(model=model, data=data, out=out, max_new_tokens=3), quiet=True)
    # An interrupted eval: one prediction made, no metrics yet.
    first = json.loads((out / "generated_predictions.jsonl").read_text().splitlines()[0])
    (out / "metrics.json").unlink()
    (out / "predictions.partial.jsonl").write_text(json.dumps({**first, "index": 0, "generation_tokens": 1,
                                                               "finish_reason": "stop"}) + "\n")
    _change_middle(model)  # another model in the same folder
    with pytest.raises(UserError, match="different model"):
        run_eval(EvalConfig(model=model, data=data, out=out, max_new_tokens=3), quiet=True)
