"""Nearest 2x upsampling + 3x3 conv: the textbook order against the subpixel form, on the GPU.

For the upsamplers of SD1.5's UNet (batch 2) and VAE decoder (batch 1) at 512x512, times
`sdjax.ops.upsample_conv_reference` (upsample, then convolve), `upsample_conv_subpixel`
(four 2x2 phase kernels on the small map, combined in the timed call) and
`upsample_conv_phases` (the phase kernels given, as in a denoising loop, which builds them
once per generation in the UNet's conditioning), each in one jitted program of back-to-back calls
(`experiments.common.time_jax`, median), with the error of each against float32.

    PYTHONPATH=. python experiments/bench_upsample.py

Writes bench_upsample_<device>_<dtype>_<date>.json and .md to results_dir().
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from sdjax import ops

_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "dtype")
_CALLS = flags.DEFINE_integer("calls", 20, "back-to-back calls per timed program")
_REPEATS = flags.DEFINE_integer("repeats", 7, "timed repeats (median)")

# name: (batch, side, channels in = out) of each upsampler's input at 512x512.
SHAPES = {
    "unet_8to16x1280": (2, 8, 1280),
    "unet_16to32x1280": (2, 16, 1280),
    "unet_32to64x640": (2, 32, 640),
    "vae_64to128x512": (1, 64, 512),
    "vae_128to256x512": (1, 128, 512),
    "vae_256to512x256": (1, 256, 256),
}


def bench(name: str, dtype) -> dict:
    n, side, c = SHAPES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, side, side, c)), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c), dtype)
    bias = jnp.asarray(rng.standard_normal(c), dtype)
    phases = ops.subpixel_kernel(kernel).astype(dtype)
    want = ops.upsample_conv_reference(*(a.astype(jnp.float32) for a in (x, kernel, bias)))
    forms = {
        "reference": (ops.upsample_conv_reference, (x, kernel, bias)),
        "subpixel": (ops.upsample_conv_subpixel, (x, kernel, bias)),
        "phases": (ops.upsample_conv_phases, (x, phases, bias)),
    }
    row = {"shape": name, "x": [n, side, side, c], "gflop_reference": 2 * n * (2 * side) ** 2
           * 9 * c * c / 1e9}  # fmt: skip
    for form, (fn, args) in forms.items():
        row[f"{form}_ms"] = common.time_jax(fn, *args, calls=_CALLS.value,
                                            repeats=_REPEATS.value)["median_ms"]  # fmt: skip
        row[f"{form}_err"] = common.relative_error(jax.jit(fn)(*args), want)
    row["reference/phases"] = row["reference_ms"] / row["phases_ms"]
    print({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    rows = [bench(name, dtype) for name in SHAPES]
    columns = ["shape", "gflop_reference", "reference_ms", "subpixel_ms", "phases_ms",
               "reference/phases", "reference_err", "phases_err"]  # fmt: skip
    table = common.write_bench("bench_upsample", dtype, {"rows": rows}, rows, columns,
                               "Upsample + conv")  # fmt: skip
    print(table)


if __name__ == "__main__":
    app.run(main)
