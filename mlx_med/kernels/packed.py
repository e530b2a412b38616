"""A generating model's projections over weights packed once (``packed_gemm.cpp``).

At a decode step every projection is a GEMM of a few dozen rows against a weight that never changes,
and OpenBLAS packs that weight into its kernel's layout on every call: a quarter of the step's GEMM
time. ``pack_for_generation`` packs each ``nn.Linear`` weight (and a tied embedding used as the output
head) once, with OpenBLAS's own copy routine, and gives the layer a subclass whose forward runs
OpenBLAS's own compute kernel over it; a model with live adapters gets their stacked LoRA factors
packed the same way (``packed_factors``). The sums are the library's, block for block, so the outputs are
MLX's bit for bit; that is checked here on the model's own shapes before any layer is switched
(``calibrate``), and a shape that does not match keeps MLX's matmul.

A packed weight is a second copy of the weight (the demo model: 538 MB), so packing happens only for
generation (``evaluation.generate.generate_batch``, the server), only while the copies fit in half the
memory the system has available, and only where OpenBLAS exports its per-core kernels (its
DYNAMIC_ARCH builds: Debian's, Fedora's). A layer whose weight is replaced afterwards (a fuse, a
dtype change) drops its packed copy and runs MLX's matmul again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_med.kernels.attention_sums import SMALL_WORK
from mlx_med.kernels.ops import Kernels, on_cpu_f32

# Above this many rows OpenBLAS's own call costs the same (packing the weight is a small share of a
# long prefill): measured 0.94-1.07x at 1208 rows, 1.2-1.9x at 32-64.
MAX_ROWS = 256
# At or below this rows x N x K OpenBLAS may hand MLX's x @ W.T to a small-matrix kernel that adds in
# another order: its AVX-512 builds do where their permit lets them (sgemm_small_kernel_permit_skylakex.c:
# M * N * K <= 100^3 and, for this "TN" call, M * N <= 1200 and K >= 32, M the weight's rows and N the
# activations'), its AVX2 builds never. The row counts under it that are the level-3 driver's all the
# same (a one-row product of a 1536-row weight, seven to nine rows of a 192-row one on AVX-512; every
# one on AVX2) are found per shape by comparing with MLX (``small_rows``), not assumed.
# Row counts the calibration compares (a decode step's and a short prefill's).
CHECK_ROWS = (16, 64, MAX_ROWS)
RECORD = "packed-cuts.json"  # calibrations recorded beside the kernels' self-check (recorded_calibration)


class BlasCut(NamedTuple):
    """Where OpenBLAS's level-3 driver cuts the inner dimension, and for kernels that add by a product's
    place in the call (Haswell's and Zen's), the tiles its driver calls them on
    (``packed_gemm.cpp``: ``BlasCut``, ``driver_plan``)."""

    q: int  # GEMM_Q
    unroll: int  # GEMM_UNROLL_M (the one-thread driver rounds the next-to-last block to it)
    threaded: bool  # the threaded driver's rounding (OpenBLAS running on more than one thread)
    threads: int = 0  # the driver's tiling for this many OpenBLAS threads; 0: any tiling (AVX-512 kernels)
    p: int = 0  # GEMM_P
    switch_ratio: int = 0  # SWITCH_RATIO
    prefered: int = 1  # GEMM_PREFERED_SIZE
    unroll_n: int = 0  # GEMM_UNROLL_N
    jj: int = 0  # the widest call over a thread's own columns

    def describe(self) -> str:
        cut = f"cut at {self.q}, unroll {self.unroll}, {'threaded' if self.threaded else 'one-thread'} driver"
        if self.threads == 1:
            cut += f", its tiles (P {self.p}, {self.jj}-column calls)"
        elif self.threads:
            cut += (f", its tiles for {self.threads} threads (P {self.p}, switch ratio {self.switch_ratio}, "
                    f"preferred size {self.prefered}, {self.jj}-column calls)")
        return cut


_CUTS = ((320, 16), (320, 8), (448, 16), (384, 16), (256, 16), (256, 8), (192, 16), (512, 16), (224, 8))
CANDIDATES = tuple(BlasCut(q, unroll, threaded) for q, unroll in _CUTS for threaded in (True, False))


def tiled_candidates(threads: int) -> tuple[BlasCut, ...]:
    """Cuts in the tiling of OpenBLAS's driver for ``threads`` threads (its one-thread driver for one),
    likeliest first. Debian's OpenBLAS 0.3.21 (``DYNAMIC_ARCH``, its drivers built for a generic target)
    matched the first on its HASWELL and ZEN kernels: P 320, switch ratio 2, preferred size 1."""
    if threads < 1:
        return ()
    return tuple(BlasCut(q, unroll, threads > 1, threads, p, ratio, prefered, 4, 12)
                 for q, unroll in ((320, 8), (256, 8), (384, 8))
                 for p in (320, 512, 768, 256)
                 for ratio, prefered in (((2, 1), (8, 8)) if threads > 1 else ((2, 1),)))


@dataclass
class PackedWeight:
    """A weight packed for ``packed_matmul`` (an attribute, not a parameter: MLX does not see it)."""

    packed: mx.array
    source: mx.array  # the weight it was packed from: another array in the layer means a stale pack
    cut: BlasCut
    kernels: Kernels
    small_rows: frozenset[int] = frozenset()  # row counts under SMALL_WORK taken too (``small_rows``)

    def __post_init__(self):
        n = self.source.shape[0]
        module, packed, cut = self.kernels.module, self.packed, self.cut

        # The weight is an input so that autodiff sees it; its values are read from the packed copy.
        @mx.custom_function
        def matmul(x, weight):
            return module.packed_matmul(x, packed, n, *cut)

        @matmul.vjp
        def matmul_vjp(primals, cotangent, output):  # MLX's own gradients of x @ weight.T
            return mx.vjp(lambda x, weight: x @ weight.T, list(primals), [cotangent])[1]

        self._matmul = matmul

    def matmul(self, x: mx.array) -> mx.array | None:
        """``x @ source.T`` over the packed copy, or None where MLX's own call should run."""
        rows = x.size // max(x.shape[-1], 1)
        n, k = self.source.shape
        if not (0 < rows <= MAX_ROWS and (rows * n * k > SMALL_WORK or rows in self.small_rows)
                and x.shape[-1] == k and on_cpu_f32(x)):
            return None
        if self.cut.threads and self.cut.threads != self.kernels.module.openblas_threads():
            return None  # OpenBLAS now tiles for another thread count
        return self._matmul(x, self.source)


