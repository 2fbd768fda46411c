"""GroupNorm(+activation), LayerNorm and GEGLU Pallas kernels against their float32 references.

CPU: Pallas interpret mode on SD's channel counts with H and W scaled down (a covering set of
dtypes, activations, plans and masks, not a Cartesian product). GPU (`-m gpu`): real SD
shapes, and the kernels' names in the compiled HLO.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from custom_calls import (
    geglu,
    geglu_elementwise,
    geglu_reference,
    group_norm,
    group_norm_reference,
    group_statistics,
    group_statistics_reference,
    layer_norm,
    layer_norm_reference,
)
from custom_calls.geglu import Config as GegluConfig
from custom_calls.group_norm import Config
from custom_calls.layer_norm import Config as LayerNormConfig
from experiments.common import relative_error
from sdjax.shapes import GEGLU_SHAPES, GROUP_NORM_SHAPES, LAYER_NORM_SHAPES
from tests._subprocess import last_json_line, run_python

# Relative-norm tolerances. Both sides round to the output dtype, so this is about one ulp of it.
TOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}
DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
ACTIVATIONS = ("silu", None, "gelu", "gelu_tanh")


def _normal(rng, shape, dtype, *, mean=0.0, std=1.0):
    return jnp.asarray(rng.normal(mean, std, shape).astype(np.float32)).astype(dtype)


def _affine(rng, c):
    return _normal(rng, (c,), jnp.float32, mean=1.0, std=0.5), _normal(rng, (c,), jnp.float32)


def _check_group_norm(rng, shape, dtype, activation, config, *, groups=32, eps=1e-5, mean=0.0,
                      std=1.0):  # fmt: skip
    x = _normal(rng, shape, dtype, mean=mean, std=std)
    scale, bias = _affine(rng, shape[-1])
    kw = dict(groups=groups, eps=eps, activation=activation)
    out = group_norm(x, scale, bias, config=config, **kw)
    ref = group_norm_reference(x, scale, bias, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    err = relative_error(out, ref)
    assert err <= TOL[dtype], f"{shape=} {dtype=} {activation=} {config=}: {err=:.3g}"


def _patched_table(tmp_path, monkeypatch, entries: dict):
    """custom_calls.group_norm (the module) reading a GroupNorm table of `entries`
    ({shape: Config fields}, float16 keys, 32 groups) from tmp_path; callers clear the
    table's cache when done (`tuned_table.cache_clear()`)."""
    import importlib
    import json

    gn = importlib.import_module("custom_calls.group_norm")  # the module, not the function
    configs = {gn.shape_key(shape, jnp.float16, 32): e for shape, e in entries.items()}
    table = tmp_path / "group_norm.json"
    table.write_text(json.dumps({"configs": configs}))
    monkeypatch.setattr(gn, "TUNING_PATH", table)
    gn.tuned_table.cache_clear()
    return gn


# Every channel count of the SD1.5 UNet and VAE decoder (cpg 4, 8, 10, 16, 20, 30, 40, 60, 80),
# each with one plan: split (in-kernel or XLA combine) or fused, and odd spatial sizes.
_CHANNELS = sorted({s.shape[-1] for s in GROUP_NORM_SHAPES.values()})
_PLANS = (
    Config(mode="split", block_rows=4, stats_rows=12, norm_rows=8),  # 3 partials: masked
    Config(mode="fused", block_rows=8, block_groups=4),
    Config(mode="split", block_rows=2, stats_rows=4, norm_rows=16, combine_in_kernel=False),
    None,  # the heuristic
    Config(mode="split", block_rows=4, stats_rows=8, norm_rows=8, combine_in_kernel=False,
           xla_combine="sums"),  # fmt: skip
    Config(mode="split", block_rows=4, stats_rows=12, norm_rows=8, last_combine=True),
    # interpret mode: the split plan's two kernels over the cooperative programs' rows
    Config(mode="cooperative", block_rows=4, stats_rows=12),
    # every tile of a program loaded first (the last program's tiles partly or wholly past
    # the end at odd sizes), combined in the kernel and by XLA
    Config(mode="split", block_rows=4, stats_rows=12, norm_rows=8, prefetch=True),
    Config(mode="split", block_rows=2, stats_rows=8, norm_rows=4, combine_in_kernel=False,
           xla_combine="sums", prefetch=True),  # fmt: skip
)
_SPATIAL = ((1, 8, 8), (2, 6, 5), (3, 4, 8), (1, 5, 7))


def _channel_cases(plans) -> list:
    """Every SD channel count, each with the next spatial size, dtype, activation and plan."""
    return [
        ((n, h, w, c), dtype, act, plan)
        for c, (n, h, w), dtype, act, plan in zip(
            _CHANNELS,
            itertools.cycle(_SPATIAL),
            itertools.cycle(DTYPES),
            itertools.cycle(ACTIVATIONS),
            itertools.cycle(plans),
        )
    ]


_CASES = _channel_cases(_PLANS)


def test_channel_set_is_sd():
    assert _CHANNELS == [128, 256, 320, 512, 640, 960, 1280, 1920, 2560]


def _case_id(case):
    shape, dtype, activation, config = case
    plan = "heuristic" if config is None else config.mode
    if config is not None and config.mode == "split" and not config.combine_in_kernel:
        plan += f"-xla_combine_{config.xla_combine}"
    if config is not None and config.prefetch:
        plan += "-prefetch"
    return f"{'x'.join(map(str, shape))}-{jnp.dtype(dtype).name}-{activation}-{plan}"


@pytest.mark.parametrize("shape,dtype,activation,config", _CASES, ids=map(_case_id, _CASES))
def test_group_norm_channels(rng, shape, dtype, activation, config):
    _check_group_norm(rng, shape, dtype, activation, config)


