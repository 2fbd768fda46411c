"""The Hopper (Mosaic GPU) FlashAttention kernel against the float32 reference.

On the CPU the kernel runs in Mosaic GPU's interpret mode, which simulates the warpgroups,
the shared memory (fresh memory holds NaN), the TMA copies (an out-of-bounds read raises)
and the barriers, and fails on a barrier phase nobody waited for. Its matrix
products there are plain fp32 dots (interpret mode in jax 0.10 has no wgmma on a transposed
or register operand): the wgmma lowering itself is tested by the `gpu` tests on the device.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from custom_calls.flash_attention import flash_attention_reference
from custom_calls.flash_attention_hopper import (
    HopperConfig,
    flash_attention_hopper,
    flash_attention_hopper_qkv,
    padded_head_dim,
    supports,
)
from sdjax.shapes import ATTENTION_SHAPES

TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 5e-3}

# (batch, q_len, heads, head_dim, kv_len, dtype, config). Covering set: every head dim of SD
# (40, 80, 160 zero-padded to 64, 128, 192; 64 as is), batch 1/2/3, both dtypes, a ring
# refilled (kv steps > stages), 3 stages, both block_q, with and without the ping-pong.
CASES = [
    (1, 128, 2, 40, 256, jnp.float16, HopperConfig(block_kv=64)),
    (3, 128, 1, 64, 128, jnp.bfloat16, HopperConfig(block_kv=64, pingpong=False)),
    (1, 128, 2, 80, 192, jnp.bfloat16, HopperConfig(block_kv=64, stages=3)),
    (1, 128, 3, 160, 128, jnp.float16, HopperConfig(block_kv=64)),
    (2, 256, 2, 40, 128, jnp.float16, HopperConfig(block_q=128, pingpong=False)),
    (1, 128, 2, 40, 128, jnp.bfloat16, HopperConfig(block_kv=64, head_align=16)),  # 40 -> 48
    (1, 128, 2, 80, 128, jnp.float16, HopperConfig(block_kv=64, head_align=16)),  # no padding
    # fp16 exponentials (and fp16 row sums per tile)
    (2, 128, 2, 40, 192, jnp.float16, HopperConfig(block_kv=64, head_align=16, half_exp=True)),
    (1, 256, 1, 64, 128, jnp.float16, HopperConfig(block_kv=64, half_exp=True, half_sum=True)),
    (1, 128, 1, 40, 128, jnp.bfloat16, HopperConfig(block_kv=64, half_exp=True)),  # fp32 exp
    # row max and row sum by halving the columns
    (3, 128, 2, 40, 192, jnp.float16, HopperConfig(block_kv=64, head_align=16, tree_reduce=True)),
    (1, 256, 1, 80, 256, jnp.bfloat16, HopperConfig(block_q=128, tree_reduce=True)),
    (1, 128, 2, 40, 128, jnp.float16, HopperConfig(block_kv=64, half_exp=True, tree_reduce=True)),
    # row sums on the tensor cores
    (3, 128, 2, 40, 256, jnp.float16, HopperConfig(block_kv=64, head_align=16, mma_row_sum=True)),
    (1, 256, 1, 80, 128, jnp.bfloat16, HopperConfig(block_q=128, mma_row_sum=True)),
    (2, 128, 1, 160, 192, jnp.float16, HopperConfig(block_kv=64, stages=3, mma_row_sum=True)),
    (1, 128, 2, 40, 128, jnp.float16, HopperConfig(block_kv=64, half_exp=True, mma_row_sum=True)),
    # step i + 1's scores under step i's softmax (one step, two, a refilled ring; with the
    # tensor-core row sums and fp16 exponentials)
    (1, 128, 2, 40, 64, jnp.float16,
     HopperConfig(block_kv=64, pingpong=False, overlap_qk=True)),
    (3, 128, 2, 40, 320, jnp.float16,
     HopperConfig(block_kv=64, head_align=16, pingpong=False, overlap_qk=True)),
    (1, 256, 1, 80, 256, jnp.bfloat16,
     HopperConfig(block_q=128, block_kv=64, stages=3, pingpong=False, overlap_qk=True)),
    (2, 128, 1, 160, 192, jnp.float16,
     HopperConfig(block_kv=64, pingpong=False, overlap_qk=True, mma_row_sum=True)),
    (1, 128, 2, 40, 256, jnp.float16,
     HopperConfig(block_kv=128, pingpong=False, overlap_qk=True, half_exp=True)),
    # the softmax pinned before the consumers' barriers (with the ping-pong, fp16
    # exponentials and the tensor-core row sums)
    (3, 128, 2, 40, 192, jnp.float16, HopperConfig(block_kv=64, head_align=16, pin_softmax=True)),
    (1, 256, 1, 80, 128, jnp.bfloat16, HopperConfig(block_q=128, pin_softmax=True)),
    (1, 128, 2, 40, 128, jnp.float16,
     HopperConfig(block_kv=64, half_exp=True, mma_row_sum=True, pin_softmax=True)),
    # a quarter of the exponentials by the FMA pipe's polynomial; partial row sums summed at
    # the end (with the ping-pong, without it, three consumers)
    (3, 128, 2, 40, 192, jnp.float16, HopperConfig(block_kv=64, head_align=16, poly_exp=4)),
    (1, 256, 1, 80, 256, jnp.bfloat16, HopperConfig(block_q=128, poly_exp=2, lazy_sum=True)),
    (2, 128, 1, 160, 192, jnp.float16, HopperConfig(block_kv=64, stages=3, lazy_sum=True)),
    (1, 192, 2, 40, 128, jnp.float16,
     HopperConfig(block_kv=64, pingpong=False, consumers=3, poly_exp=4, lazy_sum=True)),
    # the logits pinned before the exponentials (with the lazy sums, with fp16 exponentials)
    (3, 128, 2, 40, 192, jnp.float16, HopperConfig(block_kv=64, head_align=16, lazy_sum=True,
                                                   split_exp=True)),
    (1, 256, 1, 80, 128, jnp.bfloat16, HopperConfig(block_q=128, split_exp=True,
                                                    pin_softmax=True)),
    (1, 128, 2, 40, 128, jnp.float16, HopperConfig(block_kv=64, half_exp=True, split_exp=True)),
    # three consumers; Lq not a multiple of a program's rows (the last program's surplus
    # consumers repeat the last tile: 192 rows of 2 x 64, 128 and 256 of 3 x 64)
    (1, 192, 2, 40, 128, jnp.float16, HopperConfig(block_kv=64, head_align=16)),
    (3, 128, 2, 40, 256, jnp.float16,
     HopperConfig(block_kv=64, head_align=16, pingpong=False, consumers=3)),
    (1, 256, 2, 80, 128, jnp.bfloat16, HopperConfig(pingpong=False, consumers=3, stages=3, head_align=16)),
    (2, 192, 1, 160, 192, jnp.float16, HopperConfig(block_kv=64, pingpong=False, consumers=3)),
    (1, 320, 1, 64, 128, jnp.bfloat16,
     HopperConfig(block_kv=64, pingpong=False, consumers=3, half_exp=True, mma_row_sum=True)),
]


def _case_id(case):
    b, lq, h, d, lk, dt, c = case
    half = ":half_exp" * c.half_exp + ":half_sum" * c.half_sum + ":tree" * c.tree_reduce
    half += ":mma_sum" * c.mma_row_sum + ":overlap" * c.overlap_qk + ":pin" * c.pin_softmax
    half += f":c{c.consumers}" * (c.consumers != 2) + f":poly{c.poly_exp}" * bool(c.poly_exp)
    half += ":lazy_sum" * c.lazy_sum + ":split_exp" * c.split_exp
    return f"{b}x{lq}x{h}x{d}:{lk}:{jnp.dtype(dt).name}:q{c.block_q}kv{c.block_kv}s{c.stages}{half}"


def _inputs(rng, b, lq, h, d, lk, dtype, magnitude=1.0):
    def draw(shape):
        return jnp.asarray(magnitude * rng.standard_normal(shape, dtype=np.float32), dtype)

    return draw((b, lq, h, d)), draw((b, lk, h, d)), draw((b, lk, h, d))


def _relative_error(out, ref) -> float:
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, rng):
    b, lq, h, d, lk, dtype, config = case
    q, k, v = _inputs(rng, b, lq, h, d, lk, dtype)
    out = flash_attention_hopper(q, k, v, config=config)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = np.asarray(flash_attention_reference(q, k, v))
    assert _relative_error(out, ref) <= TOLERANCE[dtype]


def test_heads_do_not_leak_into_each_other(rng):
    """Changing head 1 leaves head 0's output exactly as it was."""
    q, k, v = _inputs(rng, 1, 128, 2, 40, 128, jnp.float16)
    config = HopperConfig(block_kv=64)
    before = np.asarray(flash_attention_hopper(q, k, v, config=config), np.float32)
    bump = jnp.ones_like(q).at[:, :, 0].set(0.0) * 8.0
    after = np.asarray(flash_attention_hopper(q + bump, k + bump, v + bump, config=config))
    np.testing.assert_array_equal(after[:, :, 0], before[:, :, 0])
    assert not np.allclose(after[:, :, 1], before[:, :, 1])


