"""Reading what XLA built: counts of our kernels, library calls and fusions in optimized HLO."""

from __future__ import annotations

import collections
import re

_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_SDJAX_NAME = re.compile(r"(sdjax_[A-Za-z0-9_]+)")


def count_hlo(hlo_text: str) -> dict:
    """Counts in an optimized HLO module's text.

    Returns {"custom_calls": {target: n}, "sdjax_kernels": {name: n}, "fusions": n,
    "cudnn": n, "cublas": n}. Inside a while loop (the denoising scan) the body is listed
    once, so a loop body's counts are per step.
    """
    targets = collections.Counter()
    kernels = collections.Counter()
    fusions = 0
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.search(line)
        if m:
            targets[m.group(1)] += 1
            k = _SDJAX_NAME.search(line)
            if k:
                kernels[k.group(1)] += 1
        elif re.search(r"=\s*\S+\s+fusion\(", line):
            fusions += 1
    return {
        "custom_calls": dict(targets),
        "sdjax_kernels": dict(kernels),
        "fusions": fusions,
        "cudnn": sum(n for t, n in targets.items() if "cudnn" in t.lower()),
        "cublas": sum(n for t, n in targets.items() if "cublas" in t.lower()),
        "triton": sum(n for t, n in targets.items() if "triton" in t.lower()),
    }


def expected_kernels(kernels) -> set[str]:
    """Kernel name prefixes that must appear for an Implementations choice."""
    want = set()
    if kernels.attention == "flash":
        want.add("sdjax_flash_attention")
    if kernels.attention == "flash_hopper":
        want.add("sdjax_flash_hopper")
    if kernels.attention == "fused_softmax":
        want.add("sdjax_fused_softmax")
    if kernels.group_norm == "pallas":
        want.add("sdjax_group_norm")
    if kernels.geglu == "pallas":
        want.add("sdjax_geglu")
    if kernels.geglu == "pallas_hopper":
        want.add("sdjax_geglu_hopper")
    return want


def unet_step_hlo(config, kernels, dtype, latent: int) -> str:
    """Optimized HLO text of one guided UNet call at batch 2 (random params, not allocated)."""
    import jax
    import jax.numpy as jnp

    from sdjax import ops
    from sdjax.models import unet as unet_lib

    cfg = config.unet
    params = jax.eval_shape(lambda: unet_lib.init_params(cfg, jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), params)
    x = jax.ShapeDtypeStruct((2, latent, latent, cfg.in_channels), dtype)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((2, 77, cfg.cross_attention_dim), dtype)

    def step(p, x, t, ctx):
        with ops.use(kernels):
            return unet_lib.UNet2DConditionModel(cfg).apply({"params": p}, x, t, ctx)

    return jax.jit(step).lower(params, x, t, ctx).compile().as_text()
