"""Text-to-image from the command line.

    python -m experiments.generate --prompt "a photo of a cat" --steps 20 --out out/
    python -m experiments.generate --checkpoint /path/to/sd15 --prompt "..."   # real weights
    python -m experiments.generate --checkpoint runwayml/stable-diffusion-v1-5  # Hub repo id

    python -m experiments.generate --prompts_file prompts.txt --batch 4   # many images

Without --checkpoint the weights are deterministic RANDOM weights of --config's real
architecture, and the image is noise (it says so). Writes image_<i>.png and generate.json (the
flags, the device, jax version, compile and run time per component) to --out.

The batch (every prompt, --batch times) is sharded over all local devices. Under a
multi-process launcher (see `sdjax.distributed`: JAX_COORDINATOR_ADDRESS, SLURM, mpirun) each
process takes one contiguous block of it and writes its images under their global index and
its record as generate_p<process>.json. Bad flags print `error: ...` and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time

from absl import app, flags

from experiments import common
from sdjax import ops
from sdjax.schedulers import NAMES as SCHEDULERS

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)
flags.DEFINE_string(
    "checkpoint", None, "diffusers-layout folder or Hub repo id; none: random weights"
)
flags.DEFINE_string("variant", None, "weight file variant, e.g. fp16")
flags.DEFINE_enum(
    "config", "sd15", ["sd15", "sd21", "sd21-base", "tiny"], "architecture for random weights"
)
flags.DEFINE_string("prompt", "a photograph of an astronaut riding a horse", "the prompt")
flags.DEFINE_string("prompts_file", None, "a text file, one prompt per line (overrides --prompt)")
flags.DEFINE_string("negative_prompt", "", "negative prompt (guidance)")
flags.DEFINE_integer("steps", 20, "denoising steps")
flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale (<= 1: off)")
flags.DEFINE_enum("scheduler", None, list(SCHEDULERS), "scheduler; default: the checkpoint's own")
flags.DEFINE_integer("seed", 0, "random seed; image i uses fold_in(seed, i)")
flags.DEFINE_integer("height", None, "pixels, a multiple of 8; default: the model's resolution")
flags.DEFINE_integer("width", None, "pixels, a multiple of 8; default: the model's resolution")
flags.DEFINE_integer("batch", 1, "images per prompt (the batch is sharded over all local devices)")
flags.DEFINE_enum(
    "dtype",
    None,
    ["float16", "bfloat16", "float32"],
    "compute dtype; default float16 on GPU, float32 on CPU",
)
flags.DEFINE_string("kernels", "auto", f"op implementations: one of {sorted(ops.PRESETS)}")
common.define_implementation_flags()  # --attention, --group_norm, ..., --conv_planes
flags.DEFINE_multi_string(
    "xla_option",
    [],
    "NAME=VALUE: an XLA compile option (a DebugOptions field) for every program; repeatable",
)
flags.DEFINE_bool(
    "hoist_conditioning",
    True,
    "compute the cross-attention K/V and the time projections once, before the denoising loop",
)
flags.DEFINE_bool(
    "prepare_weights",
    True,
    "make the weight-only work once per pipeline rather than in every image's program: the "
    "UNet conditioning's stacked projection and phase kernels (with --hoist_conditioning) and "
    "the VAE decoder's phase kernels and stacked attention weights",
)
flags.DEFINE_bool(
    "share_guidance_prefix",
    True,
    "with guidance, run the UNet's part before its first cross-attention once per sample, not "
    "once for each of its unconditional and conditional copies (the same values)",
)
flags.DEFINE_bool(
    "one_program",
    False,
    "text encoder, denoising loop and VAE decoder as one compiled program (one launch, no "
    "host work between them; timings then has one 'image' entry for the three)",
)
flags.DEFINE_string("init_image", None, "img2img: path of an image (resized to --height/--width)")
flags.DEFINE_float("strength", 0.8, "img2img strength in (0, 1]")
flags.DEFINE_string("out", "out", "output folder")
flags.DEFINE_bool("progress", True, "show a progress bar over the denoising steps")
flags.DEFINE_bool("compilation_cache", True, "use JAX's persistent compilation cache")
flags.DEFINE_integer(
    "repeat", 1, "run generation this many times (timings of the last are recorded)"
)


_OWN_FLAGS = sorted(set(FLAGS) - _ABSL_FLAGS)  # recorded in the JSON


def kernels_from_flags() -> ops.Implementations:
    impls = ops.Implementations.preset(FLAGS.kernels)
    overrides = {
        k: getattr(FLAGS, k) for k in ops.Implementations.fields() if getattr(FLAGS, k)
    }
    return dataclasses.replace(impls, **overrides)


def read_prompts() -> list[str]:
    """The whole batch: every prompt (of --prompts_file, else --prompt) --batch times."""
    if FLAGS.prompts_file:
        path = pathlib.Path(FLAGS.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"empty batch: the prompts file {path} has no non-blank line")
    else:
        prompts = [FLAGS.prompt]
    return [p for p in prompts for _ in range(FLAGS.batch)]


def compiler_options() -> dict | None:
    """--xla_option NAME=VALUE flags as {name: bool | int | float | str}; None without any
    (the pipeline's defaults, `sdjax.pipeline.default_compiler_options`)."""
    if not FLAGS.xla_option:
        return None
    from experiments import common

    return common.parse_xla_options(FLAGS.xla_option)


def check_flags() -> None:
    """Rejects bad flag values before anything is loaded or compiled."""
    if FLAGS.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {FLAGS.steps}")
    if FLAGS.batch < 1:
        raise ValueError(f"--batch must be >= 1; got {FLAGS.batch}")
    if not FLAGS.guidance >= 0:  # also NaN
        raise ValueError(f"--guidance must be >= 0 (<= 1 turns guidance off); got {FLAGS.guidance}")
    for name in ("height", "width"):
        value = getattr(FLAGS, name)
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8; got {value}")
    if FLAGS.init_image and not 0 < FLAGS.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1]; got {FLAGS.strength}")
    if FLAGS.repeat < 1:
        raise ValueError(f"--repeat must be >= 1; got {FLAGS.repeat}")
    if FLAGS.init_image and not pathlib.Path(FLAGS.init_image).is_file():
        raise FileNotFoundError(f"init image not found: {FLAGS.init_image}")
    kernels_from_flags()  # an unknown preset or implementation raises here


