"""Check a fast configuration against the float32 reference path, component by component.

    python -m experiments.compare_reference --config tiny --kernels pallas --dtype float32
    python -m experiments.compare_reference --checkpoint /path/sd15 --kernels auto --dtype float16

Runs the reference (float32, `reference` ops) and the chosen configuration on the same
weights and inputs, and reports the relative error ||fast - ref|| / ||ref|| of: the text
encoder's output, every UNet block's output (one call at t=500), the UNet output, the final
latents of a short generation, and the decoded image. Exits 1 when any error is above the
tolerance (per dtype, below; --tolerance overrides), or is NaN. Writes compare_reference.json.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "checkpoint", None, "diffusers-layout folder or Hub repo id; none: random weights"
)
flags.DEFINE_string("config", "tiny", "architecture preset for random weights")
flags.DEFINE_string("kernels", "auto", "op implementation preset for the fast path")
common.define_implementation_flags()  # --attention, --group_norm, ..., --conv_planes
flags.DEFINE_enum("dtype", "float32", ["float16", "bfloat16", "float32"], "the fast path's dtype")
flags.DEFINE_integer(
    "resolution", None, "pixels per side (default: the model's, capped at 256 on CPU)"
)
flags.DEFINE_integer("steps", 4, "steps of the short generation")
flags.DEFINE_float("tolerance", None, "max relative error per component (default: by dtype)")
flags.DEFINE_integer("seed", 0, "seed of the inputs")
flags.DEFINE_string("out", None, "folder for compare_reference.json (default: results_dir())")

# Relative-norm tolerances per single component call (METHOD.md: float32 lands far under
# 1e-3; bf16 operands between 1e-3 and 1e-2). Deep stacks compound rounding, so each
# component gets a few times the per-op figure; the multi-step loop gets LOOP_FACTOR more.
TOLERANCE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 6e-2}
LOOP_FACTOR = 3.0


def _unet_blocks(unet_cfg, params, x, t, ctx, dtype, kernels):
    """UNet output and each top-level block's output, captured with Flax intermediates."""
    import jax
    import jax.numpy as jnp

    from sdjax import ops
    from sdjax.models.unet import UNet2DConditionModel

    def keep(mdl, method_name):
        return (
            method_name == "__call__"
            and len(mdl.scope.path) == 1
            and mdl.scope.path[0].startswith(("down_blocks", "mid_block", "up_blocks"))
        )

    @jax.jit
    def run(params, x, ctx):
        with ops.use(kernels):
            cast = jax.tree.map(lambda a: a.astype(dtype), params)
            out, state = UNet2DConditionModel(unet_cfg).apply(
                {"params": cast}, x.astype(dtype), t, ctx.astype(dtype), capture_intermediates=keep
            )
        inter = {k: v["__call__"][0] for k, v in state["intermediates"].items()}
        # A down block returns (x, skips): compare its hidden state.
        inter = {
            k: (v[0] if isinstance(v, tuple) else v).astype(jnp.float32) for k, v in inter.items()
        }
        return out.astype(jnp.float32), inter

    return run(params, x, ctx)


