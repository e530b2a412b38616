"""``python -m mlx_med.kernels``: build (if needed), check and report the vectorized CPU kernels."""

import mlx_med  # noqa: F401  (BLAS preload before mlx)
from mlx_med.kernels import recheck_cpu_kernels

kernels, reason = recheck_cpu_kernels()
print(f"kernels: {'mlx-med' if kernels else 'MLX'} ({reason})")
