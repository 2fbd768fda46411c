"""The UNet's 3x3 convolutions in three forms, by device kernel time (GPU).

    PYTHONPATH=. python experiments/bench_conv.py [--shapes=unet_8x1280to1280,...]

Forms:
  cudnn   `lax.conv_general_dilated` (XLA gives it to cuDNN), kernel OHWI (the layout the
          pipeline's `auto_layouts` gives it)
  taps    `sdjax.ops.conv3x3_taps`: x times all nine taps into float32 (a batch of nine
          products, or one [NHW, I] x [I, 9 O] product for a small kernel), then the nine
          shifted slices summed; kernel HWIO, as the parameter is (any rearrangement of it
          is in the timed program, as in the model)
  taps_half  the same with the tap products z in x's dtype (`product_dtype=None`, the
          "taps_half" implementation)
  im2col  the nine shifted copies of x side by side, [NHW, 9 I] x [9 I, O], kernel HWIO
  hopper  `custom_calls.conv3x3_hopper` (our Mosaic GPU implicit GEMM with split-K; its
          padding copy and the partial sums' addition are in the timed program), once per
          --hopper_configs entry (`conv3x3_hopper.parse_config`): "auto" (the heuristic) or
          "n<block_n>s<stages>k<splits>" with an optional "e" (no delayed slot release),
          e.g. n128s4k3; an "r" suffix stacks the input planes by rows (the default: side by
          side in the channels; s22b ran the rows layout without a suffix, s22c named the
          channels layout with "c"). The padding is the planes' fusion.
          `best_hopper_kernel_us` is the best config's Mosaic kernel alone (what a producer
          that writes the planes itself, and a consumer that adds the partial sums, would
          leave)
  splitS  `sdjax.ops.conv3x3_split_k`: the input channels in S parts as one grouped
          convolution (S times the output tiles: split-K for cuDNN), the S partial sums in
          x's dtype, then added; kernel `split_k_kernel`'s, OHWI, made outside the timed
          program (an upper bound: the model would keep its kernels in that form);
  splitSf32  the same with float32 partial sums (--splits: the S values)
Each is checked against a float32 convolution. Times are `experiments.common.kernel_us`:
summed kernel durations over distinct inputs and kernels (none served from L2).

`--chain` (item 196 of `experiments/results/README.md`) times instead, for the shapes whose
input and output channels agree, S *separate* cuDNN convolutions over S slices of the input
channels, whose partial sums one element-wise fusion adds with the bias. No convolution of a
step waits for another, so a CUDA graph with concurrent regions
(`xla_gpu_graph_enable_concurrent_region`) may run them side by side: S times cuDNN's output
tiles at the 16x16 and 32x32 levels, where its tiles fill 40-80 of the H100's 132 SMs (the
grouped form above is one GEMM after a slicing kernel, item 186). Summed kernel time cannot
show an overlap, so each form runs as a dependent chain of --chain_steps convolutions in one
jitted program (each step's input the last step's output, the weights cycling through
--chain_weight_sets distinct kernels, so that they come from memory), and a step's time is
(wall of the chain - wall of a chain of one) / (steps - 1), median over --chain_repeats
rounds, every (form, concurrent regions on/off) program timed in turn within each round:
  cudnn         one convolution, its bias fused by cuDNN (the model's form)
  chainS        S convolutions of S channel slices of x, which XLA copies out of the whole x
                (behind an optimization barrier, as after an opaque producer such as our
                GroupNorm kernel), then partial sums + bias in float32, cast to x's dtype
  chainS_fused  the same without the barrier: XLA may write the slices from the last step's
                sum directly (the bound for a producer that writes the S slices itself)
and, per form, its summed kernel time for one step (`kernel_us`, command buffers off).

Writes bench_conv[_chain]_<device>_<dtype>_<date>.json and .md to results_dir().
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from sdjax import ops

# name: (batch, side, in channels, out channels): SD1.5's UNet (batch 2, guided) and VAE
# decoder (batch 1) at 512x512.
SHAPES = {
    "unet_8x1280to1280": (2, 8, 1280, 1280),
    "unet_8x2560to1280": (2, 8, 2560, 1280),
    "unet_16x1280to1280": (2, 16, 1280, 1280),
    "unet_16x2560to1280": (2, 16, 2560, 1280),
    "unet_32x640to640": (2, 32, 640, 640),
    "unet_64x320to320": (2, 64, 320, 320),
    "unet_conv_in_64x4to320": (2, 64, 4, 320),
    "unet_conv_out_64x320to4": (2, 64, 320, 4),
    "unet_16x1920to1280": (2, 16, 1920, 1280),
    "unet_32x320to640": (2, 32, 320, 640),
    "unet_32x1280to640": (2, 32, 1280, 640),
    "unet_32x1920to640": (2, 32, 1920, 640),
    "unet_64x960to320": (2, 64, 960, 320),
    "vae_conv_in_64x4to512": (1, 64, 4, 512),
    "vae_conv_out_512x128to3": (1, 512, 128, 3),
}

_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "dtype")
_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), "shape names")
_SETS = flags.DEFINE_integer("sets", 8, "distinct input sets per timed program")
_FORMS = flags.DEFINE_list("forms", ["cudnn", "taps", "taps_half", "im2col", "split"],
                           "forms to time (cudnn always: the ratios' reference; split: every "
                           "splitS form)")  # fmt: skip
_SPLITS = flags.DEFINE_list("splits", ["2", "3", "4"], "split-K parts of the splitS forms "
                            "(those that divide a shape's input channels); empty: none")
_HOPPER_CONFIGS = flags.DEFINE_list("hopper_configs", ["auto"], "configs of the hopper form "
                                     "(see the module doc)")
_CHAIN = flags.DEFINE_bool("chain", False, "time the concurrent split forms in dependent "
                           "chains by wall time instead (shapes with equal channels only)")
_CHAIN_STEPS = flags.DEFINE_integer("chain_steps", 24, "convolutions per timed chain")
_CHAIN_WEIGHT_SETS = flags.DEFINE_integer("chain_weight_sets", 4, "distinct kernels per chain")
_CHAIN_REPEATS = flags.DEFINE_integer("chain_repeats", 15, "rounds of the chain timings")
# The compile option that lets a CUDA graph run independent commands side by side.
CONCURRENT = "xla_gpu_graph_enable_concurrent_region"


def _cudnn(x, kernel_ohwi, bias):
    y = jax.lax.conv_general_dilated(x, kernel_ohwi, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "OHWI", "NHWC"))  # fmt: skip
    return y + bias


def _im2col(x, kernel_flat, bias):
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate(
        [xp[:, ky : ky + h, kx : kx + w] for ky in range(3) for kx in range(3)], axis=-1
    )
    y = jnp.einsum("nhwk,ko->nhwo", cols, kernel_flat, preferred_element_type=jnp.float32)
    return (y + bias.astype(jnp.float32)).astype(x.dtype)


def _sliced(x, kernels, bias, *, barrier: bool):
    """sum_s conv(x[..., slice s], kernels[s]) + bias: the S convolutions of a split-K step
    (kernels: S OHWI kernels of C / S input channels each), partial sums in float32."""
    if barrier:
        x = jax.lax.optimization_barrier(x)
    part = x.shape[-1] // len(kernels)
    total = bias.astype(jnp.float32)
    for s, k in enumerate(kernels):
        total = total + _cudnn_nobias(x[..., s * part : (s + 1) * part], k).astype(jnp.float32)
    return total.astype(x.dtype)


def _cudnn_nobias(x, kernel_ohwi):
    return jax.lax.conv_general_dilated(x, kernel_ohwi, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "OHWI", "NHWC"))  # fmt: skip


def _one(x, kernels, bias):
    """The model's form, behind the same barrier as `_sliced`'s (which costs nothing)."""
    return _cudnn(jax.lax.optimization_barrier(x), kernels[0], bias)


def _chain(form, steps: int):
    """x -> form(x, kernels[i % sets], bias) `steps` times: one jitted program's chain."""

    def run(x, kernel_sets, bias):
        for i in range(steps):
            x = form(x, kernel_sets[i % len(kernel_sets)], bias)
        return x

    return run


