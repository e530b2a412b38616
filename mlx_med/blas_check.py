"""Is an OpenBLAS library safe on this CPU? Its build facts, the CPU's flags, a child-process check.

An OpenBLAS built for one CPU (``cmeel-openblas`` is a SKYLAKEX build: AVX-512 kernels only) kills the
process with SIGILL on a CPU without those instructions. Two layers keep that from happening:

1. the rule: a ``DYNAMIC_ARCH`` build picks its kernels at run time and is fine anywhere; a single-core
   build is used only when the CPU has every instruction set that core needs (``CORE_NEEDS``);
2. the safety belt: before a library is first used on a CPU, a child process loads it under MLX and runs
   a GEMM, a GEMV and a softmax; a child killed by a signal (or giving wrong numbers) means "never use it
   on this CPU". The verdict is cached (``VerdictCache``) so later start-ups cost one small file read.

This module must not import mlx (it runs before mlx is imported).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_med.fingerprint import file_stamp
from mlx_med.io import atomic_write_json, cache_dir

# Instruction sets (as /proc/cpuinfo spells them) an OpenBLAS kernel set needs. A single-core build whose
# core is missing here is not trusted: refusing a fast library costs speed, loading a wrong one a crash.
_SKX = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"})
CORE_NEEDS: dict[str, frozenset[str]] = {
    "GENERIC": frozenset(), "PRESCOTT": frozenset({"sse3"}), "CORE2": frozenset({"ssse3"}),
    "ATOM": frozenset({"ssse3"}), "PENRYN": frozenset({"sse4_1"}), "DUNNINGTON": frozenset({"sse4_1"}),
    "NEHALEM": frozenset({"sse4_2"}), "BARCELONA": frozenset({"sse4a"}),
    "SANDYBRIDGE": frozenset({"avx"}), "BULLDOZER": frozenset({"avx", "fma4"}),
    "PILEDRIVER": frozenset({"avx", "fma"}), "STEAMROLLER": frozenset({"avx", "fma"}),
    "EXCAVATOR": frozenset({"avx2", "fma"}), "HASWELL": frozenset({"avx2", "fma"}),
    "ZEN": frozenset({"avx2", "fma"}), "SKYLAKEX": _SKX, "COOPERLAKE": _SKX | {"avx512_bf16"},
    "SAPPHIRERAPIDS": _SKX | {"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"},
    # 64-bit ARM ("Features" in /proc/cpuinfo)
    "ARMV8": frozenset(), "CORTEXA53": frozenset({"asimd"}), "CORTEXA57": frozenset({"asimd"}),
    "CORTEXA72": frozenset({"asimd"}), "NEOVERSEN1": frozenset({"asimd"}),
    "ARMV8SVE": frozenset({"sve"}), "NEOVERSEV1": frozenset({"sve"}), "A64FX": frozenset({"sve"}),
    "NEOVERSEN2": frozenset({"sve", "sve2"}),
}
OK, REFUSED, CRASHED, FAILED = "ok", "refused", "crashed", "failed"
CHECK_TIMEOUT_S = 180

# The safety belt, run as `python -c CHILD_CHECK LIBRARY`: what MLX's CPU backend calls into BLAS for in
# training (GEMM, GEMV) plus a vectorised softmax, compared with numpy (its own BLAS, prefixed symbols).
CHILD_CHECK = """
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((192, 160)).astype(np.float32)
b = rng.standard_normal((160, 128)).astype(np.float32)
v = rng.standard_normal((160,)).astype(np.float32)
with mx.stream(mx.cpu):
    got = [np.array(mx.array(a) @ mx.array(b)), np.array(mx.array(a) @ mx.array(v)),
           np.array(mx.softmax(mx.array(a), axis=-1))]
