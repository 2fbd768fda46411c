"""Runs chosen kernels once each, at SD1.5's shapes, for Nsight Compute to profile (GPU).

    ncu --clock-control none --kernel-name regex:sdjax_ --section SpeedOfLight ... \\
        python3 experiments/ncu_probe.py --ops=attention_64,group_norm_64x320,geglu_16

`experiments/gpu_session.sh ncu` runs it under ncu with the sections that answer "what bounds
this kernel" (speed of light, warp stall reasons, pipe utilization, memory, occupancy) and
writes the report as text. Each op is compiled, run once and waited for, so that every
profiled launch is a steady-state launch of the op (compilation launches none of our kernels).
Inputs are fresh normal draws, never zeros. The output is checked against the op's reference
so that a profile of a wrong kernel does not pass unnoticed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import custom_calls
from experiments import common


def _attention(length, heads, head_dim, padded, **changes):
    """The UNet's packed self-attention: qkv [2, L, 3, H, padded] (zero-padded heads), with
    the tuned config, or that config with `changes`."""

    def make(rng):
        qkv = rng.standard_normal((2, length, 3, heads, head_dim)).astype(np.float16)
        qkv = np.pad(qkv, ((0, 0),) * 4 + ((0, padded - head_dim),))
        return (jnp.asarray(qkv),)

    def run(qkv):  # the UNet passes the unpadded head's scale, as here
        config = None
        if changes:
            fah = importlib.import_module("custom_calls.flash_attention_hopper")
            shape = (2, length, heads, padded)
            config = dataclasses.replace(fah.tuned_config(shape, shape, qkv.dtype), **changes)
        return custom_calls.flash_attention_hopper_qkv(qkv, scale=head_dim**-0.5, config=config)

    def reference(qkv):
        q, k, v = (qkv[:, :, i, :, :head_dim] for i in range(3))
        return custom_calls.flash_attention_reference(q, k, v)

    return make, run, lambda out, qkv: (out[..., :head_dim], reference(qkv))


def _cross(length, heads, head_dim, kernel):
    """A cross-attention to the prompt's 77 keys: q [2, L, H, D], k = v [2, 77, H, D], by
    `custom_calls.<kernel>` with its config in force (the table's)."""

    def make(rng):
        q = rng.standard_normal((2, length, heads, head_dim)).astype(np.float16)
        k, v = (rng.standard_normal((2, 77, heads, head_dim)).astype(np.float16) for _ in "kv")
        return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)

    def check(out, q, k, v):
        return out, custom_calls.flash_attention_reference(q, k, v)

    return make, getattr(custom_calls, kernel), check


def _group_norm(side, channels, activation):
    def make(rng):
        x = rng.standard_normal((2, side, side, channels)).astype(np.float16)
        scale = 1 + 0.1 * rng.standard_normal(channels).astype(np.float32)
        bias = 0.1 * rng.standard_normal(channels).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)

    def run(x, scale, bias):
        return custom_calls.group_norm(x, scale, bias, activation=activation)

    def check(out, x, scale, bias):
        return out, custom_calls.group_norm_reference(x, scale, bias, activation=activation)

    return make, run, check


def _geglu(m, d, f, hopper, config=None):
    def make(rng):
        x = rng.standard_normal((m, d)).astype(np.float16)
        w = (0.05 * rng.standard_normal((d, 2 * f))).astype(np.float16)
        b = rng.standard_normal(2 * f).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)

    fn = custom_calls.geglu_hopper if hopper else custom_calls.geglu
    if config is not None:
        fn = functools.partial(fn, config=config)
    return make, fn, lambda out, x, w, b: (out, custom_calls.geglu_reference(x, w, b))


# name: (make inputs, run, (out, *inputs) -> (out, reference)); SD1.5 512x512, batch 2.
OPS = {
    "attention_64": _attention(4096, 8, 40, 48),
    "attention_64_pin": _attention(4096, 8, 40, 48, pin_softmax=True),
    "attention_64_half_exp": _attention(4096, 8, 40, 48, half_exp=True),
    # FlashAttention-3's intra-warpgroup overlap, 1.4-1.6x slower (item 61: serialized wgmmas?)
    "attention_64_overlap": _attention(4096, 8, 40, 48, block_q=64, pingpong=False,
                                       overlap_qk=True),  # fmt: skip
    "attention_32": _attention(1024, 8, 80, 80),
    # SD1.5's 64x64 cross-attention: the Triton flash kernel in force, and the all-heads one
    "cross_64": _cross(4096, 8, 40, "flash_attention"),
    "cross_64_all_heads": _cross(4096, 8, 40, "cross_attention"),
    "group_norm_64x320": _group_norm(64, 320, "silu"),
    "group_norm_64x640": _group_norm(64, 640, "silu"),
    "group_norm_32x1280": _group_norm(32, 1280, "silu"),
    "geglu_64_hopper": _geglu(8192, 320, 1280, True),  # the heuristic's config
    # a ring per consumer, 128-wide tiles, no clusters (the eleventh session's comparison)
    "geglu_64_hopper_c1": _geglu(8192, 320, 1280, True, importlib.import_module(
        "custom_calls.geglu_hopper").HopperConfig(block_n=128, stages=2)),
    "geglu_32_hopper": _geglu(2048, 640, 2560, True),
    "geglu_32": _geglu(2048, 640, 2560, False),
    "geglu_16": _geglu(512, 1280, 5120, False),
    "geglu_16_hopper": _geglu(512, 1280, 5120, True),
}

_OPS = flags.DEFINE_list("ops", list(OPS), f"ops to run, of {sorted(OPS)}")
_TOLERANCE = 5e-3  # fp16 outputs against their fp32 references: relative L2 error


def main(argv):
    del argv
    rng = np.random.default_rng(11)
    failed = []
    for name in common.known_names(_OPS.value, OPS, what="ops"):
        make, run, check = OPS[name]
        args = make(rng)
        out = jax.block_until_ready(jax.jit(run)(*args))
        got, want = check(out, *args)
        got, want = (np.asarray(t, np.float32) for t in (got, want))
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        ok = np.isfinite(got).all() and err < _TOLERANCE
        print(f"{name}: relative error {err:.2e} {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            failed.append(name)
    if failed:
        raise SystemExit(f"wrong outputs: {failed}")


if __name__ == "__main__":
    app.run(main)
