"""Weighted merging of LoRA adapters in ΔW space.

Semantics (the same in ``merge``, ``fuse`` and the live-α layers of ``mlx_med.adapters.live``)::

    ΔW_merged = w_sft · ΔW_sft + w_pt · ΔW_pt,    --alpha a  ⇔  w_sft = a, w_pt = 1 − a

where each ΔW (out × in) = scale · (lora_a @ lora_b)ᵀ of its own adapter, with its own rank and scale.
This is the exact weighted sum of the two updates. Mixing the A and B factors separately (peft's
``combination_type="linear"``) is *not* this sum: it adds cross terms B_sft·A_pt (peft issue #3004).

Stacked adapters: when the SFT run was trained on top of a frozen PT adapter (``meta.stacked_on``
names that PT run), its own ΔW_sft_own was learned relative to base + ΔW_pt. "The SFT model" is then
base + ΔW_pt + ΔW_sft_own, so its task vector is ΔW_sft = ΔW_pt + ΔW_sft_own and

    ΔW_merged = w_sft · (ΔW_pt + ΔW_sft_own) + w_pt · ΔW_pt = (w_sft + w_pt) · ΔW_pt + w_sft · ΔW_sft_own

(with α: ΔW_pt + α · ΔW_sft_own). α = 1 is exactly the SFT model, α = 0 exactly the PT model, in both
the stacked and the independent case. A stacked SFT run is only merged with the PT run it was trained
on (its fingerprint is checked).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_med.adapters.format import WEIGHTS_FILE, Adapter, AdapterMeta, read_adapter, runtime_versions
from mlx_med.errors import UserError

METHODS = ("linear", "svd", "ties", "dare")


# --------------------------------------------------------------------------------------- weights


def pair_weights(alpha: float | None = None, w_sft: float | None = None, w_pt: float | None = None) -> dict[str, float]:
    """The user's weights ``{"sft": w_sft, "pt": w_pt}`` from ``--alpha`` or ``--w-sft/--w-pt``.

    Raises:
        UserError: when both or neither forms are given, or only one of ``w_sft``/``w_pt``.
    """
    explicit = (w_sft is not None, w_pt is not None)
    if alpha is not None and any(explicit):
        raise UserError("give either --alpha or --w-sft/--w-pt, not both")
    if alpha is None:
        if not all(explicit):
            if any(explicit):
                raise UserError("--w-sft and --w-pt go together (or use --alpha A for w_sft = A, w_pt = 1 − A)")
            raise UserError("missing --alpha (w_sft = alpha, w_pt = 1 − alpha) or --w-sft/--w-pt")
        return {"sft": float(w_sft), "pt": float(w_pt)}
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise UserError(f"--alpha must be a finite number, got {alpha}")
    return {"sft": alpha, "pt": 1.0 - alpha}


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


# ----------------------------------------------------------------------------------- validation


def check_same_base(adapters: dict[str, Adapter]) -> None:
    """Refuse adapters trained on different bases (fingerprints that are known and differ)."""
    known = {n: a for n, a in adapters.items() if a.meta.base_fingerprint}
    if len({a.meta.base_fingerprint for a in known.values()}) > 1:
        lines = "; ".join(
            f"{n} ({a.path}) on {a.meta.base_model or '?'} [fingerprint {a.meta.base_fingerprint}]"
            for n, a in known.items()
        )
        raise UserError(f"adapters were trained on different base models: {lines}")


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
            a_shape = (first.weights[f"{module}.lora_a"].shape[0], first.weights[f"{module}.lora_b"].shape[1])
            b_shape = (other.weights[f"{module}.lora_a"].shape[0], other.weights[f"{module}.lora_b"].shape[1])
            if a_shape != b_shape:
                raise UserError(
                    f"{module}: {first_name} adapts a {a_shape[0]}→{a_shape[1]} layer, {name} a "
                    f"{b_shape[0]}→{b_shape[1]} one (different models?)"
                )


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

    Raises:
        UserError: unknown method, bad rank/density, different bases or targets, broken stacking.
    """
    if method not in METHODS:
        raise UserError(f"unknown merge method {method!r} (choose from {', '.join(METHODS)})")
    if set(weights) != set(adapters):
        raise UserError(f"weights given for {sorted(weights)} but adapters are {sorted(adapters)}")
    check_same_base(adapters)
    check_same_targets(adapters)
    parents = stacked_parents(adapters)
    coefficients = component_weights(weights, parents)
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
        # Per-adapter factors with scale and coefficient folded into B: ΔW_i = B_iᵀ A_iᵀ.
        a_parts = [to_numpy(adapters[n].weights[f"{module}.lora_a"]) for n in names]
        b_parts = [to_numpy(adapters[n].weights[f"{module}.lora_b"]) * adapters[n].scale for n in names]
        a_cat = np.concatenate(a_parts, axis=1)
        b_cat = np.concatenate([b * coefficients[n] for n, b in zip(names, b_parts)], axis=0)
        if method == "linear":
            a_new, b_new = a_cat, b_cat
            report = ModuleReport(module, rank, 1.0, 0.0, 0.0)
        elif method == "svd":
            a_new, b_new, energy, err = _truncate_factors(a_cat, b_cat, rank)
            report = ModuleReport(module, rank, energy, err, err)
        else:
            tasks = _task_vectors(names, a_parts, b_parts, parents)
            task_weights = np.array([weights[n] for n in names])
            if method == "ties":
                dense = ties_delta(tasks, task_weights, density)
            else:
                dense = dare_delta(tasks, task_weights, density, _module_seed(seed, module))
            a_new, b_new, energy, err = _truncate_dense(dense, rank)
            exact = b_cat.T @ a_cat.T
            kept = b_new.T @ a_new.T
            report = ModuleReport(module, rank, energy, err, _rel(kept - exact, exact))
        new_weights[f"{module}.lora_a"] = a_new.astype(np.float32)
        new_weights[f"{module}.lora_b"] = b_new.astype(np.float32)
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


def _task_vectors(names, a_parts, b_parts, parents) -> list[np.ndarray]:
    """Dense ΔW of each *model* (a stacked child's includes its ancestors')."""
    own = {n: b.T @ a.T for n, a, b in zip(names, a_parts, b_parts)}
    out = []
    for name in names:
        total, node = np.zeros_like(own[name]), name
        while node is not None:
            total += own[node]
            node = parents.get(node)
        out.append(total)
    return out


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


def _rel(diff: np.ndarray, ref: np.ndarray) -> float:
    norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(diff)) / norm if norm > 0 else float(np.linalg.norm(diff))


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