# The columns plan at every SD channel count (odd sizes: masked rows and chunks; C padded to a
# power of two: masked columns), one dtype and activation each.
_COLUMN_PLANS = (
    Config(mode="columns", block_rows=4, stats_rows=12, norm_rows=8),  # 3+ partials, masked
    Config(mode="columns", block_rows=2, stats_rows=64, norm_rows=4, num_warps=8),  # one
)
_COLUMN_CASES = _channel_cases(_COLUMN_PLANS)


@pytest.mark.parametrize("shape,dtype,activation,config", _COLUMN_CASES,
                         ids=map(_case_id, _COLUMN_CASES))  # fmt: skip
def test_group_norm_columns_plan(rng, shape, dtype, activation, config):
    _check_group_norm(rng, shape, dtype, activation, config)


def test_group_norm_columns_plan_large_offset(rng):
    """A mean of 1000 with a spread of 0.01 (float32): the per-channel references keep the
    variance's digits through both combines and the normalize."""
    config = Config(mode="columns", block_rows=4, stats_rows=8, norm_rows=8)
    _check_group_norm(rng, (2, 6, 5, 320), jnp.float32, "silu", config, mean=1000.0, std=0.01)


@pytest.mark.parametrize(
    "shape,dtype,activation,config",
    [
        # the groups' tiles read once and held (4 tiles; 3 with the last one masked)
        ((1, 8, 8, 320), jnp.float16, "silu", Config(mode="fused", block_rows=16, block_groups=1,
                                                     prefetch=True)),  # fmt: skip
        ((3, 5, 7, 640), jnp.float32, None, Config(mode="fused", block_rows=16, block_groups=4,
                                                   prefetch=True)),  # fmt: skip
        # 32 tiles: more than PREFETCH_MAX_TILES, so read twice as without prefetch
        ((2, 16, 16, 128), jnp.bfloat16, "gelu", Config(mode="fused", block_rows=8,
                                                        block_groups=8, prefetch=True)),  # fmt: skip
    ],
    ids=["held_4_tiles", "held_masked", "too_many_tiles"],
)
def test_group_norm_fused_prefetch(rng, shape, dtype, activation, config):
    _check_group_norm(rng, shape, dtype, activation, config)


@pytest.mark.parametrize(
    "config",
    [
        Config(mode="split", block_rows=4, stats_rows=4, norm_rows=8),
        Config(mode="split", block_rows=4, stats_rows=4, norm_rows=8, combine_in_kernel=False,
               xla_combine="sums"),  # fmt: skip
        Config(mode="fused", block_rows=16, block_groups=16),
    ],
    ids=["split", "split_xla_sums", "fused"],
)
def test_group_norm_groups_not_power_of_two(rng, config):
    """24 groups: the padded 32-group tile and the 16-group blocks both need a group mask."""
    _check_group_norm(rng, (2, 5, 6, 96), jnp.float32, "gelu", config, groups=24)


@pytest.mark.parametrize(
    "config",
    [
        Config(mode="split", block_rows=4, stats_rows=8, norm_rows=16),
        Config(mode="split", block_rows=4, stats_rows=8, norm_rows=16, combine_in_kernel=False),
        Config(mode="split", block_rows=4, stats_rows=8, norm_rows=16, combine_in_kernel=False,
               xla_combine="sums"),  # fmt: skip
        Config(mode="fused", block_rows=16, block_groups=8),
        Config(mode="split", block_rows=4, stats_rows=8, norm_rows=16, last_combine=True),
    ],
    ids=["split", "split_xla_combine", "split_xla_sums", "fused", "split_last_combine"],
)
def test_group_norm_large_offset(rng, config):
    """Mean 1000, std 0.01 in float32, against a float64 numpy reference."""
    x = _normal(rng, (1, 8, 8, 320), jnp.float32, mean=1000.0, std=0.01)
    scale, bias = _affine(rng, 320)
    out = group_norm(x, scale, bias, groups=32, activation=None, config=config)
    xg = np.asarray(x, np.float64).reshape(1, -1, 32, 10)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    ref = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * np.asarray(scale) + np.asarray(
        bias
    )
    assert relative_error(out, ref) <= 1e-5


def test_cooperative_launch_needs_every_program_resident(rng):
    """The grid barrier needs all N * ceil(S / stats_rows) programs resident: more than the
    device's SMs is refused before anything is launched (off the GPU `num_sms()` is 2)."""
    x = _normal(rng, (2, 4, 4, 64), jnp.float16)
    scale, bias = _affine(rng, 64)
    config = Config(mode="cooperative", block_rows=4, stats_rows=4)  # 2 x 4 programs
    with pytest.raises(ValueError, match="exceeds the device's 2 SMs"):
        group_norm(x, scale, bias, config=config, interpret=False)
    with pytest.raises(ValueError, match="multiple of"):
        Config(mode="cooperative", block_rows=8, stats_rows=12)
    with pytest.raises(ValueError, match="unknown"):
        Config(mode="grid")


def test_cooperative_kernel_traces_off_the_gpu(monkeypatch):
    """Interpret mode never runs the cooperative kernel (its programs would wait on each
    other): trace its body for the GPU instead, so that a Python error in it shows here."""
    import importlib

    gn = importlib.import_module("custom_calls.group_norm")  # the module, not the function
    monkeypatch.setattr(gn, "num_sms", lambda: 132)
    x = jnp.ones((2, 8, 8, 64), jnp.float16)
    config = Config(mode="cooperative", block_rows=4, stats_rows=8)

    def fn(x, scale, bias):
        return gn.group_norm(x, scale, bias, config=config, interpret=False, activation="silu")

    jaxpr = str(jax.jit(fn).trace(x, jnp.ones((64,)), jnp.zeros((64,))).jaxpr)
    assert "sdjax_group_norm_cooperative" in jaxpr and "atomic" in jaxpr and "while" in jaxpr


