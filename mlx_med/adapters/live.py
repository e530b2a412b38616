"""Several LoRA adapters on one model with weights that change at run time (live α, no fuse).

Each targeted linear layer is wrapped in place by a ``MultiLoRALinear``::

    y = base(x) + Σᵢ cᵢ · sᵢ · (x @ aᵢ) @ bᵢ   computed as   y = base(x) + ((x @ A) * C) @ B,
    A = [a₁ | a₂ | …] (in × Σr),  B = [s₁b₁ ; s₂b₂ ; …] (Σr × out),  C = [c₁·1_{r₁} | c₂·1_{r₂} | …]

A and B are stacked once; a change of weights only rebuilds C (Σr numbers), so a change of α costs
nothing at generation time and the layer does one thin matmul pair whatever the number of adapters.
In fp32 on the CPU the second product is added into base(x) by the BLAS itself (``mx.addmm``) where
that rounds exactly as the separate add (``blas_adds_exactly``): one pass over the output instead of
three. For generation the stacked factors get packed copies like the base weights
(``pack_factors``, ``kernels.packed_factors``): from about 41 rows some of the thin products pass
OpenBLAS's small-matrix size and would go to its threaded driver, one thread hand-off each.
The coefficients cᵢ of each layer come from ``mlx_med.adapters.mix.AdapterMix`` (per module under an
α schedule; stacking resolved), so they mean what they mean in ``merge`` and ``fuse``, and the output
equals the fused model's. With every coefficient 0 the layer is the base layer alone.

Rows of one batch may carry different weights (``LiveAdapters.set_row_weights``: one coefficient
per batch row, so a server decodes several α in one forward pass). Then C has one row per batch row,
``C[row] = [c₁(row)·1_{r₁} | c₂(row)·1_{r₂} | …]``, and the same formula runs: a row of a mixed batch
gets bit for bit what the model-wide setting at its weights gives in a batch of the same shape.

The adapter factors are kept outside the model's parameter tree: ``model.parameters()`` still holds
only the base weights (under ``<module>.linear``), and ``LiveAdapters.detach()`` puts the original
layers back.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_med.adapters.format import Adapter
from mlx_med.adapters.mix import AdapterMix, component_weights, mix_of, resolve_mix
from mlx_med.adapters.schedule import AlphaSchedule
from mlx_med.errors import UserError


class MultiLoRALinear(nn.Module):
    """A linear (or quantized linear) layer plus several LoRA updates mixed with runtime weights."""

    def __init__(self, linear: nn.Module, factors: dict[str, tuple[mx.array, mx.array, float]]):
        super().__init__()
        self.linear = linear
        # object.__setattr__ keeps these out of the parameter tree (nn.Module stores arrays,
        # dicts and tuples as parameters).
        object.__setattr__(self, "_factors", factors)
        # (C, A, B, add into base(x) by the BLAS): the weights (per batch row, or one row for all)
        object.__setattr__(self, "_rows", None)
        object.__setattr__(self, "_stacked", None)  # (A, B) of every adapter, built on first use
        object.__setattr__(self, "_packed", (None, None))  # A and B packed for generation (pack_factors)

    @property
    def rank(self) -> int:
        """The adapters' ranks summed: the columns of the stacked ``x @ A`` product."""
        return sum(a.shape[1] for a, _, _ in self._factors.values())

    @property
    def compute_dtype(self) -> mx.Dtype:
        if isinstance(self.linear, nn.QuantizedLinear):
            return self.linear.scales.dtype
        return self.linear.weight.dtype

    def set_coefficients(self, coefficients: dict[str, float | mx.array], memo: dict | None = None) -> None:
        """Set the adapters' weights (one per adapter name) for the next forward passes.

        Both forms run the same arithmetic, ``y + ((x @ A) * c) @ B`` with every adapter's factors
        stacked (B already times its LoRA scale) and ``c`` each adapter's weight repeated over its
        rank: a row of a mixed-α batch gets bit for bit the numbers of the model-wide setting at its
        weights in a batch of the same shape. (Across batch shapes the BLAS may pick other kernels
        for the thin LoRA products and round differently in the last bits.)

        Args:
            coefficients: adapter name → a number (every row alike), or an array of shape (B,) with
                one coefficient per batch row (the next inputs must then have B rows, or 1 row).
            memo: a dict shared by the layers of one model for one set of per-row coefficients,
                so the (rows × Σr) coefficient matrix is built once per adapter layout, not per layer.
        """
        per_row = any(isinstance(c, mx.array) and c.ndim > 0 for c in coefficients.values())
        if not per_row and all(float(c) == 0.0 for c in coefficients.values()):
            object.__setattr__(self, "_rows", None)  # the base layer alone
            return
        dtype = self.compute_dtype
        stacked = self._stacked_factors()
        layout = (tuple((n, a.shape[1]) for n, (a, _, _) in self._factors.items()), dtype)
        if per_row:
            memo = {} if memo is None else memo
            if layout not in memo:
                rows = max(c.shape[0] for c in coefficients.values() if isinstance(c, mx.array) and c.ndim > 0)
                # Each adapter's coefficient repeated over its rank: C is (rows, Σr), one row per batch row.
                columns = [mx.broadcast_to(mx.array(coefficients.get(n, 0.0), dtype=mx.float32).reshape(-1, 1),
                                           (rows, r)) for n, r in layout[0]]
                memo[layout] = mx.concatenate(columns, axis=1).astype(dtype)[:, None, :]
            c = memo[layout]
        else:  # one coefficient row for every input row
            c = mx.concatenate([mx.full((r,), float(coefficients.get(n, 0.0)), dtype=mx.float32)
                                for n, r in layout[0]]).astype(dtype)
        if not per_row:
            # evaluated now: a lazy array belongs to the stream it was built on, and the thread that sets
            # model-wide weights (the server's worker when it stops, on mlx-lm's generation stream) need
            # not be the one that runs next. Per-row weights are set by the thread about to run them and
            # stay lazy: an eval there would wait for the decode step in flight.
            mx.eval(c)
        accumulate = dtype == mx.float32 and mx.default_device() == mx.cpu and blas_adds_exactly(self.rank)
        object.__setattr__(self, "_rows", (c, *stacked, accumulate))

    def _stacked_factors(self) -> tuple[mx.array, mx.array]:
        """Every adapter's ``A`` side by side and its ``B`` (times its LoRA scale) stacked, in the
        compute dtype: built once, as the factors never change."""
        if self._stacked is None:
            dtype = self.compute_dtype
            a = mx.concatenate([a for a, _, _ in self._factors.values()], axis=1).astype(dtype)
            b = mx.concatenate([b * s for _, b, s in self._factors.values()], axis=0).astype(dtype)
            mx.eval(a, b)
            object.__setattr__(self, "_stacked", (a, b))
        return self._stacked

    def pack_factors(self, pack) -> bool:
        """Give the stacked factors packed copies for generation: ``pack(factor)`` (``kernels.packed_factors``)
        returns one whose ``matmul`` gives MLX's ``x @ factor`` bits where it runs, else None. Whether
        any was packed. Stacks the factors if no weights have done so yet: a server that starts with
        every adapter weight at 0 packs once, at start-up, and its later mixed batches find them packed."""
        if all(p is None for p in self._packed):  # the stacked factors never change once built
            object.__setattr__(self, "_packed", tuple(pack(f) for f in self._stacked_factors()))
        return any(p is not None for p in self._packed)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self._rows is None:
            return y
        c, a, b, accumulate = self._rows
        pack_a, pack_b = self._packed
        t = _packed_or_mlx(pack_a, x, a) * c
        tb = None if pack_b is None else pack_b.matmul(t)
        if tb is not None:  # the same bits as t @ b, so the add rounds as mx.addmm(y, t, b) does
            return y + tb
        if accumulate:  # 2-D: a batched addmm runs one GEMM per batch entry, which rounds otherwise
            return mx.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1]), b).reshape(y.shape)
        return y + (t @ b).astype(y.dtype)


