"""Where one image's wall time goes between kernels: a trace of `StableDiffusion.generate`.

    python -m experiments.trace_generate --config sd15 --dtype float16 --kernels auto

The profile (`experiments.profile`) times each program alone, back to back. This traces one
whole `generate` call per mode, as a user runs it:

- `sync`: each component (text encoder, denoising loop, VAE decode) waited for before the
  next starts (`generate`'s default);
- `unsync`: dispatched back to back, one wait at the end (`sync_components=False`);
- `one_program`: text encoder, loop and decoder as one compiled program (`one_program=True`;
  its kernels are the component "image").

For each mode it reports the host's wall time, and from the trace's device kernels (read
with `experiments.profile.read_trace`): per component (by the XLA module that ran each
kernel) its kernels, their summed time, the union of their intervals (busy), the idle inside
its span, and the idle before its first kernel; and the longest idle gaps of the whole call
with the kernels on either side. Kernel time against wall time says how much of an image is
launch work and waiting rather than GPU work (`experiments/results/README.md`, items 76-77).

While a trace runs XLA launches kernels one by one instead of replaying command buffers
(`--xla_enable_command_buffers_during_profiling=false` is XLA's default; set it in XLA_FLAGS
to trace with them) and each launch pays the tracer's overhead: gaps are upper bounds.

`--impl OP=NAME` (repeatable) replaces one op's implementation of the --kernels preset, as in
`experiments.profile`, for an A/B of two traces.

It also counts, from the trace's host planes, the CUDA API calls that launched work while the
loop's kernels ran (`host_launches`): graph launches (command buffers replayed) against
kernels launched on their own, which the GPU may wait for (the twenty-fourth session found
0.3 ms a step of such waits around cuDNN convolutions launched between command buffers).

And it tables the loop's kernels by name family, per step (`loop_kernels`: launches, kernel
time, the idle just before them), with one step's kernels in order in the JSON
(`step_sequence`: medians over the steps). Traced with command buffers on, these are the
kernels' times as they run inside the replayed graph.

Writes trace_generate_<config>_<dtype><tag>.json and .md to `experiments.common.results_dir()`.
"""

from __future__ import annotations

import collections
import os
import re
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS

MODES = ("sync", "unsync", "one_program")
# The pipeline's programs (the names of the functions it jits, in the XLA module names).
COMPONENTS = (
    ("encode_text", "text_encoder"),
    ("encode_image", "vae_encode"),
    ("denoise", "denoise"),
    ("decode", "vae_decode"),
    ("image", "image"),  # generate(one_program=True)
)


def define_flags() -> None:
    """Registered only when run as a script (tests import the module for its functions)."""
    from experiments import common

    common.define_pipeline_flags()
    flags.DEFINE_integer("steps", 20, "DDIM steps")
    flags.DEFINE_list("modes", list(MODES), f"of {', '.join(MODES)}")
    flags.DEFINE_integer("top_gaps", 15, "longest idle gaps listed per mode")
    flags.DEFINE_string("tag", "", "suffix of the output file names")
    flags.DEFINE_multi_string("impl", [], "OP=NAME: one op's implementation instead of the "
                              "--kernels preset's (as experiments.profile's --impl); repeatable")


def component_of(module: str | None) -> str:
    """The pipeline component whose XLA module ran a kernel ("other" if none)."""
    for key, name in COMPONENTS:
        if module and key in module:
            return name
    return "other"


