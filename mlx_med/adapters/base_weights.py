"""Read single linear weights of a base model folder, without loading the model.

``mx.load`` maps a safetensors file lazily, so evaluating a handful of its arrays reads only those
bytes: ``base_weight_norms`` of 210 modules of a 135M model reads the ~30 MB of those layers, and on a
14B model only the adapted layers, one at a time. Quantized layers (mlx-lm's affine/mxfp layout:
``weight`` + ``scales`` [+ ``biases``], settings from ``config.json`` ``quantization``, per layer where
given) are dequantized to fp32 first.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_med.adapters.format import Adapter
from mlx_med.errors import UserError

BATCH = 16  # layers dequantized per evaluation


def base_weight_norms(model_dir: str | Path, modules: list[str],
                      shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, float]:
    """‖W‖_F (fp32, dequantized) of each module's ``weight`` in the base folder ``model_dir``.

    Args:
        model_dir: MLX (or HF safetensors) model folder.
        modules: module paths as in the adapter (``model.layers.3.self_attn.q_proj``).
        shapes: the expected ``(in, out)`` of each module, checked when given.

    Raises:
        UserError: the folder is not a model, a module has no weight there, or its shape differs.
    """
    from mlx_med.convert.files import weight_files
    from mlx_med.models import read_model_config

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    tensors: dict[str, mx.array] = {}
    for path in weight_files(model_dir):
        tensors.update(mx.load(str(path)))  # lazy: nothing is read until an array is evaluated
    norms: dict[str, mx.array] = {}
    for module in modules:
        weight = tensors.get(f"{module}.weight")
        if weight is None:
            raise UserError(f"{model_dir}: no weight {module}.weight for the adapted module {module} "
                            "(not the base the adapters were trained on?)")
        dense = _dense(tensors, module, weight, quantization, model_dir)
        if shapes and module in shapes and (dense.shape[1], dense.shape[0]) != tuple(shapes[module]):
            in_dims, out_dims = shapes[module]
            raise UserError(f"{model_dir}: {module} is a {dense.shape[1]}→{dense.shape[0]} layer, the adapters "
                            f"adapt a {in_dims}→{out_dims} one (different base model?)")
        norms[module] = mx.sqrt(mx.sum(dense * dense))
        if len(norms) % BATCH == 0:  # evaluate a few layers at a time: fewer graph runs, bounded memory
            mx.eval(list(norms.values()))
    mx.eval(list(norms.values()))
    return {module: float(norm) for module, norm in norms.items()}


def fingerprint_notes(model_dir: str | Path, adapters: dict[str, Adapter]) -> list[str]:
    """A warning for each adapter that records a base fingerprint other than ``model_dir``'s."""
    from mlx_med.fingerprint import model_fingerprint

    here = model_fingerprint(model_dir)
    return [f"warning: {a.path or name} was trained on {a.meta.base_model or '?'} (fingerprint "
            f"{a.meta.base_fingerprint}), not on {model_dir} (fingerprint {here}); ‖W‖ is taken from the latter"
            for name, a in adapters.items() if a.meta.base_fingerprint and a.meta.base_fingerprint != here]


def _dense(tensors: dict[str, mx.array], module: str, weight: mx.array, quantization: dict, where: Path) -> mx.array:
    scales = tensors.get(f"{module}.scales")
    if scales is None:
        return weight.astype(mx.float32)
    spec = quantization.get(module) if isinstance(quantization.get(module), dict) else quantization
    group_size = int(spec.get("group_size", 64))
    mode = spec.get("mode", "affine")
    # Bits follow from the packed width: each uint32 holds 32 / bits values of a group_size-wide group.
    bits = int(spec.get("bits") or weight.shape[-1] * 32 // (scales.shape[-1] * group_size))
    try:
        biases = tensors.get(f"{module}.biases")
        if mode == "affine":  # fp32 scales give fp32 directly; fp16 arithmetic on a CPU is many times slower
            scales = scales.astype(mx.float32)
            biases = None if biases is None else biases.astype(mx.float32)
        return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"{where}: cannot dequantize {module} ({err})") from None
