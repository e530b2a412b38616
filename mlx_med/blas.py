"""Put OpenBLAS under MLX's Linux CPU backend.

The ``mlx[cpu]`` wheel links the netlib *reference* BLAS (~4 GFLOP/s fp32 GEMM). Loading OpenBLAS
with ``RTLD_GLOBAL`` before ``mlx.core`` is imported makes MLX's ``cblas_*`` calls resolve to it
(~200-300 GFLOP/s on two cores). This module must not import mlx.

Switch it off with ``MLX_MED_BLAS=stock`` (the environment is the only thing read before import).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SWITCH_ENV = "MLX_MED_BLAS"
OPENBLAS_RELPATH = Path("cmeel.prefix") / "lib" / "libopenblas.so.0"


@dataclass(frozen=True)
class BlasStatus:
    """What ``preload_blas`` did. ``library`` is the path loaded, or None."""

    library: str | None
    note: str


def find_openblas() -> Path | None:
    """The ``libopenblas.so.0`` shipped by the ``cmeel-openblas`` wheel, if installed."""
    for entry in sys.path:
        candidate = Path(entry or ".") / OPENBLAS_RELPATH
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=1)
def preload_blas() -> BlasStatus:
    """Load OpenBLAS globally, once per process, when it can help (Linux, before mlx)."""
    if not sys.platform.startswith("linux"):
        return BlasStatus(None, "not needed on this platform (MLX uses Accelerate/Metal)")
    if os.environ.get(SWITCH_ENV, "").lower() in {"stock", "off", "0", "none"}:
        return BlasStatus(None, f"switched off by {SWITCH_ENV}={os.environ[SWITCH_ENV]}")
    if "mlx.core" in sys.modules:
        return BlasStatus(None, "mlx was imported before mlx_med; import mlx_med first")
    path = find_openblas()
    if path is None:
        return BlasStatus(None, "cmeel-openblas is not installed (pip install cmeel-openblas)")
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        hint = ""
        if "libgfortran" in str(err):
            hint = " (install the GNU Fortran runtime: apt-get install libgfortran5)"
        return BlasStatus(None, f"could not load {path}: {err}{hint}")
    return BlasStatus(str(path), "OpenBLAS preloaded")


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
