"""LoRA adapters → GGUF adapter files that llama.cpp loads with ``--lora`` / ``--lora-scaled``.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes from the same adapter in PEFT form:
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (PEFT's lora_alpha), and per
module ``<gguf name>.weight.lora_a`` = PEFT's A (r × in) and ``….lora_b`` = B (out × r), F32. llama.cpp
applies ``scale · alpha / r · B·A`` with the ``--lora-scaled`` scale, so ΔW is ours exactly. For llama
models the rows of B for Q and K are permuted as llama.cpp permutes the base's Q and K.

Two files at scales (α, 1 − α) give the weighted merge live in llama.cpp:
``llama-server -m base.gguf --lora-scaled sft.gguf α --lora-scaled pt.gguf 1−α``. An SFT run trained
on top of a PT run is written, like the PEFT export, as both adapters in one (rank r_pt + r_sft): "the
SFT model", ΔW_pt + ΔW_sft_own, so the same scales hold; ``own_only`` writes ΔW_sft_own alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_med.adapters.format import Adapter, read_adapter
from mlx_med.errors import UserError


@dataclass
class GGUFAdapterExport:
    path: Path
    architecture: str
    rank: int
    lora_alpha: float
    modules: int
    holds: str  # what the file is, in words (printed by the CLI)
    notes: list[str] = field(default_factory=list)


def exportable_adapter(src: str | Path, own_only: bool = False) -> tuple[Adapter, str]:
    """The adapter to export from ``src`` and what it holds: for an SFT run stacked on a PT run, both
    combined exactly (``merge --method linear`` at weights 1 and 1) unless ``own_only``."""
    from mlx_med.adapters.merge import combine_stacked

    adapter = read_adapter(src)
    phase = adapter.meta.phase
    if adapter.meta.stacked_on and not own_only:
        combined, parent = combine_stacked(adapter)
        return combined, (f"the SFT model: ΔW_pt ({parent}) + ΔW_sft_own ({src}), rank {combined.rank} "
                          f"(--own-only for ΔW_sft_own alone)")
    if adapter.meta.stacked_on:
        return adapter, f"ΔW_sft_own of {src} only, without the PT adapter it was trained on"
    return adapter, f"the {phase} adapter {src}"


def export_gguf_adapter(
    src: str | Path,
    out_path: str | Path,
    base: str | Path | None = None,
    own_only: bool = False,
    force: bool = False,
) -> GGUFAdapterExport:
    """Write the adapter in ``src`` (a run, merged or imported adapter dir) as a GGUF LoRA adapter.

    Args:
        src: an mlx-med/mlx-lm adapter or training run directory.
        out_path: the ``.gguf`` file to create.
        base: the MLX base model folder (architecture and head counts for llama's Q/K order); default
            the base recorded in the adapter.
        own_only: for an SFT run stacked on a PT run, write its own ΔW only.
        force: replace an existing file.

    Raises:
        UserError: no base config, an architecture llama.cpp's names do not cover, a module without a
            llama.cpp name, an existing output.
    """
    import gguf

    from mlx_med.convert.gguf_export import add_general_metadata, atomic_output_file
    from mlx_med.convert.gguf_names import ARCHITECTURES, gguf_module, permute_rows, qk_heads
    from mlx_med.models import read_model_config

    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; pass --force to replace it")
    adapter, holds = exportable_adapter(src, own_only)
    base_dir = base or adapter.meta.base_model
    if not base_dir or not (Path(base_dir) / "config.json").is_file():
        raise UserError(f"{src}: its base model folder {base_dir or '(not recorded)'} is not here; pass "
                        "--base-model with the MLX base folder (it gives the architecture and head counts)")
    config = read_model_config(base_dir)
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise UserError(f"{base_dir}: model_type {arch!r} has no GGUF adapter mapping (supported: "
                        f"{', '.join(ARCHITECTURES)})")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    modules = adapter.modules()
    if not modules:
        raise UserError(f"{src}: the adapter has no LoRA weights")
    lora_alpha = adapter.scale * adapter.rank  # llama.cpp scales by alpha / r, r read from lora_b
    with atomic_output_file(out_path, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for module in modules:
            name = gguf_module(module)
            if name is None:
                raise UserError(f"{src}: module {module} has no llama.cpp tensor name")
            a = _fp32(adapter.weights[f"{module}.lora_a"]).T  # PEFT's A: (r, in)
            b = _fp32(adapter.weights[f"{module}.lora_b"]).T  # PEFT's B: (out, r)
            n = qk_heads(name, heads, kv_heads) if ARCHITECTURES[arch].permute_qk else None
            if n is not None:
                b = permute_rows(b, n)
            writer.add_tensor(f"{name}.weight.lora_a", np.ascontiguousarray(a))
            writer.add_tensor(f"{name}.weight.lora_b", np.ascontiguousarray(b))
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        add_general_metadata(writer, Path(src))
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_alpha))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFAdapterExport(out_path, arch, adapter.rank, lora_alpha, len(modules), holds)


def _fp32(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32))
