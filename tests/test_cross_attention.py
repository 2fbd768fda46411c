"""The all-heads cross-attention kernel against the float32 reference.

On the CPU the kernel runs in Pallas interpret mode. The cases cover SD's head dims (40, 64,
80, 160, and 8, under one chunk), key lengths (77, a power of two, 1, MAX_KEYS), query lengths
that are not a multiple of the block, batch 3, head counts 1/2/5/8 (SD2.1's 5 and 10 are odd
multiples of the head's columns) and the three dtypes.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.shapes import ATTENTION_SHAPES

# `custom_calls.cross_attention` the module, not the function the package exports
ca = importlib.import_module("custom_calls.cross_attention")

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 5e-3}

# (batch, q_len, heads, head_dim, kv_len, dtype, config)
CASES = [
    (2, 100, 8, 40, 77, jnp.float16, ca.Config(block_q=32)),
    (3, 64, 5, 64, 77, jnp.float32, ca.Config(block_q=16, head_split=False)),
    (1, 40, 2, 160, 77, jnp.bfloat16, None),
    (3, 33, 3, 80, 16, jnp.float16, ca.Config(block_q=16, num_stages=1)),
    (1, 17, 1, 8, 1, jnp.float32, ca.Config(block_q=16)),
    (1, 50, 2, 40, ca.MAX_KEYS, jnp.bfloat16, ca.Config(block_q=16, num_warps=8, num_stages=3)),
]


def _case_id(case):
    b, lq, h, d, lk, dt, config = case
    return f"{b}x{lq}x{h}x{d}:{lk}:{jnp.dtype(dt).name}:{'default' if config is None else 'cfg'}"


def _inputs(rng, b, lq, h, d, lk, dtype, magnitude=1.0):
    def draw(shape):
        return jnp.asarray(magnitude * rng.standard_normal(shape, dtype=np.float32), dtype)

    return draw((b, lq, h, d)), draw((b, lk, h, d)), draw((b, lk, h, d))


def _check(q, k, v, *, scale=None, config=None):
    out = ca.cross_attention(q, k, v, scale=scale, config=config)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out)), "output has NaN or inf"
    ref = np.asarray(ca.cross_attention_reference(q, k, v, scale=scale), np.float64)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    tol = TOLERANCE[q.dtype.type]
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"
    return err


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, rng):
    *dims, config = case
    _check(*_inputs(rng, *dims), config=config)


def test_heads_do_not_leak(rng):
    """A head's masked columns are its neighbour's data in memory: with one head's v scaled up
    by 1000, every other head's output must stay as it was."""
    q, k, v = _inputs(rng, 1, 32, 3, 40, 77, jnp.float32)
    config = ca.Config(block_q=16)
    base = np.asarray(ca.cross_attention(q, k, v, config=config))
    loud = np.asarray(ca.cross_attention(q, k, v.at[:, :, 1].multiply(1000.0), config=config))
    np.testing.assert_array_equal(base[:, :, [0, 2]], loud[:, :, [0, 2]])
    assert np.abs(loud[:, :, 1]).max() > 100 * np.abs(base[:, :, 1]).max()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_large_logits_are_stable(dtype, rng):
    """Logits with a spread of hundreds: exp would overflow without subtracting the max."""
    q, k, v = _inputs(rng, 1, 40, 2, 64, 77, dtype, magnitude=4.0)
    _check(q, k, v, scale=1.0, config=ca.Config(block_q=16))


def test_rejects_bad_inputs():
    q = jnp.ones((1, 8, 1, 16), jnp.float16)
    with pytest.raises(ValueError, match="MAX_KEYS"):
        ca.cross_attention(q, *(jnp.ones((1, ca.MAX_KEYS + 1, 1, 16), jnp.float16),) * 2)
    with pytest.raises(ValueError, match="k and v"):
        ca.cross_attention(q, q, jnp.ones((1, 8, 1, 32), jnp.float16))
    with pytest.raises(ValueError, match="dtype"):
        ca.cross_attention(q, q, q.astype(jnp.float32))
    with pytest.raises(ValueError, match="power of two"):
        ca.Config(block_q=48)
    with pytest.raises(ValueError, match="num_stages"):
        ca.Config(num_stages=0)
    assert ca.supports((1, 8, 1, 16), (1, ca.MAX_KEYS, 1, 16)) is None


# --------------------------------------------------------------------------------------------
# GPU: every SD cross-attention shape, and proof that the compiled program calls the kernel
# --------------------------------------------------------------------------------------------

