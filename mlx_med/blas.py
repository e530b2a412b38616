"""Put a fast BLAS under MLX's Linux CPU backend, never one that can crash this CPU.

The ``mlx[cpu]`` wheel links the netlib *reference* BLAS (~5 GFLOP/s fp32 GEMM). Loading OpenBLAS with
``RTLD_GLOBAL`` before ``mlx.core`` is imported makes MLX's ``cblas_*`` calls resolve to it (100+
GFLOP/s). Candidates, in order:

1. the distribution's OpenBLAS (Debian/Ubuntu ``libopenblas0-pthread``, Fedora ``openblas-pthreads``):
   a ``DYNAMIC_ARCH`` build that picks its kernels for the CPU at run time;
2. the ``cmeel-openblas`` wheel's, a single-core build (SKYLAKEX), only on a CPU with that core's
   instruction sets;
3. none: MLX stays on the reference BLAS, and long commands say so (``warn_if_slow_blas``).

Each candidate must pass ``blas_check`` (the rule, then a child-process check whose verdict is cached).
The thread count follows the CPUs this process may use (affinity, cgroup quota) within the build's
``MAX_THREADS``, unless ``OPENBLAS_NUM_THREADS`` is set. Idle OpenBLAS workers sleep at once instead of
spinning (``OPENBLAS_THREAD_TIMEOUT``, see ``idle_spin``) unless that is set. ``MLX_MED_BLAS=stock``
switches all of it off.
This module must not import mlx at module level (it runs before mlx is imported).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlx_med import switches
from mlx_med.blas_check import (
    FAILED,
    LibraryInfo,
    Verdict,
    VerdictCache,
    allowed_cpus,
    child_check,
    cpu_flags,
    forced_coretype,
    query_library,
    rule_verdict,
)

SWITCH_ENV = switches.BLAS.name
THREADS_ENV = "OPENBLAS_NUM_THREADS"
SPIN_ENV = "OPENBLAS_THREAD_TIMEOUT"
# An idle OpenBLAS worker spins (sched_yield) for 2**SPIN_ENV cycles before it sleeps; OpenBLAS's default is
# 2**28 (~0.1 s), far longer than the gap between two matmuls, so on a few cores the spinners take CPU from
# what runs between the matmuls (MLX's small ops, mlx-med's attention kernel). 4 is OpenBLAS's minimum:
# a worker sleeps as soon as its share is done. Measured on 2 cores (docs/evaluation.md): generation
# 12-17% faster, training unchanged.
IDLE_SPIN_LOG2 = 4
OPENBLAS_RELPATH = Path("cmeel.prefix") / "lib" / "libopenblas.so.0"
SYSTEM = "system OpenBLAS"
CMEEL = "cmeel-openblas"
# The distributions' pthread builds (OpenMP builds would bring a second threading runtime).
SYSTEM_GLOBS = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",  # Debian, Ubuntu: libopenblas0-pthread
    "/usr/lib64/libopenblasp.so.0",  # Fedora, RHEL: openblas-pthreads
    "/usr/lib/libopenblas.so.0",  # Arch: openblas
)
FIX = ("install the distribution's OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
       "Fedora: dnf install openblas-pthreads) or run scripts/setup.sh")


@dataclass(frozen=True)
class BlasStatus:
    """What ``preload_blas`` did. ``library`` is the path loaded, or None (reference BLAS)."""

    library: str | None
    note: str
    kind: str | None = None  # SYSTEM or CMEEL
    info: LibraryInfo | None = None
    verdict: str = ""
    threads: str = ""
    idle_spin: str = ""
    considered: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (library, verdict line)


def candidate_libraries(site_paths: list[str] | None = None) -> list[tuple[str, Path]]:
    """``(kind, path)`` of every OpenBLAS that could go under MLX here, best first."""
    found: list[tuple[str, Path]] = []
    for pattern in SYSTEM_GLOBS:
        found += [(SYSTEM, Path(p)) for p in sorted(glob.glob(pattern))]
    for entry in sys.path if site_paths is None else site_paths:
        candidate = Path(entry or ".") / OPENBLAS_RELPATH
        if candidate.is_file():
            found.append((CMEEL, candidate))
            break
    return found


def judge(library: Path, flags: frozenset[str], cache: VerdictCache,
          query: Callable[[Path], LibraryInfo] = query_library,
          check: Callable[[Path], Verdict] = child_check) -> Verdict:
    """The verdict on ``library`` for this CPU: cached, else the rule, else the child check (then cached).

    Raises:
        OSError: the library cannot even be loaded privately (not cached: installing a dependency fixes it).
    """
    cached = cache.get(library)
    if cached is not None:
        return cached
    info = query(library)
    verdict = rule_verdict(info, flags, forced_coretype())
    if verdict is None:
        checked = check(library)
        verdict = Verdict(checked.status, checked.reason, info)
        if checked.status == FAILED and "wrong numbers" not in checked.reason:
            return verdict  # a timeout or a broken environment says nothing lasting about the library
    cache.put(library, verdict)
    return verdict


def choose_library(candidates: list[tuple[str, Path]], flags: frozenset[str], cache: VerdictCache,
                   query: Callable[[Path], LibraryInfo] = query_library,
                   check: Callable[[Path], Verdict] = child_check,
                   ) -> tuple[tuple[str, Path, Verdict] | None, list[tuple[str, str]]]:
    """The first candidate whose verdict allows it, and one line per candidate looked at."""
    considered: list[tuple[str, str]] = []
    for kind, path in candidates:
        try:
            verdict = judge(path, flags, cache, query, check)
        except OSError as err:
            hint = " (install the GNU Fortran runtime: libgfortran5)" if "libgfortran" in str(err) else ""
            considered.append((str(path), f"cannot load: {err}{hint}"))
            continue
        considered.append((str(path), f"{verdict.status}: {verdict.reason}"))
        if verdict.usable:
            return (kind, path, verdict), considered
    return None, considered


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), self_cgroup: str | None = None) -> float | None:
    """CPUs allowed by this process's cgroup quota (v2 ``cpu.max``, v1 ``cfs_quota_us``); None: no limit."""
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            self_cgroup = ""
    v2 = next((line.split(":", 2)[2] for line in self_cgroup.splitlines() if line.startswith("0::")), "/")
    files = [(root / v2.lstrip("/") / "cpu.max", None), (root / "cpu.max", None),
             (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")]
    for quota_file, period_file in files:
        try:
            text = quota_file.read_text().split()
            if period_file is not None:
                text = text + period_file.read_text().split()
        except OSError:
            continue
        if len(text) < 2 or text[0] in {"max", "-1"}:
            return None
        return int(text[0]) / int(text[1])
    return None


def thread_count(env: dict[str, str], affinity: int, quota: float | None,
                 max_threads: int | None) -> tuple[int | None, str]:
    """BLAS threads for this process, and how they were decided; None: leave the library's own choice."""
    if env.get(THREADS_ENV):
        return None, f"{THREADS_ENV}={env[THREADS_ENV]} (set in the environment)"
    usable = affinity if quota is None else max(1, min(affinity, math.floor(quota)))
    why = f"{affinity} CPU(s) in this process's affinity" + ("" if quota is None else f", cgroup quota {quota:g}")
    if max_threads is not None and usable > max_threads:
        return max_threads, f"{why}; capped by the build's MAX_THREADS={max_threads}"
    return usable, why


def idle_spin(env: dict[str, str]) -> tuple[str | None, str]:
    """The ``OPENBLAS_THREAD_TIMEOUT`` to load OpenBLAS with (None: the environment's stays), and why."""
    if env.get(SPIN_ENV):
        return None, f"{SPIN_ENV}={env[SPIN_ENV]} (set in the environment)"
    return str(IDLE_SPIN_LOG2), f"{SPIN_ENV}={IDLE_SPIN_LOG2}: idle workers sleep at once (mlx-med's default)"


@functools.lru_cache(maxsize=1)
def preload_blas() -> BlasStatus:
    """Load the chosen OpenBLAS globally, once per process, when it can help (Linux, before mlx)."""
    status = _preload()
    ignored = switches.BLAS.ignored(os.environ)
    return replace(status, note=f"{status.note}; {ignored}") if ignored else status


def _preload() -> BlasStatus:
    if not sys.platform.startswith("linux"):
        return BlasStatus(None, "not needed on this platform (MLX uses Accelerate/Metal)")
    if switches.BLAS.is_off(os.environ):
        return BlasStatus(None, f"switched off by {SWITCH_ENV}={os.environ[SWITCH_ENV]}")
    if "mlx.core" in sys.modules:
        return BlasStatus(None, "mlx was imported before mlx_med; import mlx_med first")
    candidates = candidate_libraries()
    if not candidates:
        return BlasStatus(None, f"no OpenBLAS found; {FIX}")
    chosen, considered = choose_library(candidates, cpu_flags(), VerdictCache())
    if chosen is None:
        return BlasStatus(None, f"no OpenBLAS is safe to use here; {FIX}", considered=tuple(considered))
    kind, path, verdict = chosen
    spin, spin_why = idle_spin(dict(os.environ))
    if spin is not None:
        os.environ[SPIN_ENV] = spin  # read once, by OpenBLAS's constructor while it loads
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        return BlasStatus(None, f"could not load {path}: {err}", considered=tuple(considered))
    info = verdict.info
    threads, why = thread_count(dict(os.environ), allowed_cpus(), cpu_quota(), info.max_threads if info else None)
    if threads is not None and hasattr(lib, "openblas_set_num_threads"):
        lib.openblas_set_num_threads(threads)
    shown = threads if threads is not None else os.environ[THREADS_ENV]
    return BlasStatus(str(path), f"{kind} preloaded", kind, info, f"{verdict.status}: {verdict.reason}",
                      f"{shown} ({why})", spin_why, tuple(considered))


def slow_blas_warning(status: BlasStatus, linux: bool, on_cpu: bool) -> str | None:
    """The one warning line for a run on the reference BLAS on a Linux CPU, naming the fix; else None."""
    if not (linux and on_cpu) or status.library is not None:
        return None
    return (f"warning: MLX runs on the slow reference BLAS here ({status.note}); "
            f"training and generation will be many times slower. Fix: {FIX}.")


def warn_if_slow_blas() -> None:
    """Print ``slow_blas_warning`` to stderr when it applies (call at the start of long commands)."""
    import mlx.core as mx

    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    line = slow_blas_warning(preload_blas(), sys.platform.startswith("linux"), on_cpu)
    if line:
        print(line, file=sys.stderr, flush=True)


def blas_in_use() -> str:
    """Name the BLAS library mapped into this process (Linux), for diagnostics."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return "Accelerate" if sys.platform == "darwin" else "unknown"
    libs = {line.split()[-1] for line in maps.read_text().splitlines() if ".so" in line}
    if any("openblas" in Path(lib).name for lib in libs):
        return "OpenBLAS"
    if any(Path(lib).name.startswith("libblas") for lib in libs):
        return "netlib reference BLAS"
    return "unknown"