def analyse(events, *, top_gaps: int = 15) -> dict:
    """Per component and overall: kernels, kernel time, busy time (union of intervals), idle
    inside the component's span and before it; the longest idle gaps. Times in ms."""
    events = sorted(events, key=lambda e: e.start_ns)
    if not events:
        raise ValueError("the trace has no kernel events")
    t0 = events[0].start_ns
    by = collections.defaultdict(list)
    for e in events:
        by[component_of(e.hlo_module)].append(e)

    def union(evs):
        """[(start, end)] of the union of the events' intervals, in time order."""
        out = []
        for e in sorted(evs, key=lambda e: e.start_ns):
            s, t = e.start_ns, e.start_ns + e.dur_ns
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], t)
            else:
                out.append([s, t])
        return out

    components, previous_end = {}, None
    for name, evs in sorted(by.items(), key=lambda kv: kv[1][0].start_ns):
        segs = union(evs)
        start, end = segs[0][0], segs[-1][1]
        busy = sum(t - s for s, t in segs)
        components[name] = {
            "kernels": len(evs),
            "kernel_ms": sum(e.dur_ns for e in evs) / 1e6,
            "busy_ms": busy / 1e6,
            "span_ms": (end - start) / 1e6,
            "idle_inside_ms": (end - start - busy) / 1e6,
            "starts_at_ms": (start - t0) / 1e6,
            "idle_before_ms": None if previous_end is None else max(start - previous_end, 0) / 1e6,
        }
        previous_end = end if previous_end is None else max(previous_end, end)

    segs = union(events)
    gaps = []
    # the kernel that ends a busy segment and the one that starts the next
    starts, ends = {}, {}
    for e in events:
        starts.setdefault(e.start_ns, e)
        ends.setdefault(e.start_ns + e.dur_ns, e)
    for (_, a_end), (b_start, _) in zip(segs, segs[1:], strict=False):
        before, after = ends.get(a_end), starts.get(b_start)
        gaps.append({
            "gap_us": (b_start - a_end) / 1e3,
            "at_ms": (a_end - t0) / 1e6,
            "before": f"{component_of(before.hlo_module)}: {before.name[:80]}" if before else "",
            "after": f"{component_of(after.hlo_module)}: {after.name[:80]}" if after else "",
        })  # fmt: skip
    busy = sum(t - s for s, t in segs)
    span = segs[-1][1] - segs[0][0]
    return {
        "kernels": len(events),
        "kernel_ms": sum(e.dur_ns for e in events) / 1e6,
        "busy_ms": busy / 1e6,
        "span_ms": span / 1e6,
        "idle_ms": (span - busy) / 1e6,
        "gaps_over_10us": sum(1 for g in gaps if g["gap_us"] > 10),
        "idle_in_gaps_over_10us_ms": sum(g["gap_us"] for g in gaps if g["gap_us"] > 10) / 1e3,
        "components": components,
        "top_gaps": sorted(gaps, key=lambda g: -g["gap_us"])[:top_gaps],
    }


# The host's CUDA API calls that put work on the GPU (driver or runtime names, with their
# _v2 / Ex / _ptsz variants): a kernel launched on its own, a command buffer (CUDA graph)
# replayed, an asynchronous copy or memset. The profiler records them on its host planes
# (the CUPTI API events of "/host:..." planes).
LAUNCH_API = re.compile(
    r"^cu(?:da)?(?:LaunchKernel|LaunchCooperativeKernel|GraphLaunch|Memcpy\w*Async|"
    r"Memset\w*Async)",
    re.IGNORECASE,
)


def host_api_events(log_dir: str) -> list[tuple[str, float]]:
    """(name, start_ns) of the host planes' events whose name is a launching CUDA API call
    (`LAUNCH_API`), from the trace's xplane.pb; [] where there is none or no reader."""
    import glob

    from experiments import profile

    if profile._profile_data_class() is None:
        return []
    out = []
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)):
        for _, _, name, start_ns, _, _ in profile._raw_from_xplane(path, "/host:"):
            if LAUNCH_API.match(name):
                out.append((name, start_ns))
    return out


def host_launches(api_events, start_ns: float, end_ns: float, steps: int) -> dict:
    """The launching API calls made while the denoising loop's kernels ran (its first kernel's
    start to its last one's end), by name: {"calls": {name: count}, "per_step": {name:
    count / steps}}. The host launches the loop's first step before that window, so a
    per-step figure is a slight undercount; a kernel launched on its own (rather than inside
    a replayed command buffer) shows as a LaunchKernel call."""
    calls = collections.Counter(n for n, t in api_events if start_ns <= t <= end_ns)
    return {
        "calls": dict(sorted(calls.items())),
        "per_step": {n: c / steps for n, c in sorted(calls.items())},
    }


