"""Attention at every SD shape: our kernels (flash, flash_hopper, fused softmax) vs XLA, cuDNN
and torch SDPA.

GPU. All implementations run side by side in one process on the same random inputs, each
timed in one compiled program of chained calls (q <- attention(q, k, v)), the launch overhead
subtracted (torch: CUDA events over back-to-back calls) and checked against the
float32 reference in the same run. Writes JSON, a markdown table and a PNG chart to
`results_dir()` ($OUT on the device machine).

    PYTHONPATH=. python experiments/bench_attention.py --dtype=float16
"""

from __future__ import annotations

import datetime
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from custom_calls.cross_attention import cross_attention
from custom_calls.cross_attention import supports as cross_supports
from custom_calls.flash_attention import flash_attention, flash_attention_reference
from custom_calls.flash_attention_hopper import flash_attention_hopper, padded_head_dim
from custom_calls.flash_attention_hopper import supports as hopper_supports
from custom_calls.flash_attention_hopper import tuned_config as hopper_tuned_config
from custom_calls.fused_softmax import fused_softmax_attention
from experiments.common import (
    device_info,
    kernel_us,
    markdown_table,
    relative_error,
    results_dir,
    time_torch,
    write_json,
)
from sdjax.shapes import ATTENTION_SHAPES

IMPLS = (
    "flash", "flash_hopper", "flash_hopper_padded", "fused_softmax", "cross", "cudnn", "torch",
    "xla",
)  # fmt: skip
# Our kernels. cross (`custom_calls.cross_attention`, every head of a block of query rows in one
# program) runs only key sets up to its MAX_KEYS; the others take any [B, L, H, D] input.
OURS = ("flash", "flash_hopper", "fused_softmax", "cross")
# flash_hopper_padded: the Hopper kernel on inputs whose heads are already padded to its
# config's head_align (zero columns), as the UNet produces them (`ops.self_attention_packed`):
# the kernel without the copies that flash_hopper makes itself. Only at head dims that need
# padding.
TOLERANCE = {"float16": 5e-3, "bfloat16": 1e-2, "float32": 1e-5}

FLAGS = flags.FLAGS


def define_flags():
    """Called only when run as a script, so that importing `benchmark` defines no flags."""
    flags.DEFINE_string("dtype", "float16", "input dtype")
    flags.DEFINE_list("shapes", [], "shape names from sdjax.shapes (default: all)")
    flags.DEFINE_list("impls", list(IMPLS), "implementations to run")
    flags.DEFINE_integer("calls", 30, "chained calls per timed program")
    flags.DEFINE_integer("repeats", 7, "timed repeats (median)")
    flags.DEFINE_bool(
        "kernel_us", False,
        "also each jax implementation's device kernel time per call (experiments.common."
        "kernel_us: distinct inputs, launch gaps left out, as inside the UNet's command buffer)",
    )  # fmt: skip


