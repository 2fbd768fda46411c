"""How much of the step's spread between processes is XLA's autotuning, and whether pinning
its picks removes it.

    python -m experiments.autotune_spread --config sd15 --dtype float16 --trials 4

Item 209 of `experiments/results/README.md`: XLA picks its cuDNN convolution algorithms (and
cuBLAS GEMM algorithms) by timing the candidates while it compiles, and the same program
compiled in two processes can get different picks: SD1.5's up_blocks_1 upsampler read 56.0,
71.7 and 57.3 us in three sessions' loop profiles. XLA caches the picks per process, so a
second compile in the same process reuses them: only fresh processes show the spread.

This runs `--trials` fresh processes on the same GPU, one after another. Each builds the
pipeline on random weights (kernels `--kernels`), compiles it with XLA's
`xla_gpu_dump_autotune_results_to` (its picks written to a text file), and times
`--repeats` images (the UNet step: the denoising component's wall over the steps; the image
back to back). Then the picks of the trials are compared (which autotuned instructions got
different algorithms), and two more fresh processes load the fastest and the slowest trial's
picks (`xla_gpu_load_autotune_results_from`): if the picks cause the spread, each pinned
process reads its trial's step again.

JAX's persistent compilation cache is off in every process (a cached executable would carry
the first process's picks). The pinned processes run with XLA's command buffers off unless
`--pinned_command_buffers`: on the H200 (jax 0.11.2, `experiments/results/README.md`, item
269) a process that loads picks fails while XLA traces a loaded cuDNN convolution into a
CUDA graph (`CUDNN_STATUS_EXECUTION_FAILED`), and runs, bit for bit as its trial, without
them. Their step times then compare with each other, not with the trials'. Writes
autotune_spread_<config>_<dtype><tag>.json and .md, and the trials' autotune files, to
`common.results_dir()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Registered only when run as a script (tests import the module for its functions)."""
    flags.DEFINE_string("config", "sd15", "architecture preset (random weights)")
    flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "compute dtype")
    flags.DEFINE_string("kernels", "auto", "op implementation preset")
    flags.DEFINE_integer("steps", 20, "DDIM steps")
    flags.DEFINE_integer("trials", 4, "fresh processes that autotune for themselves")
    flags.DEFINE_integer("repeats", 7, "timed images per process (medians)")
    flags.DEFINE_bool("pin", True, "then pin the fastest and the slowest trial's picks")
    flags.DEFINE_bool("pinned_command_buffers", False,
                      "keep XLA's command buffers on in the pinned processes (off by default: "
                      "loaded cuDNN picks fail in them on the H200, item 269)")  # fmt: skip
    flags.DEFINE_string("tag", "", "suffix of the output file names")
    flags.DEFINE_bool("summarize_only", False, "only summarize a finished run's files")
    # one process's own run (the parent starts these)
    flags.DEFINE_string("child_out", None, "internal: run one process, write its JSON here")
    flags.DEFINE_string("dump", None, "internal: xla_gpu_dump_autotune_results_to")
    flags.DEFINE_string("load", None, "internal: xla_gpu_load_autotune_results_from")


# ---- XLA's autotune results (text protobuf) ------------------------------------------------


def _blocks(text: str, name: str) -> list[str]:
    """The bodies of the top-level `name { ... }` blocks of a text protobuf (braces inside
    quoted strings ignored)."""
    out, depth, start, i, quoted = [], 0, None, 0, False
    opener = name + " {"
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "{":
            if depth == 0 and text[max(0, i - len(opener) + 1) : i + 1] == opener:
                start = i + 1
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and start is not None:
                out.append(text[start:i])
                start = None
        i += 1
    return out


def _field(block: str, name: str) -> str | None:
    """The quoted string value of field `name` at the top of `block`, unescaped enough to
    compare (None if absent)."""
    key = name + ': "'
    i = block.find(key)
    if i < 0:
        return None
    i += len(key)
    j = i
    while j < len(block) and block[j] != '"':
        j += 2 if block[j] == "\\" else 1
    return block[i:j]


def _without(block: str, name: str) -> str:
    """`block` less its `name { ... }` sub-blocks (the measured run time, which differs
    between identical picks)."""
    for body in _blocks(block, name):
        block = block.replace(name + " {" + body + "}", "")
    return " ".join(block.split())


def autotune_picks(text: str) -> dict[str, str]:
    """{autotuned instruction: the picked config} from the text of an
    `xla_gpu_dump_autotune_results_to` file, in either of XLA's formats: `results { device
    hlo result }` (the instruction's HLO text; measured times left out) or, in jax 0.11's
    XLA, `entries { key { target { device hlo_fingerprint } } value { optimal_config } }`
    (the instruction known only by its fingerprint)."""
    picks = {}
    for entry in _blocks(text, "results"):
        key = f"{_field(entry, 'device')}|{_field(entry, 'hlo')}"
        results = _blocks(entry, "result")
        picks[key] = _without(results[0], "run_time") if results else ""
    for entry in _blocks(text, "entries"):
        key = f"{_field(entry, 'device')}|fingerprint {_field(entry, 'hlo_fingerprint')}"
        values = _blocks(entry, "value")
        picks[key] = " ".join(values[0].split()) if values else ""
    return picks