def loop_kernels(events, steps: int, *, top: int = 40) -> dict:
    """The denoising loop's kernels by name family (`experiments.profile.family`), per step:
    launches, kernel time and the idle time just before each launch (from the end of the
    loop's latest kernel so far to its start; the first kernel's is not counted). With
    command buffers on while tracing, these are the kernels' times inside the replayed graph,
    which the profile (command buffers off) overstates where a kernel waits on the one before.
    {"kernel_ms", "idle_ms" (per step), "families": [{family, kind, launches, kernel_ms,
    us_each, idle_before_ms}] by kernel time, the first `top`}."""
    from experiments import profile

    events = sorted(events, key=lambda e: e.start_ns)
    fams: dict[str, dict] = {}
    end = None
    for e in events:
        name = profile.family(e.name)
        f = fams.setdefault(name, {"family": name, "kind": profile.classify(e.name)[0],
                                   "launches": 0, "kernel_ns": 0.0, "idle_ns": 0.0})  # fmt: skip
        f["launches"] += 1
        f["kernel_ns"] += e.dur_ns
        if end is not None:
            f["idle_ns"] += max(e.start_ns - end, 0.0)
        end = e.start_ns + e.dur_ns if end is None else max(end, e.start_ns + e.dur_ns)
    rows = [{"family": f["family"], "kind": f["kind"], "launches": f["launches"] / steps,
             "kernel_ms": f["kernel_ns"] / steps / 1e6,
             "us_each": f["kernel_ns"] / f["launches"] / 1e3,
             "idle_before_ms": f["idle_ns"] / steps / 1e6} for f in fams.values()]  # fmt: skip
    rows.sort(key=lambda r: -r["kernel_ms"])
    return {
        "kernel_ms": sum(r["kernel_ms"] for r in rows),
        "idle_ms": sum(r["idle_before_ms"] for r in rows),
        "launches": sum(r["launches"] for r in rows),
        "families": rows[:top],
        "sequence": step_sequence(events, steps),
    }


