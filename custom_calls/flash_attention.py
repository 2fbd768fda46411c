"""FlashAttention forward as a Pallas (Triton) GPU kernel.

Layout as `jax.nn.dot_product_attention`: q [B, Lq, H, D], k = v [B, Lk, H, D] -> [B, Lq, H, D].
One program computes one block of query rows of one (batch, head): it streams K/V in
blocks of `block_k` rows and keeps an online softmax (running max m, running sum l, fp32
accumulator), in base 2 with the softmax scale folded into one multiply-add per logit.

Triton wants power-of-two block shapes. Nothing is padded in memory:
- sequence lengths (77, 100, 257, ...) are handled by masked loads and stores; the kv loop runs
  over the full blocks without any mask and the one ragged tail block with a mask;
- the head dimension is covered by power-of-two column chunks loaded with column masks. With
  `head_split` the chunks tile D rounded up to 16 (40 -> 32+16, 80 -> 64+16, 160 -> 128+32),
  so the matmuls do 48/80/160 columns of work instead of next_power_of_2(D) = 64/128/256.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from custom_calls._common import dot, next_power_of_2, resolve_interpret

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
TUNING_PATH = pathlib.Path(__file__).parent / "tuning" / "attention.json"
LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Block sizes of one launch. Blocks larger than a (short) sequence are clamped to it."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    head_split: bool = True  # chunk D into powers of two (see module doc) instead of padding
    # fp16 inputs only: exp2 of (logit - max) rounded to fp16, two per instruction
    # (ex2.approx.f16x2), halving the special-function work; the row sums stay fp32.
    fast_exp: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a power of two >= 16")


# --------------------------------------------------------------------------------------------
# Helpers shared with fused_softmax.py
# --------------------------------------------------------------------------------------------


def head_chunks(head_dim: int, split: bool) -> tuple[tuple[int, int], ...]:
    """(offset, width) column chunks, each a power of two >= 16, covering head_dim."""
    if not split:
        return ((0, max(16, next_power_of_2(head_dim))),)
    total = -(-head_dim // 16) * 16
    chunks, offset = [], 0
    for bit in reversed(range(total.bit_length())):
        width = 1 << bit
        if total & width:
            chunks.append((offset, width))
            offset += width
    return tuple(chunks)


def clamp_block(block: int, length: int) -> int:
    return min(block, max(16, next_power_of_2(length)))


def validate(fn_name: str, q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{fn_name} wants q [B, Lq, H, D] and k, v [B, Lk, H, D]; "
            f"got {q.shape=} {k.shape=} {v.shape=}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"{fn_name}: k and v must be [B, Lk, H, D] with q's B, H and D; "
            f"got {q.shape=} {k.shape=} {v.shape=}"
        )
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"{fn_name}: empty input, {q.shape=} {k.shape=}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{fn_name}: head_dim={q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn_name}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{fn_name}: dtype {q.dtype} not in float16, bfloat16, float32")


def shape_key(q_shape, kv_len: int, dtype) -> str:
    """Tuning-table key 'LqxHxD:Lk:<bits>'. The batch is left out (a block shape tuned at one
    batch serves every batch: it only changes the grid), and fp16 and bf16 share configs."""
    return f"{'x'.join(map(str, q_shape[1:]))}:{kv_len}:{8 * jnp.dtype(dtype).itemsize}bit"


@functools.cache
def tuned_table(kernel: str) -> dict:
    """The per-shape configs `experiments/tune_attention.py` recorded for `kernel`."""
    if not TUNING_PATH.exists():
        return {}
    return json.loads(TUNING_PATH.read_text()).get(kernel, {})


def load_tile(ref, rows, cols, *, row_valid=None, head_dim=None):
    """A masked load of ref[rows, cols]; masks only what is statically needed."""
    mask = None
    if row_valid is not None:
        mask = row_valid[:, None]
    if head_dim is not None and cols.start + cols.size > head_dim:
        col_valid = (cols.start + lax.broadcasted_iota(jnp.int32, (cols.size,), 0)) < head_dim
        mask = col_valid[None, :] if mask is None else mask & col_valid[None, :]
    if mask is None:
        return plgpu.load(ref.at[rows, cols])
    return plgpu.load(ref.at[rows, cols], mask=mask, other=0.0)


def store_tile(ref, value, rows, cols, *, row_valid=None, head_dim=None):
    mask = None
    if row_valid is not None:
        mask = row_valid[:, None]
    if head_dim is not None and cols.start + cols.size > head_dim:
        col_valid = (cols.start + lax.broadcasted_iota(jnp.int32, (cols.size,), 0)) < head_dim
        mask = col_valid[None, :] if mask is None else mask & col_valid[None, :]
    plgpu.store(ref.at[rows, cols], value, mask=mask)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


def _exp2_f16(x, interpret: bool):
    """2**x for an fp16 array, two elements per ex2.approx.f16x2 on the GPU."""
    if interpret:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.f16x2 $0, $1;",
        args=[x],
        constraints="=r,r",
        pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float16)],
    )
    return y


def _flash_kernel(
    q_ref, k_ref, v_ref, o_ref, *, scale_log2, q_len, kv_len, head_dim, chunks, block_q, block_k,
    fast_exp, interpret,
):  # fmt: skip
    """q_ref, o_ref: [block_q, D_block]; k_ref, v_ref: [kv_rows, D_block] of one (batch, head).

    D_block = next_power_of_2(D) and kv_rows = kv_len rounded up to block_k may run past the
    arrays: every load and store there is masked.
    """
    all_rows = slice(None)
    q_valid = None
    if q_len % block_q:
        q_rows = pl.program_id(0) * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
        q_valid = q_rows < q_len
    qs = [
        load_tile(q_ref, all_rows, pl.ds(off, w), row_valid=q_valid, head_dim=head_dim)
        for off, w in chunks
    ]

    def step(start, carry, kv_valid=None):
        m_i, l_i, accs = carry
        rows = pl.ds(start, block_k)
        s = None
        for q, (off, w) in zip(qs, chunks, strict=True):
            kc = load_tile(k_ref, rows, pl.ds(off, w), row_valid=kv_valid, head_dim=head_dim)
            part = dot(q, kc, trans_b=True)
            s = part if s is None else s + part
        if kv_valid is not None:
            s = jnp.where(kv_valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1) * scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        if fast_exp:
            p = _exp2_f16((s * scale_log2 - m_new[:, None]).astype(jnp.float16), interpret)
            l_new = l_i * alpha + jnp.sum(p.astype(jnp.float32), axis=1)
        else:
            p = jnp.exp2(s * scale_log2 - m_new[:, None])
            l_new = l_i * alpha + jnp.sum(p, axis=1)
            p = p.astype(v_ref.dtype)
        new_accs = []
        for acc, (off, w) in zip(accs, chunks, strict=True):
            vc = load_tile(v_ref, rows, pl.ds(off, w), row_valid=kv_valid, head_dim=head_dim)
            new_accs.append(acc * alpha[:, None] + dot(p, vc))
        return m_new, l_new, tuple(new_accs)

    carry = (
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
        tuple(jnp.zeros((block_q, w), jnp.float32) for _, w in chunks),
    )
    n_full = kv_len // block_k
    if n_full:
        carry = lax.fori_loop(
            0, n_full, lambda j, c: step(pl.multiple_of(j * block_k, block_k), c), carry
        )
    if kv_len % block_k:
        start = n_full * block_k
        kv_valid = (start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)) < kv_len
        carry = step(start, carry, kv_valid)
    _, l_i, accs = carry
    inv_l = (1.0 / l_i)[:, None]
    for acc, (off, w) in zip(accs, chunks, strict=True):
        out = (acc * inv_l).astype(o_ref.dtype)
        store_tile(o_ref, out, all_rows, pl.ds(off, w), row_valid=q_valid, head_dim=head_dim)


# --------------------------------------------------------------------------------------------
# Config and public function
# --------------------------------------------------------------------------------------------


def heuristic_config(q_shape, kv_shape, dtype) -> Config:
    """The tuned config for this exact shape if recorded, else a rule of thumb."""
    entry = tuned_table("flash").get(shape_key(q_shape, kv_shape[1], dtype))
    if entry:
        return Config(**entry)
    q_len, head_dim = q_shape[1], q_shape[3]
    wide = head_dim > 64 or jnp.dtype(dtype).itemsize == 4
    if head_dim > 128:
        return Config(block_q=64, block_k=32, num_warps=4, num_stages=2)
    if wide:
        return Config(block_q=128 if q_len >= 1024 else 64, block_k=32, num_warps=8, num_stages=2)
    return Config(block_q=128, block_k=64, num_warps=8 if q_len >= 1024 else 4, num_stages=3)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def flash_attention(q, k, v, *, scale=None, config: Config | None = None, interpret=None):
    """Exact softmax attention. q: [B, Lq, H, D]; k, v: [B, Lk, H, D] -> [B, Lq, H, D].

    scale defaults to 1/sqrt(D). fp16/bf16/fp32 inputs; accumulation in fp32. D <= 256.
    """
    validate("flash_attention", q, k, v)
    return _launch(q, k, v, q.shape, k.shape[1], (0, 0, 0), scale, config, interpret)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def flash_attention_qkv(qkv, *, scale=None, config: Config | None = None, interpret=None):
    """Self-attention of a fused projection: qkv [B, L, 3, H, D] (q, k, v on axis 2) ->
    [B, L, H, D]. The same kernel as `flash_attention`, reading q, k and v straight from qkv
    (viewed, for free, as [B, L, 3H, D]: head h of q, k, v at h, H + h, 2H + h) instead of from
    three slices that XLA would copy out of it."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attention_qkv wants qkv [B, L, 3, H, D]; got {qkv.shape}")
    batch, length, _, heads, head_dim = qkv.shape
    q_shape = (batch, length, heads, head_dim)
    validate("flash_attention_qkv", *(jax.ShapeDtypeStruct(q_shape, qkv.dtype),) * 3)
    packed = qkv.reshape(batch, length, 3 * heads, head_dim)  # a bitcast: no data moves
    offsets = (0, heads, 2 * heads)
    return _launch(packed, packed, packed, q_shape, length, offsets, scale, config, interpret)


