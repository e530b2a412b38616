"""llama.cpp's tensor names and Q/K row order ⇄ Hugging Face / mlx-lm names: the one map both ways.

Read by ``convert.gguf`` (GGUF → MLX) and written by ``convert.gguf_export`` (MLX → GGUF) and
``adapters.gguf_io`` (LoRA adapters → GGUF), so a name or a permutation can only change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    model_type: str
    hf_class: str
    permute_qk: bool  # llama.cpp's convert_hf_to_gguf permutes Q/K rows for LlamaModel only


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", permute_qk=True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", permute_qk=False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", permute_qk=False),
}

TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_TOP = {v: k for k, v in TOP_NAMES.items()}
_HF_BLOCK = {v: k for k, v in BLOCK_NAMES.items()}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.scales`` → ``model.layers.3.self_attn.q_proj.scales``; None when unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{suffix}"
    return None


def gguf_module(hf_module: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q``; None when llama.cpp has no such tensor."""
    if hf_module in _HF_TOP:
        return _HF_TOP[hf_module]
    parts = hf_module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _HF_BLOCK:
        return f"blk.{parts[2]}.{_HF_BLOCK[parts[3]]}"
    return None


def gguf_name(hf_tensor: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``; None when unknown."""
    module, _, suffix = hf_tensor.rpartition(".")
    base = gguf_module(module)
    return f"{base}.{suffix}" if base else None


def qk_heads(gguf_module_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads the rows of this module are permuted over (Q: n_heads, K: n_kv_heads), else None."""
    kind = gguf_module_name.rsplit(".", 1)[-1]
    return {"attn_q": n_heads, "attn_k": n_kv_heads}.get(kind)


def permute_rows(w: Any, n_heads: int) -> Any:
    """llama.cpp's Q/K permutation (``LlamaModel.permute``): rows (n, 2, d/2) are stored as (n, d/2, 2).

    Works on numpy and MLX arrays of shape (out, ...): a weight, a bias or a LoRA B (out, r).
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: Any, n_heads: int) -> Any:
    """Undo ``permute_rows``: rows (n, 2, d/2) were stored as (n, d/2, 2).

    Applies to a weight (out, in), its quantization scales/biases (out, in/32) or a bias (out,): the
    permutation only moves whole rows, which the quantization groups (along ``in``) never cross.
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