def test_exp2_poly_accuracy():
    """The FMA pipe's exp2 (`poly_exp`) within its stated 7.5e-5 of exp2 over the softmax's
    range (logits less their maximum: <= 0), and 2**-125 below -125, with no NaN."""
    from custom_calls.flash_attention_hopper import exp2_poly

    x = np.concatenate([np.linspace(-125.0, 0.0, 200_001, dtype=np.float32),
                        np.float32([-0.5, 0.5, -1e-7, 3.0, 20.0])])  # fmt: skip
    got = np.asarray(exp2_poly(jnp.asarray(x)), np.float64)
    want = np.exp2(x.astype(np.float64))
    assert np.isfinite(got).all()
    assert np.max(np.abs(got / want - 1.0)) <= 7.6e-5
    low = np.asarray(exp2_poly(jnp.float32([-126.0, -300.0, -np.inf])))
    np.testing.assert_allclose(low, 2.0**-125, rtol=1e-4)


def test_poly_exp_ptx_matches_the_jnp_form():
    """The PTX the GPU runs spells the same constants as `exp2_poly` (run on the device by
    the `gpu` tests; here its literals are read back)."""
    import importlib
    import re
    import struct

    fah = importlib.import_module("custom_calls.flash_attention_hopper")  # the module, not
    # the function of the same name that `custom_calls` exports
    hexes = re.findall(r"0f([0-9A-F]{8})", fah._EXP2_POLY_PTX)
    literals = [struct.unpack(">f", bytes.fromhex(h))[0] for h in hexes]
    want = [fah.EXP2_POLY_MIN, fah.ROUND_MAGIC, fah.ROUND_MAGIC, *fah.EXP2_POLY[::-1][:2],
            fah.EXP2_POLY[1], fah.EXP2_POLY[0]]  # fmt: skip
    np.testing.assert_array_equal(np.float32(literals), np.float32(want))