def packed_forward(layer: nn.Module, x: mx.array) -> mx.array | None:
    """``x @ layer.weight.T`` over the layer's packed copy, or None where MLX's own call should run.
    A copy whose weight was replaced since (a new array in the layer) is dropped."""
    pack = layer.__dict__.get("_pack")
    if pack is None:
        return None
    if pack.source is not layer["weight"]:
        layer.__dict__["_pack"] = None  # stale: free the copy
        return None
    return pack.matmul(x)


class PackedLinear(nn.Linear):
    """``nn.Linear`` (no bias) whose fp32 CPU forward at decode sizes runs over its packed weight."""

    def __call__(self, x):
        out = None if "bias" in self else packed_forward(self, x)
        return super().__call__(x) if out is None else out


class PackedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose ``as_linear`` (a tied output head) runs over its packed weight."""

    def as_linear(self, x):
        out = packed_forward(self, x)
        return super().as_linear(x) if out is None else out


PACKED_CLASSES = {nn.Linear: PackedLinear, nn.Embedding: PackedEmbedding}


def packable_layers(model: nn.Module) -> list[nn.Module]:
    """The layers a pack serves: exactly ``nn.Linear`` without bias and ``nn.Embedding`` (or their packed
    subclasses), fp32 two-dimensional weights large enough to take the packed path. Subclasses with
    arithmetic of their own are left alone."""
    layers = []
    for _, layer in model.named_modules():
        base = next((b for b, packed in PACKED_CLASSES.items() if type(layer) in (b, packed)), None)
        if base is None or (base is nn.Linear and "bias" in layer):
            continue
        weight = layer["weight"]
        # a weight too small for any call up to MAX_ROWS to leave OpenBLAS's small-matrix range: no use
        if weight.ndim == 2 and weight.dtype == mx.float32 and MAX_ROWS * weight.size > SMALL_WORK:
            layers.append(layer)
    return layers


def _probes(weights: list[mx.array], counts: int | None = None) -> list[tuple[mx.array, list[mx.array], list[mx.array]]]:
    """Each weight (smallest first) with random inputs at ``CHECK_ROWS`` rows (the first ``counts`` of
    them that leave the small-matrix range; all without) and MLX's products."""
    probes = []
    for weight in sorted(weights, key=lambda w: w.size):
        n, k = weight.shape
        rows = [r for r in CHECK_ROWS if r * n * k > SMALL_WORK][:counts]
        xs = [mx.random.normal((r, k), key=mx.random.key(r)) for r in rows]
        wanted = [x @ weight.T for x in xs]
        mx.eval(xs, wanted)
        probes.append((weight, xs, wanted))
    return probes


def _too_few_for_tiles(cut: BlasCut, n: int) -> bool:
    """Whether an ``n``-row weight is too small for the threaded driver's tiling ``cut`` makes: OpenBLAS's
    one-thread driver takes so few rows."""
    return cut.threads > 1 and n < 2 * cut.switch_ratio


