"""LayerNorm over the last axis as one Pallas (Triton) kernel: one read, one write.

x [..., C] is viewed, for free, as [R, C] rows. One program normalizes `block_rows` whole rows:
it loads a [block_rows, C_pad] tile (C_pad = next_power_of_2(C), the lanes past C masked),
takes the row means and the variances of the (re-)centred values in float32 in registers, and
writes scale * (x - mean) * rstd + bias. Rows past R (the last program's tail) are masked, so
nothing is padded in memory.

In SD's transformer blocks (three LayerNorms per block, C = 320..1280 and R = batch * H * W up
to 8192) XLA splits this into a reduction fusion and an element-wise fusion; this kernel moves
each byte once (see `experiments/bench_norm.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from custom_calls._common import next_power_of_2, resolve_interpret

_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
# The widest row one program holds in registers: C_pad * block_rows floats over its threads.
MAX_FEATURES = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """block_rows: rows per program (a power of two); num_warps: Triton warps per program."""

    block_rows: int = 8
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_rows", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Config: {name}={value} must be a power of two")


# Elements of x one program holds: about 8K keeps a tile in registers at 4 warps (64 fp32 per
# thread) while giving each program enough bytes to stream (16 KiB of fp16).
_TILE_ELEMENTS = 8192


def heuristic_config(shape, dtype) -> Config:
    """A rule of thumb (no sweep recorded yet): ~8K elements per program, 8 warps from 2K lanes."""
    del dtype
    c_pad = next_power_of_2(shape[-1])
    rows = max(1, _TILE_ELEMENTS // c_pad)
    rows = min(rows, next_power_of_2(max(1, math.prod(shape[:-1]))))
    return Config(block_rows=rows, num_warps=8 if c_pad >= 2048 else 4)


def _layer_norm_kernel(x_ref, scale_ref, bias_ref, o_ref, *, n_rows, features, eps):
    """x_ref, o_ref: [block_rows, C_pad] of rows [i * block_rows, ...); scale/bias: [C_pad]."""
    block_rows, c_pad = x_ref.shape
    cols = lax.broadcasted_iota(jnp.int32, (c_pad,), 0)
    col_valid = cols < features
    mask = col_valid[None, :]
    if n_rows % block_rows:
        rows = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
        mask = mask & (rows < n_rows)[:, None]
    x = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / features
    d = jnp.where(mask, x - mean[:, None], 0.0)
    # Re-centre by the centred values' own mean: removes the rounding error of the float32
    # mean, which matters when the mean is large against the spread (1000 vs 0.01: 6e-3).
    d = jnp.where(mask, d - (jnp.sum(d, axis=1) / features)[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(d * d, axis=1) / features + eps)
    scale = plgpu.load(scale_ref, mask=col_valid, other=0.0).astype(jnp.float32)
    bias = plgpu.load(bias_ref, mask=col_valid, other=0.0).astype(jnp.float32)
    y = d * rstd[:, None] * scale[None, :] + bias[None, :]
    plgpu.store(o_ref, y.astype(o_ref.dtype), mask=mask)


def _validate(x, scale, bias, eps):
    if x.ndim < 1 or x.size == 0:
        raise ValueError(f"layer_norm wants x [..., C] with C >= 1; got {x.shape=}")
    c = x.shape[-1]
    if scale.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"layer_norm: scale, bias must be [{c}]; got {scale.shape}, {bias.shape}")
    if c > MAX_FEATURES:
        raise ValueError(f"layer_norm: C={c} > {MAX_FEATURES} (one row per program's registers)")
    if x.dtype not in _DTYPES:
        raise ValueError(f"layer_norm: {x.dtype=} must be one of float16, bfloat16, float32")
    if not eps > 0:
        raise ValueError(f"layer_norm: {eps=} must be positive")


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def layer_norm(
    x, scale, bias, *, eps: float = 1e-5, config: Config | None = None, interpret=None
):  # fmt: skip
    """LayerNorm over the last axis: x [..., C]; scale, bias [C] -> x's shape and dtype.

    Statistics in float32: the mean, the centred values re-centred by their own mean, their
    variance (as the reference).
    """
    _validate(x, scale, bias, eps)
    config = config or heuristic_config(x.shape, x.dtype)
    c = x.shape[-1]
    c_pad = next_power_of_2(c)
    x2 = x.reshape(-1, c)
    n_rows = x2.shape[0]
    block_rows = min(config.block_rows, next_power_of_2(n_rows))
    row_spec = pl.BlockSpec((block_rows, c_pad), lambda i: (i, 0))
    vec_spec = pl.BlockSpec((c_pad,), lambda i: (0,))
    out = pl.pallas_call(
        functools.partial(_layer_norm_kernel, n_rows=n_rows, features=c, eps=eps),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x.dtype),
        grid=(pl.cdiv(n_rows, block_rows),),
        in_specs=[row_spec, vec_spec, vec_spec],
        out_specs=row_spec,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="sdjax_layer_norm",
    )(x2, scale, bias)
    return out.reshape(x.shape)


def layer_norm_reference(x, scale, bias, *, eps: float = 1e-5):
    """Plain jnp in float32 with corrected two-pass statistics (the centred values re-centred
    by their own mean); returned in x's dtype."""
    xf = x.astype(jnp.float32)
    d = xf - jnp.mean(xf, axis=-1, keepdims=True)
    d = d - jnp.mean(d, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(d), axis=-1, keepdims=True)
    y = d * lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)