def _jax_mosaic_fa3(q, k, v):
    """JAX's own FlashAttention-3 example kernel (jax.experimental.pallas.ops.gpu.attention_mgpu),
    a reference point for what Mosaic GPU reaches. It applies no softmax scale, so q is scaled
    first; head dims are padded to 64 as ours are."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    d = q.shape[-1]
    pad = ((0, 0),) * 3 + ((0, padded_head_dim(d) - d),)
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
    q_, k_, v_ = (jnp.pad(t, pad) for t in (q * d**-0.5, k, v))
    return attention_mgpu.attention(q_, k_, v_, config)[..., :d]


_JAX_IMPLS = {
    "flash": lambda q, k, v: flash_attention(q, k, v),
    "flash_hopper": lambda q, k, v: flash_attention_hopper(q, k, v),
    "fused_softmax": lambda q, k, v: fused_softmax_attention(q, k, v),
    "cross": lambda q, k, v: cross_attention(q, k, v),
    "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
    "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    "jax_mosaic_fa3": _jax_mosaic_fa3,  # not in IMPLS: ask for it with --impls
}


def chained_program(fn, q, k, v, calls: int, *, compile: bool = True):
    """A compiled (else lowered) program of `calls` calls of fn chained as q <- fn(q, k, v).

    The true data dependency keeps XLA from merging or dropping calls (an optimization
    barrier around unchanged arguments does not: XLA removes it and merges the calls).
    Returns (first call's output, last call's output): the first is checked for correctness.
    """

    def body(q, k, v):
        first = q = fn(q, k, v)
        for _ in range(calls - 1):
            q = fn(q, k, v)
        return first, q

    lowered = jax.jit(body).lower(q, k, v)
    return lowered.compile() if compile else lowered


@functools.cache
def launch_overhead_ms(repeats: int = 21) -> float:
    """Wall time of dispatching and synchronizing one trivial one-kernel program."""
    x = jnp.ones((256,), jnp.float32)
    fn = jax.jit(lambda x: x + 1.0).lower(x).compile()
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_compiled(compiled, args, calls: int, repeats: int) -> float:
    """Median ms per call of a chained program over `repeats` runs, after one warm-up."""
    _time_program_once(compiled, args, calls)
    return statistics.median(_time_program_once(compiled, args, calls) for _ in range(repeats))


def _error_text(e: Exception) -> str:
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:200]}"


def _torch_sdpa(q, k, v, dtype_name, calls):
    """torch SDPA on the same data ([B, L, H, D] -> [B, H, L, D]).

    Returns (output, time_once, release): time_once() times `calls` back-to-back calls once
    with CUDA events and returns ms per call; release() frees the GPU tensors."""
    import torch
    import torch.nn.functional as F

    tdtype = getattr(torch, dtype_name)
    qkv = [
        torch.from_numpy(np.asarray(t, np.float32)).to("cuda", tdtype).permute(0, 2, 1, 3)
        for t in (q, k, v)
    ]
    qkv = [t.contiguous() for t in qkv]

    def call():
        with torch.no_grad():
            return F.scaled_dot_product_attention(*qkv)

    out = call().permute(0, 2, 1, 3).float().cpu().numpy()

    def release():
        qkv.clear()
        torch.cuda.empty_cache()

    return out, lambda: time_torch(call, calls=calls, repeats=1)["median_ms"], release


def _time_program_once(program, args, calls: int) -> float:
    """ms per call of one run of a chained program, the launch overhead subtracted."""
    t0 = time.perf_counter()
    jax.block_until_ready(program(*args))
    ms = (time.perf_counter() - t0) * 1e3
    return max(ms - launch_overhead_ms(), 0.0) / calls


def benchmark(
    dtype: str = "float16",
    names=None,
    impls=IMPLS,
    *,
    calls: int = 20,
    repeats: int = 7,
    on_shape=None,
    kernel_time: bool = False,
) -> list[dict]:
    """One row per (shape, implementation): ms, TFLOP/s, relative error, or the error raised.

    Per shape, every implementation is compiled, checked against the reference and warmed up
    first; then the timed repeats go round-robin over the implementations (each round in a
    rotated order), so that a drift of the GPU's clocks during the run reaches them all
    alike. ms is the median over the repeats.

    names: shape names of `sdjax.shapes.ATTENTION_SHAPES` (None: all). on_shape(rows) is
    called after each shape with the rows so far (for incremental saving). kernel_time: each
    jax implementation's device kernel time too (`kernel_us`, microseconds per call).
    """
    dtype = jnp.dtype(dtype)
    rows = []
    rng = np.random.default_rng(0)
    for name in names or ATTENTION_SHAPES:
        shape = ATTENTION_SHAPES[name]
        q, k, v = (
            jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
            for s in (shape.q_shape, shape.kv_shape, shape.kv_shape)
        )
        ref = np.asarray(jax.jit(flash_attention_reference)(q, k, v))
        shape_rows, timers, releases = {}, {}, []
        for impl in impls:
            row = {"shape": name, "impl": impl, "dtype": dtype.name, "b": shape.batch,
                   "q_len": shape.q_len, "heads": shape.heads, "head_dim": shape.head_dim,
                   "kv_len": shape.kv_len}  # fmt: skip
            try:
                if impl == "flash_hopper" and (why := hopper_supports(q.shape, k.shape, dtype)):
                    raise ValueError(why)
                if impl == "cross" and (why := cross_supports(q.shape, k.shape)):
                    raise ValueError(why)
                if impl == "flash_hopper_padded":
                    config = hopper_tuned_config(q.shape, k.shape, dtype)
                    d_pad = padded_head_dim(shape.head_dim, config.head_align)
                    if d_pad == shape.head_dim:
                        raise ValueError("the head dim needs no padding: same as flash_hopper")
                if impl == "torch":
                    out, timers[impl], release = _torch_sdpa(q, k, v, dtype.name, calls)
                    releases.append(release)
                elif impl == "flash_hopper_padded":  # the config of the unpadded shape
                    d = shape.head_dim
                    pad = ((0, 0),) * 3 + ((0, d_pad - d),)
                    args = tuple(jnp.pad(t, pad) for t in (q, k, v))
                    fn = functools.partial(flash_attention_hopper, scale=d**-0.5, config=config)
                    program = chained_program(fn, *args, calls)
                    out = program(*args)[0][..., :d]
                    timers[impl] = functools.partial(_time_program_once, program, args, calls)
                    timers[impl]()  # warm-up
                else:
                    program = chained_program(_JAX_IMPLS[impl], q, k, v, calls)
                    out = program(q, k, v)[0]
                    timers[impl] = functools.partial(_time_program_once, program, (q, k, v), calls)
                    timers[impl]()  # warm-up
                row["rel_err"] = relative_error(out, ref)
                row["ok"] = row["rel_err"] <= TOLERANCE[dtype.name]
            except Exception as e:  # unsupported shapes are recorded, not hidden
                row["error"] = _error_text(e)
            shape_rows[impl] = row
        times = {impl: [] for impl in timers}
        order = list(timers)
        for r in range(repeats):
            for impl in order[r % len(order) :] + order[: r % len(order)]:
                times[impl].append(timers[impl]())
        for impl, row in shape_rows.items():
            if impl in times:
                row["ms"] = statistics.median(times[impl])
                row["all_ms"] = times[impl]
                row["tflops"] = shape.flops / (row["ms"] * 1e-3) / 1e12 if row["ms"] > 0 else None
                if kernel_time and impl in _JAX_IMPLS:
                    row["kernel_us"] = kernel_us(_JAX_IMPLS[impl], q, k, v)["us"]
            rows.append(row)
            print(
                f"{name:16s} {impl:14s} "
                + (f"{row['ms']:.4f} ms err {row['rel_err']:.2e}" if "ms" in row else row["error"]),
                flush=True,
            )
        for release in releases:
            release()
        del q, k, v, ref, timers
        if on_shape:
            on_shape(rows)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """One row per shape: each implementation's ms, ours' errors, `ours` (the fastest of our
    kernels that passed) and the ratios other / ours (> 1: ours faster)."""
    table = {}
    for r in rows:
        s = table.setdefault(r["shape"], {"shape": r["shape"]})
        s[r["impl"]] = r.get("ms") if "ms" in r and r["ms"] > 0 else "n/a"
        if "kernel_us" in r:
            s[f"{r['impl']}_us"] = r["kernel_us"]
        if r["impl"] in (*OURS, "flash_hopper_padded"):
            s[f"{r['impl']}_err"] = r.get("rel_err")
        if r["impl"] in OURS:
            if r.get("ok") and r.get("ms") and r["ms"] < s.get("ours", float("inf")):
                s["ours"], s["ours_impl"] = r["ms"], r["impl"]
    for s in table.values():
        for other in ("cudnn", "torch", "xla"):
            if isinstance(s.get("ours"), float) and isinstance(s.get(other), float):
                s[f"{other}/ours"] = s[other] / s["ours"]
    return list(table.values())


def _chart(summary_rows, impls, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [s["shape"] for s in summary_rows]
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4.5))
    for i, impl in enumerate(impls):
        vals = [s.get(impl) if isinstance(s.get(impl), float) else 0.0 for s in summary_rows]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=impl)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (log)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv):
    del argv
    info = device_info()
    tag = re.sub(r"[^A-Za-z0-9]+", "_", info["device_kind"]).strip("_")
    date = datetime.date.today().isoformat()
    stem = results_dir() / f"bench_attention_{tag}_{FLAGS.dtype}_{date}"
    impls = [i for i in (*IMPLS, "jax_mosaic_fa3") if i in FLAGS.impls]
    record = {"device": info, "dtype": FLAGS.dtype, "calls": FLAGS.calls}

    def save(rows):
        record["rows"] = rows
        record["summary"] = summary(rows)
        write_json(stem.with_suffix(".json"), record)

    rows = benchmark(
        FLAGS.dtype, FLAGS.shapes or None, impls,
        calls=FLAGS.calls, repeats=FLAGS.repeats, on_shape=save, kernel_time=FLAGS.kernel_us,
    )  # fmt: skip
    save(rows)
    columns = ["shape", *impls, "ours_impl", "cudnn/ours", "torch/ours", "xla/ours"]
    columns += [f"{i}_err" for i in OURS if i in impls]
    if FLAGS.kernel_us:
        columns += [f"{i}_us" for i in impls if i in _JAX_IMPLS]
    md = markdown_table(record["summary"], columns)
    title = f"attention, {FLAGS.dtype}, {info['device_kind']}, jax {info['jax']}"
    unit = "ms per call (median); *_us: device kernel time per call" if FLAGS.kernel_us else (
        "ms per call (median)")  # fmt: skip
    stem.with_suffix(".md").write_text(f"# {title}\n\n{unit}\n\n{md}")
    _chart(record["summary"], impls, stem.with_suffix(".png"), title)
    print(md)


if __name__ == "__main__":
    define_flags()
    app.run(main)
