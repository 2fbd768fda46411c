"""Partially fused softmax attention: the paper's alternative to FlashAttention, in Pallas.

Three launches; the probability matrix P is never written:
  1. logits:  S = Q K^T * scale * log2(e), one [block_q, block_k] tile per program, written once
              to a [B*H, Lq_pad, Lk_pad] buffer (padded to whole tiles; the padding columns
              hold -inf, so later kernels need no column masks);
  2. stats:   one pass over each row of S writes only [max, sum 2^(S - max)] per row, a
              [B*H, Lq_pad, 2] tensor;
  3. output:  O = softmax(S) V, where each S tile is turned into 2^(S - max) / sum as it is
              loaded and multiplied by V straight away.

S is kept in float32 by default (`Config.logits_dtype`). Its rounding error is amplified by
exp: an fp16 logit of magnitude 30 carries an absolute error of ~0.008, i.e. 0.8% in its
probability, and bf16 eight times that. float32 costs twice the bytes of S (at SD1.5's
2x4096x8 self-attention S is 1.07 GB in fp32: ~3 x 0.36 ms of HBM traffic at 3 TB/s, which is
why FlashAttention, with no S at all, wins at long sequences). "input" stores S in the input
dtype instead, for speed at modest logit scales.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from custom_calls._common import next_power_of_2, resolve_interpret
from custom_calls.flash_attention import (
    LOG2_E,
    clamp_block,
    dot,
    flash_attention_reference,
    head_chunks,
    load_tile,
    shape_key,
    store_tile,
    tuned_table,
    validate,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One tile shape for all three kernels (S is padded to whole tiles of it)."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    head_split: bool = True
    logits_dtype: str = "float32"  # or "input": S in q's dtype (half the bytes, see module doc)

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16")
        if self.logits_dtype not in ("float32", "input"):
            raise ValueError(f"logits_dtype={self.logits_dtype!r} must be 'float32' or 'input'")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _logits_kernel(q_ref, k_ref, s_ref, *, scale_log2, q_len, kv_len, head_dim, chunks):
    """q_ref: [block_q, D_block]; k_ref: [block_k, D_block]; s_ref: [block_q, block_k]."""
    block_q, block_k = s_ref.shape
    q_valid = k_valid = None
    if q_len % block_q:
        q_valid = pl.program_id(1) * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        q_valid = q_valid < q_len
    if kv_len % block_k:
        k_valid = pl.program_id(0) * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        k_valid = k_valid < kv_len
    rows = slice(None)
    s = None
    for off, w in chunks:
        q = load_tile(q_ref, rows, pl.ds(off, w), row_valid=q_valid, head_dim=head_dim)
        k = load_tile(k_ref, rows, pl.ds(off, w), row_valid=k_valid, head_dim=head_dim)
        part = dot(q, k, trans_b=True)
        s = part if s is None else s + part
    s = s * scale_log2
    if k_valid is not None:
        s = jnp.where(k_valid[None, :], s, -jnp.inf)
    plgpu.store(s_ref, s.astype(s_ref.dtype))


def _row_stats_kernel(s_ref, stats_ref, *, block_k):
    """s_ref: [block_q, Lk_pad] rows of S; stats_ref: [block_q, 2] <- [max, sum 2^(S - max)]."""
    block_q, lk_pad = s_ref.shape

    def body(j, carry):
        m_i, l_i = carry
        t = plgpu.load(s_ref.at[:, pl.ds(pl.multiple_of(j * block_k, block_k), block_k)])
        t = t.astype(jnp.float32)
        m_new = jnp.maximum(m_i, jnp.max(t, axis=1))
        l_new = l_i * jnp.exp2(m_i - m_new) + jnp.sum(jnp.exp2(t - m_new[:, None]), axis=1)
        return m_new, l_new

    init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    m_i, l_i = lax.fori_loop(0, lk_pad // block_k, body, init)
    plgpu.store(stats_ref.at[:, pl.ds(0, 1)], m_i[:, None])
    plgpu.store(stats_ref.at[:, pl.ds(1, 1)], l_i[:, None])


def _softmax_matmul_kernel(
    s_ref, stats_ref, v_ref, o_ref, *, q_len, kv_len, head_dim, chunks, block_k
):
    """s_ref: [block_q, Lk_pad]; stats_ref: [block_q, 2]; v_ref: [Lk_pad, D_block];
    o_ref: [block_q, D_block]."""
    block_q = s_ref.shape[0]
    row_max = plgpu.load(stats_ref.at[:, pl.ds(0, 1)])
    inv_sum = 1.0 / plgpu.load(stats_ref.at[:, pl.ds(1, 1)])

    def step(start, accs, kv_valid=None):
        t = plgpu.load(s_ref.at[:, pl.ds(start, block_k)]).astype(jnp.float32)
        p = (jnp.exp2(t - row_max) * inv_sum).astype(v_ref.dtype)
        rows = pl.ds(start, block_k)
        new = []
        for acc, (off, w) in zip(accs, chunks, strict=True):
            vc = load_tile(v_ref, rows, pl.ds(off, w), row_valid=kv_valid, head_dim=head_dim)
            new.append(acc + dot(p, vc))
        return tuple(new)

    accs = tuple(jnp.zeros((block_q, w), jnp.float32) for _, w in chunks)
    n_full = kv_len // block_k
    if n_full:
        accs = lax.fori_loop(
            0, n_full, lambda j, a: step(pl.multiple_of(j * block_k, block_k), a), accs
        )
    if kv_len % block_k:
        start = n_full * block_k
        kv_valid = (start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)) < kv_len
        accs = step(start, accs, kv_valid)
    q_valid = None
    if q_len % block_q:
        q_valid = pl.program_id(0) * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        q_valid = q_valid < q_len
    for acc, (off, w) in zip(accs, chunks, strict=True):
        store_tile(
            o_ref, acc.astype(o_ref.dtype), slice(None), pl.ds(off, w),
            row_valid=q_valid, head_dim=head_dim,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Config and public function
# --------------------------------------------------------------------------------------------


def heuristic_config(q_shape, kv_shape, dtype) -> Config:
    """The tuned config for this exact shape if recorded, else a rule of thumb."""
    entry = tuned_table("fused_softmax").get(shape_key(q_shape, kv_shape[1], dtype))
    if entry:
        return Config(**entry)
    if q_shape[3] > 128:
        return Config(block_q=64, block_k=32, num_warps=4, num_stages=2)
    return Config(block_q=64, block_k=64, num_warps=4, num_stages=2)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def fused_softmax_attention(q, k, v, *, scale=None, config: Config | None = None, interpret=None):
    """Softmax attention through written logits and row statistics (see module doc).

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] -> [B, Lq, H, D]. D <= 256; fp16/bf16/fp32.
    """
    validate("fused_softmax_attention", q, k, v)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    config = config or heuristic_config(q.shape, k.shape, q.dtype)
    block_q = clamp_block(config.block_q, q_len)
    block_k = clamp_block(config.block_k, kv_len)
    chunks = head_chunks(head_dim, config.head_split)
    d_block = max(16, next_power_of_2(head_dim))
    nq, nk = pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_k)
    bh = batch * heads
    s_dtype = jnp.float32 if config.logits_dtype == "float32" else q.dtype
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    interpret = resolve_interpret(interpret)

    def bhd(i_of):  # index map over [B, L, H, D] from a grid whose last axis is b * H + h
        return lambda *g: (g[-1] // heads, i_of(g), g[-1] % heads, 0)

    # 1. S = Q K^T * scale * log2(e)
    logits = pl.pallas_call(
        functools.partial(
            _logits_kernel,
            scale_log2=scale * LOG2_E,
            q_len=q_len,
            kv_len=kv_len,
            head_dim=head_dim,
            chunks=chunks,
        ),
        out_shape=jax.ShapeDtypeStruct((bh, nq * block_q, nk * block_k), s_dtype),
        grid=(nk, nq, bh),
        in_specs=[
            pl.BlockSpec((None, block_q, None, d_block), bhd(lambda g: g[1])),
            pl.BlockSpec((None, block_k, None, d_block), bhd(lambda g: g[0])),
        ],
        out_specs=pl.BlockSpec((None, block_q, block_k), lambda j, i, b: (b, i, j)),
        compiler_params=params,
        interpret=interpret,
        name="sdjax_fused_softmax_logits",
    )(q, k)

    # 2. per-row [max, sum of 2^(S - max)]
    row_spec = pl.BlockSpec((None, block_q, nk * block_k), lambda i, b: (b, i, 0))
    stats_spec = pl.BlockSpec((None, block_q, 2), lambda i, b: (b, i, 0))
    stats = pl.pallas_call(
        functools.partial(_row_stats_kernel, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((bh, nq * block_q, 2), jnp.float32),
        grid=(nq, bh),
        in_specs=[row_spec],
        out_specs=stats_spec,
        compiler_params=params,
        interpret=interpret,
        name="sdjax_fused_softmax_stats",
    )(logits)

    # 3. O = (2^(S - max) / sum) V, normalized tile by tile as S is loaded
    return pl.pallas_call(
        functools.partial(
            _softmax_matmul_kernel,
            q_len=q_len,
            kv_len=kv_len,
            head_dim=head_dim,
            chunks=chunks,
            block_k=block_k,
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(nq, bh),
        in_specs=[
            row_spec,
            stats_spec,
            pl.BlockSpec((None, nk * block_k, None, d_block), bhd(lambda g: 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, d_block), bhd(lambda g: g[0])),
        compiler_params=params,
        interpret=interpret,
        name="sdjax_fused_softmax_output",
    )(logits, stats, v)


def fused_softmax_attention_reference(q, k, v, *, scale=None):
    """Plain jnp attention in float32 (the same ground truth as flash_attention's)."""
    return flash_attention_reference(q, k, v, scale=scale)
