"""fp32 GEMM throughput: stock MLX CPU wheel (reference BLAS) vs mlx-med's backend (OpenBLAS).

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
if sys.argv[1] == "mlx-med":
    import mlx_med  # preloads OpenBLAS
from mlx_med.backend import gemm_gflops
print(gemm_gflops(int(sys.argv[2]), repeats=int(sys.argv[3])))
"""


def measure(side: str, n: int, repeats: int) -> float:
    env = dict(os.environ)
    if side == "stock":
        env["MLX_MED_BLAS"] = "stock"  # the package import must not switch BLAS for the stock run
    out = subprocess.run([sys.executable, "-c", PROBE, side, str(n), str(repeats)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    stock = measure("stock", args.size, args.repeats)
    ours = measure("mlx-med", args.size, args.repeats)
    print(f"gemm fp32 {args.size}^3, stock mlx wheel: {stock:.1f} GFLOP/s")
    print(f"gemm fp32 {args.size}^3, mlx-med backend: {ours:.1f} GFLOP/s")
    print(f"ratio: {ours / stock:.1f}")


if __name__ == "__main__":
    main()
