"""FlashAttention forward for Hopper (sm_90) as a Pallas Mosaic GPU kernel.

Why a second kernel: the Triton kernel (`flash_attention.py`) plateaus at ~0.20 ms for
SD1.5's 64x64 self-attention (2 x 4096 x 8 x 40) on the H100, behind cuDNN and torch SDPA
(~0.18 ms), whatever its block sizes (see `experiments/results/tune_attention_*`). Triton
through Pallas has no warp specialization and no bulk tensor copies (TMA), so the softmax of
one tile cannot hide behind the matrix products of the next. Mosaic GPU exposes both:

- one *producer* warpgroup streams K and V tiles with TMA into a ring of `stages` shared-memory
  buffers, each guarded by a "full" barrier (TMA done) and a "free" barrier (consumers done);
- two *consumer* warpgroups each own `block_q` query rows (wgmma's M is 64 per warpgroup) and
  run S = Q K^T and O += P V on the tensor cores (wgmma), with the online softmax in
  registers (base 2, the scale folded into one multiply-add per logit);
- with `pingpong`, a barrier shared by the two consumers staggers them by half a step, so
  one warpgroup's softmax runs while the other's matrix products occupy the tensor cores
  (the schedule of FlashAttention-3, Shah et al. 2024);
- with `half_exp` (fp16 only), the exponentials run on packed fp16 pairs (`ex2.approx.f16x2`,
  two per instruction of the special-function unit). Counting suggested that unit bounds
  SD's small heads (at head dim 48 a logit costs ~4*48 tensor-core FLOPs but one
  exponential; an SM does ~4096 such FLOPs per clock against 16 exponentials); measured on
  the H100 it does not where the ping-pong runs (no gain, `experiments/results/README.md`,
  prediction 26), so the tuning table uses it only where it timed faster. The logits, less
  their row maximum, are rounded to fp16 before the exponential instead of P after it; P's
  row sums add its fp16 values in fp32 (`half_sum`: each tile's sums in fp16, packed adds,
  then accumulated over the tiles in fp32).

Three more schedule options, each tested and each measured not to beat the ping-pong kernel at
SD1.5's 64x64 self-attention (H100, `experiments/ablate_attention.py`, where leaving stages out
showed the two consumers' alternating softmaxes, mostly the exponentials, to be the bound):
- `tree_reduce`: the row max and sum by halving the columns before each thread's chain (+1%);
- `mma_row_sum`: P's row sums as a second wgmma against a tile of ones (no gain under the
  ping-pong; without it, 4% ahead of the 2-stage ping-pong config but 1.5% behind the
  3-stage one in the sweep);
- `overlap_qk`: step i + 1's Q K^T issued before step i's softmax (FlashAttention-3's
  intra-warpgroup overlap; 1.4-1.6x slower, most likely serialized wgmmas).

Options against the softmax's own cost (fifteenth and sixteenth sessions;
`experiments/results/README.md`, items 148-156 and 161):
- `lazy_sum`: P's row sums kept as per-thread partial sums over 8 columns (halving the tile's
  columns), rescaled each step like O; the lanes' shuffles that finish a row sum run once, at
  the end, instead of every step. -3.4% at SD1.5's 64x64 self-attention (138.2 -> 133.5 us on
  the H100), -3.7 to -4.1% at SD2.1's 96x96: in the tuning table there.
- `split_exp`: the tile's logits pinned (an optimization barrier) before its exponentials,
  for ptxas to find each exponential's input ready (results README, item 161).
- `poly_exp`: one register pair in `poly_exp` of each score tile exponentiated on the FMA
  pipe by a polynomial (`exp2_poly`: 2**round(x) into the exponent bits, 2**frac by a degree-3
  polynomial) instead of the special-function unit (FlashAttention-4's remedy where that
  unit's 16 results per clock per SM bound the exponentials). Measured slower at every share
  on the H100 (+3.6 us at a third, +73 at a half): here the unit's throughput is not the
  bound. An option, off.

Head dims that are not a multiple of `head_align` (64 by default; SD's 40, 80, 160) are
zero-padded to `d_pad` (the next multiple) *in memory*, and the output is sliced back: extra copies of q, k, v and
the output that the Triton kernel avoids with masks. The reason: Mosaic GPU places a TMA
window only at column offsets that are multiples of its 64-column shared-memory tile
(128-byte swizzle), which a head at column h*40 of a [B, L, H*40] row is not (its layout
inference refuses the dynamic offset); and the tensor cores' 128-byte swizzle wants 64
columns. Zero columns add nothing to Q K^T and give zero output columns. The copies are
part of every timing we quote.

Scope: fp16 and bf16; Lq a multiple of block_q and Lk a multiple of block_kv; D <= 256. Where
Lq is not a multiple of a program's consumers * block_q rows (three consumers at Lq = 4096),
the last program's surplus consumers repeat the last query tile and write nothing.
`supports()` says why a shape is out of scope; `sdjax.ops` then uses the Triton kernel.
Off GPU the kernel runs in Mosaic GPU's interpret mode (tests; very slow, small shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from custom_calls._common import HOPPER_COMPUTE_WARPGROUPS as COMPUTE_WARPGROUPS
from custom_calls._common import HOPPER_DTYPES as SUPPORTED_DTYPES
from custom_calls._common import HOPPER_MIN_REGISTERS as MIN_REGISTERS
from custom_calls._common import HOPPER_PRODUCER_REGISTERS as PRODUCER_REGISTERS
from custom_calls._common import HOPPER_REGISTER_FILE as REGISTER_FILE
from custom_calls._common import HOPPER_SMEM_LIMIT_BYTES as SMEM_LIMIT_BYTES
from custom_calls._common import mosaic_interpret_params, resolve_interpret
from custom_calls.flash_attention import MAX_HEAD_DIM, shape_key, tuned_table, validate

LOG2_E = math.log2(math.e)
WGMMA_M = 64  # rows of one warpgroup's wgmma
D_ALIGN = 64  # default head-dim padding: 64 fp16 = 128 bytes, the widest TMA/wgmma swizzle
HEAD_ALIGNS = (16, 32, 64)  # columns of one swizzled tile: 32-, 64- or 128-byte swizzle in fp16
ONES_COLS = 16  # columns of the ones tile (mma_row_sum): the narrowest swizzled tile
# overlap_qk: two fp32 score tiles of block_q * block_kv per warpgroup (128 threads) must fit
# the consumer's registers beside O and P: 8192 elements is 64 registers a tile.
OVERLAP_MAX_TILE = 8192
# Consumer warpgroups per block (`HopperConfig.consumers`). Four were tried and dropped: 112
# registers a consumer (what a 640-thread block can split) failed to run at head dim 160, and
# three, with more registers, already measured slower than two (results README, item 127).
CONSUMER_COUNTS = (2, 3)
# With three consumers each gets fewer registers (`registers`: 160), so its fp32 score tile
# must be smaller: at most 64 registers a thread (64 x 128), beside O, P and the row statistics.
CONSUMER_MAX_TILE = {2: None, 3: 8192}
THREADS_PER_WARPGROUP = 128
# lazy_sum: columns of the per-thread partial row sums, one wgmma layout tile (a thread holds
# two of a row's eight; the four lanes of a row finish the sum at the end).
LAZY_SUM_COLS = 8
# exp2_poly: 2**x = 2**j * 2**f, j = round(x), f = x - j in [-0.5, 0.5]. 2**f by the degree-3
# polynomial below (a relative minimax fit on [-0.5, 0.5], fitted by iteratively reweighted
# least squares; max relative error 7.5e-5, under the fp16 rounding of P, 4.9e-4); j comes from
# rounding with a magic number (x + 1.5 * 2**23 holds round(x) in its low mantissa bits) and
# is added into the exponent bits. x is clamped at -125 so that 2**j * p stays a normal float.
EXP2_POLY = (0.9999281, 0.69326097, 0.24261054, 0.05517132)  # c0 + c1 f + c2 f^2 + c3 f^3
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23
EXP2_POLY_MIN = -125.0
MANTISSA_BITS = 23


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopperConfig:
    """Block sizes of one launch. A program handles consumers * block_q query rows of one head."""

    block_q: int = 64  # query rows per consumer warpgroup, a multiple of 64
    block_kv: int = 128  # K/V rows per step, a multiple of 64
    stages: int = 2  # K/V tiles in flight (shared-memory ring buffers)
    pingpong: bool = True  # stagger the two consumers (softmax under the other's matmuls)
    # Head dims are padded to a multiple of this many columns, the width of one swizzled
    # shared-memory tile: 64 (128-byte swizzle, the fastest layout for TMA and wgmma) pads
    # 40 -> 64 and 80 -> 128; 16 (32-byte swizzle) pads 40 -> 48 and leaves 80 and 160 as they
    # are (less padding and fewer copies, a narrower swizzle).
    head_align: int = D_ALIGN
    # Exponentials on packed fp16 pairs (fp16 inputs; bf16 ones keep fp32 exponentials: their
    # P is rounded to bf16, and a fp16 P would need another conversion). See the module doc.
    half_exp: bool = False
    # With half_exp: each K/V tile's row sums of P in fp16 (packed adds), the total in fp32.
    half_sum: bool = False
    # Row max and row sum of each [block_q, block_kv] tile by halving its columns (independent
    # element-wise ops, down to 8 columns), then the per-thread chain and the lane shuffles;
    # without it, each thread's share of a row is reduced as one dependent chain.
    tree_reduce: bool = False
    # Row sums of P on the tensor cores: a second wgmma per step, P times a [block_kv, 16]
    # tile of ones (its own accumulator, rescaled like O), instead of each thread summing its
    # values and the lanes shuffling. The ones arrive by TMA once per program.
    mma_row_sum: bool = False
    # Issue step i + 1's Q K^T before step i's softmax, so that the tensor cores compute it
    # while the warpgroup's other units run the softmax (FlashAttention-3's intra-warpgroup
    # overlap). Two score tiles are live at once: registers limit it to block_q * block_kv
    # <= 8192 per warpgroup. Without the ping-pong.
    overlap_qk: bool = False
    # Pin the softmax's results (rescaled O, row sums, P in fp16) before the consumer tells
    # the other that it is done with the softmax (`lax.optimization_barrier`), so that the
    # compiler cannot sink any of their arithmetic past that barrier, into the turn that
    # should be the tensor cores' (jax's own Hopper attention example does the same, and
    # notes that the order there moves its timing).
    pin_softmax: bool = False
    # Consumer warpgroups per block, each with its own block_q query rows, all reading the
    # same K/V ring. Two is FlashAttention-3's ping-pong pair. Three let two consumers'
    # softmaxes share each scheduler (one warp's max -> exp -> sum chain leaves issue slots
    # and the exponential unit idle that another warp's softmax can take) while the third's
    # products run; they take smaller score tiles (registers: `CONSUMER_MAX_TILE`) and no
    # ping-pong (its barrier pairs two consumers). Measured 13-20% slower than the tuned pair
    # at SD1.5's 64x64 self-attention (results README, item 127): an option, off.
    consumers: int = 2
    # One register pair in `poly_exp` of each fp32 score tile exponentiated by `exp2_poly` on
    # the FMA pipe instead of the special-function unit (0: none). 4 moves a quarter of the
    # exponentials, where counting put the balance between the two units' costs (the
    # polynomial ~9 issue slots a value; the unit 1 slot and 8 clocks a warp); measured slower
    # at every share (module doc). Not with half_exp (its exponentials are fp16 pairs).
    poly_exp: int = 0
    # P's row sums as per-thread partials over LAZY_SUM_COLS columns, rescaled each step, the
    # lanes' shuffles once at the end (fp32 exponentials; not with mma_row_sum or half_exp).
    lazy_sum: bool = False
    # All of a score tile's logits (the scale-and-subtract multiply-adds) pinned by
    # `lax.optimization_barrier` before its exponentials, so that the code ptxas schedules
    # has every exponential's input ready, rather than each exponential right behind the
    # multiply-add it waits on (Nsight Compute, s15g: `wait` in 59% of the exponentials'
    # stall samples). Costs registers: the tile's logits all live at once.
    split_exp: bool = False

    def __post_init__(self):
        if self.block_q % WGMMA_M:
            raise ValueError(f"block_q={self.block_q} must be a multiple of {WGMMA_M}")
        if self.block_kv % 64:
            raise ValueError(f"block_kv={self.block_kv} must be a multiple of 64")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2")
        if self.head_align not in HEAD_ALIGNS:
            raise ValueError(f"head_align={self.head_align} must be one of {HEAD_ALIGNS}")
        if self.half_sum and not self.half_exp:
            raise ValueError("half_sum needs half_exp")
        if self.half_sum and self.mma_row_sum:
            raise ValueError("half_sum and mma_row_sum both set how P's row sums are taken")
        if self.poly_exp < 0 or self.poly_exp == 1:
            raise ValueError(f"poly_exp={self.poly_exp}: 0 (off) or one register in N >= 2")
        if self.poly_exp and self.half_exp:
            raise ValueError("poly_exp replaces fp32 exponentials: not with half_exp")
        if self.lazy_sum and (self.half_exp or self.mma_row_sum):
            raise ValueError("lazy_sum keeps fp32 row sums in registers: not with half_exp or "
                             "mma_row_sum")
        if self.consumers not in CONSUMER_COUNTS:
            raise ValueError(f"consumers={self.consumers} must be one of {CONSUMER_COUNTS}")
        if self.pingpong and self.consumers != 2:
            raise ValueError("the ping-pong pairs two consumers: set pingpong=False")
        max_tile = CONSUMER_MAX_TILE[self.consumers]
        if max_tile and self.block_q * self.block_kv * (2 if self.overlap_qk else 1) > max_tile:
            raise ValueError(
                f"{self.consumers} consumers have registers for a score tile of {max_tile} "
                f"elements: block_q * block_kv{' * 2 (overlap_qk)' * self.overlap_qk} is more"
            )
        if self.overlap_qk and self.pingpong:
            raise ValueError("overlap_qk replaces the ping-pong: set pingpong=False")
        if self.overlap_qk and self.block_q * self.block_kv > OVERLAP_MAX_TILE:
            raise ValueError(
                f"overlap_qk keeps two score tiles in registers: block_q * block_kv must be "
                f"<= {OVERLAP_MAX_TILE}; got {self.block_q} * {self.block_kv}"
            )


# Fields that `config_overrides` replaces in every config `tuned_config` returns.
_OVERRIDES: dict = {}


@contextlib.contextmanager
def config_overrides(**changes):
    """Within the block, `tuned_config` returns every shape's config with these fields
    replaced (e.g. `lazy_sum=False`): one knob changed at every shape, for a same-process A/B
    of a whole model (`experiments/ablation.py --hopper_row`). Programs traced inside the block
    keep the configs they were traced with (`sdjax.ops` passes the config to the jitted
    kernel, so a retrace sees the change). Raises ValueError for an unknown field, and
    `tuned_config` raises it for a shape whose config the change makes invalid."""
    fields = {f.name for f in dataclasses.fields(HopperConfig)}
    if unknown := sorted(set(changes) - fields):
        raise ValueError(f"config_overrides: unknown HopperConfig fields {unknown}")
    before = dict(_OVERRIDES)
    _OVERRIDES.update(changes)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(before)


def tuned_config(q_shape, kv_shape, dtype) -> HopperConfig:
    """The config `experiments/tune_attention.py --kernels=flash_hopper` recorded for this
    shape (same keys as the Triton kernel's table), else the defaults; with the fields of any
    `config_overrides` in force replaced."""
    entry = tuned_table("flash_hopper").get(shape_key(q_shape, kv_shape[1], dtype))
    config = HopperConfig(**entry) if entry else HopperConfig()
    return dataclasses.replace(config, **_OVERRIDES) if _OVERRIDES else config


def padded_head_dim(head_dim: int, align: int = D_ALIGN) -> int:
    return -(-head_dim // align) * align


def registers(consumers: int) -> tuple[int, int]:
    """(consumer, producer) registers per thread after `set_max_registers`: 232 and 40 for two
    consumers (the kernels' shared budget), 160 and 24 for three.

    `setmaxnreg` only moves registers between the block's warpgroups: a consumer's increase
    waits until the producer's decrease has freed enough of what the block was launched with,
    so the split must fit the launch allocation, threads * (the register file / threads,
    rounded down to a multiple of 8), not the whole file: with four consumers (640 threads,
    96 each at launch) 120 a consumer would wait for ever. Multiples of 8, as `setmaxnreg`
    wants; the producer only issues copies."""
    threads = (consumers + 1) * THREADS_PER_WARPGROUP
    budget = REGISTER_FILE // threads // 8 * 8 * threads
    producer = PRODUCER_REGISTERS if consumers == COMPUTE_WARPGROUPS else MIN_REGISTERS
    consumer = (budget - producer * THREADS_PER_WARPGROUP) // (consumers * THREADS_PER_WARPGROUP)
    return consumer // 8 * 8, producer


def smem_bytes(config: HopperConfig, head_dim: int, dtype) -> int:
    """Shared memory of the Q tiles, the K/V ring and (mma_row_sum) the ones tiles."""
    rows = config.consumers * config.block_q + 2 * config.stages * config.block_kv
    ones = config.consumers * config.block_kv * ONES_COLS if config.mma_row_sum else 0
    return (rows * padded_head_dim(head_dim, config.head_align) + ones) * jnp.dtype(dtype).itemsize


def supports(q_shape, kv_shape, dtype, config: HopperConfig | None = None) -> str | None:
    """None if the kernel can run these shapes with `config` (default: the tuned one), else the
    reason it cannot."""
    config = config or tuned_config(q_shape, kv_shape, dtype)
    _, q_len, heads, head_dim = q_shape
    kv_len = kv_shape[1]
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (fp16/bf16 only)"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    if q_len % config.block_q:
        return f"Lq={q_len} is not a multiple of block_q={config.block_q}"
    if kv_len % config.block_kv:
        return f"Lk={kv_len} is not a multiple of block_kv={config.block_kv}"
    if (smem := smem_bytes(config, head_dim, dtype)) > SMEM_LIMIT_BYTES:
        return f"its tiles need {smem} bytes of shared memory (> {SMEM_LIMIT_BYTES}); lower stages"
    return None


def _scores(q_ref, k_ref, *, block_q: int, block_kv: int, interpret: bool, meanwhile,
            before=None):  # fmt: skip
    """q_ref @ k_ref.T in fp32: [block_q, d_pad] x [block_kv, d_pad] -> [block_q, block_kv].

    On the GPU a wgmma on the two shared-memory tiles; `meanwhile()` runs after the wgmma is
    issued and before its result is awaited (`before()`, if given, just before it is issued).
    Returns the scores, or (*meanwhile's tuple, scores) when meanwhile returns a tuple. Mosaic
    GPU's interpret mode in jax 0.10 has no wgmma on a transposed operand (0.11 has), so
    there it is a plain fp32 dot.
    """

    def joined(extra, s):
        return s if extra is None else (*extra, s)

    if interpret:
        if before is not None:
            before()
        extra = meanwhile()
        return joined(extra, lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32))  # fmt: skip

    def product(s_ref):
        k_t = (
            k_ref.transpose((1, 0))
            if hasattr(k_ref, "transpose")
            else plgpu.transpose_ref(k_ref, (1, 0))
        )  # jax 0.11 / 0.10 spellings
        if before is not None:
            before()
        plgpu.wgmma(s_ref, q_ref, k_t)
        extra = meanwhile()
        return joined(extra, s_ref[...])

    return pl.run_scoped(product, plgpu.ACC((block_q, block_kv), jnp.float32))


def _accumulate(acc, a, b_ref, *, interpret: bool):
    """acc + a @ b_ref: on the GPU a wgmma with `a` in registers, accumulating in place.

    Mosaic GPU's interpret mode (jax 0.10/0.11) has neither `run_state` nor a wgmma whose
    A operand is in registers, so there the product is a plain fp32 dot of the same
    operands, added to acc: the same sum in another order.
    """
    if interpret:
        return acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)

    return pl.run_state(product)(plgpu.ACC.init(acc))


# Stages that `experiments/ablate_attention.py` leaves out to see what each costs (timing
# only: the results are wrong). Read at trace time; empty in every other use.
_ABLATE: frozenset[str] = frozenset()
ABLATABLE = ("max", "exp", "sum", "rescale", "pv", "pingpong")


def _halve_columns(x, op: str, width: int):
    """x [rows, cols] (wgmma layout) reduced by max or sum to [rows, width]: the columns halved
    with element-wise ops (at multiples of 8: whole layout tiles), no lane shuffles."""
    while x.shape[1] > width:
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        x = jnp.maximum(a, b) if op == "max" else a + b
    return x


def _row_reduce(x, op: str, *, tree: bool):
    """max or sum over axis 1 of x [rows, cols] (fp32, wgmma layout) -> [rows]. With `tree`,
    halve the columns with element-wise ops first (at multiples of 8: whole layout tiles)."""
    if tree:
        x = _halve_columns(x, op, LAZY_SUM_COLS)
    return x.max(axis=1) if op == "max" else x.sum(axis=1)


def exp2_poly(x):
    """2**x of float32 x by the FMA pipe's kind of operations (adds, multiply-adds, an integer
    shift and add): the polynomial of `EXP2_POLY`, relative error <= 7.5e-5 for x in
    [-125, 126); x below -125 gives 2**-125. The kernel's `poly_exp` runs the same sequence as
    PTX (`_EXP2_POLY_PTX`), rounding with the magic number, which XLA would fold away here
    ((x + c) - c -> x): jnp.round rounds the same way (to nearest, ties to even)."""
    x = jnp.maximum(x.astype(jnp.float32), EXP2_POLY_MIN)
    j = jnp.round(x)
    f = x - j  # in [-0.5, 0.5]
    c0, c1, c2, c3 = (jnp.float32(c) for c in EXP2_POLY)
    p = ((c3 * f + c2) * f + c1) * f + c0
    two_j = lax.shift_left(j.astype(jnp.int32), jnp.int32(MANTISSA_BITS))
    return lax.bitcast_convert_type(lax.bitcast_convert_type(p, jnp.int32) + two_j, jnp.float32)


def _f32_hex(value: float) -> str:
    """A PTX float32 literal (0fXXXXXXXX) of value."""
    return "0f" + np.float32(value).view(np.uint32).item().to_bytes(4, "big").hex().upper()


# exp2_poly as one PTX block for one float32 ($1 -> $0). The movs between .f32 and .b32
# registers are free (ptxas renames them).
_EXP2_POLY_PTX = f"""{{
.reg .f32 xc, t, j, f, p;
.reg .b32 tb, pb;
max.f32 xc, $1, {_f32_hex(EXP2_POLY_MIN)};
add.rn.f32 t, xc, {_f32_hex(ROUND_MAGIC)};
sub.rn.f32 j, t, {_f32_hex(ROUND_MAGIC)};
sub.rn.f32 f, xc, j;
fma.rn.f32 p, f, {_f32_hex(EXP2_POLY[3])}, {_f32_hex(EXP2_POLY[2])};
fma.rn.f32 p, p, f, {_f32_hex(EXP2_POLY[1])};
fma.rn.f32 p, p, f, {_f32_hex(EXP2_POLY[0])};
mov.b32 tb, t;
shl.b32 tb, tb, {MANTISSA_BITS};
mov.b32 pb, p;
add.s32 pb, pb, tb;
mov.b32 $0, pb;
}}"""


def _exp2_mixed(x, every: int, *, interpret: bool):
    """2**x of fp32 x [block_q, block_kv] (wgmma layout): one register pair in `every` by
    `exp2_poly` on the FMA pipe, the others by the special-function unit (ex2.approx).

    Interpret mode: the same split by columns (pairs of columns, as a register holds them).
    """
    if interpret:
        pair = lax.broadcasted_iota(jnp.int32, x.shape, 1) // 2
        return jnp.where(pair % every == every - 1, exp2_poly(x), jnp.exp2(x))
    from jax.experimental.mosaic import gpu as mgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout=plgpu.Layout.WGMMA),
    )
    def mixed(ctx, a):
        del ctx
        unit = mgpu.FragmentedArray._lift_fast_instr("ex2.approx.ftz.f32")
        poly = mgpu.FragmentedArray._lift_fast_instr(
            lambda v: llvm.inline_asm(ir.F32Type.get(), [v], _EXP2_POLY_PTX, "=f,f")
        )
        count = itertools.count()  # _pointwise visits the registers once each, in order

        def one(register):
            return poly(register) if next(count) % every == every - 1 else unit(register)

        return a._pointwise(one)

    return mixed(x)


def _exp2_f16(x, *, interpret: bool):
    """2**x of fp16 x [block_q, block_kv] (wgmma layout), two values per instruction.

    Mosaic GPU's own exp2 has no fp16 fast path, so this is its packed PTX instruction
    through `plgpu.inline_mgpu`. Interpret mode: jnp.exp2 in fp16 (fp32 inside, rounded).
    """
    if interpret:
        return jnp.exp2(x)
    from jax.experimental.mosaic import gpu as mgpu

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout=plgpu.Layout.WGMMA),
    )
    def ex2(ctx, a):
        del ctx
        return a._pointwise(
            mgpu.FragmentedArray._lift_fast_packed_instr("ex2.approx.f16x2", "ex2.approx.f16")
        )

    return ex2(x)


def _accumulate_with_sums(acc, sums, a, b_ref, ones_ref, *, interpret: bool):
    """(acc + a @ b_ref, sums + a @ ones_ref): two wgmmas issued together, awaited once."""
    if interpret:
        return (acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32),
                sums + jnp.dot(a, ones_ref[...], preferred_element_type=jnp.float32))  # fmt: skip

    def product(refs):
        acc_ref, sums_ref = refs
        plgpu.wgmma(acc_ref, a, b_ref)
        plgpu.wgmma(sums_ref, a, ones_ref)

    return pl.run_state(product)((plgpu.ACC.init(acc), plgpu.ACC.init(sums)))


def _kernel(
    q_ref, k_ref, v_ref, *refs,
    d_pad, scale_log2, block_q, block_kv, stages, kv_steps, pingpong, interpret,
    head_offsets=(0, 0, 0), half_exp=False, half_sum=False, tree=False, mma_sum=False,
    overlap=False, pin=False, consumers=COMPUTE_WARPGROUPS, poly=0, lazy=False, split=False,
):  # fmt: skip
    """One program: consumers * block_q query rows of one (batch, head); consumers + 1
    warpgroups (the last one the producer).

    q_ref, o_ref: [B, Lq, H, d_pad]; k_ref, v_ref: [B, Lk, H, d_pad]. q_smem [consumers,
    block_q, d_pad];
    k_smem, v_smem [stages, block_kv, d_pad]; the barriers as named in the module doc. `refs`:
    (o_ref, the scratch) or, with mma_sum, (ones_ref [block_kv, 16], o_ref, the scratch with
    ones_smem [consumers, block_kv, 16] after v_smem and its barrier ones_full last).
    head_offsets: where head h of q, k and v sits in its ref (packed qkv [B, L, 3H, d_pad]:
    (0, H, 2H), the same buffer passed three times).
    """
    if mma_sum:
        (ones_ref, o_ref, q_smem, k_smem, v_smem, ones_smem,
         q_full, k_full, v_full, k_free, v_free, turn, ones_full) = refs  # fmt: skip
    else:
        o_ref, q_smem, k_smem, v_smem, q_full, k_full, v_full, k_free, v_free, turn = refs
    q_off, k_off, v_off = head_offsets
    ablate = _ABLATE
    pingpong = pingpong and "pingpong" not in ablate
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")

    def rows(ref, start, n, head_offset=0):
        """Rows [start, start + n) of this (batch, head + head_offset): a [n, d_pad] slice."""
        return ref.at[batch, pl.ds(start, n), head + head_offset]

    def stagger():  # both consumers meet here (ping-pong schedule)
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    consumer_registers, producer_registers = registers(consumers)
    q_len = o_ref.shape[1]

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(consumer_registers, action="increase")
        q_tile = q_smem.at[wg]
        q_tile_start = (lax.axis_index("q_tiles") * consumers + wg) * block_q
        # Past the end (Lq not a multiple of the program's rows): repeat the last tile, so
        # that this consumer still takes part in every K/V slot's barriers; write nothing.
        q_start = jnp.minimum(q_tile_start, q_len - block_q)
        plgpu.copy_gmem_to_smem(rows(q_ref, q_start, block_q, q_off), q_tile, q_full.at[wg])
        if mma_sum:
            plgpu.copy_gmem_to_smem(ones_ref, ones_smem.at[wg], ones_full.at[wg])
            plgpu.barrier_wait(ones_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])

        def in_layout(x, layout):  # interpret mode has no layouts (jax 0.10 no layout_cast)
            return x if interpret else plgpu.layout_cast(x, layout)

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m_init = 0.0 if "max" in ablate else -jnp.inf  # (ablated: a fixed maximum)
        m_i = in_layout(jnp.full((block_q,), m_init, jnp.float32), row_layout)
        l_i = in_layout(jnp.zeros((block_q,), jnp.float32), row_layout)
        acc = in_layout(jnp.zeros((block_q, d_pad), jnp.float32), plgpu.Layout.WGMMA)
        if mma_sum:  # every column of it is the row sum: it stands in for l_i
            l_i = in_layout(jnp.zeros((block_q, ONES_COLS), jnp.float32), plgpu.Layout.WGMMA)
        if lazy:  # per-thread partial row sums: summed across their columns at the end
            l_i = in_layout(jnp.zeros((block_q, LAZY_SUM_COLS), jnp.float32),
                            plgpu.Layout.WGMMA)  # fmt: skip
        if poly:
            exp2 = functools.partial(_exp2_mixed, every=poly, interpret=interpret)
        else:
            exp2 = jnp.exp2
        if pingpong:
            pl.when(wg == 1)(stagger)  # consumer 1 starts half a step behind consumer 0

        def softmax_pv(i, s, acc, m_i, l_i):
            """The online softmax of step i's scores s, then O += P V (awaited)."""
            slot = lax.rem(i, stages)
            if "max" in ablate:
                m_new = m_i
            else:
                m_new = jnp.maximum(m_i, _row_reduce(s, "max", tree=tree) * scale_log2)
            alpha = jnp.exp2(m_i - m_new)
            logits = s * scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0])  # <= 0
            if split:  # every multiply-add before the first exponential (config doc)
                logits = lax.optimization_barrier(logits)
            if half_exp:  # P in fp16 straight from the exponential
                p = _exp2_f16(logits.astype(jnp.float16), interpret=interpret)
                if not mma_sum:
                    row_sum = p.sum(axis=1).astype(jnp.float32) if half_sum else (
                        _row_reduce(p.astype(jnp.float32), "sum", tree=tree))  # fmt: skip
            elif mma_sum:  # (the row sums come with P V)
                p = (logits if "exp" in ablate else exp2(logits)).astype(q_ref.dtype)
            else:
                p = logits if "exp" in ablate else exp2(logits)
                if lazy:
                    row_sum = _halve_columns(p, "sum", LAZY_SUM_COLS)
                else:
                    row_sum = l_i if "sum" in ablate else _row_reduce(p, "sum", tree=tree)
                p = p.astype(q_ref.dtype)
            if mma_sum:
                l_i = l_i * lax.broadcast_in_dim(alpha, l_i.shape, [0])
            elif lazy:
                l_i = l_i * lax.broadcast_in_dim(alpha, l_i.shape, [0]) + row_sum
            else:
                l_i = l_i * alpha + row_sum
            if "rescale" not in ablate:
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            if pin:  # all of the softmax before the barriers below
                acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
            if pingpong:
                plgpu.barrier_arrive(turn)  # softmax done: the other may use the tensor cores
            plgpu.barrier_wait(v_full.at[slot])
            if pingpong:
                plgpu.barrier_wait(turn)  # until the other's matmul is issued

            if mma_sum:
                acc, l_i = _accumulate_with_sums(acc, l_i, p, v_smem.at[slot],
                                                 ones_smem.at[wg], interpret=interpret)  # fmt: skip
            elif "pv" not in ablate:
                acc = _accumulate(acc, p, v_smem.at[slot], interpret=interpret)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        def scores(i, meanwhile):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_full.at[slot])
            s = _scores(q_tile, k_smem.at[slot], block_q=block_q, block_kv=block_kv,
                        interpret=interpret, meanwhile=meanwhile)  # fmt: skip
            plgpu.barrier_arrive(k_free.at[slot])
            return s

        def step(i, carry):
            acc, m_i, l_i = carry
            return softmax_pv(i, scores(i, stagger), acc, m_i, l_i)

        def overlapped_step(i, carry):
            """Step i's softmax and P V while the tensor cores compute step i + 1's scores
            (FlashAttention-3's intra-warpgroup overlap): returns those scores, awaited."""
            acc, m_i, l_i, s = carry
            acc, m_i, l_i, s_next = _scores(
                q_tile, k_smem.at[lax.rem(i + 1, stages)], block_q=block_q, block_kv=block_kv,
                interpret=interpret, meanwhile=lambda: softmax_pv(i, s, acc, m_i, l_i),
                before=lambda: plgpu.barrier_wait(k_full.at[lax.rem(i + 1, stages)]),
            )  # fmt: skip
            plgpu.barrier_arrive(k_free.at[lax.rem(i + 1, stages)])
            return acc, m_i, l_i, s_next

        if overlap:
            carry = (acc, m_i, l_i, scores(0, lambda: None))
            acc, m_i, l_i, s = lax.fori_loop(0, kv_steps - 1, overlapped_step, carry)
            acc, m_i, l_i = softmax_pv(kv_steps - 1, s, acc, m_i, l_i)
        else:
            acc, m_i, l_i = lax.fori_loop(0, kv_steps, step, (acc, m_i, l_i))
        if pingpong:
            pl.when(wg == 0)(stagger)  # balance consumer 1's extra meeting at the start
        if mma_sum:  # the columns are equal: their max is the row sum, exactly
            l_i = l_i.max(axis=1)
        if lazy:
            l_i = l_i.sum(axis=1)
        out = acc * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
        q_tile[...] = out.astype(o_ref.dtype)  # the query tile's buffer is free: reuse it
        plgpu.commit_smem()

        @pl.when(q_tile_start < q_len)
        def _write():
            plgpu.copy_smem_to_gmem(q_tile, rows(o_ref, q_start, block_q))
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(producer_registers, action="decrease")

        def fetch(i, slot):
            plgpu.copy_gmem_to_smem(rows(k_ref, i * block_kv, block_kv, k_off),
                                    k_smem.at[slot], k_full.at[slot])  # fmt: skip
            plgpu.copy_gmem_to_smem(rows(v_ref, i * block_kv, block_kv, v_off),
                                    v_smem.at[slot], v_full.at[slot])  # fmt: skip

        for i in range(stages):  # fill the ring
            fetch(i, i)

        @pl.loop(stages, kv_steps)
        def _refill(i):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            fetch(i, slot)

        for i in range(kv_steps - stages, kv_steps):  # drain: every phase is waited once
            plgpu.barrier_wait(k_free.at[i % stages])
            plgpu.barrier_wait(v_free.at[i % stages])


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def flash_attention_hopper(
    q, k, v, *, scale=None, config: HopperConfig | None = None, interpret=None
):  # fmt: skip
    """Exact softmax attention on Hopper. q: [B, Lq, H, D]; k, v: [B, Lk, H, D] -> like q.

    scale defaults to 1/sqrt(D). fp16/bf16, accumulation in fp32. Raises ValueError for
    shapes outside the kernel's scope (see `supports`).
    """
    validate("flash_attention_hopper", q, k, v)
    config = config or tuned_config(q.shape, k.shape, q.dtype)
    if why := supports(q.shape, k.shape, q.dtype, config):
        raise ValueError(f"flash_attention_hopper cannot run {q.shape} x {k.shape}: {why}")
    head_dim = q.shape[-1]
    d_pad = padded_head_dim(head_dim, config.head_align)
    if d_pad != head_dim:  # zero columns: copies (see the module doc)
        q, k, v = (jnp.pad(t, ((0, 0),) * 3 + ((0, d_pad - head_dim),)) for t in (q, k, v))
    out = _launch(q, k, v, q.shape[2], head_dim, (0, 0, 0), scale, config, interpret)
    return out[..., :head_dim] if d_pad != head_dim else out


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def flash_attention_hopper_qkv(
    qkv, *, scale=None, config: HopperConfig | None = None, interpret=None
):  # fmt: skip
    """Self-attention of a fused projection: qkv [B, L, 3, H, D] (q, k, v on axis 2) ->
    [B, L, H, D]. The same kernel as `flash_attention_hopper`, reading q, k and v straight
    from qkv (viewed, for free, as [B, L, 3H, D]) instead of from three slices that XLA would
    copy out. Give D a multiple of the config's head_align (see `padded_head_dim`) to avoid
    a padding copy, as `sdjax.models.layers.Attention` does."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attention_hopper_qkv wants qkv [B, L, 3, H, D]; got {qkv.shape}")
    batch, length, _, heads, head_dim = qkv.shape
    q_shape = (batch, length, heads, head_dim)
    validate("flash_attention_hopper_qkv", *(jax.ShapeDtypeStruct(q_shape, qkv.dtype),) * 3)
    config = config or tuned_config(q_shape, q_shape, qkv.dtype)
    if why := supports(q_shape, q_shape, qkv.dtype, config):
        raise ValueError(f"flash_attention_hopper_qkv cannot run {qkv.shape}: {why}")
    d_pad = padded_head_dim(head_dim, config.head_align)
    if d_pad != head_dim:  # zero columns: a copy (see the docstring)
        qkv = jnp.pad(qkv, ((0, 0),) * 4 + ((0, d_pad - head_dim),))
    packed = qkv.reshape(batch, length, 3 * heads, d_pad)  # a bitcast: no data moves
    offsets = (0, heads, 2 * heads)
    out = _launch(packed, packed, packed, heads, head_dim, offsets, scale, config, interpret)
    return out[..., :head_dim] if d_pad != head_dim else out


def _launch(q, k, v, heads, head_dim, head_offsets, scale, config, interpret):
    """The kernel on q [B, Lq, *, d_pad], k, v [B, Lk, *, d_pad] (head h of each at
    h + its offset) -> [B, Lq, heads, d_pad]. scale defaults to 1/sqrt(head_dim)."""
    batch, q_len, _, d_pad = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    kv_steps = kv_len // config.block_kv
    stages = min(config.stages, kv_steps)
    consumers = config.consumers
    interpret = resolve_interpret(interpret)
    tile_transforms = (
        plgpu.TilingTransform((8, config.head_align)),
        plgpu.SwizzleTransform(config.head_align * jnp.dtype(q.dtype).itemsize),
    )
    scratch = [
        plgpu.SMEM((consumers, config.block_q, d_pad), q.dtype, transforms=tile_transforms),
        plgpu.SMEM((stages, config.block_kv, d_pad), q.dtype, transforms=tile_transforms),
        plgpu.SMEM((stages, config.block_kv, d_pad), q.dtype, transforms=tile_transforms),
        plgpu.Barrier(num_barriers=consumers),  # q_full
        plgpu.Barrier(num_barriers=stages),  # k_full
        plgpu.Barrier(num_barriers=stages),  # v_full
        plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),  # k_free
        plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),  # v_free
        plgpu.Barrier(num_arrivals=consumers),  # turn (ping-pong)
    ]
    inputs = (q, k, v)
    if config.mma_row_sum:  # the ones tile: from a constant, by TMA, one per consumer
        ones_transforms = (plgpu.TilingTransform((8, ONES_COLS)),
                           plgpu.SwizzleTransform(ONES_COLS * jnp.dtype(q.dtype).itemsize))  # fmt: skip
        scratch.insert(3, plgpu.SMEM((consumers, config.block_kv, ONES_COLS), q.dtype,
                                     transforms=ones_transforms))  # fmt: skip
        scratch.append(plgpu.Barrier(num_barriers=consumers))  # ones_full
        inputs += (jnp.ones((config.block_kv, ONES_COLS), q.dtype),)
    kernel = functools.partial(
        _kernel,
        d_pad=d_pad,
        scale_log2=scale * LOG2_E,
        block_q=config.block_q,
        block_kv=config.block_kv,
        stages=stages,
        kv_steps=kv_steps,
        pingpong=config.pingpong,
        interpret=interpret,
        head_offsets=head_offsets,
        half_exp=config.half_exp and jnp.dtype(q.dtype) == jnp.float16,
        half_sum=config.half_sum,
        tree=config.tree_reduce,
        mma_sum=config.mma_row_sum,
        overlap=config.overlap_qk and kv_steps > 1,
        pin=config.pin_softmax,
        consumers=consumers,
        poly=config.poly_exp,
        lazy=config.lazy_sum,
        split=config.split_exp,
    )
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((batch, q_len, heads, d_pad), q.dtype),
        scratch_types=scratch,
        grid=(-(-q_len // (consumers * config.block_q)), heads, batch),
        grid_names=("q_tiles", "heads", "batch"),
        num_threads=consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=mosaic_interpret_params(interpret),
        kernel_name="sdjax_flash_hopper",
    )(*inputs)
