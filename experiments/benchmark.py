"""Throughput: images per second against the batch size per device, on every local device.

    python -m experiments.benchmark                                   # SD1.5 random weights
    python -m experiments.benchmark --checkpoint /path/to/sd15 --batch_sizes=1,4,8,16
    python -m experiments.benchmark --config tiny --height 16 --width 16 --steps 2  # smoke

For each batch size b per device, the pipeline generates b x (local devices) images at once,
sharded over the devices. The first call compiles (its compile time is reported per
component); then --repeats calls are timed end to end (tokenizer to uint8 images) and the
median is quoted, with each component's median run time. With several kernel presets
(--kernels=reference,auto) each row also gives the speed-up over the first preset.

Writes throughput_<device>.json (+ .md table, + .png plot if matplotlib is importable) to
`common.results_dir()`. A batch size that runs out of memory is recorded as such, and the
sweep goes on.
"""

from __future__ import annotations

import re
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)
flags.DEFINE_string(
    "checkpoint", None, "diffusers-layout folder or Hub repo id; none: random weights"
)
flags.DEFINE_string("variant", None, "weight file variant, e.g. fp16")
flags.DEFINE_enum(
    "config", "sd15", ["sd15", "sd21", "sd21-base", "tiny"], "architecture for random weights"
)
flags.DEFINE_list("batch_sizes", ["1", "4", "8", "16"], "images per device, one row each")
flags.DEFINE_integer("height", 512, "pixels, a multiple of 8")
flags.DEFINE_integer("width", 512, "pixels, a multiple of 8")
flags.DEFINE_integer("steps", 20, "denoising steps")
flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale (> 1: a UNet batch of 2N)")
flags.DEFINE_string("scheduler", None, "scheduler; default: the checkpoint's own")
flags.DEFINE_string(
    "prompt", "a photograph of an astronaut riding a horse", "the prompt of every image"
)
flags.DEFINE_enum(
    "dtype", None, ["float16", "bfloat16", "float32"], "default float16 on GPU, float32 on CPU"
)
flags.DEFINE_list(
    "kernels", ["auto"], "op implementation presets, one sweep each; the first is the baseline"
)
flags.DEFINE_integer("repeats", 3, "timed calls per batch size (the median is quoted)")
flags.DEFINE_integer("warmup", 1, "untimed calls after the compiling one")
flags.DEFINE_bool(
    "compilation_cache",
    False,
    "use JAX's persistent compilation cache (compile_s is then a cache load)",
)
flags.DEFINE_string("name", None, "output file stem; default throughput_<device kind>")
_OWN_FLAGS = sorted(set(FLAGS) - _ABSL_FLAGS)  # recorded in the JSON


def check_flags() -> list[int]:
    try:
        sizes = [int(b) for b in FLAGS.batch_sizes]
    except ValueError:
        raise ValueError(f"--batch_sizes must be integers; got {FLAGS.batch_sizes}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch_sizes must be >= 1; got {FLAGS.batch_sizes}")
    if FLAGS.steps < 1 or FLAGS.repeats < 1 or FLAGS.warmup < 0:
        raise ValueError("--steps and --repeats must be >= 1, --warmup >= 0")
    for name in ("height", "width"):
        if getattr(FLAGS, name) <= 0 or getattr(FLAGS, name) % 8:
            raise ValueError(
                f"--{name} must be a positive multiple of 8; got {getattr(FLAGS, name)}"
            )
    return sizes


def measure(pipe, n_images: int) -> dict:
    """Compiles, warms up and times pipe.generate on n_images images."""
    from sdjax.pipeline import component_timings

    kwargs = dict(
        steps=FLAGS.steps,
        guidance=FLAGS.guidance,
        scheduler=FLAGS.scheduler,
        height=FLAGS.height,
        width=FLAGS.width,
    )
    prompts = [FLAGS.prompt] * n_images
    t0 = time.perf_counter()
    first = pipe.generate(prompts, **kwargs)
    first_s = time.perf_counter() - t0
    for _ in range(FLAGS.warmup):
        pipe.generate(prompts, **kwargs)
    walls, parts = [], {}
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        result = pipe.generate(prompts, **kwargs)
        walls.append(time.perf_counter() - t0)
        for name, t in component_timings(result.timings).items():  # `walls` times the call
            parts.setdefault(name, []).append(t["run_s"])
    wall = statistics.median(walls)
    return {
        "images": n_images,
        "median_s": wall,
        "all_s": walls,
        "images_per_s": n_images / wall,
        "first_call_s": first_s,
        "compile_s": {k: v["compile_s"] for k, v in first.timings.items()},
        "total_compile_s": sum(v["compile_s"] for v in component_timings(first.timings).values()),
        "component_median_s": {k: statistics.median(v) for k, v in parts.items()},
        "denoise_steps": first.timings["denoise"]["steps"],
        "scheduler": first.scheduler,
    }


