"""The subpixel interleave kernel (`custom_calls.subpixel`) against its jnp reference.

The kernel only moves values (and adds the bias in the inputs' dtype, as the reference), so
every comparison is exact. Off GPU it runs in Pallas interpret mode; the `gpu` tests run the
compiled kernel at SD's shapes on the device (`pytest -m gpu`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from custom_calls.subpixel import (
    Config,
    channel_block,
    heuristic_config,
    subpixel_interleave,
    subpixel_interleave_reference,
)


def _inputs(rng, n, h, w, o, s, dtype):
    y = jnp.asarray(rng.standard_normal((n, h + 1, w + 1, 4 * o)), dtype)
    bias = jnp.asarray(rng.standard_normal(o), dtype)
    skip = jnp.asarray(rng.standard_normal((n, 2 * h, 2 * w, s)), dtype) if s else None
    return y, bias, skip


def _assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not np.isnan(np.asarray(got, np.float32)).any()
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "n, h, w, o, s, config",
    [
        (2, 4, 4, 8, 4, None),  # square, with a skip
        (3, 3, 6, 16, 0, None),  # batch 3, no skip (the VAE), W not a power of two
        (1, 5, 12, 24, 40, Config(block_w=8, block_c=8)),  # last tile overlaps (12 = 8 + 4)
        (2, 2, 3, 4, 12, Config(block_w=2)),  # W = 3: tiles [0, 2) and [1, 3)
        (1, 2, 5, 20, 30, Config(block_w=4, block_c=64)),  # gcd 10: tiles of 2 channels
    ],
    ids=["square_skip", "batch3_no_skip", "overlap", "w3", "odd_channels"],
)
def test_interleave_matches_reference(rng, n, h, w, o, s, config, dtype):
    y, bias, skip = _inputs(rng, n, h, w, o, s, dtype)
    got = subpixel_interleave(y, bias, skip, config=config)
    want = subpixel_interleave_reference(y, bias, skip)
    assert want.shape == (n, 2 * h, 2 * w, o + s)
    _assert_same(got, want)


def test_interleave_is_the_textbook_pixels(rng):
    """Independent of the reference's slicing: output pixel (2i + a, 2j + b) is phase (a, b)
    of y at (i + a, j + b), plus the bias; the skip follows the upsampled channels."""
    n, h, w, o, s = 1, 3, 4, 5, 2
    y, bias, skip = _inputs(rng, n, h, w, o, s, jnp.float32)
    got = np.asarray(subpixel_interleave(y, bias, skip))
    y6 = np.asarray(y).reshape(n, h + 1, w + 1, 2, 2, o)
    for i, a, j, b in np.ndindex(h, 2, w, 2):
        np.testing.assert_array_equal(got[0, 2 * i + a, 2 * j + b, :o],
                                      y6[0, i + a, j + b, a, b] + np.asarray(bias))  # fmt: skip
        np.testing.assert_array_equal(got[0, 2 * i + a, 2 * j + b, o:],
                                      np.asarray(skip)[0, 2 * i + a, 2 * j + b])  # fmt: skip


def test_channel_block_and_heuristic():
    assert channel_block(1280, 640) == 128  # UNet 16 -> 32: gcd 640
    assert channel_block(640, 320) == 64  # UNet 32 -> 64: gcd 320
    assert channel_block(512, 0) == 256  # the VAE: capped
    assert channel_block(20, 30) == 2
    cfg = heuristic_config((2, 17, 17, 4 * 1280), 640)
    assert cfg.block_c == 128 and cfg.block_w == 16  # a whole 16-pair row in one tile
    cfg = heuristic_config((1, 257, 257, 4 * 256), 0)
    assert cfg.block_c == 256 and cfg.block_w == 16  # 4096 elements a program
    with pytest.raises(ValueError, match="power of two"):
        Config(block_w=12)


def test_bad_input_raises(rng):
    y, bias, skip = _inputs(rng, 1, 2, 2, 4, 4, jnp.float16)
    with pytest.raises(ValueError, match=r"phases y \[N, H \+ 1, W \+ 1, 4 \* O\]"):
        subpixel_interleave(y[..., :-1], bias)
    with pytest.raises(ValueError, match=r"bias must be \[4\]"):
        subpixel_interleave(y, bias[:3])
    with pytest.raises(ValueError, match=r"skip must be \[1, 4, 4, S\]"):
        subpixel_interleave(y, bias, skip[:, :2])
    with pytest.raises(ValueError, match="skip is float32"):
        subpixel_interleave(y, bias, skip.astype(jnp.float32))


def test_interleave_lowers_to_one_triton_call_for_cuda():
    """The GPU lowering (Pallas -> Triton IR), checked here without a GPU: one Triton custom
    call over (rows, pixel tiles, phases * channel tiles) at the UNet's 16 -> 32 shape."""
    from jax import export

    y = jax.ShapeDtypeStruct((2, 17, 17, 4 * 1280), jnp.float16)
    bias = jax.ShapeDtypeStruct((1280,), jnp.float16)
    skip = jax.ShapeDtypeStruct((2, 32, 32, 640), jnp.float16)
    fn = jax.jit(lambda y, b, s: subpixel_interleave(y, b, s, interpret=False))
    exported = export.export(
        fn, platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(y, bias, skip)  # fmt: skip
    text = exported.mlir_module()
    assert text.count("@__gpu$xla.gpu.triton") == 1
    assert "sdjax_subpixel_interleave" in text
    # 64 output rows; one 16-pair tile a row; 2 phases * 1920 / 128 channel tiles
    for axis, size in (("x", 64), ("y", 1), ("z", 30)):
        assert f"grid_{axis} = {size} " in text


# The upsamplers at 512x512 (batch 2 for guidance in the UNet, 1 in the VAE): (n, h, w, O, S).
GPU_SHAPES = {
    "unet_16to32": (2, 16, 16, 1280, 640),
    "unet_32to64": (2, 32, 32, 640, 320),
    "unet_8to16": (2, 8, 8, 1280, 1280),
    "vae_64to128": (1, 64, 64, 512, 0),
    "vae_256to512": (1, 256, 256, 256, 0),
    "odd_24to48": (3, 12, 24, 320, 320),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", GPU_SHAPES)
def test_interleave_gpu(rng, name, dtype):
    y, bias, skip = _inputs(rng, *GPU_SHAPES[name], dtype)
    _assert_same(subpixel_interleave(y, bias, skip), subpixel_interleave_reference(y, bias, skip))