def differing_picks(trials: list[dict[str, str]]) -> list[str]:
    """The instructions present in every trial whose picks are not all the same."""
    if not trials:
        return []
    common = set(trials[0]).intersection(*trials[1:])
    return sorted(k for k in common if len({t[k] for t in trials}) > 1)


def hlo_summary(key: str, width: int = 110) -> str:
    """A short name for an autotuned instruction: its result shape and custom-call target."""
    hlo = key.split("|", 1)[-1]
    target = (
        hlo.split("custom_call_target=")[-1].split(",")[0] if "custom_call_target" in hlo else ""
    )
    return (hlo.split(" ")[0] + " " + target.replace('\\"', ""))[:width]


# ---- one process ------------------------------------------------------------------------------


def run_child() -> dict:
    """Builds the pipeline, compiles it with the dump/load option, times FLAGS.repeats images;
    returns the record (also written to FLAGS.child_out)."""
    import jax

    from experiments import common
    from sdjax import config as sd_config
    from sdjax.pipeline import COMMAND_BUFFER_OPTION, StableDiffusion, default_compiler_options

    jax.config.update("jax_enable_compilation_cache", False)
    options = default_compiler_options()
    if FLAGS.dump:
        options["xla_gpu_dump_autotune_results_to"] = FLAGS.dump
    if FLAGS.load:
        options["xla_gpu_load_autotune_results_from"] = FLAGS.load
        if not FLAGS.pinned_command_buffers and jax.default_backend() == "gpu":
            options[COMMAND_BUFFER_OPTION] = ""  # none: see the module's docstring
    t0 = time.perf_counter()
    pipe = StableDiffusion.from_random(sd_config.preset(FLAGS.config), dtype=FLAGS.dtype,
                                       kernels=FLAGS.kernels, compiler_options=options)  # fmt: skip
    kw = dict(steps=FLAGS.steps, guidance=7.5, scheduler="ddim", seed=0)
    prompt = "a photograph of an astronaut riding a horse"
    first = pipe.generate(prompt, **kw)
    setup_s = time.perf_counter() - t0
    steps, images, b2b = [], [], []
    for _ in range(FLAGS.repeats):
        r = pipe.generate(prompt, **kw)
        steps.append(r.timings["denoise"]["run_s"] / r.timings["denoise"]["steps"] * 1e3)
        images.append(r.timings["end_to_end"]["run_s"] * 1e3)
        b2b.append(pipe.generate(prompt, **kw, sync_components=False)
                   .timings["end_to_end"]["run_s"] * 1e3)  # fmt: skip
    record = {
        "device": common.device_info(),
        "dump": FLAGS.dump,
        "load": FLAGS.load,
        # the command buffer types compiled with (None: XLA's default, or XLA_FLAGS's)
        "command_buffers": options.get(COMMAND_BUFFER_OPTION),
        "setup_s": setup_s,
        "compile_s": first.timings["end_to_end"]["compile_s"],
        "unet_step_ms": statistics.median(steps),
        "unet_step_ms_runs": steps,
        "image_ms": statistics.median(images),
        "image_back_to_back_ms": statistics.median(b2b),
        "latents_sum": float(abs(first.latents).sum()),
        "latents_sha256": hashlib.sha256(first.latents.tobytes()).hexdigest(),
    }
    pathlib.Path(FLAGS.child_out).write_text(json.dumps(record, indent=1))
    return record


def _child(out: pathlib.Path, *, dump=None, load=None) -> dict:
    args = [sys.executable, "-m", "experiments.autotune_spread", f"--child_out={out}",
            f"--config={FLAGS.config}", f"--dtype={FLAGS.dtype}", f"--kernels={FLAGS.kernels}",
            f"--steps={FLAGS.steps}", f"--repeats={FLAGS.repeats}"]  # fmt: skip
    args += [f"--dump={dump}"] if dump else []
    args += [f"--load={load}"] if load else []
    args += ["--pinned_command_buffers"] if FLAGS.pinned_command_buffers else []
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    subprocess.run(args, check=True, env=env)
    return json.loads(out.read_text())


def _backend(pick: str) -> str:
    """The backend a pick names (CUDNN, CUBLASLT, ...; 'conv', 'gemm' in the older format)."""
    for marker in ("backend: ", "algorithm {", "gemm {"):
        if marker in pick:
            return pick.split(marker, 1)[1].split()[0] if marker == "backend: " else marker[:-2]
    return "other"


def _command_buffers(rec: dict) -> str:
    """How a process's programs were compiled: command buffers off, the pipeline's types, or
    (records that predate the field) not recorded."""
    if "command_buffers" not in rec:
        return "not recorded"
    types = rec["command_buffers"]
    return "off" if types == "" else ("XLA_FLAGS or XLA's default" if types is None else "on")


