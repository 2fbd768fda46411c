"""Single-file (ldm-named) checkpoints, the config inference and the fast format.

The files are written by the tests from small random diffusers models through
`single_file.to_ldm`. That export is checked against diffusers' own ldm -> diffusers
converters (an independent mapping), and loading the file must give exactly the params that
the diffusers-folder path gives.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file

from sdjax import fast_format, single_file, weights
from sdjax.config import PipelineConfig, preset
from sdjax.weights import CheckpointError

# Small models that follow SD's conventions (32 groups, 8 heads (SD 1) or 64 channels per head
# (SD 2), 64-wide text heads), so the inferred config must equal the real one.
_COMMON_UNET = dict(sample_size=64, norm_num_groups=32, cross_attention_dim=64)
FAMILIES = {
    "sd1": dict(
        unet=dict(
            block_out_channels=[32, 64, 64],
            layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=8,
            **_COMMON_UNET,
        ),
        text=dict(hidden_act="quick_gelu"),
    ),
    "sd2": dict(
        unet=dict(
            block_out_channels=[64, 128],
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=[1, 2],
            use_linear_projection=True,
            transformer_layers_per_block=[2, 1],
            **_COMMON_UNET,
        ),
        text=dict(hidden_act="gelu"),
    ),
}
_VAE = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=512,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)
_TEXT = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
)


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _write_folder(folder, family: str, seed: int):
    """A random diffusers-layout SD folder; returns the torch models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = FAMILIES[family]
    models = {
        "unet": _randomize(UNet2DConditionModel(**spec["unet"]), seed),
        "vae": _randomize(AutoencoderKL(**_VAE), seed + 1),
        "text_encoder": _randomize(
            CLIPTextModel(CLIPTextConfig(**_TEXT, **spec["text"])), seed + 2
        ),
    }
    for comp, model in models.items():
        model.save_pretrained(folder / comp)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return models


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(family, folder, ldm file, torch models, diffusers state dicts, ldm state dict)."""
    family = request.param
    folder = tmp_path_factory.mktemp(f"{family}_folder")
    models = _write_folder(folder, family, seed={"sd1": 0, "sd2": 10}[family])
    config = PipelineConfig.from_folder(folder)
    state_dicts = {comp: _numpy(m) for comp, m in models.items()}
    ldm = single_file.to_ldm(config, state_dicts)
    ldm["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)  # ignored buffers
    ldm["model_ema.decay"] = np.array(0.9999, np.float32)
    path = folder.parent / f"{family}.safetensors"
    save_file(ldm, path)
    return family, folder, path, models, state_dicts, ldm


@pytest.fixture(scope="module")
def folder_params(checkpoint):
    _, folder, *_ = checkpoint
    return weights.load_pipeline(folder)


def _assert_params_equal(a, b):
    for comp in ("text_encoder", "unet", "vae"):
        fa, fb = traverse_util.flatten_dict(a[comp]), traverse_util.flatten_dict(b[comp])
        assert fa.keys() == fb.keys(), comp
        for k in fa:
            assert fa[k].dtype == fb[k].dtype, (comp, k)
            np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def _model_configs(config: PipelineConfig):
    return config.text_encoder, config.unet, config.vae


# --------------------------------------------------------------------------------------------
# The export (test-file writer) against diffusers' own converters
# --------------------------------------------------------------------------------------------


def test_export_matches_diffusers_converters(checkpoint):
    from diffusers.loaders import single_file_utils as sfu

    family, _, _, models, state_dicts, ldm = checkpoint
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm.items()}
    got = {
        "unet": sfu.convert_ldm_unet_checkpoint(as_torch, dict(models["unet"].config)),
        "vae": sfu.convert_ldm_vae_checkpoint(as_torch, dict(models["vae"].config)),
    }
    if family == "sd1":
        text = sfu.convert_ldm_clip_checkpoint(as_torch)
    else:  # diffusers drops only resblock 23 (SD 2's real depth); our extra layer stays in
        text = sfu.convert_open_clip_checkpoint(models["text_encoder"], as_torch)
    got["text_encoder"] = {k.removeprefix("text_model."): v for k, v in text.items()}
    for comp, want in state_dicts.items():
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        have = {k: v for k, v in got[comp].items() if k in want or comp != "text_encoder"}
        assert set(have) == set(want), (comp, sorted(set(have) ^ set(want))[:8])
        for k, v in want.items():
            np.testing.assert_array_equal(have[k].numpy(), v, err_msg=f"{comp} {k}")


# --------------------------------------------------------------------------------------------
# Loading against the diffusers-folder path
# --------------------------------------------------------------------------------------------


def test_load_single_file_equals_folder(checkpoint, folder_params):
    family, _, path, *_ = checkpoint
    folder_config, params = folder_params
    config, loaded = single_file.load_single_file(path)  # config inferred from the shapes
    assert _model_configs(config) == _model_configs(folder_config)
    assert config.scheduler["prediction_type"] == "epsilon"
    assert config.text_encoder.num_hidden_layers == 2  # SD 2: the file's third layer dropped
    _assert_params_equal(loaded, params)


def test_explicit_config_and_prediction_type(checkpoint, folder_params):
    _, _, path, *_ = checkpoint
    folder_config, params = folder_params
    config, loaded = single_file.load_single_file(
        path, config=folder_config, prediction_type="v_prediction"
    )
    assert config.scheduler["prediction_type"] == "v_prediction"
    assert _model_configs(config) == _model_configs(folder_config)
    _assert_params_equal(loaded, params)


def test_half_precision_and_pickle_files(checkpoint, folder_params, tmp_path):
    family, _, _, _, _, ldm = checkpoint
    _, params = folder_params
    half = {k: v.astype(np.float16) for k, v in ldm.items()}
    save_file(half, tmp_path / "half.safetensors")
    _, loaded = single_file.load_single_file(tmp_path / "half.safetensors", dtype=jnp.float32)
    cast = jax.tree.map(lambda x: x.astype(jnp.float16).astype(jnp.float32), params)
    _assert_params_equal(loaded, cast)
    if family == "sd1":  # a weights-only pickle with the usual {"state_dict": ...} wrapper
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ldm.items()}
        torch.save({"state_dict": state, "global_step": 1}, tmp_path / "model.ckpt")
        _, loaded = single_file.load_single_file(tmp_path / "model.ckpt")
        _assert_params_equal(loaded, params)


@pytest.mark.parametrize("checkpoint", ["sd1"], indirect=True)
def test_bf16_and_ema(checkpoint, tmp_path):
    *_, ldm = checkpoint
    bias = single_file.UNET + "input_blocks.0.0.bias"
    ema = {single_file._ema_key(k): v + 1 for k, v in ldm.items() if k.startswith(single_file.UNET)}
    bf16 = {k: np.asarray(v, jnp.bfloat16) for k, v in {**ldm, **ema}.items()}
    path = _save(tmp_path, bf16, "bf16.safetensors")
    _, plain = single_file.load_single_file(path, dtype=jnp.bfloat16)
    _, with_ema = single_file.load_single_file(path, dtype=jnp.float32, use_ema=True)
    got = np.asarray(plain["unet"]["conv_in"]["bias"])
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, bf16[bias])
    want_ema = np.asarray(bf16[single_file._ema_key(bias)], np.float32)
    np.testing.assert_array_equal(np.asarray(with_ema["unet"]["conv_in"]["bias"]), want_ema)
    with pytest.raises(CheckpointError, match="no EMA copy"):
        single_file.load_single_file(_save(tmp_path, ldm, "no_ema.safetensors"), use_ema=True)


# --------------------------------------------------------------------------------------------
# Config inference at full size (shapes only: meta-device models, broadcast arrays)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15", "sd21-base", "sd21"])
def test_infer_config_full_size(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = preset(name)
    files = single_file.diffusers_configs(config)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(files["unet"]),
            "vae": AutoencoderKL.from_config(files["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**files["text_encoder"])),
        }
    zero = np.zeros((), np.float16)
    state_dicts = {
        comp: {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in m.state_dict().items()}
        for comp, m in models.items()
    }
    shapes = {k: v.shape for k, v in single_file.to_ldm(config, state_dicts).items()}
    inferred = single_file.infer_config(
        shapes, prediction_type=config.scheduler.get("prediction_type", "epsilon")
    )
    assert _model_configs(inferred) == _model_configs(config)
    plan = single_file.diffusers_sources(shapes, inferred)
    for comp, sources in plan.items():  # every diffusers tensor is planned, nothing else
        want = {k for k in state_dicts[comp] if not k.endswith("position_ids")}
        if comp == "text_encoder":
            sources = {k.removeprefix("text_model."): v for k, v in sources.items()}
        assert set(sources) == want, comp


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _save(tmp_path, tensors, name="bad.safetensors"):
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp_path / name)
    return tmp_path / name


def test_unknown_layout(checkpoint, tmp_path):
    _, _, _, _, state_dicts, ldm = checkpoint
    with pytest.raises(CheckpointError, match="unknown single-file layout.*diffusers naming"):
        single_file.load_single_file(_save(tmp_path, state_dicts["unet"]))
    sdxl = {k: v for k, v in ldm.items() if not k.startswith("cond_stage_model.")}
    sdxl["conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"] = np.zeros(4)
    with pytest.raises(CheckpointError, match="no text encoder(.|\n)*SDXL"):
        single_file.load_single_file(_save(tmp_path, sdxl, "sdxl.safetensors"))
    stray = _save(
        tmp_path, {**ldm, single_file.UNET + "extra.weight": np.zeros(3)}, "s.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"does not know(.|\n)*model\.diffusion_model\.extra"):
        single_file.load_single_file(stray)


def test_missing_and_wrong_shape(checkpoint, tmp_path):
    _, _, _, _, _, ldm = checkpoint
    key = single_file.UNET + "middle_block.1.proj_out.bias"
    missing = _save(tmp_path, {k: v for k, v in ldm.items() if k != key})
    with pytest.raises(
        CheckpointError, match=r"missing tensors(.|\n)*mid_block/attentions_0/proj_out/bias"
    ):
        single_file.load_single_file(missing)
    vae_key = single_file.VAE + "decoder.up.0.block.0.conv1.weight"
    wrong = _save(tmp_path, {**ldm, vae_key: ldm[vae_key][:, :-1]}, "wrong.safetensors")
    with pytest.raises(CheckpointError, match=r"wrong shape(.|\n)*up_blocks\.1\.resnets\.0\.conv1"):
        single_file.load_single_file(wrong)


def test_refuses_arbitrary_pickles(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only"):
        single_file.load_single_file(tmp_path / "evil.ckpt")


class _Evil:
    pass


# --------------------------------------------------------------------------------------------
# The converter CLI and the fast format
# --------------------------------------------------------------------------------------------


def test_convert_to_diffusers_and_fast_format(checkpoint, folder_params, tmp_path):
    from diffusers import UNet2DConditionModel

    from experiments import convert

    family, _, path, models, *_ = checkpoint
    folder_config, params = folder_params
    config = convert.to_diffusers_folder(path, tmp_path / "diffusers", dtype=np.float32)
    loaded_config, loaded = weights.load_pipeline(tmp_path / "diffusers")
    assert _model_configs(loaded_config) == _model_configs(folder_config)
    _assert_params_equal(loaded, params)
    unet = UNet2DConditionModel.from_pretrained(
        tmp_path / "diffusers" / "unet"
    )  # diffusers reads it
    torch.testing.assert_close(unet.state_dict(), models["unet"].state_dict(), rtol=0, atol=0)

    convert.to_fast_format(path, tmp_path / "fast", dtype=jnp.float32)
    fast_config, fast = fast_format.load(tmp_path / "fast")
    assert fast_config == dataclasses.replace(config, name=fast_config.name)
    _assert_params_equal(fast, params)
    _, again = single_file.load_checkpoint(tmp_path / "fast", dtype=jnp.float32)
    _assert_params_equal(again, params)


@pytest.mark.parametrize("checkpoint", ["sd1"], indirect=True)
def test_fast_format_is_strict(checkpoint, folder_params, tmp_path):
    del checkpoint
    config, params = folder_params
    fast_format.save(tmp_path, config, params)
    _, loaded = fast_format.load(tmp_path, dtype=jnp.float32)
    cast = jax.tree.map(lambda x: x.astype(jnp.float16).astype(jnp.float32), params)
    _assert_params_equal(loaded, cast)
    bad = dataclasses.replace(config, unet=dataclasses.replace(config.unet, layers_per_block=1))
    fast_format.save(tmp_path / "bad", bad, params)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        fast_format.load(tmp_path / "bad")


def test_pipeline_runs_from_a_single_file_and_a_fast_format_folder(tmp_path):
    """StableDiffusion.from_checkpoint takes every format; they give the same image."""
    from experiments import convert
    from sdjax.pipeline import StableDiffusion
    from tests._pipeline_util import save_diffusers_checkpoint

    folder = save_diffusers_checkpoint(tmp_path / "diffusers")
    convert.to_single_file(folder, tmp_path / "sd.safetensors", dtype=np.float32)
    convert.to_fast_format(folder, tmp_path / "fast", dtype=jnp.float32)
    kw = dict(steps=2, guidance=7.5, scheduler="ddim", seed=3, height=32, width=32)
    # Tiny test models use 8 norm groups, which no single file can reveal: give the config.
    config = PipelineConfig.from_folder(folder)
    results = [
        StableDiffusion.from_checkpoint(
            c, dtype="float32", kernels="reference", config=config
        ).generate("a cat", **kw)
        for c in (folder, tmp_path / "sd.safetensors", tmp_path / "fast")
    ]
    assert np.isfinite(results[0].latents).all() and results[0].images.std() > 0
    for r in results[1:]:
        np.testing.assert_allclose(r.latents, results[0].latents, rtol=1e-6, atol=1e-6)
        assert np.abs(r.images.astype(int) - results[0].images).max() <= 1