def _matches(kernels: Kernels, cut: BlasCut, weight, xs, wanted) -> bool:
    """Whether the packed kernel under ``cut`` gives ``wanted`` (MLX's products) bit for bit."""
    if _too_few_for_tiles(cut, weight.shape[0]):
        return False
    packed = kernels.module.pack_weight(weight, *cut)
    outs = [kernels.module.packed_matmul(x, packed, weight.shape[0], *cut) for x in xs]
    return all(mx.array_equal(out, want).item() for out, want in zip(outs, wanted))


def matches_mlx(kernels: Kernels, cut: BlasCut, weight: mx.array) -> bool:
    """Whether the packed kernel under ``cut`` gives MLX's ``x @ weight.T`` bit for bit at every
    ``CHECK_ROWS`` count over 100^3; False for a weight that passes it at none (too small to pack)."""
    (_, xs, wanted), = _probes([weight])
    return bool(xs) and _matches(kernels, cut, weight, xs, wanted)


def calibrate(kernels: Kernels, weights: list[mx.array]) -> tuple[BlasCut | None, list[tuple[int, int]]]:
    """The first candidate cut under which the packed kernel gives MLX's bits for every weight (one per
    (N, K) shape: the model's own) at ``CHECK_ROWS`` rows of random inputs, and the shapes that matched
    under it. Candidates are screened on the smallest weight at one row count first, so the many that
    cannot match cost one small product each."""
    probes = _probes(weights)
    candidates = CANDIDATES + tiled_candidates(kernels.module.openblas_threads())
    weight, xs, wanted = probes[0]
    screened = [cut for cut in candidates if _matches(kernels, cut, weight, xs[:1], wanted[:1])]
    best, best_shapes = None, []
    for cut in screened:
        matched = [tuple(weight.shape) for weight, xs, wanted in probes if _matches(kernels, cut, weight, xs, wanted)]
        if len(matched) > len(best_shapes):
            best, best_shapes = cut, matched
        if len(matched) == len(probes):
            break
    return best, best_shapes


def small_rows(kernels: Kernels, cut: BlasCut, weight: mx.array) -> list[int]:
    """The row counts up to ``MAX_ROWS`` whose product of ``weight`` is at most ``SMALL_WORK`` and which the
    packed kernel under ``cut`` computes with MLX's bits, every output: OpenBLAS's driver took MLX's
    call there, not a small-matrix kernel (whose other order moves nearly every output's last bits), so
    those products take the packed path too. Each is tried once (a product of a few rows)."""
    n, k = weight.shape
    rows = [r for r in range(1, MAX_ROWS + 1) if r * n * k <= SMALL_WORK]
    if not rows or _too_few_for_tiles(cut, n):
        return []
    packed = kernels.module.pack_weight(weight, *cut)
    found = []
    for r in rows:
        x = mx.random.normal((r, k), key=mx.random.key(1000 + r))
        if mx.array_equal(kernels.module.packed_matmul(x, packed, n, *cut), x @ weight.T).item():
            found.append(r)
    return found


class Calibration(NamedTuple):
    """``calibrate``'s cut and matched shapes, each matched shape's ``small_rows`` under that cut, and
    whether it was read back."""

    cut: BlasCut | None
    matched: list[tuple[int, int]]
    small: dict[tuple[int, int], list[int]]
    recorded: bool


