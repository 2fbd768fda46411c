"""Two `experiments.profile` runs side by side, per kernel family: which kernels moved between
two GPUs, two commits or two settings.

    python -m experiments.compare_profiles \
        --a experiments/results/profile_sd15_float16_auto_loop_H100_jax0.11.2_2026-11-28_s24a.json \
        --b experiments/results/profile_sd15_float16_auto_loop_H200_jax0.11.2_2026-11-28_s27b.json \
        --tag _H100_vs_H200_s27

Reads the per-kernel table of one program (`--program`, default the denoising loop) from each
profile JSON (`programs.<program>.kernels`: kernel name families, ms per step of a loop
program, whose calls hold `steps_per_call` steps, else per call) and
groups the names into families (`family`): cuBLAS's `nvjet_*` kernels by their profile kind
(a product inside an attention block is kind `attention`), cuDNN's convolution kernels as one
family, every other kernel under its own name family. For each family: time in A and in B,
the change, and launches per call. The machines' measured copy bandwidth and matmul rate
(`rates`) head the table, so that a change can be set against what the card gained.

Writes compare_profiles<tag>.json and .md to `common.results_dir()`. Both runs should profile
the same program; the table says how many steps each run's calls held.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

FLAGS = flags.FLAGS

# cuDNN's convolution kernels: implicit-GEMM forward passes and cuDNN's own names
_CUDNN_MARKERS = ("xmma_fprop", "cudnn", "implicit_gemm", "implicit_convolve")


def define_flags() -> None:
    """Registered only when run as a script (tests import the module for its functions)."""
    flags.DEFINE_string("a", None, "profile JSON of the first run (experiments.profile)")
    flags.DEFINE_string("b", None, "profile JSON of the second run")
    flags.DEFINE_string("label_a", None, "column name of the first run (default: its device)")
    flags.DEFINE_string("label_b", None, "column name of the second run (default: its device)")
    flags.DEFINE_string("program", "denoise_loop", "the profiled program to compare")
    flags.DEFINE_integer("top", 30, "families in the table (largest in either run first)")
    flags.DEFINE_string("tag", "", "suffix of the output file names")
    flags.mark_flags_as_required(["a", "b"])


def family(kernel: dict) -> str:
    """The family of one row of a profile's kernel table."""
    name = kernel["kernel"]
    if name.startswith("nvjet"):
        return f"cuBLAS nvjet ({kernel['kind']})"
    if any(m in name.lower() for m in _CUDNN_MARKERS):
        return "cuDNN convolutions"
    return name


def families(profile: dict, program: str) -> dict[str, dict]:
    """{family: {"ms": ..., "launches": ...}} of one program of a profile record, per step
    (per call where the program is not a loop), as `profile` wrote them."""
    if program not in profile.get("programs", {}):
        raise ValueError(f"the profile has no program {program!r}; it has "
                         f"{sorted(profile.get('programs', {}))}")  # fmt: skip
    out: dict[str, dict] = {}
    for k in profile["programs"][program]["kernels"]:
        f = out.setdefault(family(k), {"ms": 0.0, "launches": 0.0})
        f["ms"] += k["ms"]
        f["launches"] += k.get("per_call", 0.0)
    return out


def compare(a: dict, b: dict, *, program: str = "denoise_loop", top: int = 30) -> dict:
    """The side-by-side record of two profile records (see the module doc)."""
    fa, fb = families(a, program), families(b, program)
    names = sorted(set(fa) | set(fb), key=lambda n: -max(fa.get(n, {}).get("ms", 0.0),
                                                         fb.get(n, {}).get("ms", 0.0)))  # fmt: skip
    rows = []
    for n in names:
        ms_a, ms_b = fa.get(n, {}).get("ms"), fb.get(n, {}).get("ms")
        rows.append({
            "family": n,
            "a_us": None if ms_a is None else ms_a * 1e3,
            "b_us": None if ms_b is None else ms_b * 1e3,
            "change_pct": 100.0 * (ms_b - ms_a) / ms_a if ms_a and ms_b is not None else None,
            "a_launches": fa.get(n, {}).get("launches"),
            "b_launches": fb.get(n, {}).get("launches"),
        })  # fmt: skip
    total_a = sum(f["ms"] for f in fa.values())
    total_b = sum(f["ms"] for f in fb.values())

    def side(p):
        prog = p["programs"][program]
        return {"device": p.get("device", {}), "rates": p.get("rates", {}),
                "steps_per_call": prog.get("steps_per_call")}  # fmt: skip

    return {
        "program": program,
        "a": side(a),
        "b": side(b),
        "total_a_ms": total_a,
        "total_b_ms": total_b,
        "total_change_pct": 100.0 * (total_b - total_a) / total_a if total_a else None,
        "rows": rows[:top],
        "families": len(rows),
    }


def markdown(record: dict, label_a: str, label_b: str) -> str:
    from experiments import common

    def rates(side):
        r = side["rates"]
        return (f"copy {r.get('copy_gbps', float('nan')):.0f} GB/s, matmul "
                f"{r.get('matmul_tflops', float('nan')):.1f} TFLOP/s")  # fmt: skip

    a, b = record["a"], record["b"]
    rows = [{"family": r["family"], f"{label_a} us": r["a_us"], f"{label_b} us": r["b_us"],
             "change %": r["change_pct"], "launches": r["a_launches"]} for r in record["rows"]]
    rows.append({"family": "**all kernels**", f"{label_a} us": record["total_a_ms"] * 1e3,
                 f"{label_b} us": record["total_b_ms"] * 1e3,
                 "change %": record["total_change_pct"]})  # fmt: skip
    return "\n".join([
        f"# Kernel families: {label_a} against {label_b} ({record['program']})\n",
        f"{label_a}: {a['device'].get('device_kind')}, jax {a['device'].get('jax')}, "
        f"{rates(a)}; {a['steps_per_call']} steps a call.",
        f"{label_b}: {b['device'].get('device_kind')}, jax {b['device'].get('jax')}, "
        f"{rates(b)}; {b['steps_per_call']} steps a call.\n",
        "Kernel time per step (per call for a program that is not a loop), as each profile "
        f"recorded it (`programs.<program>.kernels`); the {len(record['rows'])} largest of "
        f"{record['families']} families; launches per step in {label_a}.\n",
        common.markdown_table(rows, ["family", f"{label_a} us", f"{label_b} us", "change %",
                                     "launches"]),  # fmt: skip
    ]) + "\n"


def main(argv):
    del argv
    from experiments import common

    a = json.loads(pathlib.Path(FLAGS.a).read_text())
    b = json.loads(pathlib.Path(FLAGS.b).read_text())
    record = compare(a, b, program=FLAGS.program, top=FLAGS.top)
    record["sources"] = {"a": FLAGS.a, "b": FLAGS.b}
    label_a = FLAGS.label_a or a.get("device", {}).get("device_kind", "A")
    label_b = FLAGS.label_b or b.get("device", {}).get("device_kind", "B")
    if label_a == label_b:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    common.write_record(f"compare_profiles{FLAGS.tag}", record, markdown(record, label_a, label_b))


if __name__ == "__main__":
    define_flags()
    app.run(main)
