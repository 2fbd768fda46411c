"""Fills custom_calls/tuning/attention.json with the fastest config per SD attention shape.

GPU only. For every shape of `sdjax.shapes.ATTENTION_SHAPES` (the most expensive first, within
a time budget) and each kernel, compiles the candidate configs in parallel threads, times
each in one compiled program of chained calls (median of repeats), checks its output against
the float32 reference, and records the fastest correct one. fp16 and bf16 share an entry.

    PYTHONPATH=. python experiments/tune_attention.py --budget_s=100
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from custom_calls.cross_attention import MAX_KEYS, cross_attention
from custom_calls.cross_attention import Config as CrossConfig
from custom_calls.flash_attention import (
    MAX_HEAD_DIM,
    TUNING_PATH,
    clamp_block,
    flash_attention,
    flash_attention_reference,
    head_chunks,
    shape_key,
)
from custom_calls.flash_attention import Config as FlashConfig
from custom_calls.flash_attention import heuristic_config as flash_heuristic_config
from custom_calls.flash_attention_hopper import (
    OVERLAP_MAX_TILE,
    HopperConfig,
    flash_attention_hopper,
    padded_head_dim,
    supports,
)
from custom_calls.fused_softmax import Config as FusedConfig
from custom_calls.fused_softmax import fused_softmax_attention
from experiments.bench_attention import chained_program, time_compiled
from experiments.common import device_info, kernel_us, relative_error, results_dir, write_json
from sdjax.shapes import ATTENTION_SHAPES

_KERNELS = flags.DEFINE_list("kernels", ["flash", "fused_softmax"], "kernels to tune")
_SHAPES = flags.DEFINE_list("shapes", [], "shape names (default: all, most FLOPs first)")
_FULL = flags.DEFINE_list("full_sweep", ["sd15_self_64"], "shapes that get the full grid")
_FAST = flags.DEFINE_list("fast_exp_sweep", [], "shapes that also try Config.fast_exp (flash)")
_HALF = flags.DEFINE_bool(
    "hopper_half_exp", False,
    "flash_hopper: also try each config with fp16 exponentials (HopperConfig.half_exp, with "
    "and without half_sum); they apply to fp16 inputs only",
)  # fmt: skip
_MMA_SUM = flags.DEFINE_bool(
    "hopper_mma_sum", False,
    "flash_hopper: also try each config with the row sums on the tensor cores "
    "(HopperConfig.mma_row_sum)",
)  # fmt: skip
_OVERLAP = flags.DEFINE_bool(
    "hopper_overlap", False,
    "flash_hopper: also try each config without the ping-pong with step i + 1's scores under "
    "step i's softmax (HopperConfig.overlap_qk), where its two score tiles fit",
)  # fmt: skip
_LAZY = flags.DEFINE_bool(
    "hopper_lazy_sum", False,
    "flash_hopper: also try each config with fp32 exponentials and row sums in registers "
    "with the row sums kept per thread until the end (HopperConfig.lazy_sum)",
)  # fmt: skip
_KERNEL_US = flags.DEFINE_integer(
    "kernel_us_top", 0,
    "re-time this many of each shape's fastest configs (by the chained-call time) by device "
    "kernel time (experiments.common.kernel_us) and record the fastest by that; 0: off. Below "
    "~20 us a call the chained-call times of one config move by 20-35% between processes",
)  # fmt: skip
_DTYPE = flags.DEFINE_string("dtype", "float16", "input dtype to tune with")
_BUDGET = flags.DEFINE_float("budget_s", 100.0, "stop starting new shapes after this long")
_WORKERS = flags.DEFINE_integer("workers", 8, "parallel compilations")
_CALLS = flags.DEFINE_integer("calls", 20, "back-to-back calls per timed program")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repeats (median)")
_OUT = flags.DEFINE_string("out", str(TUNING_PATH), "tuning table to update")

KERNELS = {
    "flash": (flash_attention, FlashConfig),
    "fused_softmax": (fused_softmax_attention, FusedConfig),
    "flash_hopper": (flash_attention_hopper, HopperConfig),
    "cross": (cross_attention, CrossConfig),
}
TOLERANCE = {"float16": 5e-3, "bfloat16": 1e-2, "float32": 1e-5}


FAST_EXP_BASE = [(128, 64, 8, 4), (128, 64, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4),
                 (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 4, 3)]  # fmt: skip


def hopper_candidates(shape, half_exp: bool = False, mma_sum: bool = False,
                      overlap: bool = False, lazy: bool = False) -> list[HopperConfig]:  # fmt: skip
    """The Hopper kernel's grid, less the configs that cannot run the shape. `half_exp`: each
    config also with fp16 exponentials, with fp32 and with fp16 row sums per tile. `mma_sum`:
    each config also with the row sums on the tensor cores. `overlap`: each config without
    the ping-pong also with `overlap_qk`, where its tiles allow it. `lazy`: each config with
    fp32 exponentials and row sums in registers also with `lazy_sum`."""
    # A narrower swizzle only where it pads less (SD's head dims 40, 80, 160).
    aligns = (64, 16) if shape.head_dim % 64 else (64,)
    halves = ((False, False), (True, False), (True, True)) if half_exp else ((False, False),)
    grid = itertools.product((64, 128), (64, 128, 256), (2, 3), (True, False), aligns, halves)
    configs = [HopperConfig(block_q=bq, block_kv=bk, stages=st, pingpong=pp, head_align=al,
                            half_exp=he, half_sum=hs)
               for bq, bk, st, pp, al, (he, hs) in grid]  # fmt: skip
    if mma_sum:
        configs += [dataclasses.replace(c, mma_row_sum=True, half_sum=False) for c in configs]
        configs = list(dict.fromkeys(configs))
    if overlap:
        configs += [dataclasses.replace(c, overlap_qk=True) for c in configs
                    if not c.pingpong and c.block_q * c.block_kv <= OVERLAP_MAX_TILE]  # fmt: skip
    if lazy:
        configs += [dataclasses.replace(c, lazy_sum=True) for c in configs
                    if not (c.half_exp or c.mma_row_sum)]  # fmt: skip
    return [c for c in configs if supports(shape.q_shape, shape.kv_shape, jnp.float16, c) is None]


def cross_candidates(shape) -> list[CrossConfig]:
    """The all-heads kernel's grid (none past its MAX_KEYS): query rows per program, warps,
    the heads loop's pipeline depth, and the head split where it differs."""
    if shape.kv_len > MAX_KEYS:
        return []
    differ = head_chunks(shape.head_dim, True) != head_chunks(shape.head_dim, False)
    grid = itertools.product(
        (16, 32, 64, 128), (4, 8), (1, 2, 3), (True, False) if differ else (True,)
    )
    configs = [CrossConfig(block_q=clamp_block(bq, shape.q_len), num_warps=w, num_stages=st,
                           head_split=sp)
               for bq, w, st, sp in grid if not (w == 8 and bq < 64)]  # fmt: skip
    return list(dict.fromkeys(configs))