def _packed_or_mlx(packed, x: mx.array, factor: mx.array) -> mx.array:
    """``x @ factor`` over its packed copy where that runs (MLX's bits), else MLX's own product."""
    out = None if packed is None else packed.matmul(x)
    return x @ factor if out is None else out


@functools.cache
def blas_adds_exactly(rank: int) -> bool:
    """Whether ``mx.addmm(y, t, b)`` gives bit for bit ``y + t @ b`` (fp32, CPU) for ``t`` of ``rank`` columns.

    OpenBLAS sums each output's ``rank`` products in registers and adds that sum to C once (the whole
    inner dimension fits one of its blocks), so adding into y rounds as the separate add does, while
    skipping the pass that zeroes the product's output and the add's pass over both: 3–9% of a
    prefill of the demo model with live adapters, 1–3 ms of an 8-row decode step. A BLAS that accumulates term
    by term into C (the reference BLAS) rounds otherwise. Probed once per rank on a few shapes, with
    its own random key (the global generator, which seeds sampling, is not touched).
    """
    key = mx.random.key(rank)
    with mx.stream(mx.cpu):
        for rows in (1, 7, 64, 300):
            for width in (64, 600):
                k1, k2, k3, key = mx.random.split(key, 4)
                t = mx.random.normal((rows, rank), key=k1)
                b = mx.random.normal((rank, width), key=k2)
                y = mx.random.normal((rows, width), key=k3)
                if not mx.array_equal(mx.addmm(y, t, b), y + t @ b).item():
                    return False
    return True