def run() -> dict:
    import numpy as np
    from PIL import Image

    from experiments import common
    from sdjax import config as sd_config
    from sdjax import distributed
    from sdjax.pipeline import StableDiffusion, component_timings

    check_flags()
    all_prompts = read_prompts()
    # Several hosts: each takes one contiguous block of the prompts, on its local devices.
    dist = distributed.initialize_from_env()
    block = distributed.process_block(len(all_prompts))
    prompts = all_prompts[block]
    if FLAGS.compilation_cache:
        common.enable_compilation_cache()
    kernels = kernels_from_flags()
    dtype = common.default_dtype(FLAGS.dtype)
    t0 = time.perf_counter()
    if FLAGS.checkpoint:
        pipe = StableDiffusion.from_checkpoint(
            FLAGS.checkpoint,
            dtype=dtype,
            variant=FLAGS.variant,
            kernels=kernels,
            hoist_conditioning=FLAGS.hoist_conditioning,
            prepare_weights=FLAGS.prepare_weights,
            share_guidance_prefix=FLAGS.share_guidance_prefix,
            compiler_options=compiler_options(),
        )
    else:
        print(
            f"NOTE: no --checkpoint: using deterministic RANDOM weights of the {FLAGS.config} "
            "architecture. The image will be noise.",
            file=sys.stderr,
        )
        pipe = StableDiffusion.from_random(
            sd_config.preset(FLAGS.config),
            dtype=dtype,
            kernels=kernels,
            hoist_conditioning=FLAGS.hoist_conditioning,
            prepare_weights=FLAGS.prepare_weights,
            share_guidance_prefix=FLAGS.share_guidance_prefix,
            compiler_options=compiler_options(),
        )
    load_s = time.perf_counter() - t0
    sched = pipe.make_scheduler(FLAGS.scheduler, FLAGS.steps)  # an unknown one raises here

    init_image = None
    if FLAGS.init_image:
        size = (
            FLAGS.width or pipe.config.default_resolution,
            FLAGS.height or pipe.config.default_resolution,
        )
        image = Image.open(FLAGS.init_image).convert("RGB").resize(size)
        init_image = np.asarray(image)[None].repeat(len(prompts), 0)

    bar = progress = None
    if FLAGS.progress and prompts:
        from tqdm import tqdm

        start = sched.start_index(FLAGS.strength) if init_image is not None else 0
        n_steps = len(sched.timesteps) - start
        bar = tqdm(total=n_steps * FLAGS.repeat, desc="denoising", unit="step", file=sys.stderr)

        def progress(_step):
            bar.update(1)

    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    result, files, runs = None, [], []
    if prompts:  # more hosts than prompts leaves some hosts without work
        for _ in range(FLAGS.repeat):
            result = pipe.generate(
                prompts,
                FLAGS.negative_prompt,
                steps=FLAGS.steps,
                guidance=FLAGS.guidance,
                scheduler=FLAGS.scheduler,
                seed=FLAGS.seed,
                height=None if init_image is not None else FLAGS.height,
                width=None if init_image is not None else FLAGS.width,
                init_image=init_image,
                strength=FLAGS.strength,
                index_offset=block.start,
                progress=progress,
                one_program=FLAGS.one_program,
            )
            runs.append(result.timings)
        if bar is not None:
            bar.close()
        for i, image in enumerate(result.images, start=block.start):
            path = out / f"image_{i}.png"
            Image.fromarray(image).save(path)
            files.append(str(path))

    # Compile time from the first run (later runs reuse the programs), run time from the last.
    timings = (
        {c: {**t, "compile_s": runs[0][c]["compile_s"]} for c, t in runs[-1].items()}
        if runs
        else {}
    )
    record = {
        "flags": {name: FLAGS[name].value for name in _OWN_FLAGS},
        "device": common.device_info(),
        "devices": [str(d) for d in pipe.devices],
        "distributed": dataclasses.asdict(dist),
        "checkpoint": FLAGS.checkpoint,
        "random_weights": pipe.random_weights,
        "architecture": pipe.config.name,
        "resolution": list(result.images.shape[1:3]) if result else None,
        "dtype": dtype,
        "scheduler": sched.name,
        "kernels": dataclasses.asdict(pipe.kernels),
        "compiler_options": pipe.compiler_options,  # as compiled: the defaults or --xla_option
        "num_images": len(files),
        "load_s": load_s,
        "timings": timings,
        # the components' waited-for walls, summed; end_to_end: the whole call's wall
        "total_run_s": sum(v["run_s"] for v in component_timings(timings).values()),
        "end_to_end_s": timings["end_to_end"]["run_s"] if timings else None,
        "total_compile_s": sum(v["compile_s"] for v in component_timings(timings).values()),
        "truncated_prompts": [dataclasses.asdict(t) for t in result.truncations] if result else [],
        "truncated_negative_prompts": (
            [dataclasses.asdict(t) for t in result.negative_truncations] if result else []
        ),
        "op_fallbacks": ops.fallbacks(),
        "device_memory": device_memory(pipe.devices[0]),
        "prompts": prompts,
        "images": files,
    }
    name = "generate.json" if dist.process_count == 1 else f"generate_p{dist.process_index}.json"
    common.write_json(out / name, record)
    print(json.dumps({k: record[k] for k in ("timings", "total_run_s", "end_to_end_s", "images")},
                     indent=1))  # fmt: skip
    return record


def device_memory(device) -> dict | None:
    """The allocator's figures for `device` in GiB (None where the backend has none, as on
    the CPU). `peak` covers the whole process: loading, compiling (XLA's autotuning allocates
    too, unless the programs came from the compilation cache) and every run."""
    stats = device.memory_stats()
    if not stats:
        return None
    keys = {"bytes_in_use": "in_use_gib", "peak_bytes_in_use": "peak_gib"}
    out = {name: stats[k] / 2**30 for k, name in keys.items() if k in stats}
    out["note"] = "peak_gib includes compilation unless the programs came from the cache"
    return out


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run()
    except (ValueError, OSError) as e:  # includes CheckpointError and FileNotFoundError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