def test_group_norm_large_offset_half(rng):
    """float16 far from zero (mean 200, std 1): statistics stay float32 and shifted."""
    _check_group_norm(rng, (1, 8, 8, 640), jnp.float16, "silu", None, mean=200.0)


def test_tuned_config_reads_the_table(tmp_path, monkeypatch):
    """group_norm's default config: the table's entry for the shape, else the heuristic."""
    shape = (2, 8, 8, 320)
    entry = dict(mode="split", block_rows=4, stats_rows=16, norm_rows=32, num_warps=8,
                 combine_in_kernel=False)  # fmt: skip
    gn = _patched_table(tmp_path, monkeypatch, {shape: entry})
    try:
        assert gn.shape_key(shape, jnp.bfloat16, 32) == "2x64x320:32:16bit"
        assert gn.tuned_config(shape, jnp.bfloat16) == Config(**entry)
        assert gn.tuned_config(shape, jnp.float32) == gn.heuristic_config(shape, jnp.float32)
        assert gn.tuned_config((2, 4, 4, 320), jnp.float16) == gn.heuristic_config(
            (2, 4, 4, 320), jnp.float16
        )
    finally:
        gn.tuned_table.cache_clear()


def test_tuned_config_borrows_another_batchs_entry(tmp_path, monkeypatch, rng):
    """An unmeasured batch takes the entry of the same spatial size and channels at the
    nearest measured batch (a guided UNet's shared first layers run at half the measured
    batch), and the kernel stays right with it."""
    two = dict(mode="split", block_rows=4, stats_rows=16, norm_rows=32, num_warps=8,
               combine_in_kernel=False)  # fmt: skip
    eight = dict(mode="fused", block_rows=16, block_groups=8)
    gn = _patched_table(tmp_path, monkeypatch, {(2, 8, 8, 320): two, (8, 8, 8, 320): eight})
    try:
        assert gn.tuned_config((1, 8, 8, 320), jnp.float16) == Config(**two)
        assert gn.tuned_config((3, 64, 320), jnp.float16) == Config(**two)  # S = 64 either way
        assert gn.tuned_config((6, 8, 8, 320), jnp.float16) == Config(**eight)
        # another channel count or width: no borrowing
        assert gn.tuned_config((1, 8, 8, 640), jnp.float16) == gn.heuristic_config(
            (1, 8, 8, 640), jnp.float16
        )
        assert gn.tuned_config((1, 8, 8, 320), jnp.float32) == gn.heuristic_config(
            (1, 8, 8, 320), jnp.float32
        )
        _check_group_norm(rng, (1, 8, 8, 320), jnp.float16, "silu", None)
    finally:
        gn.tuned_table.cache_clear()


def test_sweep_writes_the_fastest_accurate_config(tmp_path):
    """bench_norm's table update (in a subprocess: the script defines absl flags on import)."""
    import json

    code = """
import json, sys
from experiments import bench_norm
rows = [
    dict(shape="unet_64x64x320", mode="split", block_rows=8, stats_rows=64, norm_rows=64,
         combine_in_kernel=True, block_groups=32, num_warps=4, kernel_us=9.0, err=1e-4, ms=0.05),
    dict(shape="unet_64x64x320", mode="split", block_rows=8, stats_rows=32, norm_rows=32,
         combine_in_kernel=False, block_groups=32, num_warps=4, kernel_us=8.0, err=0.5, ms=0.05),
    dict(shape="unet_64x64x320", mode="fused", block_rows=8, stats_rows=64, norm_rows=64,
         combine_in_kernel=True, block_groups=1, num_warps=4, kernel_us=12.0, err=1e-4, ms=0.05),
    dict(shape="unet_8x8x1280", mode="fused", error="Boom", block_rows=8),
]
bench_norm.device_info = lambda: {"device_kind": "test"}
bench_norm.update_gn_table(rows, sys.argv[1], "float16")
"""
    path = tmp_path / "gn.json"
    path.write_text(json.dumps({"configs": {"1x1x32:32:16bit": {"mode": "fused"}}}))
    run_python(code, str(path))
    configs = json.loads(path.read_text())["configs"]
    assert configs["1x1x32:32:16bit"] == {"mode": "fused"}  # other entries kept
    # the 8 us row is the fastest but inaccurate: the 9 us one wins; the failed shape is absent
    best = Config(**configs["2x4096x320:32:16bit"])
    assert best.mode == "split" and best.stats_rows == 64 and best.combine_in_kernel
    assert not any(k.startswith("2x64x1280") for k in configs)


