"""Where the SFT and PT adapters pull the same weights apart: per-module interference measures.

For each module both adapters update, with ΔW (out × in) = s · (a @ b)ᵀ, a = lora_a (in × r),
b = lora_b (r × out) (the adapter-dir layout, ``Adapter.raw_factors``):

- ``norm_sft``, ``norm_pt``: ‖ΔW‖_F, from the factors: ‖ΔW‖² = s² · tr((aᵀa)(b bᵀ)).
- ``rel_sft``, ``rel_pt``: ‖ΔW‖ / ‖W‖ when the base model is given (only those weights are read).
- ``cosine``: ⟨ΔW₁, ΔW₂⟩ / (‖ΔW₁‖‖ΔW₂‖) with ⟨ΔW₁, ΔW₂⟩ = s₁s₂ · tr((a₂ᵀa₁)(b₁b₂ᵀ)): an r₂ × r₁
  times an r₁ × r₂ product, so ΔW is never formed.
- ``overlap_out``, ``overlap_in``: how much the column (output) and row (input) subspaces of the two
  updates coincide: the mean cos² of their principal angles (1 = one subspace contains the other,
  0 = orthogonal). The subspaces are ΔW's own (singular vectors with σ > 1e-6·σ_max, found by QR of
  the factors and an SVD of the r × r core), so a factor with dependent columns does not inflate them.
- ``sign_conflict``: TIES' notion. An entry is *large* in an update when its |value| is among that
  update's top ``top_fraction`` (default 20%, TIES' density); of the entries large in both, the
  fraction whose signs differ (0 = they agree, 1 = always opposed, about 0.5 for unrelated updates).
  ``both_large`` is the fraction of all entries that are large in both. The entries are computed from
  the factors: all of them for a layer of up to ``SAMPLE_ENTRIES`` (262,144) entries, else those on a
  random grid of that many (random rows × random columns, seeded by the module path; the thresholds
  are then the sample's quantiles; about 10,000 entries are large in both), so a 5120 × 13824 layer
  costs what a small one does.
- ``merged_norm``: ‖c_sft·ΔW_sft + c_pt·ΔW_pt‖ at the chosen α (c = α, 1 − α; for a stacked SFT run
  c = α, 1: the merge's own coefficients, ``merge.component_weights``), ``merged_over_sft`` and
  ``merged_over_pt`` that norm relative to ‖ΔW_sft‖ and ‖ΔW_pt‖, and ``cancelled`` =
  1 − ‖merged‖² / (‖c_sft·ΔW_sft‖² + ‖c_pt·ΔW_pt‖²), the share of the two weighted parts' energy the
  merge cancels: 0 for orthogonal parts (nothing cancels, nothing adds up), 1 when they cancel
  completely, negative when they reinforce (−1 for equal, parallel parts).

A stacked SFT run (trained on top of the frozen PT adapter, ``meta.stacked_on``) stores only its own
ΔW_sft_own; that is what is compared with ΔW_pt (what SFT added on top of PT, against PT itself).

Entry point: ``analyse_pair(sft, pt, alpha, model=None) -> Interference``.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_med.adapters.format import Adapter, layer_index, module_type
from mlx_med.adapters.mix import component_weights, load_pair, pair_weights, stacked_parents
from mlx_med.errors import UserError

TOP_FRACTION = 0.2  # TIES' default density: the top 20% of entries by magnitude count as "large"
RANK_TOLERANCE = 1e-6  # singular values below this × the largest do not span the update's subspace
SAMPLE_ENTRIES = 1 << 18  # sign conflict: every entry up to this many, else this many sampled ones
TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # data flow order
COLUMNS = ("module", "layer", "type", "norm_sft", "norm_pt", "norm_base", "rel_sft", "rel_pt", "cosine",
           "overlap_out", "overlap_in", "sign_conflict", "both_large", "merged_norm", "merged_over_sft",
           "merged_over_pt", "cancelled")


@dataclass
class ModuleInterference:
    """The measures of one adapted module (see the module docstring); NaN where undefined."""

    module: str
    layer: int | None
    type: str
    norm_sft: float
    norm_pt: float
    norm_base: float | None
    rel_sft: float | None
    rel_pt: float | None
    cosine: float
    overlap_out: float
    overlap_in: float
    sign_conflict: float
    both_large: float
    merged_norm: float
    merged_over_sft: float
    merged_over_pt: float
    cancelled: float

    def row(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Interference:
    """The analysis of one SFT/PT pair."""

    sft: Path
    pt: Path
    alpha: float
    coefficients: dict[str, float]
    stacked: bool
    top_fraction: float
    model: Path | None
    modules: list[ModuleInterference]
    only_sft: list[str] = field(default_factory=list)  # modules one adapter updates and the other does not
    only_pt: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------ low-rank algebra


def module_position(module: str) -> tuple[int | None, str]:
    """``(layer index or None, module type)``; the type is the last name of the path (``q_proj``)."""
    return layer_index(module), module_type(module)


def type_order(rows: list[ModuleInterference]) -> list[str]:
    """The module types present, attention then MLP in data-flow order, any others after, as they come."""
    present = list(dict.fromkeys(row.type for row in rows))
    return [t for t in TYPE_ORDER if t in present] + [t for t in present if t not in TYPE_ORDER]


def low_rank_inner(a1: np.ndarray, b1: np.ndarray, s1: float, a2: np.ndarray, b2: np.ndarray, s2: float) -> float:
    """⟨ΔW₁, ΔW₂⟩_F for ΔWᵢ = sᵢ · (aᵢ @ bᵢ)ᵀ, aᵢ (in × rᵢ), bᵢ (rᵢ × out), without forming ΔW.

    tr(ΔW₁ᵀ ΔW₂) = s₁s₂ · tr(a₁ b₁ b₂ᵀ a₂ᵀ) = s₁s₂ · tr((a₂ᵀ a₁)(b₁ b₂ᵀ)), cyclically.
    """
    return float(s1 * s2 * np.sum((a2.T @ a1) * (b2 @ b1.T)))


def update_subspaces(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal bases ``(columns (out × k), rows (in × k))`` of ΔW ∝ (a @ b)ᵀ = bᵀ aᵀ, k = its rank.

    bᵀ = Q_b R_b and a = Q_a R_a give ΔW ∝ Q_b (R_b R_aᵀ) Q_aᵀ; the SVD U Σ Vᵀ of the small core gives
    ΔW's singular vectors Q_b U and Q_a V. Directions with σ ≤ ``RANK_TOLERANCE``·σ_max are dropped.
    """
    q_b, r_b = np.linalg.qr(b.T)
    q_a, r_a = np.linalg.qr(a)
    u, sigma, vt = np.linalg.svd(r_b @ r_a.T)
    keep = int(np.sum(sigma > RANK_TOLERANCE * sigma[0])) if sigma.size and sigma[0] > 0 else 0
    return q_b @ u[:, :keep], q_a @ vt[:keep].T