def test_large_logits_are_stable(rng):
    q, k, v = _inputs(rng, 1, 128, 1, 64, 128, jnp.bfloat16, magnitude=30.0)
    out = flash_attention_hopper(q, k, v, config=HopperConfig(block_kv=64))
    ref = np.asarray(flash_attention_reference(q, k, v))
    assert _relative_error(out, ref) <= TOLERANCE[jnp.bfloat16]


def test_scale_argument(rng):
    q, k, v = _inputs(rng, 1, 128, 1, 64, 64, jnp.float16)
    out = flash_attention_hopper(q, k, v, scale=0.3, config=HopperConfig(block_kv=64))
    ref = np.asarray(flash_attention_reference(q, k, v, scale=0.3))
    assert _relative_error(out, ref) <= TOLERANCE[jnp.float16]


@pytest.mark.parametrize(
    "head_dim,dtype", [(48, jnp.float16), (40, jnp.bfloat16)], ids=["48-fp16", "40-bf16-padded"]
)
def test_packed_qkv_is_the_same_kernel(head_dim, dtype, rng):
    """qkv [B, L, 3, H, D] read in place: bit for bit the kernel on the three slices."""
    config = HopperConfig(block_kv=64, head_align=16)
    qkv = jnp.asarray(rng.standard_normal((2, 128, 3, 2, head_dim), dtype=np.float32), dtype)
    q, k, v = (qkv[:, :, i] for i in range(3))
    out = flash_attention_hopper_qkv(qkv, config=config)
    assert out.shape == q.shape and out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(flash_attention_hopper(q, k, v, config=config),
                                             np.float32))  # fmt: skip
    assert _relative_error(out, np.asarray(flash_attention_reference(q, k, v))) <= TOLERANCE[dtype]
    with pytest.raises(ValueError, match=r"qkv \[B, L, 3, H, D\]"):
        flash_attention_hopper_qkv(q)


