"""diffusers' UNet2DConditionModel for SD 1.x / 2.x in Flax, channels-last.

    eps = UNet2DConditionModel(config).apply({"params": params}, sample, t, context)

sample [N, H, W, C_in], t [N] or a scalar, context [N, S, cross_attention_dim] (the text
encoder's hidden states) -> [N, H, W, C_out]. H and W need not be multiples of 8.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.config import UNetConfig
from sdjax.models.layers import (
    CONDITIONING,
    Conv2d,
    Downsample2D,
    GroupNorm,
    Linear,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    project,
    repeat_copies,
)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers' `get_timestep_embedding` in float32: [N] -> [N, dim].

    Frequency i of dim // 2 is exp(-log(max_period) * i / (dim // 2 - freq_shift)); the
    output is [sin, cos] of t * frequency, or [cos, sin] with `flip_sin_to_cos`.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear on the sinusoidal embedding: [N, C0] -> [N, dim]."""

    dim: int

    def setup(self):
        self.linear_1 = Linear(self.dim)
        self.linear_2 = Linear(self.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class DownBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) a strided-conv downsample.

    Returns the output and the skip tensors the up path reads: one per resnet and one
    after the downsample."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int
    eps: float

    def setup(self):
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, self.eps) for _ in range(self.num_layers)
        ]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels)]

    def _attend(self, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return x  # the cross-attention subclass runs its transformer here

    def __call__(self, x, temb, context=None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """x: [N, H, W, C_in] -> ([N, H', W', out_channels], skips)."""
        skips = ()
        for i, resnet in enumerate(self.resnets):
            x = self._attend(i, resnet(x, temb), context)
            skips += (x,)
        if self.add_downsample:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


def _transformers(block) -> list:
    """One Transformer2DModel per resnet of a cross-attention down or up block."""
    return [
        Transformer2DModel(
            block.out_channels,
            block.heads,
            block.transformer_layers,
            block.use_linear_projection,
            block.groups,
        )
        for _ in range(block.num_layers)
    ]


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet."""

    heads: int
    transformer_layers: int
    use_linear_projection: bool

    def setup(self):
        super().setup()
        self.attentions = _transformers(self)

    def _attend(self, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return self.attentions[i](x, context)


class UpBlock2D(nn.Module):
    """`num_layers` resnets, each on [x, next skip] concatenated along channels, then
    (unless last) a nearest-neighbour upsample to the next skip's size."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int
    eps: float

    def setup(self):
        self.resnets = [
            ResnetBlock2D(self.out_channels, self.groups, self.eps) for _ in range(self.num_layers)
        ]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels)]

    def _attend(self, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return x  # the cross-attention subclass runs its transformer here

    def __call__(
        self, x, skips, temb, context=None, upsample_size=None, *, next_skip=None, joined=False
    ) -> jax.Array:
        """x: [N, H, W, C]; skips: this block's `num_layers` skip tensors, in down order
        (consumed from the end) -> [N, H', W', out_channels].

        joined: x is already [x, skips[-1]] along channels (the previous block's upsampler
        wrote the concatenate). next_skip [N, H', W', S] (the next block's first skip): the
        upsampler concatenates it -> [N, H', W', out_channels + S], in the same pass where the
        subpixel form's interleave runs (`ops.interleave_phases`)."""
        for i, resnet in enumerate(self.resnets):
            if not (i == 0 and joined):
                x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = resnet(x, temb)
            x = self._attend(i, x, context)
        if self.add_upsample:
            return self.upsamplers[0](x, upsample_size, next_skip)
        return x if next_skip is None else jnp.concatenate([x, next_skip], axis=-1)


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""

    heads: int
    transformer_layers: int
    use_linear_projection: bool

    def setup(self):
        super().setup()
        self.attentions = _transformers(self)

    def _attend(self, i: int, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return self.attentions[i](x, context)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, transformer, resnet at the lowest resolution; channels unchanged."""

    channels: int
    heads: int
    transformer_layers: int
    use_linear_projection: bool
    groups: int
    eps: float

    def setup(self):
        self.resnets = [ResnetBlock2D(self.channels, self.groups, self.eps) for _ in range(2)]
        self.attentions = [
            Transformer2DModel(
                self.channels,
                self.heads,
                self.transformer_layers,
                self.use_linear_projection,
                self.groups,
            )
        ]

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DConditionModel(nn.Module):
    """The SD 1.x / 2.x noise-prediction UNet (see the module docstring for the call)."""

    config: UNetConfig

    def setup(self):
        cfg = self.config
        channels = cfg.block_out_channels
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        attn = dict(use_linear_projection=cfg.use_linear_projection)
        n = len(channels)

        self.conv_in = Conv2d(channels[0])
        self.time_embedding = TimestepEmbedding(4 * channels[0])

        down_blocks = []
        for i, kind in enumerate(cfg.down_block_types):
            common = dict(out_channels=channels[i], num_layers=cfg.layers_per_block, **norm)
            common["add_downsample"] = i < n - 1
            if kind == "CrossAttnDownBlock2D":
                heads, layers = cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i]
                block = CrossAttnDownBlock2D(
                    **common, heads=heads, transformer_layers=layers, **attn
                )
            else:
                block = DownBlock2D(**common)
            down_blocks.append(block)
        self.down_blocks = down_blocks

        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1],
            cfg.num_attention_heads[-1],
            cfg.transformer_layers_per_block[-1],
            cfg.use_linear_projection,
            **norm,
        )

        up_blocks = []
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the down level this up block mirrors
            common = dict(out_channels=channels[j], num_layers=cfg.layers_per_block + 1, **norm)
            common["add_upsample"] = i < n - 1
            if kind == "CrossAttnUpBlock2D":
                heads, layers = cfg.num_attention_heads[j], cfg.transformer_layers_per_block[j]
                block = CrossAttnUpBlock2D(**common, heads=heads, transformer_layers=layers, **attn)
            else:
                block = UpBlock2D(**common)
            up_blocks.append(block)
        self.up_blocks = up_blocks

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, activation="silu")
        self.conv_out = Conv2d(cfg.out_channels)

    def _blocks(self) -> list:
        return [*self.down_blocks, self.mid_block, *self.up_blocks]

    def embed_time(self, timesteps: jax.Array, dtype) -> jax.Array:
        """timesteps [N] -> temb [N, 4 * block_out_channels[0]]: the sinusoidal embedding in
        float32, then the MLP in `dtype`."""
        cfg = self.config
        t_emb = timestep_embedding(
            timesteps,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        return self.time_embedding(t_emb.astype(dtype))

    def time_conditioning(self, timesteps: jax.Array, dtype, prepared: dict | None = None) -> dict:
        """Every resnet's projected time embedding, for timesteps [T]: a `conditioning` tree
        with [T, C] leaves (index one timestep, keeping the axis, before use). With `prepared`
        (from `prepare`), the same values from one product (`time_rows`)."""
        if prepared is not None:
            return split_projections(self.time_rows(timesteps, dtype, prepared),
                                     self.time_weights())  # fmt: skip
        temb = self.embed_time(jnp.asarray(timesteps).reshape(-1), dtype)
        return {b.name: {r.name: r.conditioning(temb) for r in b.resnets} for b in self._blocks()}

    def time_rows(self, timesteps: jax.Array, dtype, prepared: dict) -> jax.Array:
        """[T, sum C]: every resnet's time projection for timesteps [T] as one product with
        `prepared["time"]` (`prepare`), the resnets' columns in `time_weights`' leaf order
        (`split_projections` gives `time_conditioning`'s tree back)."""
        temb = self.embed_time(jnp.asarray(timesteps).reshape(-1), dtype)
        return _project(jax.nn.silu(temb), prepared["time"])

    def time_weights(self) -> dict:
        """Every resnet's time projection weights, (kernel [T, C], bias [C]) pairs in the tree
        of `time_conditioning` (`ResnetBlock2D.time_weights`)."""
        dim = self.time_embedding.dim
        return {b.name: {r.name: r.time_weights(dim) for r in b.resnets} for b in self._blocks()}

    def key_value_weights(self) -> dict:
        """Every cross-attention's K and V projection weights, (kernel [D, C], bias [C] or
        None) pairs in the tree of `context_conditioning`'s K/V entries."""
        d = self.config.cross_attention_dim
        return {b.name: {a.name: a.key_value_weights(d) for a in b.attentions}
                for b in self._blocks() if hasattr(b, "attentions")}  # fmt: skip

    def context_conditioning(
        self,
        encoder_hidden_states: jax.Array,
        dtype,
        sample_hw: tuple[int, int] | None = None,
        prepared: dict | None = None,
    ) -> dict:
        """Every cross-attention's K and V of encoder_hidden_states [N, S, D]: a `conditioning`
        tree with [N, S, C] leaves. Given the latent's (H, W), also what the weights alone
        give (`weight_conditioning`), so that it is built once, not per step.

        With `prepared` (`prepare`, for this size): K and V of every cross-attention from one
        product with the prepared stack (XLA's dot merger otherwise stacks SD1.5's 2 x 16 K/V
        kernels for its one product, per call), and the phase kernels as prepared: the same
        values. The self-attentions' fused weights are still made here."""
        context = encoder_hidden_states.astype(dtype)
        if prepared is not None:
            kv = split_projections(_project(context, prepared["key_value"]),
                                   self.key_value_weights())  # fmt: skip
            if sample_hw is None:
                return merge_conditioning(kv, prepared["conditioning"])
            attention = self.attention_weights(context.shape[0], dtype, sample_hw)
            # the prepared zero biases (runtime inputs) replace the constant ones in `attention`
            return merge_conditioning(kv, attention, prepared["conditioning"],
                                      prepared.get("attention_bias", {}))  # fmt: skip
        out = {
            b.name: {a.name: a.conditioning(context) for a in b.attentions}
            for b in self._blocks()
            if hasattr(b, "attentions")  # the cross-attention blocks
        }
        if sample_hw is None:
            return out
        return merge_conditioning(out, self.weight_conditioning(context.shape[0], dtype, sample_hw))

    def weight_conditioning(self, batch: int, dtype, sample_hw: tuple[int, int]) -> dict:
        """What the conditioning takes from the weights alone, for `batch` latents of
        sample_hw (H, W): `attention_weights` and `phase_kernels`."""
        return merge_conditioning(
            self.attention_weights(batch, dtype, sample_hw), self.phase_kernels(dtype, sample_hw)
        )

    def _level_sizes(self, sample_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """(H, W) at each level: conv_in keeps the latent's, each downsample halves it."""
        sizes, (h, w) = [], sample_hw
        for _ in self.config.block_out_channels:
            sizes.append((h, w))
            h, w = -(-h // 2), -(-w // 2)
        return sizes

    def attention_weights(self, batch: int, dtype, sample_hw: tuple[int, int]) -> dict:
        """The fused projection weights of every self-attention (`Attention.packed_weights`),
        for `batch` latents of sample_hw: padded for the packed kernel where it runs packed,
        else q, k and v side by side (their form depends on the level's token count and on
        the batch)."""
        sizes = self._level_sizes(sample_hw)
        n = len(sizes)
        levels = [*range(n), n - 1, *range(n - 1, -1, -1)]  # down blocks, mid, up blocks
        return {
            b.name: {a.name: a.weight_conditioning(batch, sizes[level][0] * sizes[level][1],
                                                   dtype) for a in b.attentions}
            for b, level in zip(self._blocks(), levels, strict=True)
            if hasattr(b, "attentions")
        }  # fmt: skip

    def phase_kernels(self, dtype, sample_hw: tuple[int, int]) -> dict:
        """The precomputed kernels of the upsamplers that run in the subpixel or transposed
        form at sample_hw (the form depends on the upsampler's input size)."""
        sizes = self._level_sizes(sample_hw)
        n = len(sizes)
        phases = {}
        for i, b in enumerate(self.up_blocks):
            if not b.add_upsample:
                continue
            level = n - 1 - i  # up block i works at level n - 1 - i, then doubles it
            kernels = {u.name: u.precomputed(dtype, sizes[level]) for u in b.upsamplers}
            if all(k is not None for k in kernels.values()):
                phases[b.name] = kernels
        return phases

    def prepare(self, dtype, sample_hw: tuple[int, int]) -> dict:
        """What the conditioning takes from the weights alone and XLA would otherwise copy
        in every image's program, made once per pipeline (`experiments/results/README.md`,
        items 176-182), in `dtype`:

          {"conditioning": `phase_kernels(dtype, sample_hw)`,
           "time": {"kernel" [T, sum C], "bias" [sum C]},   every resnet's time projection
           "key_value": {"kernel" [D, sum C](, "bias")}}     every cross-attention's K and V

        side by side in `time_weights`' and `key_value_weights`' leaf order (XLA's dot
        merger stacks the same kernels per call otherwise). Pass it to `context_conditioning`
        and `time_conditioning` (`pipeline.denoise_loop(prepared=)`); it is valid for the
        weights, dtype, size and op choices it was made with.

        Not here: the self-attentions' fused q/k/v weights (`attention_weights`), still made
        per image. Kept, they would cost SD1.5 71 MB of device memory for ~0.05 ms an image,
        and the 2.6 GiB bound of the H100 run would not hold (all of it prepared: 0.238 GiB,
        an allocator peak of 2.61 GiB, s17e; this: 0.145 GiB). Where `ops.qkv_projection`
        is "dot_bias", their zero biases are (`qkv_biases`, a few KB):

          "attention_bias": {block: {attention: ... {"attn1": {"qkv_bias"}}}}"""
        out = {
            "conditioning": self.phase_kernels(dtype, sample_hw),
            "time": stack_projections(self.time_weights(), dtype),
            "key_value": stack_projections(self.key_value_weights(), dtype),
        }
        if biases := self.qkv_biases(dtype, sample_hw):
            out["attention_bias"] = biases
        return out

    def qkv_biases(self, dtype, sample_hw: tuple[int, int]) -> dict:
        """The "qkv_bias" leaves of `attention_weights` (zeros, where the projections have no
        bias and `ops.qkv_projection_choice` is "dot_bias"; every other leaf dropped), as a
        `conditioning` tree; {} where there are none. The fused weights' width does not
        depend on the batch, so the tree serves any batch."""

        def keep(tree):
            out = {}
            for key, value in tree.items():
                if isinstance(value, dict):
                    if sub := keep(value):
                        out[key] = sub
                elif key == "qkv_bias":
                    out[key] = value
            return out

        return keep(self.attention_weights(1, dtype, sample_hw))

    def __call__(
        self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array | None
    ) -> jax.Array:
        """sample [N, H, W, C_in]; timesteps [N] or scalar; encoder_hidden_states
        [N, S, cross_attention_dim] -> predicted noise (or v) [N, H, W, C_out].

        Shared samples: encoder_hidden_states (or the precomputed K/V) may hold r * N text
        states for N samples, each sample shared by r consecutive ones (classifier-free
        guidance's unconditional and conditional copies, r = 2: `pipeline.guided_unet`). The
        output is then [r * N, ...], the same as for the samples repeated r times, but what
        comes before the first cross-attention (conv_in, SD's first resnet and its first
        transformer's self-attention) runs once per sample (`layers.repeat_copies`).
        timesteps: scalar or [N], one per sample.

        With a `conditioning` collection from `context_conditioning` (and `time_conditioning`)
        the cross-attention K/V (and the time projections) are read from it: see
        `conditioned_apply`."""
        cfg = self.config
        context = None
        if encoder_hidden_states is not None:
            context = encoder_hidden_states.astype(sample.dtype)
        batch = self._context_batch(context, sample.shape[0])

        # 1. time: sinusoidal embedding in float32, then the MLP in the sample's dtype (unless
        # every resnet reads its time projection from the conditioning)
        temb = None
        if next(_leaves_named(self.variables.get(CONDITIONING, {}), "temb"), None) is None:
            t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
            temb = self.embed_time(t, sample.dtype)

        # 2. pre-process
        x = self.conv_in(sample)

        # 3. down: keep every intermediate for the skip connections
        skips = (x,)
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips

        # 4. mid
        x = self.mid_block(x, temb, context)

        # 5. up: each block eats layers_per_block + 1 skips and upsamples to the next one's size
        # (an upsampler concatenates the next block's first skip in its output's pass)
        per_block = cfg.layers_per_block + 1
        joined = False
        for block in self.up_blocks:
            block_skips, skips = skips[-per_block:], skips[:-per_block]
            # skips from before the first cross-attention hold the shared samples
            block_skips = tuple(repeat_copies(s, x.shape[0]) for s in block_skips)
            upsample_size = skips[-1].shape[1:3] if skips else None
            next_skip = skips[-1] if skips and block.add_upsample else None
            if next_skip is not None:
                next_skip = repeat_copies(next_skip, x.shape[0])
            x = block(x, block_skips, temb, context, upsample_size, next_skip=next_skip,
                      joined=joined)  # fmt: skip
            joined = next_skip is not None

        # 6. post-process (a UNet without cross-attention widens the batch only here)
        return repeat_copies(self.conv_out(self.conv_norm_out(x)), batch)

    def _context_batch(self, context: jax.Array | None, samples: int) -> int:
        """The batch of the output: the text states' (context's, else the precomputed K's),
        a multiple of the samples' (see `__call__`); the samples' where there are none."""
        if context is None:
            context = next(_leaves_named(self.variables.get(CONDITIONING, {}), "k"), None)
        batch = samples if context is None else context.shape[0]
        if batch % samples:
            raise ValueError(
                f"UNet: {batch} text states for {samples} samples; the text states' batch must "
                "be a multiple of the samples' (each sample shared by as many consecutive ones)"
            )
        return batch


def _leaves_named(tree, name: str):
    """The leaves stored under key `name` anywhere in a nested dict, in order."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves_named(v, name)
        elif k == name:
            yield v


def merge_conditioning(*trees: dict) -> dict:
    """One `conditioning` tree from several (e.g. the context's and one timestep's)."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = merge_conditioning(out.get(key, {}), value)
            else:
                out[key] = value
    return out


def _is_pair(x) -> bool:
    return isinstance(x, tuple)


def stack_projections(tree, dtype) -> dict:
    """A tree of (kernel [D, C_i], bias [C_i] or None) pairs as one projection {"kernel"
    [D, sum C_i], "bias" [sum C_i] (where every pair has one)} in `dtype`, the pairs' columns
    side by side in leaf order."""
    pairs = jax.tree.leaves(tree, is_leaf=_is_pair)
    out = {"kernel": jnp.concatenate([k.astype(dtype) for k, _ in pairs], axis=1)}
    if all(b is not None for _, b in pairs):
        out["bias"] = jnp.concatenate([b.astype(dtype) for _, b in pairs])
    return out


def split_projections(y: jax.Array, tree) -> dict:
    """y [..., sum C_i] (a `stack_projections` product) -> the tree of `tree`'s (kernel, bias)
    pairs with [..., C_i] leaves: static slices of the last axis."""
    pairs, treedef = jax.tree.flatten(tree, is_leaf=_is_pair)
    return treedef.unflatten(split_columns(y, [k.shape[-1] for k, _ in pairs]))


def split_columns(y: jax.Array, widths: Sequence[int]) -> list[jax.Array]:
    """y [..., sum(widths)] -> [y[..., :w0], y[..., w0 : w0 + w1], ...]: static slices of the
    last axis."""
    if y.shape[-1] != sum(widths):
        raise ValueError(f"split_columns: {y.shape[-1]} columns for {sum(widths)}")
    offsets = list(itertools.accumulate(widths, initial=0))[:-1]
    return [y[..., o : o + w] for o, w in zip(offsets, widths, strict=True)]


def _project(x: jax.Array, projection: dict) -> jax.Array:
    """x @ kernel (+ bias) of a `stack_projections` dict, as `Linear` computes it."""
    return project(x, projection["kernel"], projection.get("bias"))


def conditioned_apply(params, config: UNetConfig, sample, timesteps, conditioning) -> jax.Array:
    """The UNet with precomputed conditioning: `conditioning` (from `context_conditioning`,
    merged with one step's `time_conditioning`) replaces the text states."""
    return UNet2DConditionModel(config).apply(
        {"params": params, CONDITIONING: conditioning}, sample, timesteps, None
    )


def init_params(config: UNetConfig, rng: jax.Array) -> dict:
    """Randomly initialized params (the inner tree, without the "params" collection key).

    Small dummy inputs; cheap under `jax.eval_shape` for the shapes alone."""
    side = 2 ** (len(config.block_out_channels) - 1)
    sample = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    model = UNet2DConditionModel(config)
    return model.init(rng, sample, jnp.zeros((1,), jnp.int32), context)["params"]
