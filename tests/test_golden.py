"""Regression: the reference path still computes the committed golden outputs (tiny config).

Regenerate with `python -m experiments.make_golden` only for an intended change.
"""

import numpy as np
import pytest

from experiments import make_golden
from sdjax import config as sd_config

# float32 on CPU; the tolerance allows for a different BLAS / XLA version reordering sums.
RTOL = 1e-5


@pytest.fixture(scope="module")
def outputs():
    config = sd_config.preset("tiny")
    return make_golden.compute(
        config, make_golden.golden_params(config), make_golden.inputs(config)
    )


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_mean", "vae_logvar", "vae_decode"])
def test_matches_golden(outputs, name):
    golden = np.load(make_golden.GOLDEN)[name]
    ours = np.asarray(outputs[name], np.float64)
    assert ours.shape == golden.shape
    assert np.isfinite(ours).all()
    assert np.std(golden) > 1e-3, "golden output is degenerate"
    err = np.linalg.norm(ours - golden) / np.linalg.norm(golden)
    assert err <= RTOL, f"{name}: relative error {err:.2e} > {RTOL}"