def test_padded_head_dim():
    assert [padded_head_dim(d) for d in (40, 64, 80, 160, 256)] == [64, 64, 128, 192, 256]
    assert [padded_head_dim(d, 16) for d in (40, 64, 80, 160)] == [48, 64, 80, 160]


@pytest.mark.parametrize(
    "q_shape, kv_len, dtype, config, why",
    [
        ((1, 128, 1, 64), 128, jnp.float32, None, "fp16/bf16 only"),
        ((1, 100, 1, 64), 128, jnp.float16, None, "Lq=100 is not a multiple of block_q=64"),
        ((1, 128, 1, 64), 77, jnp.float16, None, "Lk=77 is not a multiple of block_kv=128"),
        ((1, 128, 1, 320), 128, jnp.float16, None, "head_dim 320 > 256"),
        ((1, 128, 1, 64), 192, jnp.float16, HopperConfig(block_kv=128), "Lk=192"),
        ((1, 256, 1, 160), 256, jnp.float16, HopperConfig(), "bytes of shared memory"),
    ],
)
def test_supports_says_why(q_shape, kv_len, dtype, config, why):
    kv_shape = (q_shape[0], kv_len, *q_shape[2:])
    assert why in supports(q_shape, kv_shape, dtype, config)
    q = jnp.ones(q_shape, dtype)
    k = jnp.ones(kv_shape, dtype)
    with pytest.raises(ValueError, match="flash_attention_hopper"):
        flash_attention_hopper(q, k, k, config=config)


def test_supported_sd_shapes():
    """The self-attention shapes it is for are in scope with the default config."""
    for name in ("sd15_self_64", "sd15_self_32", "sd21_self_96", "sd21_self_48"):
        s = ATTENTION_SHAPES[name]
        assert supports(s.q_shape, s.kv_shape, jnp.float16) is None, name
    s = ATTENTION_SHAPES["sd15_self_16"]  # head dim 160 -> 192 fits with a smaller K/V ring
    assert supports(s.q_shape, s.kv_shape, jnp.float16, HopperConfig(block_kv=64)) is None


def test_register_split_fits_the_launch_allocation():
    """The consumers' and producer's registers after `set_max_registers` fit what the block is
    launched with (threads * the file / threads, a multiple of 8 each): otherwise a consumer's
    increase waits for ever on the GPU (four consumers at 120 registers, tried once, hung
    there: a 640-thread block launches with 96 a thread)."""
    from custom_calls._common import HOPPER_CONSUMER_REGISTERS, HOPPER_PRODUCER_REGISTERS
    from custom_calls.flash_attention_hopper import CONSUMER_COUNTS, registers

    assert registers(2) == (HOPPER_CONSUMER_REGISTERS, HOPPER_PRODUCER_REGISTERS)
    assert registers(3) == (160, 24)
    assert registers(4) == (112, 24)  # not 120: the rule that the hang taught
    for consumers in CONSUMER_COUNTS:
        consumer, producer = registers(consumers)
        threads = 128 * (consumers + 1)
        launch = 65536 // threads // 8 * 8
        assert consumer % 8 == 0 and producer % 8 == 0 and producer >= 24
        assert 128 * (consumers * consumer + producer) <= launch * threads


