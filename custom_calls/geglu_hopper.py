"""GEGLU for Hopper (sm_90) as a Pallas Mosaic GPU kernel: out = hidden * gelu(gate), with
[hidden, gate] = split(x @ w + b, 2, axis=-1) and the exact (erf) GELU.

Why a second kernel: the Triton one (`geglu.py`) reaches 285-380 TFLOP/s at SD1.5's shapes
on the H100 (47 us for 8192 x 320 x 2560 in the s5b loop profile), well under the tensor
cores' rate. Through Pallas, Triton gets neither the bulk tensor copy engine (TMA) nor warp
specialization, so its loads and its matrix products take turns. Here, as in
`flash_attention_hopper.py`:

- one *producer* warpgroup streams, per reduction step, the x tile [2 * block_m, block_k] and
  the matching hidden and gate tiles of w ([block_k, block_n] each, columns n0 and F + n0)
  with TMA into a ring of `stages` shared-memory buffers; a "full" barrier per slot counts the
  three copies, a "free" barrier the two consumers done with it;
- two *consumer* warpgroups each own block_m rows of the tile and accumulate hidden and gate
  side by side in registers (two wgmma accumulators, float32), both operands read from shared
  memory;
- the epilogue adds the biases, writes hidden * gelu(gate) to shared memory and copies the
  tile out with TMA: the 2F-wide projection never reaches memory.

Scope (`supports`): fp16/bf16; x's rows (M) a multiple of 2 * block_m; D a multiple of
block_k; F a multiple of block_n. Other shapes take the Triton kernel (`sdjax.ops`). Off GPU
the kernel runs in Mosaic GPU's interpret mode (tests; slow, small shapes), where the products
are plain float32 dots of the same tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from custom_calls._common import resolve_interpret

COMPUTE_WARPGROUPS = 2  # two consumers share each w tile
WGMMA_M = 64  # rows of one warpgroup's wgmma
SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16)
# Shared memory a block may use on Hopper (227 KiB), less room for the barriers.
SMEM_LIMIT_BYTES = 227 * 1024 - 1024
# Registers per thread after `set_max_registers` (64K 32-bit registers per SM across 3
# warpgroups of 128 threads: 2 * 232 + 40 <= 512).
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
SQRT_HALF = 0.7071067811865476


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopperConfig:
    """Block sizes of one launch: a program computes [2 * block_m, block_n] of the output."""

    block_m: int = 64  # rows per consumer warpgroup, a multiple of 64
    block_n: int = 128  # output columns (and as many gate columns), a multiple of 64
    block_k: int = 64  # reduction step: 64 fp16 = 128 bytes, the widest TMA/wgmma swizzle
    stages: int = 3  # reduction steps in flight (shared-memory ring buffers)

    def __post_init__(self):
        if self.block_m % WGMMA_M:
            raise ValueError(f"block_m={self.block_m} must be a multiple of {WGMMA_M}")
        for f in ("block_n", "block_k"):
            if getattr(self, f) % 64:
                raise ValueError(f"{f}={getattr(self, f)} must be a multiple of 64")
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be >= 1")


def smem_bytes(config: HopperConfig, d: int, dtype) -> int:
    """Shared memory of the ring (x, hidden and gate tiles), the bias and the output tiles,
    for a reduction over d (the ring holds at most d / block_k steps)."""
    item = jnp.dtype(dtype).itemsize
    rows = COMPUTE_WARPGROUPS * config.block_m
    stages = min(config.stages, max(1, d // config.block_k))
    ring = stages * (rows * config.block_k + 2 * config.block_k * config.block_n)
    return item * (ring + rows * config.block_n + COMPUTE_WARPGROUPS * 2 * config.block_n)


def heuristic_config(m: int, d: int, f: int) -> HopperConfig:
    """A first guess: 128 x 128 output tiles; 64 columns where that leaves too few programs
    to fill the H100's 132 SMs twice (SD1.5's 16x16 level: 512 x 5120)."""
    del d
    block_n = 128 if (m // (COMPUTE_WARPGROUPS * WGMMA_M)) * (f // 128) >= 264 else 64
    return HopperConfig(block_m=WGMMA_M, block_n=block_n)


def supports(x_shape, w_shape, dtype, config: HopperConfig | None = None) -> str | None:
    """None if the kernel can run x [..., D] @ w [D, 2F] with `config` (default: the
    heuristic), else the reason it cannot."""
    d, f2 = w_shape
    m = 1
    for s in x_shape[:-1]:
        m *= s
    config = config or heuristic_config(m, d, f2 // 2)
    if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (fp16/bf16 only)"
    if m % (COMPUTE_WARPGROUPS * config.block_m):
        return f"M={m} is not a multiple of {COMPUTE_WARPGROUPS * config.block_m}"
    if d % config.block_k:
        return f"D={d} is not a multiple of block_k={config.block_k}"
    if (f2 // 2) % config.block_n:
        return f"F={f2 // 2} is not a multiple of block_n={config.block_n}"
    if (smem := smem_bytes(config, d, dtype)) > SMEM_LIMIT_BYTES:
        return f"its tiles need {smem} bytes of shared memory (> {SMEM_LIMIT_BYTES})"
    return None


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    try:  # public from jax 0.11
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
    except ImportError:  # jax 0.10
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()  # raises on out-of-bounds reads; fresh memory holds NaN


def _gelu(g):
    """Exact GELU in float32: g * Phi(g), Phi the standard normal CDF through erf."""
    return 0.5 * g * (1.0 + lax.erf(g * SQRT_HALF))


def _column_vector(ref, *, interpret: bool):
    """A [block_n] vector from shared memory, laid out to broadcast along the rows of a
    wgmma accumulator."""
    if interpret:
        return ref[...]
    layout = plgpu.Layout.WGMMA.reduce(0)
    try:
        return plgpu.load(ref, layout=layout)  # jax 0.11
    except TypeError:  # jax 0.10: the index is positional
        return plgpu.load(ref, (slice(None),), layout=layout)


def _kernel(
    x_ref, w_ref, b_ref, o_ref,
    x_smem, h_smem, g_smem, b_smem, o_smem, full, free, b_full,
    *, inner, block_m, block_n, block_k, stages, k_steps, interpret,
):  # fmt: skip
    """One program: rows [m0, m0 + 2 * block_m) and output columns [n0, n0 + block_n).

    x_ref [M, D]; w_ref [D, 2F] (hidden columns first); b_ref [2F]; o_ref [M, F].
    x_smem [stages, 2 * block_m, block_k]; h_smem, g_smem [stages, block_k, block_n];
    b_smem [2 warpgroups, 2, block_n]; o_smem [2 warpgroups, block_m, block_n].
    """
    wg = lax.axis_index("wg")
    m0 = lax.axis_index("m_tiles") * (COMPUTE_WARPGROUPS * block_m)
    n0 = lax.axis_index("n_tiles") * block_n

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        # this warpgroup's biases: hidden's and gate's columns of the tile
        plgpu.copy_gmem_to_smem(b_ref.at[pl.ds(n0, block_n)], b_smem.at[wg, 0], b_full.at[wg])
        plgpu.copy_gmem_to_smem(
            b_ref.at[pl.ds(inner + n0, block_n)], b_smem.at[wg, 1], b_full.at[wg]
        )
        rows = pl.ds(wg * block_m, block_m)

        if interpret:  # plain float32 dots of the same tiles (see the module doc)

            def step(i, acc):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(full.at[slot])
                xt = x_smem.at[slot][rows, :].astype(jnp.float32)
                hidden = acc[0] + jnp.dot(xt, h_smem.at[slot][...].astype(jnp.float32))
                gate = acc[1] + jnp.dot(xt, g_smem.at[slot][...].astype(jnp.float32))
                plgpu.barrier_arrive(free.at[slot])
                return hidden, gate

            zeros = jnp.zeros((block_m, block_n), jnp.float32)
            hidden, gate = lax.fori_loop(0, k_steps, step, (zeros, zeros))
        else:

            def accumulate(h_acc, g_acc):
                @pl.loop(0, k_steps)
                def _step(i):
                    slot = lax.rem(i, stages)
                    plgpu.barrier_wait(full.at[slot])
                    xt = x_smem.at[slot].at[rows]
                    plgpu.wgmma(h_acc, xt, h_smem.at[slot])
                    plgpu.wgmma(g_acc, xt, g_smem.at[slot])
                    plgpu.wgmma_wait(0)  # both products read the slot: done before it is freed
                    plgpu.barrier_arrive(free.at[slot])

                return h_acc[...], g_acc[...]

            acc = plgpu.ACC((block_m, block_n), jnp.float32)
            hidden, gate = pl.run_scoped(accumulate, acc, acc)

        plgpu.barrier_wait(b_full.at[wg])
        shape = (block_m, block_n)
        bias_h = _column_vector(b_smem.at[wg, 0], interpret=interpret).astype(jnp.float32)
        bias_g = _column_vector(b_smem.at[wg, 1], interpret=interpret).astype(jnp.float32)
        hidden = hidden + lax.broadcast_in_dim(bias_h, shape, [1])
        gate = gate + lax.broadcast_in_dim(bias_g, shape, [1])
        o_smem.at[wg][...] = (hidden * _gelu(gate)).astype(o_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_smem.at[wg], o_ref.at[pl.ds(m0 + wg * block_m, block_m), pl.ds(n0, block_n)]
        )
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

        def fetch(i, slot):
            ks = pl.ds(i * block_k, block_k)
            plgpu.copy_gmem_to_smem(
                x_ref.at[pl.ds(m0, COMPUTE_WARPGROUPS * block_m), ks], x_smem.at[slot],
                full.at[slot],
            )  # fmt: skip
            plgpu.copy_gmem_to_smem(w_ref.at[ks, pl.ds(n0, block_n)], h_smem.at[slot],
                                    full.at[slot])  # fmt: skip
            plgpu.copy_gmem_to_smem(w_ref.at[ks, pl.ds(inner + n0, block_n)], g_smem.at[slot],
                                    full.at[slot])  # fmt: skip

        for i in range(stages):  # fill the ring
            fetch(i, i)

        @pl.loop(stages, k_steps)
        def _refill(i):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(free.at[slot])
            fetch(i, slot)

        for i in range(k_steps - stages, k_steps):  # drain: every phase is waited once
            plgpu.barrier_wait(free.at[i % stages])


def _transforms(columns: int, dtype):
    """Tiling and swizzle of a shared-memory tile `columns` wide: 64 fp16 columns is one
    128-byte swizzled tile (narrower tiles take a narrower swizzle)."""
    item = jnp.dtype(dtype).itemsize
    swizzle = min(128, columns * item)
    return (plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def geglu_hopper(x, w, b, *, config: HopperConfig | None = None, interpret=None):
    """hidden * gelu(gate), [hidden, gate] = split(x @ w + b). x [..., D], w [D, 2F], b [2F]
    -> [..., F] in x's dtype (fp16/bf16); w and b are cast to it, products accumulate in
    float32. Raises ValueError for shapes outside the kernel's scope (see `supports`)."""
    if w.ndim != 2 or x.ndim < 1 or w.shape[0] != x.shape[-1] or w.shape[1] % 2:
        raise ValueError(
            f"geglu_hopper wants x [..., D] and w [D, 2F]; got {x.shape=} {w.shape=}"
        )
    if b.shape != (w.shape[1],):
        raise ValueError(f"geglu_hopper: bias must be [{w.shape[1]}]; got {b.shape=}")
    d, inner = x.shape[-1], w.shape[1] // 2
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    config = config or heuristic_config(m, d, inner)
    if why := supports(x.shape, w.shape, x.dtype, config):
        raise ValueError(f"geglu_hopper cannot run {x.shape} @ {w.shape}: {why}")
    interpret = resolve_interpret(interpret)
    k_steps = d // config.block_k
    stages = min(config.stages, k_steps)
    dtype = x.dtype
    in_t, out_t = _transforms(config.block_k, dtype), _transforms(config.block_n, dtype)
    rows = COMPUTE_WARPGROUPS * config.block_m
    scratch = [
        plgpu.SMEM((stages, rows, config.block_k), dtype, transforms=in_t),  # x
        plgpu.SMEM((stages, config.block_k, config.block_n), dtype, transforms=out_t),  # hidden
        plgpu.SMEM((stages, config.block_k, config.block_n), dtype, transforms=out_t),  # gate
        plgpu.SMEM((COMPUTE_WARPGROUPS, 2, config.block_n), dtype),  # biases
        plgpu.SMEM((COMPUTE_WARPGROUPS, config.block_m, config.block_n), dtype, transforms=out_t),
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # full: x, hidden and gate tiles
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),  # free
        plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WARPGROUPS),  # b_full: two copies
    ]
    kernel = functools.partial(
        _kernel,
        inner=inner,
        block_m=config.block_m,
        block_n=config.block_n,
        block_k=config.block_k,
        stages=stages,
        k_steps=k_steps,
        interpret=interpret,
    )
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, inner), dtype),
        scratch_types=scratch,
        grid=(m // rows, inner // config.block_n),
        grid_names=("m_tiles", "n_tiles"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(interpret),
        kernel_name="sdjax_geglu_hopper",
    )(x2, w.astype(dtype), b.astype(dtype))
    return out.reshape(*x.shape[:-1], inner)