@dataclass
class LiveAdapters:
    """Handle on the adapters attached to a model; change their weights with ``set_weights``/``set_alpha``.

    ``weights`` are weights on the *models* (for an SFT/PT pair: w_sft, w_pt as in ``merge``), not on
    the stored adapters; the ``AdapterMix`` resolves them (per module under a schedule, stacking included).
    """

    model: nn.Module
    mix: AdapterMix
    layers: dict[str, MultiLoRALinear]
    notes: list[str] = field(default_factory=list)

    @property
    def adapters(self) -> dict[str, Adapter]:
        return self.mix.adapters

    @property
    def parents(self) -> dict[str, str]:
        return self.mix.parents

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.mix.weights)

    @property
    def coefficients(self) -> dict[str, float]:
        """Coefficient on each stored adapter's own ΔW (stacking resolved; unscheduled modules)."""
        return self.mix.coefficients

    @property
    def alpha(self) -> float | None:
        """w_sft for an SFT/PT pair whose weights sum to 1 (a schedule's default), else None."""
        return self.mix.alpha

    @property
    def schedule(self) -> AlphaSchedule | None:
        return self.mix.schedule

    def set_weights(self, **weights: float) -> None:
        """Change the weight of some adapters (by name); the others keep theirs (a schedule is dropped)."""
        self.mix.set_weights(**weights)
        self._apply()

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

    def clear_row_weights(self) -> None:
        """Return every row to the model-wide weights (``weights``; a schedule stays)."""
        self._apply()

    def set_alpha(self, alpha: float) -> None:
        """w_sft = α, w_pt = 1 − α (with a schedule: its default; its rules stay)."""
        self.mix.set_alpha(alpha)
        self._apply()

    def describe(self) -> str:
        """One line for logs and the chat banner, e.g. ``α=0.5: sft=0.5 (runs/sft), pt=0.5 (runs/pt)``."""
        return self.mix.describe()

    def detach(self) -> nn.Module:
        """Put the original layers back; the model is the base model again."""
        self.model.update_modules(tree_unflatten([(p, layer.linear) for p, layer in self.layers.items()]))
        self.layers = {}
        return self.model

    def _apply(self) -> None:
        for path, layer in self.layers.items():
            layer.set_coefficients(self.mix.coefficients_for(path))


