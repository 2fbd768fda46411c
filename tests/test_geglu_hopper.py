"""The Hopper (Mosaic GPU) GEGLU kernel against the float32 reference.

On the CPU the kernel runs in Mosaic GPU's interpret mode, which simulates the warpgroups,
the shared memory (fresh memory holds NaN), the TMA copies (an out-of-bounds read raises)
and the barriers. Its matrix products there are plain float32 dots of the same shared-memory
tiles: the wgmma lowering itself is tested by the `gpu` tests on the device.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from custom_calls.geglu import geglu_reference
from custom_calls.geglu_hopper import (
    HopperConfig,
    geglu_hopper,
    heuristic_config,
    layer_norm_fold,
    layer_norm_geglu_reference,
    supports,
)
from sdjax.shapes import GEGLU_SHAPES
from tests._subprocess import last_json_line, run_python

TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 5e-3}


def _inputs(rng, x_shape, d, f, dtype):
    def draw(shape, scale):
        return jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32), dtype)

    # w scaled so that the gate's values span GELU's curved part and both tails
    return draw(x_shape, 1.0), draw((d, 2 * f), 2.0 / np.sqrt(d)), draw((2 * f,), 1.0)


def _relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# (x shape, D, F, dtype, config). Covering set: each consumer's ring refilled (reduction
# steps > stages), one stage, several column tiles (block_n 64), an odd number of tiles in a
# program (one consumer has one more), more programs than tiles, batch 3 in x's leading axes,
# both dtypes.
CASES = [
    ((256, 128), 128, 128, jnp.float16, HopperConfig(programs=2)),
    ((3, 128, 192), 192, 128, jnp.bfloat16, HopperConfig(block_n=64, stages=2, programs=2)),
    ((128, 320), 320, 192, jnp.float16, HopperConfig(block_n=64, stages=1, programs=3)),
    ((320, 64), 64, 128, jnp.bfloat16, HopperConfig(programs=2)),
    ((64, 128), 128, 64, jnp.float16, HopperConfig(block_n=64, programs=4)),
    # each step's ring slot released one step late
    ((256, 320), 320, 256, jnp.bfloat16, HopperConfig(delay_release=True, programs=2)),
    ((192, 256), 256, 128, jnp.float16, HopperConfig(block_n=64, stages=3, delay_release=True,
                                                     programs=2)),
    # reduction steps of 128 (two swizzled column tiles of x per step)
    ((128, 384), 384, 128, jnp.float16, HopperConfig(block_n=64, block_k=128, programs=2)),
    # one ring for both consumers: fewer slots than a tile's steps; more slots than a tile's
    # steps (the ring spans tiles) with an odd tile count per program; steps released late
    ((256, 320), 320, 256, jnp.float16, HopperConfig(block_n=64, stages=3, shared_ring=True,
                                                     programs=2)),
    ((3, 128, 192), 192, 128, jnp.bfloat16, HopperConfig(block_n=64, stages=8,
                                                         shared_ring=True, programs=5)),
    ((256, 256), 256, 128, jnp.float16, HopperConfig(block_n=64, stages=5, shared_ring=True,
                                                     delay_release=True, programs=3)),
    # the accumulators start at the biases (an odd tile count: both bias buffers in use)
    ((192, 256), 256, 128, jnp.bfloat16, HopperConfig(block_n=64, stages=3, shared_ring=True,
                                                      bias_in_acc=True, programs=2)),
    # x resident in shared memory, one program per row block and column group: the groups
    # chosen for 2 SMs (one group: three tiles a program, an odd count); three groups of one
    # tile (the second consumer idle); groups of two with more ring slots than a tile's
    # steps, steps released late; batch 3 in x's leading axes with the biases in the
    # accumulators
    ((128, 320), 320, 192, jnp.float16, HopperConfig(block_n=64, stages=3, shared_ring=True,
                                                     x_resident=True, programs=2)),
    ((128, 192), 192, 192, jnp.bfloat16, HopperConfig(block_n=64, stages=2, shared_ring=True,
                                                      x_resident=True, column_groups=3)),
    ((64, 256), 256, 256, jnp.float16, HopperConfig(block_n=64, stages=6, shared_ring=True,
                                                    delay_release=True, x_resident=True,
                                                    column_groups=2)),
    ((3, 64, 128), 128, 256, jnp.bfloat16, HopperConfig(stages=2, shared_ring=True,
                                                        bias_in_acc=True, x_resident=True)),
]


def _case_id(case):
    x_shape, d, f, dt, c = case
    shape = "x".join(map(str, x_shape))
    late = "d" if c.delay_release else ""
    deep = f"k{c.block_k}" if c.block_k != 64 else ""
    shared = "r" if c.shared_ring else ""
    bias = "b" if c.bias_in_acc else ""
    resident = f"x{c.column_groups or ''}" if c.x_resident else ""
    return (f"{shape}:{d}x{f}:{jnp.dtype(dt).name}:n{c.block_n}s{c.stages}p{c.programs}"
            f"{late}{deep}{shared}{bias}{resident}")  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, rng):
    x_shape, d, f, dtype, config = case
    x, w, b = _inputs(rng, x_shape, d, f, dtype)
    out = geglu_hopper(x, w, b, config=config, interpret=True)
    assert out.shape == (*x_shape[:-1], f) and out.dtype == dtype
    assert _relative_error(out, geglu_reference(x, w, b)) <= TOLERANCE[dtype]


def test_columns_and_rows_land_in_place(rng):
    """Distinct values in every row and column: a tile written to the wrong place, or the
    gate read from the hidden half, cannot pass."""
    x, w, b = _inputs(rng, (256, 64), 64, 128, jnp.float16)
    w = w.at[:, 128:].add(1.0)  # the gate half differs from the hidden half
    out = geglu_hopper(
        x, w, b, config=HopperConfig(block_n=64, stages=1, programs=3), interpret=True
    )
    ref = np.asarray(geglu_reference(x, w, b), np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "dtype", "config", "why"),
    [
        ((100, 64), (64, 256), jnp.float16, HopperConfig(), "M=100 is not a positive multiple"),
        ((128, 80), (80, 256), jnp.float16, HopperConfig(), "D=80 is not a multiple of"),
        ((128, 64), (64, 160), jnp.float16, HopperConfig(), "F=80 is not a multiple of"),
        ((128, 64), (64, 256), jnp.float32, HopperConfig(), "fp16/bf16 only"),
        ((128, 512), (512, 1024), jnp.float16, HopperConfig(block_n=512, stages=8), "shared"),
        # resident x: 64 rows of SD1.5's 16x16 level (D = 1280) leave no room for the ring
        ((512, 1280), (1280, 10240), jnp.float16,
         HopperConfig(stages=4, shared_ring=True, x_resident=True), "shared memory"),
        ((128, 64), (64, 768), jnp.float16,
         HopperConfig(shared_ring=True, x_resident=True, column_groups=2), "column tiles"),
    ],
)  # fmt: skip
def test_supports_says_why(x_shape, w_shape, dtype, config, why):
    assert why in supports(x_shape, w_shape, dtype, config)
    x = jnp.zeros(x_shape, dtype)
    w = jnp.zeros(w_shape, dtype)
    with pytest.raises(ValueError, match="geglu_hopper cannot run"):
        geglu_hopper(x, w, jnp.zeros((w_shape[1],), dtype), config=config, interpret=True)


def test_supported_sd_shapes():
    """Every SD1.5 and SD2.1 GEGLU (batch 2 with guidance) is in scope with the heuristic's
    tiles but SD2.1's 12x12 level (288 tokens; the Triton kernel takes it)."""
    for name, s in GEGLU_SHAPES.items():
        why = supports(s.x_shape, (s.x_shape[-1], 2 * s.inner), jnp.float16)
        assert (why is None) == (name != "sd21_12"), (name, why)


