"""Compile the kernels' C++ sources (``SOURCES``) into an MLX extension module once per machine, and load it.

The module is built on first use (about 10 s) into ``cache_dir()/kernels/<key>/``, where the key
hashes everything the binary depends on: the source, MLX's and nanobind's versions, the Python ABI
and the compiler. A build is written under a temporary name and renamed into place, under a file
lock, so concurrent processes build it once and never load half a file. It links MLX's own
``libmlx`` and joins MLX's nanobind domain, so its functions take and return ``mx.array``.

Nothing here is required: with no compiler, no Python headers or a non-x86 CPU, ``load()`` says why
and mlx-med keeps MLX's own kernels (same results, slower).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mlx_med.io import cache_dir

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.cpp", HERE / "packed_gemm.cpp")  # compiled, in this order
HEADERS = (HERE / "primitive_io.h", HERE / "worker_pool.h")
MODULE_NAME = "_mlx_med_kernels"
BUILD_TIMEOUT_S = 300
CXXFLAGS = ["-std=c++20", "-O3", "-fPIC", "-fvisibility=hidden", "-DNDEBUG",
            # No fused multiply-add except where the source asks for one: MLX's results are the contract.
            "-ffp-contract=off",
            # Share MLX's nanobind domain: mx.array arguments and results cross the boundary as is.
            "-DNB_DOMAIN=mlx"]


@dataclass(frozen=True)
class Built:
    """A loaded extension module, or None and why not."""

    module: ModuleType | None
    reason: str  # what was done ("built ...", "cached ...") or why there is no module
    path: Path | None = None


class BuildError(RuntimeError):
    pass


def compiler() -> str | None:
    """``$CXX`` (when it names an executable), else ``g++`` (what MLX's own CPU JIT uses), else ``c++``."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("g++") or shutil.which("c++")


def stable_abi() -> bool:
    """Whether MLX's Python module uses the stable ABI (then nanobind's domain state is keyed so)."""
    import mlx.core as mx

    return ".abi3." in Path(mx.__file__).name


def build_inputs() -> dict[str, str]:
    """What the binary depends on; their hash names its folder."""
    import mlx.core as mx
    import nanobind

    cxx = compiler() or ""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:  # not runnable: the build then fails and says so
        version = ""
    source = hashlib.sha256(b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))).hexdigest()
    return {"source": source, "mlx": mx.__version__,
            "nanobind": nanobind.__version__, "python": sysconfig.get_config_var("EXT_SUFFIX") or "",
            "stable_abi": str(stable_abi()), "compiler": f"{cxx} {version}", "flags": " ".join(CXXFLAGS)}


def module_path() -> Path:
    key = hashlib.sha256(repr(sorted(build_inputs().items())).encode()).hexdigest()[:16]
    suffix = ".abi3.so" if stable_abi() else (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
    return cache_dir() / "kernels" / key / (MODULE_NAME + suffix)


def unsupported_reason() -> str | None:
    """Why this machine cannot build the kernels, or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the vectorized kernels are for Linux x86-64 (this is {platform.system()} {platform.machine()})"
    if compiler() is None:
        return (f"$CXX={os.environ['CXX']} is not an executable" if os.environ.get("CXX")
                else "no C++ compiler (g++) found")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's C headers are missing (install python3-dev)"
    try:
        import nanobind  # noqa: F401
    except ImportError:
        return "nanobind is not installed"
    return None


def compile_module(target: Path) -> None:
    """Compile nanobind's runtime and our source into ``target`` (via a temporary file)."""
    import mlx.core as mx
    import nanobind

    mlx_root = Path(mx.__file__).resolve().parent
    nb_root = Path(nanobind.__file__).resolve().parent
    flags = [*CXXFLAGS, f"-I{sysconfig.get_paths()['include']}", f"-I{nb_root / 'include'}",
             f"-I{nb_root / 'ext' / 'robin_map' / 'include'}", f"-I{mlx_root / 'include'}"]
    if stable_abi():
        flags.append("-DPy_LIMITED_API=0x030C0000")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = []
        for source in (nb_root / "src" / "nb_combined.cpp", *SOURCES):
            obj = Path(tmp) / (source.stem + ".o")
            run([compiler(), *flags, "-c", str(source), "-o", str(obj)])
            objects.append(str(obj))
        partial = Path(tmp) / target.name
        run([compiler(), "-shared", *objects, f"-L{mlx_root / 'lib'}", "-lmlx",
             f"-Wl,-rpath,{mlx_root / 'lib'}", "-ldl", "-o", str(partial)])
        os.replace(partial, target)


def run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuildError(f"{command[0]}: {err}") from None
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BuildError(f"{Path(command[0]).name} exited with {done.returncode}: {' | '.join(last)}")


def import_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> Built:
    """The compiled kernels module, building it first if needed."""
    reason = unsupported_reason()
    if reason:
        return Built(None, reason)
    path = module_path()
    made = "cached"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with locked(path.parent / ".build.lock"):
                if not path.exists():  # another process may have built it while we waited
                    compile_module(path)
                    made = "built"
        except (BuildError, OSError) as err:
            return Built(None, f"could not build the kernels: {err}")
    try:
        return Built(import_module(path), f"{made} {path}", path)
    except ImportError as err:
        return Built(None, f"could not load {path}: {err}")


@contextlib.contextmanager
def locked(lock_path: Path):
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