def attach_adapters(model: nn.Module, adapters: dict[str, Adapter] | AdapterMix,
                    weights: dict[str, float] | None = None) -> LiveAdapters:
    """Wrap every layer any adapter targets with a ``MultiLoRALinear``, in place.

    Args:
        model: an mlx-lm model (the targeted layers must be ``nn.Linear`` or ``nn.QuantizedLinear``).
        adapters: name → adapter (``{"sft": …, "pt": …}`` for the study's pair), or an ``AdapterMix``.
        weights: name → weight of that adapter's model (missing names get 0); not with a mix.

    Raises:
        UserError: a targeted module is missing or has other dimensions; adapters on different bases.
    """
    if isinstance(adapters, AdapterMix):
        mix = adapters
    else:
        mix = mix_of(adapters, {name: float((weights or {}).get(name, 0.0)) for name in adapters})
    adapters = mix.adapters
    named = dict(model.named_modules())
    paths = mix.modules()
    layers: dict[str, MultiLoRALinear] = {}
    for path in paths:
        layer = named.get(path)
        if isinstance(layer, MultiLoRALinear):
            raise UserError(f"{path}: adapters are already attached to this model (detach them first)")
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            found = type(layer).__name__ if layer is not None else "nothing"
            raise UserError(f"adapter targets {path}, but the model has {found} there (adapter for another model?)")
        out_dims, in_dims = layer_dims(layer)
        factors = {}
        for name, adapter in adapters.items():
            if not adapter.has(path):
                continue
            if adapter.dims(path) != (in_dims, out_dims):
                a_in, a_out = adapter.dims(path)
                raise UserError(
                    f"{adapter.path or name}: {path} is {a_in}→{a_out} in the adapter but "
                    f"{in_dims}→{out_dims} in the model (adapter trained on another model?)"
                )
            a, b = adapter.raw_factors(path)
            factors[name] = (a.astype(mx.float32), b.astype(mx.float32), float(adapter.scale))
        # Evaluated now: a lazy array belongs to this thread's stream, and a server decodes on another.
        mx.eval([f[:2] for f in factors.values()])
        layers[path] = MultiLoRALinear(layer, factors)
    model.update_modules(tree_unflatten(list(layers.items())))
    live = LiveAdapters(model, mix, layers)
    live._apply()
    return live


def load_with_adapters(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    sft: str | Path | None = None,
    pt: str | Path | None = None,
    alpha: float | None = None,
    backend=None,
    alpha_schedule: str | Path | AlphaSchedule | None = None,
    w_sft: float | None = None,
    w_pt: float | None = None,
):
    """Load a model with its adapters attached live: the one loader for eval, sweeps, chat, pipeline.

    Args:
        model_dir: base model folder (MLX or HF safetensors).
        adapter: one adapter dir (a run, a merged or an imported adapter), applied with weight 1. If it
            was trained stacked on a PT run, that run is attached too (found via ``stacked_on``), so
            the model is exactly the one it was trained as.
        sft, pt: the study's pair, mixed with ``alpha`` (w_sft = α, w_pt = 1 − α); change it later
            with ``live.set_alpha``.
        alpha: initial α for the pair (``mix.DEFAULT_ALPHA`` when None and no schedule or w's).
        backend: compute policy (detected when None).
        alpha_schedule: α per module (a schedule file or object) instead of ``alpha``.
        w_sft, w_pt: explicit weights instead of ``alpha``.

    Returns:
        ``(LoadedModel, LiveAdapters)``, or ``(LoadedModel, None)`` without adapters.
    """
    from mlx_med.models import load_model

    mix = resolve_mix(adapter, sft, pt, alpha, w_sft, w_pt, alpha_schedule)
    loaded = load_model(model_dir, backend=backend)
    if mix is None:
        return loaded, None
    live = attach_adapters(loaded.model, mix)
    live.notes.extend(base_notes(model_dir, mix.adapters))
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


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear or quantized linear layer (a quantized weight packs 32 // bits inputs per word)."""
    out_dims, in_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = in_dims * 32 // layer.bits
    return out_dims, in_dims