def test_cooperative_candidates_fit_the_device():
    """bench_norm's cooperative configs (subprocess: the script defines absl flags): every
    program resident (N * parts <= programs), tiles dividing the parts, and the plan in the
    candidate list only when asked for."""

    code = """
import json, math
from experiments import bench_norm
out = []
for shape in [(2, 64, 64, 320), (2, 16, 16, 2560), (1, 512, 512, 128), (3, 40, 40, 640)]:
    for programs in (132, 16):
        for c in bench_norm.cooperative_candidates(shape, 32, programs):
            s = math.prod(shape[1:-1])
            out.append([shape[0] * -(-s // c.stats_rows), programs, c.stats_rows % c.block_rows])
plans = {p: sorted({c.mode for c in bench_norm.group_norm_candidates((2, 64, 64, 320), 32, p)})
         for p in (("split",), ("cooperative",))}
ab = [(c.prefetch, c.num_warps)
      for c in bench_norm.group_norm_candidates((2, 64, 64, 320), 32, ("prefetch",))]
split = bench_norm.group_norm_candidates((2, 64, 64, 320), 32, ("split",))
ab.append(sum(c.prefetch for c in split) > 0 and len(split) == len(set(split)))
fused = [(c.mode, c.prefetch, c.num_warps)
         for c in bench_norm.group_norm_candidates((2, 16, 16, 1280), 32, ("prefetch",))]
combine = [c.combine_in_kernel
           for c in bench_norm.group_norm_candidates((2, 32, 32, 640), 32, ("combine",))]
columns = [(c.mode, c.block_rows, c.stats_rows, c.num_warps)
           for c in bench_norm.group_norm_candidates((2, 64, 64, 320), 32, ("columns",))]
print(json.dumps({"rows": out, "plans": {",".join(k): v for k, v in plans.items()}, "ab": ab,
                  "fused": fused, "combine": combine, "columns": columns}))
"""
    got = last_json_line(run_python(code))
    assert len(got["rows"]) >= 12
    for programs_used, programs, remainder in got["rows"]:
        assert programs_used <= programs and remainder == 0
    assert "cooperative" in got["plans"]["cooperative"]
    assert "cooperative" not in got["plans"]["split"]
    # the prefetch plan: the config in force (split there) against its prefetch twin, twice
    *ab, split_has_prefetch = got["ab"]
    (_, warps), *_ = ab  # the table's config without prefetch, with it, with it at 2x warps
    assert ab == 2 * [[False, warps], [True, warps], [True, min(2 * warps, 16)]]
    assert split_has_prefetch  # the full sweep also tries prefetch twins (no duplicates)
    assert got["combine"] == [False, True, False, True]  # XLA's combine, then the kernel's
    # the columns grid between two runs of the config in force: whole rows of 512 padded
    # channels, 8 or 16 a tile, chunks of 1-4 tiles, both warp counts
    first, *grid, last = got["columns"]
    assert first == last and first[0] == "split"
    assert {g[0] for g in grid} == {"columns"} and {g[1] for g in grid} == {8, 16}
    assert {g[3] for g in grid} == {4, 8} and all(g[2] % g[1] == 0 for g in grid)
    # a fused config in force: also its prefetch twin with twice the warps
    (mode, _, warps), *_ = got["fused"]
    assert mode == "fused"
    assert got["fused"] == 2 * [["fused", False, warps], ["fused", True, warps],
                                ["fused", True, 2 * warps]]  # fmt: skip


def test_layer_norm_candidates():
    """bench_norm's LayerNorm grid (subprocess: the script defines absl flags): the heuristic
    first, no duplicates, every program at most 32K padded elements, both warp counts."""
    code = """
import json
from experiments import bench_norm
from custom_calls.layer_norm import heuristic_config
out = {}
for shape in [(2, 4096, 320), (2, 64, 1280), (1, 7, 96)]:
    cands = bench_norm.layer_norm_candidates(shape)
    out["x".join(map(str, shape))] = {
        "first_is_heuristic": cands[0] == heuristic_config(shape, None),
        "unique": len(cands) == len(set(cands)),
        "rows_x_cpad": [c.block_rows * (1 << (shape[-1] - 1).bit_length()) for c in cands[1:]],
        "warps": sorted({c.num_warps for c in cands[1:]}),
    }
print(json.dumps(out))
"""
    got = last_json_line(run_python(code))
    assert set(got) == {"2x4096x320", "2x64x1280", "1x7x96"}
    for shape, c in got.items():
        assert c["first_is_heuristic"] and c["unique"], shape
        assert c["rows_x_cpad"] and max(c["rows_x_cpad"]) <= 1 << 15, shape
        assert c["warps"] == [4, 8], shape


