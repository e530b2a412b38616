"""``self_check``: every kernel against the MLX op it replaces, values and gradients, exactly; and
the fused attention's calibrations against the BLAS (``attention_sums.calibrate`` for a decode step,
``calibrate_prefill`` for a prefill, ``calibrate_training`` for a training step's gradient).

Together they take about 10 s on a 2-core CPU, so their outcome is recorded beside the module
(``self-check.json``) under a key of everything it depends on: the module file, MLX's library, the
BLAS under it, the CPU, the instruction set the kernels picked and the threads a call may use. A
later process with the same key reads the outcome instead of checking again (``recorded_self_check``);
``mlx-med doctor`` and ``python -m mlx_med.kernels`` check afresh (``forget_self_checks`` first).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_med.kernels.attention_sums import (
    PREFILL_KEYS,
    BlasSums,
    LongPrefill,
    calibrate,
    calibrate_long_prefill,
    calibrate_prefill,
    calibrate_training,
)
from mlx_med.kernels.ops import Kernels

VERDICTS = "self-check.json"


@dataclass(frozen=True)
class CheckOutcome:
    """What the checks found: the first kernel that differs from MLX (None: none), the inner-sum rule
    with which the fused decode attention equals MLX's here (None: it is not used), the most keys
    a prefill's attention is fused over with one chain per sum (0: none), the BLAS's cut past them
    (None: longer prefills keep MLX's graph), and the most keys a training step's attention is fused over,
    forward and gradient (0: none)."""

    mismatch: str | None
    attention_sums: BlasSums | None
    prefill_keys: int = 0
    long_prefill: LongPrefill | None = None
    training_keys: int = 0

    def record(self) -> dict:
        sums = list(self.attention_sums) if self.attention_sums else None
        long = list(self.long_prefill) if self.long_prefill else None
        return {"mismatch": self.mismatch, "attention_sums": sums, "prefill_keys": self.prefill_keys,
                "long_prefill": long, "training_keys": self.training_keys}

    @classmethod
    def from_record(cls, entry) -> CheckOutcome | None:
        """The outcome a record holds, or None when it is not one (a match recorded before a
        calibration existed lacks its result; a mismatch needs none)."""
        if not isinstance(entry, dict) or not isinstance(entry.get("mismatch"), (str, type(None))):
            return None
        if entry["mismatch"] is not None:
            return cls(entry["mismatch"], None)
        sums, prefill = entry.get("attention_sums", "missing"), entry.get("prefill_keys")
        long, training = entry.get("long_prefill", "missing"), entry.get("training_keys")
        if type(prefill) is not int or prefill < 0 or type(training) is not int or training < 0:
            return None
        if long is not None:
            if not (isinstance(long, list) and len(long) == 5 and all(type(n) is int and n >= 0 for n in long[:4])
                    and long[2] >= 1 and type(long[4]) is bool):
                return None
            long = LongPrefill(*long)
        if sums is None:
            return cls(entry["mismatch"], None, prefill, long, training)
        if isinstance(sums, list) and len(sums) in (3, 4) and all(type(n) is int and n >= 0 for n in sums[:2]) \
                and sums[1] >= 1 and all(type(flag) is bool for flag in sums[2:]):
            return cls(entry["mismatch"], BlasSums(*sums), prefill, long, training)
        return None


def run_checks(kernels: Kernels) -> CheckOutcome:
    """``self_check``, then (when every kernel matched) the attention's calibrations."""
    mismatch = self_check(kernels)
    if mismatch:
        return CheckOutcome(mismatch, None)
    prefill = calibrate_prefill(kernels.module)
    # past the one-chain limit only where it reached the BLAS's GEMM_Q (below it, sums already differ)
    long = calibrate_long_prefill(kernels.module) if prefill == PREFILL_KEYS[0] else None
    training = calibrate_training(kernels.module, prefill, long)  # its forward is the prefill's
    return CheckOutcome(None, calibrate(kernels.module), prefill, long, training)


def mlx_causal_softmax(scores: mx.array) -> mx.array:
    """MLX's CPU attention fallback for ``mask="causal"``: where(mask, scores, finfo.min), then softmax."""
    queries, keys = scores.shape[-2:]
    visible = mx.arange(keys - queries, keys)[:, None] >= mx.arange(0, keys)[None]
    return mx.softmax(mx.where(visible, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype)),
                      axis=-1, precise=True)


