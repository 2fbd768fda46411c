"""Regenerates the golden outputs of the reference path: tests/golden/tiny_reference.npz.

    python -m experiments.make_golden

The `tiny` config, parameters drawn with numpy (not jax/flax initializers, so the goldens do
not move when those change), fixed inputs, float32, `reference` ops. `tests/test_golden.py`
recomputes the same outputs and compares. Rerun this only when a change of numbers is
intended, and say why in the commit.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from absl import app

from sdjax import config as sd_config
from sdjax import ops, weights
from sdjax.models import clip
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "tests" / "golden" / "tiny_reference.npz"
SEED = 1234


def inputs(config) -> dict:
    rng = np.random.default_rng(SEED)
    f = config.vae.downscale
    side = config.unet.sample_size
    return {
        "ids": rng.integers(0, config.text_encoder.vocab_size, (2, 77)).astype(np.int32),
        "latents": rng.standard_normal((2, side, side, config.unet.in_channels)).astype(np.float32),
        "timesteps": np.array([17, 801], np.int32),
        "image": rng.uniform(-1, 1, (1, side * f, side * f, config.vae.in_channels)).astype(
            np.float32
        ),
    }


def compute(config, params, x) -> dict:
    with ops.use("reference"):
        ctx = clip.encode(params["text_encoder"], x["ids"], config.text_encoder, dtype=jnp.float32)
        eps = UNet2DConditionModel(config.unet).apply(
            {"params": params["unet"]}, x["latents"], x["timesteps"], ctx
        )
        vae = AutoencoderKL(config.vae)
        mean, logvar = vae.apply({"params": params["vae"]}, x["image"], method="encode")
        decoded = vae.apply({"params": params["vae"]}, x["latents"][:1], method="decode")
    return {
        "text_encoder": ctx,
        "unet": eps,
        "vae_mean": mean,
        "vae_logvar": logvar,
        "vae_decode": decoded,
    }


def golden_params(config) -> dict:
    comps = {"text_encoder": config.text_encoder, "unet": config.unet, "vae": config.vae}
    return {
        c: weights.numpy_params(weights.expected_params(c, cfg), SEED + i)
        for i, (c, cfg) in enumerate(comps.items())
    }


def main(argv):
    del argv
    config = sd_config.preset("tiny")
    outputs = compute(config, golden_params(config), inputs(config))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN, **{k: np.asarray(v) for k, v in outputs.items()})
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes): {sorted(outputs)}")


if __name__ == "__main__":
    app.run(main)
