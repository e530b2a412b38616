"""Several LoRA adapters on one model with weights that change at run time (live α, no fuse).

Each targeted linear layer is wrapped in place by a ``MultiLoRALinear``::

    y = base(x) + Σᵢ cᵢ · sᵢ · (x @ aᵢ) @ bᵢ   computed as   (x @ A) @ B,
    A = [a₁ | a₂ | …] (in × Σr),  B = [c₁s₁b₁ ; c₂s₂b₂ ; …] (Σr × out)

A and B are rebuilt on every weight change (adapters whose coefficient is 0 are left out), so a
change of α costs nothing at generation time and the layer does one thin matmul pair whatever the
number of adapters. The coefficients cᵢ come from ``mlx_med.adapters.merge.component_weights``, so stacked
adapters mean what they mean in ``merge`` and ``fuse``, and the output equals the fused model's.

Rows of one batch may carry different weights (``LiveAdapters.set_row_weights``: one coefficient
per batch row, so a server decodes several α in one forward pass). Then A and B hold every adapter
and the coefficients scale the rank-space activations row by row instead::

    y = base(x) + ((x @ A) * C) @ B,   B = [s₁b₁ ; s₂b₂ ; …],  C[row] = [c₁(row)·1_{r₁} | c₂(row)·1_{r₂} | …]

The adapter factors are kept outside the model's parameter tree: ``model.parameters()`` still holds
only the base weights (under ``<module>.linear``), and ``LiveAdapters.detach()`` puts the original
layers back.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_med.adapters.format import Adapter, read_adapter
from mlx_med.adapters.merge import (
    check_same_base,
    component_weights,
    load_pair,
    stacked_parents,
    with_stacked_parent,
)
from mlx_med.adapters.mix import check_adapter_choice
from mlx_med.errors import UserError


class MultiLoRALinear(nn.Module):
    """A linear (or quantized linear) layer plus several LoRA updates mixed with runtime weights."""

    def __init__(self, linear: nn.Module, factors: dict[str, tuple[mx.array, mx.array, float]]):
        super().__init__()
        self.linear = linear
        # object.__setattr__ keeps these out of the parameter tree (nn.Module stores arrays,
        # dicts and tuples as parameters).
        object.__setattr__(self, "_factors", factors)
        object.__setattr__(self, "_mix", None)
        object.__setattr__(self, "_rows", None)  # (C, A, B) while weights are per batch row
        object.__setattr__(self, "_stacked", None)  # (A, B) of every adapter, built on first per-row use

    @property
    def compute_dtype(self) -> mx.Dtype:
        if isinstance(self.linear, nn.QuantizedLinear):
            return self.linear.scales.dtype
        return self.linear.weight.dtype

    def set_coefficients(self, coefficients: dict[str, float | mx.array], memo: dict | None = None) -> None:
        """Rebuild the concatenated factors for new coefficients (one per adapter name).

        Args:
            coefficients: adapter name → a number (every row alike), or an array of shape (B,) with
                one coefficient per batch row (the next inputs must then have B rows, or 1 row).
            memo: a dict shared by the layers of one model for one set of per-row coefficients,
                so the (rows × Σr) coefficient matrix is built once per adapter layout, not per layer.
        """
        if any(isinstance(c, mx.array) and c.ndim > 0 for c in coefficients.values()):
            self._set_row_coefficients(coefficients, {} if memo is None else memo)
            return
        object.__setattr__(self, "_rows", None)
        coefficients = {n: float(c) for n, c in coefficients.items()}
        active = [(a, b * (coefficients.get(n, 0.0) * s)) for n, (a, b, s) in self._factors.items()
                  if coefficients.get(n, 0.0) != 0.0]
        if not active:
            object.__setattr__(self, "_mix", None)
            return
        dtype = self.compute_dtype
        a = mx.concatenate([a for a, _ in active], axis=1).astype(dtype)
        b = mx.concatenate([b for _, b in active], axis=0).astype(dtype)
        mx.eval(a, b)
        object.__setattr__(self, "_mix", (a, b))

    def _set_row_coefficients(self, coefficients: dict[str, float | mx.array], memo: dict) -> None:
        dtype = self.compute_dtype
        if self._stacked is None:
            a = mx.concatenate([a for a, _, _ in self._factors.values()], axis=1).astype(dtype)
            b = mx.concatenate([b * s for _, b, s in self._factors.values()], axis=0).astype(dtype)
            mx.eval(a, b)
            object.__setattr__(self, "_stacked", (a, b))
        layout = (tuple((n, a.shape[1]) for n, (a, _, _) in self._factors.items()), dtype)
        if layout not in memo:
            rows = max(c.shape[0] for c in coefficients.values() if isinstance(c, mx.array) and c.ndim > 0)
            # Each adapter's coefficient repeated over its rank: C is (rows, Σr), one row per batch row.
            columns = [mx.broadcast_to(mx.array(coefficients.get(n, 0.0), dtype=mx.float32).reshape(-1, 1),
                                       (rows, r)) for n, r in layout[0]]
            memo[layout] = mx.concatenate(columns, axis=1).astype(dtype)[:, None, :]
        object.__setattr__(self, "_rows", (memo[layout], *self._stacked))
        object.__setattr__(self, "_mix", None)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self._rows is not None:
            c, a, b = self._rows
            return y + (((x @ a) * c) @ b).astype(y.dtype)
        if self._mix is None:
            return y
        a, b = self._mix
        return y + ((x @ a) @ b).astype(y.dtype)


@dataclass
class LiveAdapters:
    """Handle on the adapters attached to a model; change their weights with ``set_weights``/``set_alpha``.

    ``weights`` are weights on the *models* (for an SFT/PT pair: w_sft, w_pt as in ``merge``), not on
    the stored adapters; stacked adapters are resolved into per-adapter coefficients here.
    """

    model: nn.Module
    adapters: dict[str, Adapter]
    layers: dict[str, MultiLoRALinear]
    parents: dict[str, str]
    _weights: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def coefficients(self) -> dict[str, float]:
        """Coefficient on each stored adapter's own ΔW (stacking resolved)."""
        return component_weights(self._weights, self.parents)

    @property
    def alpha(self) -> float | None:
        """w_sft for an SFT/PT pair whose weights sum to 1, else None."""
        if set(self._weights) == {"sft", "pt"} and math.isclose(self._weights["sft"] + self._weights["pt"], 1.0):
            return self._weights["sft"]
        return None

    def set_weights(self, **weights: float) -> None:
        """Change the weight of some adapters (by name); the others keep theirs."""
        unknown = sorted(set(weights) - set(self.adapters))
        if unknown:
            raise UserError(f"no adapter named {', '.join(unknown)} (attached: {', '.join(self.adapters)})")
        for name, value in weights.items():
            if not math.isfinite(float(value)):
                raise UserError(f"weight of {name} must be a finite number, got {value}")
        self._weights.update({k: float(v) for k, v in weights.items()})
        coefficients = self.coefficients
        for layer in self.layers.values():
            layer.set_coefficients(coefficients)

    def set_row_weights(self, rows: list[dict[str, float]]) -> None:
        """Give each row of the next batches its own weights (one dict per row, as in ``set_weights``).

        The layers then expect inputs with ``len(rows)`` rows. ``weights`` (the model-wide setting)
        is left as it was; ``set_weights`` returns every row to it.
        """
        unknown = sorted({n for r in rows for n in r} - set(self.adapters))
        if unknown:
            raise UserError(f"no adapter named {', '.join(unknown)} (attached: {', '.join(self.adapters)})")
        if not rows or not all(math.isfinite(float(v)) for r in rows for v in r.values()):
            raise UserError("row weights must be finite numbers, one dict per row")
        per_adapter = {n: mx.array([float(r.get(n, 0.0)) for r in rows], dtype=mx.float32) for n in self.adapters}
        coefficients = component_weights(per_adapter, self.parents)
        memo: dict = {}
        for layer in self.layers.values():
            layer.set_coefficients(coefficients, memo)

    def set_alpha(self, alpha: float) -> None:
        """w_sft = α, w_pt = 1 − α (a stacked SFT run gives ΔW_pt + α·ΔW_sft_own)."""
        if not {"sft", "pt"} <= set(self.adapters):
            raise UserError(f"alpha needs an SFT and a PT adapter; attached: {', '.join(self.adapters)}")
        self.set_weights(sft=float(alpha), pt=1.0 - float(alpha))

    def describe(self) -> str:
        """One line for logs and the chat banner, e.g. ``α=0.5: sft=0.5 (runs/sft), pt=0.5 (runs/pt)``."""
        parts = [f"{n}={self._weights.get(n, 0.0):g} ({a.path or 'in memory'})" for n, a in self.adapters.items()]
        stacked = [f"{c} stacked on {p}" for c, p in self.parents.items()]
        head = f"α={self.alpha:g}: " if self.alpha is not None else ""
        return head + ", ".join(parts) + (f"; {', '.join(stacked)}" if stacked else "")

    def detach(self) -> nn.Module:
        """Put the original layers back; the model is the base model again."""
        self.model.update_modules(tree_unflatten([(p, layer.linear) for p, layer in self.layers.items()]))
        self.layers = {}
        return self.model


