"""mlx-med: two-stage LoRA (PT + SFT), weighted adapter merging, export and evaluation on MLX.

Importing the package first puts a fast BLAS under MLX on Linux CPU (see ``mlx_med.blas``) and keeps
freed memory in the process for the next step's buffers (``mlx_med.malloc``); every module of the
project imports ``mlx_med`` before ``mlx``.
"""

from mlx_med.blas import preload_blas
from mlx_med.malloc import tune_malloc

__version__ = "0.1.0"

preload_blas()
tune_malloc()
