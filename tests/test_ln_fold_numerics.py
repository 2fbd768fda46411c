"""experiments/ln_fold_numerics.py: the folded LayerNorm's algebra and its error bound."""

import numpy as np
import pytest

from experiments import ln_fold_numerics as lf


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_folded_form_is_the_layer_norm_then_the_product(dtype):
    """The folded form computes the same function: at float32 it matches the float64
    reference to float32 rounding; in 16 bits it is as close as today's path."""
    e = lf.errors(np.random.default_rng(1), rows=256, d=64, inner=256, mean_scale=1.0,
                  dtype=dtype)  # fmt: skip
    assert all(np.isfinite(v) for v in e.values())
    if dtype == "float32":
        assert e["folded"] < 1e-5 and e["unfused"] < 1e-5
    else:
        assert e["folded"] <= 1.2 * e["unfused"]
        assert e["folded_shifted"] <= 1.2 * e["unfused"]


def test_shifted_sums_keep_rows_with_a_large_mean():
    """Rows whose mean is 64x their spread: the one-pass statistics lose digits (the folded
    form's error grows past today's), the shifted ones do not."""
    e = lf.errors(np.random.default_rng(2), rows=512, d=320, inner=640, mean_scale=64.0,
                  dtype="float16")  # fmt: skip
    assert e["folded"] > 1.3 * e["unfused"]
    assert e["folded_shifted"] <= 1.2 * e["unfused"]


def test_run_covers_every_combination():
    record = lf.run(rows=64, dims=[32, 64], inner=0, mean_scales=[0.0, 4.0],
                    dtypes=["float16"], shifted=False, seed=0)  # fmt: skip
    assert len(record["results"]) == 4 and record["eps"] == lf.EPS
    assert all("folded_shifted" not in r for r in record["results"])
