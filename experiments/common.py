"""Timing and recording helpers shared by every experiment.

Timing rules (see BUILD.md): warm up first, time many back-to-back calls inside one jitted
program so that host dispatch is amortized, subtract the fixed cost of one launch, repeat,
and quote the median.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def default_dtype(dtype: str | None) -> str:
    """`dtype`, or the experiments' default compute dtype: float16 on GPU, float32 elsewhere."""
    return dtype or ("float16" if jax.default_backend() == "gpu" else "float32")


def define_pipeline_flags() -> None:
    """--config, --dtype, --kernels, --resolution: the command line of the experiments that
    build a random-weights pipeline. Call it from a script's own flag definitions (tests
    import those modules for their functions; absl refuses a flag defined twice)."""
    from absl import flags

    flags.DEFINE_string("config", "sd15", "architecture preset (random weights)")
    flags.DEFINE_enum("dtype", None, ["float16", "bfloat16", "float32"],
                      "compute dtype (default: float16 on GPU, float32 on CPU)")  # fmt: skip
    flags.DEFINE_string("kernels", "auto", "op implementation preset (sdjax.ops.PRESETS)")
    flags.DEFINE_integer("resolution", None, "pixels per side; default: the model's")


# What each op's override flag chooses (`define_implementation_flags`).
_IMPLEMENTATION_OPS = {
    "attention": "the attention implementation",
    "group_norm": "the GroupNorm implementation",
    "geglu": "the GEGLU implementation",
    "layer_norm": "the LayerNorm implementation",
    "upsample_conv": "the upsample + conv implementation",
    "interleave": "the subpixel upsampler's interleave",
    "conv3x3": "the 3x3 stride-1 conv implementation",
    "conv_planes": "where our Hopper convolution's input planes come from",
    "conv1x1": "the 1x1 stride-1 conv implementation",
    "qkv_projection": "the self-attention's fused QKV product's form (plain, a zero bias, or batched)",
}


def define_implementation_flags() -> None:
    """One string flag per op of `sdjax.ops.Implementations` (--attention, --group_norm, ...,
    --conv_planes), None by default (the --kernels preset's choice), its help listing the
    names it takes. Call it from a script's own flag definitions, as define_pipeline_flags."""
    import typing

    from absl import flags

    from sdjax import ops

    hints = typing.get_type_hints(ops.Implementations)
    for op in ops.Implementations.fields():
        what = _IMPLEMENTATION_OPS.get(op, f"the {op} implementation")
        names = ", ".join(typing.get_args(hints[op]))
        flags.DEFINE_string(op, None, f"override {what} ({names})")


def device_info() -> dict:
    """What ran the experiment: device kind, backend, jax/jaxlib versions, host."""
    dev = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        import flax

        info["flax"] = flax.__version__
    except ImportError:
        pass
    return info


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except ImportError:
        return None


def _distinct_inputs(args: tuple, n: int) -> list[tuple]:
    """n input sets: the given one and n-1 copies with every float array slightly shifted.

    Distinct inputs keep XLA from merging identical calls (CSE), and rotating through them
    keeps small inputs from living in L2 across calls (METHOD.md).
    """

    def shifted(a, i):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating):
            return a + jnp.asarray(i * 1e-3, a.dtype)
        return a

    sets = [args] + [jax.tree.map(lambda a, i=i: shifted(a, i), args) for i in range(1, n)]
    return jax.block_until_ready(sets)


def time_jax(fn: Callable, *args, calls: int = 20, repeats: int = 7) -> dict:
    """Median device time of one call of fn(*args), in milliseconds.

    One jitted program calls fn on `calls` distinct input sets and returns every output (so
    nothing is dead code); another calls it once. The difference over `calls - 1` cancels the
    fixed dispatch and synchronization cost of a program.
    """
    sets = _distinct_inputs(args, calls)
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    one = jax.jit(lambda sets: [fn(*s) for s in sets[:1]])
    jax.block_until_ready(one(sets))  # compile and warm up
    jax.block_until_ready(many(sets))
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(one(sets))
        t1 = time.perf_counter()
        jax.block_until_ready(many(sets))
        t2 = time.perf_counter()
        per_call.append(max((t2 - t1) - (t1 - t0), 0.0) / (calls - 1) * 1e3)
    return {"median_ms": statistics.median(per_call), "all_ms": per_call, "calls": calls}


def write_bench(prefix: str, dtype, record: dict, rows: Sequence[dict], columns: Sequence[str],
                title: str) -> str:  # fmt: skip
    """Writes a benchmark's record as <prefix>_<device>_<dtype>_<date>.json and its rows as a
    markdown table (.md, under `title` and the device line) to results_dir(); returns the
    table."""
    info = device_info()
    stem = (
        results_dir()
        / f"{prefix}_{info['device_kind'].replace(' ', '_')}_{jnp.dtype(dtype).name}_"
        f"{datetime.date.today()}"
    )
    write_json(stem.with_suffix(".json"), {"device": info, "dtype": jnp.dtype(dtype).name,
                                           **record})  # fmt: skip
    table = markdown_table(rows, columns)
    stem.with_suffix(".md").write_text(
        f"# {title}, {jnp.dtype(dtype).name}, {info['device_kind']}, jax {info['jax']}\n\n"
        f"{table}\n"
    )
    return table


