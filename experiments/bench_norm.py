"""GroupNorm(+SiLU) and GEGLU at every SD shape: our Pallas kernels vs XLA and torch.

GPU. Everything runs side by side in one process on the same random inputs, each timed in a
jitted chain of back-to-back calls (torch: CUDA events) and checked against the float32
reference in the same run. GroupNorm bandwidth counts one read and one write of x and is set
against a device-to-device copy measured in the same run. GEGLU compares the fused kernel,
our element-wise epilogue after an XLA matmul, and XLA un-fused. Writes JSON, a markdown table
and a PNG chart to `results_dir()` ($OUT on the device machine).

    PYTHONPATH=. python experiments/bench_norm.py --dtype=float16 [--sweep]
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import itertools
import json
import math
import pathlib
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from custom_calls import (
    geglu,
    geglu_elementwise,
    geglu_hopper,
    geglu_reference,
    group_norm,
    layer_norm,
    layer_norm_reference,
)
from custom_calls._common import next_power_of_2, num_sms
from custom_calls.geglu import Config as GegluConfig
from custom_calls.group_norm import TUNING_PATH as GN_TUNING_PATH
from custom_calls.group_norm import Config as GNConfig
from custom_calls.group_norm import (
    group_norm_reference,
    heuristic_config,
    shape_key,
    tuned_config,
)
from custom_calls.layer_norm import Config as LNConfig
from custom_calls.layer_norm import heuristic_config as ln_heuristic_config
from experiments.common import (
    device_info,
    kernel_us_of_sets,
    markdown_table,
    relative_error,
    results_dir,
    time_jax,
    time_torch,
    write_json,
)
from sdjax import ops
from sdjax.shapes import GEGLU_SHAPES, GROUP_NORM_SHAPES, LAYER_NORM_SHAPES

_DTYPE = flags.DEFINE_string("dtype", "float16", "input dtype")
_GN = flags.DEFINE_list("gn_shapes", [], "GroupNorm shape names (default: all)")
_GEGLU = flags.DEFINE_list("geglu_shapes", [], "GEGLU shape names (default: all)")
_LN = flags.DEFINE_list(
    "ln_shapes", [],
    "LayerNorm shape names: XLA's LayerNorm against our kernel over a small block grid (default: "
    "none)",
)  # fmt: skip
_LN_GEGLU = flags.DEFINE_list(
    "ln_geglu_shapes", [],
    "GEGLU shape names at which the LayerNorm before the GEGLU runs apart (XLA's, then our "
    "Hopper GEGLU) and folded into our Hopper GEGLU (`norm_scale`), by device kernel time "
    "and wall time (GPU; default: none)",
)  # fmt: skip
_LN_GEGLU_ABLATE = flags.DEFINE_list(
    "ln_geglu_ablate", [],
    "with --ln_geglu_shapes, also the folded kernel with these parts of its per-step "
    "normalization left out (timing only: wrong results), each a '+'-joined subset of "
    "`geglu_hopper.NORM_ABLATABLE`, e.g. store,stats,store+stats",
)  # fmt: skip
_SWEEP = flags.DEFINE_list("sweep", [], "GroupNorm shapes whose block configs are swept")
_SWEEP_GEGLU = flags.DEFINE_list("sweep_geglu", [], "GEGLU shapes whose tiles are swept")
_SWEEP_GEGLU_HOPPER = flags.DEFINE_list(
    "sweep_geglu_hopper",
    [],
    "GEGLU shapes whose Hopper kernel configs (block_n, stages, cluster) are swept, by device "
    "kernel time (GPU)",
)
# The Hopper GEGLU sweep's grids (`hopper_geglu_candidates`).
GEGLU_HOPPER_GRIDS = ("tiles", "issue", "deep", "ring", "ring_issue", "bias", "resident")
_HOPPER_GRID = flags.DEFINE_enum(
    "geglu_hopper_grid", "tiles", list(GEGLU_HOPPER_GRIDS),
    "the Hopper GEGLU sweep's grid (`hopper_geglu_candidates`)",
)  # fmt: skip
_BUDGET = flags.DEFINE_float("budget_s", 1e9, "stop sweeping after this many seconds")
_TIMING_CHECK = flags.DEFINE_bool("timing_check", False, "also time XLA with common.time_jax")
_REPORT = flags.DEFINE_string(
    "report", "", "re-render the markdown and PNG of this JSON, then exit"
)
_CALLS = flags.DEFINE_integer("calls", 20, "back-to-back calls per timed program")
_PLANS = flags.DEFINE_list(
    "sweep_plans", ["split", "fused"],
    "GroupNorm plans the sweep tries (and the current): split, fused, cooperative; or an "
    "A/B of the config in force, twice, alternating: 'prefetch' alone (without and with "
    "Config.prefetch, and with it at twice the warps) or 'combine' alone (split: the "
    "partials combined by XLA and in the normalize kernel); or 'columns' alone: the config in "
    "force, the columns plan's grid, the config in force again",
)
_GN_TABLE = flags.DEFINE_string(
    "gn_table",
    str(GN_TUNING_PATH),
    "GroupNorm tuning table that the sweep updates with each swept shape's fastest config by "
    "device kernel time ('' to leave it alone)",
)
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed repeats (median)")

_T0 = time.perf_counter()


def _error_text(e: Exception) -> str:
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:200]}"


def _normal(rng, shape, dtype, std=1.0):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * std, dtype)


def _variants(x, n: int) -> list:
    """x and n - 1 fresh random arrays like it, made on the device."""
    keys = jax.random.split(jax.random.key(7), n - 1)
    std = float(jnp.std(x.astype(jnp.float32)))
    return [x] + [(std * jax.random.normal(k, x.shape)).astype(x.dtype) for k in keys]


@functools.cache
def _dispatch_s() -> float:
    """Launch-and-wait cost of a trivial jitted program (subtracted from every timing)."""
    tiny = jax.jit(lambda a: a + 1)
    a = jnp.ones((8,), jnp.float32)
    jax.block_until_ready(tiny(a))
    ts = []
    for _ in range(50):
        t0 = time.perf_counter()
        jax.block_until_ready(tiny(a))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _time(fn, arg_sets) -> float:
    """ms per call: one jitted program calls fn once on each of the distinct argument sets.

    Distinct inputs and returning every output leave XLA nothing to share between calls (with
    one input, chained calls of a pure-XLA function can be merged into one: see the notes).
    """
    prog = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(prog(arg_sets))
    ts = []
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(prog(arg_sets))
        ts.append(time.perf_counter() - t0)
    return max(statistics.median(ts) - _dispatch_s(), 0.0) / len(arg_sets) * 1e3


def _kernel_us(fn, arg_sets, calls: int = 3) -> float:
    """Device kernel time per call, in us (`experiments.common.kernel_us_of_sets`). The wall
    time of a program of small kernels launched one by one measures the host's launch rate
    instead (a 5 MB GroupNorm of ~20 us of kernels read 43-62 us by `_time`)."""
    return kernel_us_of_sets(fn, arg_sets, calls=calls)["us"]


def _torch(fn):
    return time_torch(fn, calls=max(_CALLS.value, 30), repeats=_REPEATS.value)["median_ms"]


def copy_bandwidth(nbytes: int = 1 << 28) -> dict:
    """GB/s (bytes read + written) of a device-to-device copy (torch) and a jnp x * 2."""
    out = {"bytes": nbytes}
    try:
        import torch

        bufs = [torch.randn(nbytes // 2, device="cuda", dtype=torch.float16)]
        bufs.append(torch.empty_like(bufs[0]))
        out["torch_copy_gbs"] = 2 * nbytes / (_torch(lambda: bufs[1].copy_(bufs[0])) * 1e6)
        bufs.clear()
        torch.cuda.empty_cache()
    except Exception as e:
        out["torch_error"] = _error_text(e)
    xs = _variants(_normal(np.random.default_rng(0), (nbytes // 2,), jnp.float16), 4)
    out["jax_scale_gbs"] = 2 * nbytes / (_time(lambda a: a * 2, [(x,) for x in xs]) * 1e6)
    out["copy_gbs"] = out.get("torch_copy_gbs", out["jax_scale_gbs"])
    return out


def timing_check(name: str = "unet_64x64x320", dtype="float16") -> dict:
    """experiments.common.time_jax (one input, chained) vs _time (distinct inputs), on XLA."""
    s = GROUP_NORM_SHAPES[name]
    x = _normal(np.random.default_rng(5), s.shape, dtype)
    sc = b = jnp.ones((s.shape[-1],), jnp.float32)
    fn = functools.partial(ops._group_norm_xla, groups=s.groups, eps=s.eps,
                           activation=s.activation)  # fmt: skip
    chained = time_jax(fn, x, sc, b, calls=_CALLS.value, repeats=_REPEATS.value)
    sets = [(v, sc, b) for v in _variants(x, _CALLS.value)]
    return {
        "shape": name,
        "xla_time_jax_ms": chained["median_ms"],
        "xla_distinct_ms": _time(fn, sets),
    }


# ------------------------------------------------------------------------------------------
# GroupNorm
# ------------------------------------------------------------------------------------------


def _torch_group_norm(x, scale, bias, s, dtype_name):
    """torch group_norm + activation on NCHW copies of the same data: (ms, NHWC output)."""
    import torch
    import torch.nn.functional as F

    tdtype = getattr(torch, dtype_name)
    tx = torch.from_numpy(np.asarray(x, np.float32)).to("cuda", tdtype)
    xs = [tx.permute(0, 3, 1, 2).contiguous()]  # then distinct inputs, as for JAX
    xs += [torch.randn_like(xs[0]) for _ in range(_CALLS.value - 1)]
    w, b = (torch.from_numpy(np.array(a)).to("cuda", tdtype) for a in (scale, bias))
    act = {"silu": F.silu, "gelu": F.gelu, None: lambda v: v}[s.activation]
    nxt = itertools.cycle(range(len(xs))).__next__
    with torch.no_grad():
        out = act(F.group_norm(xs[0], s.groups, w, b, s.eps))
        out = out.permute(0, 2, 3, 1).float().cpu().numpy()
        ms = _torch(lambda: act(F.group_norm(xs[nxt()], s.groups, w, b, s.eps)))
    xs.clear()
    torch.cuda.empty_cache()
    return ms, out


def _gn_fn(s, config=None):
    kw = dict(groups=s.groups, eps=s.eps, activation=s.activation)
    return lambda x, sc, b: group_norm(x, sc, b, config=config, **kw)


def benchmark_group_norm(dtype: str = "float16", names=None, *, copy_gbs=None) -> list[dict]:
    """One row per shape: ours, XLA (seam's fused form and the plain reference), torch."""
    rows, rng = [], np.random.default_rng(1)
    for name in names or GROUP_NORM_SHAPES:
        s = GROUP_NORM_SHAPES[name]
        c = s.shape[-1]
        x = _normal(rng, s.shape, dtype)
        sc, b = 1.0 + _normal(rng, (c,), jnp.float32, 0.5), _normal(rng, (c,), jnp.float32)
        kw = dict(groups=s.groups, eps=s.eps, activation=s.activation)
        ref = np.asarray(
            jax.jit(functools.partial(group_norm_reference, **kw))(x.astype(jnp.float32), sc, b)
        )
        gbytes = 2 * x.size * x.dtype.itemsize / 1e9
        row = {"shape": name, "dims": "x".join(map(str, s.shape)), "act": s.activation,
               "config": str(tuned_config(s.shape, x.dtype, groups=s.groups))}  # fmt: skip
        impls = {
            "ours": _gn_fn(s),
            "xla": functools.partial(ops._group_norm_xla, **kw),
            "columns": functools.partial(ops.group_norm_columns, **kw),
            "pallas_stats": functools.partial(ops.group_norm_pallas_stats, **kw),
            "xla_ref": functools.partial(ops.group_norm_reference, **kw),
        }
        sets = [(v, sc, b) for v in _variants(x, _CALLS.value)]
        for impl, fn in impls.items():
            try:
                out = jax.jit(fn)(x, sc, b)
                row[f"{impl}_ms"] = ms = _time(fn, sets)
                row[f"{impl}_gbs"] = gbytes / (ms * 1e-3) if ms > 0 else None
                row[f"{impl}_err"] = relative_error(out, ref)
                if jax.default_backend() == "gpu":
                    timed = kernel_us_of_sets(fn, sets, calls=3)
                    row[f"{impl}_kernel_us"] = timed["us"]
                    row[f"{impl}_kernels"] = timed["kernels"]  # us per call, by kernel name
            except Exception as e:
                row[f"{impl}_error"] = _error_text(e)
        del sets
        try:
            row["torch_ms"], out = _torch_group_norm(x, sc, b, s, jnp.dtype(dtype).name)
            row["torch_err"] = relative_error(out, ref)
        except Exception as e:
            row["torch_error"] = _error_text(e)
        if row.get("ours_ms"):
            xla = min(row.get("xla_ms", math.inf), row.get("xla_ref_ms", math.inf))
            row["xla/ours"] = xla / row["ours_ms"]
            if "torch_ms" in row:
                row["torch/ours"] = row["torch_ms"] / row["ours_ms"]
            if copy_gbs and row["ours_gbs"]:
                row["ours/copy"] = row["ours_gbs"] / copy_gbs
        rows.append(row)
        print(f"{name:22s} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                        if isinstance(v, float) and k.endswith("_ms")), flush=True)  # fmt: skip
        del x
    return rows


def _sweep_tile_rows(shape, groups: int) -> int:
    """Rows of the sweeps' GroupNorm tile for x [N, ..., C]: ~4096 padded elements, at most
    the (power-of-two) spatial size."""
    s, c = math.prod(shape[1:-1]), shape[-1]
    return max(1, min(4096 // (next_power_of_2(groups) * next_power_of_2(c // groups)),
                      next_power_of_2(s)))  # fmt: skip


def cooperative_candidates(shape, groups: int = 32, programs: int = 132) -> list[GNConfig]:
    """Cooperative configs for x [N, ..., C] with at most `programs` programs (all resident):
    the fewest rows per program that allow it, twice and four times that; tiles of the
    split plan's rows with 4 warps, twice those with 8."""
    n, s = shape[0], math.prod(shape[1:-1])
    br = _sweep_tile_rows(shape, groups)
    rows = br
    while n * -(-s // rows) > programs:
        rows *= 2
    out = []
    for part in (rows, 2 * rows, 4 * rows):
        if part > 4 * next_power_of_2(s) or (part > s and part != rows):
            continue
        for tile, warps in ((br, 4), (2 * br, 8)):
            if part % tile == 0:
                out.append(GNConfig(mode="cooperative", block_rows=tile, stats_rows=part,
                                    num_warps=warps))  # fmt: skip
    return out


def column_candidates(shape) -> list[GNConfig]:
    """The columns plan's grid for x [N, ..., C]: tiles of ~4K and ~8K padded elements (whole
    rows of C padded), chunks of 1, 2 and 4 tiles (at most the spatial size), 4 and 8 warps."""
    s, cp = math.prod(shape[1:-1]), next_power_of_2(shape[-1])
    out = []
    for elements, warps in itertools.product((4096, 8192), (4, 8)):
        br = max(1, min(elements // cp, next_power_of_2(s)))
        for tiles in (1, 2, 4):
            rows = br * tiles
            if rows <= max(br, s):
                out.append(GNConfig(mode="columns", block_rows=br, stats_rows=rows,
                                    norm_rows=rows, num_warps=warps))  # fmt: skip
    return list(dict.fromkeys(out))


def group_norm_candidates(shape, groups: int = 32, plans=("split", "fused"),
                          dtype=jnp.float16, programs: int = 132) -> list[GNConfig]:  # fmt: skip
    """Block configs worth timing at this shape: the one in force first (table or heuristic),
    the heuristic, then those of `plans` (cooperative ones with at most `programs`
    programs: the device's SMs)."""
    n, s, c = shape[0], math.prod(shape[1:-1]), shape[-1]
    cp = next_power_of_2(c // groups)
    current = tuned_config(shape, dtype, groups=groups)
    if tuple(plans) == ("prefetch",):  # an A/B of the config in force, twice, alternating
        try:  # without and with prefetch, whichever the table holds
            off, on = (dataclasses.replace(current, prefetch=p) for p in (False, True))
        except ValueError:  # not a split or fused config, or too many tiles a program
            return [current]
        # the tiles in flight (or held) take registers: also with twice the warps
        wide = dataclasses.replace(on, num_warps=min(2 * off.num_warps, 16))
        return list(dict.fromkeys([off, on, wide])) * 2
    if tuple(plans) == ("columns",):  # the config in force against the columns plan's grid
        return [current, *column_candidates(shape), current]
    if tuple(plans) == ("combine",):  # the partials combined by XLA or in the kernel, A/B
        if current.mode != "split" or -(-s // min(current.stats_rows, s)) < 2:
            return [current]
        xla, kernel = (dataclasses.replace(current, combine_in_kernel=k) for k in (False, True))
        return [xla, kernel, xla, kernel]
    out = [current, heuristic_config(shape, None, groups=groups)]
    br = _sweep_tile_rows(shape, groups)
    split = functools.partial(GNConfig, mode="split", block_rows=br)
    for rows in (32, 64, 128, 512, 2048):
        if br <= rows <= s:
            parts = -(-s // rows)
            out.append(split(stats_rows=rows, norm_rows=rows, combine_in_kernel=parts <= 32))
            if 32 < parts <= 128:
                out.append(split(stats_rows=rows, norm_rows=rows, combine_in_kernel=True))
            if parts <= 32 and rows >= 4 * br:  # few statistics programs, many normalize ones
                out.append(split(stats_rows=rows, norm_rows=rows // 4))
    h = out[0]
    if h.mode == "split":  # the heuristic's chunks with twice the tile, eight warps
        out.append(dataclasses.replace(h, block_rows=2 * br, num_warps=8,
                                       stats_rows=max(h.stats_rows, 2 * br),
                                       norm_rows=max(h.norm_rows, 2 * br)))  # fmt: skip
    if n * s * c <= 1 << 23:
        for bg in (1, 4):
            out.append(GNConfig(mode="fused", block_rows=max(1, min(4096 // cp, s)),
                                block_groups=bg))  # fmt: skip
    out += cooperative_candidates(shape, groups, programs)
    out = out[:2] + [cfg for cfg in out[2:] if cfg.mode in plans]
    # each XLA-combined split config also with the one-pass combine
    sums = [dataclasses.replace(cfg, xla_combine="sums") for cfg in out
            if cfg.mode == "split" and not cfg.combine_in_kernel]  # fmt: skip
    # each split config with several partials also with the last program combining them
    last = [dataclasses.replace(cfg, last_combine=True, combine_in_kernel=True) for cfg in out
            if cfg.mode == "split" and -(-s // min(cfg.stats_rows, s)) > 1]  # fmt: skip
    # each split or fused config also with its tiles loaded first, where that is allowed
    prefetch = []
    for cfg in out + sums:
        try:
            prefetch.append(dataclasses.replace(cfg, prefetch=True))
        except ValueError:  # too many tiles a program
            pass
    return list(dict.fromkeys(out + sums + last + prefetch))


def _sweep_configs(name, configs, measure, deadline, label) -> tuple[list[dict], bool]:
    """One row per config of shape `name`: the config's fields, those `measure(cfg, row)`
    writes into it, and the error it raised if it did; printed as they come. Returns (rows,
    whether the deadline cut it)."""
    rows = []
    for cfg in configs:
        if time.perf_counter() > deadline:
            return rows, True
        row = {"shape": name, **dataclasses.asdict(cfg)}
        try:
            measure(cfg, row)
        except Exception as e:
            row["error"] = _error_text(e)
        rows.append(row)
        shown = next((row[k] for k in ("kernel_us", "ms", "error") if k in row), None)
        print(f"{label} {name:20s} {shown} err={row.get('err')} {cfg}", flush=True)
    return rows, False


def sweep_group_norm(dtype, names, deadline) -> list[dict]:
    rows, rng = [], np.random.default_rng(2)
    for name in names:
        s = GROUP_NORM_SHAPES[name]
        x = _normal(rng, s.shape, dtype)
        sc, b = _normal(rng, (s.shape[-1],), jnp.float32), _normal(rng, (s.shape[-1],), jnp.float32)
        sets = [(v, sc, b) for v in _variants(x, _CALLS.value)]
        ref = group_norm_reference(
            x.astype(jnp.float32), sc, b, groups=s.groups, eps=s.eps, activation=s.activation
        )

        def measure(cfg, row, s=s, x=x, sc=sc, b=b, sets=sets, ref=ref):
            fn = _gn_fn(s, cfg)
            row["err"] = relative_error(jax.jit(fn)(x, sc, b), ref)
            row["ms"] = _time(fn, sets)
            row["gbs"] = 2 * x.size * x.dtype.itemsize / 1e9 / max(row["ms"] * 1e-3, 1e-9)
            if jax.default_backend() == "gpu":
                row["kernel_us"] = _kernel_us(fn, sets)

        configs = group_norm_candidates(s.shape, s.groups, _PLANS.value, jnp.dtype(dtype),
                                        programs=num_sms())  # fmt: skip
        done, cut = _sweep_configs(name, configs, measure, deadline, "sweep")
        rows += done
        if cut:
            break
    return rows


# Relative error above which a swept config is not a candidate for the table (fp16 output).
_SWEEP_TOL = 1e-2


def update_gn_table(sweep_rows, path, dtype) -> dict:
    """Writes each swept shape's fastest config by device kernel time (accurate ones only)
    into the GroupNorm tuning table at `path`, keeping the other entries; returns the table."""
    path = pathlib.Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    configs = table.setdefault("configs", {})
    for name in dict.fromkeys(r["shape"] for r in sweep_rows):
        ok = [r for r in sweep_rows if r["shape"] == name and r.get("kernel_us")
              and r.get("err", 1.0) <= _SWEEP_TOL]  # fmt: skip
        if not ok:
            continue
        best = min(ok, key=lambda r: r["kernel_us"])
        s = GROUP_NORM_SHAPES[name]
        fields = {f.name for f in dataclasses.fields(GNConfig)}
        # fields a row lacks (recorded before they existed) keep Config's defaults
        configs[shape_key(s.shape, dtype, s.groups)] = {k: best[k] for k in fields if k in best}
    table["device"] = device_info()["device_kind"]
    table["note"] = ("experiments/bench_norm.py --sweep: per shape, the config with the least "
                     "device kernel time (jax.profiler trace) among those within tolerance")  # fmt: skip
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


# ------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------

# Our LayerNorm kernel's grid for the A/B: rows per program and warps.
LN_GRID = tuple(itertools.product((1, 2, 4, 8, 16, 32), (4, 8)))


def layer_norm_candidates(shape) -> list[LNConfig]:
    """The heuristic first, then `LN_GRID` where a program holds at most 32K padded elements."""
    c_pad = next_power_of_2(shape[-1])
    grid = [LNConfig(block_rows=r, num_warps=w) for r, w in LN_GRID if r * c_pad <= 1 << 15]
    return list(dict.fromkeys([ln_heuristic_config(shape, None), *grid]))


def _measure_layer_norm(fn, x, sc, b, ref, sets) -> dict:
    """{err, ms, kernel_us (GPU only)} of fn(x, sc, b) against the float32 reference."""
    out = {"err": relative_error(jax.jit(fn)(x, sc, b), ref), "ms": _time(fn, sets)}
    if jax.default_backend() == "gpu":
        out["kernel_us"] = _kernel_us(fn, sets)
    return out


def benchmark_layer_norm(dtype, names, deadline) -> list[dict]:
    """One row per shape: XLA's LayerNorm (`sdjax.ops`'s "xla" form, what `auto` runs) and our
    kernel's fastest config by device kernel time (wall ms off GPU), with their errors against
    the float32 reference."""
    rows, rng = [], np.random.default_rng(3)
    key = "kernel_us" if jax.default_backend() == "gpu" else "ms"
    for name in names:
        if time.perf_counter() > deadline:
            break
        shape = LAYER_NORM_SHAPES[name]
        c = shape[-1]
        x = _normal(rng, shape, dtype)
        sc, b = 1.0 + _normal(rng, (c,), jnp.float32, 0.5), _normal(rng, (c,), jnp.float32)
        ref = layer_norm_reference(x.astype(jnp.float32), sc, b)
        args = (x, sc, b, ref, [(v, sc, b) for v in _variants(x, _CALLS.value)])
        xla = _measure_layer_norm(functools.partial(ops._layer_norm_xla, eps=1e-5), *args)
        row = {"shape": name, "dims": "x".join(map(str, shape)),
               **{f"xla_{k}": v for k, v in xla.items()}}  # fmt: skip
        best = None
        for cfg in layer_norm_candidates(shape):
            try:
                trial = _measure_layer_norm(functools.partial(layer_norm, config=cfg), *args)
            except Exception as e:
                print(f"ln {name} {cfg}: {_error_text(e)}", flush=True)
                continue
            if best is None or trial[key] < best[1][key]:
                best = (cfg, trial)
        if best:
            row.update({f"ours_{k}": v for k, v in best[1].items()})
            row["ours_config"] = dataclasses.asdict(best[0])
            row["xla/ours"] = xla[key] / best[1][key]
        rows.append(row)
        print(f"ln {name:10s} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                          if isinstance(v, float)), flush=True)  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------
# GEGLU
# ------------------------------------------------------------------------------------------


def _xla_matmul_then_ours(x, w, b):
    h = jnp.einsum("...d,df->...f", x, w.astype(x.dtype))  # cuBLAS, float32 accumulation
    return geglu_elementwise(h, bias=b)


def _xla_matmul_bias_then_ours(x, w, b):
    """The bias added in the matmul's epilogue (cuBLAS), then our element-wise GEGLU."""
    h = jnp.einsum("...d,df->...f", x, w.astype(x.dtype)) + b.astype(x.dtype)
    return geglu_elementwise(h)


def _xla_lowp(x, w, b):
    """XLA un-fused with a low-precision projection (the cheapest XLA form)."""
    h = jnp.einsum("...d,df->...f", x, w.astype(x.dtype)) + b.astype(x.dtype)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


# The GEGLU forms also timed by device kernel time on a GPU (what `make_autotune` compares):
# the wall time of a loop of calls of a 20-50 us kernel is partly the host's launch rate.
GEGLU_KERNEL_TIMED = ("fused", "hopper", "xla", "matmul_only", "xla_mm+ours", "xla_mm_bias+ours")


def benchmark_geglu(dtype: str = "float16", names=None, *, configs=None) -> list[dict]:
    """One row per shape: fused (Triton), the Hopper kernel (where it can run), XLA matmul +
    our epilogue, XLA un-fused (two forms), the matmul alone."""
    rows, rng = [], np.random.default_rng(3)
    for name in names or GEGLU_SHAPES:
        s = GEGLU_SHAPES[name]
        d, f = s.x_shape[-1], s.inner
        x, w = _normal(rng, s.x_shape, dtype), _normal(rng, s.w_shape, dtype, d**-0.5)
        b = _normal(rng, (2 * f,), jnp.float32, 0.5)
        ref = np.asarray(jax.jit(geglu_reference)(x, w, b).astype(jnp.float32))
        flops = 2 * math.prod(s.x_shape[:-1]) * d * 2 * f
        xs = _variants(x, _CALLS.value)
        row = {"shape": name, "m": math.prod(s.x_shape[:-1]), "d": d, "f": f}
        impls = {
            "fused": functools.partial(geglu, config=(configs or {}).get(name)),
            "xla_mm+ours": _xla_matmul_then_ours,
            "xla_mm_bias+ours": _xla_matmul_bias_then_ours,
            "xla": ops._geglu_xla,
            "xla_lowp": _xla_lowp,
            "matmul_only": lambda x, w, b: jnp.einsum("...d,df->...f", x, w),
        }
        if ops.geglu_hopper_supports(x, w) is None:  # a Hopper GPU and a shape in scope
            impls["hopper"] = geglu_hopper
        sets = [(v, w, b) for v in xs]
        for impl, fn in impls.items():
            try:
                out = jax.jit(fn)(x, w, b)
                row[f"{impl}_ms"] = ms = _time(fn, sets)
                row[f"{impl}_tflops"] = flops / (ms * 1e-3) / 1e12 if ms > 0 else None
                if impl != "matmul_only":
                    row[f"{impl}_err"] = relative_error(out, ref)
                if jax.default_backend() == "gpu" and impl in GEGLU_KERNEL_TIMED:
                    row[f"{impl}_kernel_us"] = us = _kernel_us(fn, sets)
                    row[f"{impl}_kernel_tflops"] = flops / (us * 1e-6) / 1e12
            except Exception as e:
                row[f"{impl}_error"] = _error_text(e)
        best_xla = min(row.get("xla_ms", math.inf), row.get("xla_lowp_ms", math.inf))
        for impl in ("fused", "xla_mm+ours"):
            if row.get(f"{impl}_ms"):
                row[f"xla/{impl}"] = best_xla / row[f"{impl}_ms"]
        rows.append(row)
        print(f"{name:10s} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                        if isinstance(v, float) and k.endswith("_ms")), flush=True)  # fmt: skip
    return rows


def benchmark_layer_norm_geglu(dtype, names) -> list[dict]:
    """One row per GEGLU shape: the transformer block's LayerNorm then GEGLU, apart (XLA's
    LayerNorm, what `auto` runs, then our Hopper GEGLU: two launches) and folded into our
    Hopper GEGLU (one launch; the folded bias and colsum made once, outside the timing, as
    the pipeline prepares them). Each with its error against the float32 reference on rows
    whose mean is large against their spread, its wall time and device kernel time."""
    gh = importlib.import_module("custom_calls.geglu_hopper")
    ablations = [frozenset(a.split("+")) for a in _LN_GEGLU_ABLATE.value]
    if bad := [a for a in ablations if not a <= set(gh.NORM_ABLATABLE)]:
        raise ValueError(f"--ln_geglu_ablate {bad}: '+'-joined parts of {gh.NORM_ABLATABLE}")

    def folded(entry):  # the folded kernel through `entry` on (x, scale, folded bias, w, colsum)
        return lambda x, sc, fb, w, cs: entry(x, w, fb, norm_scale=sc, norm_colsum=cs)

    rows, rng = [], np.random.default_rng(5)
    for name in names:
        s = GEGLU_SHAPES[name]
        d, f = s.x_shape[-1], s.inner
        x = (_normal(rng, s.x_shape, jnp.float32, 2.0)
             + _normal(rng, (*s.x_shape[:-1], 1), jnp.float32, 8.0)).astype(dtype)  # fmt: skip
        sc, b0 = 1.0 + _normal(rng, (d,), dtype, 0.5), _normal(rng, (d,), dtype)
        w, b = _normal(rng, s.w_shape, dtype, d**-0.5), _normal(rng, (2 * f,), dtype, 0.5)
        folded_bias, colsum = jax.jit(gh.layer_norm_fold)(sc, b0, w, b)
        ref = np.asarray(jax.jit(gh.layer_norm_geglu_reference)(x, sc, b0, w, b), np.float32)
        forms = {
            "apart": lambda x, sc, b0, w, b: geglu_hopper(ops._layer_norm_xla(x, sc, b0, eps=1e-5),
                                                          w, b),  # fmt: skip
            "folded": folded(geglu_hopper),
        }
        args = {"apart": (sc, b0, w, b), "folded": (sc, folded_bias, w, colsum)}
        row = {"shape": name, "m": math.prod(s.x_shape[:-1]), "d": d, "f": f}
        xs = _variants(x, _CALLS.value)
        for form, fn in forms.items():
            try:
                row[f"{form}_err"] = relative_error(jax.jit(fn)(x, *args[form]), ref)
                sets = [(v, *args[form]) for v in xs]
                row[f"{form}_ms"] = _time(fn, sets)
                row[f"{form}_kernel_us"] = _kernel_us(fn, sets)
            except Exception as e:
                row[f"{form}_error"] = _error_text(e)
        if row.get("folded_kernel_us") and row.get("apart_kernel_us"):
            row["saved_kernel_us"] = row["apart_kernel_us"] - row["folded_kernel_us"]
        # the un-jitted entry point, traced afresh: no cached trace of another form replayed
        unjitted = folded(functools.partial(gh.geglu_hopper.__wrapped__, interpret=False))
        for parts, label in zip(ablations, _LN_GEGLU_ABLATE.value, strict=True):
            gh._NORM_ABLATE = parts
            try:
                sets = [(v, *args["folded"]) for v in xs]
                row[f"without_{label}_kernel_us"] = _kernel_us(unjitted, sets)
            except Exception as e:
                row[f"without_{label}_error"] = _error_text(e)
            finally:
                gh._NORM_ABLATE = frozenset()
        rows.append(row)
        print(f"ln_geglu {name:10s} " + " ".join(
            f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)  # fmt: skip
    return rows


def sweep_geglu(dtype, names, deadline) -> list[dict]:
    cands = [GegluConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=st)
             for bm, bn, bk, nw, st in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                                        (64, 128, 64, 4, 4), (128, 128, 32, 8, 4),
                                        (64, 64, 64, 4, 3), (128, 64, 64, 8, 3),
                                        (64, 128, 32, 4, 5), (128, 128, 64, 8, 4),
                                        (256, 64, 64, 8, 3), (64, 256, 64, 8, 3),
                                        (128, 128, 128, 8, 2), (128, 64, 128, 8, 2),
                                        (256, 128, 64, 8, 2))]  # fmt: skip
    rows, rng = [], np.random.default_rng(4)
    for name in names:
        s = GEGLU_SHAPES[name]
        x, w = _normal(rng, s.x_shape, dtype), _normal(rng, s.w_shape, dtype, 0.05)
        b = _normal(rng, (s.w_shape[1],), jnp.float32)
        sets = [(v, w, b) for v in _variants(x, _CALLS.value)]

        def measure(cfg, row, sets=sets):
            row["ms"] = _time(functools.partial(geglu, config=cfg), sets)

        done, cut = _sweep_configs(name, cands, measure, deadline, "sweep")
        rows += done
        if cut:
            break
    return rows


def hopper_geglu_candidates(m: int, d: int, f: int, dtype, grid: str = "tiles") -> list:
    """The Hopper GEGLU configs in scope for x [m, d] @ w [d, 2f] (`geglu_hopper.HopperConfig`).

    grid "tiles": tiles 64 or 128 columns wide, 2-4 stages, clusters of 1, 2 and 4 programs.
    grid "issue": tiles 64 or 128 wide, 2-4 stages, clusters of 1 and 2, each with and
    without `delay_release` (a step's products left in flight while the next step's are
    issued).
    grid "deep": reduction steps of 128 (half the steps, barrier round trips and copies per
    tile, each twice the bytes), tiles 64 or 128 wide, 2-3 stages, clusters of 1 and 2.
    grid "ring": one ring shared by both consumers (`shared_ring`) of 4-8 slots (64-wide
    tiles) or 3-5 (128-wide), clusters of 1 and 2; after the heuristic's config, for
    comparison in the same process.
    grid "ring_issue": the "ring" grid, each config also with `delay_release`.
    grid "bias": the heuristic's config without and with `bias_in_acc`, twice, alternating
    (the second pair gives the run's spread).
    grid "resident": the heuristic's config, then x resident in shared memory
    (`x_resident`, groups for one wave) with tiles 128 wide (3-4 slots) or 64 (4-8), clusters
    of 1 and 2, then the heuristic's config again (the run's spread)."""
    gh = importlib.import_module("custom_calls.geglu_hopper")
    if grid not in GEGLU_HOPPER_GRIDS:
        raise ValueError(
            f"unknown Hopper GEGLU grid {grid!r}; choose from {', '.join(GEGLU_HOPPER_GRIDS)}"
        )
    if grid == "bias":
        h = gh.heuristic_config(m, d, f)
        return [h, dataclasses.replace(h, bias_in_acc=True)] * 2
    if grid == "resident":
        h = gh.heuristic_config(m, d, f)
        out = [h]
        for cluster in (2, 1):
            for block_n, slots in ((128, (3, 4)), (64, (4, 8))):
                for stages in slots:
                    cfg = gh.HopperConfig(block_n=block_n, stages=stages, cluster=cluster,
                                          shared_ring=True, x_resident=True)  # fmt: skip
                    if gh.supports((m, d), (d, 2 * f), dtype, cfg) is None:
                        out.append(cfg)
        return [*out, h]
    if grid in ("ring", "ring_issue"):
        out = [gh.heuristic_config(m, d, f)]
        for cluster in (1, 2):
            for block_n, slots in ((64, (4, 6, 8)), (128, (3, 4, 5))):
                for stages in slots:
                    for delay in (False, True) if grid == "ring_issue" else (False,):
                        cfg = gh.HopperConfig(block_n=block_n, stages=stages, cluster=cluster,
                                              shared_ring=True, delay_release=delay)  # fmt: skip
                        if gh.supports((m, d), (d, 2 * f), dtype, cfg) is None:
                            out.append(cfg)
        return out
    out = []
    wide = grid == "tiles"
    for cluster in gh.CLUSTER_SIZES if wide else (1, 2):
        # clusters of 4 also with 128 programs: an SM group (GPC) of 18 SMs holds four of
        # them, so 132 // 4 = 33 clusters may not all be resident at once
        for programs in (None, 128) if cluster == 4 else (None,):
            for block_n in (64, 128):
                for stages in (2, 3) if grid == "deep" else (2, 3, 4):
                    for delay in (False, True) if grid == "issue" else (False,):
                        cfg = gh.HopperConfig(
                            block_n=block_n, block_k=128 if grid == "deep" else 64,
                            stages=stages, cluster=cluster, programs=programs,
                            delay_release=delay,
                        )  # fmt: skip
                        if gh.supports((m, d), (d, 2 * f), dtype, cfg) is None:
                            out.append(cfg)
    return out


def sweep_geglu_hopper(dtype, names, deadline) -> list[dict]:
    """Device kernel time and error of each Hopper GEGLU config on each named shape."""
    rows, rng = [], np.random.default_rng(5)
    for name in names:
        s = GEGLU_SHAPES[name]
        d, f = s.x_shape[-1], s.inner
        m = math.prod(s.x_shape[:-1])
        x, w = _normal(rng, s.x_shape, dtype, 1.0), _normal(rng, s.w_shape, dtype, d**-0.5)
        b = _normal(rng, (2 * f,), jnp.float32, 0.5)
        ref = np.asarray(jax.jit(geglu_reference)(x, w, b).astype(jnp.float32))
        sets = [(v, w, b) for v in _variants(x, _CALLS.value)]

        def measure(cfg, row, x=x, w=w, b=b, sets=sets, ref=ref):
            fn = functools.partial(geglu_hopper, config=cfg)
            row["err"] = relative_error(jax.jit(fn)(x, w, b), ref)
            row["kernel_us"] = _kernel_us(fn, sets)

        configs = hopper_geglu_candidates(m, d, f, x.dtype, _HOPPER_GRID.value)
        done, cut = _sweep_configs(name, configs, measure, deadline, "hopper sweep")
        rows += done
        if cut:
            break
    return rows


# ------------------------------------------------------------------------------------------


def _chart(gn_rows, geglu_rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(14, 9))
    for ax, rows, impls in (
        (axes[0], gn_rows, ("ours", "xla", "xla_ref", "torch")),
        (axes[1], geglu_rows, ("fused", "hopper", "xla_mm+ours", "xla", "xla_lowp",
                               "matmul_only")),  # fmt: skip
    ):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = [r.get(f"{impl}_ms", 0.0) for r in rows]
            ax.bar(np.arange(len(rows)) + i * width, vals, width, label=impl)
        ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, [r["shape"] for r in rows],
                      rotation=45, ha="right")  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel("ms per call (log)")
        ax.legend()
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


GN_COLUMNS = ["shape", "dims", "act", "ours_ms", "best_swept_ms", "xla_ms", "columns_ms", "xla_ref_ms",
              "torch_ms", "ours_kernel_us", "pallas_stats_kernel_us", "columns_kernel_us",
              "xla_kernel_us", "xla/ours",
              "torch/ours", "ours_gbs", "ours/copy", "ours_err", "columns_err", "pallas_stats_err", "xla_err",
              "torch_err"]  # fmt: skip
LN_COLUMNS = ["shape", "dims", "xla_kernel_us", "ours_kernel_us", "xla/ours", "ours_config",
              "xla_ms", "ours_ms", "xla_err", "ours_err"]  # fmt: skip
GEGLU_COLUMNS = ["shape", "m", "d", "f", "fused_ms", "hopper_ms", "best_swept_ms", "xla_mm+ours_ms", "xla_ms",
                 "xla_lowp_ms", "matmul_only_ms", "fused_kernel_us", "hopper_kernel_us",
                 "xla_kernel_us", "matmul_only_kernel_us", "xla_mm+ours_kernel_us",
                 "xla_mm_bias+ours_kernel_us", "hopper_kernel_tflops", "xla/fused",
                 "xla/xla_mm+ours", "fused_tflops", "fused_err", "hopper_err", "xla_mm+ours_err",
                 "xla_err"]  # fmt: skip
LN_GEGLU_COLUMNS = ["shape", "m", "d", "f", "apart_kernel_us", "folded_kernel_us",
                    "saved_kernel_us", "apart_ms", "folded_ms", "apart_err", "folded_err"]


def _best(sweep_rows, name):
    """The fastest swept row of a shape: by device kernel time where measured, else wall."""
    ok = [r for r in sweep_rows if r["shape"] == name and r.get("ms")]
    if any(r.get("kernel_us") for r in ok):
        ok = [r for r in ok if r.get("kernel_us")]
        return min(ok, key=lambda r: r["kernel_us"])
    return min(ok, key=lambda r: r["ms"]) if ok else None


def write_reports(record: dict, stem) -> str:
    """The markdown table and PNG chart of a record (also re-rendered by --report)."""
    info, copy = record["device"], record["copy"]
    title = f"GroupNorm / GEGLU, {record['dtype']}, {info['device_kind']}, jax {info['jax']}"
    md = (
        f"# {title}\n\nms per call: {record['timing']}. GB/s counts one read and one write "
        f"of x. Device-to-device copy (torch): {copy.get('torch_copy_gbs', 0):.0f} GB/s; "
        f"jnp x*2: {copy['jax_scale_gbs']:.0f} GB/s. xla/ours: the faster XLA form over ours."
        f"\n\n## GroupNorm\n\n{markdown_table(record['group_norm'], GN_COLUMNS)}"
        f"\n## GEGLU\n\n{markdown_table(record['geglu'], GEGLU_COLUMNS)}"
    )
    if record.get("layer_norm"):
        md += (f"\n## LayerNorm (XLA's against our kernel's fastest config; xla/ours by kernel "
               f"time on GPU)\n\n{markdown_table(record['layer_norm'], LN_COLUMNS)}")  # fmt: skip
    if record.get("layer_norm_geglu"):
        md += ("\n## LayerNorm then GEGLU: apart (XLA's LayerNorm, our Hopper GEGLU) and folded "
               "into our Hopper GEGLU\n\n"
               f"{markdown_table(record['layer_norm_geglu'], LN_GEGLU_COLUMNS)}")  # fmt: skip
    stem.with_suffix(".md").write_text(md)
    _chart(record["group_norm"], record["geglu"], stem.with_suffix(".png"), title)
    return md


def main(argv):
    del argv
    if _REPORT.value:  # re-render a saved record
        stem = pathlib.Path(_REPORT.value).with_suffix("")
        print(write_reports(json.loads(stem.with_suffix(".json").read_text()), stem))
        return
    info = device_info()
    tag = re.sub(r"[^A-Za-z0-9]+", "_", info["device_kind"]).strip("_")
    stem = results_dir() / f"bench_norm_{tag}_{_DTYPE.value}_{datetime.date.today()}"
    record = {"device": info, "dtype": _DTYPE.value, "calls": _CALLS.value,
              "timing": "one jitted program of `calls` calls on distinct inputs, minus the "
                        "dispatch cost of a trivial program; median of `repeats`"}  # fmt: skip
    save = lambda: write_json(stem.with_suffix(".json"), record)
    deadline = _T0 + _BUDGET.value
    record["copy"] = copy = copy_bandwidth()
    print("copy", copy, flush=True)
    record["group_norm"], record["geglu"] = [], []
    for name in _GN.value or list(GROUP_NORM_SHAPES):
        record["group_norm"] += benchmark_group_norm(_DTYPE.value, [name],
                                                     copy_gbs=copy["copy_gbs"])  # fmt: skip
        save()
    for name in _GEGLU.value or list(GEGLU_SHAPES):
        record["geglu"] += benchmark_geglu(_DTYPE.value, [name])
        save()
    record["layer_norm"] = benchmark_layer_norm(_DTYPE.value, _LN.value, deadline)
    save()
    record["layer_norm_geglu"] = []
    for name in _LN_GEGLU.value:  # saved after each shape (a call's limit may cut the next)
        record["layer_norm_geglu"] += benchmark_layer_norm_geglu(_DTYPE.value, [name])
        save()
    if _TIMING_CHECK.value:
        record["timing_check"] = timing_check()
        print("timing check", record["timing_check"], flush=True)
    record["group_norm_sweep"] = sweep_group_norm(_DTYPE.value, _SWEEP.value, deadline - 25)
    save()
    if record["group_norm_sweep"] and _GN_TABLE.value and jax.default_backend() == "gpu":
        update_gn_table(record["group_norm_sweep"], _GN_TABLE.value, _DTYPE.value)
        print(f"updated {_GN_TABLE.value}", flush=True)
    record["geglu_sweep"] = sweep_geglu(_DTYPE.value, _SWEEP_GEGLU.value, deadline)
    record["geglu_hopper_sweep"] = sweep_geglu_hopper(
        _DTYPE.value, _SWEEP_GEGLU_HOPPER.value, deadline
    )
    for rows, sweep in ((record["group_norm"], record["group_norm_sweep"]),
                        (record["geglu"], record["geglu_sweep"])):  # fmt: skip
        for row in rows:
            best = _best(sweep, row["shape"])
            if best:
                row["best_swept_ms"] = best["ms"]
                row["best_swept"] = {k: v for k, v in best.items() if k not in ("shape", "ms")}
    save()
    print(write_reports(record, stem))


if __name__ == "__main__":
    app.run(main)
