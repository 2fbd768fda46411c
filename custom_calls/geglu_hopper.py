"""GEGLU for Hopper (sm_90) as a Pallas Mosaic GPU kernel: out = hidden * gelu(gate), with
[hidden, gate] = split(x @ w + b, 2, axis=-1) and the exact (erf) GELU.

Why a second kernel: the Triton one (`geglu.py`) takes 48.6 us at SD1.5's 64x64 level
(8192 x 320 x 2560) on the H100, twice cuBLAS's 24.4 us for the bare matmul (device kernel
time, `experiments/results/README.md`). With K = 320 a tile is only five reduction steps,
and its epilogue (two biases and an erf GELU on 64 x 128 values per warpgroup) takes about as
long as its matrix products: a kernel that runs them in turn leaves the tensor cores idle
half the time. Through Pallas, Triton has no warp specialization to overlap them. Here:

- the kernel is *persistent*: `programs` programs (one per SM by default) walk the output
  tiles [64, block_n] (tile t at rows 64 * (t // (F / block_n)), columns block_n * (t % ...)),
  program p taking tiles p, p + programs, ...;
- two *consumer* warpgroups take a program's tiles in turn (even and odd) and *ping-pong*:
  a barrier pair hands the tensor cores from one to the other, so one warpgroup's epilogue
  runs while the other's wgmmas (hidden and gate accumulators side by side, float32, both
  operands in shared memory) occupy the tensor cores (CUTLASS's "ping-pong" schedule);
- one *producer* warpgroup streams each tile's x [64, block_k] and hidden and gate tiles of
  w ([block_k, block_n] each, columns n0 and F + n0) with TMA, into one ring of `stages`
  buffers per consumer (a consumer tracks the phases of its own barriers only), or with
  `shared_ring` into one ring for both, in the program's step order;
- the epilogue adds the two bias slices (copied in with TMA as the tile starts), writes
  hidden * gelu(gate) to shared memory and copies the tile out with TMA: the 2F-wide
  projection never reaches memory.

Where it stands (H100, device kernel time; `experiments/results/README.md`): two designs that
read w less often (a 128-row tile shared by both consumers; w resident per program) measured
slower ("GEGLU on Hopper"). *Clusters* (`HopperConfig.cluster`) of 2 programs take vertically
adjacent tiles and receive each w tile once, by TMA multicast, each program issuing half of
it; a ring slot is free again when the consumers of both programs have arrived on its cluster
barrier (SD1.5's 64x64 and 32x32 levels: 42.8 -> 39.2 and 41.5 -> 33.1 us). Nsight Compute
then showed the kernel neither L2- nor tensor-bound (L2 49%, tensor pipe 35%, eleventh
session): the consumers wait for data. *One ring shared by both consumers*
(`HopperConfig.shared_ring`) fetches further ahead in the same shared memory: 37.5, 30.5 and
32.5 us at SD1.5's 64x64, 32x32 and 16x16 levels (`MEASURED`; Triton 48.5, 36.0, 35.2; cuBLAS's
bare products 24.1, 21.4, 23.1). Clusters of 4 were 1.7-1.8x slower. Interpret mode has no
clusters. Nsight Compute's per-instruction samples then put half of the consumers' time in
the epilogue: the GELU's cheaper form (`group_norm._gelu_erf`: no division, no select) took
the 64x64 and 32x32 levels to 33.9 and 29.6 us (twelfth session), and clusters of 2 the
64x64 level to 31.2 us.

*LayerNorm folded in* (`norm_scale`, item 272 of the results README): the transformer block's
LayerNorm in front of its GEGLU, without its own launch. The normalization is linear per row,
so with scale gamma and the row's mean mu and rstd,

    LN(x) @ w = rstd (((x - m) gamma) @ w - (mu - m) colsum) + bias @ w,

for any per-row shift m, with colsum = gamma @ w (float32; `layer_norm_fold` makes it and
the folded bias b + bias @ w once per set of weights). Each consumer, before a reduction
step's products (while the previous step's run), reads that step's x tile from shared
memory, adds its rows' shifted values and squares into the row statistics, and writes
(x - m) gamma back in place in x's dtype for the wgmmas; m is the row's mean over the tile's
first step, so the products and sums see centred values (no cancellation when a row's mean
is large against its spread: `experiments/ln_fold_numerics.py`). The epilogue applies
rstd and the mean term with two multiply-adds an output. The statistics are made again by
every column tile of a row block (F / block_n times), on the tensor cores' critical path.
Measured much slower than the two launches it replaces (H200, device kernel time, results
README items 273-274): 64x64 51.1 us against 35.9 for XLA's LayerNorm then this kernel,
32x32 43.4 against 30.8, 16x16 76.5 against 34.3; at 64x64 the row sums cost 14 us and the
write-back 11 us, each alone 3-4x the LayerNorm launch. Nothing in `sdjax.ops` uses it.

Scope (`supports`): fp16/bf16; x's rows (M) a multiple of 64; D a multiple of block_k; F a
multiple of block_n. Other shapes take the Triton kernel (`sdjax.ops`). Off GPU the kernel
runs in Mosaic GPU's interpret mode (tests; slow, small shapes), where the products are plain
float32 dots of the same shared-memory tiles.
"""

