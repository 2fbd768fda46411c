"""Fused GroupNorm (+ SiLU / GELU) over channels-last activations, as Pallas (Triton) kernels.

x [N, H, W, C] is viewed, for free, as [N, S, G, cpg] (S = H*W spatial rows, G groups of
cpg = C / G channels). A tile is [block_rows, groups, cpg_pad] with cpg_pad the next power of
two, so the UNet's 10, 20, 30, 40, 60 and 80 channels per group become masked blocks of 16,
32, 32, 64, 64 and 128 lanes.

Three plans (`Config.mode`):
  split  1. statistics: programs over spatial chunks, each reading its rows once and writing a
            partial (mean, M2) per group: float32, shifted by the chunk's first tile's mean.
         2. normalize: programs over spatial chunks, in reverse order so that the tail that the
            statistics pass left in L2 is read first. Each program combines the partials
            (Chan's parallel formula; or XLA combines them once when there are many), then
            writes act(x * a + b) with a = scale * rstd, b = bias - mean * a.
         With `last_combine`, the statistics program that arrives last for its sample (an
         atomic count) combines the partials instead, and the normalize reads one set
         (measured 18% slower at 2x64x64x320 on the H100: the combine becomes a serial tail).
  fused  one program per (sample, block of groups) reads its groups twice (the second read
         mostly from L2) and writes once: one launch, for the small latency-bound shapes.
  cooperative  one launch of the split plan's programs, all resident at once (at most one
         per SM): each writes its partial statistics, arrives on its sample's counter and
         waits until every program of the sample has arrived (a grid barrier per sample),
         then combines the sample's partials and normalizes the rows it read, now in L2. One
         launch and no combine launch, where split takes two or three. GPU only: interpret
         mode runs programs one after another, so a program would wait for ever; there it
         runs the split plan's two kernels, the same arithmetic.

  columns  the split plan over contiguous [rows, C padded] tiles instead of [rows, groups,
         channels padded]: per-channel partial sums, merged into groups by XLA, then per-
         channel a, b. A group's channels are a run of cpg * 2 bytes (20 at 320 channels),
         which bounds the split plan's loads to 2-4 halves; here every load can be 16 bytes.
         Not yet measured on the GPU (results README, item 134).

`Config.prefetch` (split and fused): a program issues all of its tile loads before it uses
any (split: the normalize program before it combines the partials; fused: it reads its groups
once and normalizes them from registers), so that their latencies overlap. The table takes it
per shape where it measured faster (`experiments/bench_norm.py --sweep_plans prefetch`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from custom_calls._common import next_power_of_2, num_sms, resolve_interpret

Activation = Literal[None, "silu", "gelu", "gelu_tanh"]
MODES = ("split", "fused", "cooperative", "columns")
# Config.prefetch: the most tiles a program loads at once (~4K fp32 elements a tile, 16-32
# registers a thread each at 8 warps, 32-64 at 4).
PREFETCH_MAX_TILES = 4
_ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh")
_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Block sizes. Row counts are spatial positions (H*W rows of C channels)."""

    mode: Literal["split", "fused", "cooperative"] = "split"
    block_rows: int = 8  # rows per tile (power of two)
    # split: rows per statistics program (a multiple of block_rows); cooperative: rows per
    # program, whose count N * ceil(S / stats_rows) may not exceed the device's SMs
    stats_rows: int = 64
    norm_rows: int = 64  # split: rows per normalize program (a multiple of block_rows)
    combine_in_kernel: bool = True  # split: normalize programs combine the partials themselves
    # split, combined by XLA: "chan", the two-pass form (mean, then deviations: two dependent
    # reductions and their element-wise glue), or "sums", one pass of two sibling sums that
    # XLA can emit as one reduction, the normalize kernel finishing M2 = sum - N * mean^2
    xla_combine: Literal["chan", "sums"] = "chan"
    block_groups: int = 32  # fused: groups per program (power of two)
    num_warps: int = 4
    # split: the statistics program that arrives last for its sample (an atomic count per
    # sample) combines the sample's partials, so that each normalize program reads one set
    # instead of combining them all again (combine_in_kernel) or XLA combining them in
    # extra launches. No program waits for another: the combine runs in whichever is last.
    last_combine: bool = False
    # split: each statistics and normalize program loads all of its tiles before it uses any
    # (the loop unrolled; at most PREFETCH_MAX_TILES tiles a program), the normalize program
    # before it combines the partials, so that their memory latencies overlap instead of
    # adding up: a program is only 2-4 tiles, and the few resident programs per SM (one to
    # four of 4-8 warps) hide little of a tile's latency by themselves. fused: the program
    # loads its groups' tiles once, all at first, and normalizes them from registers (one
    # read instead of two), where they are at most PREFETCH_MAX_TILES tiles (else as without).
    prefetch: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Config: unknown {self.mode=}")
        if self.xla_combine not in ("chan", "sums"):
            raise ValueError(f"Config: unknown {self.xla_combine=}")
        for f in ("block_rows", "block_groups", "num_warps"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Config: {f}={v} must be a power of two")
        checked = {"split": ("stats_rows", "norm_rows"), "columns": ("stats_rows", "norm_rows"),
                   "cooperative": ("stats_rows",)}  # fmt: skip
        for f in checked.get(self.mode, ()):
            if getattr(self, f) % self.block_rows:
                raise ValueError(
                    f"Config: {f}={getattr(self, f)} must be a multiple of {self.block_rows=}"
                )
        if self.prefetch:
            if self.mode not in ("split", "fused"):
                raise ValueError("Config: prefetch is a split- or fused-plan option")
            for f in ("stats_rows", "norm_rows") if self.mode == "split" else ():
                if getattr(self, f) // self.block_rows > PREFETCH_MAX_TILES:
                    raise ValueError(
                        f"Config: prefetch holds every tile of a program in registers: "
                        f"{f} // block_rows must be <= {PREFETCH_MAX_TILES}"
                    )


def heuristic_config(shape, dtype, *, groups: int = 32) -> Config:
    """Block sizes for x [N, ..., C]: a first guess from counting bytes and programs.

    Not yet swept on the H100: `experiments/bench_norm.py --sweep=...` times the alternatives.
    """
    del dtype
    n, s, c = shape[0], math.prod(shape[1:-1]), shape[-1]
    cp = next_power_of_2(c // groups)
    if n * s * c <= 1 << 20:  # latency-bound: one launch, one program per (sample, group)
        return Config(mode="fused", block_rows=max(1, min(4096 // cp, next_power_of_2(s))),
                      block_groups=1)  # fmt: skip
    return split_config(shape, groups=groups)


def split_config(shape, *, groups: int = 32) -> Config:
    """`heuristic_config`'s split plan, whatever the size (`group_statistics` needs one)."""
    n, s, c = shape[0], math.prod(shape[1:-1]), shape[-1]
    cp, gp = next_power_of_2(c // groups), next_power_of_2(groups)
    row = gp * cp  # padded elements per spatial row
    block_rows = max(1, min(4096 // row, next_power_of_2(s)))
    # About 16K elements a program, and at most about 2048 programs.
    rows = max(block_rows, 16384 // row, next_power_of_2(-(-n * s // 2048)))
    rows = min(rows, next_power_of_2(s))
    return Config(mode="split", block_rows=block_rows, stats_rows=rows, norm_rows=rows,
                  combine_in_kernel=-(-s // rows) <= 32)  # fmt: skip


def split_equivalent(config: Config) -> Config:
    """A cooperative config as the split plan: the same programs' rows and the same arithmetic
    in two launches (statistics, then normalize with the partials combined in-kernel)."""
    if config.mode != "cooperative":
        return config
    return dataclasses.replace(config, mode="split", norm_rows=config.stats_rows,
                               combine_in_kernel=True, last_combine=False)  # fmt: skip


# Per-shape configs measured on the GPU (`experiments/bench_norm.py --sweep`, device kernel
# time), keyed by `shape_key`. Shapes not in it get `heuristic_config`.
TUNING_PATH = pathlib.Path(__file__).parent / "tuning" / "group_norm.json"


def shape_key(shape, dtype, groups: int) -> str:
    """'NxSxC:groups:<bits>bit' (S = H*W): the table's key. fp16 and bf16 share configs."""
    n, s, c = shape[0], math.prod(shape[1:-1]), shape[-1]
    return f"{n}x{s}x{c}:{groups}:{8 * jnp.dtype(dtype).itemsize}bit"


@functools.cache
def tuned_table() -> dict:
    """{shape_key: Config fields} from `TUNING_PATH` (empty if absent)."""
    if not TUNING_PATH.exists():
        return {}
    return json.loads(TUNING_PATH.read_text()).get("configs", {})


def tuned_config(shape, dtype, *, groups: int = 32) -> Config:
    """The measured config for this shape; else one measured at the same spatial size and
    channels for another batch (the nearest): a config's blocks and programs are per sample,
    so another batch only changes the grid (a guided UNet's shared first layers run at half
    the measured batch: `sdjax.models.unet`); else `heuristic_config`."""
    table = tuned_table()
    entry = table.get(shape_key(shape, dtype, groups))
    if entry is None:
        n = shape[0]
        rest = shape_key((1, *shape[1:]), dtype, groups).split("x", 1)[1]
        others = sorted((abs(int(k.split("x", 1)[0]) - n), k) for k in table
                        if k.split("x", 1)[1] == rest)  # fmt: skip
        entry = table[others[0][1]] if others else None
    return Config(**entry) if entry else heuristic_config(shape, dtype, groups=groups)


# ------------------------------------------------------------------------------------------
# Element-wise helpers, float32 (erf has no Triton lowering in Pallas, so it is written out).
# ------------------------------------------------------------------------------------------


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2) + e, with
# t = 1 / (1 + p z), z >= 0, |e| < 1.5e-7.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_SQRT_HALF = 0.7071067811865476
_LOG2_E = 1.4426950408889634


def _gelu_erf_division(y):
    """The same A&S GELU as first written: erf with a division and a sign select, then
    0.5 y (1 + erf). Kept for the ablation (`ACTIVATION_FORM = "division"`)."""
    a = jnp.abs(y * _SQRT_HALF)
    t = 1.0 / (1.0 + _ERF_P * a)
    c = _ERF_A
    poly = t * (c[0] + t * (c[1] + t * (c[2] + t * (c[3] + t * c[4]))))
    erf = 1.0 - poly * jnp.exp(-a * a)
    return 0.5 * y * (1.0 + jnp.where(y < 0, -erf, erf))


# Which forms `activate` traces for silu and gelu: "rsqrt" (`_silu`, `_gelu_erf`: the
# reciprocals as rsqrt(.)^2, one special-function instruction each) or "division" (the forms
# as first written, whose divisions compile to a reciprocal and its refinement). Read at trace
# time; only `experiments/ablate_activation.py` changes it.
ACTIVATION_FORMS = ("division", "rsqrt")
ACTIVATION_FORM = "rsqrt"


def _silu(y):
    """y * sigmoid(y), the sigmoid's reciprocal as rsqrt(1 + exp(-y))^2 (finite for finite y:
    exp(-y) overflows to inf below y = -88, and y * 0 = 0)."""
    r = lax.rsqrt(1.0 + jnp.exp(-y))
    return y * (r * r)


def _gelu_erf(y):
    """The exact (erf) GELU, 0.5 y (1 + erf(y / sqrt 2)), in float32 through A&S 7.1.26.

    Written for kernels' instruction counts (the GEGLU epilogue evaluates it on every output):
    erf is odd, so y * erf(y / sqrt 2) = |y| * erf(|y| / sqrt 2) and, with q the A&S term,
    gelu(y) = relu(y) - 0.5 |y| q: no sign select. t is 1 / (1 + p |y| / sqrt 2) as rsqrt(.)^2,
    one special-function instruction where a division is a reciprocal and its refinement, and
    exp(-y^2 / 2) an exp2 with the constants folded. |error| < 4e-7 against float64 erf on
    [-12, 12] (in float32 on the CPU; the GPU's approximate rsqrt and exp2 add ~1e-7 relative).
    """
    a = jnp.abs(y)
    r = lax.rsqrt(1.0 + (_ERF_P * _SQRT_HALF) * a)
    t = r * r
    h = [0.5 * c for c in _ERF_A]  # the 0.5 of 0.5 |y| q, folded into the coefficients
    poly = t * (h[0] + t * (h[1] + t * (h[2] + t * (h[3] + t * h[4]))))
    e = jnp.exp2(y * y * (-0.5 * _LOG2_E))
    return jnp.maximum(y, 0.0) - (a * e) * poly


def activate(y, activation: Activation):
    """The activation in float32, with the same code in and out of kernels."""
    if activation is None:
        return y
    division = ACTIVATION_FORM == "division"
    if activation == "silu":
        return y / (1.0 + jnp.exp(-y)) if division else _silu(y)
    if activation == "gelu":
        return _gelu_erf_division(y) if division else _gelu_erf(y)
    if activation == "gelu_tanh":
        return 0.5 * y * (1.0 + jnp.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    raise ValueError(f"unknown activation {activation!r}; choose from {_ACTIVATIONS}")


# ------------------------------------------------------------------------------------------
# Kernels. Refs first, then keyword-only statics.
# ------------------------------------------------------------------------------------------


def _conjunction(masks, shape):
    """The conjunction of `masks` broadcast to `shape`; None where there are none, so that
    unmasked shapes pay for no mask."""
    mask = None
    for m in masks:
        m = jnp.broadcast_to(m, shape)
        mask = m if mask is None else mask & m
    return mask


def _masked_load(view, masks, eviction=None):
    """view as float32, and the mask of real elements (`_conjunction` of `masks`)."""
    mask = _conjunction(masks, view.shape)
    x = plgpu.load(view, mask=mask, other=None if mask is None else 0.0, eviction_policy=eviction)
    return x.astype(jnp.float32), mask


def _tile(ref, n, r0, row_end, g0, *, rows, bg, cp, groups, cpg, row_mask, eviction=None):
    """Loads x[n, r0:r0+rows, g0:g0+bg, :cp] as float32, and the mask of real elements."""
    masks = []
    if row_mask:
        masks.append((r0 + jnp.arange(rows) < row_end)[:, None, None])
    if groups % bg:
        masks.append((g0 + jnp.arange(bg) < groups)[None, :, None])
    if cp != cpg:
        masks.append((jnp.arange(cp) < cpg)[None, None, :])
    view = ref.at[n, pl.ds(r0, rows), pl.ds(g0, bg), pl.ds(0, cp)]
    return _masked_load(view, masks, eviction)


def _chunk_stats(load, r_start, r_end, *, rows, cpg, tiles=None, loaded=None, axes=(0, 2)):
    """Shifted single-pass sums over tiles of rows [r_start, r_end) of each group: the tiles'
    `axes` are reduced (rows and a group's cpg channels; the columns plan: rows, cpg 1).

    Returns (shift, lo, M2), float32 [groups]: the mean is shift + lo, with shift the first
    tile's mean. x - shift is exact for data near its mean, so a mean of 1000 with a std of
    0.01 keeps its variance, and the normalized value (x - shift) - lo keeps its digits.
    tiles: a static tile count covering [r_start, r_end) (rows past r_end masked by `load`):
    every tile is loaded before any is used (Config.prefetch), else a loop loads one at a time.
    loaded: those tiles' (x, mask), already loaded by the caller (which keeps them).
    """
    if loaded is None and tiles:
        loaded = [load(r_start + t * rows) for t in range(tiles)]
    x0, mask0 = loaded[0] if loaded else load(r_start)
    valid0 = jnp.minimum(r_end - r_start, rows).astype(jnp.float32) * cpg
    shift = jnp.sum(x0, axis=axes) / valid0

    def centered(x, mask):
        d = x - jnp.expand_dims(shift, axes)
        return d if mask is None else jnp.where(mask, d, 0.0)

    def body(t, acc):
        d = centered(*load(r_start + t * rows))
        return acc[0] + d, acc[1] + d * d

    d0 = centered(x0, mask0)
    if loaded:
        s1, s2 = d0, d0 * d0
        for x, mask in loaded[1:]:
            d = centered(x, mask)
            s1, s2 = s1 + d, s2 + d * d
    else:
        num_tiles = (r_end - r_start + rows - 1) // rows
        s1, s2 = jax.lax.fori_loop(1, num_tiles, body, (d0, d0 * d0))
    s1, s2 = jnp.sum(s1, axis=axes), jnp.sum(s2, axis=axes)
    count = (r_end - r_start).astype(jnp.float32) * cpg
    return shift, s1 / count, jnp.maximum(s2 - s1 * s1 / count, 0.0)


def _affine(scale_ref, bias_ref, g0, stats, total, eps, *, bg, cp, groups, cpg):
    """float32 (shift [bg, 1], a [bg, cp], b [bg, cp]) with out = (x - shift) * a + b."""
    shift, lo, m2 = stats
    rstd = jax.lax.rsqrt(m2 / total + eps)
    g = jnp.arange(bg)[:, None] + g0
    mask = (g < groups) & (jnp.arange(cp)[None, :] < cpg)
    sl = (pl.ds(g0, bg), pl.ds(0, cp))
    scale = plgpu.load(scale_ref.at[sl], mask=mask, other=0.0).astype(jnp.float32)
    bias = plgpu.load(bias_ref.at[sl], mask=mask, other=0.0).astype(jnp.float32)
    a = scale * rstd[:, None]
    return shift[:, None], a, bias - lo[:, None] * a


def _normalized(x, affine, activation, dtype):
    """act((x - shift) * a + b) of a float32 tile, in `dtype`."""
    shift, a, b = affine
    return activate((x - shift[None]) * a[None] + b[None], activation).astype(dtype)


def _write(view, x, mask, affine, activation):
    y = _normalized(x, affine, activation, view.dtype)
    plgpu.store(view, y, mask=mask, eviction_policy="evict_first")


# The planes output (`group_norm(planes=True)`): o_ref [N, (H + 2) W, 3, G, cpg], plane kx at
# padded row yy and column x holding the output pixel (yy - 1, x + kx - 1), zero outside the
# image (`conv3x3_hopper.input_planes`'s layout, "channels": [N (H + 2) W, 3 C] is a bitcast).
# Output pixel s = y W + x of an image goes to plane kx's flattened row s + W + 1 - kx. The
# pixel that leaves its image row there (x = W - 1 for plane 0, x = 0 for plane 2) lands on
# the neighbouring padded row's border column, which must be zero: it is written as zero. The
# borders no pixel lands on are `_zero_plane_borders`'.
PLANE_BORDER_BLOCK = 8  # rows of one border store: W is a multiple of 8 (the convolution's
# scope, `conv3x3_hopper.supports`), and Triton's blocks are powers of two


def _write_planes(o_ref, n, r0, x, mask, affine, activation, *, rows, g0, bg, cp, width):
    """Normalizes a tile of rows r0 : r0 + rows and writes it to the three planes."""
    y = _normalized(x, affine, activation, o_ref.dtype)
    column = lax.rem(r0 + jnp.arange(rows), width)[:, None, None]
    for kx, edge in ((0, width - 1), (1, None), (2, 0)):
        value = y if edge is None else jnp.where(column == edge, jnp.zeros_like(y), y)
        plane = jnp.int32(kx)  # a traced index (interpret mode's store wants an array)
        view = o_ref.at[n, pl.ds(r0 + width + 1 - kx, rows), plane, pl.ds(g0, bg), pl.ds(0, cp)]
        plgpu.store(view, value, mask=mask, eviction_policy="evict_first")


def _zero_plane_borders(o_ref, n, *, g0, bg, cp, groups, cpg, height, width, share=(0, 1)):
    """Zeros where no pixel lands: each plane's padded rows 0 and H + 1, plane 0's first
    column of padded row 1 and plane 2's last column of padded row H. share (i, k): this
    program makes the stores j with j % k == i (the split plan spreads a sample's borders
    over its programs: one program writing them all took 13.7 us where the normalize took
    5.8, H100, 2x16x16x2560, s23d)."""
    masks = []
    if groups % bg:
        masks.append((g0 + jnp.arange(bg) < groups)[None, :, None])
    if cp != cpg:
        masks.append((jnp.arange(cp) < cpg)[None, None, :])

    def zeros(start, rows, kx):
        view = o_ref.at[n, pl.ds(start, rows), jnp.int32(kx), pl.ds(g0, bg), pl.ds(0, cp)]
        plgpu.store(view, jnp.zeros(view.shape, o_ref.dtype), mask=_conjunction(masks, view.shape))

    zero = jnp.int32(0)  # traced starts (see _fused_kernel)
    bottom = (height + 1) * width
    stores = [(start + r, PLANE_BORDER_BLOCK, kx) for kx in range(3) for start in (0, bottom)
              for r in range(0, width, PLANE_BORDER_BLOCK)]  # fmt: skip
    stores += [(width, 1, 0), (bottom - 1, 1, 2)]
    index, count = share
    for j, (start, rows, kx) in enumerate(stores):
        if count == 1:
            zeros(zero + start, rows, kx)
        else:
            pl.when(index == j % count)(functools.partial(zeros, zero + start, rows, kx))


def _program_part(x_ref, *, parts, part_rows, rows, groups, cpg):
    """(n, p, r_start, r_end, tile) of the program for part p of sample n: its rows
    [r_start, r_end) and tile(r0, eviction=None), the masked load of rows r0 .. r0 + rows."""
    n, p = pl.program_id(0) // parts, pl.program_id(0) % parts
    s = x_ref.shape[1]
    gp, cp = next_power_of_2(groups), next_power_of_2(cpg)
    r_start = p * part_rows
    r_end = jnp.minimum(r_start + part_rows, s)
    row_mask = s % part_rows != 0 or part_rows % rows != 0

    def tile(r0, eviction=None):
        return _tile(x_ref, n, r0, r_end, 0, rows=rows, bg=gp, cp=cp, groups=groups, cpg=cpg,
                     row_mask=row_mask, eviction=eviction)  # fmt: skip

    return n, p, r_start, r_end, tile


def _program_partial(x_ref, *, parts, part_rows, rows, groups, cpg, prefetch=False):
    """This statistics program's (sample n, part p, its partial (shift, lo, M2) [Gp])."""
    n, p, r_start, r_end, tile = _program_part(x_ref, parts=parts, part_rows=part_rows,
                                               rows=rows, groups=groups, cpg=cpg)  # fmt: skip
    tiles = -(-part_rows // rows) if prefetch else None
    return n, p, _chunk_stats(tile, r_start, r_end, rows=rows, cpg=cpg, tiles=tiles)


def _stats_kernel(x_ref, shift_ref, lo_ref, m2_ref, *, parts, part_rows, rows, groups, cpg,
                  prefetch=False):  # fmt: skip
    n, p, stats = _program_partial(x_ref, parts=parts, part_rows=part_rows, rows=rows,
                                   groups=groups, cpg=cpg, prefetch=prefetch)  # fmt: skip
    for ref, value in zip((shift_ref, lo_ref, m2_ref), stats, strict=True):
        ref[n, p, :] = value


def _stats_last_combine_kernel(
    x_ref, _count_in, shift_ref, lo_ref, m2_ref, fshift_ref, flo_ref, fm2_ref, count_ref,
    *, parts, part_rows, rows, groups, cpg, interpret,
):  # fmt: skip
    """`_stats_kernel`, then the sample's last program to arrive combines its partials into
    fshift/flo/fm2 [N, 1, Gp]. count_ref [N] (int32, zero on entry: aliased to _count_in)
    counts the arrivals. On the GPU the partials are written by atomic exchanges (release
    ordered) and the arrival is an acquire-release atomic at GPU scope, so the last program
    reads them all. Interpret mode runs the programs one after another and has neither the
    atomic exchange nor the barrier: plain stores there."""
    n, p, stats = _program_partial(x_ref, parts=parts, part_rows=part_rows, rows=rows,
                                   groups=groups, cpg=cpg)  # fmt: skip
    s, gp = x_ref.shape[1], next_power_of_2(groups)
    for ref, value in zip((shift_ref, lo_ref, m2_ref), stats, strict=True):
        if interpret:
            ref[n, p, :] = value
        else:
            plgpu.atomic_xchg(ref, (n, p, pl.ds(0, gp)), value)
    if not interpret:
        plgpu.debug_barrier()  # every thread's partials are out before the arrival
    arrived = plgpu.atomic_add(count_ref, (n,), jnp.int32(1))

    @pl.when(arrived == parts - 1)
    def _last():
        combined = _combine(shift_ref, lo_ref, m2_ref, n, parts=parts, part_rows=part_rows,
                            s=s, gp=gp, cpg=cpg)  # fmt: skip
        for ref, value in zip((fshift_ref, flo_ref, fm2_ref), combined, strict=True):
            ref[n, 0, :] = value


def _combine(shift_ref, lo_ref, m2_ref, n, *, parts, part_rows, s, gp, cpg, sums=False):
    """Chan et al.'s parallel combine of sample n's partials, relative to partial 0's shift.

    sums: XLA already summed the partials (`_sum_partials`): lo_ref holds the mean relative to
    partial 0's shift and m2_ref the sum of M2 + count * rel^2, from which M2 follows."""
    if sums:
        shift, lo = shift_ref[n, 0, :], lo_ref[n, 0, :]
        return shift, lo, jnp.maximum(m2_ref[n, 0, :] - float(s * cpg) * lo * lo, 0.0)
    pp = next_power_of_2(parts)
    p_idx = jnp.arange(pp)
    mask = jnp.broadcast_to((p_idx < parts)[:, None], (pp, gp)) if pp != parts else None
    sl = (n, pl.ds(0, pp), pl.ds(0, gp))
    shifts, los, m2s = (
        plgpu.load(r.at[sl], mask=mask, other=None if mask is None else 0.0)
        for r in (shift_ref, lo_ref, m2_ref)
    )
    shift = shift_ref[n, 0, :]
    counts = (jnp.clip(s - p_idx * part_rows, 0, part_rows) * cpg).astype(jnp.float32)[:, None]
    rel = (shifts - shift[None, :]) + los  # each partial's mean minus `shift`: small, exact
    lo = jnp.sum(counts * rel, axis=0) / float(s * cpg)
    dev = rel - lo[None, :]
    return shift, lo, jnp.sum(m2s, axis=0) + jnp.sum(counts * dev * dev, axis=0)


def _normalize_kernel(
    x_ref,
    shift_ref,
    lo_ref,
    m2_ref,
    scale_ref,
    bias_ref,
    o_ref,
    *,
    parts,
    part_rows,
    blocks,
    block_rows_prog,
    rows,
    groups,
    cpg,
    eps,
    activation,
    sums=False,
    prefetch=False,
    planes=None,
):
    """planes: None, or the image (height, width): o_ref holds the planes (`_write_planes`),
    whose borders the sample's programs write, a share each."""
    pid = pl.num_programs(0) - 1 - pl.program_id(0)  # reverse: L2 still holds the tail
    n, q = pid // blocks, pid % blocks
    s = x_ref.shape[1]
    gp, cp = next_power_of_2(groups), next_power_of_2(cpg)
    r_start = q * block_rows_prog
    r_end = jnp.minimum(r_start + block_rows_prog, s)
    row_mask = s % block_rows_prog != 0 or block_rows_prog % rows != 0

    def tile(t):
        r0 = r_start + t * rows
        x, mask = _tile(x_ref, n, r0, r_end, 0, rows=rows, bg=gp, cp=cp, groups=groups, cpg=cpg,
                        row_mask=row_mask, eviction="evict_first")  # fmt: skip
        return r0, x, mask

    # prefetch: every tile of the program in flight before the partials are combined
    loaded = [tile(t) for t in range(-(-block_rows_prog // rows))] if prefetch else None
    stats = _combine(
        shift_ref, lo_ref, m2_ref, n, parts=parts, part_rows=part_rows, s=s, gp=gp, cpg=cpg,
        sums=sums,
    )  # fmt: skip
    affine = _affine(
        scale_ref, bias_ref, 0, stats, float(s * cpg), eps, bg=gp, cp=cp, groups=groups, cpg=cpg
    )

    def write(r0, x, mask):
        if planes:
            _write_planes(o_ref, n, r0, x, mask, affine, activation, rows=rows, g0=0, bg=gp,
                          cp=cp, width=planes[1])  # fmt: skip
            return
        view = o_ref.at[n, pl.ds(r0, rows), pl.ds(0, gp), pl.ds(0, cp)]
        _write(view, x, mask, affine, activation)

    if planes:
        _zero_plane_borders(o_ref, n, g0=0, bg=gp, cp=cp, groups=groups, cpg=cpg,
                            height=planes[0], width=planes[1], share=(q, blocks))  # fmt: skip
    if prefetch:
        for r0, x, mask in loaded:
            write(r0, x, mask)
        return

    def body(t, carry):
        write(*tile(t))
        return carry

    jax.lax.fori_loop(0, (r_end - r_start + rows - 1) // rows, body, 0)


def _cooperative_kernel(
    x_ref, scale_ref, bias_ref, _count_in, o_ref, shift_ref, lo_ref, m2_ref, count_ref,
    *, parts, part_rows, rows, groups, cpg, eps, activation,
):  # fmt: skip
    """One program of `Config(mode="cooperative")`: sample n's rows [p * part_rows, ...).

    1. its partial statistics into shift/lo/m2 [N, parts, Gp] (atomic exchanges: written at
       the L2, where the other programs read them), then an arrival on count_ref[n] (int32,
       zero on entry: aliased to _count_in; acquire-release at GPU scope);
    2. waits until count_ref[n] == parts: every program of sample n has written its partial
       (all programs are resident at once, `group_norm` checks their count against the SMs);
    3. combines the sample's partials (`_combine`, as the split plan's normalize kernel does)
       and normalizes its rows, read again (from L2: the loads of step 1 keep them there).
    """
    n, p, r_start, r_end, tile = _program_part(x_ref, parts=parts, part_rows=part_rows,
                                               rows=rows, groups=groups, cpg=cpg)  # fmt: skip
    s = x_ref.shape[1]
    gp, cp = next_power_of_2(groups), next_power_of_2(cpg)
    partial = _chunk_stats(lambda r0: tile(r0, "evict_last"), r_start, r_end, rows=rows, cpg=cpg)
    for ref, value in zip((shift_ref, lo_ref, m2_ref), partial, strict=True):
        plgpu.atomic_xchg(ref, (n, p, pl.ds(0, gp)), value)
    plgpu.debug_barrier()  # every thread's partials are out before the arrival
    arrived = plgpu.atomic_add(count_ref, (n,), jnp.int32(1)) + 1
    # an atomic add of 0 reads the counter at the L2 (a plain load could be served stale)
    jax.lax.while_loop(lambda c: c < parts,
                       lambda c: plgpu.atomic_add(count_ref, (n,), jnp.int32(0)),
                       arrived)  # fmt: skip
    stats = _combine(shift_ref, lo_ref, m2_ref, n, parts=parts, part_rows=part_rows, s=s, gp=gp,
                     cpg=cpg)  # fmt: skip
    affine = _affine(
        scale_ref, bias_ref, 0, stats, float(s * cpg), eps, bg=gp, cp=cp, groups=groups, cpg=cpg
    )

    def body(t, carry):
        r0 = r_start + t * rows
        x, mask = tile(r0, "evict_first")
        view = o_ref.at[n, pl.ds(r0, rows), pl.ds(0, gp), pl.ds(0, cp)]
        _write(view, x, mask, affine, activation)
        return carry

    jax.lax.fori_loop(0, (r_end - r_start + rows - 1) // rows, body, 0)


def _fused_kernel(x_ref, scale_ref, bias_ref, o_ref, *, rows, bg, groups, cpg, eps, activation,
                  prefetch=False, planes=None):  # fmt: skip
    """planes: None, or the image (height, width): o_ref holds the planes (`_write_planes`)
    and each program writes its groups' borders."""
    gb = -(-groups // bg)
    n, g0 = pl.program_id(0) // gb, (pl.program_id(0) % gb) * bg
    s = x_ref.shape[1]
    cp = next_power_of_2(cpg)
    tile = functools.partial(
        _tile, x_ref, n, rows=rows, bg=bg, cp=cp, groups=groups, cpg=cpg, row_mask=s % rows != 0
    )
    zero = jnp.int32(0)
    num_tiles = -(-s // rows)

    def write(r0, x, mask, affine):
        if planes:
            _write_planes(o_ref, n, r0, x, mask, affine, activation, rows=rows, g0=g0, bg=bg,
                          cp=cp, width=planes[1])  # fmt: skip
        else:
            view = o_ref.at[n, pl.ds(r0, rows), pl.ds(g0, bg), pl.ds(0, cp)]
            _write(view, x, mask, affine, activation)

    if planes:
        _zero_plane_borders(o_ref, n, g0=g0, bg=bg, cp=cp, groups=groups, cpg=cpg,
                            height=planes[0], width=planes[1])  # fmt: skip
    if prefetch and num_tiles <= PREFETCH_MAX_TILES:  # one read, kept in registers
        # (traced starts: a static one past the end of an odd size fails the slice check)
        loaded = [tile(zero + t * rows, s, g0, eviction="evict_first") for t in range(num_tiles)]
        stats = _chunk_stats(None, zero, zero + s, rows=rows, cpg=cpg, loaded=loaded)
        affine = _affine(scale_ref, bias_ref, g0, stats, float(s * cpg), eps, bg=bg, cp=cp,
                         groups=groups, cpg=cpg)  # fmt: skip
        for t, (x, mask) in enumerate(loaded):
            write(zero + t * rows, x, mask, affine)
        return
    stats = _chunk_stats(
        lambda r0: tile(r0, s, g0, eviction="evict_last"), zero, zero + s, rows=rows, cpg=cpg
    )
    affine = _affine(
        scale_ref, bias_ref, g0, stats, float(s * cpg), eps, bg=bg, cp=cp, groups=groups, cpg=cpg
    )

    def body(t, carry):
        x, mask = tile(t * rows, s, g0, eviction="evict_first")
        write(t * rows, x, mask, affine)
        return carry

    jax.lax.fori_loop(0, -(-s // rows), body, 0)


def _column_tile(ref, n, r0, row_end, *, rows, cp, c, row_mask, eviction=None):
    """x[n, r0:r0+rows, :cp] of x [N, S, C] as float32, and the mask of real elements (None
    where all are): the columns plan's contiguous tile."""
    masks = []
    if row_mask:
        masks.append((r0 + jnp.arange(rows) < row_end)[:, None])
    if cp != c:
        masks.append((jnp.arange(cp) < c)[None, :])
    return _masked_load(ref.at[n, pl.ds(r0, rows), pl.ds(0, cp)], masks, eviction)


def _column_stats_kernel(x_ref, shift_ref, lo_ref, m2_ref, *, parts, part_rows, rows, c):
    """Per-channel (shift, lo, M2) [Cp] of one chunk of rows: `_chunk_stats` with the channel
    as the group (shift: the first tile's column means)."""
    n, p = pl.program_id(0) // parts, pl.program_id(0) % parts
    s, cp = x_ref.shape[1], next_power_of_2(c)
    r_start = p * part_rows
    r_end = jnp.minimum(r_start + part_rows, s)
    row_mask = s % part_rows != 0 or part_rows % rows != 0

    def load(r0):
        return _column_tile(x_ref, n, r0, r_end, rows=rows, cp=cp, c=c, row_mask=row_mask)

    stats = _chunk_stats(load, r_start, r_end, rows=rows, cpg=1, axes=(0,))
    for ref, value in zip((shift_ref, lo_ref, m2_ref), stats, strict=True):
        ref[n, p, :] = value


def _column_affine(shift, lo, m2, scale, bias, *, part_rows, s, groups, eps):
    """XLA, once: the per-channel partials [N, P, Cp] -> per-channel (shift, a, b) [N, Cp] with
    out = (x - shift) * a + b. Chan's combine over the chunks per channel, then over each
    group's channels (equal counts), all relative to reference values near the data, so that
    a large mean keeps a small variance's digits."""
    c = scale.shape[0]
    n, parts, cp = shift.shape
    cpg = c // groups
    # per channel (a group of one): each channel's reference (its first chunk's shift), its
    # mean less that, its M2; [N, C] each
    base, mean_rel, m2_c = (t[:, 0, :c] for t in _combine_partials(
        shift, lo, m2, parts=parts, part_rows=part_rows, s=s, cpg=1))  # fmt: skip
    base_g = base.reshape(n, groups, cpg)
    ref_g = base_g[..., :1]  # the group's reference: its first channel's
    rel_c = (base_g - ref_g) + mean_rel.reshape(n, groups, cpg)  # channel means less ref_g
    mean_g = jnp.mean(rel_c, axis=-1, keepdims=True)
    m2_g = jnp.sum(m2_c.reshape(n, groups, cpg), axis=-1, keepdims=True) + float(s) * jnp.sum(
        (rel_c - mean_g) ** 2, axis=-1, keepdims=True
    )
    rstd = jax.lax.rsqrt(m2_g / float(s * cpg) + eps)  # [N, G, 1]
    a = scale.astype(jnp.float32).reshape(groups, cpg) * rstd  # [N, G, cpg]
    # (x - mean) * a + bias = (x - base_c) * a + bias + (base_c - mean) * a
    b = bias.astype(jnp.float32).reshape(groups, cpg) + ((base_g - ref_g) - mean_g) * a
    pad = ((0, 0), (0, cp - c))
    return base, *(jnp.pad(t.reshape(n, c), pad) for t in (a, b))


def _column_normalize_kernel(x_ref, shift_ref, a_ref, b_ref, o_ref, *, blocks, block_rows_prog,
                             rows, c, activation):  # fmt: skip
    pid = pl.num_programs(0) - 1 - pl.program_id(0)  # reverse: L2 still holds the tail
    n, q = pid // blocks, pid % blocks
    s, cp = x_ref.shape[1], next_power_of_2(c)
    r_start = q * block_rows_prog
    r_end = jnp.minimum(r_start + block_rows_prog, s)
    row_mask = s % block_rows_prog != 0 or block_rows_prog % rows != 0
    col = jnp.arange(cp) < c if cp != c else None
    shift, a, b = (plgpu.load(r.at[n, pl.ds(0, cp)], mask=col, other=None if col is None else 0.0)
                   for r in (shift_ref, a_ref, b_ref))  # fmt: skip

    def body(t, carry):
        r0 = r_start + t * rows
        x, mask = _column_tile(x_ref, n, r0, r_end, rows=rows, cp=cp, c=c, row_mask=row_mask,
                               eviction="evict_first")  # fmt: skip
        y = activate((x - shift[None, :]) * a[None, :] + b[None, :], activation)
        view = o_ref.at[n, pl.ds(r0, rows), pl.ds(0, cp)]
        plgpu.store(view, y.astype(view.dtype), mask=mask, eviction_policy="evict_first")
        return carry

    jax.lax.fori_loop(0, (r_end - r_start + rows - 1) // rows, body, 0)


def _row_plan(config: Config, s: int) -> tuple[int, int, int, int, int]:
    """How the split and column plans cut a sample's s rows, the config's sizes clamped to a
    short sample: (rows per tile, rows per statistics program, statistics programs, rows per
    normalize program, normalize programs), per sample."""
    rows = min(config.block_rows, next_power_of_2(s))
    part_rows = max(rows, min(config.stats_rows, s))
    norm_rows = max(rows, min(config.norm_rows, s))
    return rows, part_rows, -(-s // part_rows), norm_rows, -(-s // norm_rows)


def _group_norm_columns(x, scale, bias, config, *, groups, eps, activation, interpret):
    """The columns plan: statistics kernel, XLA's combine into per-channel a and b, normalize."""
    n, c = x.shape[0], x.shape[-1]
    s = math.prod(x.shape[1:-1])
    x3 = x.reshape(n, s, c)
    rows, part_rows, parts, norm_rows, blocks = _row_plan(config, s)
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)
    stat_shape = jax.ShapeDtypeStruct((n, parts, next_power_of_2(c)), jnp.float32)
    stats = pl.pallas_call(
        functools.partial(_column_stats_kernel, parts=parts, part_rows=part_rows, rows=rows, c=c),
        out_shape=(stat_shape,) * 3,
        grid=(n * parts,),
        compiler_params=params,
        interpret=interpret,
        name="sdjax_group_norm_column_stats",
    )(x3)
    shift, a, b = _column_affine(*stats, scale, bias, part_rows=part_rows, s=s, groups=groups,
                                 eps=eps)  # fmt: skip
    cp = next_power_of_2(c)
    shift = jnp.pad(shift, ((0, 0), (0, cp - c)))
    out = pl.pallas_call(
        functools.partial(_column_normalize_kernel, blocks=blocks, block_rows_prog=norm_rows,
                          rows=rows, c=c, activation=activation),  # fmt: skip
        out_shape=jax.ShapeDtypeStruct(x3.shape, x.dtype),
        grid=(n * blocks,),
        compiler_params=params,
        interpret=interpret,
        name="sdjax_group_norm_columns",
    )(x3, shift, a, b)
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------


def _validate(x, scale, bias, groups, eps, activation):
    if x.ndim < 3:
        raise ValueError(f"group_norm wants channels-last x [N, ..., C]; got {x.shape=}")
    c = x.shape[-1]
    if groups < 1 or c % groups:
        raise ValueError(f"group_norm: channels {c=} must be a multiple of {groups=}")
    if scale.shape != (c,) or bias.shape != (c,):
        raise ValueError(
            f"group_norm: scale and bias must be [{c}]; got {scale.shape=}, {bias.shape=}"
        )
    if x.dtype not in _DTYPES:
        raise ValueError(f"group_norm: {x.dtype=} must be one of float16, bfloat16, float32")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {_ACTIVATIONS}")
    if not eps > 0:
        raise ValueError(f"group_norm: {eps=} must be positive")


def writes_planes(x_shape, config: Config) -> bool:
    """Whether `group_norm(planes=True)` writes the planes from its normalize kernel (else it
    writes the normalized map and XLA lays out the planes): the fused and split plans, whole
    tiles of rows, W a multiple of PLANE_BORDER_BLOCK."""
    if len(x_shape) != 4 or x_shape[2] % PLANE_BORDER_BLOCK:
        return False
    s = x_shape[1] * x_shape[2]
    rows, _, _, norm_rows, _ = _row_plan(config, s)
    if config.mode == "fused":
        return s % rows == 0
    return (config.mode == "split" and not config.last_combine and s % norm_rows == 0
            and norm_rows % rows == 0)  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("groups", "eps", "activation", "config", "interpret", "planes")
)
def group_norm(
    x,
    scale,
    bias,
    *,
    groups: int = 32,
    eps: float = 1e-5,
    activation: Activation = None,
    config: Config | None = None,
    interpret: bool | None = None,
    planes: bool = False,
):
    """GroupNorm over channels-last x [N, ..., C], then `activation`; statistics in float32.

    scale, bias: [C]. Returns x's shape and dtype. `config`: block sizes and plan (default:
    `tuned_config`, the GPU-measured table, else the heuristic). A cooperative config whose
    programs outnumber the device's SMs raises ValueError when given, and runs as the split
    plan when it comes from the table (measured on a GPU with more SMs).

    planes: x is [N, H, W, C] and the result is the input of a 3x3 convolution as
    `conv3x3_hopper` reads it, `conv3x3_hopper.input_planes(group_norm(x))` ([N (H + 2) W,
    3 C]): the normalize kernel writes each output tile three times, shifted, and the zero
    borders (`writes_planes`; otherwise XLA lays the planes out from the normalized map). One
    pass instead of two: the planes' own fusion reads the map and writes 3x its bytes again.
    """
    _validate(x, scale, bias, groups, eps, activation)
    explicit = config is not None
    config = config or tuned_config(x.shape, x.dtype, groups=groups)
    interpret = resolve_interpret(interpret)
    if planes:
        if x.ndim != 4:
            raise ValueError(f"group_norm(planes=True) wants x [N, H, W, C]; got {x.shape}")
        if config.mode == "cooperative":
            config = split_equivalent(config)
        if not writes_planes(x.shape, config):
            from custom_calls.conv3x3_hopper import input_planes

            y = group_norm(x, scale, bias, groups=groups, eps=eps, activation=activation,
                           config=config, interpret=interpret)  # fmt: skip
            return input_planes(y)
    n, c = x.shape[0], x.shape[-1]
    s, cpg = math.prod(x.shape[1:-1]), c // groups
    gp = next_power_of_2(groups)
    x4 = x.reshape(n, s, groups, cpg)
    scale2, bias2 = scale.reshape(groups, cpg), bias.reshape(groups, cpg)
    rows, part_rows, parts, norm_rows, blocks = _row_plan(config, s)
    out_shape = jax.ShapeDtypeStruct(x4.shape, x.dtype)
    image = None
    if planes:  # [N, (H + 2) W, 3, G, cpg]; the result [N (H + 2) W, 3 C] is a bitcast
        image = x.shape[1:3]
        out_shape = jax.ShapeDtypeStruct((n, (image[0] + 2) * image[1], 3, groups, cpg), x.dtype)

    def result(out):
        return out.reshape(-1, 3 * c) if planes else out.reshape(x.shape)

    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)
    statics = dict(rows=rows, groups=groups, cpg=cpg)

    if config.mode == "columns":
        return _group_norm_columns(x, scale, bias, config, groups=groups, eps=eps,
                                   activation=activation, interpret=interpret)  # fmt: skip
    if config.mode == "fused":
        bg = min(config.block_groups, gp)
        kernel = functools.partial(_fused_kernel, bg=bg, eps=eps, activation=activation,
                                   prefetch=config.prefetch, planes=image, **statics)  # fmt: skip
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(n * -(-groups // bg),),
            compiler_params=params,
            interpret=interpret,
            name="sdjax_group_norm_fused",
        )(x4, scale2, bias2)
        return result(out)

    stat_shape = jax.ShapeDtypeStruct((n, parts, gp), jnp.float32)
    cooperative = config.mode == "cooperative" and not interpret
    if cooperative and n * parts > (sms := num_sms()):
        if explicit:
            raise ValueError(
                f"group_norm: a cooperative launch of {n} x {parts} programs exceeds the "
                f"device's {sms} SMs (they must all be resident at once); raise stats_rows"
            )
        cooperative = False  # a table entry measured on a larger GPU: the split plan instead
    if cooperative:
        kernel = functools.partial(_cooperative_kernel, parts=parts, part_rows=part_rows,
                                   eps=eps, activation=activation, **statics)  # fmt: skip
        out, *_ = pl.pallas_call(
            kernel,
            out_shape=(out_shape, *(stat_shape,) * 3, jax.ShapeDtypeStruct((n,), jnp.int32)),
            grid=(n * parts,),
            input_output_aliases={3: 4},
            compiler_params=params,
            interpret=interpret,
            name="sdjax_group_norm_cooperative",
        )(x4, scale2, bias2, jnp.zeros((n,), jnp.int32))
        return out.reshape(x.shape)
    if config.mode == "cooperative":  # interpret mode, or too few SMs
        config = split_equivalent(config)
    if config.last_combine and parts > 1:
        final = jax.ShapeDtypeStruct((n, 1, gp), jnp.float32)
        *_, fshift, flo, fm2, _ = pl.pallas_call(
            functools.partial(_stats_last_combine_kernel, parts=parts, part_rows=part_rows,
                              interpret=bool(interpret), **statics),  # fmt: skip
            out_shape=(stat_shape,) * 3 + (final,) * 3 + (jax.ShapeDtypeStruct((n,), jnp.int32),),
            grid=(n * parts,),
            input_output_aliases={1: 6},
            compiler_params=params,
            interpret=interpret,
            name="sdjax_group_norm_stats_combined",
        )(x4, jnp.zeros((n,), jnp.int32))
        stats, parts, part_rows = (fshift, flo, fm2), 1, s
    else:
        stats = pl.pallas_call(
            functools.partial(_stats_kernel, parts=parts, part_rows=part_rows,
                              prefetch=config.prefetch, **statics),  # fmt: skip
            out_shape=(stat_shape,) * 3,
            grid=(n * parts,),
            compiler_params=params,
            interpret=interpret,
            name="sdjax_group_norm_stats",
        )(x4)
    sums = False
    if not config.combine_in_kernel and parts > 1:
        sums = config.xla_combine == "sums"
        combine = _sum_partials if sums else _combine_partials
        stats = combine(*stats, parts=parts, part_rows=part_rows, s=s, cpg=cpg)
        parts, part_rows = 1, s
    kernel = functools.partial(
        _normalize_kernel,
        parts=parts,
        part_rows=part_rows,
        blocks=blocks,
        block_rows_prog=norm_rows,
        eps=eps,
        activation=activation,
        sums=sums,
        prefetch=config.prefetch,
        planes=image,
        **statics,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(n * blocks,),
        compiler_params=params,
        interpret=interpret,
        name="sdjax_group_norm",
    )(x4, *stats, scale2, bias2)
    return result(out)


@functools.partial(jax.jit, static_argnames=("groups", "config", "interpret"))
def group_statistics(x, *, groups: int = 32, config: Config | None = None,
                     interpret: bool | None = None):  # fmt: skip
    """Per-group mean and M2 (the sum of squared deviations from it) of x [N, ..., C]: float32
    [N, groups] each, from the split plan's statistics kernel and XLA's combine of its partials.

    For GroupNorms whose input is never written whole (`sdjax.ops.group_norm_concat` takes
    the statistics of each part of a concatenation at a finer grouping and merges them).
    `config`: its split-plan fields are used (default: the tuned config if it is split, else
    `split_config`).
    """
    ones = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)  # only shapes are checked
    _validate(x, ones, ones, groups, 1.0, None)
    if config is None:
        config = tuned_config(x.shape, x.dtype, groups=groups)
    if config.mode != "split":
        config = split_config(x.shape, groups=groups)
    interpret = resolve_interpret(interpret)
    n, c = x.shape[0], x.shape[-1]
    s, cpg = math.prod(x.shape[1:-1]), c // groups
    rows, part_rows, parts, _, _ = _row_plan(config, s)
    stat_shape = jax.ShapeDtypeStruct((n, parts, next_power_of_2(groups)), jnp.float32)
    stats = pl.pallas_call(
        functools.partial(_stats_kernel, parts=parts, part_rows=part_rows, rows=rows,
                          groups=groups, cpg=cpg),  # fmt: skip
        out_shape=(stat_shape,) * 3,
        grid=(n * parts,),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="sdjax_group_norm_stats",
    )(x.reshape(n, s, groups, cpg))
    shift, lo, m2 = _combine_partials(*stats, parts=parts, part_rows=part_rows, s=s, cpg=cpg)
    return (shift + lo)[:, 0, :groups], m2[:, 0, :groups]


def group_statistics_reference(x, *, groups: int = 32):
    """`group_statistics` in plain jnp: two-pass float32 mean and M2, [N, groups] each."""
    n = x.shape[0]
    xg = x.astype(jnp.float32).reshape(n, -1, groups, x.shape[-1] // groups)
    mean = jnp.mean(xg, axis=(1, 3))
    m2 = jnp.sum(jnp.square(xg - mean[:, None, :, None]), axis=(1, 3))
    return mean, m2


def _part_counts(parts, part_rows, s, cpg) -> np.ndarray:
    """Elements per group in each statistics partial (the last one may be short): float32 [P]."""
    return np.clip(s - np.arange(parts) * part_rows, 0, part_rows).astype(np.float32) * cpg


def _combine_partials(shift, lo, m2, *, parts, part_rows, s, cpg):
    """The same combine as in the normalize kernel, by XLA once: [N, P, G] -> [N, 1, G]."""
    counts = jnp.asarray(_part_counts(parts, part_rows, s, cpg))[None, :, None]
    shift0 = shift[:, :1]
    rel = (shift - shift0) + lo
    lo_total = jnp.sum(counts * rel, axis=1, keepdims=True) / float(s * cpg)
    dev = rel - lo_total
    m2_total = jnp.sum(m2, axis=1, keepdims=True) + jnp.sum(
        counts * dev * dev, axis=1, keepdims=True
    )
    return shift0, lo_total, m2_total


def _sum_partials(shift, lo, m2, *, parts, part_rows, s, cpg):
    """The combine in one pass, for `xla_combine="sums"`: [N, P, G] -> (shift [N, P, G] as
    given, the kernel reading partial 0's; mean relative to it [N, 1, G]; sum of
    M2 + count * rel^2 [N, 1, G]). Two sibling sums over P of element-wise terms, which XLA
    can emit as one reduction kernel. rel, each partial's mean less partial 0's shift, is of
    the order of the spread of the chunk means, so M2 = sum - N * mean^2 cancels little."""
    counts = _part_counts(parts, part_rows, s, cpg)
    weights = jnp.asarray(counts / float(s * cpg))[None, :, None]
    counts = jnp.asarray(counts)[None, :, None]
    rel = (shift - shift[:, :1]) + lo
    lo_total = jnp.sum(weights * rel, axis=1, keepdims=True)
    second = jnp.sum(m2 + counts * rel * rel, axis=1, keepdims=True)
    return shift, lo_total, second


def group_norm_reference(
    x, scale, bias, *, groups: int = 32, eps: float = 1e-5, activation: Activation = None
):
    """Plain jnp in float32: corrected two-pass statistics. x [N, ..., C]; scale, bias [C].

    The centred values are re-centred by their own mean, which removes the rounding error of
    a float32 mean (mean 1000, std 0.01 otherwise loses about 3e-3 of the output).
    """
    n, c = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(n, -1, groups, c // groups)
    d = xf - jnp.mean(xf, axis=(1, 3), keepdims=True)
    d = d - jnp.mean(d, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(d), axis=(1, 3), keepdims=True)
    y = (d * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    # jax.nn's activations, not `activate`: the reference shares no code with the kernels
    reference_activations = {
        None: lambda v: v,
        "silu": jax.nn.silu,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    }
    if activation not in reference_activations:
        raise ValueError(f"unknown activation {activation!r}; choose from {_ACTIVATIONS}")
    return reference_activations[activation](y).astype(x.dtype)
