"""The GEGLU kernels with each form of the erf GELU, side by side in one process (GPU).

    PYTHONPATH=. python experiments/ablate_gelu.py [--shapes=sd15_64,sd15_32] [--forms=select,rsqrt]

Nsight Compute's per-instruction samples of the Hopper GEGLU at SD1.5's 64x64 level put 54% of
its consumer warps' samples in the epilogue (`experiments/results/README.md`, twelfth
session), where a tile's 64 x 128 outputs per warpgroup each take the erf GELU. The two forms
(`custom_calls.group_norm.GELU_FORM`, read at trace time) compute the same A&S 7.1.26
approximation: "select" with a division and a sign select (as first written), "rsqrt" as
relu(y) - 0.5 |y| q with the reciprocal as rsqrt(.)^2 (fewer instructions). Each kernel (the
Hopper one and the Triton one, their configs as `auto` would pick them) is traced afresh per
form and timed by device kernel time (`experiments.common.kernel_us`: distinct inputs), and
its output checked against the float32 reference.

Writes ablate_gelu_<device>_<dtype>_<date>.json and .md to results_dir().
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from sdjax.shapes import GEGLU_SHAPES

gn = importlib.import_module("custom_calls.group_norm")
gh = importlib.import_module("custom_calls.geglu_hopper")
gt = importlib.import_module("custom_calls.geglu")

FORMS = ("select", "rsqrt")
TOLERANCE = 5e-3  # fp16 output against the float32 reference (relative L2)

_SHAPES = flags.DEFINE_list("shapes", ["sd15_64", "sd15_32", "sd15_16"], "GEGLU shape names")
_FORMS = flags.DEFINE_list("forms", list(FORMS), "GELU forms, timed in this order")
_KERNELS = flags.DEFINE_list("kernels", ["hopper", "triton"], "hopper and/or triton")
_REPEATS = flags.DEFINE_integer("repeats", 2, "rounds over the forms (alternating order)")


def _inputs(rng, m, d, f):
    x = jnp.asarray(rng.standard_normal((m, d)).astype(np.float16))
    w = jnp.asarray((0.05 * rng.standard_normal((d, 2 * f))).astype(np.float16))
    b = jnp.asarray(rng.standard_normal(2 * f).astype(np.float32))
    return x, w, b


def _time(kernel, form, args):
    """The kernel traced now with `form` in force (un-jitted entry points: no cached trace)."""
    gn.GELU_FORM = form
    try:
        entry = gh.geglu_hopper if kernel == "hopper" else gt.geglu
        entry = getattr(entry, "__wrapped__", entry)
        fn = jax.jit(lambda x, w, b: entry(x, w, b, interpret=False))
        out = jax.block_until_ready(fn(*args))
        us = common.kernel_us(fn, *args)["us"]
    finally:
        gn.GELU_FORM = "rsqrt"
    return out, us


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
            for r in range(_REPEATS.value):
                forms = _FORMS.value if r % 2 == 0 else _FORMS.value[::-1]
                for form in forms:
                    row = {"shape": name, "kernel": kernel, "form": form, "round": r}
                    try:
                        out, row["kernel_us"] = _time(kernel, form, args)
                        row["err"] = common.relative_error(np.asarray(out, np.float32), ref)
                        row["ok"] = bool(np.isfinite(row["err"]) and row["err"] < TOLERANCE)
                    except Exception as e:  # a form that does not compile is a result too
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    common.print_row(row)
    table = common.write_bench(
        "ablate_gelu",
        jnp.float16,
        {"shapes": {n: str(GEGLU_SHAPES[n]) for n in _SHAPES.value}, "forms": _FORMS.value},
        rows,
        ["shape", "kernel", "form", "round", "kernel_us", "err", "ok", "error"],
        "The GEGLU kernels with each erf GELU form (device kernel time, us per call)",
    )
    print(table)
    wrong = [r for r in rows if r.get("ok") is False or "error" in r]
    if wrong:
        raise SystemExit(f"forms with wrong results or errors: {wrong}")


if __name__ == "__main__":
    app.run(main)
