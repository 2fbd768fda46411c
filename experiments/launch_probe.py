"""What one call of a compiled program costs the host and the GPU before its kernels run.

    python -m experiments.launch_probe --config sd15 --dtype float16 --kernels auto

Item 95 of `experiments/results/README.md`: each of the pipeline's programs starts its first
kernel ~1-2 ms after its call (text encoder ~0.8 ms, VAE ~2 ms, the whole image ~3 ms), more
than the image's per-step costs add up to. Two explanations fit what was seen:

- per-argument work in the runtime (each parameter array's buffer and events): then the cost
  grows with the argument count, whatever the program does;
- XLA re-recording its command buffers (CUDA graphs) because a buffer they use moved: the
  inputs are new arrays every call, and so are the outputs. Then calling a program again on
  the *same* input array, with its last output freed (the allocator may hand the same
  address back), costs less than calling it on a fresh input.

This times, for each component program (`--components`), median over `--calls` waited-for
calls (wall) and the host time until the call returns (dispatch):
  same_free   the same input array every call; each output deleted before the next call
  same_keep   the same input array; every output kept alive (each call a new output buffer)
  fresh_free  a new input array every call (made and waited for beforehand); outputs deleted
and the same for a program of N small arguments that does almost nothing (`--arg_counts`),
each with command buffers as configured and with them off (`--no_command_buffers_too`).

Writes launch_probe_<config>_<dtype><tag>.json and .md to `experiments.common.results_dir()`.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS

COMPONENTS = ("text_encoder", "vae_decode", "denoise")
CASES = ("same_free", "same_keep", "fresh_free")
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def define_flags() -> None:
    """Registered only when run as a script (tests import the module for its functions)."""
    from experiments import common

    common.define_pipeline_flags()
    flags.DEFINE_integer("steps", 20, "DDIM steps of the denoising program")
    flags.DEFINE_list("components", list(COMPONENTS), f"of {', '.join(COMPONENTS)}")
    flags.DEFINE_list("arg_counts", ["1", "100", "1000"], "argument counts of the tiny program")
    flags.DEFINE_integer("calls", 10, "timed calls per case")
    flags.DEFINE_bool("no_command_buffers_too", True,
                      "repeat the text encoder, VAE and tiny programs with command buffers off")  # fmt: skip
    flags.DEFINE_string("tag", "", "suffix of the output file names")


def time_calls(call, inputs, *, keep: bool, calls: int) -> dict:
    """Median wall (waited for) and dispatch time (until the call returns) over `calls`
    calls of call(inputs[i % len(inputs)]), after two warm-up calls. ms."""
    import jax

    for i in range(2):
        jax.block_until_ready(call(inputs[i % len(inputs)]))
    kept, walls, dispatches = [], [], []
    for i in range(calls):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        out = call(x)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        walls.append((t2 - t0) * 1e3)
        dispatches.append((t1 - t0) * 1e3)
        if keep:
            kept.append(out)
        del out
    return {"wall_ms": statistics.median(walls), "dispatch_ms": statistics.median(dispatches),
            "walls_ms": walls}  # fmt: skip


def fresh_copies(x, n: int):
    """n arrays equal to x in distinct buffers (each waited for)."""
    import jax

    copies = [jax.jit(lambda a: a + 0)(x) for _ in range(n)]  # a + 0: a new buffer
    return jax.block_until_ready(copies)


def probe_cases(call, x, *, calls: int) -> dict:
    return {
        "same_free": time_calls(call, [x], keep=False, calls=calls),
        "same_keep": time_calls(call, [x], keep=True, calls=calls),
        "fresh_free": time_calls(call, fresh_copies(x, calls), keep=False, calls=calls),
    }


def component_programs(pipe, components, *, steps: int, resolution: int):
    """{component: (call(x), x)} for the pipeline's compiled programs, as `generate` runs
    them (DDIM, guidance 7.5, one prompt)."""
    import functools

    import jax
    import numpy as np

    from sdjax import pipeline as pl

    cfg = pipe.config
    f = cfg.vae.downscale
    latent_shape = (1, resolution // f, resolution // f, cfg.unet.in_channels)
    tokens = pipe.tokenizer(["a photograph of an astronaut riding a horse"])
    neg = pipe.tokenizer([""])
    ids = jax.device_put(np.stack([tokens.ids, neg.ids]), pipe.batch_sharding)
    encode, _ = pipe._compile("encode_text", pipe._encode_fn(), pipe.params["text_encoder"], ids)
    context, uncond = jax.block_until_ready(pipe._run(encode, "text_encoder", ids))
    sched = pipe.make_scheduler("ddim", steps)
    x0 = pl.device_noise(0, [0], latent_shape[1:], "latents", scale=sched.init_noise_sigma,
                         sharding=pipe.batch_sharding)  # fmt: skip
    progs = {}
    if "text_encoder" in components:
        progs["text_encoder"] = (lambda a: pipe._run(encode, "text_encoder", a), ids)
    if "denoise" in components:
        loop = functools.partial(
            pl.denoise_loop, unet_config=cfg.unet, scheduler=sched, start_index=0,
            dtype=pipe.dtype, kernels=pipe.kernels, sharding=pipe.batch_sharding,
            progress=None, hoist_conditioning=pipe.hoist_conditioning,
        )  # fmt: skip
        guidance = np.float32(7.5)
        args = (pipe.params["unet"], x0, context, uncond, guidance, None)
        run_loop, _ = pipe._compile("denoise", loop, *args,
                                    statics=(sched, 0, None, pipe.hoist_conditioning))  # fmt: skip
        progs["denoise"] = (
            lambda a: pipe._run(run_loop, "unet", a, context, uncond, guidance, None), x0
        )
    if "vae_decode" in components:
        decode, _ = pipe._compile("decode", pipe._decode_fn(), pipe.params["vae"], x0)
        progs["vae_decode"] = (lambda a: pipe._run(decode, "vae", a), x0)
    return progs


def tiny_program(n: int, options: dict):
    """(call(x), x, params) for a program of n small arguments (plus x) that adds one element
    of each to x: its cost is the call's, not its kernels'."""
    import jax
    import jax.numpy as jnp

    params = [jnp.full((256,), i, jnp.float16) for i in range(n)]

    def fn(ps, x):
        return x + sum(p[0].astype(jnp.float32) for p in ps)

    x = jnp.zeros((1024,), jnp.float32)
    compiled = jax.jit(fn).lower(params, x).compile(compiler_options=options or None)
    return (lambda a: compiled(params, a)), x


def probe(config_name: str, dtype: str | None, kernels: str, *, components=COMPONENTS,
          steps: int = 20, resolution: int | None = None, arg_counts=(1, 100, 1000),
          calls: int = 10, no_command_buffers_too: bool = True) -> dict:  # fmt: skip

    from experiments import common
    from sdjax import config as sd_config
    from sdjax.pipeline import StableDiffusion

    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    if calls < 1:
        raise ValueError(f"calls must be >= 1; got {calls}")
    dtype = common.default_dtype(dtype)
    config = sd_config.preset(config_name)
    res = resolution or config.default_resolution
    record = {"device": common.device_info(), "config": config_name, "dtype": dtype,
              "kernels": kernels, "steps": steps, "resolution": res, "calls": calls,
              "rows": []}  # fmt: skip
    settings = [("default", None)]
    if no_command_buffers_too:
        settings.append(("no_command_buffers", NO_COMMAND_BUFFERS))
    pipe = StableDiffusion.from_random(config, dtype=dtype, kernels=kernels)
    for setting, extra in settings:
        if extra is not None:  # the same pipeline's programs compiled with the options added
            pipe.compiler_options = {**pipe.compiler_options, **extra}
        # the loop once, with command buffers as configured (its compile is the long one)
        comps = [c for c in components if extra is None or c != "denoise"]
        for name, (call, x) in component_programs(pipe, comps, steps=steps,
                                                   resolution=res).items():  # fmt: skip
            for case, r in probe_cases(call, x, calls=calls).items():
                record["rows"].append({"program": name, "setting": setting, "case": case, **r})
                print(record["rows"][-1], flush=True)
        for n in arg_counts:
            call, x = tiny_program(int(n), {**pipe.compiler_options})
            for case, r in probe_cases(call, x, calls=calls).items():
                record["rows"].append({"program": f"tiny_{n}_args", "setting": setting,
                                       "case": case, **r})  # fmt: skip
                print(record["rows"][-1], flush=True)
    return record


def markdown(record: dict) -> str:
    from experiments import common

    dev = record["device"]
    md = (f"# Launch probe: {record['config']} {record['resolution']}px, {record['dtype']}, "
          f"kernels={record['kernels']}\n\ndevice: {dev['device_kind']}, jax {dev['jax']}. "
          f"Medians of {record['calls']} calls each, ms.\n\n")  # fmt: skip
    return md + common.markdown_table(
        record["rows"], ["program", "setting", "case", "wall_ms", "dispatch_ms"]
    )


def main(argv):
    del argv
    from experiments import common

    common.enable_compilation_cache()
    record = probe(FLAGS.config, FLAGS.dtype, FLAGS.kernels, components=tuple(FLAGS.components),
                   steps=FLAGS.steps, resolution=FLAGS.resolution,
                   arg_counts=tuple(int(n) for n in FLAGS.arg_counts), calls=FLAGS.calls,
                   no_command_buffers_too=FLAGS.no_command_buffers_too)  # fmt: skip
    stem = f"launch_probe_{record['config']}_{record['dtype']}{FLAGS.tag}"
    common.write_record(stem, record, markdown(record))


if __name__ == "__main__":
    define_flags()
    app.run(main)
