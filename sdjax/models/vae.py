"""diffusers' AutoencoderKL (the SD VAE) in Flax, channels-last.

    vae = AutoencoderKL(config)
    mean, logvar = vae.apply({"params": params}, image, method=vae.encode)  # image in [-1, 1]
    image = vae.apply({"params": params}, latents, method=vae.decode)       # unscaled latents

The pipeline multiplies by / divides by `config.scaling_factor`; this module does not.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.config import VAEConfig
from sdjax.models.layers import (
    CONDITIONING,
    Attention,
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
)

_EPS = 1e-6  # every norm in the SD VAE


class SpatialSelfAttention(Attention):
    """GroupNorm then self-attention over the H*W pixels, plus the input (diffusers'
    mid-block `Attention` with `group_norm` and `residual_connection`). SD uses one head."""

    groups: int = 32

    def setup(self):
        super().setup()
        self.group_norm = GroupNorm(self.groups, _EPS)

    def __call__(self, x: jax.Array, context: None = None) -> jax.Array:
        """x: [N, H, W, C] -> [N, H, W, C]."""
        n, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(n, h * w, c)
        return x + super().__call__(tokens).reshape(n, h, w, c)


class UNetMidBlock2D(nn.Module):
    """resnet, (attention, resnet) at the lowest resolution, without time embedding."""

    channels: int
    groups: int
    add_attention: bool = True

    def setup(self):
        self.resnets = [ResnetBlock2D(self.channels, self.groups, _EPS) for _ in range(2)]
        if self.add_attention:
            self.attentions = [
                SpatialSelfAttention(self.channels, heads=1, qkv_bias=True, groups=self.groups)
            ]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) a downsample padded at the bottom/right."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int

    def setup(self):
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, _EPS) for _ in range(self.num_layers)
        ]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, padding=0)]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> [N, H/2, W/2, out_channels] (H, W without the downsample)."""
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.add_downsample else x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) a nearest-neighbour 2x upsample and conv."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int

    def setup(self):
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, _EPS) for _ in range(self.num_layers)
        ]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels)]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> [N, 2H, 2W, out_channels] (H, W without the upsample)."""
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.add_upsample else x


class Encoder(nn.Module):
    """Image [N, H, W, C_in] -> moments [N, H/f, W/f, 2 * latent_channels] (f = downscale)."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        channels, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = Conv2d(channels[0])
        self.down_blocks = [
            DownEncoderBlock2D(channels[i], cfg.layers_per_block, i < n - 1, cfg.norm_num_groups)
            for i in range(n)
        ]
        self.mid_block = UNetMidBlock2D(
            channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention
        )
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, _EPS, activation="silu")
        self.conv_out = Conv2d(2 * cfg.latent_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    """Latents [N, h, w, latent_channels] -> image [N, h*f, w*f, C_out]."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        channels, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = Conv2d(channels[0])
        self.mid_block = UNetMidBlock2D(
            channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention
        )
        self.up_blocks = [
            UpDecoderBlock2D(channels[i], cfg.layers_per_block + 1, i < n - 1, cfg.norm_num_groups)
            for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, _EPS, activation="silu")
        self.conv_out = Conv2d(cfg.out_channels)

    def phase_kernels(self, dtype, latent_hw: tuple[int, int]) -> dict:
        """The precomputed kernels of the upsamplers that run in the subpixel or transposed
        form (`Upsample2D.conditioning`) for latents of latent_hw, by block name: up block i
        upsamples a map of latent_hw * 2**i, and the form depends on that size."""
        phases = {}
        h, w = latent_hw
        for i, block in enumerate(self.up_blocks):
            if not block.add_upsample:
                continue
            kernels = {u.name: u.precomputed(dtype, (h << i, w << i)) for u in block.upsamplers}
            if all(k is not None for k in kernels.values()):
                phases[block.name] = kernels
        return phases

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    """The SD VAE; see the module docstring. `__call__` reconstructs (decode of the mean)."""

    config: VAEConfig

    def setup(self):
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = Conv2d(2 * latent, kernel_size=1, padding=0)
        self.post_quant_conv = Conv2d(latent, kernel_size=1, padding=0)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image x [N, H, W, C_in] in [-1, 1] -> the posterior's (mean, logvar), each
        [N, H/f, W/f, latent_channels]; logvar clipped to [-30, 20] as diffusers does."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents z [N, h, w, latent_channels] -> image [N, h*f, w*f, C_out]."""
        return self.decoder(self.post_quant_conv(z))

    def prepare_decode(self, dtype, latent_hw: tuple[int, int]) -> dict:
        """The decoder's weight-only work that XLA would redo in every decode, in `dtype`
        (under the op choices in force), as the variables to pass beside the params:

            image = vae.apply({"params": params, **prepared}, z, method=vae.decode)

        Its upsamplers' phase kernels for latents of latent_hw (where they run in a
        precomputed form: not the reference form of a CPU) and the mid-block attention's q,
        k and v projections side by side (XLA merges the three products itself otherwise,
        concatenating the weights and adding the biases apart in every decode)."""
        decoder = self.decoder.phase_kernels(dtype, latent_hw)
        if self.config.mid_block_add_attention:
            attention = self.decoder.mid_block.attentions[0]
            decoder["mid_block"] = {
                attention.name: attention.packed_weights(
                    attention.dim, attention.dim // attention.heads, dtype, out_projection=False
                )
            }
        return {CONDITIONING: {"decoder": decoder}} if decoder else {}

    def __call__(self, x: jax.Array) -> jax.Array:
        """Image [N, H, W, C_in] -> its reconstruction from the posterior mean."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def init_params(config: VAEConfig, rng: jax.Array) -> dict:
    """Randomly initialized params (the inner tree, without the "params" collection key),
    for the encoder and decoder both. Small dummy input; cheap under `jax.eval_shape`."""
    side = config.downscale
    image = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    return AutoencoderKL(config).init(rng, image)["params"]