def step_sequence(events, steps: int) -> list[dict] | None:
    """One step's kernels in launch order, each with its median time and median idle before
    it over the steps: [{family, us, idle_before_us}]. The steps are the last `steps` periods
    of the loop's kernel names (what comes before them, the loop's prologue, is left out);
    None where the names have no such period."""
    import statistics

    from experiments import profile

    events = sorted(events, key=lambda e: e.start_ns)
    names = [profile.family(e.name) for e in events]
    n = len(names)
    for period in range(n // steps, 0, -1):
        first = n - period * steps
        if all(names[i] == names[i + period] for i in range(first, n - period)):
            break
    else:
        return None
    ends = [0.0] * n
    for i, e in enumerate(events):
        ends[i] = max(e.start_ns + e.dur_ns, ends[i - 1] if i else 0.0)
    out = []
    for j in range(period):
        idx = [first + s * period + j for s in range(steps)]
        idle = [max(events[i].start_ns - ends[i - 1], 0.0) for i in idx if i > 0]
        out.append({"family": names[first + j],
                    "us": statistics.median(events[i].dur_ns for i in idx) / 1e3,
                    "idle_before_us": statistics.median(idle) / 1e3 if idle else 0.0})  # fmt: skip
    return out


def trace_generate(config_name: str, dtype: str | None, kernels, *, steps: int = 20,
                   resolution: int | None = None, modes=MODES, top_gaps: int = 15) -> dict:  # fmt: skip
    """The record: per mode, the host wall of one traced `generate` and `analyse` of it.
    kernels: a preset's name or an `sdjax.ops.Implementations`."""
    import jax

    from experiments import common, profile
    from sdjax import config as sd_config
    from sdjax.pipeline import StableDiffusion

    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    backend = jax.default_backend()
    dtype = common.default_dtype(dtype)
    config = sd_config.preset(config_name)
    res = resolution or config.default_resolution
    pipe = StableDiffusion.from_random(config, dtype=dtype, kernels=kernels)
    kw = dict(steps=steps, scheduler="ddim", seed=0, height=res, width=res)
    prompt = "a photograph of an astronaut riding a horse"
    flag = "--xla_enable_command_buffers_during_profiling=true"
    record = {"device": common.device_info(), "config": config_name, "dtype": dtype,
              "kernels": profile.implementations_label(kernels), "steps": steps,
              "resolution": res, "modes": {},
              "command_buffers_while_tracing": flag in os.environ.get("XLA_FLAGS", "")}  # fmt: skip
    for mode in modes:
        mode_kw = dict(sync_components=mode == "sync", one_program=mode == "one_program")
        for _ in range(2):  # compiled and warm
            pipe.generate(prompt, **mode_kw, **kw)
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            t0 = time.perf_counter()
            result = pipe.generate(prompt, **mode_kw, **kw)
            wall = time.perf_counter() - t0
            jax.profiler.stop_trace()
            events, how = profile.read_trace(d, backend)
            api = host_api_events(d)
        loop = [e for e in events if component_of(e.hlo_module) == "denoise"]
        launches = per_family = None
        if loop:
            per_family = loop_kernels(loop, steps)
            first = min(e.start_ns for e in loop)
            last = max(e.start_ns + e.dur_ns for e in loop)
            launches = host_launches(api, first, last, steps)
        record["modes"][mode] = {
            "wall_ms": wall * 1e3,
            "timings": result.timings,
            "trace_read_as": how,
            **analyse(events, top_gaps=top_gaps),
            "loop_host_launches": launches,
            "loop_kernels": per_family,
        }
    return record


def markdown(record: dict) -> str:
    from experiments import common

    dev = record["device"]
    md = (f"# One traced `generate`: {record['config']} {record['resolution']}px, "
          f"{record['steps']} DDIM steps, {record['dtype']}, kernels={record['kernels']}\n\n"
          f"device: {dev['device_kind']}, jax {dev['jax']}. ")  # fmt: skip
    if record.get("command_buffers_while_tracing"):
        md += "Command buffers stay on while tracing (XLA_FLAGS), as in an untraced call.\n"
    else:
        md += ("Command buffers are off while tracing (XLA's default), so each launch pays the "
               "tracer: gaps are upper bounds.\n")
    for mode, m in record["modes"].items():
        md += (f"\n## {mode}\n\nhost wall {m['wall_ms']:.2f} ms; {m['kernels']} kernels, "
               f"{m['kernel_ms']:.2f} ms of kernel time, busy {m['busy_ms']:.2f} ms, span "
               f"{m['span_ms']:.2f} ms, idle {m['idle_ms']:.2f} ms ({m['gaps_over_10us']} gaps "
               f"over 10 us: {m['idle_in_gaps_over_10us_ms']:.2f} ms)\n\n")  # fmt: skip
        rows = [{"component": k, **v} for k, v in m["components"].items()]
        md += common.markdown_table(rows, ["component", "kernels", "kernel_ms", "busy_ms",
                                           "span_ms", "idle_inside_ms", "starts_at_ms",
                                           "idle_before_ms"])  # fmt: skip
        md += "\nLongest idle gaps:\n\n" + common.markdown_table(
            m["top_gaps"], ["gap_us", "at_ms", "before", "after"]
        )
        launches = m.get("loop_host_launches")
        if launches is not None:
            md += ("\nThe host's launching CUDA API calls while the loop's kernels ran (per step: "
                   "over the steps; a kernel launched outside a command buffer is a LaunchKernel "
                   "call): ")  # fmt: skip
            md += (", ".join(f"{n} {c} ({launches['per_step'][n]:.1f}/step)"
                             for n, c in launches["calls"].items())
                   or "none in the trace's host planes")  # fmt: skip
            md += "\n"
        per_family = m.get("loop_kernels")
        if per_family is not None:
            md += (f"\nThe loop's kernels by name family, per step ({per_family['launches']:.0f} "
                   f"launches, {per_family['kernel_ms']:.3f} ms of kernels, "
                   f"{per_family['idle_ms']:.3f} ms idle before them), by kernel time:\n\n")
            md += common.markdown_table(per_family["families"], [
                "family", "kind", "launches", "kernel_ms", "us_each", "idle_before_ms"])
            seq = per_family.get("sequence")
            if seq:
                rows = sorted(({"position": i, **k} for i, k in enumerate(seq)),
                              key=lambda r: -r["idle_before_us"])[:10]  # fmt: skip
                md += ("\nOne step's longest idle before a kernel (medians over the steps; "
                       "position in the step's launch order):\n\n")
                md += common.markdown_table(rows, ["position", "family", "us", "idle_before_us"])
    return md


def main(argv):
    del argv
    from experiments import common, profile

    common.enable_compilation_cache()
    kernels = profile._implementations(FLAGS.kernels, FLAGS.impl)
    record = trace_generate(FLAGS.config, FLAGS.dtype, kernels, steps=FLAGS.steps,
                            resolution=FLAGS.resolution, modes=tuple(FLAGS.modes),
                            top_gaps=FLAGS.top_gaps)  # fmt: skip
    stem = f"trace_generate_{record['config']}_{record['dtype']}{FLAGS.tag}"
    common.write_record(stem, record, markdown(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
