"""Helpers shared by the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The Hopper (Mosaic GPU) kernels' shared budget: warp-specialized, two consumer warpgroups
# and one producer (TMA) warpgroup per block.
HOPPER_DTYPES = (jnp.float16, jnp.bfloat16)
HOPPER_COMPUTE_WARPGROUPS = 2  # two consumers (ping-pong)
# Shared memory a block may use on Hopper (227 KiB), less room for the barriers.
HOPPER_SMEM_LIMIT_BYTES = 227 * 1024 - 1024
# Registers per thread after `set_max_registers`: the consumers get most of the file
# (64K 32-bit registers per SM across 3 warpgroups of 128 threads: 2 * 232 + 40 <= 512).
HOPPER_CONSUMER_REGISTERS = 232
HOPPER_PRODUCER_REGISTERS = 40
HOPPER_REGISTER_FILE = 65536  # 32-bit registers per SM (and per block at most)
HOPPER_MIN_REGISTERS = 24  # the least `setmaxnreg` allows a thread


def hopper_smem_transforms(columns: int, dtype):
    """Mosaic GPU's tiling and swizzle of a shared-memory tile `columns` wide that TMA fills
    and wgmma reads: 8-row tiles of up to 128 bytes, swizzled by their width (64 fp16
    columns: one 128-byte swizzled tile, the widest)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    item = jnp.dtype(dtype).itemsize
    swizzle = min(128, columns * item)
    return (plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle))


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM); 2 off GPU."""
    return getattr(jax.devices()[0], "core_count", None) or 2


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret mode exactly when the default backend is not a GPU."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def mosaic_interpret_params(interpret: bool):
    """Mosaic GPU's interpret-mode parameters for `plgpu.kernel(interpret=...)` (None on the
    GPU): it raises on out-of-bounds reads, and fresh memory holds NaN."""
    if not interpret:
        return None
    try:  # public from jax 0.11
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
    except ImportError:  # jax 0.10
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def next_power_of_2(n: int) -> int:
    """Triton's lowering wants power-of-two block shapes; pad logical sizes up to one."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot(a, b, *, trans_b: bool = False):
    """a @ b (or a @ b.T) with float32 accumulation; float32 operands stay full precision.

    Pallas' Triton lowering maps Precision.DEFAULT on float32 to tf32 (error ~4e-4, seen on
    the H100); HIGHEST selects IEEE fp32.
    """
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
