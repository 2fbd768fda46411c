"""Fills `sdjax/assets/autotune.json`, the per-shape choices of `auto`, from GPU benchmarks.

    python -m experiments.make_autotune --attention experiments/results/bench_attention_*.json \
        --norm experiments/results/bench_norm_*.json

For each benchmarked shape it records the fastest implementation whose output matched the
reference in the same run. `auto` falls back to each op's default for shapes never measured
(see `sdjax.ops`).
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

from sdjax import autotune
from sdjax.shapes import ATTENTION_SHAPES, GEGLU_SHAPES, GROUP_NORM_SHAPES

FLAGS = flags.FLAGS
flags.DEFINE_list("attention", [], "bench_attention JSON files")
flags.DEFINE_list("norm", [], "bench_norm JSON files")
flags.DEFINE_string("out", str(autotune.TABLE_PATH), "table to write")

# Names in the benchmarks -> implementation names of sdjax.ops.
ATTENTION_IMPLS = {
    "flash": "flash",
    "flash_hopper": "flash_hopper",
    "flash_hopper_padded": "flash_hopper",  # in the UNet, heads come padded (no copies)
    "fused_softmax": "fused_softmax",
    "cross": "cross",
    "cudnn": "cudnn",
    "xla": "xla",
}


def attention_choices(record: dict) -> dict:
    """The fastest correct implementation per shape: by device kernel time where the bench
    measured it (`bench_attention.py --kernel_us`: what the denoising loop's command buffer
    sees, without launch gaps), else by the chained-call time."""
    timed = {r["shape"] for r in record["rows"] if r.get("kernel_us")}
    best: dict[str, tuple[float, str]] = {}
    for r in record["rows"]:
        impl = ATTENTION_IMPLS.get(r["impl"])
        time = r.get("kernel_us") if r["shape"] in timed else r.get("ms")
        if impl is None or not r.get("ok") or not time:
            continue
        if r["shape"] not in best or time < best[r["shape"]][0]:
            best[r["shape"]] = (time, impl)
    out = {}
    for name, (_, impl) in best.items():
        s = ATTENTION_SHAPES[name]
        out[autotune.shape_key("attention", s.q_shape, s.kv_shape, record["dtype"])] = impl
    return out


# Relative error (fp16 output, against the float32 reference in the same run) above which a
# GEGLU form is not a candidate.
GEGLU_TOLERANCE = 1e-2


def norm_choices(record: dict) -> tuple[dict, dict]:
    gn, gg = {}, {}
    for r in record.get("group_norm", []):
        # Device kernel time where the bench measured it (inside the denoising loop's command
        # buffer launch gaps mostly vanish), else the wall time of a loop of calls.
        ours, xla = ("ours_kernel_us", "xla_kernel_us") if "ours_kernel_us" in r else (
            "ours_ms", "xla_ms")  # fmt: skip
        if ours not in r or xla not in r:
            continue
        impl = "pallas" if r[ours] < r[xla] else "xla"
        gn[
            autotune.shape_key(
                "group_norm", GROUP_NORM_SHAPES[r["shape"]].shape, None, record["dtype"]
            )
        ] = impl
    for r in record.get("geglu", []):
        # Device kernel time where the bench measured it (ours, the Hopper kernel where it
        # ran, XLA), else the wall time of a loop of calls (ours against XLA).
        unit = "_kernel_us" if "fused_kernel_us" in r and "xla_kernel_us" in r else "_ms"
        times = {
            impl: r[f"{form}{unit}"]
            for impl, form in (("pallas", "fused"), ("pallas_hopper", "hopper"), ("xla", "xla"))
            if f"{form}{unit}" in r and r.get(f"{form}_err", 0.0) <= GEGLU_TOLERANCE
        }
        if "pallas" not in times or "xla" not in times:
            continue
        s = GEGLU_SHAPES[r["shape"]]
        impl = min(times, key=times.get)
        gg[autotune.shape_key("geglu", s.x_shape, s.w_shape, record["dtype"])] = impl
    return gn, gg


def main(argv):
    del argv
    choices = {"attention": {}, "group_norm": {}, "geglu": {}}
    sources, devices = [], set()
    for path in FLAGS.attention:
        record = json.loads(pathlib.Path(path).read_text())
        choices["attention"].update(attention_choices(record))
        sources.append(path)
        devices.add(record["device"]["device_kind"])
    for path in FLAGS.norm:
        record = json.loads(pathlib.Path(path).read_text())
        gn, gg = norm_choices(record)
        choices["group_norm"].update(gn)
        choices["geglu"].update(gg)
        sources.append(path)
        devices.add(record["device"]["device_kind"])
    table = {"devices": sorted(devices), "sources": sources, "choices": choices}
    pathlib.Path(FLAGS.out).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print({op: len(c) for op, c in choices.items()}, "->", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
