"""Helpers shared by the kernels."""

from __future__ import annotations

import jax


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret mode exactly when the default backend is not a GPU."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def next_power_of_2(n: int) -> int:
    """Triton's lowering wants power-of-two block shapes; pad logical sizes up to one."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
