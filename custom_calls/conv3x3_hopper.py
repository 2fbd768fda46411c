"""A 3x3 convolution (stride 1, padding 1) for Hopper (sm_90) as a Pallas Mosaic GPU kernel:
an implicit GEMM with split-K.

Why our own: cuDNN runs SD1.5's 3x3 convolutions at the 16x16 and 32x32 levels at ~0.60 of
their FLOP floor (33 us for ~20 us at 1280 and 640 channels, batch 2; the per-level table of
`experiments/results/README.md`, twenty-first session, call 4): its output tiles (M = 512 or
2048 pixels by 1280 or 640 channels) fill 40-80 of the H100's 132 SMs, and cuDNN cannot be
made to split K (item 196 there). Here the reduction is split: `splits` programs per output
tile each reduce 1 / splits of the K = 9 * C reduction steps, and XLA adds their partial sums
(with the bias) in one element-wise pass.

The product, per output pixel p = (n, y, x) and output channel o:
    out[p, o] = sum over taps (ky, kx) and input channels c of
                xp[n, y + ky, x + kx, c] * w[ky, kx, c, o],
with xp the input zero-padded by one pixel on each side. A GEMM [pixels, 9 C] x [9 C, O]
whose left operand is never built (implicit GEMM):
- the input is laid out once, by XLA, as three *column-shifted planes*
  xs[kx, n, yy, x] = xp[n, yy, x + kx], side by side in the channels ([N (H + 2) W, 3 C]; or
  stacked, `Conv3x3Config.planes`): a tap (ky, kx) of 64 consecutive output pixels of one
  image is then 64 consecutive rows of plane kx, starting ky image rows further on. Mosaic
  GPU copies a TMA box into a tiled shared-memory tile only from a row that is a multiple of
  the tile's 8 rows (it tiles the source the same way), which a row offset of kx in the
  padded input itself is not;
- a program's tile is [128, block_n] of the output: 128 consecutive pixels, shared by two
  *consumer* warpgroups (64 rows each, wgmma's M) that read the same w tile;
- one *producer* warpgroup streams, per reduction step (tap t, channel chunk k), each
  consumer's 64-row box of plane kx (channels k : k + block_k) and the w tile
  [block_k, block_n] (rows t * C + k of w flattened to [9 C, O]) into a ring of `stages`
  shared-memory slots; a slot's `full` barrier waits for its three copies, its `free`
  barrier for both consumers;
- each consumer's float32 accumulator [64, block_n] lives in registers; the epilogue writes
  it, in x's dtype, to partials[split] through shared memory by TMA.

The planes are one XLA fusion before the kernel (it writes ~3x x); the partials' sum, the
bias and the cast are one XLA fusion after it. Both are in every timing we quote.

Scope (`supports`): fp16/bf16; C a multiple of block_k; O a multiple of block_n; W a
multiple of 8, H * W a multiple of 64 (a consumer's 64 pixels lie in one image) and N * H * W
of 128; the 9 C / block_k reduction steps a multiple of `splits`. Off GPU the kernel runs in
Mosaic GPU's interpret mode (tests; slow, small shapes), where the products are float32 dots
of the same shared-memory tiles.

Where it stands (H100, device kernel time; `experiments/results/README.md`, twenty-second
session): the kernel alone is 15-35% ahead of cuDNN at SD1.5's 16x16 and 32x32 shapes, behind
at 64x64; with the planes and the sums, ahead at 16x16 only, where `sdjax.ops`' `auto` takes
it (`hopper_conv_pays`).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from custom_calls._common import HOPPER_COMPUTE_WARPGROUPS as COMPUTE_WARPGROUPS
from custom_calls._common import HOPPER_CONSUMER_REGISTERS as CONSUMER_REGISTERS
from custom_calls._common import HOPPER_DTYPES as SUPPORTED_DTYPES
from custom_calls._common import HOPPER_PRODUCER_REGISTERS as PRODUCER_REGISTERS
from custom_calls._common import HOPPER_SMEM_LIMIT_BYTES as SMEM_LIMIT_BYTES
from custom_calls._common import (
    hopper_smem_transforms,
    mosaic_interpret_params,
    num_sms,
    resolve_interpret,
)

CONSUMER_M = 64  # rows of one consumer's accumulator: wgmma's M for one warpgroup
TILE_M = COMPUTE_WARPGROUPS * CONSUMER_M  # a program's output pixels
PLANE_LAYOUTS = ("rows", "channels")
ROW_ALIGN = 8  # a TMA box into a tiled shared-memory tile starts at a multiple of its rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class Conv3x3Config:
    """Block sizes of one launch: tiles [128, block_n] of the output, each reduced by
    `splits` programs."""

    block_n: int = 128  # output channels of a tile, a multiple of 64
    block_k: int = 64  # input channels of a reduction step: 64 fp16 = 128 bytes (the swizzle)
    stages: int = 4  # ring slots (reduction steps in flight)
    splits: int = 1  # programs per output tile, each reducing 1 / splits of the steps
    # Keep a step's wgmmas in flight while the next step's are issued; its slot is freed one
    # step later (needs stages >= 2).
    delay_release: bool = True
    # The column-shifted planes' layout (see the module doc): "channels", [N (H + 2) W, 3 C]
    # (plane kx at columns kx C), or "rows", [3, N (H + 2) W, C] (plane kx at rows
    # kx N (H + 2) W). The same kernel either way; XLA writes "channels" faster (H100, s22c:
    # 3.1 against 4.5 us at SD1.5's 16x16 level, 4.5 against 7.6 at 32x32).
    planes: str = "channels"

    def __post_init__(self):
        for f in ("block_n", "block_k"):
            if getattr(self, f) % 64 or getattr(self, f) <= 0:
                raise ValueError(f"{f}={getattr(self, f)} must be a positive multiple of 64")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be >= 1")
        if self.splits < 1:
            raise ValueError(f"splits={self.splits} must be >= 1")
        if self.delay_release and self.stages < 2:
            raise ValueError("delay_release needs stages >= 2")
        if self.planes not in PLANE_LAYOUTS:
            raise ValueError(f"planes={self.planes!r} must be one of {PLANE_LAYOUTS}")


def smem_bytes(config: Conv3x3Config, dtype) -> int:
    """The ring (x and w tiles per slot) and the two consumers' output tiles."""
    step = TILE_M * config.block_k + config.block_k * config.block_n
    out = TILE_M * config.block_n
    return jnp.dtype(dtype).itemsize * (config.stages * step + out)