e = np.exp(a - a.max(axis=-1, keepdims=True))
want = [a @ b, a @ v, e / e.sum(axis=-1, keepdims=True)]
bad = [i for i, (g, w) in enumerate(zip(got, want)) if not np.allclose(g, w, rtol=1e-3, atol=1e-3)]
sys.exit(3 if bad else 0)
"""


@dataclass(frozen=True)
class LibraryInfo:
    """What an OpenBLAS library says about itself (``openblas_get_config`` / ``openblas_get_corename``)."""

    config: str
    core: str  # upper-case core name: the build target, or the run-time choice of a DYNAMIC_ARCH build
    dynamic_arch: bool
    max_threads: int | None


@dataclass(frozen=True)
class Verdict:
    """Whether a library may be used on this CPU, and why."""

    status: str  # OK, REFUSED (the rule), CRASHED or FAILED (the child check)
    reason: str
    info: LibraryInfo | None = None

    @property
    def usable(self) -> bool:
        return self.status == OK


def parse_config(config: str, corename: str = "") -> LibraryInfo:
    """Build facts from a config string such as ``OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4``."""
    tokens = config.split()
    max_threads = next((int(t.split("=", 1)[1]) for t in tokens
                        if t.startswith("MAX_THREADS=") and t.split("=", 1)[1].isdigit()), None)
    core = corename.strip().upper()
    if not core:  # the build core is the one config token that names a known core
        core = next((t.upper() for t in tokens if t.upper() in CORE_NEEDS), "UNKNOWN")
    return LibraryInfo(config.strip(), core, "DYNAMIC_ARCH" in tokens, max_threads)


def query_library(path: str | Path) -> LibraryInfo:
    """Ask the library itself, through a private (``RTLD_LOCAL``) load that MLX never sees.

    Raises:
        OSError: the library cannot be loaded (a missing dependency such as libgfortran), or is no OpenBLAS.
    """
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    if not hasattr(lib, "openblas_get_config"):
        raise OSError(f"{path} is not an OpenBLAS (no openblas_get_config)")
    lib.openblas_get_config.restype = ctypes.c_char_p
    corename = ""
    if hasattr(lib, "openblas_get_corename"):
        lib.openblas_get_corename.restype = ctypes.c_char_p
        corename = (lib.openblas_get_corename() or b"").decode(errors="replace")
    return parse_config(lib.openblas_get_config().decode(errors="replace"), corename)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's instruction-set flags (x86 ``flags`` or ARM ``Features`` of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            return frozenset(value.split())
    return frozenset()


def allowed_cpus() -> int:
    """How many CPUs this process may run on (its affinity; the CPU count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_identity(cpuinfo: str | None = None) -> str:
    """A hash of the CPU's model name and instruction-set flags: the key of every verdict cached per CPU
    (this BLAS's, the CPU kernels' self-check), so a cache carried to another machine is not trusted."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model = next((line.partition(":")[2].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "")
    flags = " ".join(sorted(cpu_flags(cpuinfo)))
    return hashlib.sha256(f"{model}|{flags}".encode()).hexdigest()[:16]


# OpenBLAS's own override of a DYNAMIC_ARCH build's core choice (e.g. "Haswell"): it picks those kernels
# whatever the CPU has, so they are vetted like a single-core build's.
CORETYPE_ENV = "OPENBLAS_CORETYPE"


def forced_coretype() -> str | None:
    """The core ``$OPENBLAS_CORETYPE`` forces on a DYNAMIC_ARCH OpenBLAS, or None (its own choice)."""
    return os.environ.get(CORETYPE_ENV) or None


def rule_verdict(info: LibraryInfo, flags: frozenset[str], forced_core: str | None = None) -> Verdict | None:
    """REFUSED when the core the library runs needs instructions this CPU lacks; None when the rule allows it.

    A ``DYNAMIC_ARCH`` build picks a core this CPU has, unless ``forced_core`` (``$OPENBLAS_CORETYPE``)
    chose one: then ``info.core`` is that choice and must fit the CPU.
    """
    if info.dynamic_arch and not forced_core:
        return None
    needs = CORE_NEEDS.get(info.core)
    if needs is None:
        if info.dynamic_arch:  # a name OpenBLAS does not know leaves it to its own detection
            return None
        return Verdict(REFUSED, f"single-core build for {info.core}, a core mlx-med cannot vet", info)
    missing = sorted(needs - flags)
    if missing and info.dynamic_arch:
        return Verdict(REFUSED, f"{CORETYPE_ENV}={forced_core} selects {info.core} kernels; this CPU lacks "
                                f"{', '.join(missing)}", info)
    if missing:
        return Verdict(REFUSED, f"built for {info.core} only; this CPU lacks {', '.join(missing)}", info)
    return None


def child_check(library: str | Path, command: list[str] | None = None,
                timeout: float = CHECK_TIMEOUT_S) -> Verdict:
    """Run GEMM, GEMV and softmax under MLX with ``library`` preloaded, in a child process.

    Args:
        library: the shared library to check.
        command: the child's command line (tests pass one that crashes); default: ``CHILD_CHECK``.
        timeout: seconds before the child counts as failed.

    Returns:
        OK, CRASHED (killed by a signal, e.g. SIGILL) or FAILED (wrong numbers, error exit, timeout).
        The parent is never at risk: the library is loaded only in the child.
    """
    command = command or [sys.executable, "-c", CHILD_CHECK, str(library)]
    env = {**os.environ, "MLX_MED_BLAS": "stock", "OPENBLAS_NUM_THREADS": "2"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Verdict(FAILED, f"check did not finish in {timeout:.0f} s")
    except OSError as err:
        return Verdict(FAILED, f"check could not start: {err}")
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return Verdict(CRASHED, f"the check process was killed by {name}")
    if done.returncode == 3:
        return Verdict(FAILED, "GEMM/GEMV/softmax under MLX gave wrong numbers")
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return Verdict(FAILED, f"the check exited with {done.returncode}: {last}")
    return Verdict(OK, "GEMM, GEMV and softmax under MLX passed in a child process")


class VerdictCache:
    """Verdicts per (library file, CPU), in ``blas-verdicts.json`` under ``cache_dir()``.

    A library is identified by its real path, size and modification time (an upgrade is checked again);
    a CPU by a hash of its model name and flags. An unwritable cache only costs a re-check next time.
    """

    def __init__(self, directory: Path | None = None, cpuinfo: str | None = None):
        self.path = (directory or cache_dir()) / "blas-verdicts.json"
        self.cpu = cpu_identity(cpuinfo)

    def key(self, library: str | Path) -> str:
        forced = forced_coretype()  # other kernels of the same file: judged on their own
        return f"{file_stamp(library)}|cpu={self.cpu}" + (f"|coretype={forced}" if forced else "")

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, library: str | Path) -> Verdict | None:
        entry = self._read().get(self.key(library))
        if not isinstance(entry, dict):
            return None
        try:
            info = LibraryInfo(**entry["info"]) if entry.get("info") else None
            return Verdict(entry["status"], entry["reason"], info)
        except (KeyError, TypeError):
            return None

    def put(self, library: str | Path, verdict: Verdict) -> None:
        data = self._read()
        data[self.key(library)] = asdict(verdict)
        try:
            atomic_write_json(self.path, data)
        except OSError:
            pass  # read-only home: the next start-up checks again
