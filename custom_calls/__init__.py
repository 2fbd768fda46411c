"""Pallas GPU kernels for Stable Diffusion's hot ops.

Each kernel module holds one public function (the attention modules also their packed forms,
`flash_attention_qkv` and `flash_attention_hopper_qkv`, for a fused q/k/v projection), its pure-jnp reference (or,
for the Hopper variants, its Triton sibling's), and a frozen config of block sizes. Off GPU the kernels run through Pallas interpret mode (for tests, not speed).
"""

from custom_calls.conv3x3_hopper import conv3x3_hopper
from custom_calls.cross_attention import cross_attention
from custom_calls.flash_attention import (
    flash_attention,
    flash_attention_qkv,
    flash_attention_reference,
)
from custom_calls.flash_attention_hopper import flash_attention_hopper, flash_attention_hopper_qkv
from custom_calls.fused_softmax import fused_softmax_attention, fused_softmax_attention_reference
from custom_calls.geglu import geglu, geglu_elementwise, geglu_reference
from custom_calls.geglu_hopper import geglu_hopper
from custom_calls.group_norm import (
    group_norm,
    group_norm_reference,
    group_statistics,
    group_statistics_reference,
)
from custom_calls.layer_norm import layer_norm, layer_norm_reference
from custom_calls.subpixel import subpixel_interleave, subpixel_interleave_reference

__all__ = [
    "conv3x3_hopper",
    "cross_attention",
    "flash_attention",
    "flash_attention_hopper",
    "flash_attention_hopper_qkv",
    "flash_attention_qkv",
    "flash_attention_reference",
    "fused_softmax_attention",
    "fused_softmax_attention_reference",
    "geglu",
    "geglu_elementwise",
    "geglu_hopper",
    "geglu_reference",
    "group_norm",
    "group_norm_reference",
    "group_statistics",
    "group_statistics_reference",
    "layer_norm",
    "layer_norm_reference",
    "subpixel_interleave",
    "subpixel_interleave_reference",
]