CROSS_SHAPES = [s for s in ATTENTION_SHAPES.values() if s.kv_len <= ca.MAX_KEYS]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=lambda s: s.name)
def test_gpu_sd_shapes(shape, rng):
    """The table's (or the heuristic's) config, fp16."""
    _check(*_inputs(rng, shape.batch, shape.q_len, shape.heads, shape.head_dim, shape.kv_len,
                    jnp.float16))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        ca.Config(block_q=16),
        ca.Config(block_q=128, num_warps=8, num_stages=3),
        ca.Config(block_q=32, num_stages=1, head_split=False),
    ],  # fmt: skip
    ids=["q16", "q128w8s3", "q32s1unsplit"],
)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_gpu_configs(config, dtype, rng):
    """Configs of the tuning grid at SD1.5's 64x64 cross shape (Lq 4096, 8 heads of 40). In
    float32 a stage of q, k and v tiles is twice the bytes: at most two stages fit in shared
    memory at 128 query rows."""
    if dtype == jnp.float32:
        config = dataclasses.replace(config, num_stages=min(config.num_stages, 2))
    _check(*_inputs(rng, 2, 4096, 8, 40, 77, dtype), config=config)


@pytest.mark.gpu
def test_gpu_large_logits(rng):
    q, k, v = _inputs(rng, 2, 1024, 8, 80, 77, jnp.float16, magnitude=4.0)
    _check(q, k, v, scale=1.0)


@pytest.mark.gpu
def test_gpu_hlo_has_kernel():
    q = jnp.zeros((2, 256, 8, 160), jnp.float16)
    k = jnp.zeros((2, 77, 8, 160), jnp.float16)
    hlo = jax.jit(ca.cross_attention).lower(q, k, k).compile().as_text()
    assert "sdjax_cross_attention" in hlo


# --------------------------------------------------------------------------------------------
# The experiments' side: the tuning grid, the bench's summary, the autotune choice
# --------------------------------------------------------------------------------------------


def test_tune_grid():
    """`tune_attention.py --kernels cross`: no configs past MAX_KEYS; 8 warps only with 64+
    query rows; the head split only where it changes the chunks; blocks clamped and unique.
    And flash's grid at short key sets."""
    from tests._subprocess import last_json_line, run_python

    got = last_json_line(
        run_python(
            "import json, dataclasses\n"
            "from experiments import tune_attention as t\n"
            "from sdjax.shapes import ATTENTION_SHAPES as S\n"
            "out = {n: [dataclasses.astuple(c) for c in t.cross_candidates(S[n])]\n"
            "       for n in ('sd15_cross_64', 'sd15_cross_8', 'sd21_cross_48', 'sd15_self_64')}\n"
            "out['flash'] = {n: sorted({c.block_q for c in t.candidates('flash', S[n], False)})\n"
            "                for n in ('sd15_cross_64', 'sd15_self_32')}\n"
            "print(json.dumps(out))"
        )
    )
    assert got["sd15_self_64"] == []  # 4096 keys
    grid64 = got["sd15_cross_64"]
    assert len(grid64) == len(set(map(tuple, grid64))) == 4 * 3 * 2 + 2 * 3 * 2  # bq x st x split
    assert all(w == 4 or bq >= 64 for bq, w, _, _ in grid64)
    assert {sp for *_, sp in got["sd21_cross_48"]} == {True}  # head dim 64: one chunk either way
    assert max(bq for bq, *_ in got["sd15_cross_8"]) == 64  # clamped to 64 query rows
    # flash's grid gets programs of 16 and 32 query rows at short key sets only
    assert got["flash"] == {"sd15_cross_64": [16, 32, 64, 128], "sd15_self_32": [64, 128]}


def test_bench_summary_and_autotune_choice():
    """bench_attention's summary counts `cross` among ours (with its kernel time where
    measured), and make_autotune records it where it is the fastest correct one."""
    from experiments import bench_attention, make_autotune
    from sdjax import autotune

    rows = [
        dict(shape="sd15_cross_64", impl="flash", ms=0.016, ok=True, rel_err=3e-4),
        dict(shape="sd15_cross_64", impl="cross", ms=0.012, ok=True, rel_err=3e-4, kernel_us=9.0),
        dict(shape="sd15_cross_64", impl="cudnn", ms=0.020, ok=True, rel_err=3e-4),
        dict(shape="sd15_cross_8", impl="flash", ms=0.007, ok=True, rel_err=3e-4),
        dict(shape="sd15_cross_8", impl="cross", ms=0.005, ok=False, rel_err=0.5),
    ]
    summary = {s["shape"]: s for s in bench_attention.summary(rows)}
    assert summary["sd15_cross_64"]["ours_impl"] == "cross"
    assert summary["sd15_cross_64"]["cross_us"] == 9.0
    assert summary["sd15_cross_64"]["cudnn/ours"] == pytest.approx(0.020 / 0.012)
    assert summary["sd15_cross_8"]["ours_impl"] == "flash"  # the faster one is wrong
    choices = make_autotune.attention_choices({"dtype": "float16", "rows": rows})
    s64, s8 = ATTENTION_SHAPES["sd15_cross_64"], ATTENTION_SHAPES["sd15_cross_8"]
    key = lambda s: autotune.shape_key("attention", s.q_shape, s.kv_shape, "float16")  # noqa: E731
    assert choices == {key(s64): "cross", key(s8): "flash"}
