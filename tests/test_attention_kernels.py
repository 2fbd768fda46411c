"""FlashAttention and partially fused softmax kernels against the float32 reference.

On the CPU the kernels run in Pallas interpret mode. The cases form a covering set, not the
Cartesian product: every head dim (8, 40, 64, 80, 160), q and kv length (1, 77, 100, 128,
257), batch (1, 3) and dtype appears, together with the hard combinations (ragged q and kv
tails at once, a single query, a single key, head dims that need column masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from custom_calls.flash_attention import (
    MAX_HEAD_DIM,
    flash_attention,
    flash_attention_qkv,
    flash_attention_reference,
    head_chunks,
)
from custom_calls.flash_attention import Config as FlashConfig
from custom_calls.fused_softmax import Config as FusedConfig
from custom_calls.fused_softmax import fused_softmax_attention
from sdjax.shapes import ATTENTION_SHAPES

# Relative-norm tolerances: fp32 math in fp32 (interpret mode and the GPU's IEEE fp32 dots:
# the kernels never use tf32); bf16/fp16 round the probabilities and the output.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 5e-3}

# (batch, q_len, heads, head_dim, kv_len, dtype)
CASES = [
    (1, 77, 2, 40, 77, jnp.float16),
    (3, 100, 2, 80, 257, jnp.bfloat16),
    (1, 257, 1, 160, 100, jnp.float32),
    (3, 1, 2, 64, 128, jnp.float16),
    (1, 128, 2, 8, 1, jnp.bfloat16),
    (1, 128, 1, 64, 128, jnp.float32),
    (3, 257, 1, 40, 77, jnp.bfloat16),
    (1, 100, 2, 160, 1, jnp.float16),
    (1, 1, 1, 80, 100, jnp.float32),
    (3, 77, 1, 8, 257, jnp.float32),
]

KERNELS = {
    "flash": (flash_attention, FlashConfig),
    "fused_softmax": (fused_softmax_attention, FusedConfig),
}


def _case_id(case):
    b, lq, h, d, lk, dt = case
    return f"{b}x{lq}x{h}x{d}:{lk}:{jnp.dtype(dt).name}"


def _inputs(rng, b, lq, h, d, lk, dtype, magnitude=1.0):
    def draw(shape):
        return jnp.asarray(magnitude * rng.standard_normal(shape, dtype=np.float32), dtype)

    return draw((b, lq, h, d)), draw((b, lk, h, d)), draw((b, lk, h, d))


def _relative_error(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "output has NaN or inf"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _check(kernel, q, k, v, *, scale=None, config=None, tol=None):
    fn, _ = KERNELS[kernel]
    out = fn(q, k, v, scale=scale, config=config)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = flash_attention_reference(q, k, v, scale=scale)
    err = _relative_error(out, ref)
    tol = TOLERANCE[q.dtype.type] if tol is None else tol
    assert err <= tol, f"{kernel}: relative error {err:.3g} > {tol:g}"
    return err


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(kernel, case, rng):
    _check(kernel, *_inputs(rng, *case))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize(
    "case", [(3, 100, 1, 40, 257, jnp.float16), (1, 257, 2, 80, 77, jnp.float32)], ids=_case_id
)
def test_small_blocks_unsplit_head(kernel, case, rng):
    """16x16 blocks: many kv blocks plus a ragged tail, q tails, a padded (unsplit) head dim."""
    _, config_cls = KERNELS[kernel]
    config = config_cls(block_q=16, block_k=16, num_warps=4, num_stages=2, head_split=False)
    _check(kernel, *_inputs(rng, *case), config=config)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_large_logits_are_stable(kernel, dtype, rng):
    """Logits with a spread of hundreds: exp would overflow without the running max."""
    q, k, v = _inputs(rng, 1, 77, 2, 64, 100, dtype, magnitude=4.0)
    _check(kernel, q, k, v, scale=1.0)


def test_fast_exp_option(rng):
    """fp16 exp2 (interpret mode rounds like the GPU's ex2.approx.f16x2 path, up to 2 ulp)."""
    config = FlashConfig(block_q=64, block_k=32, fast_exp=True)
    _check("flash", *_inputs(rng, 3, 77, 2, 40, 100, jnp.float16), config=config)
    q, k, v = _inputs(rng, 1, 77, 2, 64, 100, jnp.float16, magnitude=4.0)
    _check("flash", q, k, v, scale=1.0, config=config)


def test_fp16_logits_option(rng):
    config = FusedConfig(block_q=64, block_k=64, logits_dtype="input")
    _check("fused_softmax", *_inputs(rng, 1, 100, 2, 40, 77, jnp.float16), config=config)


def test_head_chunks():
    assert head_chunks(40, True) == ((0, 32), (32, 16))
    assert head_chunks(80, True) == ((0, 64), (64, 16))
    assert head_chunks(160, True) == ((0, 128), (128, 32))
    assert head_chunks(8, True) == ((0, 16),)
    assert head_chunks(64, True) == ((0, 64),)
    assert head_chunks(40, False) == ((0, 64),)
    for d in range(1, 257):
        chunks = head_chunks(d, True)
        assert chunks[0][0] == 0 and sum(w for _, w in chunks) >= d
        assert all(w >= 16 and w & (w - 1) == 0 for _, w in chunks)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_rejects_bad_inputs(kernel):
    fn, config_cls = KERNELS[kernel]
    q = jnp.zeros((1, 8, 1, 16), jnp.float16)
    with pytest.raises(ValueError, match="head_dim"):
        fn(*(jnp.zeros((1, 8, 1, 264), jnp.float16),) * 3)
    with pytest.raises(ValueError, match="k and v"):
        fn(q, q, jnp.zeros((1, 8, 1, 32), jnp.float16))
    with pytest.raises(ValueError, match="dtype"):
        fn(q, q, q.astype(jnp.float32))
    with pytest.raises(ValueError, match="dtype"):
        fn(*(q.astype(jnp.int32),) * 3)
    with pytest.raises(ValueError, match="wants"):
        fn(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="power of two"):
        config_cls(block_q=48)


# The packed form: q, k, v read from one fused projection [B, L, 3, H, D] (self-attention).
PACKED_CASES = [
    (3, 77, 2, 40, jnp.float16),
    (1, 100, 2, 80, jnp.bfloat16),
    (1, 257, 2, 160, jnp.float32),
    (3, 128, 3, 64, jnp.float16),
]


def _check_packed(qkv, *, config=None, tol=None):
    out = flash_attention_qkv(qkv, config=config)
    q, k, v = (qkv[:, :, i] for i in range(3))
    assert out.shape == q.shape and out.dtype == qkv.dtype
    err = _relative_error(out, flash_attention_reference(q, k, v))
    tol = TOLERANCE[qkv.dtype.type] if tol is None else tol
    assert err <= tol, f"packed: relative error {err:.3g} > {tol:g}"
    # the same kernel on the three slices: the same numbers
    np.testing.assert_array_equal(np.asarray(out), np.asarray(flash_attention(q, k, v, config=config)))


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}")
def test_packed_qkv_matches_reference(case, rng):
    """flash_attention_qkv reads head h of q, k and v at h, H + h and 2H + h of the packed
    view; ragged lengths and head dims that need column masks included (a masked column of
    one head is the next head's data in memory: it must never leak in)."""
    b, length, h, d, dtype = case
    qkv = jnp.asarray(rng.standard_normal((b, length, 3, h, d), dtype=np.float32), dtype)
    _check_packed(qkv, config=FlashConfig(block_q=32, block_k=32))