def attach_adapters(model: nn.Module, adapters: dict[str, Adapter], weights: dict[str, float]) -> LiveAdapters:
    """Wrap every layer any adapter targets with a ``MultiLoRALinear``, in place.

    Args:
        model: an mlx-lm model (the targeted layers must be ``nn.Linear`` or ``nn.QuantizedLinear``).
        adapters: name → adapter (``{"sft": …, "pt": …}`` for the study's pair).
        weights: name → weight of that adapter's model (missing names get 0).

    Raises:
        UserError: a targeted module is missing or has other dimensions; adapters on different bases.
    """
    check_same_base(adapters)
    parents = stacked_parents(adapters)
    named = dict(model.named_modules())
    paths = sorted({m for a in adapters.values() for m in a.modules()})
    layers: dict[str, MultiLoRALinear] = {}
    for path in paths:
        layer = named.get(path)
        if isinstance(layer, MultiLoRALinear):
            raise UserError(f"{path}: adapters are already attached to this model (detach them first)")
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            found = type(layer).__name__ if layer is not None else "nothing"
            raise UserError(f"adapter targets {path}, but the model has {found} there (adapter for another model?)")
        out_dims, in_dims = _dims(layer)
        factors = {}
        for name, adapter in adapters.items():
            key = f"{path}.lora_a"
            if key not in adapter.weights:
                continue
            a, b = adapter.weights[key], adapter.weights[f"{path}.lora_b"]
            if a.shape[0] != in_dims or b.shape[1] != out_dims:
                raise UserError(
                    f"{adapter.path or name}: {path} is {a.shape[0]}→{b.shape[1]} in the adapter but "
                    f"{in_dims}→{out_dims} in the model (adapter trained on another model?)"
                )
            factors[name] = (a.astype(mx.float32), b.astype(mx.float32), float(adapter.scale))
        # Evaluated now: a lazy array belongs to this thread's stream, and a server decodes on another.
        mx.eval([f[:2] for f in factors.values()])
        layers[path] = MultiLoRALinear(layer, factors)
    model.update_modules(tree_unflatten(list(layers.items())))
    live = LiveAdapters(model, dict(adapters), layers, parents)
    live.set_weights(**{name: float(weights.get(name, 0.0)) for name in adapters})
    return live


