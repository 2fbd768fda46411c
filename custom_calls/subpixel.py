"""The subpixel upsampler's interleave (and the skip concatenate after it) as one Pallas
(Triton) kernel: every byte read once and written once.

`sdjax.ops.upsample_conv_phases` runs nearest-2x + 3x3 conv as one 2x2 conv of the small map
whose output holds the four output phases: y [N, H + 1, W + 1, 4 * O], channels ordered (row
phase a, column phase b, O). Output pixel (2i + a, 2j + b) is y[n, i + a, j + b, (a, b), :]
plus the bias. In SD's UNet the upsampled map then meets the next skip connection in a
channel concatenate, [upsampled, skip]. XLA writes the interleave (and the concatenate) as one
fusion. On the H100 (`experiments/results/bench_upsample_interleave_*_s16a.md`, device kernel
time) this kernel takes 0.60x XLA's time at the VAE's three upsamplers (0.35 -> 0.16 ms an
image in its profile) and 0.96-0.98x at the UNet's two, where XLA's fusion already moves
~2.2 TB/s.

The kernel views the output [N, 2H, 2W, O + S] as rows [N * 2H, W, 2 * (O + S)] (a bitcast:
pixel pair j holds both column phases) and the phases y as [N * (H + 1), W + 1, 4 * O]. One
program copies one [block_w, block_c] tile of one output row, one column phase b: from the
phase (a, b) at input row i + a, columns j + b (adding the bias), or from the skip. block_c
divides O and S, so no tile straddles the two sources; block_w <= W, and where W is not a
multiple of it the last tile of a row starts at W - block_w, overlapping its neighbour (which
writes the same values there): no masks, and no read past the arrays.

Scope: any float dtype; S may be 0 (no skip: the VAE). Off GPU the kernel runs in Pallas
interpret mode (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from custom_calls._common import resolve_interpret

# The widest channel tile: 256 fp16 channels are 512 contiguous bytes a pixel, four 128-byte
# lines; wider adds nothing to the coalescing of a copy.
MAX_BLOCK_C = 256
# Elements one program moves by default: 4096 (8 KiB of fp16 read and as much written) keeps
# thousands of programs at the UNet's shapes (rows * phases * channel tiles) while each still
# streams whole lines.
TILE_ELEMENTS = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """block_w: output pixel pairs of one row per program (a power of two); block_c: the most
    channels per program (a power of two; the kernel takes the largest power of two <= it that
    divides O and S); num_warps: Triton warps per program."""

    block_w: int = 16
    block_c: int = MAX_BLOCK_C
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_w", "block_c", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Config: {name}={value} must be a power of two")


def channel_block(out_channels: int, skip_channels: int, cap: int = MAX_BLOCK_C) -> int:
    """The largest power of two <= cap dividing out_channels and skip_channels (0: none)."""
    g = math.gcd(out_channels, skip_channels)  # gcd(O, 0) = O
    return min(cap, g & -g)  # g & -g: the lowest set bit, the largest power of two dividing g


def _floor_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def heuristic_config(phases_shape, skip_channels: int = 0) -> Config:
    """~TILE_ELEMENTS per program: the channel tile as wide as divides O and S, the rest in
    pixels (at most the row's)."""
    _, _, w1, c4 = phases_shape
    block_c = channel_block(c4 // 4, skip_channels)
    block_w = min(_floor_power_of_2(w1 - 1), max(1, TILE_ELEMENTS // block_c))
    return Config(block_w=block_w, block_c=block_c)


def _interleave_kernel(y_ref, bias_ref, *refs, rows, out_ch, skip_ch, width, block_w, block_c):
    """y_ref: [N * (H + 1), W + 1, 4 * O]; bias_ref: [O]; refs: (skip_ref [N * 2H, W, 2 * S],)
    if S, then o_ref [N * 2H, W, 2 * (O + S)]. Grid: (output row, pixel-pair tile, column
    phase * channel tile)."""
    o_ref = refs[-1]
    row = pl.program_id(0)  # output row n * 2H + r
    j0 = jnp.minimum(pl.program_id(1) * block_w, width - block_w)  # (module doc)
    per_phase = (out_ch + skip_ch) // block_c
    b = pl.program_id(2) // per_phase  # column phase
    c0 = (pl.program_id(2) % per_phase) * block_c  # channel of the output pixel
    n, r = row // rows, row % rows
    a = r % 2  # row phase
    src_row = n * (rows // 2 + 1) + r // 2 + a
    cols = pl.ds(j0, block_w)
    dst = o_ref.at[row, cols, pl.ds(b * (out_ch + skip_ch) + c0, block_c)]

    @pl.when(c0 < out_ch)
    def _phase():
        src = y_ref.at[src_row, pl.ds(j0 + b, block_w), pl.ds((2 * a + b) * out_ch + c0, block_c)]
        bias = plgpu.load(bias_ref.at[pl.ds(c0, block_c)])
        plgpu.store(dst, plgpu.load(src) + bias[None, :])

    if skip_ch:
        skip_ref = refs[0]

        @pl.when(c0 >= out_ch)
        def _skip():
            src = skip_ref.at[row, cols, pl.ds(b * skip_ch + c0 - out_ch, block_c)]
            plgpu.store(dst, plgpu.load(src))


def _validate(y, bias, skip):
    if y.ndim != 4 or y.shape[-1] % 4 or y.shape[1] < 2 or y.shape[2] < 2:
        raise ValueError(f"subpixel_interleave wants phases y [N, H + 1, W + 1, 4 * O]; got "
                         f"{y.shape}")  # fmt: skip
    n, h1, w1, c4 = y.shape
    if bias.shape != (c4 // 4,):
        raise ValueError(f"subpixel_interleave: bias must be [{c4 // 4}]; got {bias.shape}")
    if skip is not None:
        if skip.ndim != 4 or skip.shape[:3] != (n, 2 * (h1 - 1), 2 * (w1 - 1)):
            raise ValueError(f"subpixel_interleave: skip must be [{n}, {2 * (h1 - 1)}, "
                             f"{2 * (w1 - 1)}, S]; got {skip.shape}")  # fmt: skip
        if skip.dtype != y.dtype:
            raise ValueError(f"subpixel_interleave: skip is {skip.dtype}, phases {y.dtype}")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def subpixel_interleave(y, bias, skip=None, *, config: Config | None = None, interpret=None):
    """The phases' interleave plus bias, then the skip concatenated along channels.

    y: [N, H + 1, W + 1, 4 * O] (channels (a, b, O), `sdjax.ops.subpixel_kernel`'s order);
    bias: [O]; skip: [N, 2H, 2W, S] in y's dtype, or None -> [N, 2H, 2W, O (+ S)] in y's
    dtype: out[n, 2i + a, 2j + b, :O] = y[n, i + a, j + b, (a, b), :] + bias, out[..., O:] =
    skip. The bias is added in y's dtype, as the reference.
    """
    _validate(y, bias, skip)
    n, h1, w1, c4 = y.shape
    h, w, o = h1 - 1, w1 - 1, c4 // 4
    s = 0 if skip is None else skip.shape[-1]
    config = config or heuristic_config(y.shape, s)
    block_c = channel_block(o, s, config.block_c)
    block_w = min(config.block_w, _floor_power_of_2(w))
    kernel = functools.partial(
        _interleave_kernel, rows=2 * h, out_ch=o, skip_ch=s, width=w, block_w=block_w,
        block_c=block_c,
    )  # fmt: skip
    inputs = [y.reshape(n * h1, w1, c4), bias.astype(y.dtype)]
    if s:
        inputs.append(skip.reshape(n * 2 * h, w, 2 * s))  # a bitcast: pixel pairs
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n * 2 * h, w, 2 * (o + s)), y.dtype),
        grid=(n * 2 * h, pl.cdiv(w, block_w), 2 * (o + s) // block_c),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="sdjax_subpixel_interleave",
    )(*inputs)
    return out.reshape(n, 2 * h, 2 * w, o + s)


def subpixel_interleave_reference(y, bias, skip=None):
    """Plain jnp (what XLA fuses): the four phases sliced and stacked, the bias added in y's
    dtype, the skip concatenated."""
    _validate(y, bias, skip)
    n, h1, w1, c4 = y.shape
    h, w, o = h1 - 1, w1 - 1, c4 // 4
    y = y.reshape(n, h1, w1, 2, 2, o)
    # phase (a, b) of input pixel (i, j) is position (i + a, j + b) of the 2x2 convolution
    rows = [jnp.stack([y[:, a : a + h, b : b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
    out = jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, o) + bias.astype(y.dtype)
    return out if skip is None else jnp.concatenate([out, skip], axis=-1)


__all__ = ["Config", "subpixel_interleave", "subpixel_interleave_reference", "heuristic_config"]