def _wall_s(compiled, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t0


def bench_chain(name: str, dtype) -> list[dict]:
    """Rows of the --chain timing for one shape: per form and concurrent regions on/off."""
    n, side, cin, cout = SHAPES[name]
    if cin != cout:
        raise ValueError(f"--chain needs equal input and output channels; {name} has {cin}, {cout}")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, side, side, cin)), dtype)
    bias = jnp.asarray(0.1 * rng.standard_normal(cout), dtype)  # small: the chain stays O(1)
    hwio = [rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)
            for _ in range(_CHAIN_WEIGHT_SETS.value)]  # fmt: skip
    want = ops._conv(x.astype(jnp.float32), jnp.asarray(hwio[0], jnp.float32), ((1, 1), (1, 1)))
    want = want + bias.astype(jnp.float32)

    def ohwi_parts(k, splits):  # S OHWI kernels of cin / S input channels each
        part = cin // splits
        return tuple(jnp.asarray(np.transpose(k[:, :, s * part : (s + 1) * part], (3, 0, 1, 2)),
                                 dtype) for s in range(splits))  # fmt: skip

    forms = {"cudnn": (_one, [ohwi_parts(k, 1) for k in hwio])}
    for splits in map(int, _SPLITS.value):
        if splits > 1 and cin % splits == 0:
            sets = [ohwi_parts(k, splits) for k in hwio]
            for suffix, barrier in (("", True), ("_fused", False)):
                forms[f"chain{splits}{suffix}"] = (
                    functools.partial(_sliced, barrier=barrier), sets
                )
    steps = _CHAIN_STEPS.value
    programs, rows = {}, {}
    for form, (fn, sets) in forms.items():
        args = (x, sets, bias)
        err = common.relative_error(jax.jit(fn)(x, sets[0], bias), want)
        kern = common.kernel_us(fn, x, sets[0], bias, sets=2)
        for concurrent in (False, True):
            options = {CONCURRENT: concurrent}
            pair = [jax.jit(_chain(fn, k)).lower(*args).compile(compiler_options=options)
                    for k in (1, steps)]  # fmt: skip
            for c in pair:  # warm up
                jax.block_until_ready(c(*args))
            programs[form, concurrent] = (pair, args)
            rows[form, concurrent] = {
                "shape": name, "form": form, "concurrent": concurrent, "err": err,
                "kernel_us": kern["us"], "launches": kern["launches"], "us_all": [],
            }  # fmt: skip
    for _ in range(_CHAIN_REPEATS.value):  # every program in turn, round after round
        for key, ((one, many), args) in programs.items():
            t1, tk = _wall_s(one, args), _wall_s(many, args)
            rows[key]["us_all"].append((tk - t1) / (steps - 1) * 1e6)
    for row in rows.values():
        row["us"] = statistics.median(row["us_all"])
    for (_form, concurrent), row in rows.items():
        row["cudnn/form"] = rows["cudnn", concurrent]["us"] / row["us"]
        common.print_row({k: v for k, v in row.items() if k != "us_all"})
    return list(rows.values())


