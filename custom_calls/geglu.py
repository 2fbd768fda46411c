"""GEGLU, the first half of Stable Diffusion's feed-forward, as Pallas (Triton) kernels.

[hidden, gate] = split(x @ w + b, 2, axis=-1); out = hidden * gelu(gate) (exact erf GELU).

`geglu` is one matmul kernel: program (i, j) accumulates the hidden tile (columns j*bn of w)
and the matching gate tile (columns F + j*bn) side by side in float32, and its epilogue writes
only hidden * gelu(gate), so the 2F-wide projection never reaches memory.
`geglu_elementwise` is the epilogue alone, for use after an XLA (cuBLAS) matmul.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from custom_calls._common import dot, next_power_of_2, resolve_interpret
from custom_calls.group_norm import activate

_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    block_m: int = 128  # tokens per program
    block_n: int = 128  # output columns per program (and as many gate columns)
    block_k: int = 64  # reduction step
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for f in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Config: {f}={v} must be a power of two")


def heuristic_config(m: int, d: int, f: int, dtype) -> Config:
    """Tiles for x [m, d] @ w [d, 2f]. The large-shape tiles won the H100 block sweep
    (`bench_norm --sweep_geglu`, 7 configs, fp16) at SD1.5's 64x64, 32x32 and 16x16 shapes:
    0.059 / 0.047 / 0.047 ms against 0.067 / 0.058 / 0.054 for the earlier 128x128 tiles."""
    block_k = 32 if jnp.dtype(dtype).itemsize == 4 else 64
    block_k = min(block_k, next_power_of_2(d))
    if m * f <= 512 * 5120 and m < 512:  # few tokens: smaller tiles so that more programs run
        return Config(block_m=64, block_n=64, block_k=block_k, num_warps=4, num_stages=3)
    return Config(block_m=128, block_n=64, block_k=block_k, num_warps=8, num_stages=3)


def _geglu_kernel(x_ref, w_ref, b_ref, o_ref, *, block_m, block_n, block_k, inner):
    i, j = pl.program_id(0), pl.program_id(1)
    m, d = x_ref.shape
    rows = i * block_m + jnp.arange(block_m)
    cols = j * block_n + jnp.arange(block_n)
    row_mask = (rows < m)[:, None] if m % block_m else None
    col_mask = (cols < inner)[None, :] if inner % block_n else None
    k_tail = d % block_k != 0

    def body(k, acc):
        ks = k * block_k + jnp.arange(block_k)
        xm = _and(row_mask, (ks < d)[None, :] if k_tail else None, (block_m, block_k))
        wm = _and((ks < d)[:, None] if k_tail else None, col_mask, (block_k, block_n))
        kd = pl.ds(k * block_k, block_k)
        xk = _load(x_ref.at[pl.ds(i * block_m, block_m), kd], xm)
        wh = _load(w_ref.at[kd, pl.ds(j * block_n, block_n)], wm)
        wg = _load(w_ref.at[kd, pl.ds(inner + j * block_n, block_n)], wm)
        return (
            acc[0] + dot(xk, wh),  # full fp32 for fp32 operands (not tf32)
            acc[1] + dot(xk, wg),
        )

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    hidden, gate = jax.lax.fori_loop(0, pl.cdiv(d, block_k), body, (zeros, zeros))
    bm = _and(None, col_mask, (1, block_n))
    bm = None if bm is None else bm[0]
    hidden += _load(b_ref.at[pl.ds(j * block_n, block_n)], bm).astype(jnp.float32)[None, :]
    gate += _load(b_ref.at[pl.ds(inner + j * block_n, block_n)], bm).astype(jnp.float32)[None]
    out = hidden * activate(gate, "gelu")
    om = _and(row_mask, col_mask, (block_m, block_n))
    plgpu.store(
        o_ref.at[pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)],
        out.astype(o_ref.dtype),
        mask=om,
    )


def _elementwise_kernel(h_ref, *rest, block_m, block_n, inner, has_bias):
    b_ref, o_ref = rest if has_bias else (None, rest[0])
    i, j = pl.program_id(0), pl.program_id(1)
    m = h_ref.shape[0]
    row_mask = (i * block_m + jnp.arange(block_m) < m)[:, None] if m % block_m else None
    cm = (j * block_n + jnp.arange(block_n) < inner) if inner % block_n else None
    mask = _and(row_mask, None if cm is None else cm[None, :], (block_m, block_n))
    rs = pl.ds(i * block_m, block_m)
    hidden = _load(h_ref.at[rs, pl.ds(j * block_n, block_n)], mask, "evict_first")
    gate = _load(h_ref.at[rs, pl.ds(inner + j * block_n, block_n)], mask, "evict_first")
    hidden, gate = hidden.astype(jnp.float32), gate.astype(jnp.float32)
    if has_bias:
        hidden += _load(b_ref.at[pl.ds(j * block_n, block_n)], cm).astype(jnp.float32)[None]
        gate += _load(b_ref.at[pl.ds(inner + j * block_n, block_n)], cm).astype(jnp.float32)[None]
    out = hidden * activate(gate, "gelu")
    plgpu.store(o_ref.at[rs, pl.ds(j * block_n, block_n)], out.astype(o_ref.dtype), mask=mask)


def _and(a, b, shape):
    masks = [jnp.broadcast_to(m, shape) for m in (a, b) if m is not None]
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else masks[0] & masks[1]


def _load(ref, mask, eviction=None):
    return plgpu.load(ref, mask=mask, other=None if mask is None else 0.0, eviction_policy=eviction)


def _validate(x, w, b):
    if w.ndim != 2 or x.ndim < 1 or w.shape[0] != x.shape[-1] or w.shape[1] % 2:
        raise ValueError(f"geglu wants x [..., D] and w [D, 2F]; got {x.shape=} {w.shape=}")
    if b.shape != (w.shape[1],):
        raise ValueError(f"geglu: bias must be [{w.shape[1]}]; got {b.shape=}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"geglu: {x.dtype=} must be one of float16, bfloat16, float32")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def geglu(x, w, b, *, config: Config | None = None, interpret: bool | None = None):
    """hidden * gelu(gate), [hidden, gate] = split(x @ w + b). x [..., D], w [D, 2F], b [2F].

    Returns [..., F] in x's dtype; w is cast to x's dtype, products accumulate in float32.
    """
    _validate(x, w, b)
    d, inner = x.shape[-1], w.shape[1] // 2
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    cfg = config or heuristic_config(m, d, inner, x.dtype)
    bm, bn = min(cfg.block_m, max(16, next_power_of_2(m))), cfg.block_n
    kernel = functools.partial(
        _geglu_kernel, block_m=bm, block_n=bn, block_k=cfg.block_k, inner=inner
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, inner), x.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(inner, bn)),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=resolve_interpret(interpret),
        name="sdjax_geglu",
    )(x2, w.astype(x.dtype), b)
    return out.reshape(*x.shape[:-1], inner)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "num_warps", "interpret"))
def geglu_elementwise(
    h,
    *,
    bias=None,
    block_m: int = 32,
    block_n: int = 256,
    num_warps: int = 4,
    interpret: bool | None = None,
):
    """hidden * gelu(gate) for h = [hidden, gate] of [..., 2F] (plus bias [2F] if given)."""
    if h.ndim < 1 or h.shape[-1] % 2:
        raise ValueError(f"geglu_elementwise wants h [..., 2F]; got {h.shape=}")
    if bias is not None and bias.shape != (h.shape[-1],):
        raise ValueError(f"geglu_elementwise: bias must be [{h.shape[-1]}]; got {bias.shape=}")
    inner = h.shape[-1] // 2
    h2 = h.reshape(-1, h.shape[-1])
    m = h2.shape[0]
    bm, bn = min(block_m, next_power_of_2(m)), min(block_n, next_power_of_2(inner))
    kernel = functools.partial(
        _elementwise_kernel, block_m=bm, block_n=bn, inner=inner, has_bias=bias is not None
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, inner), h.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(inner, bn)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="sdjax_geglu_elementwise",
    )(h2, *(() if bias is None else (bias,)))
    return out.reshape(*h.shape[:-1], inner)


def geglu_reference(x, w, b):
    """Plain jnp in float32: hidden * gelu_erf(gate). x [..., D], w [D, 2F], b [2F]."""
    h = jnp.einsum(
        "...d,df->...f",
        x.astype(jnp.float32),
        w.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    ) + b.astype(jnp.float32)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return (hidden * jax.nn.gelu(gate, approximate=False)).astype(x.dtype)
