"""Golden checks of the Flax UNet against diffusers' PyTorch UNet2DConditionModel (fp32, CPU)."""

from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import ops
from sdjax.config import UNetConfig
from sdjax.models import unet
from tests._convert import convert_state_dict, load_folder, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # relative error, fp32

# Small random models with the SD shape options.
CONFIGS = {
    # SD1: conv proj_in/proj_out, 4 heads everywhere (head dims 8, 16, 16), a context width
    # different from every block's width.
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=16,
    ),
    # SD2: linear projections, per-block heads with one head dim (10: not a power of two),
    # two transformer layers in the lower blocks, and in/out channel counts that differ.
    "sd2": dict(
        in_channels=5,
        out_channels=3,
        block_out_channels=(40, 80, 80),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(4, 8, 8),
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
        sample_size=12,
    ),
}


def _torch_unet(seed: int, **kwargs):
    """A diffusers UNet with default init, plus noise on every 1-D tensor so that the norm
    scales and biases are not 1 and 0 (a swapped or dropped one would then go unnoticed)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, folder written by save_pretrained)."""
    out = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        model = _torch_unet(i, **kwargs)
        folder = tmp_path_factory.mktemp(f"unet_{name}")
        model.save_pretrained(folder, safe_serialization=True)
        out[name] = (model, folder)
    return out


def _ours(config: UNetConfig, impl: str):
    """The jitted forward, params as an argument (closed over, they would become constants)."""
    model = unet.UNet2DConditionModel(config)

    @jax.jit
    def run(params, sample, t, context):
        with ops.use(impl):
            return model.apply({"params": params}, sample, t, context)

    return run


def _theirs(model, sample_nhwc, t, context) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(sample_nhwc.transpose(0, 3, 1, 2)),
            torch.as_tensor(t),
            torch.from_numpy(context),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_sd1_like_batch3(saved, impl, rng):
    """Batch 3 at timesteps 1, 500 and 999 at once."""
    model, folder = saved["sd1"]
    config, params = load_folder(folder, UNetConfig, unet.init_params)
    sample = rng.standard_normal((3, 16, 16, 4), np.float32)
    context = rng.standard_normal((3, 77, 48), np.float32)
    t = np.array([1, 500, 999])
    ours = _ours(config, impl)(params, sample, t, context)
    err = rel_err(ours, _theirs(model, sample, t, context))
    print(f"unet sd1-like [{impl}] rel err {err:.2e}")
    assert ours.shape == (3, 16, 16, 4)
    assert err <= TOL


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_sd2_like_scalar_timesteps(saved, impl, rng):
    """Linear projections, head dim 10, a 10x12 latent (odd sizes on the way down, so the up
    path upsamples to explicit sizes), scalar timesteps."""
    model, folder = saved["sd2"]
    config, params = load_folder(folder, UNetConfig, unet.init_params)
    assert config.use_linear_projection and config.head_dims == (10, 10, 10)
    sample = rng.standard_normal((2, 10, 12, 5), np.float32)
    context = rng.standard_normal((2, 77, 24), np.float32)
    run = _ours(config, impl)
    for t in (1, 500, 999):
        ours = run(params, sample, jnp.asarray(t), context)
        err = rel_err(ours, _theirs(model, sample, t, context))
        print(f"unet sd2-like [{impl}] t={t} rel err {err:.2e}")
        assert ours.shape == (2, 10, 12, 3)
        assert err <= TOL, f"{t=}"


@pytest.mark.parametrize("dim", [320, 33])
@pytest.mark.parametrize("flip_sin_to_cos, freq_shift", [(True, 0), (False, 1)])
def test_timestep_embedding(dim, flip_sin_to_cos, freq_shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 250.5, 999], np.float32)
    theirs = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos, freq_shift)
    ours = unet.timestep_embedding(
        jnp.asarray(t), dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift
    )
    assert ours.dtype == jnp.float32
    # exp() differs by an ulp between XLA and torch; times t ~ 1000 that moves the phase
    # of sin/cos by up to ~1e-4.
    np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-4)


def test_params_match_diffusers_names(saved):
    """Every diffusers tensor has exactly one Flax leaf of the converted shape, and back."""
    _, folder = saved["sd2"]
    config, params = load_folder(folder, UNetConfig, unet.init_params)  # strict: raises
    shapes = jax.eval_shape(lambda: unet.init_params(config, jax.random.key(0)))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)


@pytest.mark.slow
def test_sd15_full_size(rng):
    """The real SD1.5 UNet architecture with random weights, one 32x32-latent forward."""
    torch.set_num_threads(2)
    model = _torch_unet(0, cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    sample = rng.standard_normal((1, 32, 32, 4), np.float32)
    context = rng.standard_normal((1, 77, 768), np.float32)
    t = np.array([500])
    start = time.perf_counter()
    theirs = _theirs(model, sample, t, context)
    torch_s = time.perf_counter() - start

    config = UNetConfig.from_json(dict(model.config))
    shapes = jax.eval_shape(lambda: unet.init_params(config, jax.random.key(0)))
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    del model
    params = convert_state_dict(tensors, shapes)  # copies; the torch storage goes next
    del tensors
    gc.collect()

    start = time.perf_counter()
    compiled = _ours(config, "reference").lower(params, sample, t, context).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = jax.block_until_ready(compiled(params, sample, t, context))
    run_s = time.perf_counter() - start
    err = rel_err(ours, theirs)
    print(
        f"unet sd15 full size, 32x32 latent: rel err {err:.2e}; torch {torch_s:.1f}s, "
        f"jax compile {compile_s:.1f}s + run {run_s:.1f}s"
    )
    assert err <= TOL
