"""mlx-med's on/off environment switches, read one way.

``MLX_MED_BLAS``, ``MLX_MED_KERNELS``, ``MLX_MED_MALLOC``, ``MLX_MED_BATCH_CACHE``,
``MLX_MED_PACKED_WEIGHTS`` and ``MLX_MED_SHARED_PREFIX`` each turn off one of mlx-med's own choices (the
OpenBLAS preload, the CPU kernels, the malloc tuning, the batch KV cache that refills in place,
generation's projections over weights packed once, a batch's common prompt start prefilled once); ``MLX_MED_KERNEL_THREADS`` caps
the threads of one kernel call. They are read where they act, some before mlx is imported, so a value
a switch does not know cannot stop a command: the choice stays on (or the default stays), and the line
``mlx-med doctor`` prints for it says which value was ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ON_VALUES = ("", "on", "1", "true", "yes", "auto")  # unset, or asked for explicitly: mlx-med's choice stays on
KERNEL_THREADS_ENV = "MLX_MED_KERNEL_THREADS"


@dataclass(frozen=True)
class Switch:
    name: str
    off: tuple[str, ...]  # values (any case) that turn mlx-med's choice off
    other: tuple[str, ...] = ()  # values with a meaning of their own, read where they act

    def value(self, env: Mapping[str, str]) -> str:
        return env.get(self.name, "").strip().lower()

    def is_off(self, env: Mapping[str, str]) -> bool:
        return self.value(env) in self.off

    def ignored(self, env: Mapping[str, str]) -> str | None:
        """A note when the variable holds a value this switch does not know (the choice then stays on)."""
        if self.value(env) in (*self.off, *self.other, *ON_VALUES):
            return None
        known = ", ".join((*self.off, *self.other))
        return f"{self.name}={env[self.name]} ignored (known values: {known}; unset for the default)"


BLAS = Switch("MLX_MED_BLAS", off=("stock", "off", "0", "none"))
KERNELS = Switch("MLX_MED_KERNELS", off=("off", "0", "none", "mlx", "false"), other=("scalar", "avx2"))
MALLOC = Switch("MLX_MED_MALLOC", off=("system", "off", "0", "none"))
BATCH_CACHE = Switch("MLX_MED_BATCH_CACHE", off=("mlx-lm", "off", "0", "none"))
PACKED_WEIGHTS = Switch("MLX_MED_PACKED_WEIGHTS", off=("mlx", "off", "0", "none"))
SHARED_PREFIX = Switch("MLX_MED_SHARED_PREFIX", off=("off", "0", "none", "false"))


def kernel_threads_ignored(env: Mapping[str, str]) -> str | None:
    """A note when ``MLX_MED_KERNEL_THREADS`` is set but not a whole number >= 1 (the kernels then use
    this process's CPUs, as when it is unset)."""
    raw = env.get(KERNEL_THREADS_ENV)
    if raw is None or (raw.strip().isascii() and raw.strip().isdigit() and int(raw) >= 1):
        return None
    return f"{KERNEL_THREADS_ENV}={raw} ignored (a whole number >= 1)"