def wave_fill(programs: int, sms: int) -> float:
    """The share of the SMs' program slots that `programs` one-program-per-SM launches keep
    busy over their waves (a program's ring takes most of an SM's shared memory)."""
    return programs / (-(-programs // sms) * sms)


def heuristic_config(x_shape, out_channels: int) -> Conv3x3Config:
    """Tiles 128 channels wide (64 where O is not a multiple of 128); then the split-K (a
    divisor of the reduction steps, at most 8) whose programs fill their waves best, the
    fewest splits among equals, where the tiles alone are fewer than the SMs. Measured on the
    H100 (s22b, `experiments/results/README.md`): a program per SM, the last wave's idle SMs
    cost their share: at SD1.5's 16x16 level (4 x 10 tiles) 3 splits (120 programs) took 26.5
    us of kernel, 4 (160) 40.0; at 32x32 (16 x 5 tiles) 3 splits (240) 27.4, 2 (160) 33.4,
    1 (80) 30.7."""
    n, h, w, c = x_shape
    block_n = 128 if out_channels % 128 == 0 else 64
    tiles = max(1, n * h * w // TILE_M) * max(1, out_channels // block_n)
    steps = max(1, 9 * c // Conv3x3Config.block_k)
    sms = num_sms()
    if tiles >= sms:  # split-K only where the tiles leave SMs idle
        return Conv3x3Config(block_n=block_n)
    # each split adds a partial sum's pass over the output: at most 8
    splits = max((s for s in range(1, 9) if steps % s == 0),
                 key=lambda s: (round(wave_fill(tiles * s, sms), 2), -s))  # fmt: skip
    return Conv3x3Config(block_n=block_n, splits=splits)


def parse_config(spec: str, x_shape, out_channels: int) -> Conv3x3Config:
    """A config from a short spec (benchmarks' command lines): "auto" (the heuristic) or
    "n<block_n>s<stages>k<splits>", e.g. "n128s4k3", then optionally "e" (no delayed
    release), then optionally "r" (the planes stacked by rows)."""
    planes = "rows" if spec.endswith("r") else "channels"
    if spec in ("auto", "autor"):
        return dataclasses.replace(heuristic_config(x_shape, out_channels), planes=planes)
    match = re.fullmatch(r"n(\d+)s(\d+)k(\d+)(e?)(r?)", spec)
    if not match:
        raise ValueError(f"config spec {spec!r} is neither auto[r] nor like n128s4k3[e][r]")
    n, s, k, e, _ = match.groups()
    return Conv3x3Config(block_n=int(n), stages=int(s), splits=int(k), delay_release=not e,
                         planes=planes)  # fmt: skip


def supports(x_shape, kernel_shape, dtype, config: Conv3x3Config | None = None) -> str | None:
    """None if the kernel can run x [N, H, W, C] with kernel [3, 3, C, O] and `config`
    (default: the heuristic), else the reason it cannot."""
    if len(x_shape) != 4 or len(kernel_shape) != 4:
        return f"wants x [N, H, W, C] and kernel [3, 3, C, O]; got {x_shape} and {kernel_shape}"
    n, h, w, c = x_shape
    if tuple(kernel_shape[:3]) != (3, 3, c):
        return f"kernel {tuple(kernel_shape)} is not [3, 3, {c}, O]"
    o = kernel_shape[3]
    config = config or heuristic_config(x_shape, o)
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (fp16/bf16 only)"
    if c % config.block_k:
        return f"C={c} is not a multiple of block_k={config.block_k}"
    if o % config.block_n:
        return f"O={o} is not a multiple of block_n={config.block_n}"
    if w % ROW_ALIGN:
        return f"W={w} is not a multiple of {ROW_ALIGN}"
    if (h * w) % CONSUMER_M:
        return f"H*W={h * w} is not a multiple of {CONSUMER_M}"
    if (n * h * w) % TILE_M or n * h * w == 0:
        return f"N*H*W={n * h * w} is not a positive multiple of {TILE_M}"
    if (9 * c // config.block_k) % config.splits:
        return f"the {9 * c // config.block_k} reduction steps do not split {config.splits} ways"
    if (smem := smem_bytes(config, dtype)) > SMEM_LIMIT_BYTES:
        return f"its tiles need {smem} bytes of shared memory (> {SMEM_LIMIT_BYTES})"
    return None


def _kernel(
    x_ref, w_ref, o_ref, x_smem, w_smem, o_smem, full, free,
    *, batch, height, width, channels, block_n, block_k, stages, k_steps, delay_release, planes,
    interpret,
):  # fmt: skip
    """One program: split s of output tile (m, n).

    x_ref: `input_planes(x, planes)`, [3 N (H + 2) W, C] or [N (H + 2) W, 3 C]; w_ref [9 C, O];
    o_ref [splits, N H W, O]. x_smem [stages, 2, 64, block_k] (the consumers' rows); w_smem
    [stages, block_k, block_n]; o_smem [2, 64, block_n]. full, free: [stages] barriers (free:
    one arrival per consumer). k_steps: this program's reduction steps.
    """
    wg = lax.axis_index("wg")
    tile_m, tile_n, split = (lax.axis_index(a) for a in ("m", "n", "k"))
    m0 = pl.multiple_of(tile_m * TILE_M, TILE_M)
    n0 = pl.multiple_of(tile_n * block_n, block_n)
    chunks = channels // block_k  # reduction steps per tap
    first = split * k_steps  # this program's first step (of 9 * chunks)
    unroll = k_steps <= 32

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")

        if interpret:  # plain float32 dots of the same tiles

            def step(i, acc):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(full.at[slot])
                xt = x_smem.at[slot, wg][...].astype(jnp.float32)
                acc = acc + jnp.dot(xt, w_smem.at[slot][...].astype(jnp.float32))
                plgpu.barrier_arrive(free.at[slot])
                return acc

            acc = jnp.zeros((CONSUMER_M, block_n), jnp.float32)
            out = lax.fori_loop(0, k_steps, step, acc)
        else:

            def accumulate(acc):
                @pl.loop(0, k_steps, unroll=unroll)
                def _step(i):
                    slot = lax.rem(i, stages)
                    plgpu.barrier_wait(full.at[slot])
                    plgpu.wgmma(acc, x_smem.at[slot, wg], w_smem.at[slot])
                    if delay_release:  # step i may run on; step i - 1's products are done
                        plgpu.wgmma_wait(1)
                        pl.when(i > 0)(
                            lambda: plgpu.barrier_arrive(free.at[lax.rem(i + stages - 1, stages)])
                        )
                    else:
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(free.at[slot])

                if delay_release:
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(free.at[lax.rem(k_steps - 1, stages)])
                return acc[...]

            out = pl.run_scoped(accumulate, plgpu.ACC((CONSUMER_M, block_n), jnp.float32))
        o_smem.at[wg][...] = out.astype(o_smem.dtype)
        plgpu.commit_smem()
        rows = pl.ds(m0 + wg * CONSUMER_M, CONSUMER_M)  # this consumer's pixels
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[split, rows, pl.ds(n0, block_n)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
        plane = batch * (height + 2) * width  # rows of one plane

        def consumer_origin(c):
            """Consumer c's first pixel's row in plane 0 at tap (0, 0)."""
            p = m0 + c * CONSUMER_M
            n, rest = p // (height * width), lax.rem(p, height * width)
            return n * (height + 2) * width + rest

        origins = [consumer_origin(c) for c in range(COMPUTE_WARPGROUPS)]

        @pl.loop(0, k_steps, unroll=unroll)
        def _step(i):
            slot = lax.rem(i, stages)
            pl.when(i >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
            g = first + i
            tap, chunk = g // chunks, lax.rem(g, chunks)
            # tap (ky, kx): plane kx, ky image rows on
            kx, shift = lax.rem(tap, 3), (tap // 3) * width
            column = chunk * block_k
            if planes == "rows":
                shift = shift + kx * plane
            else:
                column = column + kx * channels
            ks = pl.ds(pl.multiple_of(column, block_k), block_k)
            for c, origin in enumerate(origins):
                plgpu.copy_gmem_to_smem(
                    x_ref.at[pl.ds(pl.multiple_of(origin + shift, ROW_ALIGN), CONSUMER_M), ks],
                    x_smem.at[slot, c],
                    full.at[slot],
                )
            w_rows = pl.multiple_of(tap * channels + chunk * block_k, block_k)
            plgpu.copy_gmem_to_smem(
                w_ref.at[pl.ds(w_rows, block_k), pl.ds(n0, block_n)],
                w_smem.at[slot],
                full.at[slot],
            )

        # every phase of `free` is awaited, the last `stages` ones here
        for q in range(stages):
            g = k_steps - stages + q
            if g >= 0:
                plgpu.barrier_wait(free.at[g % stages])


def input_planes(x, layout: str = "channels"):
    """x [N, H, W, C] zero-padded by one pixel and laid out as the kernel reads it: the three
    column-shifted planes xs[kx] = xp[:, :, kx : kx + W], as [3 N (H + 2) W, C] ("rows") or
    [N (H + 2) W, 3 C] ("channels")."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [xp[:, :, kx : kx + w] for kx in range(3)]
    if layout == "rows":
        return jnp.stack(shifted).reshape(3 * n * (h + 2) * w, c)
    return jnp.concatenate(shifted, axis=-1).reshape(n * (h + 2) * w, 3 * c)


def _checked(x_shape, kernel, bias, dtype, config):
    if why := supports(x_shape, kernel.shape, dtype, config):
        raise ValueError(f"conv3x3_hopper cannot run x {x_shape} with kernel {kernel.shape}: {why}")
    o = kernel.shape[3]
    if bias is not None and bias.shape != (o,):
        raise ValueError(f"conv3x3_hopper: bias must be [{o}]; got {bias.shape}")
    return config or heuristic_config(x_shape, o)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def conv3x3_hopper(x, kernel, bias=None, *, config: Conv3x3Config | None = None, interpret=None):
    """conv3x3(x) + bias, stride 1, padding 1. x [N, H, W, C] (fp16/bf16); kernel [3, 3, C, O]
    (HWIO) and bias [O] are cast to x's dtype; products accumulate in float32 (the split-K
    partial sums are rounded to x's dtype before they are added, in float32). Returns
    [N, H, W, O] in x's dtype. Raises ValueError for shapes outside the kernel's scope
    (`supports`)."""
    config = _checked(x.shape, kernel, bias, x.dtype, config)
    return _conv(input_planes(x, config.planes), kernel, bias, x.shape, config, interpret)


@functools.partial(jax.jit, static_argnames=("x_shape", "config", "interpret"))
def conv3x3_hopper_planes(planes, kernel, bias=None, *, x_shape, config=None, interpret=None):
    """`conv3x3_hopper` of an input x [N, H, W, C] (`x_shape`) given as its planes, as
    `input_planes(x)` lays them out ("channels": [N (H + 2) W, 3 C]), e.g. written by the
    GroupNorm kernel before the convolution (`group_norm(planes=True)`)."""
    x_shape = tuple(x_shape)
    config = _checked(x_shape, kernel, bias, planes.dtype, config)
    n, h, w, c = x_shape
    if config.planes != "channels" or planes.shape != (n * (h + 2) * w, 3 * c):
        raise ValueError(
            f"conv3x3_hopper_planes: want the planes of x {x_shape} side by side in the "
            f"channels, [{n * (h + 2) * w}, {3 * c}], with config.planes='channels'; got "
            f"{planes.shape} and {config.planes!r}"
        )
    return _conv(planes, kernel, bias, x_shape, config, interpret)


def _conv(planes, kernel, bias, x_shape, config: Conv3x3Config, interpret):
    n, h, w, c = x_shape
    o = kernel.shape[3]
    interpret = resolve_interpret(interpret)
    dtype = planes.dtype
    m = n * h * w
    stages, bk, bn, splits = config.stages, config.block_k, config.block_n, config.splits
    k_steps = 9 * c // bk // splits
    w2 = kernel.astype(dtype).reshape(9 * c, o)
    in_t, out_t = hopper_smem_transforms(bk, dtype), hopper_smem_transforms(bn, dtype)
    scratch = [
        plgpu.SMEM((stages, COMPUTE_WARPGROUPS, CONSUMER_M, bk), dtype, transforms=in_t),  # x
        plgpu.SMEM((stages, bk, bn), dtype, transforms=out_t),  # w
        plgpu.SMEM((COMPUTE_WARPGROUPS, CONSUMER_M, bn), dtype, transforms=out_t),  # partials
        # full: the slot's two x boxes (one per consumer) and its w tile
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS + 1, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),  # free
    ]
    kernel_fn = functools.partial(
        _kernel,
        batch=n,
        height=h,
        width=w,
        channels=c,
        block_n=bn,
        block_k=bk,
        stages=stages,
        k_steps=k_steps,
        delay_release=config.delay_release,
        planes=config.planes,
        interpret=interpret,
    )
    partials = plgpu.kernel(
        kernel_fn,
        out_type=jax.ShapeDtypeStruct((splits, m, o), dtype),
        scratch_types=scratch,
        grid=(m // TILE_M, o // bn, splits),
        grid_names=("m", "n", "k"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        interpret=mosaic_interpret_params(interpret),
        kernel_name="sdjax_conv3x3_hopper",
    )(planes, w2)
    out = partials.astype(jnp.float32).sum(0)
    if bias is not None:
        out = out + bias.astype(dtype).astype(jnp.float32)
    return out.astype(dtype).reshape(n, h, w, o)


def conv3x3_reference(x, kernel, bias=None):
    """conv3x3(x) + bias in float32 (stride 1, padding 1), in x's dtype: x [N, H, W, C],
    kernel [3, 3, C, O] (HWIO)."""
    out = lax.conv_general_dilated(
        x.astype(jnp.float32),
        kernel.astype(jnp.float32),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)
