"""Fuse LoRA adapters into the base weights: W' = W + Σ cᵢ·ΔWᵢ, written as a new MLX model folder.

The weights are ``mlx_med.adapters.mix``'s (``--alpha a``: w_sft = a, w_pt = 1 − a, or per module under an
α schedule; a stacked SFT run is resolved into ΔW_pt + a·ΔW_sft_own). The sum is ``mix.weighted_delta``,
formed in fp32 from each adapter's own factors, and a quantized W is dequantized by the one fp32 rule
(``mlx_med.backend.dequantized_weight``, the same as HF export's), so fused − base is the update.

Quantized bases: each touched layer is dequantized, ΔW added, and by default the layer stays
dequantized (``dtype``) while untouched layers stay quantized (recorded as ``quantization[path] =
false`` in config.json, mlx-lm's per-layer convention). ``requantize=True`` quantizes the fused layer
again with the base's bits and group size and reports, per layer, how much of ΔW the rounding destroys:
at 4 bits the rounding error is often as large as a LoRA update, which is why it is not the default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_med.adapters.mix import AdapterMix, relative_norm, resolve_mix, weighted_delta
from mlx_med.adapters.schedule import AlphaSchedule
from mlx_med.backend import dequantized_weight
from mlx_med.errors import UserError
from mlx_med.io import atomic_output_dir, atomic_write_json

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
REPORT_FILE = "fuse_report.json"


@dataclass
class LayerReport:
    module: str
    delta_rel: float  # ‖ΔW‖ / ‖W‖: how big the update is against the base weight
    quantized: bool  # the base layer was quantized
    requantized: bool = False
    # With requantize: ‖deq(Q(W + ΔW)) − (W + ΔW)‖ / ‖ΔW‖ (rounding error in units of the update) and
    # ⟨deq(Q(W + ΔW)) − W, ΔW⟩ / ‖ΔW‖² (share of the update that survives; 1 = all of it).
    requant_error: float | None = None
    delta_kept: float | None = None


@dataclass
class FuseReport:
    """What ``fuse_model`` wrote."""

    out_dir: Path
    base: Path
    adapters: dict[str, str]
    weights: dict[str, float]
    coefficients: dict[str, float]
    dtype: str
    requantize: bool
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    alpha_schedule: dict[str, Any] | None = None  # per-module α rules, when fused with a schedule

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"], data["base"] = str(self.out_dir), str(self.base)
        return data

    def summary(self) -> list[str]:
        """Human-readable lines for the CLI."""
        quantized = [layer for layer in self.layers if layer.quantized]
        weights = ", ".join(f"{n}={w:g}" for n, w in self.weights.items())
        lines = [
            f"fused {len(self.layers)} layers of {self.base} with {weights} "
            f"({', '.join(f'{n}: {p}' for n, p in self.adapters.items())})",
        ]
        if self.alpha_schedule:
            lines.append(f"α schedule {self.alpha_schedule['source']}: default {self.alpha_schedule['default']:g}, "
                         f"{len(self.alpha_schedule['rules'])} rules (per-module weights in fuse_report.json)")
        if self.coefficients != self.weights:
            coefs = ", ".join(f"{n}={c:g}" for n, c in self.coefficients.items())
            lines.append(f"stacked adapters resolved: coefficients on each adapter's own ΔW: {coefs}")
        if quantized and not self.requantize:
            lines.append(f"{len(quantized)} quantized layers dequantized to {self.dtype} (use --requantize "
                         "to quantize them again, at the cost reported then)")
        requant = [layer for layer in self.layers if layer.requantized]
        if requant:
            worst = max(requant, key=lambda r: r.requant_error or 0.0)
            mean_kept = sum(r.delta_kept or 0.0 for r in requant) / len(requant)
            lines.append(
                f"re-quantized {len(requant)} layers: rounding error / ‖ΔW‖ mean "
                f"{sum(r.requant_error or 0.0 for r in requant) / len(requant):.3f}, worst "
                f"{worst.requant_error:.3f} ({worst.module}); share of ΔW kept: mean {mean_kept:.3f}"
            )
        lines += self.notes
        lines.append(f"wrote {self.out_dir} ({', '.join(self.files)})")
        return lines


def resolve_adapters(
    adapter: str | Path | None = None,
    sft: str | Path | None = None,
    pt: str | Path | None = None,
    alpha: float | None = None,
    w_sft: float | None = None,
    w_pt: float | None = None,
    alpha_schedule: str | Path | AlphaSchedule | None = None,
) -> AdapterMix:
    """The mix to fuse: ``--adapter``, or ``--sft/--pt`` with exactly one of ``--alpha``, ``--w-sft/--w-pt``
    or ``--alpha-schedule`` (``mix.resolve_mix``; conflicting flags are an error, never silently dropped)."""
    if adapter is None and sft is None and pt is None:
        raise UserError("give --sft RUN and --pt RUN (or --adapter DIR for a single adapter)")
    if sft is not None and alpha is None and w_sft is None and w_pt is None and alpha_schedule is None:
        raise UserError("missing --alpha (w_sft = alpha, w_pt = 1 − alpha), --w-sft/--w-pt or --alpha-schedule")
    return resolve_mix(adapter, sft, pt, alpha, w_sft, w_pt, alpha_schedule)


def fuse_model(
    model_dir: str | Path,
    out_dir: str | Path,
    adapter: str | Path | None = None,
    sft: str | Path | None = None,
    pt: str | Path | None = None,
    alpha: float | None = None,
    dtype: str = "bfloat16",
    requantize: bool = False,
    force: bool = False,
    w_sft: float | None = None,
    w_pt: float | None = None,
    alpha_schedule: str | Path | AlphaSchedule | None = None,
) -> FuseReport:
    """Fuse one adapter, or the SFT/PT pair at weight α, into ``model_dir`` and save to ``out_dir``.

    Args:
        model_dir: base MLX (or HF safetensors) folder the adapters were trained on; may be quantized.
        out_dir: new model folder (written atomically; refused if it exists unless ``force``).
        adapter: one adapter dir (weight 1; a stacked SFT run brings its PT run along).
        sft, pt: the study's pair, weighed by exactly one of ``alpha`` (w_sft = α, w_pt = 1 − α, α in
            [0, 1]), ``w_sft``/``w_pt`` or ``alpha_schedule`` (α per module): fusing writes an artifact, so
            the weights are never implied.
        dtype: dtype of the fused (dequantized) weights and of the other unquantized weights.
        requantize: quantize fused layers of a quantized base again (reports the error it adds).
        force: replace an existing ``out_dir``.

    Returns:
        A ``FuseReport`` (also written to ``out_dir/fuse_report.json``).
    """
    from mlx_lm.utils import save

    from mlx_med.adapters.live import base_notes
    from mlx_med.models import load_model

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(model_dir).resolve():
        raise UserError(f"-o {out_dir} is the base model folder itself; fuse into a new folder")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    mix = resolve_adapters(adapter, sft, pt, alpha, w_sft, w_pt, alpha_schedule)
    adapters = mix.adapters
    loaded = load_model(model_dir, compute=False)
    model, config = loaded.model, dict(loaded.config)
    report = FuseReport(out_dir, Path(model_dir), {n: str(a.path) for n, a in adapters.items()}, mix.weights,
                        mix.coefficients, dtype, requantize, notes=base_notes(model_dir, adapters),
                        alpha_schedule=mix.schedule.to_json() if mix.schedule is not None else None)

    named = dict(model.named_modules())
    target = DTYPES[dtype]
    modules = mix.modules()
    fused: list[tuple[str, nn.Module]] = []
    for path in modules:
        layer = named.get(path)
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            found = type(layer).__name__ if layer is not None else "nothing"
            raise UserError(f"adapter targets {path}, but {model_dir} has {found} there (adapter for another model?)")
        weight = dequantized_weight(layer)
        delta = weighted_delta(adapters, path, mix.coefficients_for(path))
        if delta.shape != weight.shape:
            raise UserError(f"{path}: the adapters' ΔW has shape {tuple(delta.shape)} but the model's weight "
                            f"is {tuple(weight.shape)} (adapter trained on another model?)")
        new_weight = weight + delta
        layer_report = LayerReport(path, relative_norm(delta, weight), isinstance(layer, nn.QuantizedLinear))
        new_layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in layer)
        new_layer.weight = new_weight.astype(target)
        if "bias" in layer:
            new_layer.bias = layer.bias.astype(target)
        if requantize and isinstance(layer, nn.QuantizedLinear):
            new_layer, layer_report = _requantize(layer, new_weight, weight, delta, layer_report)
        elif isinstance(layer, nn.QuantizedLinear) and isinstance(config.get("quantization"), dict):
            config["quantization"][path] = False  # mlx-lm's per-layer convention: leave this one unquantized
        fused.append((path, new_layer))
        report.layers.append(layer_report)
        mx.eval(new_layer.parameters())
    model.update_modules(tree_unflatten(fused))
    _cast_unquantized(model, target)
    _fix_config(model, config, dtype)

    with atomic_output_dir(out_dir, force=force) as tmp:
        save(tmp, model_dir, model, loaded.tokenizer, config, donate_model=False)
        report.files = sorted(p.name for p in tmp.iterdir()) + [REPORT_FILE]
        atomic_write_json(tmp / REPORT_FILE, report.to_json())
    return report


def _requantize(layer: nn.QuantizedLinear, new_weight: mx.array, weight: mx.array, delta: mx.array,
                report: LayerReport) -> tuple[nn.Module, LayerReport]:
    """Quantize W + ΔW like the base layer was, and measure what the rounding does to ΔW."""
    scales_dtype = layer.scales.dtype
    dense = nn.Linear(new_weight.shape[1], new_weight.shape[0], bias="bias" in layer)
    dense.weight = new_weight.astype(scales_dtype)
    if "bias" in layer:
        dense.bias = layer.bias
    quantized = nn.QuantizedLinear.from_linear(dense, layer.group_size, layer.bits, mode=layer.mode)
    back = dequantized_weight(quantized)
    delta_sq = float(mx.sum(delta * delta))
    report.requantized = True
    report.requant_error = relative_norm(back - new_weight, delta)
    report.delta_kept = float(mx.sum((back - weight) * delta)) / delta_sq if delta_sq > 0 else 1.0
    return quantized, report


def _cast_unquantized(model: nn.Module, target: mx.Dtype) -> None:
    """Cast every floating weight outside quantized layers to ``target`` (one dtype for the model)."""
    quantized = {p for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    updates = []
    for key, value in tree_flatten(model.parameters()):
        owner = key.rsplit(".", 1)[0]
        if owner not in quantized and mx.issubdtype(value.dtype, mx.floating) and value.dtype != target:
            updates.append((key, value.astype(target)))
    if updates:
        model.update(tree_unflatten(updates))


def _fix_config(model: nn.Module, config: dict[str, Any], dtype: str) -> None:
    still_quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules())
    if not still_quantized:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