def _positive_ints(value, length: int | None = None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and \
        all(type(n) is int and n > 0 for n in value)


def _cut_from_record(entry) -> tuple[BlasCut | None, list[tuple[int, int]], dict] | None:
    """The (cut, matched shapes, small rows per shape) a record entry holds; None when it is not one."""
    if not isinstance(entry, dict) or not isinstance(entry.get("matched"), list) or \
            not isinstance(entry.get("small_rows"), list):
        return None
    matched, small = entry["matched"], entry["small_rows"]
    if not all(_positive_ints(s, 2) for s in matched) or \
            not all(isinstance(e, list) and len(e) == 3 and _positive_ints(e[:2]) and _positive_ints(e[2]) and
                    e[:2] in matched for e in small):
        return None
    matched = [tuple(s) for s in matched]
    small = {(e[0], e[1]): e[2] for e in small}
    fields = entry.get("cut")
    if fields is None:  # no cut matched: then no shape did either
        return (None, [], {}) if not matched else None
    kinds = (int, int, bool, int, int, int, int, int, int)  # BlasCut's fields
    if not isinstance(fields, list) or len(fields) != len(kinds) or \
            any(type(value) is not kind for value, kind in zip(fields, kinds)):
        return None
    return BlasCut(*fields), matched, small


def _calibrated(kernels: Kernels, weights: list[mx.array]) -> tuple[BlasCut | None, list, dict]:
    cut, matched = calibrate(kernels, weights)
    if cut is None:
        return None, [], {}
    return cut, matched, {tuple(w.shape): small_rows(kernels, cut, w) for w in weights if tuple(w.shape) in matched}


def recorded_calibration(kernels: Kernels, weights: list[mx.array]) -> Calibration:
    """``calibrate``'s and ``small_rows``' outcome for these weights' shapes, and whether it was read
    back: an earlier process's, recorded beside the kernels' self-check (``packed-cuts.json``) under the
    same key (the module, MLX, the BLAS and its threads, a forced core, the CPU) and shapes, is used after
    a spot check of its cut on the smallest weight; else calibrated now and recorded. Calibration takes
    about 1.5 s for a model (every ``generate_batch`` process, ``chat`` at start-up); the check, milliseconds."""
    from mlx_med.kernels.check import check_key, read_records, write_records

    if kernels.module_file is None:
        return Calibration(*_calibrated(kernels, weights), False)
    shapes = sorted({tuple(w.shape) for w in weights})
    path = kernels.module_file.parent / RECORD
    key = f"{check_key(kernels, kernels.module_file)}|{';'.join(f'{n}x{k}' for n, k in shapes)}"
    records = read_records(path)
    found = _cut_from_record(records.get(key))
    if found is not None:
        cut, matched, small = found
        weight, xs, wanted = _probes([min(weights, key=lambda w: w.size)], counts=1)[0]
        if cut is None or tuple(weight.shape) not in matched or _matches(kernels, cut, weight, xs, wanted):
            return Calibration(cut, matched, small, True)
    cut, matched, small = _calibrated(kernels, weights)
    records[key] = {"cut": list(cut) if cut else None, "matched": [list(s) for s in matched],
                    "small_rows": [[*shape, rows] for shape, rows in small.items()]}
    write_records(path, records)
    return Calibration(cut, matched, small, False)


def available_bytes() -> int:
    """Memory the system can give now (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def pack_for_generation(model: nn.Module, kernels: Kernels | None) -> str:
    """Pack ``model``'s projection weights for decoding (see the module's docstring), in place; says
    what was done. Calling it again packs only what is not packed yet (or was replaced)."""
    if kernels is None:
        return "projections: MLX's matmul (no kernels)"
    usable, core = kernels.module.openblas_core()
    if not usable:
        return f"projections: MLX's matmul ({core})"
    layers = [layer for layer in packable_layers(model)
              if (pack := layer.__dict__.get("_pack")) is None or pack.source is not layer["weight"]]
    if not layers:
        return "projections: packed already" if packable_layers(model) else "projections: nothing to pack"
    needed = sum(layer["weight"].nbytes for layer in layers)
    if needed > available_bytes() // 2:
        return f"projections: MLX's matmul (packed copies need {needed / 2**20:.0f} MiB, over half the free memory)"
    by_shape = {tuple(layer["weight"].shape): layer["weight"] for layer in layers}
    shapes = set(by_shape)
    if not shapes <= kernels.packed_checked:
        with mx.stream(mx.cpu):
            cut, matched, small, _ = recorded_calibration(kernels, list(by_shape.values()))
        if cut is None:  # remembered: these shapes keep MLX's matmul without being tried again
            kernels.packed_checked |= shapes
        else:
            same = cut == kernels.packed_cut  # else what was matched under the old cut no longer counts
            kernels.packed_shapes = (kernels.packed_shapes if same else set()) | set(matched)
            kernels.packed_small_rows = {**(kernels.packed_small_rows if same else {}),
                                         **{shape: frozenset(rows) for shape, rows in small.items()}}
            kernels.packed_checked = (kernels.packed_checked if same else set()) | shapes
            kernels.packed_cut = cut
    cut = kernels.packed_cut
    if cut is None or not shapes & kernels.packed_shapes:
        return "projections: MLX's matmul (no cut of OpenBLAS's kernel gave MLX's bits here)"
    packed = 0
    with mx.stream(mx.cpu):
        for layer in layers:
            weight = layer["weight"]
            if tuple(weight.shape) not in kernels.packed_shapes:
                continue
            layer.__dict__["_pack"] = PackedWeight(kernels.module.pack_weight(weight, *cut), weight, cut, kernels,
                                                   kernels.packed_small_rows.get(tuple(weight.shape), frozenset()))
            base = next(b for b in PACKED_CLASSES if isinstance(layer, b))
            layer.__class__ = PACKED_CLASSES[base]
            packed += 1
    return f"projections: {packed} of {len(layers)} weights packed for OpenBLAS's {core} kernel ({cut.describe()})"

