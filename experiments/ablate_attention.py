"""Where the Hopper attention kernel's time goes: variants that leave one stage out (GPU).

    PYTHONPATH=. python experiments/ablate_attention.py [--shapes=sd15_self_64,sd15_self_32]

Nsight Compute found the kernel at SD1.5's 64x64 self-attention latency-bound (tensor pipe
37%, issue slots 39%, one CTA per SM; `experiments/results/README.md`, call 1 of the eighth
session) without saying which stage waits. Here each variant is the kernel with stages left out
(`flash_attention_hopper._ABLATE`: max, exp, sum, rescale, pv, pingpong; wrong results,
timing only) or with a correct alternative (`tree_reduce`, `half_exp`, `mma_row_sum`, `overlap_qk`,
three `consumers`, `poly_exp`, `lazy_sum`, `split_exp`), timed by device kernel
time (`experiments.common.kernel_us`: distinct inputs, none served from L2). The difference to
the full kernel is what a stage costs on the critical path. Correct variants are checked
against the float32 reference.

Writes ablate_attention_<device>_<dtype>_<date>.json and .md to results_dir().
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from custom_calls.flash_attention import flash_attention_reference
from experiments import common

fah = importlib.import_module("custom_calls.flash_attention_hopper")

# name: (batch, length, heads, head_dim): SD1.5's packed self-attentions at 512x512.
SHAPES = {"sd15_self_64": (2, 4096, 8, 40), "sd15_self_32": (2, 1024, 8, 80),
          # SD2.1's at 768x768 (heads of 64: no padding)
          "sd21_self_96": (2, 9216, 5, 64), "sd21_self_48": (2, 2304, 10, 64)}
DEFAULT_SHAPES = ("sd15_self_64", "sd15_self_32")
FP32_EXP = {"half_exp": False, "half_sum": False}
# name: (config changes, stages left out)
VARIANTS = {
    "full": ({}, ()),
    "tree_reduce": ({"tree_reduce": True}, ()),
    "half_exp": ({"half_exp": True}, ()),
    "tree_reduce+half_exp": ({"tree_reduce": True, "half_exp": True}, ()),
    "mma_row_sum": ({"mma_row_sum": True}, ()),
    "mma_row_sum+half_exp": ({"mma_row_sum": True, "half_exp": True}, ()),
    "mma_row_sum+no_pingpong": ({"mma_row_sum": True, "pingpong": False}, ()),
    "q64_no_pingpong": ({"block_q": 64, "pingpong": False}, ()),
    "overlap_q64": ({"block_q": 64, "pingpong": False, "overlap_qk": True}, ()),
    "overlap_q64_kv64": ({"block_q": 64, "block_kv": 64, "pingpong": False, "overlap_qk": True},
                         ()),  # fmt: skip
    "overlap_q128_kv64": ({"block_q": 128, "block_kv": 64, "pingpong": False, "overlap_qk": True},
                          ()),  # fmt: skip
    "overlap_q64+mma_row_sum": ({"block_q": 64, "pingpong": False, "overlap_qk": True,
                                 "mma_row_sum": True}, ()),  # fmt: skip
    "overlap_q64+half_exp": ({"block_q": 64, "pingpong": False, "overlap_qk": True,
                              "half_exp": True}, ()),  # fmt: skip
    "overlap_q64+fp32_exp": ({"block_q": 64, "pingpong": False, "overlap_qk": True,
                              "half_exp": False}, ()),  # fmt: skip
    "pin_softmax": ({"pin_softmax": True}, ()),
    "pin_softmax+half_exp": ({"pin_softmax": True, "half_exp": True}, ()),
    # three consumers (block_q 64 each, no ping-pong): softmaxes sharing a scheduler
    "c3_kv128": ({"consumers": 3, "block_q": 64, "block_kv": 128, "pingpong": False}, ()),
    "c3_kv128_s2": ({"consumers": 3, "block_q": 64, "block_kv": 128, "stages": 2,
                     "pingpong": False}, ()),  # fmt: skip
    "c3_kv64": ({"consumers": 3, "block_q": 64, "block_kv": 64, "pingpong": False}, ()),
    "c3_kv128+mma_row_sum": ({"consumers": 3, "block_q": 64, "block_kv": 128,
                              "pingpong": False, "mma_row_sum": True}, ()),  # fmt: skip
    "c3_kv128+half_exp": ({"consumers": 3, "block_q": 64, "block_kv": 128, "pingpong": False,
                           "half_exp": True}, ()),  # fmt: skip
    "c3_kv128_no_exp": ({"consumers": 3, "block_q": 64, "block_kv": 128, "pingpong": False},
                        ("exp",)),  # fmt: skip
    # a share of the exponentials on the FMA pipe (one register pair in N); lazy row sums.
    # Both take fp32 exponentials: `fp32_exp` is their baseline where the tuned config has
    # fp16 ones.
    "fp32_exp": ({**FP32_EXP}, ()),
    "poly8": ({**FP32_EXP, "poly_exp": 8}, ()),
    "poly4": ({**FP32_EXP, "poly_exp": 4}, ()),
    "poly3": ({**FP32_EXP, "poly_exp": 3}, ()),
    "poly2": ({**FP32_EXP, "poly_exp": 2}, ()),
    "lazy_sum": ({**FP32_EXP, "lazy_sum": True}, ()),
    "poly4+lazy_sum": ({**FP32_EXP, "poly_exp": 4, "lazy_sum": True}, ()),
    "poly3+lazy_sum": ({**FP32_EXP, "poly_exp": 3, "lazy_sum": True}, ()),
    "lazy_sum+tree_reduce": ({**FP32_EXP, "lazy_sum": True, "tree_reduce": True}, ()),
    "lazy_sum+pin_softmax": ({**FP32_EXP, "lazy_sum": True, "pin_softmax": True}, ()),
    "lazy_sum+stages2": ({**FP32_EXP, "lazy_sum": True, "stages": 2}, ()),
    # the logits pinned before the exponentials (item 161); on top of the tuned config
    "split_exp": ({"split_exp": True}, ()),
    "split_exp+pin_softmax": ({"split_exp": True, "pin_softmax": True}, ()),
    "lazy_sum+split_exp": ({**FP32_EXP, "lazy_sum": True, "split_exp": True}, ()),
    "full_again": ({}, ()),  # the same kernel, timed again: the run's spread
    "no_max": ({}, ("max",)),
    "no_exp": ({}, ("exp",)),
    "no_sum": ({}, ("sum",)),
    "no_rescale": ({}, ("rescale",)),
    "no_pv": ({}, ("pv",)),
    "no_pingpong": ({}, ("pingpong",)),
    "no_softmax": ({}, ("max", "exp", "sum", "rescale")),
    "matmuls_only": ({}, ("max", "exp", "sum", "rescale", "pingpong")),
}
TOLERANCE = 2e-3  # fp16 attention against its fp32 reference (relative L2)

_SHAPES = flags.DEFINE_list("shapes", list(DEFAULT_SHAPES), f"shape names, of {list(SHAPES)}")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "variant names")


def _packed(rng, batch, length, heads, head_dim, d_pad):
    qkv = rng.standard_normal((batch, length, 3, heads, head_dim)).astype(np.float16)
    return jnp.asarray(np.pad(qkv, ((0, 0),) * 4 + ((0, d_pad - head_dim),)))


def run_variant(qkv, head_dim, config, ablate):
    """The kernel traced now with `ablate` in force (the un-jitted entry point, so that no jit
    cache replays another variant's trace)."""
    fah._ABLATE = frozenset(ablate)
    try:
        fn = jax.jit(
            lambda x: fah.flash_attention_hopper_qkv.__wrapped__(
                x, scale=head_dim**-0.5, config=config, interpret=False
            )
        )
        out = jax.block_until_ready(fn(qkv))
        us = common.kernel_us(fn, qkv)["us"]
    finally:
        fah._ABLATE = frozenset()
    return out, us


def main(argv):
    del argv
    rng = np.random.default_rng(5)
    rows = []
    for name in common.known_names(_SHAPES.value, SHAPES):
        batch, length, heads, head_dim = SHAPES[name]
        base = fah.tuned_config((batch, length, heads, head_dim), (batch, length), jnp.float16)
        d_pad = fah.padded_head_dim(head_dim, base.head_align)
        qkv = _packed(rng, batch, length, heads, head_dim, d_pad)
        q, k, v = (qkv[:, :, i, :, :head_dim] for i in range(3))
        ref = jax.jit(flash_attention_reference)(q, k, v)
        full_us = None
        for variant in common.known_names(_VARIANTS.value, VARIANTS, what="variants"):
            changes, ablate = VARIANTS[variant]
            config = dataclasses.replace(base, **changes)
            row = {"shape": name, "variant": variant, "config": str(config)}
            try:
                out, row["kernel_us"] = run_variant(qkv, head_dim, config, ablate)
                if not ablate:
                    row["err"] = common.relative_error(out[..., :head_dim], ref)
                    row["ok"] = bool(row["err"] < TOLERANCE)
                if variant == "full":
                    full_us = row["kernel_us"]
                if full_us:
                    row["vs_full_us"] = row["kernel_us"] - full_us
            except Exception as e:  # a variant that does not compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            common.print_row(row)
    table = common.write_bench(
        "ablate_attention",
        jnp.float16,
        {"shapes": {n: SHAPES[n] for n in _SHAPES.value}},
        rows,
        ["shape", "variant", "kernel_us", "vs_full_us", "err", "ok", "error"],
        "The Hopper attention kernel with stages left out (device kernel time, us per call)",
    )
    print(table)
    wrong = [r for r in rows if r.get("ok") is False]
    if wrong:
        raise SystemExit(f"correct variants with wrong results: {[r['variant'] for r in wrong]}")


if __name__ == "__main__":
    app.run(main)
