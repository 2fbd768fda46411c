"""The UNet's skip concatenates: written, or never written (GPU, device kernel time).

    PYTHONPATH=. python experiments/bench_concat.py

Each up-block resnet takes [its input, a skip] concatenated along channels, and reads the
concatenation twice: GroupNorm + SiLU (norm1) and the 1x1 shortcut conv. Forms:
  current       concatenate; `ops.group_norm` (auto) of it; the shortcut conv of it
  split_pallas  `ops.group_norm_concat` (statistics of each part from our kernel, one XLA
                fusion normalizing both into the concatenated output); the shortcut as two
                matrix products of the parts, summed
  split_xla     the same with XLA's reductions for the statistics
  concat        the concatenate alone (what `current` spends on it)
Each output is checked against the float32 reference. Times are
`experiments.common.kernel_us` (distinct inputs and weights).

Writes bench_concat_<device>_<dtype>_<date>.json and .md to results_dir().
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from sdjax import ops

# (side, input channels, skip channels, output channels): count per UNet step, SD1.5 at
# 512x512, batch 2 (guided).
SHAPES = {
    "up3_64x640+320to320": ((64, 640, 320, 320), 1),
    "up3_64x320+320to320": ((64, 320, 320, 320), 2),
    "up2_32x1280+640to640": ((32, 1280, 640, 640), 1),
    "up2_32x640+640to640": ((32, 640, 640, 640), 1),
    "up2_32x640+320to640": ((32, 640, 320, 640), 1),
    "up1_16x1280+1280to1280": ((16, 1280, 1280, 1280), 2),
    "up1_16x1280+640to1280": ((16, 1280, 640, 1280), 1),
    "up0_8x1280+1280to1280": ((8, 1280, 1280, 1280), 3),
}

_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "dtype")
_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), "shape names")
_SETS = flags.DEFINE_integer("sets", 8, "distinct input sets per timed program")


def _current(x1, x2, scale, bias, w):
    x = jnp.concatenate([x1, x2], axis=-1)
    h = ops.group_norm(x, scale, bias, activation="silu", implementation="auto")
    return h, jnp.einsum("nhwi,io->nhwo", x, w)


def _split(impl):
    def fn(x1, x2, scale, bias, w):
        h = ops.group_norm_concat(x1, x2, scale, bias, activation="silu", implementation=impl)
        c1 = x1.shape[-1]
        short = jnp.einsum("nhwi,io->nhwo", x1, w[:c1], preferred_element_type=jnp.float32)
        short = short + jnp.einsum("nhwi,io->nhwo", x2, w[c1:], preferred_element_type=jnp.float32)
        return h, short.astype(x1.dtype)

    return fn


def _concat(x1, x2, scale, bias, w):
    del scale, bias, w
    return jnp.concatenate([x1, x2], axis=-1)


def bench(name: str, dtype) -> dict:
    (side, c1, c2, cout), count = SHAPES[name]
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal((2, side, side, c1)) * 2 + 0.5, dtype)
    x2 = jnp.asarray(rng.standard_normal((2, side, side, c2)) - 0.3, dtype)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(c1 + c2), dtype)
    bias = jnp.asarray(0.1 * rng.standard_normal(c1 + c2), dtype)
    w = jnp.asarray(rng.standard_normal((c1 + c2, cout)) / np.sqrt(c1 + c2), dtype)
    f32 = [a.astype(jnp.float32) for a in (x1, x2, scale, bias, w)]
    with jax.default_matmul_precision("float32"):
        want = jax.jit(_split("reference"))(*f32)
    forms = {"current": _current, "split_pallas": _split("pallas"), "split_xla": _split("xla"),
             "concat": _concat}  # fmt: skip
    row = {"shape": name, "per_step": count, "mb_concat": 2 * side * side * (c1 + c2)
           * jnp.dtype(dtype).itemsize / 1e6}  # fmt: skip
    for form, fn in forms.items():
        t = common.kernel_us(fn, x1, x2, scale, bias, w, sets=_SETS.value)
        row[f"{form}_us"] = t["us"]
        row[f"{form}_launches"] = t["launches"]
        row[f"{form}_kernels"] = t["kernels"]
        if form != "concat":
            got = jax.jit(fn)(x1, x2, scale, bias, w)
            row[f"{form}_err_norm"] = common.relative_error(got[0], want[0])
            row[f"{form}_err_shortcut"] = common.relative_error(got[1], want[1])
    row["saved_us"] = row["current_us"] - min(row["split_pallas_us"], row["split_xla_us"])
    common.print_row(row)
    return row


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    rows = [bench(name, dtype) for name in common.known_names(_SHAPES.value, SHAPES)]
    total = {"shape": "per step (weighted)"}
    for key in ("current_us", "split_pallas_us", "split_xla_us", "concat_us", "saved_us"):
        total[key] = sum(r[key] * r["per_step"] for r in rows)
    columns = ["shape", "per_step", "mb_concat", "current_us", "split_pallas_us", "split_xla_us",
               "concat_us", "saved_us", "split_pallas_err_norm", "split_xla_err_norm",
               "split_pallas_err_shortcut"]  # fmt: skip
    table = common.write_bench(
        "bench_concat", dtype, {"rows": rows, "total": total}, [*rows, total], columns,
        "Skip concatenates (device kernel time per call, us; distinct inputs and weights)",
    )  # fmt: skip
    print(table)


if __name__ == "__main__":
    app.run(main)
