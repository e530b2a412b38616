"""Weighted merging of LoRA adapters in ΔW space: SFT + PT → one new adapter.

The weights, stacking and schedules are ``mlx_med.adapters.mix``'s (ΔW_merged = Σ cᵢ·ΔWᵢ with the
coefficients cᵢ it resolves, per module under a schedule). Mixing the A and B factors separately
(peft's ``combination_type="linear"``) is *not* this sum: it adds cross terms B_sft·A_pt.

Methods (``merge_adapters``):

- ``linear``: exact. The factors are concatenated along the rank, the weights folded into B:
  lora_a = [a_sft | a_pt], lora_b = [c_sft·s_sft·b_sft ; c_pt·s_pt·b_pt], scale 1, rank r_sft + r_pt.
  Equal to peft's ``add_weighted_adapter(..., combination_type="cat")``.
- ``svd``: the exact ΔW_merged truncated to ``rank`` singular values (computed from the low-rank
  factors via two QR decompositions, so it costs O((out + in)·r²)); reports the retained energy
  Σᵢ≤ₖ σᵢ² / Σ σᵢ² and the relative Frobenius error per module. Exact when rank ≥ r_sft + r_pt.
- ``ties`` (Yadav et al. 2023, as in mergekit): each task vector keeps its ``density`` fraction of
  largest-magnitude entries; the sign of each entry is elected from the weighted sum; entries that
  disagree with it are dropped and the rest averaged with their weights (Σ wᵢτᵢ / Σ wᵢ over the
  agreeing tasks). With equal weights 1 this is peft's ``ties``. The dense result is truncated by SVD
  to ``rank``.
- ``dare`` (Yu et al. 2023, peft's ``dare_linear``): each task vector keeps each entry with probability
  ``density`` (seeded, per module) and is rescaled by 1/density; then the weighted sum; truncated by SVD.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_med.adapters.format import WEIGHTS_FILE, Adapter, AdapterMeta, factor_weights, runtime_versions
from mlx_med.adapters.mix import component_weights, mix_of, relative_norm, weighted_delta
from mlx_med.adapters.schedule import AlphaSchedule
from mlx_med.errors import UserError

METHODS = ("linear", "svd", "ties", "dare")
REPORT_FILE = "merge_report.json"


def check_same_targets(adapters: dict[str, Adapter]) -> None:
    """Refuse adapters that update different modules or the same module with different shapes."""
    items = list(adapters.items())
    first_name, first = items[0]
    for name, other in items[1:]:
        mine, theirs = set(first.modules()), set(other.modules())
        if mine != theirs:
            only_a, only_b = sorted(mine - theirs), sorted(theirs - mine)
            raise UserError(
                f"adapters target different modules: {first_name} ({first.path}) has {len(mine)}, "
                f"{name} ({other.path}) has {len(theirs)}; only in {first_name}: {_few(only_a)}; "
                f"only in {name}: {_few(only_b)}"
            )
        for module in sorted(mine):
            a_shape, b_shape = first.dims(module), other.dims(module)
            if a_shape != b_shape:
                raise UserError(
                    f"{module}: {first_name} adapts a {a_shape[0]}→{a_shape[1]} layer, {name} a "
                    f"{b_shape[0]}→{b_shape[1]} one (different models?)"
                )


# --------------------------------------------------------------------------------------- merging


@dataclass
class ModuleReport:
    module: str
    rank: int
    energy: float  # fraction of ‖ΔW‖² kept by the rank-truncation (1.0 for linear)
    rel_error: float  # ‖ΔW_kept − ΔW_method‖ / ‖ΔW_method‖
    rel_diff_linear: float  # ‖ΔW_kept − ΔW_exact‖ / ‖ΔW_exact‖, distance from the exact weighted sum


@dataclass
class MergeResult:
    adapter: Adapter
    method: str
    weights: dict[str, float]
    coefficients: dict[str, float]
    modules: list[ModuleReport] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        errors = [m.rel_error for m in self.modules]
        energies = [m.energy for m in self.modules]
        return {
            "method": self.method,
            "rank": self.adapter.rank,
            "weights": self.weights,
            "coefficients": self.coefficients,
            "modules": len(self.modules),
            "min_energy": min(energies, default=1.0),
            "mean_energy": float(np.mean(energies)) if energies else 1.0,
            "max_rel_error": max(errors, default=0.0),
            "mean_rel_error": float(np.mean(errors)) if errors else 0.0,
            "max_rel_diff_linear": max((m.rel_diff_linear for m in self.modules), default=0.0),
        }


def merge_adapters(
    adapters: dict[str, Adapter],
    weights: dict[str, float],
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    progress: bool = False,
    schedule: AlphaSchedule | None = None,
) -> MergeResult:
    """Merge adapters into one new ``Adapter`` (see the module docstring for the exact formulas).

    Args:
        adapters: name → adapter, e.g. ``load_pair(sft, pt)``; names must match ``weights``.
        weights: the weight of each *model* (``pair_weights``); stacked adapters are resolved here.
        method: ``linear`` | ``svd`` | ``ties`` | ``dare``.
        rank: output rank for svd/ties/dare (default max rank for svd, sum of ranks for ties/dare).
        density: fraction kept by ties/dare, in (0, 1].
        seed: seed of dare's random masks.
        progress: show a tqdm bar over modules.
        schedule: an α schedule for the SFT/PT pair: each module's weights are the schedule's there
            (``weights`` are then the schedule's default). Exact for ``linear``.

    Raises:
        UserError: unknown method, bad rank/density, different bases or targets, broken stacking,
            a schedule rule naming what the adapters do not touch.
    """
    if method not in METHODS:
        raise UserError(f"unknown merge method {method!r} (choose from {', '.join(METHODS)})")
    if set(weights) != set(adapters):
        raise UserError(f"weights given for {sorted(weights)} but adapters are {sorted(adapters)}")
    check_same_targets(adapters)
    mix = mix_of(adapters, weights, schedule)
    parents, coefficients = mix.parents, mix.coefficients
    ranks = {n: a.rank for n, a in adapters.items()}
    if method in ("ties", "dare"):
        if density is None:
            raise UserError(f"--density is required for {method} (fraction of each ΔW kept, e.g. 0.5)")
        if not 0.0 < density <= 1.0:
            raise UserError(f"--density must be in (0, 1], got {density}")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    if method == "svd":
        rank = rank or max(ranks.values())
    elif method in ("ties", "dare"):
        rank = rank or sum(ranks.values())
    else:
        rank = sum(ranks.values())

    names = list(adapters)
    modules = adapters[names[0]].modules()
    new_weights: dict[str, Any] = {}
    reports: list[ModuleReport] = []
    for module in _progress(modules, progress, f"merge ({method})"):
        # Per-adapter factors with scale folded into B (ΔW_i = B_iᵀ A_iᵀ), then this module's coefficients.
        a_parts, b_parts = zip(*[(to_numpy(a), to_numpy(b)) for a, b in (adapters[n].factors(module) for n in names)])
        module_coefficients = mix.coefficients_for(module)
        a_cat = np.concatenate(a_parts, axis=1)
        b_cat = np.concatenate([b * module_coefficients[n] for n, b in zip(names, b_parts)], axis=0)
        if method == "linear":
            a_new, b_new = a_cat, b_cat
            report = ModuleReport(module, rank, 1.0, 0.0, 0.0)
        elif method == "svd":
            a_new, b_new, energy, err = _truncate_factors(a_cat, b_cat, rank)
            report = ModuleReport(module, rank, energy, err, err)
        else:
            # Each model's task vector (a stacked child's includes its parent's), and the exact weighted sum.
            tasks = [to_numpy(weighted_delta(adapters, module, component_weights({n: 1.0}, parents))) for n in names]
            module_weights = mix.weights_for(module)
            task_weights = np.array([module_weights[n] for n in names])
            if method == "ties":
                dense = ties_delta(tasks, task_weights, density)
            else:
                dense = dare_delta(tasks, task_weights, density, _module_seed(seed, module))
            a_new, b_new, energy, err = _truncate_dense(dense, rank)
            exact = to_numpy(weighted_delta(adapters, module, module_coefficients))
            kept = b_new.T @ a_new.T
            report = ModuleReport(module, rank, energy, err, relative_norm(kept - exact, exact))
        new_weights.update(factor_weights(module, a_new.astype(np.float32), b_new.astype(np.float32)))
        reports.append(report)

    first = adapters[names[0]]
    meta = AdapterMeta(
        phase="merged",
        base_model=next((a.meta.base_model for a in adapters.values() if a.meta.base_model), ""),
        base_fingerprint=next((a.meta.base_fingerprint for a in adapters.values() if a.meta.base_fingerprint), ""),
        lora_alpha=float(rank),  # scale 1 ⇒ PEFT lora_alpha = scale · r = r
        target_modules=sorted({t for a in adapters.values() for t in a.meta.target_modules}),
        versions=runtime_versions(),
        extra={"merge": {
            "method": method, "weights": weights, "coefficients": coefficients, "rank": rank,
            "density": density, "seed": seed if method == "dare" else None,
            "alpha_schedule": mix.schedule.to_json() if mix.schedule is not None else None,
            "stacked": {c: p for c, p in parents.items()},
            "sources": {
                n: {"path": str(a.path) if a.path else None, "phase": a.meta.phase, "rank": a.rank,
                    "scale": a.scale, "fingerprint": _weights_fingerprint(a)}
                for n, a in adapters.items()
            },
        }},
    )
    merged = Adapter(
        rank=rank, scale=1.0, num_layers=max(a.num_layers for a in adapters.values()), keys=list(first.keys),
        weights={k: mx.array(v) for k, v in new_weights.items()}, meta=meta,
    )
    return MergeResult(merged, method, dict(weights), coefficients, reports)


def combine_stacked(adapter: Adapter) -> tuple[Adapter, Path]:
    """An SFT run trained stacked on a PT run as one adapter, "the SFT model": ΔW_pt + ΔW_sft_own.

    Exact (a linear merge, rank r_pt + r_sft). Returns the combined adapter and the PT run's path;
    PEFT and GGUF adapter export both call it.
    """
    from mlx_med.adapters.mix import with_stacked_parent

    adapters = with_stacked_parent(adapter)
    combined = merge_adapters(adapters, {"adapter": 1.0, "stacked_on": 0.0}, "linear").adapter
    return combined, adapters["stacked_on"].path


def write_merged(result: MergeResult, out_dir: str | Path, force: bool = False,
                 inputs: Iterable[str | Path | None] = ()) -> Path:
    """Write a merge's adapter dir plus ``merge_report.json`` (summary and per-module table), atomically.

    The one writer of a merged adapter: ``mlx-med merge`` and the pipeline's merge stage both call it.
    """
    from mlx_med.adapters.format import write_adapter
    from mlx_med.io import atomic_output_dir, atomic_write_json

    with atomic_output_dir(out_dir, force=force, inputs=inputs) as tmp:
        write_adapter(result.adapter, tmp)
        atomic_write_json(tmp / REPORT_FILE, {
            "summary": result.summary(),
            "modules": [vars(m) for m in result.modules],
        })
    result.adapter.path = Path(out_dir)
    return Path(out_dir)


def ties_delta(tasks: list[np.ndarray], weights: np.ndarray, density: float) -> np.ndarray:
    """TIES merge of dense task vectors (trim to ``density`` by magnitude, elect sign, disjoint mean).

    The sign is elected from the weighted sum and agreeing entries are averaged with their weights
    (mergekit's ``ties`` with ``normalize``); with weights all 1 this equals ``peft.utils.merge_utils.ties``.
    """
    trimmed = np.stack([_keep_top(t, density) for t in tasks])
    w = weights.reshape((-1,) + (1,) * (trimmed.ndim - 1))
    weighted = trimmed * w
    majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(weighted) == majority
    mixed = (weighted * agree).sum(axis=0)
    divisor = (w * agree).sum(axis=0)
    divisor[divisor == 0] = 1.0
    return mixed / divisor


def dare_delta(tasks: list[np.ndarray], weights: np.ndarray, density: float, seed: np.random.SeedSequence) -> np.ndarray:
    """DARE (linear): drop each entry with probability 1 − density, rescale by 1/density, weighted sum."""
    rngs = [np.random.default_rng(s) for s in seed.spawn(len(tasks))]
    out = np.zeros_like(tasks[0])
    for task, weight, rng in zip(tasks, weights, rngs):
        keep = rng.random(task.shape) < density
        out += weight * np.where(keep, task / density, 0.0)
    return out


def to_numpy(array: mx.array) -> np.ndarray:
    """An MLX array as float64 numpy (numpy has no bfloat16, so go through fp32)."""
    return np.array(array.astype(mx.float32), dtype=np.float64)


def _keep_top(tensor: np.ndarray, density: float) -> np.ndarray:
    """Zero all but the ``int(density · size)`` largest-magnitude entries (peft's magnitude pruning)."""
    if density >= 1.0:
        return tensor
    k = int(density * tensor.size)
    flat = np.abs(tensor).reshape(-1)
    mask = np.zeros(flat.shape, dtype=bool)
    if k > 0:
        mask[np.argpartition(flat, flat.size - k)[flat.size - k:]] = True
    return tensor * mask.reshape(tensor.shape)


def _truncate_factors(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Best rank-``rank`` factors of ΔW = bᵀ aᵀ, via QR of the factors and an SVD of the small core."""
    q1, r1 = np.linalg.qr(b.T)  # (out, R), (R, R)
    q2, r2 = np.linalg.qr(a)  # (in, R), (R, R)
    u, s, vt = np.linalg.svd(r1 @ r2.T)
    return _factors_from_svd(q1 @ u, s, (q2 @ vt.T).T, rank)


def _truncate_dense(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return _factors_from_svd(u, s, vt, rank)


def _factors_from_svd(u, s, vt, rank) -> tuple[np.ndarray, np.ndarray, float, float]:
    """lora_a (in × rank), lora_b (rank × out) with ΔW_k = lora_bᵀ lora_aᵀ; zero-padded past len(s)."""
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    a = np.zeros((vt.shape[1], rank))
    b = np.zeros((rank, u.shape[0]))
    a[:, :k] = vt[:k].T * root
    b[:k] = root[:, None] * u[:, :k].T
    total = float(np.sum(s**2))
    kept = float(np.sum(s[:k] ** 2))
    energy = kept / total if total > 0 else 1.0
    return a, b, energy, math.sqrt(max(0.0, 1.0 - energy))


def _module_seed(seed: int, module: str) -> np.random.SeedSequence:
    # Masks depend on (seed, module) only, not on the order modules are visited.
    return np.random.SeedSequence([seed, zlib.crc32(module.encode())])


def _weights_fingerprint(adapter: Adapter) -> str | None:
    from mlx_med.fingerprint import file_fingerprint

    if adapter.path is None or not (Path(adapter.path) / WEIGHTS_FILE).is_file():
        return None
    return file_fingerprint(Path(adapter.path) / WEIGHTS_FILE)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="module")


def _few(items: list[str], n: int = 3) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