from __future__ import annotations

import dataclasses
import functools

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
from custom_calls.geglu import geglu_reference
from custom_calls.group_norm import activate
from custom_calls.layer_norm import layer_norm_reference

TILE_M = 64  # rows of a tile: one warpgroup's wgmma
# Programs per cluster: Hopper's portable cluster sizes go to 8; a cluster tile of 64 * 4 rows
# already divides w's L2 reads by 4 against x's by 1 (tile [64, 128], D = 320: 41 KB of x
# against 164 KB of w per tile).
CLUSTER_SIZES = (1, 2, 4)
# A consumer's two accumulators of 64 x 128 float32 take 128 of its CONSUMER_REGISTERS (232).
TMA_MAX_BOX = 256  # a TMA copy's box spans at most 256 elements along each dimension


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopperConfig:
    """Block sizes of one launch. A tile is [64, block_n] of the output."""

    block_n: int = 128  # output columns of a tile (and as many gate columns), a multiple of 64
    block_k: int = 64  # reduction step: 64 fp16 = 128 bytes, the widest TMA/wgmma swizzle
    stages: int = 2  # reduction steps in flight per consumer (its ring; see shared_ring)
    programs: int | None = None  # persistent programs; None: one per SM of the device
    # Programs per cluster (1, 2 or 4; GPU only): the cluster's programs take vertically
    # adjacent tiles (rows 64 * c of a [64 * cluster, block_n] cluster tile) and receive each
    # w tile once by TMA multicast, each issuing its share: w's reads from L2 fall by the
    # cluster size. A ring slot is free again once every program of the cluster has used it.
    cluster: int = 1
    # Keep a reduction step's wgmmas in flight while the next step's are issued: its ring
    # slot is freed one step later (after `wgmma_wait` leaves only the newest step pending),
    # instead of waiting for every step's products before issuing the next (needs two
    # stages where a tile has more than one step: the producer refills a slot only once the
    # step after it has been issued).
    # Measured no faster on the H100 (at most -2.5% with 4 stages, much slower with 2:
    # `experiments/results/README.md`, eleventh session): the per-step wait is not the bound.
    delay_release: bool = False
    # One ring of `stages` slots for both consumers, filled in the program's step order,
    # instead of one ring of `stages` slots each: the same shared memory holds twice as many
    # steps of the one ring, so the next tile's data is fetched further ahead. Each slot has
    # a `full` barrier per consumer (a consumer waits only on its own steps' phases: Pallas
    # tracks a barrier's phase per thread) and one `free` barrier.
    shared_ring: bool = False
    # Start the hidden and gate accumulators at their bias slices instead of at zero, so that
    # the epilogue has no bias adds (two of its ~17 instructions an output). The tile's bias
    # copy, issued as the tile starts, is then awaited before its first products rather than
    # after its last. Measured slower on the H100 (+13% at SD1.5's 64x64 level, +18% at
    # 32x32, +2% at 16x16: `experiments/results/README.md`, twelfth session): off.
    bias_in_acc: bool = False
    # Keep a program's 64 rows of x in shared memory for all of its tiles (one copy of them
    # per program, instead of one per tile and step) and give each program one row block and
    # `column_groups`' share of the column tiles (not persistent: one program per row block
    # and group). At SD1.5's 64x64 and 32x32 levels the per-tile design reads x again for
    # every column tile and w again for every row tile (halved by clusters of 2): ~157 MB of
    # shared-memory fills from L2 a call, ~5.2 TB/s over its ~30 us, near the L2's bandwidth
    # (results README, item 264). Resident x cuts that by ~30%, but measured slower on the
    # H100 (64x64: 32.8 against 30.8-31.1 us; 32x32: 30.2 against 27.3; item 265): the L2
    # does not bound the kernel. Off. Needs `shared_ring` (the consumers alternate the
    # program's column tiles) and 64 x D of x in shared memory (D 1280, SD1.5's 16x16
    # level, does not fit).
    x_resident: bool = False
    # With x_resident: the column tiles split into this many groups, one program per (row
    # block, group); None: the most groups (a divisor of the column tiles) for which the
    # programs fit one wave of the device's SMs.
    column_groups: int | None = None

    def __post_init__(self):
        for f in ("block_n", "block_k"):
            if getattr(self, f) % 64:
                raise ValueError(f"{f}={getattr(self, f)} must be a multiple of 64")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be >= 1")
        if self.programs is not None and self.programs < 1:
            raise ValueError(f"programs={self.programs} must be >= 1")
        if self.cluster not in CLUSTER_SIZES:
            raise ValueError(f"cluster={self.cluster} must be one of {CLUSTER_SIZES}")
        if self.delay_release and self.stages < 2:
            raise ValueError("delay_release needs stages >= 2")
        if self.x_resident and not self.shared_ring:
            raise ValueError("x_resident needs shared_ring (one ring for both consumers)")
        if self.column_groups is not None and (not self.x_resident or self.column_groups < 1):
            raise ValueError(f"column_groups={self.column_groups} needs x_resident and >= 1")