def candidates(kernel: str, shape, full: bool, fast_exp: bool = False) -> list:
    """Configs to try, deduplicated after clamping blocks to the sequence lengths."""
    if kernel == "cross":
        return cross_candidates(shape)
    if kernel == "flash_hopper":
        return hopper_candidates(shape, _HALF.value and _DTYPE.value == "float16", _MMA_SUM.value,
                                 _OVERLAP.value, _LAZY.value)  # fmt: skip
    cls = KERNELS[kernel][1]
    differ = head_chunks(shape.head_dim, True) != head_chunks(shape.head_dim, False)
    splits = [True, False] if differ else [True]
    if kernel == "flash" and fast_exp:
        grid = [
            (*b, sp, fe) for b, sp, fe in itertools.product(FAST_EXP_BASE, splits, (False, True))
        ]
    elif kernel == "flash" and full:
        shapes = [(64, 4), (128, 4), (128, 8), (256, 8)]
        grid = [
            (bq, bk, w, st, sp, False)
            for (bq, w), bk, st, sp in itertools.product(shapes, (32, 64, 128), (2, 3, 4), splits)
        ]
    elif kernel == "flash":
        base = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3),
                (128, 128, 8, 2), (64, 128, 4, 2)]  # fmt: skip
        if shape.kv_len <= MAX_KEYS:
            # short key sets (the cross kernel's, the prompt's): smaller programs, more of them
            # resident at once
            # (ncu at 64x64: 84 registers a thread, 1.55 waves of 1024 programs, warps stalled
            # on global loads)
            base += [(32, 32, 4, 2), (32, 64, 4, 2), (32, 128, 4, 2), (16, 32, 4, 2),
                     (16, 128, 4, 2), (32, 32, 2, 2)]  # fmt: skip
        grid = [(*b, sp, False) for b, sp in itertools.product(base, splits)]
    else:
        base = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2)]
        grid = [(*b, True, False) for b in base]
    seen, out = set(), []
    for bq, bk, w, st, sp, fe in grid:
        key = (clamp_block(bq, shape.q_len), clamp_block(bk, shape.kv_len), w, st, sp, fe)
        if key not in seen:
            seen.add(key)
            extra = {"fast_exp": fe} if fe else {}
            out.append(
                cls(block_q=key[0], block_k=key[1], num_warps=w, num_stages=st, head_split=sp,
                    **extra)
            )  # fmt: skip
    return out