def test_rejects_bad_configs():
    for bad in (dict(block_q=32), dict(block_kv=96), dict(stages=1), dict(head_align=8),
                dict(half_sum=True), dict(overlap_qk=True),  # overlap_qk needs no ping-pong
                dict(half_exp=True, half_sum=True, mma_row_sum=True),
                dict(overlap_qk=True, pingpong=False, block_q=128, block_kv=128),
                dict(consumers=5, pingpong=False), dict(consumers=3),  # the ping-pong pairs two
                dict(consumers=3, pingpong=False, block_q=128),  # registers: tiles <= 8192
                dict(consumers=4, pingpong=False, block_kv=64),  # dropped (item 127)
                dict(consumers=3, pingpong=False, block_kv=128, overlap_qk=True),
                dict(poly_exp=1), dict(poly_exp=-2), dict(poly_exp=4, half_exp=True),
                dict(lazy_sum=True, mma_row_sum=True), dict(lazy_sum=True, half_exp=True)):  # fmt: skip
        with pytest.raises(ValueError):
            HopperConfig(**bad)


# -------------------------------------------------------------------------------------------
# GPU (run with `pytest -m gpu` on an H100): the real wgmma/TMA lowering
# -------------------------------------------------------------------------------------------

GPU_SHAPES = ["sd15_self_64", "sd15_self_32", "sd21_self_96", "sd21_self_48"]


def _on_hopper() -> bool:
    import jax

    return getattr(jax.devices()[0], "compute_capability", "") == "9.0"


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_sd_shapes(name, dtype, rng):
    assert _on_hopper(), "the Hopper kernel's GPU tests need compute capability 9.0"
    s = ATTENTION_SHAPES[name]
    q, k, v = _inputs(rng, *s.q_shape[:2], *s.q_shape[2:], s.kv_len, dtype)
    out = flash_attention_hopper(q, k, v)  # the tuned config, else the default
    ref = np.asarray(flash_attention_reference(q, k, v))
    assert _relative_error(out, ref) <= TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("config", [HopperConfig(pingpong=False), HopperConfig(stages=3),
                                    HopperConfig(block_q=128, block_kv=64),
                                    HopperConfig(head_align=16),
                                    HopperConfig(head_align=16, half_exp=True),
                                    HopperConfig(half_exp=True, half_sum=True),
                                    HopperConfig(head_align=16, tree_reduce=True),
                                    HopperConfig(head_align=16, mma_row_sum=True),
                                    HopperConfig(head_align=16, mma_row_sum=True,
                                                 pingpong=False),
                                    HopperConfig(head_align=16, pingpong=False, block_q=64,
                                                 overlap_qk=True),
                                    HopperConfig(head_align=16, pingpong=False, block_q=128,
                                                 block_kv=64, overlap_qk=True),
                                    HopperConfig(head_align=16, block_q=128, stages=3,
                                                 pin_softmax=True),
                                    HopperConfig(head_align=16, half_exp=True,
                                                 pin_softmax=True),
                                    # Lq = 1024: 5 1/3 programs of three consumers' rows
                                    HopperConfig(head_align=16, pingpong=False, consumers=3),
                                    HopperConfig(head_align=16, pingpong=False, consumers=3,
                                                 block_kv=64, stages=3, mma_row_sum=True,
                                                 half_exp=True),
                                    # the FMA pipe's exponentials, the lazy row sums
                                    HopperConfig(head_align=16, block_q=128, stages=3,
                                                 poly_exp=4),
                                    HopperConfig(head_align=16, block_q=128, stages=3,
                                                 lazy_sum=True),
                                    HopperConfig(head_align=16, block_q=128, stages=3,
                                                 poly_exp=3, lazy_sum=True),
                                    HopperConfig(head_align=16, poly_exp=2, lazy_sum=True,
                                                 pingpong=False),
                                    # the logits pinned before the exponentials
                                    HopperConfig(head_align=16, block_q=128, stages=3,
                                                 lazy_sum=True, split_exp=True),
                                    HopperConfig(head_align=16, half_exp=True,
                                                 split_exp=True)])  # fmt: skip
