"""Attention to a short key set (SD's cross-attention to the prompt) as a Pallas (Triton) GPU
kernel: one program takes a block of query rows of one batch element for every head.

Layout as `flash_attention`: q [B, Lq, H, D], k = v [B, Lk, H, D] -> [B, Lq, H, D], with
Lk <= MAX_KEYS (77 prompt tokens in SD). Why a second kernel: `flash_attention` gives each
(query block, batch, head) its own program, which at SD1.5's 64x64 cross-attention
(2 x 4096 x 8 x 40 against 77 keys) is 1024 programs of two to three dependent key steps each,
every one a short chain of loads, products and a softmax: the launch is latency-bound (16
launches, 0.116 ms a step against ~0.03 ms of bytes, `experiments/results/README.md`). Here:

- the key set of a head is one block of next_power_of_2(Lk) rows (masked past Lk): one
  product, one exact softmax (no running max or rescaling) and one product per head;
- a program loops over the heads of its query rows; the loop's loads (q, k and v of a head)
  are independent of the previous head's results, so Triton's pipeliner issues them
  `num_stages - 1` heads ahead;
- q, k, v and the output are read and written as [B, L, H * D] rows (a free reshape): a
  program's heads cover its rows whole, so the sectors a head's D-column slice shares with
  its neighbour are read once, by one program, close together in time.

The head dimension is covered by power-of-two column chunks, as in `flash_attention`
(`head_chunks`: 40 -> 32 + 16, 80 -> 64 + 16, 160 -> 128 + 32), each masked past D.

Where it stands (H100, device kernel time, fourteenth session in
`experiments/results/README.md`): at 2x4096x8x40 it ties flash and cuDNN (13.7-13.9 us, all
three waiting on global-load latency per Nsight Compute); with 256 or fewer query rows it has
too few programs (32-128 on 132 SMs, each walking its heads in turn) and is 1.6-3.4x slower.
Flash with the whole key set in one block (its tuned configs since) is faster at every SD
shape, so `auto` does not pick this kernel; it stays an implementation (`cross`) to build on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from custom_calls._common import dot, next_power_of_2, resolve_interpret
from custom_calls.flash_attention import (
    LOG2_E,
    clamp_block,
    head_chunks,
    shape_key,
    tuned_table,
    validate,
)
from custom_calls.flash_attention import flash_attention_reference as cross_attention_reference

# The longest key set one block holds: the scores of a program's head are
# [block_q, next_power_of_2(Lk)] float32 in registers (block_q 64 at 256 keys: 128 a thread
# at 4 warps).
MAX_KEYS = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Block sizes of one launch. A block larger than a short query sequence is clamped to it."""

    block_q: int = 64  # query rows per program (every head of them)
    num_warps: int = 4
    num_stages: int = 2  # the pipeliner's depth over the heads loop (1: no prefetch)
    head_split: bool = True  # chunk D into powers of two (flash_attention's module doc)

    def __post_init__(self):
        if self.block_q < 16 or self.block_q & (self.block_q - 1):
            raise ValueError(f"block_q={self.block_q} must be a power of two >= 16")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")


def supports(q_shape, kv_shape) -> str | None:
    """Why the kernel cannot run these shapes, or None if it can."""
    if kv_shape[1] > MAX_KEYS:
        return f"Lk={kv_shape[1]} keys > MAX_KEYS={MAX_KEYS} (one block holds the key set)"
    return None


def heuristic_config(q_shape, kv_shape, dtype) -> Config:
    """The tuned config for this exact shape if recorded (`tune_attention.py --kernels cross`),
    else a rule of thumb: 64 query rows at 4 warps, 32 where the head is wide."""
    entry = tuned_table("cross").get(shape_key(q_shape, kv_shape[1], dtype))
    if entry:
        return Config(**entry)
    return Config(block_q=32 if q_shape[3] > 64 else 64)


def _load(ref, cols, row_valid, col_valid):
    """ref[:, cols], zero where a row or column mask (None: all valid) says invalid."""
    mask = _mask(row_valid, col_valid)
    if mask is None:
        return plgpu.load(ref.at[:, cols])
    return plgpu.load(ref.at[:, cols], mask=mask, other=0.0)


