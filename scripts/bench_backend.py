"""fp32 GEMM throughput: stock MLX CPU wheel (reference BLAS) vs mlx-med's backend (the OpenBLAS it chose).

Each side runs in its own process, because the BLAS is chosen when mlx is first imported.
Prints both figures and, last, ``ratio: <mlx-med / stock>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PROBE = """
import sys
import mlx_med  # preloads the chosen OpenBLAS, unless MLX_MED_BLAS=stock
from mlx_med.backend import gemm_gflops
from mlx_med.blas import preload_blas
print(preload_blas().library)
print(gemm_gflops(int(sys.argv[2]), repeats=int(sys.argv[3])))
"""


def measure(side: str, n: int, repeats: int) -> tuple[float, str]:
    env = dict(os.environ)
    if side == "stock":
        env["MLX_MED_BLAS"] = "stock"  # the package import must not switch BLAS for the stock run
    out = subprocess.run([sys.executable, "-c", PROBE, side, str(n), str(repeats)], env=env,
                         capture_output=True, text=True, check=True)
    library, gflops = out.stdout.strip().splitlines()[-2:]
    return float(gflops), library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    stock, _ = measure("stock", args.size, args.repeats)
    ours, library = measure("mlx-med", args.size, args.repeats)
    print(f"gemm fp32 {args.size}^3, stock mlx wheel: {stock:.1f} GFLOP/s")
    print(f"gemm fp32 {args.size}^3, mlx-med backend: {ours:.1f} GFLOP/s ({library})")
    print(f"ratio: {ours / stock:.1f}")


if __name__ == "__main__":
    main()