def smem_bytes(config: HopperConfig, d: int, dtype, norm: bool = False) -> int:
    """Shared memory of the rings (x, hidden and gate tiles: one per consumer, each of at
    most d / block_k steps, or one shared ring) and the two output tiles, for a reduction
    over d; with `norm` (the LayerNorm folded in) also its scale [d] and the colsum slices,
    float32."""
    rings, stages = _rings(config, d // config.block_k)
    step = TILE_M * config.block_k + 2 * config.block_k * config.block_n
    resident = 0
    if config.x_resident:  # x once for the program, only w tiles in the ring
        step -= TILE_M * config.block_k
        resident = TILE_M * d
    out = TILE_M * config.block_n
    bias = 2 * 2 * config.block_n  # two tile parities of hidden and gate slices
    itemsize = jnp.dtype(dtype).itemsize
    total = itemsize * (resident + rings * stages * step + COMPUTE_WARPGROUPS * (out + bias))
    if norm:  # float32: the scale, and colsum slices as the biases'
        total += 4 * (d + COMPUTE_WARPGROUPS * bias)
    return total


def column_groups(config: HopperConfig, m: int, f: int, sms: int) -> int:
    """With `config.x_resident`: how many groups the F / block_n column tiles split into (one
    program per 64-row block and group): the config's, else the most that divide the tiles
    and keep the programs within one wave of `sms`. 1 without x_resident."""
    if not config.x_resident:
        return 1
    if config.column_groups is not None:
        return config.column_groups
    tiles_n, row_blocks = f // config.block_n, m // TILE_M
    fits = [g for g in range(1, tiles_n + 1) if tiles_n % g == 0 and row_blocks * g <= sms]
    return max(fits, default=1)


def _rings(config: HopperConfig, k_steps: int) -> tuple[int, int]:
    """(rings, slots per ring): one per consumer, each of at most a tile's steps; or one
    shared ring of `stages` slots."""
    if config.shared_ring:
        return 1, config.stages
    return COMPUTE_WARPGROUPS, min(config.stages, max(1, k_steps))


# The config per (D, F) of SD1.5's GEGLUs that measured fastest (H100, device kernel time,
# `bench_norm --sweep_geglu_hopper --geglu_hopper_grid ring`, `experiments/results/README.md`,
# call 8 of the eleventh session), all with one ring shared by both consumers: 64x64 level
# (8192 x 320 x 1280) 39.1 -> 37.5 us; 32x32 (2048 x 640 x 2560) 33.3 -> 30.5 us; 16x16
# (512 x 1280 x 5120) 32.5 us (Triton: 35.2). Before: clusters of 2 with a ring per consumer
# (the ninth session); clusters of 4 were 1.7-1.8x slower. Twelfth session, after the GELU's
# cheaper form shortened the epilogue (`--geglu_hopper_grid ring_issue`, call 6): at 64x64 a
# cluster of 2 is now 4% ahead (32.5 -> 31.2 us); `delay_release` still changes nothing.
MEASURED = {
    (320, 1280): HopperConfig(block_n=128, stages=4, cluster=2, shared_ring=True),
    (640, 2560): HopperConfig(block_n=128, stages=4, cluster=2, shared_ring=True),
    (1280, 5120): HopperConfig(block_n=64, stages=6, cluster=2, shared_ring=True),
}


def heuristic_config(m: int, d: int, f: int) -> HopperConfig:
    """The measured config for SD1.5's (D, F) (`MEASURED`, where x's rows make whole cluster
    tiles); else tiles 128 columns wide, 64 where that leaves fewer tiles than four per SM
    (SD1.5's 8x8 level: 128 x 5120 makes 80 tiles of 128 columns)."""
    measured = MEASURED.get((d, f))
    if measured is not None and m % (measured.cluster * TILE_M) == 0:
        return measured
    block_n = 128 if (m // TILE_M) * (f // 128) >= 4 * 132 else 64
    return HopperConfig(block_n=block_n)


def supports(
    x_shape, w_shape, dtype, config: HopperConfig | None = None, norm: bool = False
) -> str | None:
    """None if the kernel can run x [..., D] @ w [D, 2F] with `config` (default: the
    heuristic; with `norm`, the LayerNorm folded in), else the reason it cannot."""
    d, f2 = w_shape
    m = 1
    for s in x_shape[:-1]:
        m *= s
    config = config or heuristic_config(m, d, f2 // 2)
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (fp16/bf16 only)"
    if m % (TILE_M * config.cluster) or m == 0:
        return f"M={m} is not a positive multiple of {TILE_M * config.cluster} (64 x cluster)"
    if d % config.block_k:
        return f"D={d} is not a multiple of block_k={config.block_k}"
    if (f2 // 2) % config.block_n:
        return f"F={f2 // 2} is not a multiple of block_n={config.block_n}"
    tiles_n = (f2 // 2) // config.block_n
    if config.column_groups is not None and tiles_n % config.column_groups:
        return f"{tiles_n} column tiles do not split into column_groups={config.column_groups}"
    if norm and (config.delay_release or config.bias_in_acc or config.x_resident):
        return "the folded LayerNorm runs without delay_release, bias_in_acc and x_resident"
    if norm and config.stages < 2 and d > config.block_k:  # (`normalize_step`)
        return "the folded LayerNorm needs stages >= 2 (a step's next tile is normalized first)"
    if norm and d // config.block_k > TMA_MAX_BOX:
        return f"the folded LayerNorm's scale takes D / block_k <= {TMA_MAX_BOX} rows"
    if (smem := smem_bytes(config, d, dtype, norm)) > SMEM_LIMIT_BYTES:
        return f"its tiles need {smem} bytes of shared memory (> {SMEM_LIMIT_BYTES})"
    return None


# Parts of the folded LayerNorm's per-step work that `bench_norm --ln_geglu_ablate` leaves out
# to see what each costs (timing only: the results are wrong): "stats" (the row sums; the
# shift is zero) and "store" (the write-back of the scaled tile and its fence). Read at trace
# time; empty in every other use.
_NORM_ABLATE: frozenset[str] = frozenset()
NORM_ABLATABLE = ("stats", "store")


def _column_vector(ref, *, interpret: bool):
    """A [block_n] vector from shared memory, laid out to broadcast along the rows of a wgmma
    accumulator, in float32."""
    if interpret:
        return ref[...].astype(jnp.float32)
    layout = plgpu.Layout.WGMMA.reduce(0)
    try:
        v = plgpu.load(ref, layout=layout)  # jax 0.11
    except TypeError:  # jax 0.10: the index is positional
        v = plgpu.load(ref, (slice(None),), layout=layout)
    return v.astype(jnp.float32)


def _kernel(
    *refs, inner, block_n, block_k, stages, k_steps, tiles_n, tiles, programs, cluster,
    interpret, delay_release=False, shared_ring=False, bias_in_acc=False, groups=1,
    x_resident=False, norm_eps=None,
):  # fmt: skip
    """One persistent program: tiles pid, pid + programs, ... of the output (with clusters:
    cluster tiles, of which this program takes rows 64 * (its index in the cluster)).

    refs: x_ref, w_ref, b_ref, (s_ref, c_ref,) o_ref, x_smem, h_smem, g_smem, b_smem, o_smem,
    full, free, go, b_full, (x_full,) (s_smem, c_smem, s_full): the parenthesized ones with
    x resident, and with the LayerNorm folded in (`norm_eps` given) respectively.

    x_ref [M, D]; w_ref [D, 2F] (hidden columns first); b_ref [2F]; o_ref [M, F].
    x_smem [R, stages, 64, block_k]; h_smem, g_smem [R, stages, block_k, block_n]: R = 2
    rings, one per consumer, or with shared_ring R = 1 for both; b_smem [2, 2, 2, block_n]
    (consumer, tile parity, hidden/gate); o_smem [2, 64, block_n]. full: [2 * stages]
    barriers, consumer c's arrivals in slot s at c * stages + s; free: [R * stages], ring r's
    slot s at r * stages + s (with clusters, a cluster barrier: every program's consumer
    arrives on it in all the cluster's programs). go: [2], go[c] lets consumer c start its
    next tile's wgmmas. b_full: [2 * 2], consumer c's biases of a tile of parity q at 2 * c + q.
    `programs` and `tiles` count clusters and cluster tiles where cluster > 1.

    With x resident (`x_full`: one barrier for the program's k_steps copies of x): program
    pid takes (cluster) row block pid // groups and the column tiles of group pid % groups;
    x_smem is [k_steps, 64, block_k], the program's rows of x for all of its tiles, and the
    one shared ring holds only w's tiles (full: two copies a slot).

    With the LayerNorm folded in: s_ref [k_steps, block_k] its scale, float32, copied once
    into s_smem (barrier s_full); c_ref [2F] colsum, float32, whose tile slices come into
    c_smem [2, 2, 2, block_n] beside the biases (b_full then counts four copies).
    """
    norm = norm_eps is not None
    n_in = 5 if norm else 3
    x_ref, w_ref, b_ref = refs[:3]
    s_ref, c_ref = refs[3:5] if norm else (None, None)
    o_ref = refs[n_in]
    x_smem, h_smem, g_smem, b_smem, o_smem, full, free, go, b_full = refs[n_in + 1 : n_in + 10]
    rest = refs[n_in + 10 :]
    x_full = rest[:1] if x_resident else ()
    s_smem, c_smem, s_full = rest[len(x_full) :] if norm else (None, None, None)
    wg = lax.axis_index("wg")
    pid = lax.axis_index("programs")
    rank = lax.axis_index("cluster") if cluster > 1 else 0  # this program's rows of a tile
    if x_resident:  # one row block; the group's column tiles
        row_block, group = pid // groups, lax.rem(pid, groups)
        n_local = tiles_n // groups
    else:
        n_local = (tiles - pid + programs - 1) // programs  # this program's tiles
    k_unroll = k_steps <= 32  # a short reduction: unrolled
    multicast = {"collective_axes": "cluster"} if cluster > 1 else {}

    def origin(j):
        """Rows and columns of this program's j-th tile."""
        if x_resident:
            rows = row_block * TILE_M * cluster + rank * TILE_M
            return rows, (group * n_local + j) * block_n
        t = pid + j * programs
        return (t // tiles_n) * TILE_M * cluster + rank * TILE_M, (t % tiles_n) * block_n

    def x_tile(r, slot, i):
        """The x tile [64, block_k] of reduction step i (read from ring r's slot)."""
        return x_smem.at[i] if x_resident else x_smem.at[r, slot]

    def position(c, u, i):
        """(ring, slot, the step's place along its ring) of step i of consumer c's u-th
        tile: consumer c's own ring, or the shared one in the program's step order."""
        g = ((2 * u + c) if shared_ring else u) * k_steps + i
        return (0 if shared_ring else c), lax.rem(g, stages), g

    def release(c, u, i):
        r, slot, _ = position(c, u, i)
        plgpu.barrier_arrive(free.at[r * stages + slot])

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")

        def normalize_step(u, i, shift):
            """The folded LayerNorm's part of reduction step i (a Python int) of this
            consumer's u-th tile: waits for the step's x tile, returns (shift, the row sums
            of x - shift and of its squares) and writes (x - shift) * scale back over the
            tile for the products. shift [64]: the rows' means over step 0's columns (made
            here where None). Step i is waited for while step i - 1 still holds its slot,
            so the two need different slots: stages >= 2 (`supports`)."""
            r, slot, _ = position(wg, u, i)
            plgpu.barrier_wait(full.at[wg * stages + slot])
            tile_ref = x_tile(r, slot, i)
            xt = tile_ref[...].astype(jnp.float32)
            if "stats" in _NORM_ABLATE:  # (timing only) no sums, no shift
                zero = jnp.zeros((TILE_M,), jnp.float32)
                if not interpret:
                    zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA.reduce(1))
                shift, centred, sums = zero, xt, (zero, zero)
            else:
                if shift is None:
                    shift = xt.sum(axis=1) * (1.0 / block_k)
                centred = xt - lax.broadcast_in_dim(shift, xt.shape, [0])
                sums = (centred.sum(axis=1), (centred * centred).sum(axis=1))
            if "store" not in _NORM_ABLATE:
                scale = _column_vector(s_smem.at[i], interpret=interpret)
                tile_ref[...] = (centred * lax.broadcast_in_dim(scale, xt.shape, [1])).astype(
                    tile_ref.dtype
                )
                plgpu.commit_smem()  # the writes reach the wgmmas' (async) view of smem
            return shift, *sums

        def normalized_products(u, first):
            """hidden, gate [64, block_n] float32 of (x - shift) scale @ w for this
            consumer's u-th tile, and the row sums of x - shift and of its squares over D;
            `first` is `normalize_step(u, 0, None)`, made before the tensor cores' turn. Each
            later step's tile is normalized while the step before it is multiplied. The steps
            are unrolled (the statistics are carried as values)."""
            shift, s1, s2 = first

            def step_done(i, sums):
                """Normalizes step i + 1's tile (while step i's products run), then frees
                step i's slot once its products are done."""
                if i + 1 < k_steps:
                    _, a1, a2 = normalize_step(u, i + 1, shift)
                    sums = (sums[0] + a1, sums[1] + a2)
                if not interpret:
                    plgpu.wgmma_wait(0)
                release(wg, u, i)
                return sums

            if interpret:  # plain float32 dots of the same tiles (see the module doc)
                hidden = gate = jnp.zeros((TILE_M, block_n), jnp.float32)
                sums = (s1, s2)
                for i in range(k_steps):
                    r, slot, _ = position(wg, u, i)
                    xf = x_tile(r, slot, i)[...].astype(jnp.float32)
                    hidden = hidden + jnp.dot(xf, h_smem.at[r, slot][...].astype(jnp.float32))
                    gate = gate + jnp.dot(xf, g_smem.at[r, slot][...].astype(jnp.float32))
                    sums = step_done(i, sums)
                return hidden, gate, *sums

            def accumulate(h_acc, g_acc):
                sums = (s1, s2)
                for i in range(k_steps):
                    r, slot, _ = position(wg, u, i)
                    xt = x_tile(r, slot, i)
                    plgpu.wgmma(h_acc, xt, h_smem.at[r, slot])
                    plgpu.wgmma(g_acc, xt, g_smem.at[r, slot])
                    sums = step_done(i, sums)
                return h_acc[...], g_acc[...], *sums

            acc = plgpu.ACC((TILE_M, block_n), jnp.float32)
            return pl.run_scoped(accumulate, acc, acc)

        def products(u, init=None):
            """hidden, gate [64, block_n] float32 of this consumer's u-th tile, accumulated
            onto `init` (hidden, gate: the bias slices broadcast over the rows) or zeros."""
            if interpret:  # plain float32 dots of the same tiles (see the module doc)

                def step(i, acc):
                    r, slot, _ = position(wg, u, i)
                    plgpu.barrier_wait(full.at[wg * stages + slot])
                    xt = x_tile(r, slot, i)[...].astype(jnp.float32)
                    hidden = acc[0] + jnp.dot(xt, h_smem.at[r, slot][...].astype(jnp.float32))
                    gate = acc[1] + jnp.dot(xt, g_smem.at[r, slot][...].astype(jnp.float32))
                    release(wg, u, i)
                    return hidden, gate

                if init is None:
                    init = (jnp.zeros((TILE_M, block_n), jnp.float32),) * 2
                return lax.fori_loop(0, k_steps, step, init)

            def accumulate(h_acc, g_acc):
                @pl.loop(0, k_steps, unroll=k_unroll)
                def _step(i):
                    r, slot, _ = position(wg, u, i)
                    plgpu.barrier_wait(full.at[wg * stages + slot])
                    xt = x_tile(r, slot, i)
                    plgpu.wgmma(h_acc, xt, h_smem.at[r, slot])
                    plgpu.wgmma(g_acc, xt, g_smem.at[r, slot])
                    if delay_release:  # step i's two products may run on; step i - 1's are done
                        plgpu.wgmma_wait(2)
                        pl.when(i > 0)(lambda: release(wg, u, i - 1))
                    else:  # the step's products read the slot: done before it is freed
                        plgpu.wgmma_wait(0)
                        release(wg, u, i)

                if delay_release:
                    plgpu.wgmma_wait(0)
                    release(wg, u, k_steps - 1)
                if init is None:
                    return h_acc[...], g_acc[...]
                return None  # run_state reads the accumulators out

            if init is None:  # zero accumulators: the first products overwrite them
                acc = plgpu.ACC((TILE_M, block_n), jnp.float32)
                return pl.run_scoped(accumulate, acc, acc)
            return pl.run_state(lambda refs: accumulate(*refs))(tuple(map(plgpu.ACC.init, init)))

        def tile(u, carry):
            j = 2 * u + wg  # this consumer's u-th tile is the program's j-th
            m0, n0 = origin(j)
            # the tile's bias slices, double-buffered by tile parity (the last tile's epilogue
            # may still read the other buffer's values)
            q = lax.rem(u, 2)
            biases, b_done = b_smem.at[wg, q], b_full.at[2 * wg + q]
            plgpu.copy_gmem_to_smem(b_ref.at[pl.ds(n0, block_n)], biases.at[0], b_done)
            plgpu.copy_gmem_to_smem(b_ref.at[pl.ds(inner + n0, block_n)], biases.at[1], b_done)
            if norm:  # colsum's slices beside the biases, on the same barrier
                colsums = c_smem.at[wg, q]
                plgpu.copy_gmem_to_smem(c_ref.at[pl.ds(n0, block_n)], colsums.at[0], b_done)
                plgpu.copy_gmem_to_smem(c_ref.at[pl.ds(inner + n0, block_n)], colsums.at[1],
                                        b_done)  # fmt: skip
                # the first step's statistics before the tensor cores are this consumer's
                first = normalize_step(u, 0, None)
            pl.when(j > 0)(lambda: plgpu.barrier_wait(go.at[wg]))  # the tensor cores' turn
            shape = (TILE_M, block_n)

            def columns(vectors):  # a tile's [2, block_n] slices broadcast over its rows
                return tuple(lax.broadcast_in_dim(_column_vector(vectors.at[i], interpret=interpret),
                                                  shape, [1]) for i in (0, 1))  # fmt: skip

            def bias_rows():  # the tile's bias slices broadcast over its rows, float32
                plgpu.barrier_wait(b_done)
                return columns(biases)

            if norm:
                hidden, gate, s1, s2 = normalized_products(u, first)
            else:
                hidden, gate = products(u, bias_rows() if bias_in_acc else None)
            # hand the tensor cores over (where the other consumer has a tile left)
            pl.when(j + 1 < n_local)(lambda: plgpu.barrier_arrive(go.at[1 - wg]))
            if norm:  # rstd ((x - shift) scale @ w - (mean - shift) colsum) + bias
                d = k_steps * block_k
                offset = s1 * (1.0 / d)  # the rows' mean - shift
                var = jnp.maximum(s2 * (1.0 / d) - offset * offset, 0.0)
                rstd = lax.broadcast_in_dim(lax.rsqrt(var + norm_eps), shape, [0])
                offset = lax.broadcast_in_dim(offset, shape, [0])
                bias_h, bias_g = bias_rows()
                col_h, col_g = columns(colsums)
                hidden = rstd * (hidden - offset * col_h) + bias_h
                gate = rstd * (gate - offset * col_g) + bias_g
            elif not bias_in_acc:
                bias_h, bias_g = bias_rows()
                hidden, gate = hidden + bias_h, gate + bias_g
            # exact GELU through group_norm's written-out erf (A&S 7.1.26; Mosaic GPU has no
            # layout rule for math.erf): relu(g) - 0.5 |g| q, no division or select, ~17
            # instructions an output (the epilogue held half the consumers' time before)
            out = (hidden * activate(gate, "gelu")).astype(o_ref.dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's copy has read it
            o_smem.at[wg][...] = out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[pl.ds(m0, TILE_M), pl.ds(n0, block_n)])
            return carry

        if x_resident:  # the program's rows of x, once for all of its tiles
            plgpu.barrier_wait(x_full[0].at[0])
        if norm:  # the LayerNorm's scale, once for all of its tiles
            plgpu.barrier_wait(s_full.at[0])
        lax.fori_loop(0, (n_local - wg + 1) // 2, tile, 0)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

        def tile(j, carry):
            c, u = lax.rem(j, 2), j // 2  # the consumer and its u-th tile
            m0, n0 = origin(j)

            @pl.loop(0, k_steps, unroll=k_unroll)
            def _step(i):
                r, slot, g = position(c, u, i)
                barrier = full.at[c * stages + slot]
                # the slot's previous step must be consumed (none before the ring's first lap)
                pl.when(g >= stages)(lambda: plgpu.barrier_wait(free.at[r * stages + slot]))
                ks = pl.ds(i * block_k, block_k)
                if not x_resident:
                    plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, TILE_M), ks], x_smem.at[r, slot],
                                            barrier)  # fmt: skip
                # the same w tiles in every program of a cluster: one multicast copy
                plgpu.copy_gmem_to_smem(w_ref.at[ks, pl.ds(n0, block_n)], h_smem.at[r, slot],
                                        barrier, **multicast)  # fmt: skip
                plgpu.copy_gmem_to_smem(w_ref.at[ks, pl.ds(inner + n0, block_n)],
                                        g_smem.at[r, slot], barrier, **multicast)  # fmt: skip

            return carry

        if norm:  # the LayerNorm's scale [k_steps, block_k], one copy
            plgpu.copy_gmem_to_smem(s_ref, s_smem, s_full.at[0])
        if x_resident:  # the program's rows of x, every reduction step's columns
            m0, _ = origin(0)
            for i in range(k_steps):
                plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, TILE_M), pl.ds(i * block_k, block_k)],
                                        x_smem.at[i], x_full[0].at[0])  # fmt: skip
        lax.fori_loop(0, n_local, tile, 0)
        # drain: the last `stages` steps of each ring are waited for once, as every phase is
        rings = [(0, n_local * k_steps)] if shared_ring else [
            (c, (n_local - c + 1) // 2 * k_steps) for c in range(COMPUTE_WARPGROUPS)
        ]  # (ring, steps filled into it)
        for r, steps in rings:
            for q in range(stages):
                g = steps - stages + q
                pl.when(g >= 0)(
                    lambda g=g, r=r: plgpu.barrier_wait(free.at[r * stages + lax.rem(g, stages)])
                )


def layer_norm_fold(scale, bias, w, b):
    """The weights' part of a LayerNorm (scale, bias [D]) folded into the GEGLU after it
    (w [D, 2F], b [2F]): (the folded bias b + bias @ w, colsum = scale @ w), both [2F] in
    float32, for `geglu_hopper(x, w, folded_bias, norm_scale=scale, norm_colsum=colsum)`.
    They depend on the weights alone: make them once per set of weights."""
    folded = b.astype(jnp.float32) + _row_times_w(bias, w)
    return folded, _row_times_w(scale, w)


def _row_times_w(v, w):
    """v [D] @ w [D, 2F] in float32 at full precision."""
    return jnp.dot(v.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)


def layer_norm_geglu_reference(x, scale, bias, w, b, *, eps: float = 1e-5):
    """What `geglu_hopper` with the LayerNorm folded in computes, unfused: the LayerNorm's
    reference (its output in x's dtype), then the GEGLU's."""
    return geglu_reference(layer_norm_reference(x, scale, bias, eps=eps), w, b)


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def geglu_hopper(
    x, w, b, *, norm_scale=None, norm_colsum=None, eps: float = 1e-5,
    config: HopperConfig | None = None, interpret=None,
):  # fmt: skip
    """hidden * gelu(gate), [hidden, gate] = split(x @ w + b). x [..., D], w [D, 2F], b [2F]
    -> [..., F] in x's dtype (fp16/bf16); w and b are cast to it, products accumulate in
    float32. Raises ValueError for shapes outside the kernel's scope (see `supports`).

    With norm_scale [D], x's rows are first layer-normalized over D (epsilon `eps`) and
    scaled by it, without a bias of their own: pass a LayerNorm's bias folded into b, and
    norm_colsum = norm_scale @ w [2F] in float32 (`layer_norm_fold` makes both; without
    norm_colsum it is made here, a pass over w per call). Equals
    `layer_norm_geglu_reference(x, norm_scale, bias, w, b_unfolded)` (module doc)."""
    if w.ndim != 2 or x.ndim < 1 or w.shape[0] != x.shape[-1] or w.shape[1] % 2:
        raise ValueError(
            f"geglu_hopper wants x [..., D] and w [D, 2F]; got {x.shape=} {w.shape=}"
        )
    if b.shape != (w.shape[1],):
        raise ValueError(f"geglu_hopper: bias must be [{w.shape[1]}]; got {b.shape=}")
    norm = norm_scale is not None
    if not norm and norm_colsum is not None:
        raise ValueError("geglu_hopper: norm_colsum without norm_scale")
    if norm and norm_scale.shape != (x.shape[-1],):
        raise ValueError(f"geglu_hopper: norm_scale must be [{x.shape[-1]}]; got {norm_scale.shape}")
    if norm and norm_colsum is not None and norm_colsum.shape != (w.shape[1],):
        raise ValueError(f"geglu_hopper: norm_colsum must be [{w.shape[1]}]; got {norm_colsum.shape}")
    d, inner = x.shape[-1], w.shape[1] // 2
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    interpret = resolve_interpret(interpret)
    if config is None:
        config = heuristic_config(m, d, inner)
        if interpret:  # interpret mode has no clusters: the same tiles, one program each
            config = dataclasses.replace(config, cluster=1)
    if why := supports(x.shape, w.shape, x.dtype, config, norm):
        raise ValueError(f"geglu_hopper cannot run {x.shape} @ {w.shape}: {why}")
    if config.cluster > 1 and interpret:
        raise ValueError("geglu_hopper: clusters (cluster > 1) need the GPU, not interpret mode")
    k_steps = d // config.block_k
    rings, stages = _rings(config, k_steps)
    tiles_n = inner // config.block_n
    cl = config.cluster
    tiles = (m // (TILE_M * cl)) * tiles_n  # cluster tiles
    sms = config.programs or num_sms()
    groups = column_groups(config, m, inner, sms)
    if config.x_resident:  # one program (cluster) per row block and column group
        programs = (m // (TILE_M * cl)) * groups
    else:  # persistent: at most one program (cluster) per SM (SMs per cluster)
        programs = min(tiles, sms // cl)
    cluster_kw = dict(cluster=(cl,), cluster_names=("cluster",)) if cl > 1 else {}
    slots = rings * stages
    free = (
        plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=slots)
        if cl > 1
        else plgpu.Barrier(num_barriers=slots)
    )
    dtype = x.dtype
    in_t, out_t = hopper_smem_transforms(config.block_k, dtype), hopper_smem_transforms(config.block_n, dtype)
    cw, bk, bn = COMPUTE_WARPGROUPS, config.block_k, config.block_n
    x_shape = (k_steps, TILE_M, bk) if config.x_resident else (rings, stages, TILE_M, bk)
    scratch = [
        plgpu.SMEM(x_shape, dtype, transforms=in_t),  # x: resident, or a ring
        plgpu.SMEM((rings, stages, bk, bn), dtype, transforms=out_t),  # hidden columns of w
        plgpu.SMEM((rings, stages, bk, bn), dtype, transforms=out_t),  # gate columns of w
        plgpu.SMEM((cw, 2, 2, bn), dtype),  # biases: consumer, tile parity, hidden/gate
        plgpu.SMEM((cw, TILE_M, bn), dtype, transforms=out_t),  # output tiles
        # full: x (unless resident), hidden and gate
        plgpu.Barrier(num_arrivals=2 if config.x_resident else 3, num_barriers=cw * stages),
        free,  # free: the consumer (with clusters: every program's consumer) is done with it
        plgpu.Barrier(num_barriers=cw),  # go: the tensor cores are this consumer's
        # b_full: the two bias slices (and colsum's two with the LayerNorm folded in)
        plgpu.Barrier(num_arrivals=4 if norm else 2, num_barriers=cw * 2),
    ]
    if config.x_resident:  # x_full: the program's k_steps copies of x
        scratch.append(plgpu.Barrier(num_arrivals=k_steps, num_barriers=1))
    inputs = [x2, w.astype(dtype), b.astype(dtype)]
    if norm:
        if norm_colsum is None:
            norm_colsum = _row_times_w(norm_scale, w)
        inputs += [norm_scale.astype(jnp.float32).reshape(k_steps, bk),
                   norm_colsum.astype(jnp.float32)]  # fmt: skip
        scratch += [
            plgpu.SMEM((k_steps, bk), jnp.float32),  # the scale, a row per reduction step
            plgpu.SMEM((cw, 2, 2, bn), jnp.float32),  # colsum slices, as the biases'
            plgpu.Barrier(num_barriers=1),  # s_full: the scale's copy
        ]
    kernel = functools.partial(
        _kernel,
        inner=inner,
        block_n=bn,
        block_k=bk,
        stages=stages,
        k_steps=k_steps,
        tiles_n=tiles_n,
        tiles=tiles,
        programs=programs,
        cluster=cl,
        interpret=interpret,
        delay_release=config.delay_release,
        shared_ring=config.shared_ring,
        bias_in_acc=config.bias_in_acc,
        groups=groups,
        x_resident=config.x_resident,
        norm_eps=float(eps) if norm else None,
    )
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, inner), dtype),
        scratch_types=scratch,
        grid=(programs,),
        grid_names=("programs",),
        **cluster_kw,
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=mosaic_interpret_params(interpret),
        kernel_name="sdjax_geglu_hopper",
    )(*inputs)
    return out.reshape(*x.shape[:-1], inner)
