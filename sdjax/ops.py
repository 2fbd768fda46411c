"""The one seam through which the models call their hot ops.

The models never call a kernel directly. They call `attention` (and the text encoder's
`causal_attention`), `group_norm`, `layer_norm`, `geglu`, `conv3x3`, `conv1x1` and
`upsample_conv` here, and the implementation is chosen once, outside the model,
with `use(...)`:

    with sdjax.ops.use(Implementations(attention="flash")):
        out = unet.apply(params, ...)   # traced with the flash kernel

The choice is read when a function is *traced*. A jitted function that should switch
implementations must therefore take the choice as a static argument and enter `use(...)`
inside the traced function (the pipeline does this), otherwise jit's cache would replay
the implementation it saw first.

Implementation names:
  reference      plain jnp, float32 math throughout; the ground truth.
  xla            what plain XLA does well: low-precision operands, float32 accumulation.
  cudnn          (attention) jax.nn.dot_product_attention(implementation="cudnn"); GPU only.
  flash          (attention) our Pallas FlashAttention kernel (Triton: any NVIDIA GPU).
  flash_hopper   (attention) our Pallas Mosaic GPU FlashAttention for Hopper (H100/H200):
                 fp16/bf16, lengths in whole blocks (`flash_attention_hopper.supports`).
  fused_softmax  (attention) our Pallas partially fused softmax (the paper's variant).
  cross          (attention) our Pallas kernel for short key sets (the prompt's 77 tokens): one
                 program per block of query rows for every head (`custom_calls.cross_attention`);
                 flash past its MAX_KEYS, logged.
  columns        (group_norm) plain XLA in the shapes XLA reduces well: per-channel shifted
                 sums in one column reduction, merged into groups, then one element-wise
                 normalize (`group_norm_columns`: `group_norm_concat`'s XLA form, one part).
  pallas         (group_norm, layer_norm, geglu, interleave) our Pallas kernels (Triton); the
                 interleave writes the subpixel form's phases as the upsampled map, with the
                 bias and the UNet's next skip concatenated (`custom_calls.subpixel`).
  pallas_split   (group_norm) our Pallas kernels, the tuning table's cooperative entries (one
                 launch with a grid barrier) run as the split plan over the same rows.
  pallas_stats   (group_norm) our Pallas statistics kernel (`custom_calls.group_statistics`),
                 then XLA's element-wise normalize (`group_norm_concat`'s Pallas form, one part).
  pallas_hopper  (geglu) our Pallas Mosaic GPU GEGLU for Hopper: fp16/bf16, shapes in whole
                 tiles (`geglu_hopper.supports`).
  taps           (conv3x3) one matrix product against all nine taps, then a shifted sum
                 (plain XLA; for weight-bound convs: `conv3x3_taps`).
  taps_half      (conv3x3) the same with the nine tap products stored in x's dtype (half
                 their bytes; each rounded once before the float32 sum).
  pallas_hopper  (conv3x3) our Mosaic GPU implicit-GEMM convolution for Hopper, split-K
                 (`custom_calls.conv3x3_hopper`; shapes in its scope only; `auto` takes it
                 where it measured ahead of cuDNN: `hopper_conv_pays`).
  group_norm     (conv_planes) our GroupNorm kernel writes the input planes of the Hopper
                 convolution it feeds (`group_norm_planes`, `Planes`).
  dot            (conv1x1) the 1x1 convolution as a matrix product of the pixels' rows
                 (plain XLA: cuBLAS on GPU, with the bias and a following residual add in its
                 epilogue; `conv1x1_dot`).
  dot            (qkv_projection) the self-attention's fused q, k, v projection as one
                 product, with no bias where the projections have none.
  dot_bias       (qkv_projection) the same product plus a zero bias that the pipeline
                 prepares with the weights (a runtime input XLA cannot fold), so that XLA
                 gives the product to cuBLASLt with a bias epilogue instead of legacy
                 cuBLAS's pick (`qkv_projection_choice`). Measured slower on the H100
                 (s26a): cuBLASLt picks the same 64x64 kernel, memset included.
  dot_batched    (qkv_projection) the same product as a batched one, one per sample against
                 the weights broadcast (made per image with the conditioning), at the 64x64
                 level only (`qkv_projection_batched`): a shape for which cuBLAS might pick a
                 kernel without the 64x64 product's memset. Measured no faster (s26b): its
                 pick comes with a memset too.
  subpixel       (upsample_conv) nearest 2x + 3x3 conv as one 2x2 conv of the small map with
                 four phase kernels (plain XLA; exact; `auto` takes it from 16x16 inputs up).
  transposed     (upsample_conv) the same as one convolution of the zero-dilated small map
                 with a 4x4 kernel (plain XLA; cuDNN's backward-data kernels on GPU).
  auto           the fastest recorded choice for the shape and backend (see `_auto_*`); a
                 recorded Hopper kernel on a GPU or shape it cannot run gives its Triton
                 sibling.

An unknown name raises `ValueError`. A chosen implementation that cannot run a shape raises;
nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable, Container, Iterator
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

import custom_calls
from custom_calls.cross_attention import supports as _cross_supports
from custom_calls.flash_attention import MAX_HEAD_DIM
from custom_calls.flash_attention_hopper import padded_head_dim as _hopper_padded_head_dim
from custom_calls.flash_attention_hopper import supports as _hopper_supports_shapes
from custom_calls.flash_attention_hopper import tuned_config as _hopper_tuned_config

logger = logging.getLogger(__name__)

AttentionImpl = Literal[
    "reference", "xla", "cudnn", "flash", "flash_hopper", "fused_softmax", "cross", "auto"
]
GroupNormImpl = Literal[
    "reference", "xla", "columns", "pallas", "pallas_split", "pallas_stats", "auto"
]
GegluImpl = Literal["reference", "xla", "pallas", "pallas_hopper", "auto"]
LayerNormImpl = Literal["reference", "xla", "pallas", "auto"]
UpsampleConvImpl = Literal["reference", "subpixel", "transposed", "auto"]
InterleaveImpl = Literal["xla", "pallas", "auto"]
Conv3x3Impl = Literal["reference", "taps", "taps_half", "pallas_hopper", "auto"]
ConvPlanesImpl = Literal["xla", "group_norm", "auto"]
Conv1x1Impl = Literal["reference", "dot", "auto"]
QkvProjectionImpl = Literal["dot", "dot_bias", "dot_batched", "auto"]
Activation = Literal[None, "silu", "gelu", "gelu_tanh"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Implementations:
    """Which implementation each hot op uses. Hashable, so it can be a static jit argument."""

    attention: AttentionImpl = "reference"
    group_norm: GroupNormImpl = "reference"
    geglu: GegluImpl = "reference"
    layer_norm: LayerNormImpl = "reference"
    # nearest 2x upsampling + 3x3 conv (the decoders' Upsample2D): "reference" upsamples,
    # then convolves; "subpixel" convolves the small map with four phase kernels (exact;
    # `upsample_conv_subpixel`); "transposed" one convolution of the zero-dilated small map
    # with a 4x4 kernel (`upsample_conv_transposed`: cuDNN's backward-data kernels, no
    # interleave pass, but a separate bias pass); "auto" the subpixel form where it
    # measured faster on GPU (`subpixel_pays`). Plain XLA in every form: no Pallas kernel.
    upsample_conv: UpsampleConvImpl = "reference"
    # The subpixel form's interleave of its four output phases, with the bias and (in the
    # UNet) the next skip's concatenate: "xla" is plain jnp (one XLA fusion); "pallas" our
    # kernel (`custom_calls.subpixel`: one read and one write per byte); "auto" the kernel on
    # GPU. Only where the subpixel form runs.
    interleave: InterleaveImpl = "xla"
    # 3x3 stride-1 convolutions: "reference" is XLA's convolution (cuDNN on GPU); "taps" one
    # matrix product against all nine taps and a shifted sum (`conv3x3_taps`; "taps_half"
    # with the tap products in x's dtype);
    # "pallas_hopper" our Mosaic GPU implicit GEMM (`custom_calls.conv3x3_hopper`); "auto"
    # ours where it measured faster on a Hopper GPU (`hopper_conv_pays`), the taps form where
    # that did (`taps_pays`; half-precision products where `taps_half_pays`), else the
    # reference.
    conv3x3: Conv3x3Impl = "reference"
    # Where our Hopper convolution's input planes come from when a GroupNorm feeds it: "xla"
    # one fusion before the kernel (`conv3x3_hopper.input_planes`); "group_norm" our GroupNorm
    # kernel writes them instead of its normalized map (`group_norm_planes`: one pass
    # instead of two); "auto" the latter on GPU. Only where both run our kernels.
    conv_planes: ConvPlanesImpl = "xla"
    # 1x1 stride-1 convolutions (the UNet's proj_in / proj_out and resnet shortcuts, the
    # VAE's): "reference" is XLA's convolution (cuDNN on GPU); "dot" the same product as a
    # matrix product of the [N H W, I] rows (cuBLAS on GPU, which XLA gives the bias and a
    # following residual add as its epilogue); "auto" the product on GPU (`conv1x1_choice`).
    conv1x1: Conv1x1Impl = "reference"
    # The self-attention's fused q, k, v projection where its projections have no bias
    # (SD's): "dot" the plain product; "dot_bias" with a zero bias prepared with the weights
    # (`UNet2DConditionModel.prepare`), which XLA lowers to a cuBLASLt product with a bias
    # epilogue rather than a legacy cuBLAS GEMM (the 64x64 one's kernel comes with a memset
    # and ~6 us of idle in the step's CUDA graph: results README, s25b); "auto" the choice
    # measured faster (`qkv_projection_choice`). Only with prepared weights: a zero bias made
    # inside the program is a constant, and XLA folds the add away (s25d); measured slower
    # (s26a: the memset stays). "dot_batched": a batched product per sample at the 64x64
    # level (`qkv_projection_batched`), the weights broadcast with the conditioning;
    # measured no faster (s26b: another kernel, a memset again).
    qkv_projection: QkvProjectionImpl = "dot"

    def __post_init__(self):
        for field, kind in (
            ("attention", AttentionImpl),
            ("group_norm", GroupNormImpl),
            ("geglu", GegluImpl),
            ("layer_norm", LayerNormImpl),
            ("upsample_conv", UpsampleConvImpl),
            ("interleave", InterleaveImpl),
            ("conv3x3", Conv3x3Impl),
            ("conv_planes", ConvPlanesImpl),
            ("conv1x1", Conv1x1Impl),
            ("qkv_projection", QkvProjectionImpl),
        ):
            value = getattr(self, field)
            if value not in get_args(kind):
                raise ValueError(
                    f"unknown {field} implementation {value!r}; choose from {get_args(kind)}"
                )

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The ops that have a choice: ("attention", "group_norm", ...)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def preset(cls, name: str) -> Implementations:
        """Named presets: 'reference', 'xla', 'auto' (every op the same), or one from PRESETS."""
        if name in PRESETS:
            return PRESETS[name]
        raise ValueError(f"unknown kernel preset {name!r}; choose from {sorted(PRESETS)}")


PRESETS: dict[str, Implementations] = {
    "reference": Implementations(),
    "xla": Implementations(attention="xla", group_norm="xla", geglu="xla", layer_norm="xla"),
    "cudnn": Implementations(attention="cudnn", group_norm="xla", geglu="xla", layer_norm="xla"),
    "pallas": Implementations(
        attention="flash", group_norm="pallas", geglu="pallas", layer_norm="pallas"
    ),
    "auto": Implementations(
        attention="auto",
        group_norm="auto",
        geglu="auto",
        layer_norm="auto",
        upsample_conv="auto",
        interleave="auto",
        conv3x3="auto",
        conv_planes="auto",
        conv1x1="auto",
        qkv_projection="auto",
    ),
}

_state = threading.local()


def current() -> Implementations:
    """The implementations in force for code traced now."""
    return getattr(_state, "impls", PRESETS["reference"])


@contextlib.contextmanager
def use(impls: Implementations | str) -> Iterator[Implementations]:
    """Sets the implementations for everything traced inside the `with` block."""
    if isinstance(impls, str):
        impls = Implementations.preset(impls)
    previous = current()
    _state.impls = impls
    try:
        yield impls
    finally:
        _state.impls = previous


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _resolve(op: str, implementation, table: Container[str], kind, auto: Callable[[], str]) -> str:
    """The implementation of `op` to run: the argument, else the one in force; `auto` asks.
    table: the names it may be (a dict keyed by them, or the names alone)."""
    impl = implementation or getattr(current(), op)
    if impl == "auto":
        impl = auto()
    if impl not in table:
        raise ValueError(f"unknown {op} implementation {impl!r}; choose from {get_args(kind)}")
    return impl


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def attention_reference(q, k, v, *, scale: float | None = None):
    """Exact softmax attention in float32 (custom_calls' reference), returned in q's dtype.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, heads, head_dim].
    """
    return custom_calls.flash_attention_reference(q, k, v, scale=scale).astype(q.dtype)


def _attention_xla(q, k, v, *, scale, is_causal=False):
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=is_causal, implementation="xla"
    )


def cudnn_supports(q) -> str | None:
    """Why jax's cuDNN fused attention cannot run q's shape and dtype here, or None if it can.

    It takes fp16/bf16 only, head dims that are multiples of 8, up to 256 on Hopper and newer
    and up to 128 before (so SD1.x's head dim 160 needs Hopper).
    """
    if not on_gpu():
        return "it needs a GPU backend"
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        return f"it takes float16/bfloat16 only, not {q.dtype}"
    cc = getattr(jax.devices()[0], "compute_capability", "9.0")
    limit = 256 if float(cc) >= 9.0 else 128
    if q.shape[-1] % 8 or q.shape[-1] > limit:
        return f"head dim {q.shape[-1]} is not a multiple of 8 up to {limit} on compute capability {cc}"
    return None


def _attention_cudnn(q, k, v, *, scale, is_causal=False):
    why = cudnn_supports(q)
    if why:
        raise ValueError(f"attention implementation 'cudnn' cannot run {q.shape} {q.dtype}: {why}")
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=is_causal, implementation="cudnn"
    )


def _attention_flash(q, k, v, *, scale):
    return custom_calls.flash_attention(q, k, v, scale=scale)


def _not_hopper() -> str | None:
    """Why this backend cannot run our Hopper (Mosaic GPU) kernels, or None if it can."""
    if not on_gpu():
        return "it needs a GPU backend"
    cc = getattr(jax.devices()[0], "compute_capability", "")
    if cc != "9.0":
        return f"it needs a Hopper GPU (compute capability 9.0), not {cc or 'unknown'}"
    return None


def hopper_supports(q, k) -> str | None:
    """Why our Hopper kernel cannot run these inputs here, or None if it can."""
    return _not_hopper() or _hopper_supports_shapes(q.shape, k.shape, q.dtype)


def _require_hopper(q, k) -> None:
    if why := hopper_supports(q, k):
        raise ValueError(f"attention implementation 'flash_hopper' cannot run {q.shape}: {why}")


def _attention_flash_hopper(q, k, v, *, scale):
    _require_hopper(q, k)
    # the config passed in (not looked up inside the kernel's jit), so that a retrace under
    # `flash_attention_hopper.config_overrides` is not served from the jit's cache
    config = _hopper_tuned_config(q.shape, k.shape, q.dtype)
    return custom_calls.flash_attention_hopper(q, k, v, scale=scale, config=config)


def _attention_fused_softmax(q, k, v, *, scale):
    return custom_calls.fused_softmax_attention(q, k, v, scale=scale)


def _attention_cross(q, k, v, *, scale):
    """Our all-heads kernel for short key sets; flash_attention past its MAX_KEYS (logged)."""
    if why := _cross_supports(q.shape, k.shape):
        _fallback(f"attention cross->flash at Lk {k.shape[1]}", why)
        return custom_calls.flash_attention(q, k, v, scale=scale)
    return custom_calls.cross_attention(q, k, v, scale=scale)


def _auto_attention(q, k, v) -> str:
    """Per-shape choice. On CPU the Pallas kernels would run in interpret mode: never pick them."""
    if not on_gpu():
        return "xla"
    from sdjax import autotune

    # Unmeasured shapes: cuDNN's fused attention where it runs, else XLA.
    default = "xla" if cudnn_supports(q) else "cudnn"
    choice = autotune.choose("attention", q.shape, k.shape, q.dtype, default=default)
    if choice == "flash_hopper" and hopper_supports(q, k):  # a table measured on a Hopper GPU
        return "flash"
    return choice


def packed_self_attention_head_dim(shape, dtype) -> int | None:
    """The head dim to give `self_attention_packed` where it reads q, k and v straight from
    one fused projection, else None (`packed_self_attention_plan`'s head dim)."""
    plan = packed_self_attention_plan(shape, dtype)
    return plan[1] if plan else None


def packed_self_attention_plan(shape, dtype) -> tuple[str, int] | None:
    """(implementation, head dim) where the attention in force for a self-attention of `shape`
    [B, L, H, D] reads q, k and v straight from one fused projection qkv [B, L, 3, H, head
    dim], else None: our Hopper kernel (D padded to its tuned config's head_align; D itself
    where no padding is needed) or our Triton kernel (D). A model that knows it can project x
    once into qkv, with zero weight columns for any padding, and skip both the slicing copies
    of a fused projection and the kernel's padding copies (`sdjax.models.layers.Attention`
    does, passing the implementation on to `self_attention_packed`).
    """
    if d_pad := _hopper_head_dim(shape, shape, dtype):
        return "flash_hopper", d_pad
    q = jax.ShapeDtypeStruct(tuple(shape), dtype)
    impl = _resolve("attention", None, _ATTENTION, AttentionImpl, lambda: _auto_attention(q, q, q))
    if impl == "flash" and shape[-1] <= MAX_KERNEL_HEAD_DIM:
        return "flash", shape[-1]
    return None


def _hopper_head_dim(q_shape, kv_shape, dtype) -> int | None:
    """Where our Hopper kernel is the attention in force for these shapes and can run them:
    the head dim it works on (padded to its tuned config's head_align). Else None."""
    q = jax.ShapeDtypeStruct(tuple(q_shape), dtype)
    k = jax.ShapeDtypeStruct(tuple(kv_shape), dtype)
    impl = _resolve("attention", None, _ATTENTION, AttentionImpl, lambda: _auto_attention(q, k, k))
    if impl != "flash_hopper" or hopper_supports(q, k):
        return None
    config = _hopper_tuned_config(q.shape, k.shape, dtype)
    return _hopper_padded_head_dim(q_shape[-1], config.head_align)


def self_attention_packed(qkv, *, scale: float | None = None, implementation=None):
    """Self-attention of a fused projection: qkv [B, L, 3, H, D] -> [B, L, H, D].

    Our kernels read q, k and v from qkv in place (`flash_attention_hopper_qkv`,
    `flash_attention_qkv`); every other implementation gets the three slices through
    `attention`. scale defaults to 1/sqrt(D) (pass the unpadded head dim's where D carries
    zero padding)."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"self_attention_packed wants qkv [B, L, 3, H, D]; got {qkv.shape}")
    q = jax.ShapeDtypeStruct(qkv.shape[:2] + qkv.shape[3:], qkv.dtype)
    impl = _resolve(
        "attention", implementation, _ATTENTION, AttentionImpl, lambda: _auto_attention(q, q, q)
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl in _ATTENTION_PACKED and q.shape[-1] <= MAX_KERNEL_HEAD_DIM:
        return _ATTENTION_PACKED[impl](qkv, scale=scale)
    return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=scale, implementation=impl)


def _attention_flash_hopper_packed(qkv, *, scale):
    q = jax.ShapeDtypeStruct(qkv.shape[:2] + qkv.shape[3:], qkv.dtype)
    _require_hopper(q, q)
    config = _hopper_tuned_config(q.shape, q.shape, q.dtype)  # (see _attention_flash_hopper)
    return custom_calls.flash_attention_hopper_qkv(qkv, scale=scale, config=config)


def attention_head_padding(q_shape, kv_shape, dtype) -> int | None:
    """The padded head dim that the attention in force would copy its inputs to, else None.

    Our Hopper kernel zero-pads head dims that are not a multiple of its config's
    `head_align` (64 by default: SD's 40, 80, 160; 16 in the H100 table: 40 only) by copying
    q, k, v (see `custom_calls/flash_attention_hopper.py`). For self-attention a model avoids
    them through `packed_self_attention_head_dim` and `self_attention_packed`, as
    `sdjax.models.layers.Attention` does.
    """
    d_pad = _hopper_head_dim(q_shape, kv_shape, dtype)
    return d_pad if d_pad != q_shape[-1] else None


_ATTENTION: dict[str, Callable] = {
    "reference": lambda q, k, v, *, scale: attention_reference(q, k, v, scale=scale),
    "xla": _attention_xla,
    "cudnn": _attention_cudnn,
    "flash": _attention_flash,
    "flash_hopper": _attention_flash_hopper,
    "fused_softmax": _attention_fused_softmax,
    "cross": _attention_cross,
}


def _attention_flash_packed(qkv, *, scale):
    return custom_calls.flash_attention_qkv(qkv, scale=scale)


# Implementations with a packed-qkv entry (self_attention_packed); the others get slices.
_ATTENTION_PACKED: dict[str, Callable] = {
    "flash_hopper": _attention_flash_hopper_packed,
    "flash": _attention_flash_packed,
}


# Head dims above this go to XLA whatever the choice: our kernels and cuDNN stop at 256. In SD
# this is only the VAE's single-head mid-block attention (head dim 512), which runs once per
# image. The substitution is logged once and listed by `fallbacks()` for the run's record.
MAX_KERNEL_HEAD_DIM = MAX_HEAD_DIM
_FALLBACKS: dict[str, str] = {}


def fallbacks() -> dict[str, str]:
    """Every implementation substitution made so far in this process: {what: why}."""
    return dict(_FALLBACKS)


def _fallback(key: str, reason: str) -> None:
    if key not in _FALLBACKS:
        _FALLBACKS[key] = reason
        logger.warning("sdjax.ops fallback: %s (%s)", key, reason)


def attention(q, k, v, *, scale: float | None = None, implementation: AttentionImpl | None = None):
    """Softmax attention. q: [B, Lq, H, D]; k, v: [B, Lk, H, D] -> [B, Lq, H, D].

    With a kernel choice (flash, fused_softmax, cudnn) and a head dim above
    MAX_KERNEL_HEAD_DIM, this runs XLA instead, logged and recorded in `fallbacks()`.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention wants q [B,Lq,H,D], k=v [B,Lk,H,D]; got {q.shape=} {k.shape=} {v.shape=}"
        )
    impl = _resolve(
        "attention", implementation, _ATTENTION, AttentionImpl, lambda: _auto_attention(q, k, v)
    )
    if impl in ("flash", "flash_hopper", "fused_softmax", "cross", "cudnn") and (
        q.shape[-1] > MAX_KERNEL_HEAD_DIM
    ):
        _fallback(
            f"attention {impl}->xla at head_dim {q.shape[-1]}",
            f"{impl} supports head dims up to {MAX_KERNEL_HEAD_DIM}",
        )
        impl = "xla"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ATTENTION[impl](q, k, v, scale=scale)


def causal_attention_reference(q, k, v, *, scale: float):
    """Causal softmax attention in float32 (query i sees keys 0..i), returned in q's dtype.

    q, k, v: [batch, length, heads, head_dim] (self-attention: one length).
    """
    length = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


def _causal_without_kernel(impl: str):
    """Our kernels have no causal mask: XLA's causal attention, the substitution recorded."""

    def run(q, k, v, *, scale):
        _fallback(f"causal attention {impl}->xla", f"{impl} has no causal mask")
        return _attention_xla(q, k, v, scale=scale, is_causal=True)

    return run


_CAUSAL: dict[str, Callable] = {
    "reference": causal_attention_reference,
    "xla": functools.partial(_attention_xla, is_causal=True),
    "cudnn": functools.partial(_attention_cudnn, is_causal=True),
    **{k: _causal_without_kernel(k) for k in ("flash", "flash_hopper", "fused_softmax", "cross")},
}


def _auto_causal(q) -> str:
    """cuDNN's fused causal attention on GPU where it runs, else the fp32 reference (CPU,
    fp32). On the H100, SD1.5's text encoder (2 x 77 tokens, fp16) with cuDNN's: 170 kernels,
    0.51 ms of kernel time and 0.63 ms of wall per call back to back, against 206 kernels,
    0.64 and 1.16 ms with the reference's einsums, mask and fp32 softmax, and 254 kernels,
    0.65 and 2.77 ms with `jax.nn.dot_product_attention(implementation="xla")`
    (`experiments/results/README.md`, ninth session, call 1)."""
    return "cudnn" if on_gpu() and not cudnn_supports(q) else "reference"


def causal_attention(q, k, v, *, scale: float | None = None,
                     implementation: AttentionImpl | None = None):  # fmt: skip
    """Causal softmax self-attention (the text encoder's). q, k, v: [B, L, H, D] -> [B, L, H, D].

    Takes the `attention` implementation in force. Our kernels (flash, flash_hopper,
    fused_softmax) have no causal mask: they run XLA's, logged and listed in `fallbacks()`.
    """
    if q.ndim != 4 or not q.shape == k.shape == v.shape:
        raise ValueError(
            f"causal_attention wants q, k, v of one shape [B,L,H,D]; got {q.shape=} {k.shape=} "
            f"{v.shape=}"
        )
    impl = _resolve("attention", implementation, _CAUSAL, AttentionImpl, lambda: _auto_causal(q))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _CAUSAL[impl](q, k, v, scale=scale)


# --------------------------------------------------------------------------------------------
# GroupNorm (+ activation)
# --------------------------------------------------------------------------------------------


def apply_activation(x, activation: Activation):
    if activation is None:
        return x
    if activation == "silu":
        return jax.nn.silu(x)
    if activation == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {activation!r}; choose from {get_args(Activation)}")


# GroupNorm in float32 with corrected two-pass statistics, beside the kernel it checks.
group_norm_reference = custom_calls.group_norm_reference


def _group_norm_xla(x, scale, bias, *, groups, eps, activation):
    """Plain two-pass float32 statistics (no re-centring) and float32 normalization, written as
    XLA fuses it: the baseline the kernels are measured against."""
    n, c = x.shape[0], x.shape[-1]
    xg = x.reshape(n, -1, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True, dtype=jnp.float32)
    var = jnp.mean(jnp.square(xg.astype(jnp.float32) - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return apply_activation(y, activation).astype(x.dtype)


def group_norm_columns(x, scale, bias, *, groups=32, eps=1e-5, activation: Activation = None):
    """GroupNorm as XLA fuses it well: per-channel sums of x less each channel's first value in
    one column reduction, merged into groups (`_concat_statistics_xla`), then one element-wise
    pass with per-channel a, b (`_normalize_parts`). x [N, ..., C]; float32 statistics."""
    stats = _concat_statistics_xla((x,), groups)
    return _normalize_parts((x,), *stats, scale, bias, groups=groups, eps=eps,
                            activation=activation)  # fmt: skip


def group_norm_pallas_stats(x, scale, bias, *, groups=32, eps=1e-5,
                            activation: Activation = None):  # fmt: skip
    """GroupNorm from our statistics kernel (`custom_calls.group_statistics`, through
    `_concat_statistics_pallas`) and XLA's element-wise pass (`_normalize_parts`)."""
    stats = _concat_statistics_pallas((x,), groups)
    return _normalize_parts((x,), *stats, scale, bias, groups=groups, eps=eps,
                            activation=activation)  # fmt: skip


def _group_norm_pallas(x, scale, bias, *, groups, eps, activation):
    return custom_calls.group_norm(x, scale, bias, groups=groups, eps=eps, activation=activation)


def _pallas_group_norm_config(x, impl: str, groups: int):
    """Our GroupNorm kernel's config for "pallas" (the tuning table's) or "pallas_split" (its
    cooperative entries as the split plan)."""
    from custom_calls.group_norm import split_equivalent, tuned_config

    config = tuned_config(x.shape, x.dtype, groups=groups)
    return split_equivalent(config) if impl == "pallas_split" else config


def _group_norm_pallas_split(x, scale, bias, *, groups, eps, activation):
    config = _pallas_group_norm_config(x, "pallas_split", groups)
    return custom_calls.group_norm(x, scale, bias, groups=groups, eps=eps, activation=activation,
                                   config=config)  # fmt: skip


def _recorded(op: str, shape_a, shape_b, dtype) -> str:
    """`auto` for the norms and GEGLU: the recorded choice on GPU (else XLA); XLA on CPU, where
    the kernels would run in interpret mode."""
    if not on_gpu():
        return "xla"
    from sdjax import autotune

    return autotune.choose(op, shape_a, shape_b, dtype, default="xla")


def _auto_group_norm(x) -> str:
    return _recorded("group_norm", x.shape, None, x.dtype)


_GROUP_NORM: dict[str, Callable] = {
    "reference": group_norm_reference,
    "xla": _group_norm_xla,
    "columns": group_norm_columns,
    "pallas": _group_norm_pallas,
    "pallas_split": _group_norm_pallas_split,
    "pallas_stats": group_norm_pallas_stats,
}


def group_norm(
    x,
    scale,
    bias,
    *,
    groups: int = 32,
    eps: float = 1e-5,
    activation: Activation = None,
    implementation: GroupNormImpl | None = None,
):
    """GroupNorm (+ optional activation). x: [N, ..., C] channels-last; scale, bias: [C]."""
    if scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(
            f"group_norm: scale/bias must be [{x.shape[-1]}]; got {scale.shape}, {bias.shape}"
        )
    if x.shape[-1] % groups:
        raise ValueError(f"group_norm: channels {x.shape[-1]} not divisible by {groups=}")
    if activation not in get_args(Activation):
        raise ValueError(f"unknown activation {activation!r}; choose from {get_args(Activation)}")
    impl = _group_norm_choice(x, implementation)
    return _GROUP_NORM[impl](x, scale, bias, groups=groups, eps=eps, activation=activation)


class Planes(NamedTuple):
    """A 3x3 convolution's input x [N, H, W, C] laid out as our Hopper convolution reads it:
    `data` [N (H + 2) W, 3 C], the three column-shifted, zero-padded planes side by side in
    the channels (`custom_calls.conv3x3_hopper.input_planes`); `shape`, x's. Made by
    `group_norm_planes`, read by `conv3x3`."""

    data: jax.Array
    shape: tuple[int, int, int, int]

    @property
    def dtype(self):
        return self.data.dtype


def norm_writes_planes(x_shape, out_channels: int, dtype) -> bool:
    """Whether a GroupNorm of x [N, H, W, C] that feeds a 3x3 stride-1 convolution to
    `out_channels` should hand it planes (`group_norm_planes`): `conv_planes` in force says
    so, that convolution runs ours (`conv3x3` picks "pallas_hopper" for it) and the
    GroupNorm runs our kernel. Decided from shapes, at trace time."""
    impls = current()
    planes = impls.conv_planes
    if planes == "auto":
        planes = "group_norm" if on_gpu() else "xla"
    if planes != "group_norm" or len(x_shape) != 4:
        return False
    x = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
    kernel = jax.ShapeDtypeStruct((3, 3, x_shape[-1], out_channels), dtype)
    conv = _resolve("conv3x3", None, _CONV3X3, Conv3x3Impl, lambda: _auto_conv3x3(x, kernel))
    return conv == "pallas_hopper" and _group_norm_choice(x) in ("pallas", "pallas_split")


def _group_norm_choice(x, implementation: GroupNormImpl | None = None) -> str:
    """The GroupNorm implementation `group_norm` runs for x: the given one, else the one in
    force, "auto" resolved by `_auto_group_norm`."""
    return _resolve("group_norm", implementation, _GROUP_NORM, GroupNormImpl,
                    lambda: _auto_group_norm(x))  # fmt: skip


def group_norm_planes(x, scale, bias, *, groups: int = 32, eps: float = 1e-5,
                      activation: Activation = None) -> Planes:  # fmt: skip
    """`group_norm` (our kernel: the implementation in force, "pallas" or "pallas_split")
    of x [N, H, W, C], written as the input planes of the 3x3 convolution after it, which
    `conv3x3` reads as they are (`custom_calls.group_norm(planes=True)`). Where the
    GroupNorm kernel's plan cannot write them, XLA lays them out from its output."""
    if x.ndim != 4:
        raise ValueError(f"group_norm_planes wants x [N, H, W, C]; got {x.shape}")
    impl = _group_norm_choice(x)
    if impl not in ("pallas", "pallas_split"):
        raise ValueError(f"group_norm_planes needs our GroupNorm kernel; {impl!r} is in force")
    config = _pallas_group_norm_config(x, impl, groups)
    data = custom_calls.group_norm(x, scale, bias, groups=groups, eps=eps,
                                   activation=activation, config=config, planes=True)  # fmt: skip
    return Planes(data, tuple(x.shape))


def _concat_statistics_xla(parts, groups):
    """Per-group (mean, M2) [N, G] of the channel concatenation of `parts`, by XLA: per-channel
    sums shifted by each channel's first value (few digits lost to cancellation), merged."""
    sums, squares, shifts = [], [], []
    for x in parts:
        xf = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
        k = xf[:, :1]  # [N, 1, C]
        sums.append(jnp.sum(xf - k, axis=1))
        squares.append(jnp.sum(jnp.square(xf - k), axis=1))
        shifts.append(k[:, 0])
    s1, s2, k = (jnp.concatenate(a, axis=-1) for a in (sums, squares, shifts))  # [N, C]
    n, c = k.shape
    rows = math.prod(parts[0].shape[1:-1])
    s1, s2, k = (a.reshape(n, groups, c // groups) for a in (s1, s2, k))
    mean = jnp.sum(s1 + rows * k, axis=-1) / (rows * c // groups)
    d = mean[..., None] - k  # the group mean less each channel's shift
    m2 = jnp.sum(s2 - 2 * d * s1 + rows * d * d, axis=-1)
    return mean, jnp.maximum(m2, 0.0)


def _concat_statistics_pallas(parts, groups):
    """The same from our statistics kernel (`custom_calls.group_statistics`), each part taken
    at the finest grouping that no group of the concatenation straddles (a part of 640
    channels before one of 320, in 32 groups of 30: sub-groups of gcd(640, 320, 30) = 10),
    the sub-groups then merged by Chan's formula (equal counts)."""
    c = sum(x.shape[-1] for x in parts)
    cpg = c // groups
    sub = math.gcd(cpg, *(x.shape[-1] for x in parts))
    stats = [custom_calls.group_statistics(x, groups=x.shape[-1] // sub) for x in parts]
    means, m2s = (jnp.concatenate(a, axis=-1) for a in zip(*stats, strict=True))
    n, k = means.shape[0], cpg // sub
    means, m2s = means.reshape(n, groups, k), m2s.reshape(n, groups, k)
    mean = jnp.mean(means, axis=-1)
    rows = math.prod(parts[0].shape[1:-1])
    m2 = jnp.sum(m2s, axis=-1) + rows * sub * jnp.sum(jnp.square(means - mean[..., None]), -1)
    return mean, m2


def group_norm_concat(
    x1,
    x2,
    scale,
    bias,
    *,
    groups: int = 32,
    eps: float = 1e-5,
    activation: Activation = None,
    implementation: GroupNormImpl | None = None,
):
    """`group_norm(concatenate([x1, x2], -1), ...)` without writing the concatenation first.

    x1: [N, H, W, C1], x2: [N, H, W, C2]; scale, bias: [C1 + C2] -> [N, H, W, C1 + C2]. The
    statistics come from each part (groups may straddle the boundary); the normalization of
    both parts is one XLA fusion writing the concatenated output. "reference" is the plain
    form (concatenate, then `group_norm_reference`); "pallas" takes the statistics from our
    kernel, "xla" from XLA's reductions; "auto" is the recorded choice of `group_norm` at the
    concatenated shape.
    """
    if x1.shape[:-1] != x2.shape[:-1] or x1.dtype != x2.dtype:
        raise ValueError(
            f"group_norm_concat: parts must agree but in channels; got {x1.shape} {x1.dtype} "
            f"and {x2.shape} {x2.dtype}"
        )
    c = x1.shape[-1] + x2.shape[-1]
    if scale.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"group_norm_concat: scale/bias must be [{c}]; got {scale.shape}, "
                         f"{bias.shape}")  # fmt: skip
    if c % groups:
        raise ValueError(f"group_norm_concat: channels {c} not divisible by {groups=}")
    impl = _resolve(
        "group_norm",
        implementation,
        _GROUP_NORM,
        GroupNormImpl,
        lambda: _auto_group_norm(jax.ShapeDtypeStruct((*x1.shape[:-1], c), x1.dtype)),
    )
    if impl == "reference":
        x = jnp.concatenate([x1, x2], axis=-1)
        return group_norm_reference(x, scale, bias, groups=groups, eps=eps, activation=activation)
    statistics = _concat_statistics_pallas if impl == "pallas" else _concat_statistics_xla
    mean, m2 = statistics((x1, x2), groups)
    return _normalize_parts((x1, x2), mean, m2, scale, bias, groups=groups, eps=eps,
                            activation=activation)  # fmt: skip


def _normalize_parts(parts, mean, m2, scale, bias, *, groups, eps, activation):
    """act((x - mean_g) * a_c + b_c) of the channel concatenation of `parts` [N, ..., C_i],
    given its per-group mean and M2 [N, G], as one XLA fusion writing the concatenated output
    (a_c = scale_c * rstd_g, b_c = bias_c)."""
    c = sum(x.shape[-1] for x in parts)
    lead = parts[0].shape[:-1]
    rstd = jax.lax.rsqrt(m2 / (math.prod(lead[1:]) * (c // groups)) + eps)  # [N, G]
    n = lead[0]
    a = scale.astype(jnp.float32).reshape(groups, -1) * rstd[..., None]  # [N, G, C / G]
    bcast = (n,) + (1,) * (len(lead) - 1) + (c,)
    mean_c = jnp.broadcast_to(mean[..., None], a.shape).reshape(bcast)
    a = a.reshape(bcast)
    b = bias.astype(jnp.float32)
    outs, lo = [], 0
    for x in parts:
        hi = lo + x.shape[-1]
        y = (x.astype(jnp.float32) - mean_c[..., lo:hi]) * a[..., lo:hi] + b[lo:hi]
        outs.append(apply_activation(y, activation).astype(x.dtype))
        lo = hi
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


# --------------------------------------------------------------------------------------------
# GEGLU: the first half of the SD feed-forward
# --------------------------------------------------------------------------------------------


# hidden * gelu_erf(gate) in float32, beside the kernel it checks.
geglu_reference = custom_calls.geglu_reference


def _geglu_xla(x, w, b):
    h = jnp.einsum("...d,df->...f", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    h = h + b.astype(jnp.float32)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return (hidden * jax.nn.gelu(gate, approximate=False)).astype(x.dtype)


def _geglu_pallas(x, w, b):
    return custom_calls.geglu(x, w, b)


def geglu_hopper_supports(x, w) -> str | None:
    """Why our Hopper GEGLU kernel cannot run these inputs here, or None if it can."""
    from custom_calls.geglu_hopper import supports

    return _not_hopper() or supports(x.shape, w.shape, x.dtype)


def _geglu_pallas_hopper(x, w, b):
    if why := geglu_hopper_supports(x, w):
        raise ValueError(f"geglu implementation 'pallas_hopper' cannot run {x.shape}: {why}")
    return custom_calls.geglu_hopper(x, w, b)


def _auto_geglu(x, w) -> str:
    choice = _recorded("geglu", x.shape, w.shape, x.dtype)
    if choice == "pallas_hopper" and geglu_hopper_supports(x, w):
        return "pallas"  # recorded on a Hopper GPU; this one (or this shape) cannot run it
    return choice


_GEGLU: dict[str, Callable] = {
    "reference": geglu_reference,
    "xla": _geglu_xla,
    "pallas": _geglu_pallas,
    "pallas_hopper": _geglu_pallas_hopper,
}


def geglu(x, w, b, *, implementation: GegluImpl | None = None):
    """GEGLU projection. x: [..., D]; w: [D, 2F]; b: [2F] -> [..., F]."""
    if w.ndim != 2 or w.shape[0] != x.shape[-1] or w.shape[1] % 2 or b.shape != (w.shape[1],):
        raise ValueError(
            f"geglu wants x [..., D], w [D, 2F], b [2F]; got {x.shape=} {w.shape=} {b.shape=}"
        )
    impl = _resolve("geglu", implementation, _GEGLU, GegluImpl, lambda: _auto_geglu(x, w))
    return _GEGLU[impl](x, w, b)


# --------------------------------------------------------------------------------------------
# LayerNorm (the transformer blocks' three per block)
# --------------------------------------------------------------------------------------------


# float32 with corrected two-pass statistics, beside the kernel it checks.
layer_norm_reference = custom_calls.layer_norm_reference


def _layer_norm_xla(x, scale, bias, *, eps):
    """float32 statistics (mean, then the variance of the centred values), as XLA fuses it."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _layer_norm_pallas(x, scale, bias, *, eps):
    return custom_calls.layer_norm(x, scale, bias, eps=eps)


def _auto_layer_norm(x) -> str:
    return _recorded("layer_norm", x.shape, None, x.dtype)


_LAYER_NORM: dict[str, Callable] = {
    "reference": layer_norm_reference,
    "xla": _layer_norm_xla,
    "pallas": _layer_norm_pallas,
}


def layer_norm(x, scale, bias, *, eps: float = 1e-5, implementation: LayerNormImpl | None = None):
    """LayerNorm over the last axis. x: [..., C]; scale, bias: [C] -> x's shape and dtype."""
    if scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(
            f"layer_norm: scale/bias must be [{x.shape[-1]}]; got {scale.shape}, {bias.shape}"
        )
    impl = _resolve(
        "layer_norm", implementation, _LAYER_NORM, LayerNormImpl, lambda: _auto_layer_norm(x)
    )
    return _LAYER_NORM[impl](x, scale, bias, eps=eps)


# --------------------------------------------------------------------------------------------
# Nearest 2x upsampling followed by a 3x3 convolution
# --------------------------------------------------------------------------------------------

# Which of a 3x3 kernel's rows (or columns) feed each tap of an output phase's 2x2 kernel.
# Output row 2i + a of conv3x3(upsample(x)) reads upsampled rows 2i + a - 1 .. 2i + a + 1,
# which are input rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1): two distinct input rows,
# with kernel rows (0), (1 + 2) for a = 0 and (0 + 1), (2) for a = 1.
_PHASE_TAPS = (
    ((1, 0, 0), (0, 1, 1)),  # phase 0: input row i - 1 <- kernel row 0; row i <- rows 1 + 2
    ((1, 1, 0), (0, 0, 1)),  # phase 1: input row i <- kernel rows 0 + 1; row i + 1 <- row 2
)


def _conv(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def upsample_conv_reference(x, kernel, bias):
    """conv3x3(nearest_2x(x)) + bias, padding 1: x [N, H, W, I], kernel [3, 3, I, O] (HWIO),
    bias [O] -> [N, 2H, 2W, O] in x's dtype. The textbook order."""
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(up, kernel, ((1, 1), (1, 1))) + bias.astype(x.dtype)


def subpixel_kernel(kernel):
    """[3, 3, I, O] -> [2, 2, I, 4 * O] (float32): the four output phases' 2x2 kernels, the
    output channels ordered (row phase, column phase, O).

    Each phase tap is a sum of one, two or four of the kernel's taps, written as adds (one
    XLA fusion, bandwidth-bound): as an einsum against the 0/1 tap matrices XLA ran a float32
    matrix product of ~0.1 ms per 1280-channel upsampler, in every generation."""
    k = kernel.astype(jnp.float32)

    def tap_sum(terms, phase, tap):  # the terms (kernel rows or columns) a phase tap sums
        return sum(terms[j] for j in range(3) if _PHASE_TAPS[phase][tap][j])

    per_tap = []  # [t][u]: [I, a, b, O]
    for t in (0, 1):
        per_tap.append([])
        for u in (0, 1):
            rows = [tap_sum(k, a, t) for a in (0, 1)]  # [3 (kernel column), I, O] per a
            phases = [jnp.stack([tap_sum(rows[a], b, u) for b in (0, 1)], axis=1)
                      for a in (0, 1)]  # fmt: skip
            per_tap[t].append(jnp.stack(phases, axis=1))
    k = jnp.stack([jnp.stack(row) for row in per_tap])  # [t, u, I, a, b, O]
    return k.reshape(2, 2, kernel.shape[2], 4 * kernel.shape[3])


def upsample_conv_subpixel(x, kernel, bias, skip=None):
    """`upsample_conv_reference` without the upsampled map: one 2x2 convolution of x (padding
    1, so (H + 1) x (W + 1) positions) with the four phases' kernels, then the phases
    interleaved. 16 instead of 36 multiply-adds per output pixel and channel pair, and no
    4x-sized input to write and read. The phase kernels are summed in float32 and rounded
    once to x's dtype. With skip [N, 2H, 2W, S]: [upsampled, skip] along channels."""
    return upsample_conv_phases(x, subpixel_kernel(kernel), bias, skip)


# Nearest 2x then a 3-tap filter, per dimension, as a 4-tap filter over the input with zeros
# between its samples (lhs dilation 2, padding 2): output 2i reads x[i - 1] through kernel
# tap 0 and x[i] through taps 1 + 2; output 2i + 1 reads x[i] through taps 0 + 1 and x[i + 1]
# through tap 2. Row j of this matrix: which of the 3 taps sum into the 4-tap filter's tap j.
_TRANSPOSED_TAPS = ((1, 0, 0), (1, 1, 0), (0, 1, 1), (0, 0, 1))


def transposed_kernel(kernel):
    """[3, 3, I, O] -> [4, 4, I, O] (float32): `upsample_conv_transposed`'s kernel, each tap a
    sum of one, two or four of the 3x3 kernel's taps (written as adds, as `subpixel_kernel`),
    stored spatially flipped: the convolution reads it through a reverse, the form XLA's GPU
    compiler needs to see to give a dilated-input convolution to cuDNN's backward-data
    kernels (without it, XLA pads the 4x-sized dilated input and runs a forward convolution
    over it: 1.2-2.6x slower than the subpixel form, `bench_upsample_*_s19b`)."""
    k = kernel.astype(jnp.float32)

    def tap_sum(terms, j):
        return sum(terms[t] for t in range(3) if _TRANSPOSED_TAPS[j][t])

    rows = [tap_sum(k, j) for j in range(4)]  # [3 (kernel column), I, O] each
    taps = jnp.stack([jnp.stack([tap_sum(r, j) for j in range(4)]) for r in rows])
    return taps[::-1, ::-1]


def upsample_conv_transposed(x, kernel4, bias):
    """`upsample_conv_reference` as one convolution of x with zeros between its pixels
    (lhs dilation 2: a transposed convolution), which writes the upsampled map directly: no
    4x-sized input, and no phases to interleave after (the subpixel form's extra pass). 16 of
    64 taps meet a pixel of x per output pixel, as in the subpixel form. kernel4:
    `transposed_kernel`'s [4, 4, I, O] (flipped; any float dtype).

    On the H100 (`bench_upsample_*_s19c`, device kernel time) cuDNN's backward-data kernel
    takes about the phase convolution's time, but the bias then costs a pass of its own
    (XLA fuses biases into forward convolutions only): against the phases and our
    interleave kernel, 74 vs 88 us at the VAE's 64 -> 128, 245 vs 241 at 128 -> 256, 305
    vs 295 at 256 -> 512. Not taken by `auto`; a bias folded into the next GroupNorm's loads
    (and the next resnet's biases) would remove that pass."""
    y = jax.lax.conv_general_dilated(
        x, jax.lax.rev(kernel4.astype(x.dtype), (0, 1)), (1, 1), ((2, 2), (2, 2)),
        lhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    return y + bias.astype(x.dtype)


_INTERLEAVE = {
    "xla": custom_calls.subpixel_interleave_reference,
    "pallas": custom_calls.subpixel_interleave,
}


def _auto_interleave() -> str:
    """Our kernel on GPU: exact, 1.6-1.7x XLA's fusion at the VAE's upsamplers and within 2-4%
    of it at the UNet's (H100, `bench_upsample_interleave_*_s16a`)."""
    return "pallas" if on_gpu() else "xla"


def interleave_phases(y, bias, skip=None, *, implementation: InterleaveImpl | None = None):
    """The subpixel form's output from its phases: y [N, H + 1, W + 1, 4 * O] (the 2x2
    convolution's, channels (row phase, column phase, O)), bias [O], skip [N, 2H, 2W, S] or
    None -> [N, 2H, 2W, O (+ S)] in y's dtype (`custom_calls.subpixel`)."""
    impl = _resolve("interleave", implementation, _INTERLEAVE, InterleaveImpl, _auto_interleave)
    if skip is not None:
        skip = skip.astype(y.dtype)
    return _INTERLEAVE[impl](y, bias.astype(y.dtype), skip)


def upsample_conv_phases(x, phase_kernel, bias, skip=None):
    """`upsample_conv_subpixel` given its phase kernels (`subpixel_kernel`): [2, 2, I, 4 * O].
    A denoising loop builds them once per generation (the UNet's conditioning): XLA does not
    hoist them out of a loop by itself, as they are larger than the kernel. The interleave
    (and skip's concatenate) is `interleave_phases`, the implementation in force."""
    y = _conv(x, phase_kernel, ((1, 1), (1, 1)))  # [N, H + 1, W + 1, 4 * O]
    return interleave_phases(y, bias, skip)


def conv3x3_taps(x, kernel, bias, *, product_dtype=jnp.float32):
    """conv3x3(x) + bias (stride 1, padding 1) as matrix products against every tap at once
    and a shifted sum. x [N, H, W, I], kernel [3, 3, I, O] (HWIO), bias [O] -> [N, H, W, O]
    in x's dtype.

    z[t] = x @ kernel[t] for the nine taps t = (ky, kx), accumulated in float32 and stored in
    `product_dtype` (None: x's dtype, the "taps_half" implementation: half z's bytes, each
    tap's product rounded once before the float32 shifted sum, as the split-K forms round
    their partial sums); output pixel (h, w) is
    the sum over taps of z[t] at pixel (h + ky - 1, w + kx - 1). The kernel is read once,
    with the taps as a wide N (or a batch), where a convolution kernel's tiles at few output
    pixels leave it latency-bound (the UNet's 8x8 level), or with so few output channels that
    its tiles are mostly empty (conv_out). z is 9 * O / I times the input's size (in float32
    by default), so it pays only there (`taps_pays`).

    HWIO's taps are contiguous [I, O] blocks, so a large kernel is used in place, as a batch
    of nine products of the same x (XLA writes x nine times: small where the kernel is large);
    a small one is rearranged to [I, 9 O] for one product (XLA transposes it in every call:
    cheap where it is small, and XLA does not make the rearrangement free by choosing the
    parameter's layout)."""
    n, h, w, i = x.shape
    o = kernel.shape[-1]
    product_dtype = x.dtype if product_dtype is None else product_dtype
    taps = kernel.astype(x.dtype).reshape(9, i, o)  # [(ky, kx), I, O]: a bitcast of HWIO
    xm = x.reshape(n * h * w, i)
    if 9 * xm.size <= 2 * taps.size:  # nine copies of x cost less than moving the kernel
        xb = jnp.broadcast_to(xm[None], (9, *xm.shape))
        z = jax.lax.dot_general(xb, taps, (((2,), (1,)), ((0,), (0,))),
                                preferred_element_type=product_dtype)  # fmt: skip
        z = jnp.moveaxis(z.reshape(3, 3, n, h, w, o), (0, 1), (3, 4))  # [N, H, W, 3, 3, O]
    else:
        z = jnp.einsum("mi,tio->mto", xm, taps, preferred_element_type=product_dtype)
        z = z.reshape(n, h, w, 3, 3, o)
    z = jnp.pad(z.astype(jnp.float32), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
    y = sum(z[:, ky : ky + h, kx : kx + w, ky, kx] for ky in range(3) for kx in range(3))
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def split_k_kernel(kernel, splits: int):
    """A 3x3 kernel [3, 3, I, O] (HWIO) as the grouped kernel [3, 3, I / splits, splits * O] of
    `conv3x3_split_k`: output block s (columns s * O ... (s + 1) * O) reads input channels
    s * I / splits ... (s + 1) * I / splits."""
    kh, kw, i, o = kernel.shape
    if splits < 1 or i % splits:
        raise ValueError(f"split_k_kernel: {i} input channels do not split in {splits}")
    k = kernel.reshape(kh, kw, splits, i // splits, o)
    return jnp.moveaxis(k, 2, 3).reshape(kh, kw, i // splits, splits * o)


def conv3x3_split_k(x, grouped_kernel, bias, *, splits: int, dimension_numbers=("NHWC", "HWIO",
                    "NHWC"), partial_dtype=None):  # fmt: skip
    """conv3x3(x) + bias with the reduction over input channels split in `splits` parts that
    run as one grouped convolution (feature_group_count = splits: `splits` times as many
    output tiles as the plain convolution, for levels where its tiles leave SMs idle), then
    summed. grouped_kernel: `split_k_kernel`'s [3, 3, I / splits, splits * O] in
    `dimension_numbers`' kernel layout; the partial sums are in `partial_dtype` (default x's).

    Measured 1.6-3.2x *slower* than the plain convolution on the H100 at every SD1.5 UNet
    level (`bench_conv_*_s18a`: cuDNN slices the groups' input channels in a kernel of its
    own, then runs one implicit GEMM longer than the whole ungrouped conv; results README,
    item 186). Kept as `bench_conv`'s split forms; the model does not use it."""
    n, h, w, _ = x.shape
    y = jax.lax.conv_general_dilated(
        x, grouped_kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dimension_numbers,
        feature_group_count=splits, preferred_element_type=partial_dtype,
    )  # fmt: skip
    y = y.reshape(n, h, w, splits, -1).astype(jnp.float32).sum(axis=3)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def conv3x3_reference(x, kernel, bias):
    """conv3x3(x) + bias, stride 1, padding 1: x [N, H, W, I], kernel [3, 3, I, O] (HWIO),
    bias [O] -> [N, H, W, O] in x's dtype. XLA's convolution (cuDNN on GPU)."""
    return _conv(x, kernel, ((1, 1), (1, 1))) + bias.astype(x.dtype)


def taps_pays(x_shape, kernel_shape) -> bool:
    """Where `conv3x3_taps` beat cuDNN on the H100 (`bench_conv_*_s7*`, fp16, device kernel
    time, the kernel read as the parameter is): weight-bound convs, whose float32 tap products
    z are at most a quarter of the kernel's bytes (the UNet's 8x8 level; at 16x16, z is 0.4
    to 0.8 of the kernel and the gain is within 10% or negative), and convs to at most 4
    channels (UNet conv_out 3.5x, where cuDNN ran eight kernels for 0.19 GFLOP; VAE conv_out
    1.46x)."""
    n, h, w, i = x_shape
    o = kernel_shape[-1]
    z_bytes = n * h * w * 9 * o * 4
    kernel_bytes = 9 * i * o * 2
    return 4 * z_bytes <= kernel_bytes or o <= 4


def conv3x3_hopper_supports(x, kernel) -> str | None:
    """Why our Hopper convolution cannot run these inputs here, or None if it can."""
    from custom_calls.conv3x3_hopper import supports

    return _not_hopper() or supports(x.shape, kernel.shape, x.dtype)


def hopper_conv_pays(x_shape) -> bool:
    """Where our Hopper convolution beat cuDNN as a whole form (planes, kernel and partial sums;
    H100, fp16, batch 2, device kernel time, `bench_conv_*_s22c`; bf16 taken alike, tested
    but not timed): SD1.5's 16x16 level, 32.2
    against 33.2 us at 1280 -> 1280, 55.9 / 57.5 at 2560 -> 1280, 43.9 / 46.2 at 1920 -> 1280;
    in the UNet's step (`profile_*_s22e_*`) the level's ten convolutions took 0.076 ms less,
    0.035 ms less with the planes' and sums' passes. At 32x32 its kernel is ahead too (28.0
    against 33.0 us at 640 -> 640) but the planes' pass (4.5 us) puts the whole behind; at
    64x64 the kernel itself is behind."""
    return x_shape[1] * x_shape[2] == 16 * 16


def _conv3x3_pallas_hopper(x, kernel, bias):
    if why := conv3x3_hopper_supports(x, kernel):
        raise ValueError(f"conv3x3 implementation 'pallas_hopper' cannot run {x.shape}: {why}")
    return custom_calls.conv3x3_hopper(x, kernel, bias)


def taps_half_pays(kernel_shape) -> bool:
    """Where the taps form keeps its tap products in x's dtype ("taps_half"): the weight-bound
    convs with many output channels (the UNet's 8x8 level), where float32 z is a sixth of the
    bytes the product moves; not the convs to at most 4 channels (conv_out), whose float32 z
    is small and whose outputs are the model's."""
    return kernel_shape[-1] > 4


def _auto_conv3x3(x, kernel) -> str:
    if hopper_conv_pays(x.shape) and not conv3x3_hopper_supports(x, kernel):
        return "pallas_hopper"
    if on_gpu() and taps_pays(x.shape, kernel.shape):
        return "taps_half" if taps_half_pays(kernel.shape) else "taps"
    return "reference"


_CONV3X3 = {
    "reference": conv3x3_reference,
    "taps": conv3x3_taps,
    "taps_half": functools.partial(conv3x3_taps, product_dtype=None),
    "pallas_hopper": _conv3x3_pallas_hopper,
}


def conv3x3(x, kernel, bias, *, implementation: Conv3x3Impl | None = None):
    """conv3x3(x) + bias, stride 1, padding 1. x: [N, H, W, I], or its `Planes` (our Hopper
    convolution then runs on them); kernel: [3, 3, I, O] (HWIO); bias: [O] (any float dtype)
    -> [N, H, W, O] in x's dtype."""
    if isinstance(x, Planes):  # laid out for our convolution: it runs them
        if implementation not in (None, "auto", "pallas_hopper"):
            raise ValueError(f"conv3x3: planes are our Hopper convolution's input, not "
                             f"{implementation!r}'s")  # fmt: skip
        if kernel.shape[:3] != (3, 3, x.shape[-1]) or bias.shape != kernel.shape[-1:]:
            raise ValueError(
                f"conv3x3: want kernel [3, 3, {x.shape[-1]}, O] and bias [O] for planes of "
                f"{x.shape}; got {kernel.shape}, {bias.shape}"
            )
        from custom_calls.conv3x3_hopper import conv3x3_hopper_planes

        return conv3x3_hopper_planes(x.data, kernel, bias, x_shape=x.shape)
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]) or bias.shape != kernel.shape[-1:]:
        raise ValueError(
            f"conv3x3: want x [N, H, W, I], kernel [3, 3, I, O], bias [O]; got {x.shape}, "
            f"{kernel.shape}, {bias.shape}"
        )
    impl = _resolve("conv3x3", implementation, _CONV3X3, Conv3x3Impl,
                    lambda: _auto_conv3x3(x, kernel))  # fmt: skip
    return _CONV3X3[impl](x, kernel, bias)


def conv1x1_reference(x, kernel, bias):
    """x @ kernel + bias per pixel: x [N, H, W, I], kernel [1, 1, I, O] (HWIO), bias [O] ->
    [N, H, W, O] in x's dtype. XLA's convolution (cuDNN on GPU)."""
    return _conv(x, kernel, ((0, 0), (0, 0))) + bias.astype(x.dtype)


def conv1x1_dot(x, kernel, bias):
    """`conv1x1_reference` as one matrix product of the pixels' rows [N H W, I] @ [I, O]
    (cuBLAS on GPU; a free reshape either side in NHWC), accumulated in float32 as XLA's
    convolution is, with the bias (and, where the model adds one next, the residual) left for
    XLA to fuse into the product's epilogue."""
    n, h, w, i = x.shape
    y = jnp.dot(x.reshape(n * h * w, i), kernel.reshape(i, -1).astype(x.dtype))
    return (y + bias.astype(x.dtype)).reshape(n, h, w, -1)


_CONV1X1 = {"reference": conv1x1_reference, "dot": conv1x1_dot}


def _auto_conv1x1() -> str:
    """The matrix product on GPU; XLA's convolution elsewhere (on CPU both are XLA's own
    loops, and the reference is what the CPU tests have always run)."""
    return "dot" if on_gpu() else "reference"


def conv1x1_choice(implementation: Conv1x1Impl | None = None) -> str:
    """The form `conv1x1` runs: "reference" or "dot" (the given implementation, else the one
    in force; "auto" resolved by `_auto_conv1x1`)."""
    return _resolve("conv1x1", implementation, _CONV1X1, Conv1x1Impl, _auto_conv1x1)


# the forms (`Attention.packed_weights` makes them)
_QKV_PROJECTION = ("dot", "dot_bias", "dot_batched")
# "dot_batched" applies from this many tokens a sample: SD1.5's 64x64 level (4096), the only
# one whose fused QKV product got cuBLAS's kernel with a memset before it (s25b). Elsewhere the
# broadcast weights would cost memory (batch - 1 copies per image) for no measured reason.
BATCHED_QKV_MIN_TOKENS = 4096


def _auto_qkv_projection() -> str:
    """The plain product: "dot_bias" measured slower (s26a), "dot_batched" no faster (s26b)."""
    return "dot"


def qkv_projection_choice(implementation: QkvProjectionImpl | None = None) -> str:
    """The form of the self-attention's fused q, k, v projection where the projections have
    no bias: "dot", "dot_bias" or "dot_batched" (the given implementation, else the one in
    force; "auto" resolved by `_auto_qkv_projection`). Read by `Attention.packed_weights`."""
    return _resolve("qkv_projection", implementation, _QKV_PROJECTION, QkvProjectionImpl,
                    _auto_qkv_projection)  # fmt: skip


def qkv_projection_batched(batch: int, tokens: int) -> bool:
    """Whether the fused q, k, v product of `batch` samples of `tokens` tokens runs batched,
    one product per sample against the broadcast weights (the "dot_batched" form in force,
    several samples, and at least `BATCHED_QKV_MIN_TOKENS` tokens)."""
    return (
        qkv_projection_choice() == "dot_batched" and batch > 1 and tokens >= BATCHED_QKV_MIN_TOKENS
    )


def conv1x1(x, kernel, bias, *, implementation: Conv1x1Impl | None = None):
    """A 1x1 stride-1 convolution, x [N, H, W, I] -> [N, H, W, O] in x's dtype; kernel
    [1, 1, I, O] (HWIO); bias [O] (any float dtype)."""
    if x.ndim != 4 or kernel.shape[:3] != (1, 1, x.shape[-1]) or bias.shape != kernel.shape[-1:]:
        raise ValueError(
            f"conv1x1: want x [N, H, W, I], kernel [1, 1, I, O], bias [O]; got {x.shape}, "
            f"{kernel.shape}, {bias.shape}"
        )
    return _CONV1X1[conv1x1_choice(implementation)](x, kernel, bias)


def _upsample_conv_transposed_3x3(x, kernel, bias):
    return upsample_conv_transposed(x, transposed_kernel(kernel), bias)


_UPSAMPLE_CONV = {"reference": upsample_conv_reference, "subpixel": upsample_conv_subpixel,
                  "transposed": _upsample_conv_transposed_3x3}  # fmt: skip


def subpixel_pays(height: int, width: int) -> bool:
    """Where the subpixel form beat the textbook order on the H100 (fp16): from 16x16 inputs
    up (`bench_upsample_*_s6`, phases given: UNet 16->32 1.08x, 32->64 1.49x, the VAE's
    1.27-1.72x; in the denoising loop, `profile_*_loop_*_s7g`: 91 -> 56 and 111 -> 56 us),
    not at the UNet's 8x8 (0.78x alone, even in the loop)."""
    return height * width >= 256


def _auto_upsample_conv(x_shape) -> str:
    """The transposed form is never chosen: it trades the interleave pass for a bias pass
    (XLA fuses a bias into cuDNN's forward convolutions only), level with the subpixel form
    at the VAE's upsamplers and slower at the UNet's (`bench_upsample_*_s19c`)."""
    return "subpixel" if on_gpu() and subpixel_pays(*x_shape[1:3]) else "reference"


def upsample_conv_choice(x_shape, implementation: UpsampleConvImpl | None = None) -> str:
    """The form `upsample_conv` runs for x [N, H, W, C]: "reference", "subpixel" or
    "transposed" (the given implementation, else the one in force; "auto" resolved by
    `subpixel_pays` on GPU)."""
    return _resolve("upsample_conv", implementation, _UPSAMPLE_CONV, UpsampleConvImpl,
                    lambda: _auto_upsample_conv(x_shape))  # fmt: skip


def upsample_conv(
    x, kernel, bias, *, skip=None, implementation: UpsampleConvImpl | None = None
):  # fmt: skip
    """conv3x3(nearest_2x(x)) + bias (padding 1). x: [N, H, W, I]; kernel: [3, 3, I, O];
    bias: [O] -> [N, 2H, 2W, O] in x's dtype. With skip [N, 2H, 2W, S] -> [N, 2H, 2W, O + S]:
    [upsampled, skip] along channels (the UNet's next skip connection, which the subpixel
    form's interleave writes in the same pass)."""
    if kernel.shape[:3] != (3, 3, x.shape[-1]) or bias.shape != (kernel.shape[-1],):
        raise ValueError(
            f"upsample_conv: kernel must be [3, 3, {x.shape[-1]}, O] and bias [O]; got "
            f"{kernel.shape}, {bias.shape}"
        )
    n, h, w, _ = x.shape
    if skip is not None and (skip.ndim != 4 or skip.shape[:3] != (n, 2 * h, 2 * w)):
        raise ValueError(f"upsample_conv: skip must be [{n}, {2 * h}, {2 * w}, S]; got "
                         f"{skip.shape}")  # fmt: skip
    choice = upsample_conv_choice(x.shape, implementation)
    if choice == "subpixel":
        return upsample_conv_subpixel(x, kernel, bias, skip)
    out = _UPSAMPLE_CONV[choice](x, kernel, bias)
    return out if skip is None else jnp.concatenate([out, skip.astype(out.dtype)], axis=-1)