@pytest.mark.parametrize(
    "shape, groups, config",
    [
        ((3, 5, 7, 40), 4, Config(mode="split", block_rows=4, stats_rows=12)),  # 3 partials
        ((2, 8, 8, 96), 32, None),  # tuned or heuristic: fused there, so split_config
        ((1, 6, 5, 30), 3, Config(mode="fused", block_rows=8)),  # fused given: split used
    ],
    ids=["partials", "default", "fused_given"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_statistics(rng, shape, groups, config, dtype):
    """Mean and M2 per group against the two-pass reference, with an offset of 3 std."""
    x = _normal(rng, shape, dtype, mean=3.0)
    mean, m2 = group_statistics(x, groups=groups, config=config)
    want_mean, want_m2 = group_statistics_reference(x, groups=groups)
    assert mean.shape == m2.shape == (shape[0], groups)
    assert relative_error(mean, want_mean) <= 1e-5
    assert relative_error(m2, want_m2) <= 1e-4


def test_group_norm_errors(rng):
    x = _normal(rng, (1, 4, 4, 64), jnp.float32)
    scale, bias = _affine(rng, 64)
    with pytest.raises(ValueError, match="multiple of groups"):
        group_norm(x, scale, bias, groups=24)
    with pytest.raises(ValueError, match="scale and bias"):
        group_norm(x, scale[:32], bias, groups=32)
    with pytest.raises(ValueError, match="unknown activation"):
        group_norm(x, scale, bias, groups=32, activation="relu")
    with pytest.raises(ValueError, match="dtype"):
        group_norm(x.astype(jnp.int32), scale, bias, groups=32)
    with pytest.raises(ValueError, match="power of two"):
        Config(block_rows=6)
    with pytest.raises(ValueError, match="xla_combine"):
        Config(combine_in_kernel=False, xla_combine="welford")
    with pytest.raises(ValueError, match="split- or fused-plan option"):
        Config(mode="cooperative", prefetch=True)
    with pytest.raises(ValueError, match="norm_rows // block_rows must be <= 4"):
        Config(block_rows=4, stats_rows=16, norm_rows=32, prefetch=True)


# ------------------------------------------------------------------------------------------
# GroupNorm written as a 3x3 convolution's input planes (group_norm(planes=True))
# ------------------------------------------------------------------------------------------

_PLANE_CASES = [
    # shape, dtype, groups, config: each plan that writes the planes from its kernel
    ((2, 4, 8, 64), jnp.float16, 8, Config(mode="fused", block_rows=8, block_groups=4)),
    ((3, 3, 16, 40), jnp.float32, 8, Config(mode="fused", block_rows=16, block_groups=8)),
    ((1, 2, 8, 320), jnp.bfloat16, 32, Config(mode="fused", block_rows=4, block_groups=1,
                                              prefetch=True)),  # fmt: skip
    ((2, 4, 8, 64), jnp.float16, 8, Config(mode="split", block_rows=8, stats_rows=8,
                                           norm_rows=16)),  # fmt: skip
    ((2, 4, 8, 64), jnp.float32, 8, Config(mode="split", block_rows=4, stats_rows=8, norm_rows=8,
                                           combine_in_kernel=False, xla_combine="sums")),
    ((2, 4, 8, 96), jnp.float16, 24, Config(mode="split", block_rows=4, stats_rows=8,
                                            norm_rows=8, prefetch=True)),  # fmt: skip
    # plans that cannot: XLA lays the planes out from the normalized map
    ((2, 4, 6, 64), jnp.float16, 8, Config(mode="fused", block_rows=8, block_groups=4)),  # W 6
    ((2, 3, 8, 64), jnp.float16, 8, Config(mode="fused", block_rows=16, block_groups=4)),  # rows
    ((2, 4, 8, 64), jnp.float16, 8, Config(mode="split", block_rows=4, stats_rows=8,
                                           norm_rows=8, last_combine=True)),  # fmt: skip
]
_PLANE_IDS = ["fused", "fused_batch3_cpg5", "fused_prefetch_cpg10", "split", "split_xla_sums",
              "split_prefetch_24_groups", "narrow_image", "ragged_rows", "last_combine"]


@pytest.mark.parametrize("shape,dtype,groups,config", _PLANE_CASES, ids=_PLANE_IDS)
def test_group_norm_planes(rng, shape, dtype, groups, config):
    """Bit for bit `input_planes(group_norm(x))`, the layout our Hopper convolution reads,
    zero borders included (interpret mode starts every output NaN, so a border left
    unwritten fails); with the activation, mean 3 and std 2."""
    import importlib

    gn = importlib.import_module("custom_calls.group_norm")
    from custom_calls.conv3x3_hopper import input_planes

    x = _normal(rng, shape, dtype, mean=3.0, std=2.0)
    scale, bias = _affine(rng, shape[-1])
    kw = dict(groups=groups, activation="silu", config=config)
    want = input_planes(group_norm(x, scale, bias, **kw))
    got = group_norm(x, scale, bias, planes=True, **kw)
    n, h, w, c = shape
    assert got.shape == (n * (h + 2) * w, 3 * c) and got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    planes = np.asarray(got, np.float32).reshape(n, h + 2, w, 3, c)
    assert not planes[:, [0, -1]].any() and not planes[:, :, 0, 0].any()  # the borders
    assert not planes[:, :, -1, 2].any() and planes[:, 1:-1, :, 1].all()
    writes = gn.writes_planes(shape, config)
    assert writes == (_PLANE_IDS[_PLANE_CASES.index((shape, dtype, groups, config))]
                      not in ("narrow_image", "ragged_rows", "last_combine"))  # fmt: skip


def test_group_norm_planes_wants_an_image(rng):
    x = _normal(rng, (2, 64, 32), jnp.float32)
    scale, bias = _affine(rng, 32)
    with pytest.raises(ValueError, match=r"planes=True\) wants x \[N, H, W, C\]"):
        group_norm(x, scale, bias, groups=8, planes=True)


# ------------------------------------------------------------------------------------------
# GEGLU
# ------------------------------------------------------------------------------------------


# LayerNorm: SD's widths (320/640/1280, masked up to powers of two), CLIP's 768, odd widths,
# row counts that are not a multiple of the block (77, 100, 7) and batch 3.
_LN_CASES = [
    ((3, 77, 40), jnp.float32, None),
    ((2, 100, 320), jnp.float16, None),
    ((1, 7, 640), jnp.bfloat16, None),
    ((3, 5, 1280), jnp.float32, None),
    ((2, 9, 768), jnp.float16, LayerNormConfig(block_rows=2, num_warps=2)),
    ((4, 13), jnp.bfloat16, LayerNormConfig(block_rows=16)),
    ((1, 1, 1), jnp.float32, None),
]


@pytest.mark.parametrize("shape,dtype,config", _LN_CASES)
def test_layer_norm(rng, shape, dtype, config):
    x = _normal(rng, shape, dtype, mean=0.5, std=2.0)
    scale, bias = _affine(rng, shape[-1])
    out = layer_norm(x, scale, bias, config=config)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = layer_norm_reference(x, scale, bias)
    if shape[-1] == 1:  # a single feature normalizes to the bias
        np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(bias), shape))
        return
    err = relative_error(out, ref)
    assert err <= TOL[dtype], f"{shape=} {dtype=} {config=}: {err=:.3g}"


def test_layer_norm_large_offset(rng):
    """Mean 1000, std 0.01 in float32: the centred second pass keeps the variance exact."""
    x = _normal(rng, (2, 33, 320), jnp.float32, mean=1000.0, std=0.01)
    scale, bias = _affine(rng, 320)
    assert relative_error(layer_norm(x, scale, bias), layer_norm_reference(x, scale, bias)) <= 1e-4


def test_layer_norm_errors(rng):
    x = _normal(rng, (2, 8, 32), jnp.float32)
    scale, bias = _affine(rng, 32)
    with pytest.raises(ValueError, match="scale, bias must be"):
        layer_norm(x, scale[:16], bias)
    with pytest.raises(ValueError, match="dtype"):
        layer_norm(x.astype(jnp.int32), scale, bias)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, scale, bias, eps=0.0)
    with pytest.raises(ValueError, match="power of two"):
        LayerNormConfig(block_rows=3)