def load_with_adapters(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    sft: str | Path | None = None,
    pt: str | Path | None = None,
    alpha: float = 0.5,
    backend=None,
):
    """Load a model with its adapters attached live: the one loader for eval, sweeps, chat, pipeline.

    Args:
        model_dir: base model folder (MLX or HF safetensors).
        adapter: one adapter dir (a run, a merged or an imported adapter), applied with weight 1. If it
            was trained stacked on a PT run, that run is attached too (found via ``stacked_on``), so
            the model is exactly the one it was trained as.
        sft, pt: the study's pair, mixed with ``alpha`` (w_sft = α, w_pt = 1 − α); change it later
            with ``live.set_alpha``.
        alpha: initial α for the pair.
        backend: compute policy (detected when None).

    Returns:
        ``(LoadedModel, LiveAdapters)``, or ``(LoadedModel, None)`` without adapters.
    """
    from mlx_med.models import load_model

    check_adapter_choice(adapter, sft, pt)
    if adapter is not None:
        adapters = with_stacked_parent(read_adapter(adapter))
        weights = {"adapter": 1.0}
    elif sft is not None:
        adapters = load_pair(sft, pt)
        weights = {"sft": float(alpha), "pt": 1.0 - float(alpha)}
    else:
        adapters, weights = {}, {}
    loaded = load_model(model_dir, backend=backend)
    if not adapters:
        return loaded, None
    live = attach_adapters(loaded.model, adapters, weights)
    live.notes.extend(base_notes(model_dir, adapters))
    return loaded, live


def base_notes(model_dir: str | Path, adapters: dict[str, Adapter]) -> list[str]:
    """Warnings when an adapter records a base fingerprint other than this model folder's."""
    from mlx_med.fingerprint import model_fingerprint

    here = model_fingerprint(model_dir)
    return [
        f"warning: {a.path or n} was trained on {a.meta.base_model or '?'} (fingerprint {a.meta.base_fingerprint}), "
        f"not on {model_dir} (fingerprint {here}); shapes match, so it is applied anyway"
        for n, a in adapters.items()
        if a.meta.base_fingerprint and a.meta.base_fingerprint != here
    ]


def print_notes(live: LiveAdapters | None) -> None:
    """Echo ``live.notes`` to stderr (for commands)."""
    for note in live.notes if live else []:
        print(note, file=sys.stderr)


def _dims(layer: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = in_dims * 32 // layer.bits
    return out_dims, in_dims