def _launch(q, k, v, q_shape, kv_len, head_offsets, scale, config, interpret):
    """The kernel on q [B, Lq, *, D], k, v [B, Lk, *, D] (head h of each at h + its offset in
    `head_offsets`) -> [B, Lq, H, D] with q_shape = (B, Lq, H, D)."""
    batch, q_len, heads, head_dim = q_shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    kv_shape = (batch, kv_len, heads, head_dim)
    config = config or heuristic_config(q_shape, kv_shape, q.dtype)
    block_q = clamp_block(config.block_q, q_len)
    block_k = clamp_block(config.block_k, kv_len)
    chunks = head_chunks(head_dim, config.head_split)
    d_block = max(16, next_power_of_2(head_dim))

    kernel = functools.partial(
        _flash_kernel,
        scale_log2=scale * LOG2_E,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        chunks=chunks,
        block_q=block_q,
        block_k=block_k,
        fast_exp=config.fast_exp and q.dtype == jnp.float16,
        interpret=resolve_interpret(interpret),
    )
    q_off, k_off, v_off = head_offsets
    # Blocks of d_block columns run past D (packed: their addresses run into the next head's
    # row): every column at or past head_dim is masked in the kernel, never read or written.
    o_spec = pl.BlockSpec((None, block_q, None, d_block), lambda i, b, h: (b, i, h, 0))
    q_spec = pl.BlockSpec((None, block_q, None, d_block), lambda i, b, h: (b, i, h + q_off, 0))
    kv_rows = pl.cdiv(kv_len, block_k) * block_k  # the ragged tail is masked, never copied

    def kv_spec(offset):
        return pl.BlockSpec((None, kv_rows, None, d_block), lambda i, b, h: (b, 0, h + offset, 0))

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_shape, q.dtype),
        grid=(pl.cdiv(q_len, block_q), batch, heads),
        in_specs=[q_spec, kv_spec(k_off), kv_spec(v_off)],
        out_specs=o_spec,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=resolve_interpret(interpret),
        name="sdjax_flash_attention",
    )(q, k, v)


def flash_attention_reference(q, k, v, *, scale=None):
    """Plain jnp attention in float32 (math and output): the ground truth for the kernels."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (t.astype(jnp.float32) for t in (q, k, v))
    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=hi) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, vf, precision=hi)