def _geglu_inputs(rng, x_shape, inner, dtype):
    d = x_shape[-1]
    x = _normal(rng, x_shape, dtype)
    w = _normal(rng, (d, 2 * inner), dtype, std=d**-0.5)
    return x, w, _normal(rng, (2 * inner,), jnp.float32, std=0.5)


@pytest.mark.parametrize(
    "x_shape,inner,dtype,config",
    [
        ((1, 77, 320), 128, jnp.float16, GegluConfig(block_m=32, block_n=64, block_k=64)),
        ((2, 50, 640), 256, jnp.bfloat16, None),
        ((1, 40, 96), 80, jnp.float32, GegluConfig(block_m=16, block_n=32, block_k=64)),
    ],
    ids=["d320_77tok_f16", "d640_b2_bf16", "tails_f32"],
)
def test_geglu(rng, x_shape, inner, dtype, config):
    x, w, b = _geglu_inputs(rng, x_shape, inner, dtype)
    out = geglu(x, w, b, config=config)
    assert out.shape == (*x_shape[:-1], inner) and out.dtype == x.dtype
    err = relative_error(out, geglu_reference(x, w, b))
    assert err <= TOL[dtype], f"{err=:.3g}"


@pytest.mark.parametrize("dtype,with_bias", [(jnp.float16, True), (jnp.bfloat16, False)])
def test_geglu_elementwise(rng, dtype, with_bias):
    h = _normal(rng, (2, 33, 2 * 160), dtype)
    b = _normal(rng, (320,), jnp.float32) if with_bias else None
    out = geglu_elementwise(h, bias=b, block_m=16, block_n=64)
    hf = h.astype(jnp.float32) + (0.0 if b is None else b)
    hidden, gate = jnp.split(hf, 2, axis=-1)
    ref = (hidden * jax.nn.gelu(gate, approximate=False)).astype(dtype)
    assert relative_error(out, ref) <= TOL[dtype]


def test_geglu_errors(rng):
    x, w, b = _geglu_inputs(rng, (1, 8, 32), 16, jnp.float32)
    with pytest.raises(ValueError, match="geglu wants"):
        geglu(x, w[:16], b)
    with pytest.raises(ValueError, match="bias"):
        geglu(x, w, b[:16])
    with pytest.raises(ValueError, match="2F"):
        geglu_elementwise(x[..., :31])


# ------------------------------------------------------------------------------------------
# GPU: real shapes, and the custom calls in the compiled HLO
# ------------------------------------------------------------------------------------------

_GPU_GN = (
    "unet_64x64x320",
    "unet_32x32x960",
    "unet_16x16x2560",
    "unet_8x8x1280",
    "unet_attn_64x64x320",
    "vae_512x512x128",
)


@pytest.mark.gpu
@pytest.mark.parametrize("name", _GPU_GN)
def test_group_norm_gpu(rng, name):
    """The config the UNet gets (the tuning table, else the heuristic)."""
    s = GROUP_NORM_SHAPES[name]
    x = _normal(rng, s.shape, jnp.float16)
    scale, bias = _affine(rng, s.shape[-1])
    kw = dict(groups=s.groups, eps=s.eps, activation=s.activation)
    out = group_norm(x, scale, bias, **kw)
    ref = group_norm_reference(x, scale, bias, **kw)
    assert relative_error(out, ref) <= TOL[jnp.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 16, 16, 1280), (2, 16, 16, 2560), (2, 16, 16, 1920),
                                   (2, 16, 16, 640), (2, 8, 8, 1280), (2, 32, 32, 640)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_group_norm_planes_gpu(rng, shape):
    """The planes our GroupNorm kernel writes for the Hopper convolution after it, with the
    config in force (the tuning table's fused and split entries), bit for bit XLA's layout
    of its normalized map."""
    import importlib

    gn = importlib.import_module("custom_calls.group_norm")
    from custom_calls.conv3x3_hopper import input_planes

    x = _normal(rng, shape, jnp.float16, mean=1.0, std=2.0)
    scale, bias = _affine(rng, shape[-1])
    assert gn.writes_planes(shape, gn.tuned_config(shape, jnp.float16))
    want = input_planes(group_norm(x, scale, bias, activation="silu"))
    got = group_norm(x, scale, bias, activation="silu", planes=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_borrowed_batch_gpu(rng, activation):
    """The guided UNet's shared first layers: 1x64x64x320, unmeasured, with the 2x entry."""
    import importlib

    gn = importlib.import_module("custom_calls.group_norm")
    shape = (1, 64, 64, 320)
    assert gn.tuned_config(shape, jnp.float16) == gn.tuned_config((2, 64, 64, 320), jnp.float16)
    _check_group_norm(rng, shape, jnp.float16, activation, None)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("unet_64x64x320", "unet_32x32x1280", "vae_512x512x128"))
def test_group_norm_xla_sums_gpu(rng, name):
    """The one-pass XLA combine, forced, on the GPU (the sweep decides where it is used)."""
    s = GROUP_NORM_SHAPES[name]
    x = _normal(rng, s.shape, jnp.float16)
    scale, bias = _affine(rng, s.shape[-1])
    kw = dict(groups=s.groups, eps=s.eps, activation=s.activation)
    config = Config(mode="split", block_rows=4, stats_rows=16, norm_rows=16,
                    combine_in_kernel=False, xla_combine="sums")  # fmt: skip
    out = group_norm(x, scale, bias, config=config, **kw)
    assert relative_error(out, group_norm_reference(x, scale, bias, **kw)) <= TOL[jnp.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("unet_64x64x320", "unet_64x64x960", "unet_32x32x1280",
                                  "unet_16x16x2560", "unet_16x16x1280", "unet_8x8x2560"))  # fmt: skip