def tune_shape(kernel, shape, dtype, configs, ref, args, pool) -> list[dict]:
    fn = KERNELS[kernel][0]
    futures = []
    for config in configs:  # lower (Python) here, compile (XLA + Triton) in the threads
        try:
            call = functools.partial(fn, config=config)
            lowered = chained_program(call, *args, _CALLS.value, compile=False)
            futures.append(pool.submit(lowered.compile))
        except Exception as e:
            futures.append(e)
    rows = []
    for config, fut in zip(configs, futures, strict=True):
        row = {"config": dataclasses.asdict(config)}
        try:
            if isinstance(fut, Exception):
                raise fut
            program = fut.result()
            row["rel_err"] = relative_error(program(*args)[0], ref)
            row["ms"] = time_compiled(program, args, _CALLS.value, _REPEATS.value)
        except Exception as e:  # a config that does not compile (shared memory) is recorded
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
    return rows


def _in_force(kernel, shape, dtype, entry) -> dict | None:
    """The config the kernel runs at this shape now, as a grid row records it: the table's
    entry, else (flash) its heuristic's, blocks clamped to the lengths."""
    if entry:
        return dataclasses.asdict(KERNELS[kernel][1](**entry))
    if kernel != "flash":
        return None
    c = flash_heuristic_config(shape.q_shape, shape.kv_shape, dtype)
    c = dataclasses.replace(c, block_q=clamp_block(c.block_q, shape.q_len),
                            block_k=clamp_block(c.block_k, shape.kv_len))  # fmt: skip
    return dataclasses.asdict(c)


def _best_by_kernel_time(kernel, good: list[dict], args, top: int, in_force=None) -> dict:
    """Of the `top` fastest rows by chained-call time, and the row of the config in force (the
    table's, for the A/B), the fastest by device kernel time (each gets its `kernel_us`)."""
    fn, cls = KERNELS[kernel]
    rows = sorted(good, key=lambda r: r["ms"])[:top]
    rows += [r for r in good if r["config"] == in_force and r not in rows]
    for r in rows:
        call = functools.partial(fn, config=cls(**r["config"]))
        r["kernel_us"] = kernel_us(call, *args)["us"]
    return min(rows, key=lambda r: r["kernel_us"])


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    names = _SHAPES.value or sorted(
        ATTENTION_SHAPES, key=lambda n: (n not in _FULL.value, -ATTENTION_SHAPES[n].flops)
    )
    shapes = [ATTENTION_SHAPES[n] for n in names if ATTENTION_SHAPES[n].head_dim <= MAX_HEAD_DIM]
    table_path = pathlib.Path(_OUT.value)
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    log = {"device": device_info(), "dtype": dtype.name, "shapes": {}}
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with concurrent.futures.ThreadPoolExecutor(_WORKERS.value) as pool:
        for shape in shapes:
            if time.perf_counter() - start > _BUDGET.value:
                print(f"budget spent; not tuned: {shape.name}")
                continue
            args = [
                jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
                for s in (shape.q_shape, shape.kv_shape, shape.kv_shape)
            ]
            ref = jax.jit(flash_attention_reference)(*args)
            for kernel in _KERNELS.value:
                configs = candidates(
                    kernel, shape, shape.name in _FULL.value, shape.name in _FAST.value
                )
                if not configs:
                    continue
                rows = tune_shape(kernel, shape, dtype, configs, ref, args, pool)
                good = [r for r in rows if "ms" in r and r["rel_err"] <= TOLERANCE[dtype.name]]
                log["shapes"].setdefault(shape.name, {})[kernel] = rows
                if not good:
                    print(f"{shape.name} {kernel}: no config passed; {rows[0]}")
                    continue
                best = min(good, key=lambda r: r["ms"])
                key = shape_key(shape.q_shape, shape.kv_len, dtype)
                if _KERNEL_US.value:
                    in_force = _in_force(kernel, shape, dtype, table.get(kernel, {}).get(key))
                    best = _best_by_kernel_time(kernel, good, args, _KERNEL_US.value, in_force)
                    for r in good:
                        if "kernel_us" in r:
                            mark = " (in force)" if r["config"] == in_force else ""
                            print(f"  {r['kernel_us']:.2f} us {r['ms']:.4f} ms {r['config']}{mark}")
                table.setdefault(kernel, {})[key] = best["config"]
                if kernel == "flash_hopper":
                    # The UNet calls the kernel on heads it already padded (zero columns): the
                    # same work as this shape, under the padded shape's key.
                    d_pad = padded_head_dim(shape.head_dim, best["config"]["head_align"])
                    if d_pad != shape.head_dim:
                        padded_q = (*shape.q_shape[:3], d_pad)
                        table[kernel][shape_key(padded_q, shape.kv_len, dtype)] = best["config"]
                errors = sum("error" in r for r in rows)
                by_us = f", {best['kernel_us']:.2f} us" if "kernel_us" in best else ""
                print(
                    f"{shape.name:16s} {kernel:13s} best {best['ms']:.4f} ms{by_us} of {len(rows)} "
                    f"({errors} failed): {best['config']}",
                    flush=True,
                )
            del args, ref
    table["device"] = log["device"]["device_kind"]
    table["jax"] = log["device"]["jax"]
    write_json(_OUT.value, table)
    out = results_dir() / "tune_attention.json"
    write_json(out, log)
    print(f"wrote {_OUT.value} and {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