def known_names(names: Sequence[str], known, what: str = "shapes") -> list[str]:
    """names, or a usage error (absl) naming the unknown ones (`what` they are) and the
    choices."""
    from absl import app

    unknown = sorted(set(names) - set(known))
    if unknown:
        raise app.UsageError(f"unknown {what} {unknown}; choose from {list(known)}")
    return list(names)


def print_row(row: dict) -> None:
    """One benchmark row on the console: floats rounded, per-kernel breakdowns left out."""
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
           if not k.endswith("_kernels")}, flush=True)  # fmt: skip


def kernel_us(fn: Callable, *args, sets: int = 8, calls: int = 3) -> dict:
    """Device kernel time of one call of fn(*args), in microseconds: `kernel_us_of_sets` over
    `sets` distinct input sets (weights included, so that nothing stays in L2 from call to
    call)."""
    return kernel_us_of_sets(fn, _distinct_inputs(args, sets), calls=calls)


def kernel_us_of_sets(fn: Callable, arg_sets: Sequence[tuple], *, calls: int = 3) -> dict:
    """The summed durations of the GPU kernels that `calls` runs of one jitted program (fn on
    each of `arg_sets`) launch, read from a jax.profiler trace, per call of fn. Launch gaps
    are left out on purpose: inside the UNet's denoising loop XLA replays a step as a command
    buffer (a CUDA graph), where they mostly vanish.

    Returns {"us": per call, "kernels": {kernel name: us per call}, "launches": per call}.
    """
    import collections
    import tempfile

    from experiments import profile

    compiled = jax.jit(lambda s: [fn(*a) for a in s]).lower(arg_sets).compile()
    with tempfile.TemporaryDirectory() as log_dir:
        events, _ = profile.trace_program(
            compiled, (arg_sets,), calls, log_dir, jax.default_backend()
        )
    per = calls * len(arg_sets)
    by_name = collections.Counter()
    for e in events:
        by_name[e.name[:80]] += e.dur_ns / 1e3 / per
    return {"us": sum(by_name.values()), "kernels": dict(by_name.most_common()),
            "launches": len(events) / per}  # fmt: skip


def time_host(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> dict:
    """Wall-clock median of a whole callable that blocks until done (end-to-end timings)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "all_ms": times}


def time_torch(fn: Callable[[], object], *, calls: int = 50, repeats: int = 7) -> dict:
    """Median per-call time of a torch CUDA callable, with CUDA events over back-to-back calls."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) / calls)
    return {"median_ms": statistics.median(per_call), "all_ms": per_call, "calls": calls}


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def results_dir(default: str = "experiments/results") -> pathlib.Path:
    """$OUT on the device machine (so that files come back), else the repo's results folder."""
    path = pathlib.Path(os.environ.get("OUT") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: os.PathLike, record: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_record(stem: str, record: dict, markdown: str) -> pathlib.Path:
    """Writes <stem>.json and <stem>.md to `results_dir()` and prints the markdown."""
    out = results_dir()
    write_json(out / f"{stem}.json", record)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-style table of the given columns; floats to 4 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default ~/.cache/sdjax/jax)."""
    path = path or os.environ.get("SDJAX_CACHE_DIR") or os.path.expanduser("~/.cache/sdjax/jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# A comma that starts the next OPTION=VALUE item; other commas belong to a value, as in
# xla_gpu_enable_command_buffer=FUSION,CUBLAS,WHILE.
_NEXT_OPTION = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")


def parse_xla_row(spec: str) -> tuple[str, dict]:
    """`NAME:OPTION=VALUE[,OPTION=VALUE...]` (the ablation's --xla_row) as (NAME, options).
    A value may hold commas (a list option): only a comma followed by `OPTION=` splits."""
    name, sep, items = spec.partition(":")
    if not sep or not name.strip() or not items.strip():
        raise ValueError(f"--xla_row wants NAME:OPTION=VALUE[,...]; got {spec!r}")
    try:
        return name.strip(), parse_xla_options(_NEXT_OPTION.split(items))
    except ValueError as e:
        raise ValueError(f"--xla_row {spec!r}: {e}") from None


def parse_xla_options(items) -> dict:
    """`NAME=VALUE` strings (the experiments' --xla_option) as compile options
    {name: bool | int | float | str}, for `Lowered.compile(compiler_options=...)`."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"--xla_option wants NAME=VALUE; got {item!r}")
        if value.lower() in ("true", "false"):
            options[name] = value.lower() == "true"
            continue
        for cast in (int, float):
            try:
                options[name] = cast(value)
                break
            except ValueError:
                pass
        else:
            options[name] = value
    return options