def bench(name: str, dtype) -> dict:
    n, side, cin, cout = SHAPES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, side, side, cin)), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), dtype)
    bias = jnp.asarray(rng.standard_normal(cout), dtype)
    want = ops._conv(x.astype(jnp.float32), kernel.astype(jnp.float32), ((1, 1), (1, 1)))
    want = want + bias.astype(jnp.float32)
    forms = {
        "cudnn": (_cudnn, jnp.transpose(kernel, (3, 0, 1, 2))),
        "taps": (ops.conv3x3_taps, kernel),
        "taps_half": (functools.partial(ops.conv3x3_taps, product_dtype=None), kernel),
        "im2col": (_im2col, kernel.reshape(9 * cin, cout)),
    }
    gflop = 2 * n * side * side * 9 * cin * cout / 1e9
    row = {"shape": name, "x": [n, side, side, cin], "cout": cout, "gflop": gflop,
           "kernel_mb": 9 * cin * cout * jnp.dtype(dtype).itemsize / 1e6}  # fmt: skip
    forms = {f: v for f, v in forms.items() if f == "cudnn" or f in _FORMS.value}
    ohwi = ("NHWC", "OHWI", "NHWC")
    for splits in map(int, _SPLITS.value if "split" in _FORMS.value else []):
        if cin % splits:
            continue
        grouped = jnp.transpose(ops.split_k_kernel(kernel, splits), (3, 0, 1, 2))
        for suffix, partial in (("", None), ("f32", jnp.float32)):
            fn = functools.partial(ops.conv3x3_split_k, splits=splits, dimension_numbers=ohwi,
                                   partial_dtype=partial)  # fmt: skip
            forms[f"split{splits}{suffix}"] = (fn, grouped)
    if "hopper" in _FORMS.value:
        from custom_calls.conv3x3_hopper import conv3x3_hopper, parse_config, supports

        for spec in _HOPPER_CONFIGS.value:
            config = parse_config(spec, x.shape, cout)
            if why := supports(x.shape, kernel.shape, dtype, config):
                print(f"{name}: hopper {spec} skipped: {why}")
                continue
            forms[f"hopper_{spec}"] = (functools.partial(conv3x3_hopper, config=config), kernel)
    for form, (fn, k) in forms.items():
        t = common.kernel_us(fn, x, k, bias, sets=_SETS.value)
        row[f"{form}_us"] = t["us"]
        row[f"{form}_launches"] = t["launches"]
        row[f"{form}_kernels"] = t["kernels"]
        row[f"{form}_err"] = common.relative_error(jax.jit(fn)(x, k, bias), want)
    splits = {f: row[f"{f}_us"] for f in forms if f.startswith("split")}
    if splits:
        row["best_split"] = min(splits, key=splits.get)
        row["best_split_us"] = splits[row["best_split"]]
        row["cudnn/best_split"] = row["cudnn_us"] / row["best_split_us"]
        row["best_split_err"] = row[f"{row['best_split']}_err"]
    hoppers = {f: row[f"{f}_us"] for f in forms if f.startswith("hopper_")}
    if hoppers:
        best = min(hoppers, key=hoppers.get)
        kernel_only = sum(us for k, us in row[f"{best}_kernels"].items() if "conv3x3" in k)
        row.update(best_hopper=best, best_hopper_us=hoppers[best],
                   best_hopper_err=row[f"{best}_err"],
                   best_hopper_kernel_us=kernel_only)  # fmt: skip
        row["cudnn/best_hopper"] = row["cudnn_us"] / hoppers[best]
    for form in ("taps", "taps_half", "im2col"):
        if form in forms:
            row[f"cudnn/{form}"] = row["cudnn_us"] / row[f"{form}_us"]
    common.print_row(row)
    return row


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    names = common.known_names(_SHAPES.value, SHAPES)
    if _CHAIN.value:
        rows = [row for name in names for row in bench_chain(name, dtype)]
        columns = ["shape", "form", "concurrent", "us", "cudnn/form", "kernel_us", "launches",
                   "err"]  # fmt: skip
        record = {"rows": rows, "steps": _CHAIN_STEPS.value, "repeats": _CHAIN_REPEATS.value,
                  "weight_sets": _CHAIN_WEIGHT_SETS.value}  # fmt: skip
        print(common.write_bench(
            "bench_conv_chain", dtype, record, rows, columns,
            "3x3 convolutions in dependent chains: wall per step (us, median), split-K forms "
            "as S separate convolutions, CUDA-graph concurrent regions on and off",
        ))  # fmt: skip
        return
    rows = [bench(name, dtype) for name in names]
    columns = ["shape", "gflop", "kernel_mb", "cudnn_us", "taps_us", "taps_half_us",
               "im2col_us", "cudnn/taps", "cudnn/taps_half", "cudnn/im2col", "cudnn_launches",
               "taps_err", "taps_half_err", "im2col_err", "best_split",
               "best_split_us", "cudnn/best_split", "best_split_err", "best_hopper",
               "best_hopper_us", "cudnn/best_hopper", "best_hopper_kernel_us",
               "best_hopper_err"]  # fmt: skip
    table = common.write_bench(
        "bench_conv", dtype, {"rows": rows}, rows, columns,
        "3x3 convolutions (device kernel time per call, us; distinct inputs and kernels)",
    )  # fmt: skip
    print(table)


if __name__ == "__main__":
    app.run(main)
