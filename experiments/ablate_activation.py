"""Our kernels with each form of their activations, side by side in one process (GPU).

    PYTHONPATH=. python experiments/ablate_activation.py [--shapes=sd15_64] \
        [--gn_shapes=unet_64x64x320] [--forms=division,rsqrt]

Nsight Compute's per-instruction samples of the Hopper GEGLU at SD1.5's 64x64 level put 54% of
its consumer warps' samples in the epilogue (`experiments/results/README.md`, twelfth
session), where a tile's 64 x 128 outputs per warpgroup each take the erf GELU; the GroupNorm
kernels apply SiLU to every output. The two forms (`custom_calls.group_norm.ACTIVATION_FORM`,
read at trace time) compute the same functions: "division" as first written (SiLU as
y / (1 + exp(-y)); the A&S 7.1.26 erf with a division and a sign select), "rsqrt" with the
reciprocals as rsqrt(.)^2 and the GELU as relu(y) - 0.5 |y| q (fewer instructions). Each
kernel (the Hopper and Triton GEGLUs, our GroupNorm with SiLU; their configs as `auto` would
pick them) is traced afresh per form and timed by device kernel time
(`experiments.common.kernel_us`: distinct inputs), and its output checked against the float32
reference. Rounds alternate the forms' order.

Writes ablate_activation_<device>_<dtype>_<date>.json and .md to results_dir().
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from sdjax.shapes import GEGLU_SHAPES, GROUP_NORM_SHAPES

gn = importlib.import_module("custom_calls.group_norm")
gh = importlib.import_module("custom_calls.geglu_hopper")
gt = importlib.import_module("custom_calls.geglu")

FORMS = gn.ACTIVATION_FORMS
TOLERANCE = 5e-3  # fp16 output against the float32 reference (relative L2)

_SHAPES = flags.DEFINE_list("shapes", ["sd15_64", "sd15_32", "sd15_16"], "GEGLU shape names")
_GN_SHAPES = flags.DEFINE_list(
    "gn_shapes", ["unet_64x64x320", "unet_64x64x960", "unet_32x32x1280", "unet_16x16x1280"],
    "GroupNorm shape names (their activation: SiLU in the resnets)",
)  # fmt: skip
_FORMS = flags.DEFINE_list("forms", list(FORMS), "activation forms, timed in this order")
_KERNELS = flags.DEFINE_list("kernels", ["hopper", "triton"], "GEGLU kernels: hopper, triton")
_REPEATS = flags.DEFINE_integer("repeats", 2, "rounds over the forms (alternating order)")


def _inputs(rng, m, d, f):
    x = jnp.asarray(rng.standard_normal((m, d)).astype(np.float16))
    w = jnp.asarray((0.05 * rng.standard_normal((d, 2 * f))).astype(np.float16))
    b = jnp.asarray(rng.standard_normal(2 * f).astype(np.float32))
    return x, w, b


def _time(kernel, form, args, **kwargs):
    """The kernel traced now with `form` in force (un-jitted entry points: no cached trace)."""
    entry = {"hopper": gh.geglu_hopper, "triton": gt.geglu, "group_norm": gn.group_norm}[kernel]
    entry = getattr(entry, "__wrapped__", entry)
    gn.ACTIVATION_FORM = form
    try:
        fn = jax.jit(lambda *a: entry(*a, interpret=False, **kwargs))
        out = jax.block_until_ready(fn(*args))
        us = common.kernel_us(fn, *args)["us"]
    finally:
        gn.ACTIVATION_FORM = "rsqrt"
    return out, us


def _rounds(shape, kernel, args, ref, **kwargs):
    rows = []
    for r in range(_REPEATS.value):
        for form in _FORMS.value if r % 2 == 0 else _FORMS.value[::-1]:
            row = {"shape": shape, "kernel": kernel, "form": form, "round": r}
            try:
                out, row["kernel_us"] = _time(kernel, form, args, **kwargs)
                row["err"] = common.relative_error(np.asarray(out, np.float32), ref)
                row["ok"] = bool(np.isfinite(row["err"]) and row["err"] < TOLERANCE)
            except Exception as e:  # a form that does not compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            common.print_row(row)
    return rows


def main(argv):
    del argv
    rng = np.random.default_rng(7)
    rows = []
    for name in common.known_names(_SHAPES.value, GEGLU_SHAPES):
        s = GEGLU_SHAPES[name]
        batch, tokens, dim = s.x_shape
        args = _inputs(rng, batch * tokens, dim, s.inner)
        ref = np.asarray(jax.jit(gt.geglu_reference)(*args), np.float32)
        for kernel in _KERNELS.value:
            rows += _rounds(name, kernel, args, ref)
    for name in common.known_names(_GN_SHAPES.value, GROUP_NORM_SHAPES):
        s = GROUP_NORM_SHAPES[name]
        c = s.shape[-1]
        args = (jnp.asarray(rng.standard_normal(s.shape).astype(np.float16)),
                jnp.asarray(1 + 0.1 * rng.standard_normal(c).astype(np.float32)),
                jnp.asarray(0.1 * rng.standard_normal(c).astype(np.float32)))  # fmt: skip
        kwargs = dict(groups=s.groups, eps=s.eps, activation=s.activation)
        reference = functools.partial(gn.group_norm_reference, **kwargs)
        ref = np.asarray(jax.jit(reference)(*args), np.float32)
        rows += _rounds(name, "group_norm", args, ref, **kwargs)
    table = common.write_bench(
        "ablate_activation",
        jnp.float16,
        {"shapes": {n: str(GEGLU_SHAPES[n]) for n in _SHAPES.value},
         "gn_shapes": {n: str(GROUP_NORM_SHAPES[n]) for n in _GN_SHAPES.value},
         "forms": _FORMS.value},  # fmt: skip
        rows,
        ["shape", "kernel", "form", "round", "kernel_us", "err", "ok", "error"],
        "Our kernels with each activation form (device kernel time, us per call)",
    )
    print(table)
    wrong = [r for r in rows if r.get("ok") is False or "error" in r]
    if wrong:
        raise SystemExit(f"forms with wrong results or errors: {wrong}")


if __name__ == "__main__":
    app.run(main)
