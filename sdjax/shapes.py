"""Named op shapes of Stable Diffusion, shared by the kernel tests and the benchmarks.

All shapes are for batch 2 (classifier-free guidance doubles the batch) unless named
otherwise, and channels-last. Derived from the UNet/VAE configs, not measured.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    name: str
    batch: int
    q_len: int
    heads: int
    head_dim: int
    kv_len: int

    @property
    def q_shape(self):
        return (self.batch, self.q_len, self.heads, self.head_dim)

    @property
    def kv_shape(self):
        return (self.batch, self.kv_len, self.heads, self.head_dim)

    @property
    def flops(self) -> float:
        """Two matmuls of 2*Lq*Lk*D multiply-adds per head."""
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


@dataclasses.dataclass(frozen=True)
class GroupNormShape:
    name: str
    shape: tuple[int, int, int, int]  # N, H, W, C
    groups: int = 32
    activation: str | None = "silu"
    eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class GegluShape:
    name: str
    x_shape: tuple[int, int, int]  # batch, tokens, dim
    inner: int  # F; the projection is dim -> 2F

    @property
    def w_shape(self):
        return (self.x_shape[-1], 2 * self.inner)


def _attention_shapes() -> list[AttentionShape]:
    out = []
    # SD1.x at 512x512: latent 64x64, 8 heads, head dim = channels / 8 (40, 80, 160).
    for side, channels in ((64, 320), (32, 640), (16, 1280), (8, 1280)):
        tokens, d = side * side, channels // 8
        out.append(AttentionShape(f"sd15_self_{side}", 2, tokens, 8, d, tokens))
        out.append(AttentionShape(f"sd15_cross_{side}", 2, tokens, 8, d, 77))
    # SD2.x at 768x768: latent 96x96, head dim 64, heads = channels / 64 (5, 10, 20).
    for side, channels in ((96, 320), (48, 640), (24, 1280), (12, 1280)):
        tokens, h = side * side, channels // 64
        out.append(AttentionShape(f"sd21_self_{side}", 2, tokens, h, 64, tokens))
        out.append(AttentionShape(f"sd21_cross_{side}", 2, tokens, h, 64, 77))
    # VAE mid-block attention: one head over all 512 channels, batch 1.
    out.append(AttentionShape("vae_mid_512", 1, 4096, 1, 512, 4096))
    return out


def _group_norm_shapes() -> list[GroupNormShape]:
    out = []
    # SD1.5 UNet at 512 (batch 2): resnet norms (+SiLU) at every channel count they see,
    # including the concatenated skip inputs of the up blocks.
    unet = {
        64: (320, 640, 960),
        32: (320, 640, 960, 1280, 1920),
        16: (640, 1280, 1920, 2560),
        8: (1280, 2560),
    }
    for side, chans in unet.items():
        for c in chans:
            out.append(GroupNormShape(f"unet_{side}x{side}x{c}", (2, side, side, c)))
    # Transformer2D input norms: no activation, eps 1e-6.
    for side, c in ((64, 320), (32, 640), (16, 1280), (8, 1280)):
        out.append(
            GroupNormShape(
                f"unet_attn_{side}x{side}x{c}", (2, side, side, c), activation=None, eps=1e-6
            )
        )
    # VAE decoder at 512 (batch 1, eps 1e-6).
    for side, c in ((64, 512), (128, 512), (256, 512), (256, 256), (512, 256), (512, 128)):
        out.append(GroupNormShape(f"vae_{side}x{side}x{c}", (1, side, side, c), eps=1e-6))
    return out


def _geglu_shapes() -> list[GegluShape]:
    out = []
    for side, c in ((64, 320), (32, 640), (16, 1280), (8, 1280)):
        out.append(GegluShape(f"sd15_{side}", (2, side * side, c), 4 * c))
    for side, c in ((96, 320), (48, 640), (24, 1280), (12, 1280)):
        out.append(GegluShape(f"sd21_{side}", (2, side * side, c), 4 * c))
    return out


def _layer_norm_shapes() -> dict[str, tuple[int, int, int]]:
    """The transformer blocks' LayerNorm inputs [batch, tokens, dim] (the GEGLU's x shapes)."""
    return {s.name: s.x_shape for s in _geglu_shapes()}


ATTENTION_SHAPES = {s.name: s for s in _attention_shapes()}
GROUP_NORM_SHAPES = {s.name: s for s in _group_norm_shapes()}
GEGLU_SHAPES = {s.name: s for s in _geglu_shapes()}
LAYER_NORM_SHAPES = _layer_norm_shapes()