def test_heuristic_keeps_the_sms_busy():
    assert heuristic_config(4096, 1280, 2560).block_n == 128  # 64 x 20 tiles
    assert heuristic_config(128, 1280, 2560).block_n == 64  # 2 x 40 tiles rather than 2 x 20
    # SD1.5's three levels: the measured configs (shared rings, clusters of 2)
    assert heuristic_config(8192, 320, 1280) == HopperConfig(block_n=128, stages=4, cluster=2,
                                                             shared_ring=True)  # fmt: skip
    assert heuristic_config(2048, 640, 2560).cluster == 2
    assert heuristic_config(512, 1280, 5120).shared_ring
    # 3 tiles of 64 rows: no cluster pairs, so not the measured config
    assert heuristic_config(192, 640, 2560) == HopperConfig(block_n=64)


def test_interpret_mode_runs_the_clustered_shapes_unclustered(rng):
    x, w, b = _inputs(rng, (128, 640), 640, 2560, jnp.float16)
    assert heuristic_config(128, 640, 2560).cluster == 2
    out = geglu_hopper(x, w, b, interpret=True)  # the heuristic's tiles, one program each
    assert _relative_error(out, geglu_reference(x, w, b)) <= TOLERANCE[jnp.float16]


def test_rejects_bad_configs_and_inputs():
    for bad in (dict(block_n=96), dict(block_k=32), dict(stages=0), dict(programs=0),
                dict(cluster=3), dict(cluster=8), dict(stages=1, delay_release=True),
                dict(x_resident=True), dict(column_groups=2),
                dict(shared_ring=True, x_resident=True, column_groups=0)):  # fmt: skip
        with pytest.raises(ValueError):
            HopperConfig(**bad)
    x = jnp.zeros((128, 64), jnp.float16)
    with pytest.raises(ValueError, match=r"w \[D, 2F\]"):
        geglu_hopper(x, jnp.zeros((32, 256), jnp.float16), jnp.zeros((256,), jnp.float16))
    with pytest.raises(ValueError, match="bias must be"):
        geglu_hopper(x, jnp.zeros((64, 256), jnp.float16), jnp.zeros((128,), jnp.float16))


