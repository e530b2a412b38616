"""HF → MLX conversion (mlx_med.convert.hf) and its round trip back to HF (mlx_med.convert.export), checked against transformers."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_med.convert.export import export_hf
from mlx_med.convert.hf import convert_hf
from safetensors.numpy import load_file, save_file

from mlx_med.cli import cli
from mlx_med.errors import UserError
from mlx_med.models import load_model


def hf_weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def token_batch(vocab: int, rows: int = 4, length: int = 24) -> np.ndarray:
    return np.random.default_rng(7).integers(3, vocab, size=(rows, length))


def test_fp32_round_trip_is_bit_exact(tiny_model, tmp_path):
    """HF → MLX (fp32) → HF gives back every tensor bit for bit, plus config, tokenizer and eos ids."""
    mlx_dir = convert_hf(tiny_model, tmp_path / "mlx")
    report = export_hf(mlx_dir, tmp_path / "hf", dtype="float32")
    src, out = hf_weights(tiny_model), hf_weights(tmp_path / "hf")
    assert sorted(src) == sorted(out)
    for key in src:
        assert out[key].dtype == np.float32 and np.array_equal(src[key], out[key]), key
    assert report.layer_errors == [] and report.source_quantization is None
    cfg_src = json.loads((tiny_model / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_key_value_heads", "rope_theta", "tie_word_embeddings", "vocab_size"):
        assert cfg_out[key] == cfg_src[key], key
    assert cfg_out["torch_dtype"] == "float32" and "quantization" not in cfg_out
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg_src["eos_token_id"]


def test_4bit_export_matches_mlx_logits(tiny_model, tmp_path):
    """HF → MLX 4-bit → HF (sharded): transformers loads it with no key warnings; logits match MLX's."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    mlx_dir = convert_hf(tiny_model, tmp_path / "q4", q_bits=4, q_group_size=32)
    assert json.loads((mlx_dir / "config.json").read_text())["quantization"]["bits"] == 4
    report = export_hf(mlx_dir, tmp_path / "hf", dtype="float32", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len([f for f in report.files if f.endswith(".safetensors")]) > 1
    assert report.layer_errors and all(e.bits == 4 and e.group_size == 32 for e in report.layer_errors)
    assert all(0.01 < e.quant_rel_rms < 0.3 and e.export_rel_rms == 0.0 for e in report.layer_errors)

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = load_model(mlx_dir)
    tokens = token_batch(model.config.vocab_size)
    ours = np.array(loaded.model(mx.array(tokens)))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
    # and 4-bit really changed the model, so the comparison above is not vacuous
    fp = np.array(load_model(tiny_model).model(mx.array(tokens)))
    assert np.abs(fp - ours).max() > 1e-3


def test_sharded_source_and_rope_parameters_config(tiny_llama, tmp_path):
    """A sharded HF folder with a transformers-5 config (rope_parameters only) converts to the same model."""
    src = tmp_path / "sharded"
    shutil.copytree(tiny_llama, src)
    weights = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: weights[k] for k in part}, str(src / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta") * 3, "rope_type": "default"}
    (src / "config.json").write_text(json.dumps(cfg))

    out = convert_hf(src, tmp_path / "mlx", dtype="float32")
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 30000.0
    import mlx_lm

    plain, _ = mlx_lm.load(str(out))  # plain mlx-lm, no mlx-med normalisation
    ours = load_model(src).model
    tokens = mx.array(token_batch(512, 1, 16))
    np.testing.assert_allclose(np.array(plain(tokens)), np.array(ours(tokens)), atol=1e-5)


def test_bad_inputs_give_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        convert_hf(tmp_path / "nope", tmp_path / "o1")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UserError, match="corrupt safetensors"):
        convert_hf(broken, tmp_path / "o2")
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-9.safetensors"}}))
    with pytest.raises(UserError, match="missing shard"):
        convert_hf(broken, tmp_path / "o3")
    alien = tmp_path / "alien"
    shutil.copytree(tiny_llama, alien)
    cfg = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "model_type": "not_a_model"}))
    with pytest.raises(UserError, match="'not_a_model' is not supported"):
        convert_hf(alien, tmp_path / "o4")
    with pytest.raises(UserError, match="--q-bits"):
        convert_hf(tiny_llama, tmp_path / "o5", q_bits=7)
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        convert_hf(tiny_llama, tmp_path / "exists")
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


def test_interrupted_conversion_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import mlx_med.convert.hf

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_med.convert.hf, "copy_tokenizer_files", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(tiny_llama, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_convert(tiny_qwen2, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q8"
    result = runner.invoke(cli, ["convert", "--hf-path", str(tiny_qwen2), "-o", str(out), "--q-bits", "8",
                                 "--q-group-size", "32"])
    assert result.exit_code == 0, result.output
    assert "qwen2" in result.output and "8-bit" in result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    again = runner.invoke(cli, ["convert", "--hf-path", str(tiny_qwen2), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    both = runner.invoke(cli, ["convert", "--hf-path", str(tiny_qwen2), "--gguf", "x.gguf", "-o", str(out)])
    assert both.exit_code == 2 and "exactly one source" in both.output
