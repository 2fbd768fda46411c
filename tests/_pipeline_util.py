"""Small pipelines for the pipeline, CLI and multi-device tests.

`random_pipeline`: the `tiny` architecture with random weights drawn by numpy from the
parameter shapes (`jax.eval_shape`, nothing compiled), so that it takes well under a second;
`weights.random_params` runs the models' Flax init eagerly, which costs 30 s or more on two
CPU cores. It needs no torch and gives the same weights in every process for the same seed.

`save_diffusers_checkpoint`: a small random diffusers `StableDiffusionPipeline` written with
`save_pretrained` (needs torch, diffusers and transformers).
"""

from __future__ import annotations

import math
import pathlib
import shutil

import jax
import numpy as np

from sdjax import config as sd_config
from sdjax import weights
from sdjax.pipeline import StableDiffusion
from sdjax.tokenizer import DEFAULT_FOLDER, Tokenizer


def _leaf_values(path, leaf, rng: np.random.Generator) -> np.ndarray:
    name = path[-1].key
    shape = tuple(leaf.shape)
    if name == "scale":
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == "bias":
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[-1] if name == "embedding" else math.prod(shape[:-1])
    return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)


def random_params(config: sd_config.PipelineConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = {}
    for comp, model_config in weights._component_configs(config).items():
        shapes = weights.expected_params(comp, model_config)
        params[comp] = jax.tree_util.tree_map_with_path(
            lambda p, x: _leaf_values(p, x, rng), shapes
        )
    return params


def random_pipeline(config: str = "tiny", seed: int = 0, **kwargs) -> StableDiffusion:
    cfg = sd_config.preset(config)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("kernels", "reference")
    return StableDiffusion(cfg, random_params(cfg, seed), Tokenizer.default(), **kwargs)


# diffusers' configs of the `tiny` architecture.
UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,  # diffusers' name for the number of heads
    norm_num_groups=8,
)
VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def save_diffusers_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    """A random SD pipeline of diffusers' own classes, with SD1.5's scheduler config."""
    import diffusers
    import torch
    import transformers

    from sdjax.schedulers import SD15_CONFIG

    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**VAE),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(DEFAULT_FOLDER)),
        unet=diffusers.UNet2DConditionModel(**UNET),
        scheduler=diffusers.PNDMScheduler.from_config(dict(SD15_CONFIG)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    # transformers 5 saves the tokenizer as tokenizer.json only; sdjax's loader wants the
    # vocab.json + merges.txt that SD checkpoints ship, so put the same tokenizer's files there.
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(DEFAULT_FOLDER, folder / "tokenizer")
    return folder