def test_clusters_need_whole_cluster_tiles_and_the_gpu():
    # a cluster's tile is 64 * cluster rows
    assert supports((192, 128), (128, 256), jnp.float16, HopperConfig(cluster=2)) == (
        "M=192 is not a positive multiple of 128 (64 x cluster)"
    )
    assert supports((256, 128), (128, 256), jnp.float16, HopperConfig(cluster=4)) is None
    x, w, b = (jnp.ones(s, jnp.float16) for s in ((256, 128), (128, 256), (256,)))
    with pytest.raises(ValueError, match="clusters .* need the GPU"):
        geglu_hopper(x, w, b, config=HopperConfig(cluster=2), interpret=True)


def _on_hopper() -> bool:
    import jax

    return getattr(jax.devices()[0], "compute_capability", "") == "9.0"


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in GEGLU_SHAPES if n.startswith("sd15")])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_sd_shapes(name, dtype, rng):
    assert _on_hopper(), "the Hopper kernel's GPU tests need compute capability 9.0"
    s = GEGLU_SHAPES[name]
    x, w, b = _inputs(rng, s.x_shape, s.x_shape[-1], s.inner, dtype)
    out = geglu_hopper(x, w, b)
    assert _relative_error(out, geglu_reference(x, w, b)) <= TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [HopperConfig(block_n=64), HopperConfig(stages=1), HopperConfig(block_n=64, stages=3),
     HopperConfig(programs=7), HopperConfig(delay_release=True),
     HopperConfig(block_n=64, stages=3, delay_release=True),
     HopperConfig(block_n=64, block_k=128, stages=2),
     HopperConfig(block_n=64, stages=8, shared_ring=True),
     HopperConfig(stages=4, shared_ring=True, delay_release=True),
     HopperConfig(block_n=64, stages=8, shared_ring=True, bias_in_acc=True)],
)  # fmt: skip
def test_gpu_configs(config, rng):
    x, w, b = _inputs(rng, (2, 1024, 640), 640, 2560, jnp.float16)
    out = geglu_hopper(x, w, b, config=config)
    assert _relative_error(out, geglu_reference(x, w, b)) <= TOLERANCE[jnp.float16]