def subspace_overlap(q1: np.ndarray, q2: np.ndarray) -> float:
    """Mean cos² of the principal angles between two subspaces given by orthonormal bases (NaN if empty).

    There are min(k₁, k₂) angles; their cosines are the singular values of q₁ᵀ q₂.
    """
    k = min(q1.shape[1], q2.shape[1])
    if k == 0:
        return math.nan
    cosines = np.linalg.svd(q1.T @ q2, compute_uv=False)[:k]
    return float(np.mean(np.clip(cosines, 0.0, 1.0) ** 2))


def sign_conflict(delta1: np.ndarray, delta2: np.ndarray, top_fraction: float = TOP_FRACTION) -> tuple[float, float]:
    """``(conflict, both_large)``: among entries in the top ``top_fraction`` by |value| of *both* updates,
    the fraction with opposite signs; and the fraction of all entries that are large in both.

    ``delta1`` and ``delta2`` hold the same entries of the two updates, in any (equal) layout.
    """
    both = _top_mask(np.abs(delta1), top_fraction) & _top_mask(np.abs(delta2), top_fraction)
    count = int(np.count_nonzero(both))
    if count == 0:
        return math.nan, 0.0
    opposed = int(np.count_nonzero(both & ((delta1 < 0) != (delta2 < 0))))
    return opposed / count, count / both.size


