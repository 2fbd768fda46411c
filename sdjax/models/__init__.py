"""Flax models of Stable Diffusion 1.x / 2.x, channels-last, with diffusers' parameter names."""

from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL

__all__ = ["AutoencoderKL", "UNet2DConditionModel"]
