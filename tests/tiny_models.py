"""Tiny random Hugging Face checkpoints for tests: real files, real tokenizer, built in a second.

``build_tokenizer`` trains a byte-level BPE with ``tokenizers`` on a small mixed English/Chinese
medical corpus and saves it with a ChatML chat template. ``build_model`` writes a llama- or
qwen2-shaped ``model.safetensors`` + ``config.json`` (HF key names) with random weights, so both
mlx-lm and transformers load the folder.
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The patient presented with fever, cough and shortness of breath for three days.",
    "Hypertension is treated with lifestyle changes and antihypertensive drugs.",
    "Call emergency services immediately if chest pain spreads to the arm or jaw.",
    "Do not exceed the maximum daily dose of paracetamol.",
    "Diabetes mellitus requires regular monitoring of blood glucose.",
    "Question: Is aspirin indicated after a stroke? Answer: yes, no or maybe.",
    "患者发热、咳嗽三天，伴有呼吸困难。",
    "高血压患者应低盐饮食，规律服用降压药。",
    "如果胸痛持续不缓解，请立即拨打120急救电话。",
    "糖尿病患者需要定期监测血糖，控制饮食。",
    "传染病是指由病原微生物感染人体后产生的有传染性的疾病。",
    "您好，根据您的描述，建议您及时到医院就诊。",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on ``CORPUS`` and save it as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHATML
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def model_config(arch: str, vocab_size: int, eos_token_id: int, pad_token_id: int) -> dict:
    """config.json for a 2-layer, hidden-64 model of the given architecture."""
    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "hidden_act": "silu",
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": None,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
    if arch == "qwen2":
        return {**common, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                "tie_word_embeddings": True, "use_sliding_window": False}
    raise ValueError(f"unknown tiny architecture {arch!r}")


def random_weights(config: dict, seed: int, std: float = 0.08) -> dict[str, np.ndarray]:
    """HF-named fp32 weights. ``std`` is large enough that logits are not flat (top-1 is stable)."""
    rng = np.random.default_rng(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def w(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
            p + "self_attn.q_proj.weight": w(q, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(f, h),
            p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
        })
        if config["model_type"] == "qwen2":
            weights.update({
                p + "self_attn.q_proj.bias": w(q),
                p + "self_attn.k_proj.bias": w(kv),
                p + "self_attn.v_proj.bias": w(kv),
            })
    if not config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = w(v, h)
    return weights


def build_model(out_dir: Path, arch: str, tokenizer_dir: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Write a tiny HF checkpoint folder (weights, config, tokenizer, generation_config); ``overrides``
    replace entries of ``model_config``'s config (e.g. a real model's head size)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out_dir / item.name)
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    size = max(vocab.values()) + 1
    size = max(size, *(t["id"] + 1 for t in tok["added_tokens"]))
    eos, pad = vocab.get("<|im_end|>"), vocab.get("<|endoftext|>")
    eos = eos if eos is not None else next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    pad = pad if pad is not None else next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    config = {**model_config(arch, size, eos, pad), **(overrides or {})}
    save_file(random_weights(config, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}, indent=2)
    )
    return out_dir


QWEN_VOCAB = Path(__file__).parent / "data" / "qwen3-tokenizer"


def qwen_tokenizer(folder: Path) -> Path:
    """The real Qwen2.5/Qwen3 tokenizer (kept xz-compressed in tests/data) unpacked into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(lzma.decompress((QWEN_VOCAB / "tokenizer.json.xz").read_bytes()))
    shutil.copy(QWEN_VOCAB / "tokenizer_config.json", folder)
    return folder
