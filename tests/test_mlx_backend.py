"""scripts/mlx_backend.py: setup.sh's choice of MLX backend from what nvidia-smi reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mlx_backend.py"
HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:19:00.0 Off |                    0 |
"""
NO_DRIVER = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def choose(tmp_path: Path, output: str | None, exit_code: int = 0) -> subprocess.CompletedProcess:
    """Run the script with a fake nvidia-smi (None: none on PATH) that prints ``output``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if output is not None:
        fake = bin_dir / "nvidia-smi"
        (tmp_path / "out.txt").write_text(output)
        fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write(open({str(tmp_path / 'out.txt')!r}).read())\n"
                        f"sys.exit({exit_code})\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir)}  # no real nvidia-smi can leak in
    return subprocess.run([sys.executable, str(SCRIPT), "--explain"], env=env, capture_output=True,
                          text=True, check=True, timeout=60)


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CUDA choice is Linux-only")


@pytest.mark.parametrize(("cuda", "backend"), [("12.4", "cuda12"), ("12.0", "cuda12"), ("13.0", "cuda13"),
                                               ("13.1", "cuda13"), ("11.8", "cpu")])
def test_driver_cuda_version_picks_the_mlx_extra(tmp_path, cuda, backend):
    done = choose(tmp_path, HEADER.format(cuda=cuda))
    assert done.stdout.strip() == backend
    assert cuda in done.stderr


def test_no_gpu_no_driver_or_no_version_means_cpu(tmp_path):
    assert choose(tmp_path, None).stdout.strip() == "cpu"
    assert choose(tmp_path, NO_DRIVER, exit_code=9).stdout.strip() == "cpu"
    assert choose(tmp_path, "some other tool output\n").stdout.strip() == "cpu"