# Clusters (TMA multicast of w, a cluster barrier per ring slot): SD1.5's three levels, a
# program count that leaves the clusters an uneven number of tiles, one stage (every step
# waits on the whole cluster), batch 3 in x's leading axes, bf16.
CLUSTER_CASES = [
    ((2, 4096, 320), 320, 1280, jnp.float16, HopperConfig(cluster=2)),
    ((2, 1024, 640), 640, 2560, jnp.float16, HopperConfig(block_n=64, stages=3, cluster=4)),
    ((2, 256, 1280), 1280, 5120, jnp.float16, HopperConfig(block_n=64, stages=4, cluster=2)),
    ((2, 256, 1280), 1280, 5120, jnp.bfloat16, HopperConfig(cluster=4)),
    ((3, 256, 640), 640, 2560, jnp.float16, HopperConfig(block_n=64, stages=1, cluster=2,
                                                         programs=14)),
    ((2, 4096, 320), 320, 1280, jnp.float16, HopperConfig(block_n=64, stages=4, cluster=2,
                                                          delay_release=True)),
    ((2, 256, 1280), 1280, 5120, jnp.float16, HopperConfig(stages=2, cluster=2,
                                                           delay_release=True)),
    ((2, 1024, 640), 640, 2560, jnp.float16, HopperConfig(block_n=64, block_k=128, stages=2,
                                                          cluster=2)),
    ((2, 4096, 320), 320, 1280, jnp.float16, HopperConfig(block_n=64, stages=8, cluster=2,
                                                          shared_ring=True)),
    ((3, 256, 640), 640, 2560, jnp.bfloat16, HopperConfig(stages=4, cluster=2, programs=14,
                                                          shared_ring=True)),
    ((2, 4096, 320), 320, 1280, jnp.float16, HopperConfig(stages=4, cluster=2, shared_ring=True,
                                                          bias_in_acc=True)),
    # x resident (each program's rows of x loaded once): SD1.5's 64x64 and 32x32 levels with
    # the groups chosen for the device, and explicit groups, bf16
    ((2, 4096, 320), 320, 1280, jnp.float16, HopperConfig(stages=4, cluster=2, shared_ring=True,
                                                          x_resident=True)),
    ((2, 1024, 640), 640, 2560, jnp.float16, HopperConfig(stages=3, cluster=2, shared_ring=True,
                                                          x_resident=True)),
    ((2, 1024, 640), 640, 2560, jnp.bfloat16, HopperConfig(stages=3, shared_ring=True,
                                                           x_resident=True, column_groups=5)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CLUSTER_CASES, ids=lambda c: _case_id(c) + f"c{c[-1].cluster}")
def test_gpu_clusters(case, rng):
    x_shape, d, f, dtype, config = case
    x, w, b = _inputs(rng, x_shape, d, f, dtype)
    ref = geglu_reference(x, w, b)
    out = geglu_hopper(x, w, b, config=config)
    assert out.shape == ref.shape
    assert _relative_error(out, ref) <= TOLERANCE[dtype]
    # the same output again: no slot overwritten before every program of the cluster used it
    np.testing.assert_array_equal(np.asarray(geglu_hopper(x, w, b, config=config)), out)


@pytest.mark.gpu
def test_gpu_hlo_has_mosaic_kernel(rng):
    import jax

    from sdjax.hlo import count_hlo

    x, w, b = _inputs(rng, (256, 320), 320, 1280, jnp.float16)
    hlo = jax.jit(geglu_hopper).lower(x, w, b).compile().as_text()
    assert "mosaic_gpu" in hlo
    assert any(n.startswith("sdjax_geglu_hopper") for n in count_hlo(hlo)["sdjax_kernels"])


def test_hlo_report_looks_for_the_kernel_by_name():
    from sdjax.hlo import expected_kernels
    from sdjax.ops import Implementations

    assert expected_kernels(Implementations(geglu="pallas_hopper")) == {"sdjax_geglu_hopper"}


def test_bench_sweep_grids():
    """bench_norm's Hopper GEGLU grids (in a subprocess: the script defines absl flags)."""

    code = """
import json
import jax.numpy as jnp
from experiments import bench_norm
out = {}
for label, grid, shape in (("tiles", "tiles", (8192, 320, 1280)),
                           ("issue", "issue", (8192, 320, 1280)),
                           ("deep", "deep", (2048, 640, 2560)),
                           ("deep_64", "deep", (8192, 320, 1280)),
                           ("ring", "ring", (8192, 320, 1280)),
                           ("ring_issue", "ring_issue", (8192, 320, 1280)),
                           ("bias", "bias", (8192, 320, 1280)),
                           ("resident", "resident", (8192, 320, 1280)),
                           ("resident_16", "resident", (512, 1280, 5120))):
    cfgs = bench_norm.hopper_geglu_candidates(*shape, jnp.float16, grid)
    out[label] = [[c.cluster, c.block_n, c.stages, c.delay_release, c.block_k] for c in cfgs]
    if grid.startswith("ring"):
        out[label + "_shared"] = [c.shared_ring for c in cfgs]
    if grid == "resident":
        out[label + "_x"] = [c.x_resident for c in cfgs]
    if grid == "bias":
        out["bias_flags"] = [c.bias_in_acc for c in cfgs]
        out["bias_same"] = all(c == cfgs[0] for c in cfgs[::2])
try:
    bench_norm.hopper_geglu_candidates(8192, 320, 1280, jnp.float16, "all")
except ValueError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""
    out = last_json_line(run_python(code))
    assert not any(delay for *_, delay, _ in out["tiles"])
    assert {k for *_, k in out["tiles"] + out["issue"]} == {64}
    assert {c for c, *_ in out["tiles"]} == {1, 2, 4}
    issue = out["issue"]
    assert {c for c, *_ in issue} == {1, 2} and {s for _, _, s, *_ in issue} == {2, 3, 4}
    # every tile config that fits shared memory (block_n 64 at 2-4 stages, 128 at 2 here)
    # twice, with and without delay_release
    assert len(issue) == 2 * (3 + 1) * 2 and len({tuple(c) for c in issue}) == len(issue)
    # steps of 128: D = 640 has five, D = 320 none (not a multiple of 128)
    deep = out["deep"]
    assert deep and {k for *_, k in deep} == {128} and not out["deep_64"]
    assert {c for c, *_ in deep} == {1, 2} and {s for _, _, s, *_ in deep} <= {2, 3}
    assert "unknown Hopper GEGLU grid" in out["error"]
    # the heuristic's config first (itself a shared ring here, since the eleventh session),
    # then shared rings only, every one fitting shared memory
    assert all(out["ring_shared"])
    assert len(out["ring"]) >= 9 and {c for c, *_ in out["ring"][1:]} == {1, 2}
    # bias: the heuristic's config without and with bias_in_acc, twice
    assert out["bias_flags"] == [False, True, False, True] and out["bias_same"]
    assert out["bias"][0] == out["ring"][0]
    # ring_issue: the ring grid's configs, each with and without delay_release
    assert all(out["ring_issue_shared"]) and out["ring_issue"][0] == out["ring"][0]
    swept = out["ring_issue"][1:]
    assert len(swept) == 2 * (len(out["ring"]) - 1)
    assert sorted(c for c in swept if not c[3]) == sorted(out["ring"][1:])
    assert sorted(c[:3] + c[4:] for c in swept if c[3]) == sorted(c[:3] + c[4:] for c in out["ring"][1:])
    # resident: the heuristic's config first and last, x-resident configs between (each
    # fitting shared memory); at SD1.5's 16x16 level (D = 1280) none fits
    res = out["resident"]
    assert res[0] == res[-1] == out["ring"][0] and out["resident_x"][0] is False
    assert all(out["resident_x"][1:-1]) and len(res) == 2 + 2 * 4
    assert out["resident_16_x"] == [False, False]


# ---- the LayerNorm folded in (`norm_scale`) ----------------------------------------------


def _norm_inputs(rng, x_shape, d, f, dtype, mean=30.0):
    """x whose rows have means ~`mean` against a spread of 2 (the folded form's hard case:
    its statistics must not cancel), a LayerNorm's scale and bias, and the GEGLU's w, b."""
    lead = x_shape[:-1]
    x = 2.0 * rng.standard_normal(x_shape) + mean * rng.standard_normal((*lead, 1))
    scale = 1.0 + 0.5 * rng.standard_normal(d)
    bias = rng.standard_normal(d)
    _, w, b = _inputs(rng, (1, d), d, f, dtype)
    return jnp.asarray(x, dtype), jnp.asarray(scale, dtype), jnp.asarray(bias, dtype), w, b


def _folded(x, scale, bias, w, b, *, jitted=True, **kw):
    """The folded kernel on a LayerNorm's weights (jitted=False: its un-jitted entry point,
    traced afresh)."""
    folded_bias, colsum = layer_norm_fold(scale, bias, w, b)
    fn = geglu_hopper if jitted else geglu_hopper.__wrapped__
    return fn(x, w, folded_bias, norm_scale=scale, norm_colsum=colsum, **kw)


# Covering set: several column tiles per row block (the statistics made again by each), a
# ring refilled within a tile (two stages, four steps), one shared ring, steps of 128 columns,
# batch 3 in x's leading axes, both dtypes.
NORM_CASES = [
    ((128, 128), 128, 128, jnp.float16, HopperConfig(block_n=64, programs=2)),
    ((3, 64, 192), 192, 128, jnp.bfloat16, HopperConfig(block_n=64, stages=2, shared_ring=True,
                                                        programs=2)),
    ((192, 256), 256, 64, jnp.float16, HopperConfig(block_n=64, stages=2, programs=3)),
    ((128, 256), 256, 64, jnp.float16, HopperConfig(block_n=64, block_k=128, programs=2)),
]  # fmt: skip


@pytest.mark.parametrize("case", NORM_CASES, ids=_case_id)
def test_folded_layer_norm_matches_reference(case, rng):
    x_shape, d, f, dtype, config = case
    x, scale, bias, w, b = _norm_inputs(rng, x_shape, d, f, dtype)
    out = _folded(x, scale, bias, w, b, config=config, interpret=True)
    assert out.shape == (*x_shape[:-1], f) and out.dtype == dtype
    ref = layer_norm_geglu_reference(x, scale, bias, w, b)
    assert _relative_error(out, ref) <= TOLERANCE[dtype]


def test_folded_layer_norm_makes_colsum_itself_and_takes_eps(rng):
    """Without norm_colsum the kernel's caller makes it; eps reaches the epilogue (rows of
    spread ~0.1, where eps = 0.1 changes the output by far more than the tolerance)."""
    x, scale, bias, w, b = _norm_inputs(rng, (128, 128), 128, 64, jnp.float16, mean=1.0)
    x = (x * 0.05).astype(jnp.float16)
    folded_bias, _ = layer_norm_fold(scale, bias, w, b)
    config = HopperConfig(block_n=64, programs=2)
    for eps in (1e-5, 1e-1):
        out = geglu_hopper(x, w, folded_bias, norm_scale=scale, eps=eps, config=config,
                           interpret=True)  # fmt: skip
        ref = layer_norm_geglu_reference(x, scale, bias, w, b, eps=eps)
        assert _relative_error(out, ref) <= TOLERANCE[jnp.float16]
    other = layer_norm_geglu_reference(x, scale, bias, w, b, eps=1e-5)
    assert _relative_error(out, other) > 10 * TOLERANCE[jnp.float16]


def test_folded_layer_norm_scope_and_bad_inputs():
    assert "without delay_release" in supports(
        (128, 128), (128, 256), jnp.float16, HopperConfig(delay_release=True, stages=2), norm=True
    )
    assert "stages >= 2" in supports((128, 128), (128, 256), jnp.float16,
                                     HopperConfig(stages=1), norm=True)  # fmt: skip
    # one reduction step: no next tile to normalize early, so one stage will do
    assert supports((128, 64), (64, 256), jnp.float16, HopperConfig(stages=1), norm=True) is None
    assert supports((128, 128), (128, 256), jnp.float16, HopperConfig(), norm=True) is None
    x, w, b = jnp.ones((128, 128), jnp.float16), jnp.ones((128, 256), jnp.float16), jnp.ones(256)
    with pytest.raises(ValueError, match="norm_scale must be"):
        geglu_hopper(x, w, b, norm_scale=jnp.ones(64), interpret=True)
    with pytest.raises(ValueError, match="norm_colsum must be"):
        geglu_hopper(x, w, b, norm_scale=jnp.ones(128), norm_colsum=jnp.ones(128),
                     interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="norm_colsum without norm_scale"):
        geglu_hopper(x, w, b, norm_colsum=jnp.ones(256), interpret=True)
    with pytest.raises(ValueError, match="geglu_hopper cannot run"):
        geglu_hopper(x, w, b, norm_scale=jnp.ones(128), interpret=True,
                     config=HopperConfig(stages=2, bias_in_acc=True))  # fmt: skip


def test_folded_layer_norm_ablations_run_and_are_wrong(rng, monkeypatch):
    """The timing-only ablations (`_NORM_ABLATE`, for `bench_norm --ln_geglu_ablate`) trace
    and run, and their outputs are not the LayerNorm's (so nothing mistakes them for it)."""
    import importlib

    # (the package's `geglu_hopper` attribute is the function: the module by its name)
    gh = importlib.import_module("custom_calls.geglu_hopper")
    x, scale, bias, w, b = _norm_inputs(rng, (64, 128), 128, 64, jnp.float16, mean=3.0)
    ref = layer_norm_geglu_reference(x, scale, bias, w, b)
    for parts in (("stats",), ("store",), ("stats", "store")):
        monkeypatch.setattr(gh, "_NORM_ABLATE", frozenset(parts))
        out = _folded(x, scale, bias, w, b, jitted=False, config=HopperConfig(block_n=64),
                      interpret=True)  # fmt: skip
        assert out.shape == ref.shape
        # (without the statistics rstd is 1 / sqrt(eps): outputs overflow to inf)
        assert not np.allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               rtol=0.1, atol=0.1), parts  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in GEGLU_SHAPES if n.startswith("sd15")])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_folded_layer_norm_sd_shapes(name, dtype, rng):
    """SD1.5's levels with the heuristic's configs (clusters of 2, one shared ring); the same
    output twice (no slot rewritten before its products read it)."""
    assert _on_hopper(), "the Hopper kernel's GPU tests need compute capability 9.0"
    s = GEGLU_SHAPES[name]
    x, scale, bias, w, b = _norm_inputs(rng, s.x_shape, s.x_shape[-1], s.inner, dtype)
    out = _folded(x, scale, bias, w, b)
    ref = layer_norm_geglu_reference(x, scale, bias, w, b)
    assert _relative_error(out, ref) <= TOLERANCE[dtype]
    np.testing.assert_array_equal(np.asarray(_folded(x, scale, bias, w, b)), out)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [HopperConfig(block_n=64), HopperConfig(stages=2), HopperConfig(block_n=64, stages=3),
     HopperConfig(block_n=64, block_k=128, stages=2),
     HopperConfig(block_n=64, stages=8, shared_ring=True),
     HopperConfig(stages=4, cluster=2, shared_ring=True, programs=14)],
)  # fmt: skip
def test_gpu_folded_layer_norm_configs(config, rng):
    x, scale, bias, w, b = _norm_inputs(rng, (3, 256, 640), 640, 2560, jnp.float16)
    out = _folded(x, scale, bias, w, b, config=config)
    ref = layer_norm_geglu_reference(x, scale, bias, w, b)
    assert _relative_error(out, ref) <= TOLERANCE[jnp.float16]
