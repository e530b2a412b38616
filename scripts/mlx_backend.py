"""Which MLX backend to install here: ``cuda13``, ``cuda12`` or ``cpu`` (Linux), ``metal`` (macOS).

Run by ``scripts/setup.sh`` before mlx-med is installed, so it uses the standard library only. On Linux
it asks ``nvidia-smi`` for the CUDA version the driver supports: 13.x or newer → ``mlx[cuda13]``, 12.x
→ ``mlx[cuda12]``; no GPU, no driver, an older driver or an unreadable answer → ``mlx[cpu]``.

    python3 scripts/mlx_backend.py              # prints e.g. "cuda12"
    python3 scripts/mlx_backend.py --explain    # and, on stderr, why
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys

CUDA_VERSION = re.compile(r"CUDA Version:\s*(\d+)\.(\d+)")


def backend_for(nvidia_smi_output: str | None) -> tuple[str, str]:
    """``(backend, reason)`` from the text ``nvidia-smi`` printed (None: it is absent or failed)."""
    if nvidia_smi_output is None:
        return "cpu", "no working nvidia-smi: no NVIDIA GPU or driver"
    match = CUDA_VERSION.search(nvidia_smi_output)
    if match is None:
        return "cpu", "nvidia-smi reports no CUDA version"
    major, minor = int(match.group(1)), int(match.group(2))
    if major >= 13:
        return "cuda13", f"the NVIDIA driver supports CUDA {major}.{minor}"
    if major == 12:
        return "cuda12", f"the NVIDIA driver supports CUDA {major}.{minor}"
    return "cpu", f"the NVIDIA driver supports only CUDA {major}.{minor}; MLX needs 12 or newer"


def run_nvidia_smi() -> str | None:
    """``nvidia-smi``'s output, or None when it is missing, fails or hangs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def main() -> None:
    if platform.system() == "Darwin":
        backend, reason = "metal", "macOS: MLX runs on Metal"
    elif platform.system() != "Linux":
        backend, reason = "cpu", f"{platform.system()}: CPU only"
    else:
        backend, reason = backend_for(run_nvidia_smi())
    print(backend)
    if "--explain" in sys.argv[1:]:
        print(f"MLX backend: {backend} ({reason})", file=sys.stderr)


if __name__ == "__main__":
    main()