def self_check(kernels: Kernels) -> str | None:
    """Compare with MLX on special values and random data (values and gradients); None when identical.

    Every kernel is checked on a small input and on one large enough to be split over threads
    (``cpu_kernels.cpp``: ``for_row_ranges``)."""
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    def random(seed: int, shape, scale: float = 1.0) -> mx.array:
        return mx.random.normal(shape, key=mx.random.key(seed)) * scale

    def gradients(fn, inputs: tuple, seed: int):
        """d/d(inputs) of sum(fn(*inputs) * w), w random: every output weighs differently."""
        weights = random(seed, fn(*inputs).shape)
        return mx.grad(lambda *xs: (fn(*xs) * weights).sum(), argnums=tuple(range(len(inputs))))(*inputs)

    special = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 0.49999997, 88.0, -88.0, 88.1, -88.1, 200.0, -200.0,
               float("inf"), -float("inf"), float("nan")]
    gate = mx.concatenate([mx.array(special), mx.random.uniform(-100, 100, (4093,), key=mx.random.key(0))])
    big_gate = mx.random.uniform(-30, 30, (257, 600), key=mx.random.key(4))
    # name -> (ours, MLX's, inputs)
    cases = {}
    for label, g in {"": gate, " (threaded)": big_gate}.items():
        cases[f"swiglu{label}"] = (kernels.swiglu, mlx_swiglu, (g, random(1, g.shape)))
    for label, shape in {"": (4, 3, 5, 37), " (threaded)": (3, 97, 701)}.items():
        scores = random(2, shape, 8)
        cases[f"softmax{label}"] = (kernels.softmax, lambda x: mx.softmax(x, axis=-1, precise=True), (scores,))
        cases[f"logsumexp{label}"] = (kernels.logsumexp, lambda x: mx.logsumexp(x, axis=-1, keepdims=True), (scores,))
    for label, shape in {" (prefill)": (2, 3, 7, 7), " (cached keys)": (2, 3, 5, 9), " (more queries)": (1, 2, 9, 4),
                         " (threaded)": (2, 3, 3, 160, 160)}.items():
        cases[f"causal softmax{label}"] = (kernels.causal_softmax, mlx_causal_softmax, (random(9, shape, 8),))
    for label, shape in {"": (3, 5, 37), " (threaded)": (70, 1001)}.items():
        targets = mx.random.randint(-shape[-1], shape[-1], shape[:-1], key=mx.random.key(7))  # < 0: from the end
        cases[f"cross-entropy{label}"] = (
            lambda x, t=targets.astype(mx.int32): kernels.cross_entropy(x, t),
            lambda x, t=targets: nn.losses.cross_entropy(x, t), (random(6, shape, 6),))
    for label, shape in {"": (3, 4, 5, 24), " (threaded)": (4, 9, 300, 64)}.items():
        x = random(11, shape, 3)
        weight = random(12, shape[-1:])
        for eps in (1e-5, 1e-6):
            cases[f"RMSNorm{label} eps={eps:g}"] = (kernels.rms_norm(eps), lambda x, w, e=eps: mx.fast.rms_norm(x, w, e),
                                                   (x, weight))
        # a pre-norm residual block (x + g(norm(x))): x's cotangent parts are added in MLX's order
        cases[f"RMSNorm in a residual block{label}"] = (
            lambda x, w, f=kernels.rms_norm(1e-5): x + mx.tanh(f(x, w)),
            lambda x, w: x + mx.tanh(mx.fast.rms_norm(x, w, 1e-5)), (x, weight))
        for dims, base, scale, offset in ((shape[-1], 10000.0, 1.0, mx.array(7)), (shape[-1] - 8, 1e5, 0.5,
                                                                                mx.arange(shape[0]) * 37)):
            cases[f"RoPE{label} dims={dims} base={base:g} scale={scale:g}"] = (
                lambda x, o=offset.astype(mx.int32), f=kernels.rope(dims, base, scale): f(x, o),
                lambda x, o=offset, d=dims, b=base, s=scale: mx.fast.rope(x, d, traditional=False, base=b, scale=s,
                                                                         offset=o), (x,))
    for seed, (name, (ours, theirs, inputs)) in enumerate(cases.items()):
        for what, a, b in ((name, ours(*inputs), theirs(*inputs)),
                           (f"{name} gradient", gradients(ours, inputs, seed), gradients(theirs, inputs, seed))):
            a, b = (list(x) if isinstance(x, tuple) else [x] for x in (a, b))
            if not all(mx.array_equal(x, y, equal_nan=True).item() for x, y in zip(a, b)):
                return f"{what} differs from MLX {mx.__version__}'s"
    return None


def check_key(kernels: Kernels, module_file: Path) -> str:
    """A hash of what the checks' outcome depends on besides the source (the module's build folder is
    keyed by that): the module file, MLX's library, the BLAS loaded under it (file, threads, a forced
    core), the CPU, the ISA and the thread setting."""
    from mlx_med.blas import preload_blas
    from mlx_med.blas_check import allowed_cpus, cpu_identity, forced_coretype
    from mlx_med.fingerprint import file_stamp
    from mlx_med.switches import KERNEL_THREADS_ENV

    def identity(path: Path) -> str:
        try:
            return file_stamp(path)
        except OSError:
            return f"{path}|missing"

    libmlx = Path(mx.__file__).resolve().parent / "lib" / "libmlx.so"
    blas = preload_blas()
    blas_parts = f"blas={identity(Path(blas.library)) if blas.library else 'MLX-linked'}|{blas.threads}|" \
                 f"{forced_coretype() or ''}"
    parts = [identity(module_file), identity(libmlx), mx.__version__, blas_parts, cpu_identity(), kernels.isa,
             f"threads={os.environ.get(KERNEL_THREADS_ENV, '')}/{allowed_cpus()}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read_records(path: Path) -> dict:
    """The outcomes recorded in ``path`` by key; empty when it is missing or unreadable (then the
    caller checks again)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def write_records(path: Path, records: dict) -> None:
    """Write ``records`` atomically; an unwritable folder only costs a check next time."""
    from mlx_med.io import atomic_write_json

    try:
        atomic_write_json(path, records)
    except OSError:
        pass


def recorded_self_check(kernels: Kernels, module_file: Path) -> tuple[CheckOutcome, bool]:
    """``run_checks``' outcome and whether it was read back from an earlier check with the same key.

    An unreadable record is checked again; an unwritable one only costs a check next time."""
    path = module_file.parent / VERDICTS
    key = check_key(kernels, module_file)
    records = read_records(path)
    recorded = CheckOutcome.from_record(records.get(key))
    if recorded is not None:
        return recorded, True
    outcome = run_checks(kernels)
    records[key] = outcome.record()
    write_records(path, records)
    return outcome, False


def forget_self_checks(module_file: Path) -> None:
    """Drop the recorded outcomes (and the packed projections' calibrations), so the next load checks
    against MLX afresh."""
    from mlx_med.kernels.packed import RECORD

    for name in (VERDICTS, RECORD):
        (module_file.parent / name).unlink(missing_ok=True)
