"""Building blocks shared by the UNet and the VAE, channels-last (NHWC) throughout.

Parameter names follow diffusers' PyTorch modules so that a checkpoint loads by renaming
(`name.N` -> `name_N`, `weight` -> `kernel`/`scale`) and transposing. Layers compute in
their input's dtype: parameters are cast to it at use, except where `sdjax.ops` does the
math in float32 (attention softmax, GroupNorm statistics, GEGLU accumulation).

Conditioning computed ahead: the `conditioning` variable collection (see
`UNet2DConditionModel.conditioning`) holds what depends only on the prompt or the timestep:
each cross-attention's K and V (`attn2/{k, v}`) and each resnet's projected time embedding
(`resnets_i/temb`). A module that finds its entry uses it instead of computing it, so a
denoising loop can compute them once per prompt and once per schedule, outside the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax import ops

Padding = int | Sequence[tuple[int, int]]

CONDITIONING = "conditioning"  # the variable collection of precomputed conditioning

_kernel_init = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def repeat_copies(x: jax.Array, batch: int) -> jax.Array:
    """x [N, ...] -> [batch, ...], each sample repeated batch // N times in a row: the layout
    of a guided batch, where entries 2i and 2i + 1 (the unconditional and conditional copies)
    share sample i. x itself where N == batch.

    The UNet computes what comes before its first cross-attention once per shared sample and
    widens the batch here, where the per-copy text states first enter (`BasicTransformerBlock`).
    """
    n = x.shape[0]
    if n == batch:
        return x
    if batch % n:
        raise ValueError(f"a batch of {n} samples cannot be shared by {batch} contexts")
    return jnp.repeat(x, batch // n, axis=0)


class Linear(nn.Module):
    """torch.nn.Linear: params `kernel` [in, out] and (optionally) `bias` [out]."""

    features: int
    use_bias: bool = True

    @nn.compact
    def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        """The raw (kernel, bias), for callers that fuse the matmul themselves (GEGLU)."""
        kernel = self.param("kernel", _kernel_init, (in_features, self.features))
        bias = self.param("bias", _zeros, (self.features,)) if self.use_bias else None
        return kernel, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out]."""
        return project(x, *self.weights(x.shape[-1]))