@pytest.mark.parametrize("head_dim", [40, 160])
def test_gpu_configs(config, head_dim, rng):
    if head_dim == 160:
        config = dataclasses.replace(config, block_kv=64, stages=2)
    q, k, v = _inputs(rng, 2, 1024, 8, head_dim, 1024, jnp.float16, magnitude=3.0)
    out = flash_attention_hopper(q, k, v, config=config)
    ref = np.asarray(flash_attention_reference(q, k, v))
    assert _relative_error(out, ref) <= TOLERANCE[jnp.float16]


@pytest.mark.gpu
def test_gpu_hlo_has_mosaic_kernel(rng):
    import jax

    q, k, v = _inputs(rng, 2, 256, 8, 40, 256, jnp.float16)
    from sdjax.hlo import count_hlo

    hlo = jax.jit(flash_attention_hopper).lower(q, k, v).compile().as_text()
    assert "mosaic_gpu" in hlo
    # the name experiments/hlo_report.py looks for (inside the custom call's module text)
    assert any(n.startswith("sdjax_flash_hopper") for n in count_hlo(hlo)["sdjax_kernels"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sd15_self_64", "sd15_self_32"])
def test_gpu_packed_qkv(name, rng):
    """The UNet's form: qkv from one projection with heads already padded, read in place (no
    slice in the compiled program), against the reference."""
    import jax

    from custom_calls.flash_attention_hopper import tuned_config

    assert _on_hopper(), "the Hopper kernel's GPU tests need compute capability 9.0"
    s = ATTENTION_SHAPES[name]
    b, length, heads, head_dim = s.q_shape
    d_pad = padded_head_dim(head_dim, tuned_config(s.q_shape, s.q_shape, jnp.float16).head_align)
    x = jnp.asarray(rng.standard_normal((b, length, 3, heads, d_pad), dtype=np.float32),
                    jnp.float16)  # fmt: skip
    x = x.at[..., head_dim:].set(0)  # zero padding columns, as the UNet's projection makes
    fn = jax.jit(lambda t: flash_attention_hopper_qkv(t, scale=head_dim**-0.5))
    out = fn(x)[..., :head_dim]
    q, k, v = (x[:, :, i, :, :head_dim] for i in range(3))
    ref = np.asarray(flash_attention_reference(q, k, v))
    assert _relative_error(out, ref) <= TOLERANCE[jnp.float16]
    assert " slice(" not in fn.lower(x).compile().as_text()


def test_tuned_table_covers_the_padded_heads_the_unet_passes():
    """The UNet calls the kernel on heads it padded itself; the kernel then looks its config
    up under the padded shape. Every recorded shape whose head dim needs padding must have
    the same config under the padded key."""
    from custom_calls.flash_attention import tuned_table

    table = tuned_table("flash_hopper")
    assert table, "no flash_hopper entries recorded"
    checked = 0
    for key, config in table.items():
        q_part, kv_len, bits = key.split(":")
        q_len, heads, head_dim = map(int, q_part.split("x"))
        d_pad = padded_head_dim(head_dim, config.get("head_align", 64))
        if d_pad != head_dim:
            assert table[f"{q_len}x{heads}x{d_pad}:{kv_len}:{bits}"] == config, key
            checked += 1
    assert checked >= 1  # SD1.5's head dim 40 at 4096 tokens (80 and 160 need none at align 16)


def test_no_stage_is_left_out_outside_the_ablation_experiment():
    """`_ABLATE` (timing experiments only) is empty in every other use of the kernel."""
    import importlib

    module = importlib.import_module("custom_calls.flash_attention_hopper")
    assert module._ABLATE == frozenset()
    assert set(module.ABLATABLE) == {"max", "exp", "sum", "rescale", "pv", "pingpong"}


def test_tune_grid_adds_lazy_sum():
    """`tune_attention.py --hopper_lazy_sum`: every config with fp32 exponentials and row sums
    in registers also with lazy_sum, and none with fp16 exponentials or tensor-core sums."""
    from tests._subprocess import last_json_line, run_python

    got = last_json_line(
        run_python(
            "import json\n"
            "from experiments import tune_attention as t\n"
            "from sdjax.shapes import ATTENTION_SHAPES as S\n"
            "s = S['sd15_self_64']\n"
            "base = t.hopper_candidates(s, half_exp=True, mma_sum=True)\n"
            "lazy = t.hopper_candidates(s, half_exp=True, mma_sum=True, lazy=True)\n"
            "eligible = [c for c in base if not (c.half_exp or c.mma_row_sum)]\n"
            "print(json.dumps({'base': len(base), 'lazy': len(lazy), 'eligible': len(eligible),\n"
            "                  'bad': sum(c.lazy_sum and (c.half_exp or c.mma_row_sum)\n"
            "                             for c in lazy),\n"
            "                  'base_lazy': sum(c.lazy_sum for c in base)}))"
        )
    )
    assert got["eligible"] > 0 and got["base_lazy"] == 0 and got["bad"] == 0
    assert got["lazy"] == got["base"] + got["eligible"]


def test_config_overrides_replace_fields_at_every_shape_and_restore():
    import importlib

    fah = importlib.import_module("custom_calls.flash_attention_hopper")
    shapes = [((2, 4096, 8, 48), (2, 4096, 8, 48)), ((2, 1024, 8, 80), (2, 1024, 8, 80)),
              ((1, 128, 2, 40), (1, 256, 2, 40))]  # tuned, tuned, untuned (defaults)  # fmt: skip
    before = [fah.tuned_config(q, k, jnp.float16) for q, k in shapes]
    with fah.config_overrides(stages=2, pingpong=False):
        inside = [fah.tuned_config(q, k, jnp.float16) for q, k in shapes]
        with fah.config_overrides(stages=3):  # nested: the inner value wins, then comes back
            assert all(c.stages == 3 and not c.pingpong
                       for c in (fah.tuned_config(q, k, jnp.float16) for q, k in shapes))  # fmt: skip
        assert [fah.tuned_config(q, k, jnp.float16) for q, k in shapes] == inside
    assert inside == [dataclasses.replace(c, stages=2, pingpong=False) for c in before]
    assert [fah.tuned_config(q, k, jnp.float16) for q, k in shapes] == before
    with pytest.raises(ValueError, match="unknown HopperConfig fields"):
        with fah.config_overrides(lazy=True):
            pass
    with fah.config_overrides(half_sum=True):  # invalid with the fp32 exponentials
        with pytest.raises(ValueError, match="half_sum needs half_exp"):
            fah.tuned_config(*shapes[0], jnp.float16)


def test_ops_pass_the_config_in_force_to_the_kernel(monkeypatch):
    """sdjax.ops hands the kernel its config (so that the kernel's jit caches by it): under
    config_overrides a retrace gets the replaced config, not a cached trace of the old one."""
    import importlib

    import custom_calls
    from sdjax import ops

    fah = importlib.import_module("custom_calls.flash_attention_hopper")
    seen = []

    def record(*args, config=None, **kwargs):
        seen.append(config)
        return args[0][:, :, 0]

    monkeypatch.setattr(ops, "_require_hopper", lambda q, k: None)
    monkeypatch.setattr(custom_calls, "flash_attention_hopper_qkv", record)
    monkeypatch.setattr(custom_calls, "flash_attention_hopper", record)
    qkv = jnp.zeros((2, 4096, 3, 8, 48), jnp.float16)
    q = qkv[:, :, 0]
    ops._attention_flash_hopper_packed(qkv, scale=0.1)
    ops._attention_flash_hopper(q, q, q, scale=0.1)
    with fah.config_overrides(lazy_sum=False):
        ops._attention_flash_hopper_packed(qkv, scale=0.1)
        ops._attention_flash_hopper(q, q, q, scale=0.1)
    tuned = fah.tuned_config(q.shape, q.shape, jnp.float16)
    assert tuned.lazy_sum  # the table's entry at SD1.5's 64x64 self-attention
    assert seen == [tuned, tuned, *[dataclasses.replace(tuned, lazy_sum=False)] * 2]
