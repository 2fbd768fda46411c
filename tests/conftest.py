"""Shared pytest set-up: markers, the GPU skip, and deterministic random inputs."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's name: fresh inputs per test, reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
