"""Golden checks of the Flax VAE against diffusers' PyTorch AutoencoderKL (fp32, CPU)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sdjax import ops
from sdjax.config import VAEConfig
from sdjax.models import vae
from tests._convert import load_folder, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # relative error, fp32

_ENC, _DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"
CONFIGS = {
    # Three levels (downscale 4), two resnets per level, mid attention with head dim 32.
    "three_levels": dict(
        block_out_channels=(16, 32, 32),
        down_block_types=(_ENC,) * 3,
        up_block_types=(_DEC,) * 3,
        layers_per_block=2,
        norm_num_groups=8,
    ),
    # Channel counts that are not powers of two: mid attention head dim 48.
    "odd_channels": dict(
        block_out_channels=(24, 48),
        down_block_types=(_ENC,) * 2,
        up_block_types=(_DEC,) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=3,
    ),
    # No mid-block attention.
    "no_attention": dict(
        block_out_channels=(16, 32),
        down_block_types=(_ENC,) * 2,
        up_block_types=(_DEC,) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    ),
}
CASES = [("three_levels", "reference"), ("three_levels", "xla"), ("odd_channels", "reference")]
CASES += [("no_attention", "reference"), ("three_levels", "subpixel")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, folder written by save_pretrained). Norm scales and all biases
    get noise so that a swapped or dropped one shows."""
    out = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = diffusers.AutoencoderKL(**kwargs).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp(f"vae_{name}")
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (model, folder)
    return out


def _nchw(x: np.ndarray):
    return torch.from_numpy(x.transpose(0, 3, 1, 2))


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _jitted(config: VAEConfig, method: str, impl: str):
    model = vae.AutoencoderKL(config)

    # "subpixel": the reference path with the upsamplers' four-phase convolution
    impls = ops.Implementations(upsample_conv="subpixel") if impl == "subpixel" else impl

    @jax.jit
    def run(params, x):
        with ops.use(impls):
            return model.apply({"params": params}, x, method=getattr(model, method))

    return run


@pytest.mark.parametrize("name, impl", CASES)
def test_encode(saved, name, impl, rng):
    model, folder = saved[name]
    config, params = load_folder(folder, VAEConfig, vae.init_params)
    image = rng.uniform(-1, 1, (2, 32, 32, config.in_channels)).astype(np.float32)
    mean, logvar = _jitted(config, "encode", impl)(params, image)
    with torch.no_grad():
        dist = model.encode(_nchw(image)).latent_dist
    side = 32 // config.downscale
    assert mean.shape == logvar.shape == (2, side, side, config.latent_channels)
    err_mean, err_logvar = rel_err(mean, _nhwc(dist.mean)), rel_err(logvar, _nhwc(dist.logvar))
    print(f"vae encode {name} [{impl}] rel err mean {err_mean:.2e} logvar {err_logvar:.2e}")
    assert err_mean <= TOL and err_logvar <= TOL


@pytest.mark.parametrize("name, impl", CASES)
def test_decode(saved, name, impl, rng):
    model, folder = saved[name]
    config, params = load_folder(folder, VAEConfig, vae.init_params)
    z = rng.standard_normal((2, 6, 8, config.latent_channels), np.float32)  # not square
    image = _jitted(config, "decode", impl)(params, z)
    with torch.no_grad():
        theirs = _nhwc(model.decode(_nchw(z)).sample)
    assert image.shape == (2, 6 * config.downscale, 8 * config.downscale, config.out_channels)
    err = rel_err(image, theirs)
    print(f"vae decode {name} [{impl}] rel err {err:.2e}")
    assert err <= TOL


def test_decode_with_prepared_phase_kernels(saved, rng):
    """`prepare_decode`'s phase kernels and stacked q/k/v weights, passed in, give the decode
    that builds them itself (and diffusers'); where every upsampler takes the reference form
    only the attention's weights are prepared."""
    model, folder = saved["three_levels"]
    config, params = load_folder(folder, VAEConfig, vae.init_params)
    net = vae.AutoencoderKL(config)
    z = rng.standard_normal((2, 6, 8, config.latent_channels), np.float32)
    subpixel = ops.Implementations(upsample_conv="subpixel")

    @jax.jit
    def run(params, prepared, z):
        with ops.use(subpixel):
            return net.apply({"params": params, **prepared}, z, method=net.decode)

    with ops.use(subpixel):
        prepared = net.apply({"params": params}, np.float32, (6, 8), method=net.prepare_decode)
    kernels = prepared["conditioning"]["decoder"]
    # the last block does not upsample; the mid-block attention's q, k, v side by side
    assert sorted(kernels) == ["mid_block", "up_blocks_0", "up_blocks_1"]
    assert kernels["up_blocks_1"]["upsamplers_0"]["phase_kernel"].shape == (2, 2, 32, 4 * 32)
    assert kernels["mid_block"]["attentions_0"]["qkv_kernel"].shape == (32, 3 * 32)
    image = run(params, prepared, z)
    np.testing.assert_allclose(image, run(params, {}, z), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert rel_err(image, _nhwc(model.decode(_nchw(z)).sample)) <= TOL
    with ops.use("reference"):  # the reference upsampler: nothing to precompute for it
        reference = net.apply({"params": params}, np.float32, (6, 8), method=net.prepare_decode)
    assert list(reference["conditioning"]["decoder"]) == ["mid_block"]
    np.testing.assert_allclose(run(params, reference, z), image, rtol=1e-5, atol=1e-5)
