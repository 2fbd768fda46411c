"""Numerics of a LayerNorm folded into the product after it, before any kernel does it.

    python -m experiments.ln_fold_numerics --rows 4096 --dims 320,640,1280

Item 272 of `experiments/results/README.md` plans to fold the LayerNorm in front of each
GEGLU into the GEGLU kernel. With W' = diag(gamma) W, b' = b + beta W and c = colsum(W'),

    layer_norm(x) @ W + b  =  rstd * (x @ W' - mu * c) + b'

per row of x (mean mu, rstd = 1 / sqrt(var + eps)), so the kernel multiplies the raw x and
corrects in its epilogue. The product then carries the rows' mean, and the correction
subtracts it after the float32 accumulation: rows whose mean is large against their spread
lose digits there. This measures how many, on the CPU (numpy, float32 accumulation as the
tensor cores do it), against a float64 reference, for rows of spread 1 whose means are drawn
with `--mean_scales` as standard deviation; beside it, today's path (the LayerNorm in float32,
its output rounded to the compute dtype, then the product). The statistics in the folded form
come from one pass of sums (sum x, sum x^2), as a kernel that sees each x tile once would take
them; `--shifted` subtracts each row's first element before summing (a cheap guard against
that cancellation).

Writes ln_fold_numerics<tag>.json and .md to `common.results_dir()`. Not a GPU measurement:
a kernel's own accumulation order differs, and its tests compare it with the reference.
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
EPS = 1e-5  # SD's transformer LayerNorms (torch.nn.LayerNorm's default)


def define_flags() -> None:
    """Registered only when run as a script (tests import the module for its functions)."""
    flags.DEFINE_integer("rows", 4096, "rows of x (tokens)")
    flags.DEFINE_string("dims", "320,640,1280", "widths D (SD1.5's transformer widths)")
    flags.DEFINE_integer("inner", 0, "columns of W (0: 4 D, the GEGLU's hidden half)")
    flags.DEFINE_string("mean_scales", "0,1,4,16,64", "spread of the rows' means (std 1 rows)")
    flags.DEFINE_list("dtypes", ["float16", "bfloat16"], "compute dtypes of x and the weights")
    flags.DEFINE_bool("shifted", True, "also the folded form with shifted sums")
    flags.DEFINE_integer("seed", 0, "random seed")
    flags.DEFINE_string("tag", "", "suffix of the output file names")


def _round(a, dtype):
    """a rounded to `dtype` and back to float32 (numpy has no bfloat16: ml_dtypes does)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    import numpy as np

    return a.astype(np.dtype(dtype)).astype(np.float32)


def errors(rng, *, rows: int, d: int, inner: int, mean_scale: float, dtype: str,
           shifted: bool = True) -> dict:  # fmt: skip
    """Relative errors (‖out - ref‖ / ‖ref‖) against float64 of today's path and the folded
    form, for one draw of x, gamma, beta, W, b."""
    import numpy as np

    from experiments.common import relative_error

    x = _round(rng.standard_normal((rows, d)) + mean_scale * rng.standard_normal((rows, 1)),
               dtype)  # fmt: skip
    gamma = _round(1 + 0.1 * rng.standard_normal(d), dtype)
    beta = _round(0.1 * rng.standard_normal(d), dtype)
    w = _round(rng.standard_normal((d, inner)) / np.sqrt(d), dtype)
    b = _round(0.1 * rng.standard_normal(inner), dtype)

    x64 = x.astype(np.float64)
    mu64 = x64.mean(1, keepdims=True)
    rstd64 = 1 / np.sqrt(x64.var(1, keepdims=True) + EPS)
    ref = ((x64 - mu64) * rstd64 * gamma + beta) @ w.astype(np.float64) + b

    def rel(y):
        return relative_error(y, ref)

    # today: the LayerNorm in float32, rounded to the compute dtype, then the product
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    normed = _round((x - mu) / np.sqrt(var + EPS) * gamma + beta, dtype)
    out = {"unfused": rel(normed @ w + b)}

    # folded: W' rounded to the compute dtype (prepared with the weights), b' and c in float32
    w_f = _round(gamma[:, None] * w, dtype)
    b_f = b + beta @ w
    c = w_f.sum(0)
    acc = x @ w_f

    def folded(shift):
        xs = x - shift
        s1, s2 = xs.sum(1, keepdims=True), (xs * xs).sum(1, keepdims=True)
        mean_s = s1 / d
        var_f = np.maximum(s2 / d - mean_s * mean_s, 0.0)
        return rel((acc - (mean_s + shift) * c) / np.sqrt(var_f + EPS) + b_f)

    out["folded"] = folded(np.zeros((rows, 1), np.float32))
    if shifted:
        out["folded_shifted"] = folded(x[:, :1])
    return out


def run(*, rows: int, dims, inner: int, mean_scales, dtypes, shifted: bool, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    results = []
    for dtype in dtypes:
        for d in dims:
            for m in mean_scales:
                e = errors(rng, rows=rows, d=d, inner=inner or 4 * d, mean_scale=m, dtype=dtype,
                           shifted=shifted)  # fmt: skip
                results.append({"dtype": dtype, "d": d, "mean_scale": m, **e})
    return {"rows": rows, "eps": EPS, "results": results}


def main(argv):
    del argv
    from experiments import common

    record = run(rows=FLAGS.rows, dims=[int(v) for v in FLAGS.dims.split(",")],
                 inner=FLAGS.inner, mean_scales=[float(v) for v in FLAGS.mean_scales.split(",")],
                 dtypes=FLAGS.dtypes, shifted=FLAGS.shifted, seed=FLAGS.seed)  # fmt: skip
    record["device"] = "CPU (numpy, float32 accumulation)"
    columns = ["dtype", "d", "mean_scale", "unfused", "folded"] + (
        ["folded_shifted"] if FLAGS.shifted else [])
    md = "\n".join([
        "# A LayerNorm folded into the product after it: relative error against float64\n",
        f"x: {FLAGS.rows} rows of spread 1, their means drawn with the given spread; W: D x "
        f"{FLAGS.inner or '4 D'}; eps {EPS}. `unfused`: the LayerNorm in float32, rounded to the "
        "dtype, then the product; `folded`: rstd (x @ W' - mu colsum(W')) + b' with one-pass "
        "sums; `folded_shifted`: the sums of x minus each row's first element.\n",
        common.markdown_table(record["results"], columns),
    ]) + "\n"  # fmt: skip
    common.write_record(f"ln_fold_numerics{FLAGS.tag}", record, md)


if __name__ == "__main__":
    define_flags()
    app.run(main)
