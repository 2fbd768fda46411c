"""Small pipelines for the pipeline, CLI and multi-device tests.

`random_pipeline`: the `tiny` architecture with `weights.random_params` (numpy draws from the
parameter shapes: well under a second, no torch, the same weights in every process for the
same seed).

`save_diffusers_checkpoint`: a small random diffusers `StableDiffusionPipeline` written with
`save_pretrained` (needs torch, diffusers and transformers).
"""

from __future__ import annotations

import pathlib
import shutil

from sdjax import config as sd_config
from sdjax import weights
from sdjax.pipeline import StableDiffusion
from sdjax.tokenizer import DEFAULT_FOLDER, Tokenizer


def random_pipeline(config: str = "tiny", seed: int = 0, **kwargs) -> StableDiffusion:
    cfg = sd_config.preset(config)
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("kernels", "reference")
    return StableDiffusion(cfg, weights.random_params(cfg, seed), Tokenizer.default(), **kwargs)


def two_prompt_latents(**kwargs):
    """The latents of a small guided generation (two prompts, 2 DDIM steps, 16x16) by a
    `random_pipeline(**kwargs)`: for tests that a pipeline option leaves the result alone."""
    pipe = random_pipeline(**kwargs)
    return pipe.generate(["a red cube", "a blue ball"], steps=2, height=16, width=16, seed=5).latents


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
