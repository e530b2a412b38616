"""mlx-med: two-stage LoRA (PT + SFT), weighted adapter merging, export and evaluation on MLX.

Importing the package first puts a fast BLAS under MLX on Linux CPU (see ``mlx_med.blas``); every
module of the project imports ``mlx_med`` before ``mlx``.
"""

from mlx_med.blas import preload_blas

__version__ = "0.1.0"

preload_blas()