def _same_latents(a: dict, b: dict) -> bool:
    """Bit-identical latents (by hash; by their sum in records that predate the hash)."""
    if "latents_sha256" in a and "latents_sha256" in b:
        return a["latents_sha256"] == b["latents_sha256"]
    return a["latents_sum"] == b["latents_sum"]


def summarize(out: pathlib.Path, stem: str) -> dict:
    """The record of a finished run from its files in `out`: each trial's JSON and picks,
    the pinned processes' JSON. Writes <stem>.json and .md."""
    from experiments import common

    trials, i = [], 0
    while (out / f"{stem}_trial{i}.json").exists():
        rec = json.loads((out / f"{stem}_trial{i}.json").read_text())
        dump = out / f"{stem}_trial{i}_autotune.txt"
        # no file where nothing was autotuned (a CPU run)
        rec["picks"] = autotune_picks(dump.read_text()) if dump.exists() else {}
        trials.append(rec)
        i += 1
    pinned = [json.loads(f.read_text()) for f in sorted(out.glob(f"{stem}_pin_*.json"))]
    differing = differing_picks([t["picks"] for t in trials])
    rows = [{"process": f"trial {i}", "unet_step_ms": t["unet_step_ms"],
             "image_ms": t["image_ms"], "image_back_to_back_ms": t["image_back_to_back_ms"],
             "latents_sum": f"{t['latents_sum']:.4f}", "autotuned": len(t["picks"]),
             "command_buffers": _command_buffers(t),
             "compile_s": t["compile_s"]} for i, t in enumerate(trials)]  # fmt: skip
    for p in pinned:
        k = p["pinned_trial"]
        rows.append({"process": f"pinned to trial {k} ({p['label']})",
                     "unet_step_ms": p["unet_step_ms"], "image_ms": p["image_ms"],
                     "image_back_to_back_ms": p["image_back_to_back_ms"],
                     "latents_sum": f"{p['latents_sum']:.4f}",
                     "same_latents_as_trial": _same_latents(p, trials[k]),
                     "command_buffers": _command_buffers(p),
                     "compile_s": p["compile_s"]})  # fmt: skip
    steps = [t["unet_step_ms"] for t in trials]
    by_backend: dict[str, int] = {}
    for k in differing:
        b = _backend(trials[0]["picks"][k])
        by_backend[b] = by_backend.get(b, 0) + 1
    record = {
        "device": trials[0]["device"] if trials else common.device_info(),
        "rows": rows,
        "step_spread_ms": max(steps) - min(steps) if steps else None,
        "autotuned": len(trials[0]["picks"]) if trials else 0,
        "differing_by_backend": by_backend,
        "differing": [
            {"instruction": hlo_summary(k), "picks": [t["picks"][k][:300] for t in trials]}
            for k in differing
        ],  # fmt: skip
    }
    repeats = len(trials[0]["unet_step_ms_runs"]) if trials else 0
    md = [f"# Autotuning's spread: {stem}\n",
          f"device: {record['device'].get('device_kind')}, jax {record['device'].get('jax')}. "
          f"{len(trials)} fresh processes, medians of {repeats} images each; then processes "
          "pinned to a trial's picks (`xla_gpu_load_autotune_results_from`).\n",
          common.markdown_table(rows, ["process", "unet_step_ms", "image_ms",
                                       "image_back_to_back_ms", "latents_sum",
                                       "same_latents_as_trial", "command_buffers",
                                       "autotuned", "compile_s"]),
          f"\nStep spread over the trials: {record['step_spread_ms']:.4f} ms. Of "
          f"{record['autotuned']} autotuned instructions, {len(differing)} got picks that "
          f"differ between the trials (by backend: {by_backend}).\n"]  # fmt: skip
    common.write_record(stem, record, "\n".join(md))
    return record


def main(argv):
    del argv
    if FLAGS.child_out:
        run_child()
        return
    from experiments import common

    out = common.results_dir()
    stem = f"autotune_spread_{FLAGS.config}_{FLAGS.dtype}{FLAGS.tag}"
    if FLAGS.summarize_only:
        summarize(out, stem)
        return
    trials = []
    for i in range(FLAGS.trials):
        rec = _child(out / f"{stem}_trial{i}.json", dump=out / f"{stem}_trial{i}_autotune.txt")
        trials.append(rec)
        print(f"trial {i}: step {rec['unet_step_ms']:.4f} ms, image back to back "
              f"{rec['image_back_to_back_ms']:.2f} ms", flush=True)  # fmt: skip
    order = sorted(range(len(trials)), key=lambda i: trials[i]["unet_step_ms"])
    if FLAGS.pin and len(trials) > 1:
        for label, i in (("fastest", order[0]), ("slowest", order[-1])):
            path = out / f"{stem}_pin_{label}.json"
            rec = _child(path, load=trials[i]["dump"])
            rec.update(pinned_trial=i, label=label)
            path.write_text(json.dumps(rec, indent=1))
            print(f"pinned {label} (trial {i}): step {rec['unet_step_ms']:.4f} ms", flush=True)
    summarize(out, stem)


if __name__ == "__main__":
    define_flags()
    app.run(main)