def compare() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import common
    from sdjax import config as sd_config
    from sdjax import ops, weights
    from sdjax.models import clip
    from sdjax.pipeline import StableDiffusion
    from sdjax.tokenizer import Tokenizer

    fast = ops.Implementations.preset(FLAGS.kernels)
    overrides = {
        k: getattr(FLAGS, k) for k in ops.Implementations.fields() if getattr(FLAGS, k)
    }
    fast = dataclasses.replace(fast, **overrides)
    ref_impl = ops.PRESETS["reference"]
    dtype = jnp.dtype(FLAGS.dtype)
    tol = FLAGS.tolerance or TOLERANCE[FLAGS.dtype]

    if FLAGS.checkpoint:
        folder = weights.resolve_checkpoint(FLAGS.checkpoint)
        config, params = weights.load_pipeline(folder, dtype=jnp.float32)
        tokenizer = Tokenizer.from_folder(folder / "tokenizer")
    else:
        config = sd_config.preset(FLAGS.config)
        params = weights.random_params(config, FLAGS.seed, dtype=jnp.float32)
        tokenizer = Tokenizer.default()
    res = FLAGS.resolution or config.default_resolution
    if FLAGS.resolution is None and jax.default_backend() != "gpu":
        res = min(res, 256)
    errors: dict[str, float] = {}

    # 1. text encoder
    ids = tokenizer("a photograph of an astronaut riding a horse").ids
    with ops.use(ref_impl):
        ctx_ref = clip.encode(params["text_encoder"], ids, config.text_encoder, dtype=jnp.float32)
    with ops.use(fast):
        cast = jax.tree.map(lambda a: a.astype(dtype), params["text_encoder"])
        ctx_fast = clip.encode(cast, ids, config.text_encoder, dtype=dtype)
    errors["text_encoder"] = common.relative_error(ctx_fast, ctx_ref)

    # 2. one UNet call, block by block (batch 2 as under guidance)
    f = config.vae.downscale
    key = jax.random.PRNGKey(FLAGS.seed)
    x = jax.random.normal(key, (2, res // f, res // f, config.unet.in_channels), jnp.float32)
    ctx = jnp.concatenate([ctx_ref, ctx_ref[:, ::-1]])  # two different contexts
    t = jnp.array([500, 500], jnp.int32)
    out_ref, inter_ref = _unet_blocks(config.unet, params["unet"], x, t, ctx, jnp.float32, ref_impl)
    out_fast, inter_fast = _unet_blocks(config.unet, params["unet"], x, t, ctx, dtype, fast)
    for name in sorted(inter_ref):
        errors[f"unet/{name}"] = common.relative_error(inter_fast[name], inter_ref[name])
    errors["unet/out"] = common.relative_error(out_fast, out_ref)

    # 3. a short generation through the pipeline, and the decoded image
    kw = dict(
        steps=FLAGS.steps, guidance=7.5, scheduler="ddim", seed=FLAGS.seed, height=res, width=res
    )
    prompt = "a photograph of an astronaut riding a horse"
    r_ref = StableDiffusion(config, params, tokenizer, dtype="float32", kernels=ref_impl).generate(
        prompt, **kw
    )
    r_fast = StableDiffusion(config, params, tokenizer, dtype=FLAGS.dtype, kernels=fast).generate(
        prompt, **kw
    )
    errors["final_latents"] = common.relative_error(r_fast.latents, r_ref.latents)
    errors["image"] = common.relative_error(
        r_fast.images.astype(np.float64), r_ref.images.astype(np.float64)
    )

    limits = {k: tol * (LOOP_FACTOR if k in ("final_latents", "image") else 1.0) for k in errors}
    failed = {k: v for k, v in errors.items() if not (v <= limits[k])}  # NaN/inf fail
    return {
        "device": common.device_info(),
        "architecture": config.name,
        "checkpoint": FLAGS.checkpoint,
        "fast": dataclasses.asdict(fast),
        "dtype": FLAGS.dtype,
        "resolution": res,
        "steps": FLAGS.steps,
        "tolerance": tol,
        "errors": errors,
        "limits": limits,
        "failed": failed,
        "image_mean_abs_diff": float(
            np.abs(r_fast.images.astype(np.float64) - r_ref.images.astype(np.float64)).mean()
        ),
    }


def main(argv):
    del argv
    import pathlib

    from experiments import common

    record = compare()
    out = pathlib.Path(FLAGS.out) if FLAGS.out else common.results_dir()
    common.write_json(out / "compare_reference.json", record)
    width = max(map(len, record["errors"]))
    for k, v in record["errors"].items():
        mark = "FAIL" if k in record["failed"] else "ok"
        print(f"{k:<{width}}  {v:.3e}  (limit {record['limits'][k]:.1e})  {mark}")
    if record["failed"]:
        print(
            f"error: {len(record['failed'])} component(s) past tolerance: {sorted(record['failed'])}",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