def update_entries(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray, module: str,
                   limit: int = SAMPLE_ENTRIES) -> tuple[np.ndarray, np.ndarray]:
    """Matching entries of the unscaled products a₁b₁ and a₂b₂ (ΔWᵀ up to scale), in fp32: all of them
    when there are at most ``limit``, else those on a random grid of about ``limit`` entries (random rows ×
    random columns, seeded by ``module``), which two small matrix products give."""
    f32 = np.float32
    a1, b1, a2, b2 = (x.astype(f32) for x in (a1, b1, a2, b2))
    in_dims, out_dims = a1.shape[0], b1.shape[1]
    if in_dims * out_dims <= limit:
        return a1 @ b1, a2 @ b2
    # a square-ish grid: each side scaled to its dimension, neither larger than the layer
    side = math.sqrt(limit / (in_dims * out_dims))
    n_rows = min(in_dims, max(1, round(in_dims * side)))
    n_cols = min(out_dims, max(1, limit // n_rows))
    rng = np.random.default_rng(zlib.crc32(module.encode()))
    rows = np.sort(rng.choice(in_dims, n_rows, replace=False))
    cols = np.sort(rng.choice(out_dims, n_cols, replace=False))
    return a1[rows] @ b1[:, cols], a2[rows] @ b2[:, cols]


def _top_mask(magnitude: np.ndarray, fraction: float) -> np.ndarray:
    flat = magnitude.reshape(-1)
    k = max(1, int(round(fraction * flat.size)))
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    return (magnitude >= threshold) & (magnitude > 0)


def _numpy(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32), dtype=np.float64)


# --------------------------------------------------------------------------------------- analysis


def analyse_module(sft: Adapter, pt: Adapter, module: str, coefficients: dict[str, float],
                   top_fraction: float = TOP_FRACTION, base_norm: float | None = None) -> ModuleInterference:
    """All measures of one module both adapters update (see the module docstring)."""
    (a1, b1), (a2, b2) = ((_numpy(x) for x in ad.raw_factors(module)) for ad in (sft, pt))
    s1, s2 = sft.scale, pt.scale
    sq1 = max(low_rank_inner(a1, b1, s1, a1, b1, s1), 0.0)
    sq2 = max(low_rank_inner(a2, b2, s2, a2, b2, s2), 0.0)
    inner = low_rank_inner(a1, b1, s1, a2, b2, s2)
    n1, n2 = math.sqrt(sq1), math.sqrt(sq2)
    cosine = inner / (n1 * n2) if n1 > 0 and n2 > 0 else math.nan

    out1, in1 = update_subspaces(a1, b1)
    out2, in2 = update_subspaces(a2, b2)
    # entries of ΔW (all, or a sample on large layers), scaled by sign only: |scale| changes no ranking
    d1, d2 = update_entries(a1, b1, a2, b2, module)
    conflict, both = sign_conflict(np.sign(s1) * d1, np.sign(s2) * d2, top_fraction)

    c1, c2 = coefficients["sft"], coefficients["pt"]
    merged = math.sqrt(max(c1 * c1 * sq1 + c2 * c2 * sq2 + 2 * c1 * c2 * inner, 0.0))
    parts = c1 * c1 * sq1 + c2 * c2 * sq2
    layer, kind = module_position(module)
    return ModuleInterference(
        module=module, layer=layer, type=kind, norm_sft=n1, norm_pt=n2, norm_base=base_norm,
        rel_sft=n1 / base_norm if base_norm else None, rel_pt=n2 / base_norm if base_norm else None,
        cosine=cosine, overlap_out=subspace_overlap(out1, out2), overlap_in=subspace_overlap(in1, in2),
        sign_conflict=conflict, both_large=both, merged_norm=merged,
        merged_over_sft=merged / n1 if n1 > 0 else math.nan, merged_over_pt=merged / n2 if n2 > 0 else math.nan,
        cancelled=1.0 - merged * merged / parts if parts > 0 else math.nan,
    )


def analyse_pair(sft: str | Path, pt: str | Path, alpha: float = 0.5, model: str | Path | None = None,
                 top_fraction: float = TOP_FRACTION) -> Interference:
    """Read an SFT and a PT run and measure their interference on every module both update.

    Args:
        sft, pt: run or adapter directories.
        alpha: the merge weight of the SFT model (w_sft = α, w_pt = 1 − α) for the cancellation columns.
        model: the base model folder, for ‖ΔW‖ / ‖W‖ (optional; only the adapted weights are read).
        top_fraction: share of entries, by magnitude, that counts as "large" for the sign conflict.

    Raises:
        UserError: a run is missing or unreadable, the runs were trained on different bases, a stacked
            SFT run names another PT run, the two share no module, or a shared module differs in shape.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise UserError(f"--top must be in (0, 1], got {top_fraction}")
    if not math.isfinite(alpha):
        raise UserError(f"--alpha must be a finite number, got {alpha}")
    start = time.perf_counter()
    adapters = load_pair(sft, pt)
    parents = stacked_parents(adapters)
    coefficients = component_weights(pair_weights(alpha=alpha), parents)
    mine, theirs = set(adapters["sft"].modules()), set(adapters["pt"].modules())
    shared = sorted(mine & theirs, key=_module_order)
    if not shared:
        raise UserError(f"{sft} and {pt} update no module in common ({len(mine)} vs {len(theirs)} modules, "
                        f"e.g. {_first(mine)} vs {_first(theirs)}); nothing to compare")
    for module in shared:
        shapes = [_shape(adapters[n], module) for n in ("sft", "pt")]
        if shapes[0] != shapes[1]:
            raise UserError(f"{module}: {sft} adapts a {shapes[0][0]}→{shapes[0][1]} layer, {pt} a "
                            f"{shapes[1][0]}→{shapes[1][1]} one (different base models?)")
    notes: list[str] = []
    base_norms: dict[str, float] = {}
    if model is not None:
        from mlx_med.adapters.base_weights import base_weight_norms, fingerprint_notes

        notes += fingerprint_notes(model, adapters)
        base_norms = base_weight_norms(model, shared, {m: _shape(adapters["sft"], m) for m in shared})
    rows = [analyse_module(adapters["sft"], adapters["pt"], m, coefficients, top_fraction, base_norms.get(m))
            for m in shared]
    return Interference(
        sft=Path(sft), pt=Path(pt), alpha=alpha, coefficients=coefficients, stacked=bool(parents),
        top_fraction=top_fraction, model=Path(model) if model is not None else None, modules=rows,
        only_sft=sorted(mine - theirs, key=_module_order), only_pt=sorted(theirs - mine, key=_module_order),
        notes=notes, seconds=time.perf_counter() - start,
    )


def _shape(adapter: Adapter, module: str) -> tuple[int, int]:
    """(in, out) of the layer a module's factors adapt."""
    return adapter.dims(module)


def _module_order(module: str) -> tuple[int, str]:
    layer, _ = module_position(module)
    return (-1 if layer is None else layer, module)


def _first(modules: set[str]) -> str:
    return min(modules) if modules else "none"