def project(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ kernel [in, out] (+ bias [out]) in x's dtype: `Linear`'s product, for
    weights held outside a module (stacked projections, `unet.stack_projections`)."""
    y = jnp.dot(x, kernel.astype(x.dtype))
    return y if bias is None else y + bias.astype(x.dtype)


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC input: params `kernel` [kh, kw, in, out] (HWIO) and `bias`.

    `padding` is an int (symmetric, as torch) or explicit ((top, bottom), (left, right)).
    3x3 stride-1 convs with padding 1 go through `ops.conv3x3` (the implementation in force:
    cuDNN's convolution, or the taps form where `auto` measured it faster), 1x1 stride-1
    convs without padding through `ops.conv1x1` (cuDNN's convolution or cuBLAS's product).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Padding = 1

    @nn.compact
    def __call__(self, x: jax.Array | ops.Planes, bias_offset: jax.Array | None = None
                 ) -> jax.Array:  # fmt: skip
        """x: [N, H, W, in] (or, for a 3x3 stride-1 conv, its `ops.Planes`) -> [N, H', W', out].

        bias_offset: [out], added to the bias before the bias meets the map (a ResnetBlock2D's
        time embedding when the whole batch shares one timestep): XLA then gives cuDNN one
        bias vector, instead of a full [N, H', W', out] broadcast of the offset to add.
        """
        k = self.kernel_size
        kernel = self.param("kernel", _kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", _zeros, (self.features,))
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        if bias_offset is not None:
            bias = bias.astype(jnp.float32) + bias_offset.astype(jnp.float32)
        if k == 3 and self.stride == 1 and tuple(map(tuple, pad)) == ((1, 1), (1, 1)):
            return ops.conv3x3(x, kernel, bias)  # the implementation in force (`ops.use`)
        if k == 1 and self.stride == 1 and tuple(map(tuple, pad)) == ((0, 0), (0, 0)):
            return ops.conv1x1(x, kernel, bias)  # likewise
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=tuple(tuple(p) for p in pad),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(x.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last axis, with an optional fused activation (`ops`)."""

    groups: int = 32
    eps: float = 1e-5
    activation: ops.Activation = None

    @nn.compact
    def __call__(self, x: jax.Array, conv_out: int | None = None) -> jax.Array | ops.Planes:
        """x: [N, ..., C] -> same shape and dtype.

        conv_out: the output channels of the 3x3 convolution this norm feeds, if it feeds
        one; where that convolution reads planes (`ops.norm_writes_planes`), the result is
        its input as `ops.Planes`, written by the GroupNorm kernel."""
        c = x.shape[-1]
        scale = self.param("scale", _ones, (c,))
        bias = self.param("bias", _zeros, (c,))
        kw = dict(groups=self.groups, eps=self.eps, activation=self.activation)
        if conv_out is not None and ops.norm_writes_planes(x.shape, conv_out, x.dtype):
            return ops.group_norm_planes(x, scale, bias, **kw)
        return ops.group_norm(x, scale, bias, **kw)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis (`ops.layer_norm`): statistics in float32,
    output in x's dtype."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", _ones, (c,))
        bias = self.param("bias", _zeros, (c,))
        return ops.layer_norm(x, scale, bias, eps=self.eps)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the time embedding in between; 1x1 conv shortcut
    when the channel count changes. Without `temb` (the VAE) there is no `time_emb_proj`."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5

    def setup(self):
        self.norm1 = GroupNorm(self.groups, self.eps, activation="silu")
        self.conv1 = Conv2d(self.out_channels)
        self.time_emb_proj = Linear(self.out_channels)
        self.norm2 = GroupNorm(self.groups, self.eps, activation="silu")
        self.conv2 = Conv2d(self.out_channels)
        self.conv_shortcut = Conv2d(self.out_channels, kernel_size=1, padding=0)

    def time_projection(self, temb: jax.Array) -> jax.Array:
        """temb [..., T] -> [..., out_channels]: what this block adds to its feature map."""
        return self.time_emb_proj(jax.nn.silu(temb))

    def conditioning(self, temb: jax.Array) -> dict:
        """This block's `conditioning` entry for time embeddings temb [..., T]."""
        return {"temb": self.time_projection(temb)}

    def time_weights(self, temb_dim: int) -> dict:
        """{"temb": (kernel [temb_dim, out_channels], bias [out_channels])}: the tree of
        `conditioning`'s entry, with the weights that make its leaf from silu(temb)."""
        return {"temb": self.time_emb_proj.weights(temb_dim)}

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: [N, H, W, C_in]; temb: [N, T] or None -> [N, H, W, out_channels].

        A precomputed `conditioning/temb` ([N or 1, out_channels]) replaces temb's projection.
        """
        proj = None
        if self.has_variable(CONDITIONING, "temb"):
            proj = self.get_variable(CONDITIONING, "temb")
        elif temb is not None:
            proj = self.time_projection(temb)
        h = self.norm1(x, conv_out=self.out_channels)  # maybe conv1's input planes
        if proj is not None and proj.shape[0] == 1:  # one timestep for the batch: a bias
            h = self.conv1(h, bias_offset=proj[0])
        else:
            h = self.conv1(h)
            if proj is not None:  # [N] for a batch of N, or for the samples that copies share
                proj = repeat_copies(proj, h.shape[0])
                h = h + proj.astype(h.dtype)[:, None, None, :]
        h = self.conv2(self.norm2(h, conv_out=self.out_channels))
        if x.shape[-1] != self.out_channels:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Strided 3x3 conv halving H and W. `padding=0` is the VAE's variant: pad one row and
    one column at the bottom/right only, as diffusers does."""

    out_channels: int
    padding: int = 1

    def setup(self):
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        self.conv = Conv2d(self.out_channels, stride=2, padding=pad)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), out_channels]."""
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling of [N, H, W, C] to `size` (default 2H, 2W), as torch's
    F.interpolate(mode="nearest"): output pixel i reads input pixel floor(i * in / out)."""
    n, h, w, c = x.shape
    out_h, out_w = size if size is not None else (2 * h, 2 * w)
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to an explicit size) followed by a 3x3 conv."""

    out_channels: int

    def setup(self):
        self.conv = Conv2d(self.out_channels)

    def conditioning(self, dtype, form: str = "subpixel") -> dict:
        """This upsampler's `conditioning` entry: the kernel its `form` convolves with, in
        `dtype`: the subpixel phase kernels (`ops.subpixel_kernel`, "phase_kernel") or the
        transposed form's 4x4 kernel (`ops.transposed_kernel`, "transposed_kernel"), for a
        denoising loop to build once, not in every step (XLA does not hoist them out of the
        loop by itself: they are larger than the kernel)."""
        kernel = self.conv.variables["params"]["kernel"]
        if form == "transposed":
            return {"transposed_kernel": ops.transposed_kernel(kernel).astype(dtype)}
        return {"phase_kernel": ops.subpixel_kernel(kernel).astype(dtype)}

    def precomputed(self, dtype, input_hw: tuple[int, int]) -> dict | None:
        """`conditioning` in the form the op choices in force run for an input of input_hw
        (`ops.upsample_conv_choice`); None where that form has no kernel to precompute (the
        reference form)."""
        form = ops.upsample_conv_choice((1, *input_hw, 1))
        return self.conditioning(dtype, form) if form in ("subpixel", "transposed") else None

    def __call__(
        self, x: jax.Array, size: tuple[int, int] | None = None, skip: jax.Array | None = None
    ) -> jax.Array:
        """x: [N, H, W, C] -> [N, 2H, 2W, out_channels] (or `size`); with skip [N, H', W', S]
        (the UNet's next skip connection), [upsampled, skip] along channels. An exact 2x goes
        through `ops.upsample_conv` (whose "subpixel" form skips the upsampled map and writes
        the concatenate in its interleave; "transposed" skips it too, in one convolution), or
        with precomputed kernels (`conditioning/phase_kernel`, `conditioning/transposed_kernel`)
        straight to `ops.upsample_conv_phases` or `ops.upsample_conv_transposed`."""
        doubled = size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2])
        if doubled and self.has_variable(CONDITIONING, "phase_kernel"):
            bias = self.conv.variables["params"]["bias"]
            return ops.upsample_conv_phases(x, self.get_variable(CONDITIONING, "phase_kernel"),
                                            bias, skip)  # fmt: skip
        if doubled and self.has_variable(CONDITIONING, "transposed_kernel"):
            out = ops.upsample_conv_transposed(
                x, self.get_variable(CONDITIONING, "transposed_kernel"),
                self.conv.variables["params"]["bias"],
            )  # fmt: skip
            return out if skip is None else jnp.concatenate([out, skip.astype(out.dtype)], -1)
        choice = ops.upsample_conv_choice(x.shape)
        if not doubled or self.is_initializing() or choice == "reference":
            out = self.conv(upsample_nearest(x, size))
            return out if skip is None else jnp.concatenate([out, skip], axis=-1)
        conv = self.conv.variables["params"]
        return ops.upsample_conv(x, conv["kernel"], conv["bias"], skip=skip,
                                 implementation=choice)  # fmt: skip


class Attention(nn.Module):
    """Multi-head attention, diffusers' `Attention` with `heads * head_dim == dim`.

    Self-attention when `context` is None, cross-attention otherwise; the context width is
    taken from the input. The softmax itself runs in `ops.attention`.
    """

    dim: int
    heads: int
    qkv_bias: bool = False

    def setup(self):
        if self.dim % self.heads:
            raise ValueError(f"attention {self.dim=} not divisible by {self.heads=}")
        self.to_q = Linear(self.dim, use_bias=self.qkv_bias)
        self.to_k = Linear(self.dim, use_bias=self.qkv_bias)
        self.to_v = Linear(self.dim, use_bias=self.qkv_bias)
        self.to_out_0 = Linear(self.dim)

    def key_value(self, context: jax.Array) -> dict:
        """The cross-attention's K and V of context [B, S, C_ctx]: {"k", "v"}, each [B, S, dim]
        (this module's `conditioning` entry)."""
        return {"k": self.to_k(context), "v": self.to_v(context)}

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, *, cross: bool = False
    ) -> jax.Array:
        """x: [B, L, dim]; context: [B, S, C_ctx] or None -> [B, L, dim].

        Self-attention unless `cross` or a context is given. For cross-attention, a
        precomputed `conditioning/{k, v}` replaces the projections of context (which may then
        be None)."""
        b, length, _ = x.shape
        head_dim = self.dim // self.heads
        self_attention = context is None and not cross and not self.has_variable(CONDITIONING, "k")
        if self_attention:
            shape = (b, length, self.heads, head_dim)
            if plan := ops.packed_self_attention_plan(shape, x.dtype):
                return self._packed_self_attention(x, *plan)
        fused = self._stacked_qkv_kernel(x) if self_attention else None
        if fused is not None:  # q, k and v in one product, the weights stacked once
            qkv = jnp.dot(x, fused.astype(x.dtype))
            if self.has_variable(CONDITIONING, "qkv_bias"):
                qkv = qkv + self.get_variable(CONDITIONING, "qkv_bias").astype(x.dtype)
            q, k, v = jnp.split(qkv, 3, axis=-1)
        elif self.has_variable(CONDITIONING, "k"):
            q = self.to_q(x)
            k, v = (self.get_variable(CONDITIONING, n).astype(x.dtype) for n in ("k", "v"))
        else:
            if context is None and cross:
                raise ValueError(
                    f"cross-attention {'/'.join(self.scope.path)} has neither a context nor "
                    f"precomputed '{CONDITIONING}' K/V"
                )
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, head_dim) for t in (q, k, v))
        out = ops.attention(q, k, v, scale=head_dim**-0.5)
        return self.to_out_0(out.reshape(b, length, self.dim))

    def context_batch(self, context: jax.Array | None) -> int | None:
        """The batch of the text states this cross-attention reads: context's, else its
        precomputed K's (`conditioning/k`), else None."""
        if context is not None:
            return context.shape[0]
        if self.has_variable(CONDITIONING, "k"):
            return self.get_variable(CONDITIONING, "k").shape[0]
        return None

    def _stacked_qkv_kernel(self, x: jax.Array) -> jax.Array | None:
        """The precomputed `conditioning/qkv_kernel` [in, 3 * dim] (q, k, v side by side) if
        there is one of that width (the packed kernel's is wider where it pads heads)."""
        if not self.has_variable(CONDITIONING, "qkv_kernel"):
            return None
        kernel = self.get_variable(CONDITIONING, "qkv_kernel")
        return kernel if kernel.shape == (x.shape[-1], 3 * self.dim) else None

    def packed_weights(
        self,
        in_features: int,
        padded: int,
        dtype,
        *,
        out_projection: bool = True,
        batch: int | None = None,
    ) -> dict:
        """The fused projection's weights for `_packed_self_attention` with heads widened to
        `padded`: {"qkv_kernel" [in_features, 3 * heads * padded], "qkv_bias" [3 * heads *
        padded] (where the projections have biases; zeros in the packed form where they have
        none and `ops.qkv_projection_choice` is "dot_bias"), "out_kernel" [heads * padded,
        dim]}, in `dtype`. Each head's q, k and v get `padded - head_dim` zero columns, the
        output projection as many zero rows. This module's `conditioning` entry for a self-attention
        (`BasicTransformerBlock.conditioning` with a token count), so that the weights are
        stacked once per generation rather than in every step. With `batch`, "qkv_kernel" is
        broadcast to [batch, in_features, 3 * heads * padded] for a batched product (the
        "dot_batched" form, `ops.qkv_projection_batched`)."""
        heads, head_dim = self.heads, self.dim // self.heads
        extra = padded - head_dim
        widen = ((0, 0), (0, 0), (0, extra))  # zero columns after each head's
        kernels, biases = [], []
        for linear in (self.to_q, self.to_k, self.to_v):
            kernel, bias = linear.weights(in_features)
            kernels.append(jnp.pad(kernel.astype(dtype).reshape(-1, heads, head_dim), widen))
            if bias is not None:
                biases.append(jnp.pad(bias.astype(dtype).reshape(1, heads, head_dim), widen))
        out = {"qkv_kernel": jnp.stack(kernels, axis=1).reshape(-1, 3 * heads * padded)}
        if batch is not None:  # one copy per sample: a batched product's right operand
            out["qkv_kernel"] = jnp.broadcast_to(
                out["qkv_kernel"], (batch, *out["qkv_kernel"].shape)
            )
        if biases:  # Attention's q, k and v projections have biases together or not at all
            out["qkv_bias"] = jnp.stack(biases, axis=1).reshape(-1)
        elif out_projection and ops.qkv_projection_choice() == "dot_bias":  # a zero bias:
            out["qkv_bias"] = jnp.zeros((3 * heads * padded,), dtype)  # cuBLASLt's epilogue
        if not out_projection:
            return out
        kernel, _ = self.to_out_0.weights(self.dim)
        kernel = kernel.astype(dtype).reshape(heads, head_dim, -1)
        kernel = jnp.pad(kernel, ((0, 0), (0, extra), (0, 0)))  # zero rows after each head's
        out["out_kernel"] = kernel.reshape(heads * padded, -1)
        return out

    def _packed_self_attention(self, x: jax.Array, implementation: str, padded: int) -> jax.Array:
        """Self-attention through one fused projection, qkv [B, L, 3, heads, padded], read in
        place by `implementation`'s kernel (`ops.self_attention_packed`, as
        `ops.packed_self_attention_plan` chose): no slicing copies. Where
        `padded` exceeds the head dim, each head's q, k, v are widened by zero weight columns
        and the output projection by zero rows, so that a kernel that wants padded heads gets
        them without copying. Same result: zero columns add nothing to the logits, and the
        output's extra columns meet zero rows. The weights come from a precomputed
        `conditioning` entry (`packed_weights`) where one of this width is there, else they
        are stacked here. x: [B, L, dim] -> [B, L, dim]."""
        b, length, _ = x.shape
        heads, head_dim = self.heads, self.dim // self.heads
        weights = None
        if self.has_variable(CONDITIONING, "qkv_kernel"):
            weights = {
                n: self.get_variable(CONDITIONING, n)
                for n in ("qkv_kernel", "qkv_bias", "out_kernel")
                if self.has_variable(CONDITIONING, n)
            }
            bias, kernel = weights.get("qkv_bias"), weights["qkv_kernel"]
            if kernel.shape[-2:] != (x.shape[-1], 3 * heads * padded) or (
                bias is not None and bias.shape != (3 * heads * padded,)
            ):
                weights = None  # stacked for another width (another size or kernel choice)
        if weights is None:
            weights = self.packed_weights(x.shape[-1], padded, x.dtype)
        kernel = weights["qkv_kernel"].astype(x.dtype)
        if kernel.ndim == 3 and kernel.shape[0] == b:  # "dot_batched": a product per sample
            qkv = jax.lax.dot_general(x, kernel, (((2,), (1,)), ((0,), (0,))))
        else:  # the plain product (a batched form's copies serve fewer samples alike)
            qkv = jnp.dot(x, kernel if kernel.ndim == 2 else kernel[0])
        if "qkv_bias" in weights:
            qkv = qkv + weights["qkv_bias"].astype(x.dtype)
        qkv = qkv.reshape(b, length, 3, heads, padded)
        out = ops.self_attention_packed(qkv, scale=head_dim**-0.5, implementation=implementation)
        _, bias = self.to_out_0.weights(self.dim)
        y = jnp.dot(out.reshape(b, length, -1), weights["out_kernel"].astype(x.dtype))
        return y + bias.astype(x.dtype)