def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def plot(rows: list[dict], path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for preset in dict.fromkeys(r["kernels"] for r in rows):
        ok = [r for r in rows if r["kernels"] == preset and "images_per_s" in r]
        ax.plot(
            [r["batch_per_device"] for r in ok], [r["images_per_s"] for r in ok], "o-", label=preset
        )
    ax.set_xlabel("batch per device")
    ax.set_ylabel("images / s")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(title="kernels")
    ax.set_title(
        f"{FLAGS.height}x{FLAGS.width}, {FLAGS.steps} steps, {rows[0]['devices']} device(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run() -> dict:

    from experiments import common
    from sdjax import config as sd_config
    from sdjax import distributed, ops
    from sdjax.pipeline import StableDiffusion

    sizes = check_flags()
    presets = [ops.Implementations.preset(k) for k in FLAGS.kernels]  # unknown names raise
    dist = distributed.initialize_from_env()
    if FLAGS.compilation_cache:
        common.enable_compilation_cache()
    dtype = common.default_dtype(FLAGS.dtype)
    t0 = time.perf_counter()
    if FLAGS.checkpoint:
        base = StableDiffusion.from_checkpoint(FLAGS.checkpoint, dtype=dtype, variant=FLAGS.variant)
    else:
        base = StableDiffusion.from_random(sd_config.preset(FLAGS.config), dtype=dtype)
    load_s = time.perf_counter() - t0
    n_dev = len(base.devices)

    rows = []
    for name, impls in zip(FLAGS.kernels, presets, strict=True):
        # The params are already placed; a new pipeline only brings its own compiled programs.
        pipe = StableDiffusion(base.config, base.params, base.tokenizer, dtype=dtype, kernels=impls)
        for b in sizes:
            row = {"kernels": name, "batch_per_device": b, "devices": n_dev}
            try:
                row.update(measure(pipe, b * n_dev))
                row["images_per_s_per_device"] = row["images_per_s"] / n_dev
            except Exception as e:  # record an out-of-memory batch and go on
                if not _is_oom(e):
                    raise
                row["error"] = f"out of memory: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            print(
                f"kernels={name} batch/device={b}: "
                + (
                    f"{row['images_per_s']:.3f} images/s" if "images_per_s" in row else row["error"]
                ),
                file=sys.stderr,
            )
        del pipe
    baseline = {
        r["batch_per_device"]: r.get("images_per_s")
        for r in rows
        if r["kernels"] == FLAGS.kernels[0]
    }
    for r in rows:
        if r.get("images_per_s") and baseline.get(r["batch_per_device"]):
            r["speedup_vs_" + FLAGS.kernels[0]] = (
                r["images_per_s"] / baseline[r["batch_per_device"]]
            )

    device = common.device_info()
    stem = (
        FLAGS.name
        or "throughput_" + re.sub(r"[^A-Za-z0-9]+", "_", device["device_kind"]).strip("_").lower()
    )
    if dist.process_count > 1:
        stem += f"_p{dist.process_index}"
    out = common.results_dir()
    record = {
        "flags": {k: FLAGS[k].value for k in _OWN_FLAGS},
        "device": device,
        "devices": [str(d) for d in base.devices],
        "distributed": vars(dist),
        "random_weights": base.random_weights,
        "architecture": base.config.name,
        "dtype": dtype,
        "load_s": load_s,
        "rows": rows,
    }
    common.write_json(out / f"{stem}.json", record)
    columns = [
        "kernels",
        "batch_per_device",
        "images",
        "images_per_s",
        "median_s",
        "total_compile_s",
    ]
    columns += [c for c in rows[0] if c.startswith("speedup_vs_")] if len(FLAGS.kernels) > 1 else []
    table = common.markdown_table(rows, columns)
    (out / f"{stem}.md").write_text(table)
    plotted = plot(rows, out / f"{stem}.png")
    print(table)
    print(f"wrote {out / stem}.json/.md" + (" and .png" if plotted else ""), file=sys.stderr)
    return record


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    try:
        run()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
