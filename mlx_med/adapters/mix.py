"""The one rule every command applies to its adapter flags: ``--adapter DIR``, or ``--sft RUN --pt RUN``.

Kept free of MLX so that configs can be checked before anything heavy is imported.
"""

from __future__ import annotations

from pathlib import Path

from mlx_med.errors import UserError


def check_adapter_choice(adapter: str | Path | None, sft: str | Path | None, pt: str | Path | None,
                         alpha: float | None = None) -> None:
    """Raise ``UserError`` unless the flags name one adapter, the SFT + PT pair, or none.

    Args:
        adapter, sft, pt: the flags' values (None when not given).
        alpha: when given, it must lie in [0, 1] (interpolation; ``fuse``/``merge`` allow extrapolation
            and do not pass it).
    """
    if adapter is not None and (sft is not None or pt is not None):
        raise UserError("give either --adapter DIR or --sft RUN --pt RUN, not both")
    if (sft is None) != (pt is None):
        raise UserError("--sft and --pt go together (use --adapter DIR for a single adapter)")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