class GEGLU(nn.Module):
    """`proj` [D, 2F] split into (hidden, gate), returning hidden * gelu(gate), in one
    `ops.geglu` call. The `proj` submodule only holds the params (diffusers' name)."""

    features: int

    def setup(self):
        self.proj = Linear(2 * self.features)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., F]."""
        kernel, bias = self.proj.weights(x.shape[-1])
        return ops.geglu(x, kernel, bias)


class FeedForward(nn.Module):
    """GEGLU up to `mult * dim`, then a linear back to `dim` (`net_1` is dropout)."""

    dim: int
    mult: int = 4

    def setup(self):
        self.net_0 = GEGLU(self.mult * self.dim)
        self.net_2 = Linear(self.dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim]."""
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    dim: int
    heads: int

    def setup(self):
        self.norm1 = LayerNorm()
        self.attn1 = Attention(self.dim, self.heads)
        self.norm2 = LayerNorm()
        self.attn2 = Attention(self.dim, self.heads)
        self.norm3 = LayerNorm()
        self.ff = FeedForward(self.dim)

    def conditioning(self, context: jax.Array, tokens: int | None = None) -> dict:
        """This block's `conditioning` entry: the cross-attention's K/V of context [B, S, C],
        and, given the token count of x, the self-attention's fused projection weights
        (`weight_conditioning`)."""
        out = {"attn2": self.attn2.key_value(context)}
        if tokens is not None:
            out.update(self.weight_conditioning(context.shape[0], tokens, context.dtype))
        return out

    def key_value_weights(self, context_dim: int) -> dict:
        """The cross-attention's K and V projections, {"attn2": {"k": (kernel [context_dim,
        dim], bias [dim] or None), "v": ...}}: the tree of `conditioning`'s K/V entry, with
        the weights that make each leaf."""
        kv = {n: getattr(self.attn2, f"to_{n}").weights(context_dim) for n in ("k", "v")}
        return {"attn2": kv}

    def weight_conditioning(self, batch: int, tokens: int, dtype) -> dict:
        """The part of `conditioning` that depends on the weights alone (for a batch of
        `batch` inputs of `tokens` tokens): the self-attention's fused projection weights,
        padded for the packed kernel where it runs packed (`ops.packed_self_attention_head_dim`),
        else q, k and v side by side, [dim, 3 * dim] (XLA would otherwise merge the three
        products itself, stacking the weights in every step of a denoising loop)."""
        head_dim = self.dim // self.heads
        shape = (batch, tokens, self.heads, head_dim)
        if packed := ops.packed_self_attention_head_dim(shape, dtype):
            batched = batch if ops.qkv_projection_batched(batch, tokens) else None
            return {"attn1": self.attn1.packed_weights(self.dim, packed, dtype, batch=batched)}
        # q, k and v stacked once here, not by XLA in every step (its dot merger)
        return {"attn1": self.attn1.packed_weights(self.dim, head_dim, dtype, out_projection=False)}

    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        """x: [B, L, dim]; context: [B, S, C_ctx] -> [B, L, dim].

        x may hold fewer samples than the text states (B / r, each shared by r consecutive
        contexts: a guided batch's unconditional and conditional copies, `repeat_copies`):
        the self-attention then runs once per sample, and the batch widens to B before the
        cross-attention, where the copies first differ. The output has the contexts' batch."""
        x = x + self.attn1(self.norm1(x))
        batch = self.attn2.context_batch(context)
        if batch is not None:
            x = repeat_copies(x, batch)
        x = x + self.attn2(self.norm2(x), context, cross=True)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, project in, `depth` transformer blocks over the H*W tokens, project out,
    plus the input. The projections are 1x1 convs (SD1) or linears (SD2,
    `use_linear_projection`); they compute the same map but store different layouts."""

    channels: int
    heads: int
    depth: int = 1
    use_linear_projection: bool = False
    groups: int = 32

    def setup(self):
        self.norm = GroupNorm(self.groups, eps=1e-6)
        if self.use_linear_projection:
            self.proj_in = Linear(self.channels)
            self.proj_out = Linear(self.channels)
        else:
            self.proj_in = Conv2d(self.channels, kernel_size=1, padding=0)
            self.proj_out = Conv2d(self.channels, kernel_size=1, padding=0)
        self.transformer_blocks = [
            BasicTransformerBlock(self.channels, self.heads) for _ in range(self.depth)
        ]

    def conditioning(self, context: jax.Array, tokens: int | None = None) -> dict:
        """Every block's `conditioning` entry (`BasicTransformerBlock.conditioning`); tokens:
        H * W of this model's input, where known."""
        return {b.name: b.conditioning(context, tokens) for b in self.transformer_blocks}

    def key_value_weights(self, context_dim: int) -> dict:
        """Every block's `BasicTransformerBlock.key_value_weights`."""
        return {b.name: b.key_value_weights(context_dim) for b in self.transformer_blocks}

    def weight_conditioning(self, batch: int, tokens: int, dtype) -> dict:
        """Every block's `BasicTransformerBlock.weight_conditioning`."""
        return {
            b.name: b.weight_conditioning(batch, tokens, dtype) for b in self.transformer_blocks
        }

    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        """x: [N, H, W, channels]; context: [N, S, C_ctx] -> [N, H, W, channels].

        x may hold N / r samples, each shared by r consecutive contexts (see
        `BasicTransformerBlock`): the output has the contexts' N."""
        n, h, w, c = x.shape
        # Both projections act per pixel, so applying them before or after the reshape
        # (as diffusers does for conv vs linear) gives the same result.
        tokens = self.proj_in(self.norm(x)).reshape(n, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = tokens.reshape(tokens.shape[0], h, w, c)
        return repeat_copies(x, tokens.shape[0]) + self.proj_out(tokens)