def _mask(row_valid, col_valid):
    if row_valid is None:
        return None if col_valid is None else col_valid[None, :]
    return row_valid[:, None] if col_valid is None else row_valid[:, None] & col_valid[None, :]


def _cross_kernel(
    q_ref, k_ref, v_ref, o_ref, *, scale_log2, q_len, kv_len, heads, head_dim, chunks, block_q,
):  # fmt: skip
    """q_ref, o_ref: [block_q, HD_block]; k_ref, v_ref: [kv_rows, HD_block]: rows of one batch
    element, all heads (head h at columns h * D). HD_block (a power of two >= H * D plus a
    chunk's overhang) and kv_rows = next_power_of_2(Lk) run past the arrays: every load and
    store there is masked."""
    kv_rows = k_ref.shape[0]
    q_valid = None
    if q_len % block_q:
        q_rows = pl.program_id(0) * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        q_valid = q_rows < q_len
    kv_valid = None
    if kv_len < kv_rows:
        kv_valid = lax.broadcasted_iota(jnp.int32, (kv_rows,), 0) < kv_len
    # Columns of a chunk past the head's D belong to the next head (or to no array): masked.
    col_valid = [
        (off + lax.broadcasted_iota(jnp.int32, (w,), 0)) < head_dim if off + w > head_dim else None
        for off, w in chunks
    ]

    def head(h, carry):
        base = h * head_dim
        s = None
        for (off, w), cv in zip(chunks, col_valid, strict=True):
            cols = pl.ds(base + off, w)
            part = dot(_load(q_ref, cols, q_valid, cv), _load(k_ref, cols, kv_valid, cv),
                       trans_b=True)  # fmt: skip
            s = part if s is None else s + part
        if kv_valid is not None:
            s = jnp.where(kv_valid[None, :], s, -jnp.inf)
        m = jnp.max(s, axis=1)
        p = jnp.exp2((s - m[:, None]) * scale_log2)
        inv_l = (1.0 / jnp.sum(p, axis=1))[:, None]
        p = p.astype(v_ref.dtype)
        for (off, w), cv in zip(chunks, col_valid, strict=True):
            cols = pl.ds(base + off, w)
            out = (dot(p, _load(v_ref, cols, kv_valid, cv)) * inv_l).astype(o_ref.dtype)
            plgpu.store(o_ref.at[:, cols], out, mask=_mask(q_valid, cv))
        return carry

    lax.fori_loop(0, heads, head, 0)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def cross_attention(q, k, v, *, scale=None, config: Config | None = None, interpret=None):
    """Exact softmax attention to a short key set. q: [B, Lq, H, D]; k, v: [B, Lk, H, D] with
    Lk <= MAX_KEYS -> [B, Lq, H, D].

    scale defaults to 1/sqrt(D). fp16/bf16/fp32 inputs; accumulation in fp32. D <= 256.
    """
    validate("cross_attention", q, k, v)
    if why := supports(q.shape, k.shape):
        raise ValueError(f"cross_attention: {why}; use flash_attention")
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    config = config or heuristic_config(q.shape, k.shape, q.dtype)
    block_q = clamp_block(config.block_q, q_len)
    chunks = head_chunks(head_dim, config.head_split)
    overhang = chunks[-1][0] + chunks[-1][1] - head_dim  # the last chunk's columns past D
    hd_block = next_power_of_2(heads * head_dim + overhang)
    kv_rows = max(16, next_power_of_2(kv_len))  # Triton's dot wants >= 16 rows

    kernel = functools.partial(
        _cross_kernel,
        scale_log2=scale * LOG2_E,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        head_dim=head_dim,
        chunks=chunks,
        block_q=block_q,
    )
    rows = lambda t: t.reshape(t.shape[0], t.shape[1], heads * head_dim)  # a bitcast
    q_spec = pl.BlockSpec((None, block_q, hd_block), lambda i, b: (b, i, 0))
    kv_spec = pl.BlockSpec((None, kv_rows, hd_block), lambda i, b: (b, 0, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, q_len, heads * head_dim), q.dtype),
        grid=(pl.cdiv(q_len, block_q), batch),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=resolve_interpret(interpret),
        name="sdjax_cross_attention",
    )(rows(q), rows(k), rows(v))
    return out.reshape(q.shape)


__all__ = ["Config", "cross_attention", "cross_attention_reference", "heuristic_config"]
