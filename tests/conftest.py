"""Shared fixtures: tiny random HF checkpoints (llama, qwen2) with a tokenizer trained on the fly.

``mlx_med`` is imported first so that MLX runs on OpenBLAS in tests as it does for users.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import mlx_med  # noqa: F401  (BLAS preload before any test imports mlx)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_model, build_tokenizer, qwen_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer llama-shaped HF folder (fp32, untied lm_head)."""
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tiny_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer qwen2-shaped HF folder (fp32, tied embeddings, q/k/v biases)."""
    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tiny_tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def head64_llama(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny llama with a real model's attention shape: heads of 64 features, three per KV head (the
    shape mlx-med's fused decode attention takes)."""
    return build_model(tmp_path_factory.mktemp("head64-llama"), "llama", tiny_tokenizer_dir, seed=3,
                       overrides={"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1,
                                  "head_dim": 64})


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    """Each tiny architecture in turn."""
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2.5/Qwen3 vocabulary (shipped xz-compressed in tests/data), unpacked once."""
    return qwen_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))
