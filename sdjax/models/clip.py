"""CLIP text encoder (transformers' `CLIPTextModel`), the SD conditioning model.

Returns `last_hidden_state`: the output of the last encoder layer after `final_layer_norm`,
which is what SD 1.x and 2.x feed to the UNet's cross-attention. SD 2.x checkpoints already
ship 23 of OpenCLIP's 24 layers, so "penultimate layer" needs no special case here.

Parameter names follow the PyTorch checkpoint (`text_model.encoder.layers.0.mlp.fc1.weight`
-> `text_model/encoder/layers_0/mlp/fc1/kernel`), so `sdjax.weights` loads it generically.

The attention is causal: `sdjax.ops.causal_attention`, under the `attention` implementation in
force (the reference is plain jnp with a float32 softmax; `auto` takes cuDNN's fused causal
attention on GPU). With 77 tokens it costs about 1% of the encoder's 13 GFLOP (the
projections and MLP dominate), and the encoder runs once per image, not once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax import ops
from sdjax.config import CLIPTextConfig


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x) (SD 1.x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP (SD 2.x)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        dense = lambda: nn.Dense(self.config.hidden_size, dtype=self.dtype)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()

    def __call__(self, x):
        """x: [B, L, hidden] -> [B, L, hidden]."""
        b, length, _ = x.shape
        heads, head_dim = self.config.num_attention_heads, self.config.head_dim
        split = lambda t: t.reshape(b, length, heads, head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = ops.causal_attention(q, k, v, scale=head_dim**-0.5)
        return self.out_proj(out.reshape(b, length, heads * head_dim))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        if self.config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported CLIP hidden_act {self.config.hidden_act!r}; "
                f"choose from {sorted(ACTIVATIONS)}"
            )
        self.fc1 = nn.Dense(self.config.intermediate_size, dtype=self.dtype)
        self.fc2 = nn.Dense(self.config.hidden_size, dtype=self.dtype)

    def __call__(self, x):
        """x: [B, L, hidden] -> [B, L, hidden] through [B, L, intermediate]."""
        return self.fc2(ACTIVATIONS[self.config.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        eps = self.config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.self_attn = CLIPAttention(self.config, dtype=self.dtype)
        self.layer_norm2 = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.mlp = CLIPMLP(self.config, dtype=self.dtype)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.layers = [
            CLIPEncoderLayer(self.config, dtype=self.dtype)
            for _ in range(self.config.num_hidden_layers)
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype)
        self.position_embedding = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype
        )

    def __call__(self, input_ids):
        """input_ids: int [B, L] -> [B, L, hidden]; positions are 0..L-1."""
        positions = jnp.arange(input_ids.shape[-1])[None]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder layers, final LayerNorm.

    pad_multiple: run the layers on the tokens padded with zero vectors to a multiple of this
    many, and return the first L. Exact: the attention is causal and every other op works per
    token, so tokens after the prompt change nothing before them. It spares XLA's padding of
    each matrix product's rows (77 tokens per prompt: a copy before every product on GPU).
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    pad_multiple: int = 1

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, dtype=self.dtype)
        self.encoder = CLIPEncoder(self.config, dtype=self.dtype)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype)

    def __call__(self, input_ids):
        x = self.embeddings(input_ids)  # [B, L, hidden]
        length = x.shape[1]
        if pad := -length % self.pad_multiple:
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        return self.final_layer_norm(self.encoder(x))[:, :length]


class CLIPTextModel(nn.Module):
    """The SD text encoder. `dtype` is the compute dtype; parameters keep their own dtype."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    pad_multiple: int = 1  # see CLIPTextTransformer

    def setup(self):
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1; got {self.pad_multiple}")
        self.text_model = CLIPTextTransformer(
            self.config, dtype=self.dtype, pad_multiple=self.pad_multiple
        )

    def __call__(self, input_ids):
        """input_ids: int [B, L], L <= max_position_embeddings -> last_hidden_state [B, L, hidden]."""
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [B, L] with L <= {self.config.max_position_embeddings}; "
                f"got {input_ids.shape}"
            )
        return self.text_model(input_ids)


def init_params(config: CLIPTextConfig, rng: jax.Array) -> dict:
    """Random float32 parameters of the text encoder (the tree under `{"params": ...}`)."""
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return CLIPTextModel(config).init(rng, ids)["params"]


def encode(params, input_ids, config: CLIPTextConfig, *, dtype=jnp.float32, pad_multiple: int = 1):
    """input_ids: int [B, L] -> last_hidden_state [B, L, hidden] in `dtype`. pad_multiple:
    the layers run on the tokens padded to a multiple of it (exact; `CLIPTextTransformer`)."""
    model = CLIPTextModel(config, dtype=dtype, pad_multiple=pad_multiple)
    return model.apply({"params": params}, input_ids)
