"""Nearest 2x upsampling + 3x3 conv: the textbook order against the subpixel form, on the GPU.

For the upsamplers of SD1.5's UNet (batch 2) and VAE decoder (batch 1) at 512x512, times
`sdjax.ops.upsample_conv_reference` (upsample, then convolve), `upsample_conv_subpixel`
(four 2x2 phase kernels on the small map, combined in the timed call) and
`upsample_conv_phases` (the phase kernels given, as in a denoising loop, which builds them
once per generation in the UNet's conditioning) and `upsample_conv_transposed` (one
convolution of x dilated by zeros, its 4x4 kernel given: item 197 of the results README),
each in one jitted program of back-to-back calls (`experiments.common.time_jax`, median),
with the error of each against float32; for the phases and transposed forms also the device
kernel time (`experiments.common.kernel_us`; the phases with the interleave `auto` runs: our
kernel on GPU, the model's pair) and the kernels that ran.

Then the subpixel form's last step alone, the phases interleaved with the bias (and, in the
UNet, the next skip concatenated): XLA's fusion of `custom_calls.subpixel_interleave_reference`
against our kernel `custom_calls.subpixel_interleave`, by device kernel time (a jax.profiler
trace, `experiments.common.kernel_us`), each output checked to be the reference's exactly.

    PYTHONPATH=. python experiments/bench_upsample.py [--interleave_only]

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
_INTERLEAVE_ONLY = flags.DEFINE_bool("interleave_only", False,
                                     "only the interleave table (no conv forms)")  # fmt: skip

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
    kernel4 = ops.transposed_kernel(kernel).astype(dtype)
    want = ops.upsample_conv_reference(*(a.astype(jnp.float32) for a in (x, kernel, bias)))
    forms = {
        "reference": (ops.upsample_conv_reference, (x, kernel, bias)),
        "subpixel": (ops.upsample_conv_subpixel, (x, kernel, bias)),
        "phases": (ops.upsample_conv_phases, (x, phases, bias)),
        "transposed": (ops.upsample_conv_transposed, (x, kernel4, bias)),
    }
    row = {"shape": name, "x": [n, side, side, c], "gflop_reference": 2 * n * (2 * side) ** 2
           * 9 * c * c / 1e9}  # fmt: skip
    for form, (fn, args) in forms.items():
        row[f"{form}_ms"] = common.time_jax(fn, *args, calls=_CALLS.value,
                                            repeats=_REPEATS.value)["median_ms"]  # fmt: skip
        row[f"{form}_err"] = common.relative_error(jax.jit(fn)(*args), want)
    row["reference/phases"] = row["reference_ms"] / row["phases_ms"]
    row["phases/transposed"] = row["phases_ms"] / row["transposed_ms"]
    for form in ("phases", "transposed"):
        fn, args = forms[form]
        t = common.kernel_us(fn, *args)
        row[f"{form}_kernel_us"] = t["us"]
        top = list(t["kernels"].items())[:6]  # the longest kernels' names (by time, descending)
        row[f"{form}_kernels"] = {k: round(v, 2) for k, v in top}
    row["phases/transposed_kernel"] = row["phases_kernel_us"] / row["transposed_kernel_us"]
    print({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


# The interleave's operands per upsampler: (batch, input side, O, S: the next skip's channels,
# which the UNet concatenates after the upsampled map; 0 in the VAE).
INTERLEAVE_SHAPES = {
    "unet_16to32x1280+640": (2, 16, 1280, 640),
    "unet_32to64x640+320": (2, 32, 640, 320),
    "vae_64to128x512": (1, 64, 512, 0),
    "vae_128to256x512": (1, 128, 512, 0),
    "vae_256to512x256": (1, 256, 256, 0),
}


def bench_interleave(name: str, dtype) -> dict:
    from custom_calls.subpixel import subpixel_interleave, subpixel_interleave_reference

    n, side, o, s = INTERLEAVE_SHAPES[name]
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.standard_normal((n, side + 1, side + 1, 4 * o)), dtype)
    bias = jnp.asarray(rng.standard_normal(o), dtype)
    skip = jnp.asarray(rng.standard_normal((n, 2 * side, 2 * side, s)), dtype) if s else None
    args = (y, bias) if skip is None else (y, bias, skip)
    itemsize = jnp.dtype(dtype).itemsize
    moved = (y.size + n * (2 * side) ** 2 * (o + s) + (skip.size if s else 0)) * itemsize  # r+w
    row = {"shape": name, "mbytes": moved / 1e6}
    want = jax.jit(subpixel_interleave_reference)(*args)
    for form, fn in (("xla", subpixel_interleave_reference), ("pallas", subpixel_interleave)):
        row[f"{form}_kernel_us"] = common.kernel_us(fn, *args)["us"]
        row[f"{form}_exact"] = bool(np.array_equal(np.asarray(jax.jit(fn)(*args)),
                                                   np.asarray(want)))  # fmt: skip
        row[f"{form}_tbps"] = moved / row[f"{form}_kernel_us"] / 1e6
    row["xla/pallas"] = row["xla_kernel_us"] / row["pallas_kernel_us"]
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    # the phases' interleave as the model runs it (`auto`: our kernel on GPU)
    with ops.use(ops.Implementations(interleave="auto")):
        rows = [] if _INTERLEAVE_ONLY.value else [bench(name, dtype) for name in SHAPES]
    inter = [bench_interleave(name, dtype) for name in INTERLEAVE_SHAPES]
    record = {"rows": rows, "interleave": inter}
    columns = ["shape", "gflop_reference", "reference_ms", "subpixel_ms", "phases_ms",
               "transposed_ms", "reference/phases", "phases/transposed", "phases_kernel_us",
               "transposed_kernel_us", "phases/transposed_kernel", "reference_err",
               "phases_err", "transposed_err"]  # fmt: skip
    if not rows:  # the interleave table is the one to write out
        rows, columns = inter, ["shape", "mbytes", "xla_kernel_us", "pallas_kernel_us",
                                "xla/pallas", "xla_tbps", "pallas_tbps", "pallas_exact"]  # fmt: skip
    table = common.write_bench("bench_upsample", dtype, record, rows, columns,
                               "Upsample + conv")  # fmt: skip
    print(table)


if __name__ == "__main__":
    app.run(main)
