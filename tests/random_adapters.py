"""Random LoRA adapters over the tiny fixture models, written in the real adapter-dir format.

Used by the merge/fuse/live/PEFT tests instead of training: the layer shapes come from the model's
``model.safetensors`` (HF key names equal mlx-lm module paths for llama and qwen2).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file

from mlx_med.adapters.format import WEIGHTS_FILE, Adapter, AdapterMeta, lora_scale, write_adapter
from mlx_med.fingerprint import file_fingerprint, model_fingerprint

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
ALL = ATTN + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """module path → (out, in) of every 2-D ``*.weight`` inside the decoder layers."""
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    return {k[: -len(".weight")]: v.shape for k, v in weights.items() if ".layers." in k and v.ndim == 2}


def make_adapter(
    model_dir: Path,
    out_dir: Path | None = None,
    rank: int = 4,
    lora_alpha: float = 8.0,
    keys: list[str] | None = None,
    seed: int = 0,
    phase: str = "pt",
    std: float = 0.1,
    stacked_on: Path | None = None,
    dtype=mx.float32,
) -> Adapter:
    """A random adapter (both factors non-zero) on ``keys`` of every layer; written when ``out_dir``."""
    keys = keys or ATTN
    rng = np.random.default_rng(seed)
    weights = {}
    for module, (out_dims, in_dims) in sorted(linear_shapes(model_dir).items()):
        if not any(module.endswith("." + k) for k in keys):
            continue
        weights[f"{module}.lora_a"] = mx.array(rng.standard_normal((in_dims, rank)) * std, dtype=dtype)
        weights[f"{module}.lora_b"] = mx.array(rng.standard_normal((rank, out_dims)) * std, dtype=dtype)
    meta = AdapterMeta(
        phase=phase, base_model=str(model_dir), base_fingerprint=model_fingerprint(model_dir),
        lora_alpha=lora_alpha, target_modules=sorted({k.split(".")[-1] for k in keys}),
    )
    if stacked_on is not None:
        meta.stacked_on = {"path": str(stacked_on), "phase": "pt",
                           "fingerprint": file_fingerprint(Path(stacked_on) / WEIGHTS_FILE)}
    num_layers = len({m.split(".layers.")[1].split(".")[0] for m in (k.rsplit(".", 1)[0] for k in weights)})
    adapter = Adapter(rank=rank, scale=lora_scale(lora_alpha, rank), num_layers=num_layers, keys=list(keys),
                      weights=weights, meta=meta)
    if out_dir is not None:
        write_adapter(adapter, out_dir)
    return adapter


def write_pair(model_dir: Path, folder: Path) -> tuple[Path, Path]:
    """``folder/sft`` and ``folder/pt``: the study's pair as random rank-4 adapters on every projection,
    large enough (std 0.3) that α visibly moves a tiny model's answers."""
    make_adapter(model_dir, folder / "pt", rank=4, lora_alpha=8, keys=ALL, seed=1, phase="pt", std=0.3)
    make_adapter(model_dir, folder / "sft", rank=4, lora_alpha=8, keys=ALL, seed=2, phase="sft", std=0.3)
    return folder / "sft", folder / "pt"


def write_search_data(folder: Path) -> tuple[Path, Path]:
    """``folder/mcq.jsonl`` (two questions) and ``folder/held.jsonl`` (one held-out text): the MCQ and
    perplexity axes of the α-search tests."""
    import json

    mcq = folder / "mcq.jsonl"
    mcq.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Which organ pumps blood?", "options": {"A": "heart", "B": "kidney", "C": "liver"}, "answer": "A"},
        {"question": "Insulin comes from the", "options": {"A": "skin", "B": "pancreas"}, "answer": "B"},
    ]) + "\n", encoding="utf-8")
    ppl = folder / "held.jsonl"
    ppl.write_text(json.dumps({"text": "Hypertension is treated with lifestyle changes."}) + "\n", encoding="utf-8")
    return mcq, ppl
