"""Checkpoint conversion: HF and GGUF → MLX folders (``hf``, ``gguf``), MLX → Hugging Face (``export``)."""
