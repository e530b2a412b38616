"""The adapter mix: which adapters, with which weights, per module. The one rule every command applies.

Semantics (the same in ``merge``, ``fuse``, live α, and the report)::

    ΔW_merged = w_sft · ΔW_sft + w_pt · ΔW_pt,    --alpha a  ⇔  w_sft = a, w_pt = 1 − a

- **Adapter choice**: ``--adapter DIR`` (weight 1), or ``--sft RUN --pt RUN``, or none.
- **Weights**: ``--alpha A`` or ``--w-sft X --w-pt Y``, never both (``check_mix_flags``). α lies in
  [0, 1] in every command and defaults to 0.5 (``mlx_med.adapters.schedule``: ``check_alpha``,
  ``DEFAULT_ALPHA``); explicit w's may be any finite numbers.
- **Schedules**: ``--alpha-schedule FILE.yaml`` gives α per module (``schedule.AlphaSchedule``); a plain α
  is the schedule with no rules; ``--alpha`` given with a schedule (and ``/alpha``, ``sweep alpha``) moves
  its default, its rules stay.
- **Stacking**: an SFT run trained on top of a frozen PT run (``meta.stacked_on``) has the task vector
  ΔW_pt + ΔW_sft_own, so the weight of the SFT *model* also flows to the PT adapter
  (``component_weights``): with α, ΔW = ΔW_pt + α·ΔW_sft_own.

``resolve_mix`` turns the flags into an ``AdapterMix``, whose ``coefficients_for(module)`` fuse, merge and
live α all use; ``weighted_delta`` is the one dense Σ cᵢ·ΔWᵢ of a module. No model is loaded here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_med.adapters.format import WEIGHTS_FILE, Adapter, read_adapter
from mlx_med.adapters.schedule import AlphaSchedule, alpha_weights, check_alpha, resolve_schedule
from mlx_med.errors import UserError

# ------------------------------------------------------------------------------------- the rule


def check_adapter_choice(adapter: str | Path | None, sft: str | Path | None, pt: str | Path | None,
                         alpha: float | None = None) -> None:
    """Raise ``UserError`` unless the flags name one adapter, the SFT + PT pair, or none.

    Args:
        adapter, sft, pt: the flags' values (None when not given).
        alpha: when given, checked by ``check_alpha``.
    """
    if adapter is not None and (sft is not None or pt is not None):
        raise UserError("give either --adapter DIR or --sft RUN --pt RUN, not both")
    if (sft is None) != (pt is None):
        raise UserError("--sft and --pt go together (use --adapter DIR for a single adapter)")
    if alpha is not None:
        check_alpha(alpha)


def check_mix_flags(adapter: str | Path | None = None, sft: str | Path | None = None, pt: str | Path | None = None,
                    alpha: float | None = None, w_sft: float | None = None, w_pt: float | None = None,
                    schedule: str | Path | None = None) -> None:
    """All flag checks that need no file: the adapter choice, α's range, what goes with what.

    Raises:
        UserError: naming the flags that conflict.
    """
    check_adapter_choice(adapter, sft, pt, alpha)
    weights_given = w_sft is not None or w_pt is not None
    if adapter is not None and (alpha is not None or weights_given or schedule is not None):
        raise UserError("--alpha/--alpha-schedule/--w-sft/--w-pt weigh an --sft/--pt pair; "
                        "an --adapter is used with weight 1")
    if adapter is None and sft is None and (weights_given or schedule is not None):
        raise UserError("--alpha-schedule/--w-sft/--w-pt need --sft RUN --pt RUN")
    if weights_given and alpha is not None:
        raise UserError("give either --alpha or --w-sft/--w-pt, not both")
    if weights_given and schedule is not None:
        raise UserError("give either --alpha-schedule or --w-sft/--w-pt, not both")


def pair_weights(alpha: float | None = None, w_sft: float | None = None, w_pt: float | None = None) -> dict[str, float]:
    """The user's weights ``{"sft": w_sft, "pt": w_pt}`` from ``--alpha`` or ``--w-sft/--w-pt``.

    Raises:
        UserError: when both or neither forms are given, only one of ``w_sft``/``w_pt``, α outside
            [0, 1], or a weight that is not finite.
    """
    explicit = (w_sft is not None, w_pt is not None)
    if alpha is not None and any(explicit):
        raise UserError("give either --alpha or --w-sft/--w-pt, not both")
    if alpha is not None:
        return alpha_weights(alpha)
    if not all(explicit):
        if any(explicit):
            raise UserError("--w-sft and --w-pt go together (or use --alpha A for w_sft = A, w_pt = 1 − A)")
        raise UserError("missing --alpha (w_sft = alpha, w_pt = 1 − alpha) or --w-sft/--w-pt")
    for name, value in (("--w-sft", w_sft), ("--w-pt", w_pt)):
        if not math.isfinite(float(value)):
            raise UserError(f"{name} must be a finite number, got {value}")
    return {"sft": float(w_sft), "pt": float(w_pt)}


# ----------------------------------------------------------------------------------- adapter sets


def adapter_fingerprints(adapter: Adapter) -> set[str]:
    """Fingerprints a ``stacked_on`` reference to ``adapter`` may carry: ``file_fingerprint`` of its
    weights file (what ``train`` records) or ``path_fingerprint`` of it."""
    from mlx_med.fingerprint import file_fingerprint, path_fingerprint

    weights = Path(adapter.path or "") / WEIGHTS_FILE
    if adapter.path is None or not weights.is_file():
        return set()
    return {file_fingerprint(weights), path_fingerprint(weights)}


def stacked_parents(adapters: dict[str, Adapter]) -> dict[str, str]:
    """``{child: parent}`` for adapters trained on top of another adapter of the set.

    Raises:
        UserError: an adapter is stacked on one that is not in the set, or on a different one than given.
    """
    parents: dict[str, str] = {}
    for name, adapter in adapters.items():
        ref = adapter.meta.stacked_on
        if not ref:
            continue
        fingerprint, ref_path = str(ref.get("fingerprint") or ""), ref.get("path")
        found = _find_stacked_dir(adapter, ref_path)
        for other_name, other in adapters.items():
            if other is adapter:
                continue
            same_dir = found is not None and other.path is not None and found.resolve() == Path(other.path).resolve()
            if fingerprint and fingerprint in adapter_fingerprints(other):
                parents[name] = other_name
            elif same_dir and fingerprint:
                raise UserError(
                    f"{adapter.path or name}: was trained on top of {other.path} when its weights had fingerprint "
                    f"{fingerprint}, but they have changed since (PT retrained?); retrain the SFT run on it"
                )
            elif same_dir:
                parents[name] = other_name
        if name not in parents:
            given = ", ".join(f"{n}={a.path}" for n, a in adapters.items() if a is not adapter) or "none"
            raise UserError(
                f"{adapter.path or name}: was trained on top of the adapter {ref_path} "
                f"(fingerprint {fingerprint or '?'}), which is not among the adapters given ({given}); "
                "pass that PT run (e.g. --pt " + f"{ref_path})"
            )
    return parents


def component_weights(weights: dict[str, float], parents: dict[str, str]) -> dict[str, float]:
    """Coefficient on each stored adapter's own ΔW, given the user's weights on the *models*.

    A stacked child's model is its parent's model plus its own ΔW, so the child's weight also flows to
    every ancestor: {"sft": a, "pt": 1 − a} with sft stacked on pt gives {"sft": a, "pt": 1}.
    """
    coefficients = {name: 0.0 for name in weights}
    for name, weight in weights.items():
        node, seen = name, set()
        while node is not None:
            if node in seen:
                raise UserError(f"adapters are stacked on each other in a cycle ({' → '.join(seen)})")
            seen.add(node)
            coefficients[node] = coefficients.get(node, 0.0) + weight
            node = parents.get(node)
    return coefficients


def check_same_base(adapters: dict[str, Adapter]) -> None:
    """Refuse adapters trained on different bases (fingerprints that are known and differ)."""
    known = {n: a for n, a in adapters.items() if a.meta.base_fingerprint}
    if len({a.meta.base_fingerprint for a in known.values()}) > 1:
        lines = "; ".join(
            f"{n} ({a.path}) on {a.meta.base_model or '?'} [fingerprint {a.meta.base_fingerprint}]"
            for n, a in known.items()
        )
        raise UserError(f"adapters were trained on different base models: {lines}")


def load_pair(sft: str | Path, pt: str | Path) -> dict[str, Adapter]:
    """Read an SFT and a PT adapter dir; check they share a base and, if stacked, the PT run."""
    adapters = {"sft": read_adapter(sft), "pt": read_adapter(pt)}
    check_same_base(adapters)
    parents = stacked_parents(adapters)
    if parents.get("pt"):
        raise UserError(f"{pt}: the PT adapter is itself stacked on {adapters['pt'].meta.stacked_on}; "
                        "only SFT-on-PT stacking is supported")
    return adapters


def with_stacked_parent(adapter: Adapter) -> dict[str, Adapter]:
    """A single adapter as a set: itself, plus the PT run it was stacked on (read from its path)."""
    ref = adapter.meta.stacked_on
    if not ref:
        return {"adapter": adapter}
    ref_path = _find_stacked_dir(adapter, ref.get("path"))
    if ref_path is None:
        raise UserError(
            f"{adapter.path}: was trained on top of the PT adapter {ref.get('path')}, which is not there; "
            "pass --sft/--pt explicitly"
        )
    adapters = {"adapter": adapter, "stacked_on": read_adapter(ref_path)}
    stacked_parents(adapters)  # verifies the fingerprint
    check_same_base(adapters)
    return adapters


def _find_stacked_dir(adapter: Adapter, ref_path: str | None) -> Path | None:
    """The PT run a stacked adapter names: as recorded, or (a relative path recorded from another working
    directory) beside the SFT run, e.g. runs/pt next to runs/sft. The fingerprint is checked afterwards."""
    if not ref_path:
        return None
    candidates = [Path(ref_path)]
    if adapter.path is not None and not Path(ref_path).is_absolute():
        candidates += [Path(adapter.path).parent / Path(ref_path).name]
    return next((c for c in candidates if c.is_dir()), None)


# ------------------------------------------------------------------------------------------ mixes


@dataclass
class AdapterMix:
    """Adapters and the weight of each adapter's *model*, per module.

    ``weights`` are the weights of modules no schedule rule touches (for the pair: ``{sft: α, pt: 1 − α}``
    or the explicit w's); ``schedule`` (pair only) overrides them per module.
    """

    adapters: dict[str, Adapter]
    weights: dict[str, float]
    parents: dict[str, str] = field(default_factory=dict)
    schedule: AlphaSchedule | None = None

    def modules(self) -> list[str]:
        return sorted({m for a in self.adapters.values() for m in a.modules()})

    @property
    def alpha(self) -> float | None:
        """w_sft for an SFT/PT pair whose weights sum to 1, else None."""
        w = self.weights
        if set(w) == {"sft", "pt"} and math.isclose(w["sft"] + w["pt"], 1.0):
            return w["sft"]
        return None

    @property
    def coefficients(self) -> dict[str, float]:
        """Coefficient on each stored adapter's own ΔW for unscheduled modules (stacking resolved)."""
        return component_weights(self.weights, self.parents)

    def weights_for(self, module: str) -> dict[str, float]:
        """Weights of the models at one module (the schedule's α there, or ``weights``)."""
        if self.schedule is not None and not self.schedule.is_constant:
            return self.schedule.weights_for(module)
        return dict(self.weights)

    def coefficients_for(self, module: str) -> dict[str, float]:
        """Coefficient on each stored adapter's own ΔW at one module (stacking resolved)."""
        return component_weights(self.weights_for(module), self.parents)

    def set_alpha(self, alpha: float) -> None:
        """Move α (the schedule's default when there is one; its rules stay)."""
        if not {"sft", "pt"} <= set(self.adapters):
            raise UserError(f"alpha needs an SFT and a PT adapter; attached: {', '.join(self.adapters)}")
        if self.schedule is not None:
            self.schedule = self.schedule.with_default(alpha)
        self.weights = alpha_weights(alpha)

    def set_weights(self, **weights: float) -> None:
        """Change the weight of some adapters' models (by name); a schedule no longer applies."""
        unknown = sorted(set(weights) - set(self.adapters))
        if unknown:
            raise UserError(f"no adapter named {', '.join(unknown)} (attached: {', '.join(self.adapters)})")
        for name, value in weights.items():
            if not math.isfinite(float(value)):
                raise UserError(f"weight of {name} must be a finite number, got {value}")
        self.weights.update({k: float(v) for k, v in weights.items()})
        self.schedule = None

    def describe(self) -> str:
        """One line, e.g. ``α=0.5: sft=0.5 (runs/sft), pt=0.5 (runs/pt)``."""
        parts = [f"{n}={self.weights.get(n, 0.0):g} ({a.path or 'in memory'})" for n, a in self.adapters.items()]
        stacked = [f"{c} stacked on {p}" for c, p in self.parents.items()]
        if self.schedule is not None and not self.schedule.is_constant:
            head = f"{self.schedule.describe()}: "
        else:
            head = f"α={self.alpha:g}: " if self.alpha is not None else ""
        return head + ", ".join(parts) + (f"; {', '.join(stacked)}" if stacked else "")


def mix_of(adapters: dict[str, Adapter], weights: dict[str, float],
           schedule: AlphaSchedule | None = None) -> AdapterMix:
    """An ``AdapterMix`` over adapters already read (checks bases, stacking and the schedule's rules)."""
    check_same_base(adapters)
    mix = AdapterMix(dict(adapters), dict(weights), stacked_parents(adapters), schedule)
    if schedule is not None and not schedule.is_constant:
        if set(adapters) != {"sft", "pt"}:
            raise UserError("an alpha schedule weighs an --sft/--pt pair; a single --adapter has weight 1")
        schedule.check_against(mix.modules())
    return mix


def resolve_mix(
    adapter: str | Path | None = None,
    sft: str | Path | None = None,
    pt: str | Path | None = None,
    alpha: float | None = None,
    w_sft: float | None = None,
    w_pt: float | None = None,
    schedule: str | Path | AlphaSchedule | None = None,
) -> AdapterMix | None:
    """The one reading of the adapter flags every command makes; None when no adapter is named.

    Args:
        adapter: one adapter dir (weight 1; a stacked SFT run brings its PT run along).
        sft, pt: the study's pair.
        alpha: w_sft = α, w_pt = 1 − α, α in [0, 1] (``DEFAULT_ALPHA`` when no weights are given);
            with ``schedule``, the schedule's default.
        w_sft, w_pt: explicit weights instead of α (any finite numbers).
        schedule: an alpha schedule (file or object): α per module.

    Raises:
        UserError: conflicting or incomplete flags, α outside [0, 1], a bad schedule, broken stacking.
    """
    check_mix_flags(adapter, sft, pt, alpha, w_sft, w_pt, schedule)
    if adapter is not None:
        return mix_of(with_stacked_parent(read_adapter(adapter)), {"adapter": 1.0})
    if sft is None:
        return None
    if w_sft is not None or w_pt is not None:
        return mix_of(load_pair(sft, pt), pair_weights(None, w_sft, w_pt))
    plan = resolve_schedule(alpha, schedule)
    return mix_of(load_pair(sft, pt), alpha_weights(plan.default), plan if not plan.is_constant else None)


def weighted_delta(adapters: dict[str, Adapter], module: str, coefficients: dict[str, float]) -> mx.array | None:
    """Σ cᵢ·ΔWᵢ (out × in, fp32) of one module over the adapters that carry it; None when none does.

    Each ΔWᵢ comes from ``Adapter.delta`` (the one place a module's update is formed from its factors);
    adapters at coefficient 0 are skipped (all at 0: a zero ΔW).
    """
    carriers = {n: a for n, a in adapters.items() if a.has(module)}
    if not carriers:
        return None
    total = None
    for name, adapter in carriers.items():
        c = coefficients.get(name, 0.0)
        if c == 0.0:
            continue
        term = c * adapter.delta(module)
        if total is not None and term.shape != total.shape:
            raise UserError(f"{adapter.path or name}: {module} has ΔW of shape {tuple(term.shape)}, other adapters "
                            f"{tuple(total.shape)} (adapters for different models?)")
        total = term if total is None else total + term
    if total is None:
        in_dims, out_dims = next(iter(carriers.values())).dims(module)
        total = mx.zeros((out_dims, in_dims), dtype=mx.float32)
    return total


def relative_norm(diff: Any, ref: Any) -> float:
    """‖diff‖ / ‖ref‖ (Frobenius, in float64; MLX or numpy arrays); ‖diff‖ itself when ref is 0 and inf never."""
    import numpy as np

    def norm(x: Any) -> float:
        x = np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float64)
        return float(np.linalg.norm(x))

    ref_norm, diff_norm = norm(ref), norm(diff)
    return diff_norm / ref_norm if ref_norm > 0 else diff_norm
