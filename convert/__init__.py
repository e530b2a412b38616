"""Checkpoint conversion: HF and GGUF → MLX folders (``hf``, ``gguf``), MLX → Hugging Face (``export``).

``mlx_med`` is imported first so that OpenBLAS sits under MLX before anything here imports it.
"""

import mlx_med  # noqa: F401