@pytest.mark.parametrize("warps", (1, 2), ids=("warps", "twice_the_warps"))
def test_group_norm_prefetch_gpu(rng, name, warps):
    """The config in force with every tile loaded first (Config.prefetch), on the GPU: split
    ones, and fused ones that hold their tiles (with the warps of the config and twice)."""
    import dataclasses
    import importlib

    gn = importlib.import_module("custom_calls.group_norm")  # the module, not the function
    s = GROUP_NORM_SHAPES[name]
    config = gn.tuned_config(s.shape, jnp.float16, groups=s.groups)
    assert config.mode in ("split", "fused"), config
    config = dataclasses.replace(config, prefetch=True, num_warps=warps * config.num_warps)
    _check_group_norm(rng, s.shape, jnp.float16, s.activation, config, groups=s.groups, eps=s.eps)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("unet_64x64x320", "unet_attn_64x64x320", "unet_64x64x960",
                                  "unet_32x32x1280", "unet_8x8x2560"))  # fmt: skip
def test_group_norm_columns_gpu(rng, name):
    """The columns plan at UNet shapes on the GPU (its tiles: whole rows, ~4K elements)."""
    s = GROUP_NORM_SHAPES[name]
    rows = max(1, 4096 // (1 << (s.shape[-1] - 1).bit_length()))
    config = Config(mode="columns", block_rows=rows, stats_rows=4 * rows, norm_rows=4 * rows,
                    num_warps=8)  # fmt: skip
    _check_group_norm(rng, s.shape, jnp.float16, s.activation, config, groups=s.groups, eps=s.eps)


@pytest.mark.gpu
def test_group_norm_large_offset_gpu(rng):
    for config in (
        None,
        Config(mode="fused", block_rows=64, block_groups=1),
        Config(mode="split", block_rows=4, stats_rows=16, norm_rows=16, combine_in_kernel=False,
               xla_combine="sums"),
        Config(mode="columns", block_rows=4, stats_rows=16, norm_rows=16),
    ):  # fmt: skip
        _check_group_norm(rng, (2, 32, 32, 640), jnp.float32, "silu", config, mean=1000.0, std=0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("sd15_64", "sd15_8", "sd21_12"))
@pytest.mark.parametrize("dtype", (jnp.float16, jnp.bfloat16, jnp.float32))
def test_geglu_gpu(rng, name, dtype):
    """float32 checks that the kernel's dots are full fp32 on the GPU, not tf32 (~4e-4)."""
    s = GEGLU_SHAPES[name]
    x, w, b = _geglu_inputs(rng, s.x_shape, s.inner, dtype)
    ref = geglu_reference(x, w, b)
    assert relative_error(geglu(x, w, b), ref) <= TOL[dtype]
    # The projection at full precision: XLA's default float32 matmul on the GPU is tf32 (~4e-4).
    h = jnp.einsum(
        "...d,df->...f", x, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    assert relative_error(geglu_elementwise(h, bias=b), ref) <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("sd15_64", "sd15_32", "sd15_8", "sd21_12"))
@pytest.mark.parametrize("dtype", (jnp.float16, jnp.bfloat16, jnp.float32))
def test_layer_norm_gpu(rng, name, dtype):
    x = _normal(rng, LAYER_NORM_SHAPES[name], dtype, mean=0.5, std=2.0)
    scale, bias = _affine(rng, x.shape[-1])
    assert relative_error(layer_norm(x, scale, bias), layer_norm_reference(x, scale, bias)) <= TOL[dtype]


@pytest.mark.gpu
def test_custom_calls_in_hlo(rng):
    x = _normal(rng, (2, 64, 64, 320), jnp.float16)
    scale, bias = _affine(rng, 320)
    hlo = jax.jit(lambda *a: group_norm(*a, activation="silu")).lower(x, scale, bias)
    assert "sdjax_group_norm" in hlo.compile().as_text()
    xg, w, b = _geglu_inputs(rng, (2, 1024, 640), 2560, jnp.float16)
    assert "sdjax_geglu" in jax.jit(geglu).lower(xg, w, b).compile().as_text()
    ln_scale, ln_bias = _affine(rng, 640)
    assert "sdjax_layer_norm" in jax.jit(layer_norm).lower(xg, ln_scale, ln_bias).compile().as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("unet_64x64x320", "unet_64x64x960", "unet_32x32x1280"))
def test_group_norm_last_combine_gpu(rng, name):
    """The statistics' last program combining the partials (atomic arrivals), on the GPU: the
    same inputs five times give one answer within tolerance (a race would move it)."""
    s = GROUP_NORM_SHAPES[name]
    x = _normal(rng, s.shape, jnp.float16)
    scale, bias = _affine(rng, s.shape[-1])
    kw = dict(groups=s.groups, eps=s.eps, activation=s.activation)
    config = Config(mode="split", block_rows=4, stats_rows=16, norm_rows=32, last_combine=True)
    ref = group_norm_reference(x, scale, bias, **kw)
    outs = [np.asarray(group_norm(x, scale, bias, config=config, **kw)) for _ in range(5)]
    for out in outs:
        assert relative_error(out, ref) <= TOL[jnp.float16]
        np.testing.assert_array_equal(out, outs[0])


