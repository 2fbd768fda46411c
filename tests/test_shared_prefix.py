"""Shared samples in a guided batch: the UNet given N samples and 2N text states runs what comes
before its first cross-attention once per sample, and must give what it gives for the samples
repeated (`UNet2DConditionModel.__call__`, `pipeline.guided_unet(share_prefix=)`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import config as sd_config
from sdjax import pipeline, schedulers, weights
from sdjax.models import unet as unet_lib
from sdjax.models.layers import repeat_copies
from tests._pipeline_util import two_prompt_latents

CFG = sd_config.preset("tiny")
# The first down block without cross-attention: the shared part then spans a whole block, its
# downsample, and skips that the up path reads at N (the last up block's and an upsampler's).
FIRST_PLAIN = dataclasses.replace(
    CFG.unet,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
TOL = 1e-5  # float32 on the CPU: batch-dependent reduction orders at most


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _params(unet_config, seed=3):
    return unet_lib.init_params(unet_config, jax.random.PRNGKey(seed))


def _inputs(n, copies, unet_config, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k[0], (n, 12, 12, unet_config.in_channels))
    ctx = jax.random.normal(k[1], (copies * n, 77, unet_config.cross_attention_dim))
    t = jax.random.randint(k[2], (n,), 0, 1000)
    return x, t, ctx


def test_repeat_copies_layout_and_errors():
    x = jnp.arange(3.0)[:, None]
    np.testing.assert_array_equal(repeat_copies(x, 6)[:, 0], [0, 0, 1, 1, 2, 2])
    assert repeat_copies(x, 3) is x
    with pytest.raises(ValueError, match="cannot be shared by 4"):
        repeat_copies(x, 4)


@pytest.mark.parametrize("unet_config", [CFG.unet, FIRST_PLAIN], ids=["sd_layout", "first_plain"])
@pytest.mark.parametrize("copies", [2, 3])
def test_shared_samples_give_the_repeated_batch(unet_config, copies):
    params = _params(unet_config)
    x, t, ctx = _inputs(3, copies, unet_config)
    model = unet_lib.UNet2DConditionModel(unet_config)
    # per-sample timesteps: the time embedding is made for the N samples and widened after
    ref = model.apply({"params": params}, jnp.repeat(x, copies, 0), jnp.repeat(t, copies), ctx)
    out = model.apply({"params": params}, x, t, ctx)
    assert out.shape == ref.shape == (3 * copies, 12, 12, unet_config.out_channels)
    assert rel(out, ref) < TOL
    # the conditioned form (precomputed K/V, one timestep for the batch: a bias) as the loop runs it
    variables = {"params": params}
    cond = unet_lib.merge_conditioning(
        model.apply(variables, ctx, jnp.float32, (12, 12), method="context_conditioning"),
        jax.tree.map(lambda a: a[:1], model.apply(variables, t[:1], jnp.float32,
                                                  method="time_conditioning")),
    )  # fmt: skip
    ref = unet_lib.conditioned_apply(params, unet_config, jnp.repeat(x, copies, 0), t[:1], cond)
    out = unet_lib.conditioned_apply(params, unet_config, x, t[:1], cond)
    assert out.shape == ref.shape
    assert rel(out, ref) < TOL


def test_the_shared_part_runs_at_the_samples_batch():
    """SD's layout: conv_in, the first resnet's two 3x3 convs and the first transformer's
    input projection (a 1x1 conv in SD1) see N samples; every conv after them sees 2N."""
    params = _params(CFG.unet)
    x, t, ctx = _inputs(3, 2, CFG.unet)
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    jaxpr = jax.make_jaxpr(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(
        params, x, t, ctx
    )
    convs = [e.invars[0].aval.shape[0] for e in _eqns(jaxpr.jaxpr)
             if e.primitive.name == "conv_general_dilated"]  # fmt: skip
    assert convs[:4] == [3, 3, 3, 3]  # conv_in, resnets_0's conv1 and conv2, proj_in
    assert set(convs[4:]) == {6} and len(convs) > 4
    # the same program with the samples repeated: every conv at 2N
    jaxpr2 = jax.make_jaxpr(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(
        params, jnp.repeat(x, 2, 0), jnp.repeat(t, 2), ctx
    )
    convs2 = [e.invars[0].aval.shape[0] for e in _eqns(jaxpr2.jaxpr)
              if e.primitive.name == "conv_general_dilated"]  # fmt: skip
    assert set(convs2) == {6} and len(convs2) == len(convs)


def test_text_states_not_a_multiple_of_the_samples_are_a_clear_error():
    params = _params(CFG.unet)
    x, t, ctx = _inputs(2, 1, CFG.unet)
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    with pytest.raises(ValueError, match="3 text states for 2 samples"):
        model.apply({"params": params}, x, t, ctx[:1].repeat(3, 0))


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("scheduler_name", ["ddim", "euler_a"])
def test_guided_loop_same_with_and_without_the_shared_prefix(hoist, scheduler_name):
    params = weights.random_params(CFG, seed=3)["unet"]
    steps = 3
    sched = schedulers.make(scheduler_name, CFG.scheduler, steps)
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    x = jax.random.normal(k[0], (2, 16, 16, 4)) * sched.init_noise_sigma
    ctx, uctx = (jax.random.normal(kk, (2, 77, 32)) for kk in k[1:3])
    noise = jax.random.normal(k[3], (steps, *x.shape)) if sched.needs_noise else None
    outs = {}
    for share in (True, False):
        outs[share] = jax.jit(
            lambda p, x, c, u, nz, share=share: pipeline.denoise_loop(
                p, x, c, u, 7.5, nz, unet_config=CFG.unet, scheduler=sched,
                hoist_conditioning=hoist, share_guidance_prefix=share,
            )  # fmt: skip
        )(params, x, ctx, uctx, noise)
    assert rel(outs[True], outs[False]) < TOL


def test_pipeline_images_same_with_and_without_the_shared_prefix():
    latents = {share: two_prompt_latents(share_guidance_prefix=share) for share in (True, False)}
    assert rel(latents[True], latents[False]) < TOL


def _eqns(jaxpr) -> list:
    """Every equation of a jaxpr, nested calls included."""
    out = []
    for e in jaxpr.eqns:
        out.append(e)
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out.extend(_eqns(getattr(inner, "jaxpr", inner)))
    return out


@pytest.mark.gpu
def test_sd15_first_transformer_shared_on_gpu():
    """On the GPU, under `auto` in fp16, at SD1.5's first transformer (64x64 tokens, 320
    channels, 8 heads of 40): one sample for two contexts runs our kernels at batch 1 (the
    Hopper self-attention, the GroupNorm) and must give what the repeated batch gives. Both
    are compared with the float32 reference path, within the same bound."""
    from sdjax import ops
    from sdjax.models.layers import Transformer2DModel

    model = Transformer2DModel(320, 8)
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(k[0], (1, 64, 64, 320))
    ctx = jax.random.normal(k[1], (2, 77, 768))
    params = model.init(k[2], x, ctx)["params"]
    with ops.use("reference"):
        want = jax.jit(model.apply)({"params": params}, jnp.repeat(x, 2, 0), ctx)
    half = jax.tree.map(lambda a: a.astype(jnp.float16), params)
    x16, ctx16 = x.astype(jnp.float16), ctx.astype(jnp.float16)
    with ops.use("auto"):
        shared = jax.jit(model.apply)({"params": half}, x16, ctx16)
        repeated = jax.jit(model.apply)({"params": half}, jnp.repeat(x16, 2, 0), ctx16)
    assert shared.shape == repeated.shape == (2, 64, 64, 320)
    assert rel(repeated, want) < 5e-3  # fp16 against float32: the repeated batch's bound
    assert rel(shared, want) < 5e-3
    assert rel(shared, repeated) < 5e-3