def test_packed_qkv_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"qkv \[B, L, 3, H, D\]"):
        flash_attention_qkv(jnp.ones((1, 8, 2, 2, 16), jnp.float32))
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention_qkv(jnp.ones((1, 8, 3, 1, MAX_HEAD_DIM + 8), jnp.float32))


# --------------------------------------------------------------------------------------------
# GPU: real SD shapes, and proof that the compiled program calls our kernels
# --------------------------------------------------------------------------------------------

GPU_SHAPES = [s for s in ATTENTION_SHAPES.values() if s.head_dim <= MAX_HEAD_DIM]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.name)
def test_gpu_sd_shapes(kernel, shape, rng):
    dtype = jnp.float16
    if kernel == "fused_softmax" and shape.q_len * shape.kv_len > 4096 * 4096:
        pytest.skip("S would take > 1 GB; covered by the benchmark's check")
    q, k, v = _inputs(rng, *shape.q_shape[:2], shape.heads, shape.head_dim, shape.kv_len, dtype)
    _check(kernel, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_dtypes(kernel, dtype, rng):
    s = ATTENTION_SHAPES["sd15_self_32"]
    _check(kernel, *_inputs(rng, s.batch, s.q_len, s.heads, s.head_dim, s.kv_len, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_gpu_large_logits(kernel, rng):
    q, k, v = _inputs(rng, 2, 1024, 8, 80, 77, jnp.float16, magnitude=4.0)
    _check(kernel, q, k, v, scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sd15_self_16", "sd15_self_8", "sd15_self_32"])
def test_gpu_packed_qkv_sd_shapes(name, rng):
    """The packed form at SD1.5's unpadded self-attentions (head dims 160 and 80), fp16."""
    s = ATTENTION_SHAPES[name]
    shape = (s.batch, s.q_len, 3, s.heads, s.head_dim)
    _check_packed(jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.float16))


@pytest.mark.gpu
def test_gpu_fast_exp(rng):
    s = ATTENTION_SHAPES["sd15_self_64"]
    config = FlashConfig(block_q=128, block_k=64, num_warps=8, num_stages=3, fast_exp=True)
    q, k, v = _inputs(rng, s.batch, s.q_len, s.heads, s.head_dim, s.kv_len, jnp.float16)
    _check("flash", q, k, v, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kernel,names",
    [
        ("flash", ["sdjax_flash_attention"]),
        ("fused_softmax", ["sdjax_fused_softmax_logits", "sdjax_fused_softmax_output"]),
    ],
)
def test_gpu_hlo_has_kernel(kernel, names):
    fn, _ = KERNELS[kernel]
    q = jnp.zeros((2, 256, 8, 160), jnp.float16)
    hlo = jax.jit(fn).lower(q, q, q).compile().as_text()
    assert "custom-call" in hlo or "custom_call" in hlo
    for name in names:
        assert name in hlo, f"{name} not in the compiled HLO"