# The cooperative plan at UNet shapes the split plan takes, each with 128 programs or fewer
# (an H100 has 132 SMs).
_COOPERATIVE = {
    "unet_64x64x320": Config(mode="cooperative", block_rows=16, stats_rows=64, num_warps=8),
    "unet_64x64x960": Config(mode="cooperative", block_rows=4, stats_rows=64, num_warps=8),
    "unet_32x32x1280": Config(mode="cooperative", block_rows=2, stats_rows=16, num_warps=4),
    "unet_16x16x2560": Config(mode="cooperative", block_rows=2, stats_rows=4, num_warps=8),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_COOPERATIVE))
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_cooperative_gpu(rng, name, dtype):
    """One launch with a grid barrier per sample: within tolerance, and the same inputs five
    times give the same bits (a program reading a partial before it is written would not)."""
    s = GROUP_NORM_SHAPES[name]
    x = _normal(rng, s.shape, dtype, mean=0.5, std=2.0)
    scale, bias = _affine(rng, s.shape[-1])
    kw = dict(groups=s.groups, eps=s.eps, activation=s.activation)
    config = _COOPERATIVE[name]
    ref = group_norm_reference(x, scale, bias, **kw)
    outs = [np.asarray(group_norm(x, scale, bias, config=config, **kw)) for _ in range(5)]
    for out in outs:
        assert relative_error(out, ref) <= TOL[dtype]
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.gpu
def test_group_norm_cooperative_uneven_gpu(rng):
    """Batch 3 (3 x 34 programs), 1600 rows in parts of 48 (the last one 16 rows), 20 channels
    a group, also with a large offset in float32; and the kernel's name in the HLO."""
    config = Config(mode="cooperative", block_rows=8, stats_rows=48, num_warps=4)
    _check_group_norm(rng, (3, 40, 40, 640), jnp.float16, "silu", config)
    _check_group_norm(rng, (3, 40, 40, 640), jnp.float32, None, config, mean=1000.0, std=0.01)
    x = _normal(rng, (3, 40, 40, 640), jnp.float16)
    scale, bias = _affine(rng, 640)
    fn = jax.jit(lambda *a: group_norm(*a, activation="silu", config=config))
    assert "sdjax_group_norm_cooperative" in fn.lower(x, scale, bias).compile().as_text()


@pytest.mark.gpu
def test_group_norm_cooperative_table_entry_on_fewer_sms(rng, tmp_path, monkeypatch):
    """A cooperative table entry whose programs outnumber the SMs (a smaller GPU than the one
    that measured it) runs as the split plan, correctly, instead of waiting for ever."""
    shape = (2, 24, 24, 640)  # a shape no other test compiles: the trace below is fresh
    entry = dict(mode="cooperative", block_rows=8, stats_rows=16, num_warps=8)  # 2 x 36 programs
    gn = _patched_table(tmp_path, monkeypatch, {shape: entry})
    monkeypatch.setattr(gn, "num_sms", lambda: 16)
    try:
        x = _normal(rng, shape, jnp.float16)
        scale, bias = _affine(rng, 640)
        fn = jax.jit(lambda *a: group_norm(*a, activation="silu"))
        hlo = fn.lower(x, scale, bias).compile().as_text()
        assert "sdjax_group_norm_cooperative" not in hlo and "sdjax_group_norm_stats" in hlo
        ref = group_norm_reference(x, scale, bias, activation="silu")
        assert relative_error(fn(x, scale, bias), ref) <= TOL[jnp.float16]
        with pytest.raises(ValueError, match="exceeds the device's 16 SMs"):
            group_norm(x, scale, bias, config=Config(**entry))
    finally:
        gn.tuned_table.cache_clear()


def test_split_equivalent_keeps_the_rows():
    from custom_calls.group_norm import split_equivalent

    coop = Config(mode="cooperative", block_rows=8, stats_rows=16, num_warps=8)
    split = split_equivalent(coop)
    assert split.mode == "split" and split.stats_rows == split.norm_rows == 16
    assert split.combine_in_kernel and not split.last_combine
    assert (split.block_rows, split.num_warps) == (8, 8)
    other = Config(mode="split", block_rows=4, stats_rows=8, norm_rows=16)
    assert split_equivalent(other) is other


@pytest.mark.gpu
def test_ops_pallas_split_runs_cooperative_entries_split(rng, tmp_path, monkeypatch):
    """`ops.group_norm` at a shape whose table entry is cooperative: "pallas" launches the
    cooperative kernel, "pallas_split" the split plan's two, with the same result within
    tolerance (the ablation's `auto_split_gn` row)."""
    from sdjax import ops

    shape = (2, 20, 20, 1280)  # a shape no other test compiles: the traces below are fresh
    entry = dict(mode="cooperative", block_rows=4, stats_rows=8, num_warps=8)  # 2 x 50 programs
    gn = _patched_table(tmp_path, monkeypatch, {shape: entry})
    try:
        x = _normal(rng, shape, jnp.float16)
        scale, bias = _affine(rng, 1280)
        ref = group_norm_reference(x, scale, bias, activation="silu")
        for impl, kernel in (("pallas", "sdjax_group_norm_cooperative"),
                             ("pallas_split", "sdjax_group_norm_stats")):  # fmt: skip
            fn = jax.jit(lambda *a, impl=impl: ops.group_norm(*a, activation="silu",
                                                              implementation=impl))  # fmt: skip
            assert kernel in fn.lower(x, scale, bias).compile().as_text()
            assert relative_error(fn(x, scale, bias), ref) <= TOL[jnp.float16]
    finally:
        gn.tuned_table.cache_clear()


def test_gelu_erf_matches_float64_erf():
    """The kernels' erf GELU (A&S 7.1.26 without a sign select, rsqrt for the reciprocal)
    against float64 math.erf, over the fp16 range: |error| < 1e-6 * (1 + |y|), finite."""
    import math

    from custom_calls.group_norm import activate

    y = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, -0.0, 1e-30, -1e-30, 65504.0,
                                                         -65504.0]]).astype(np.float32)  # fmt: skip
    got = np.asarray(jax.jit(lambda v: activate(v, "gelu"))(jnp.asarray(y)), np.float64)
    y64 = y.astype(np.float64)
    want = 0.5 * y64 * (1.0 + np.vectorize(math.erf)(y64 / math.sqrt(2.0)))
    assert np.isfinite(got).all()
    assert np.max(np.abs(got - want) / (1.0 + np.abs(y64))) < 1e-6
