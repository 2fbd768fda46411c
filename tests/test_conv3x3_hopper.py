"""The Hopper (Mosaic GPU) implicit-GEMM 3x3 convolution against the float32 reference.

On the CPU the kernel runs in Mosaic GPU's interpret mode, which simulates the warpgroups,
the shared memory (fresh memory holds NaN), the TMA copies (an out-of-bounds read raises)
and the barriers; its products there are float32 dots of the same shared-memory tiles. The
wgmma lowering, the swizzled boxes and the timing are tested by the `gpu` tests on the device.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from custom_calls.conv3x3_hopper import (
    Conv3x3Config,
    conv3x3_hopper,
    conv3x3_reference,
    heuristic_config,
    input_planes,
    parse_config,
    supports,
)

# Relative-norm tolerances. The split-K partial sums are rounded to x's dtype before they
# are added: up to sqrt(splits) of a rounding more than one dtype rounding of the output.
TOLERANCE = {jnp.bfloat16: 1.2e-2, jnp.float16: 3e-3}


def _inputs(rng, x_shape, out_channels, dtype):
    c = x_shape[-1]

    def draw(shape, scale):
        return jnp.asarray(scale * rng.standard_normal(shape, dtype=np.float32), dtype)

    kernel = draw((3, 3, c, out_channels), 1.0 / np.sqrt(9 * c))  # unit-variance outputs
    return draw(x_shape, 1.0), kernel, draw((out_channels,), 1.0)


def _relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# (x shape, O, dtype, config). Covering set: a consumer's 64 pixels as 8, 4, 2 or 1 image
# rows, or half a row (W = 128); W = 24 (not a power of two); tiles spanning two images;
# H != W, batch 3, splits 1-9 (steps split across taps), more steps than slots and one slot
# (no delayed release), several column tiles, both dtypes.
CASES = [
    ((2, 8, 8, 64), 128, jnp.float16, Conv3x3Config(stages=2)),
    ((2, 8, 8, 64), 128, jnp.float16, Conv3x3Config(stages=2, splits=3)),
    ((1, 16, 16, 64), 64, jnp.bfloat16, Conv3x3Config(block_n=64, stages=3, splits=3)),
    ((3, 4, 32, 128), 128, jnp.float16, Conv3x3Config(block_n=64, stages=4, splits=2)),
    ((1, 2, 64, 64), 192, jnp.bfloat16, Conv3x3Config(block_n=64, stages=1,
                                                      delay_release=False)),
    ((1, 2, 128, 64), 64, jnp.float16, Conv3x3Config(block_n=64, stages=2, splits=9)),
    ((2, 12, 16, 64), 128, jnp.bfloat16, Conv3x3Config(stages=3, delay_release=False)),
    ((2, 8, 24, 64), 64, jnp.float16, Conv3x3Config(block_n=64, stages=2, splits=3)),
    # the planes stacked by rows
    ((2, 8, 8, 128), 128, jnp.float16, Conv3x3Config(stages=3, splits=2, planes="rows")),
    ((1, 16, 16, 64), 64, jnp.bfloat16, Conv3x3Config(block_n=64, planes="rows")),
]


def _case_id(case):
    x_shape, o, dt, c = case
    late = "" if c.delay_release else "e"
    planes = "r" if c.planes == "rows" else ""
    return (f"{'x'.join(map(str, x_shape))}to{o}:{jnp.dtype(dt).name}:"
            f"n{c.block_n}s{c.stages}k{c.splits}{late}{planes}")  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, rng):
    x_shape, o, dtype, config = case
    x, kernel, bias = _inputs(rng, x_shape, o, dtype)
    out = conv3x3_hopper(x, kernel, bias, config=config, interpret=True)
    assert out.shape == (*x_shape[:3], o) and out.dtype == dtype
    assert _relative_error(out, conv3x3_reference(x, kernel, bias)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("layout", ["rows", "channels"])
def test_input_planes(layout, rng):
    x, _, _ = _inputs(rng, (2, 4, 8, 16), 16, jnp.float16)
    planes = np.asarray(input_planes(x, layout))
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for kx in range(3):
        want = xp[:, :, kx : kx + 8].reshape(-1, 16)
        got = planes[kx * len(want) : (kx + 1) * len(want)] if layout == "rows" else (
            planes[:, kx * 16 : (kx + 1) * 16])  # fmt: skip
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("planes", ["rows", "channels"])
def test_borders_and_taps_land_in_place(planes, rng):
    """One nonzero tap at a time, without bias: each of the nine taps shifts the input its own
    way, and the zero border must read as zeros (a tap read from the wrong row, or a
    neighbouring image's pixel, cannot pass)."""
    x, _, _ = _inputs(rng, (2, 8, 8, 64), 64, jnp.float16)
    for ky in range(3):
        for kx in range(3):
            kernel = jnp.zeros((3, 3, 64, 64), jnp.float16).at[ky, kx].set(
                jnp.eye(64, dtype=jnp.float16)
            )
            out = conv3x3_hopper(
                x, kernel, config=Conv3x3Config(block_n=64, stages=2, planes=planes), interpret=True
            )
            xp = np.pad(np.asarray(x, np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
            want = xp[:, ky : ky + 8, kx : kx + 8]
            np.testing.assert_array_equal(np.asarray(out, np.float32), want)


@pytest.mark.parametrize(
    ("x_shape", "kernel_shape", "dtype", "config", "why"),
    [
        ((2, 8, 8, 96), (3, 3, 96, 128), jnp.float16, None, "C=96 is not a multiple"),
        ((2, 8, 8, 64), (3, 3, 64, 96), jnp.float16, None, "O=96 is not a multiple"),
        ((2, 8, 12, 64), (3, 3, 64, 128), jnp.float16, None, "W=12 is not a multiple of 8"),
        ((4, 4, 8, 64), (3, 3, 64, 128), jnp.float16, None, "H*W=32 is not a multiple of 64"),
        ((1, 8, 8, 64), (3, 3, 64, 128), jnp.float16, None, "not a positive multiple of 128"),
        ((2, 8, 8, 64), (3, 3, 64, 128), jnp.float32, None, "fp16/bf16 only"),
        ((2, 8, 8, 64), (1, 1, 64, 128), jnp.float16, None, "is not [3, 3, 64, O]"),
        ((2, 8, 8, 64), (3, 3, 64, 128), jnp.float16, Conv3x3Config(splits=2),
         "9 reduction steps do not split 2 ways"),
        ((2, 8, 8, 64), (3, 3, 64, 512), jnp.float16, Conv3x3Config(block_n=512, stages=8),
         "shared memory"),
    ],
)  # fmt: skip
def test_supports_says_why(x_shape, kernel_shape, dtype, config, why):
    assert why in supports(x_shape, kernel_shape, dtype, config)
    x, kernel = jnp.zeros(x_shape, dtype), jnp.zeros(kernel_shape, dtype)
    with pytest.raises(ValueError, match="conv3x3_hopper cannot run"):
        conv3x3_hopper(x, kernel, config=config, interpret=True)


def test_rejects_bad_configs_and_bias():
    for bad in (dict(block_n=96), dict(block_k=32), dict(stages=0), dict(splits=0),
                dict(stages=1, delay_release=True), dict(planes="cols")):  # fmt: skip
        with pytest.raises(ValueError):
            Conv3x3Config(**bad)
    x, kernel = jnp.zeros((2, 8, 8, 64), jnp.float16), jnp.zeros((3, 3, 64, 128), jnp.float16)
    with pytest.raises(ValueError, match="bias must be"):
        conv3x3_hopper(x, kernel, jnp.zeros((64,), jnp.float16), interpret=True)


def test_heuristic_splits_to_fill_the_waves(monkeypatch):
    # the module (custom_calls' attribute of that name is the function)
    mod = importlib.import_module("custom_calls.conv3x3_hopper")

    monkeypatch.setattr(mod, "num_sms", lambda: 132)
    # SD1.5, batch 2: 16x16 (4 x 10 tiles: 3 splits, 120 programs, not 4: 160 in two waves)
    assert heuristic_config((2, 16, 16, 1280), 1280) == Conv3x3Config(splits=3)
    assert heuristic_config((2, 32, 32, 640), 640).splits == 3  # 16 x 5 tiles: 240 of 264
    assert heuristic_config((2, 32, 32, 320), 640).splits == 3  # 45 steps: 1, 3, 5 divide
    # 64x64: 64 x 5 tiles of 64 channels already fill the SMs: no split
    assert heuristic_config((2, 64, 64, 320), 320) == Conv3x3Config(block_n=64)
    assert mod.wave_fill(120, 132) == pytest.approx(120 / 132)
    assert mod.wave_fill(160, 132) == pytest.approx(160 / 264)


SD15_SHAPES = [  # (x shape, O): SD1.5's 3x3 convolutions at 16x16 to 64x64, batch 2
    ((2, 16, 16, 1280), 1280),
    ((2, 16, 16, 2560), 1280),
    ((2, 32, 32, 640), 640),
    ((2, 32, 32, 1920), 640),
    ((2, 64, 64, 320), 320),
    ((2, 64, 64, 960), 320),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SD15_SHAPES, ids=lambda s: f"{'x'.join(map(str, s[0]))}to{s[1]}")
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_sd_shapes(shape, dtype, rng):
    x_shape, o = shape
    x, kernel, bias = _inputs(rng, x_shape, o, dtype)
    out = conv3x3_hopper(x, kernel, bias)
    assert _relative_error(out, conv3x3_reference(x, kernel, bias)) <= TOLERANCE[dtype]
    # the same output again: no ring slot overwritten before both consumers used it
    np.testing.assert_array_equal(np.asarray(conv3x3_hopper(x, kernel, bias)), out)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gpu_covering_cases(case, rng):
    x_shape, o, dtype, config = case
    x, kernel, bias = _inputs(rng, x_shape, o, dtype)
    out = conv3x3_hopper(x, kernel, bias, config=config)
    assert _relative_error(out, conv3x3_reference(x, kernel, bias)) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_gpu_hlo_has_mosaic_kernel(rng):
    import jax

    from sdjax.hlo import count_hlo

    x, kernel, bias = _inputs(rng, (2, 16, 16, 128), 128, jnp.float16)
    hlo = jax.jit(conv3x3_hopper).lower(x, kernel, bias).compile().as_text()
    assert "mosaic_gpu" in hlo
    assert any(n.startswith("sdjax_conv3x3_hopper") for n in count_hlo(hlo)["sdjax_kernels"])


def test_parse_config_reads_specs():
    assert parse_config("n256s3k6", (2, 16, 16, 1280), 1280) == Conv3x3Config(
        block_n=256, stages=3, splits=6
    )
    assert parse_config("n128s4k3er", (2, 16, 16, 1280), 1280) == Conv3x3Config(
        splits=3, delay_release=False, planes="rows"
    )
    assert parse_config("autor", (2, 16, 16, 1280), 1280).planes == "rows"
    with pytest.raises(ValueError, match="neither auto"):
        parse_config("n128", (2, 16, 16, 1280), 1280)


def test_ops_seam_for_the_hopper_convolution(rng):
    """`pallas_hopper` raises where it cannot run (here: no GPU); `auto` takes it only where it
    measured ahead and can run."""
    from sdjax import ops

    x, kernel, bias = _inputs(rng, (2, 16, 16, 64), 64, jnp.float16)
    if ops.conv3x3_hopper_supports(x, kernel) is None:
        pytest.skip("a Hopper GPU: the GPU test below covers it")
    with pytest.raises(ValueError, match="'pallas_hopper' cannot run .* needs a GPU"):
        ops.conv3x3(x, kernel, bias, implementation="pallas_hopper")
    got = ops.conv3x3(x, kernel, bias, implementation="auto")
    want = ops.conv3x3_reference(x, kernel, bias)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert ops.hopper_conv_pays((2, 16, 16, 1280)) and not ops.hopper_conv_pays((2, 32, 32, 640))


@pytest.mark.gpu
def test_gpu_ops_auto_takes_ours_at_16x16_only(rng):
    import jax

    from sdjax import ops
    from sdjax.hlo import count_hlo

    def kernels(x_shape, o):
        x, kernel, bias = _inputs(rng, x_shape, o, jnp.float16)
        fn = jax.jit(lambda x, k, b: ops.conv3x3(x, k, b, implementation="auto"))
        out = fn(x, kernel, bias)
        assert _relative_error(out, conv3x3_reference(x, kernel, bias)) <= TOLERANCE[jnp.float16]
        return count_hlo(fn.lower(x, kernel, bias).compile().as_text())["sdjax_kernels"]

    assert any(n.startswith("sdjax_conv3x3_hopper") for n in kernels((2, 16, 16, 1280), 1280))
    assert not any(n.startswith("sdjax_conv3x3_hopper") for n in kernels((2, 32, 32, 640), 640))


# --------------------------------------------------------------------------------------------
# The input given as planes: written by our GroupNorm kernel (`group_norm(planes=True)`)
# --------------------------------------------------------------------------------------------


def test_planes_entry_is_the_convolution(rng):
    """`conv3x3_hopper_planes(input_planes(x))` is `conv3x3_hopper(x)` bit for bit; planes of
    another shape or layout are refused."""
    from custom_calls.conv3x3_hopper import conv3x3_hopper_planes

    x, kernel, bias = _inputs(rng, (2, 8, 8, 64), 128, jnp.float16)
    config = Conv3x3Config(stages=2, splits=3)
    want = conv3x3_hopper(x, kernel, bias, config=config, interpret=True)
    got = conv3x3_hopper_planes(input_planes(x), kernel, bias, x_shape=x.shape, config=config,
                                interpret=True)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="side by side in the channels"):
        conv3x3_hopper_planes(input_planes(x, "rows"), kernel, bias, x_shape=x.shape,
                              config=config, interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="side by side in the channels"):
        conv3x3_hopper_planes(input_planes(x), kernel, bias, x_shape=(2, 8, 8, 64),
                              config=Conv3x3Config(planes="rows"), interpret=True)  # fmt: skip


def test_resnet_block_with_planes_from_the_group_norm(rng, monkeypatch):
    """The model's seam, on the CPU in interpret mode (the Hopper check patched away): with
    `conv_planes="group_norm"` both of a ResnetBlock2D's norms hand their convolutions planes
    (`ops.norm_writes_planes`), and the block's output is bit for bit the one with XLA's
    planes (the same values in the same layout) and close to the XLA reference block; 64 ->
    128 channels (the shortcut, a changed channel count), the time embedding as a bias."""
    import jax

    from sdjax import ops
    from sdjax.models.layers import ResnetBlock2D

    monkeypatch.setattr(ops, "_not_hopper", lambda: None)
    shape, out_channels = (2, 8, 8, 64), 128
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) + 0.5, jnp.float16)
    temb = jnp.asarray(rng.standard_normal((1, 32), dtype=np.float32), jnp.float16)
    block = ResnetBlock2D(out_channels, groups=8)
    params = block.init(jax.random.key(0), x.astype(jnp.float32), temb.astype(jnp.float32))
    params = jax.tree.map(lambda p: p.astype(jnp.float16), params)

    def run(**impls):
        with ops.use(ops.Implementations(**impls)):
            decided = ops.norm_writes_planes(shape, out_channels, jnp.float16)
            jaxpr = str(jax.make_jaxpr(block.apply)(params, x, temb))
            return block.apply(params, x, temb), decided, jaxpr.count("concatenate")

    ours = dict(group_norm="pallas", conv3x3="pallas_hopper")
    got, decided, concats = run(**ours, conv_planes="group_norm")
    want, decided_xla, concats_xla = run(**ours, conv_planes="xla")
    ref, *_ = run(group_norm="xla", conv3x3="reference")
    assert decided and not decided_xla
    assert (concats, concats_xla) == (0, 2)  # XLA's planes: one concatenate per convolution
    assert got.shape == (*shape[:3], out_channels) and got.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert _relative_error(got, ref) <= TOLERANCE[jnp.float16]


def test_ops_conv3x3_reads_planes(rng):
    """`ops.conv3x3` given `ops.Planes` runs our convolution on them (interpret mode here),
    and refuses another implementation or a kernel of the wrong width."""
    from sdjax import ops

    x, kernel, bias = _inputs(rng, (2, 8, 8, 64), 128, jnp.float16)
    planes = ops.Planes(input_planes(x), x.shape)
    got = ops.conv3x3(planes, kernel, bias)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(conv3x3_hopper(x, kernel, bias)))
    with pytest.raises(ValueError, match="planes are our Hopper convolution's input"):
        ops.conv3x3(planes, kernel, bias, implementation="reference")
    with pytest.raises(ValueError, match="want kernel \\[3, 3, 64, O\\]"):
        ops.conv3x3(planes, kernel[:, :, :32], bias)


def test_norm_writes_planes_decides_from_the_implementations():
    from sdjax import ops

    shape, dtype = (2, 16, 16, 1280), jnp.float16
    both = dict(group_norm="pallas", conv3x3="pallas_hopper")
    with ops.use(ops.Implementations(**both, conv_planes="group_norm")):
        assert ops.norm_writes_planes(shape, 1280, dtype)
        assert not ops.norm_writes_planes((2, 256, 1280), 1280, dtype)  # not an image
    with ops.use(ops.Implementations(**both, conv_planes="xla")):
        assert not ops.norm_writes_planes(shape, 1280, dtype)
    with ops.use(ops.Implementations(group_norm="xla", conv3x3="pallas_hopper",
                                     conv_planes="group_norm")):  # fmt: skip
        assert not ops.norm_writes_planes(shape, 1280, dtype)  # XLA's GroupNorm
    with ops.use(ops.Implementations(group_norm="pallas", conv3x3="reference",
                                     conv_planes="group_norm")):  # fmt: skip
        assert not ops.norm_writes_planes(shape, 1280, dtype)  # cuDNN's convolution
    if ops.on_gpu():
        return
    with ops.use(ops.Implementations.preset("auto")):  # on the CPU: no Hopper kernels
        assert not ops.norm_writes_planes(shape, 1280, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 16, 16, 1280), (2, 16, 16, 2560)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
def test_gpu_resnet_block_takes_planes_from_the_group_norm(shape, rng):
    """On the GPU under `auto`, a 16x16 ResnetBlock2D's norms write their convolutions' planes
    (no planes' concatenate in the compiled program), with the output bit for bit the one
    with XLA's planes (`conv_planes="xla"`)."""
    import dataclasses

    import jax

    from sdjax import ops
    from sdjax.models.layers import ResnetBlock2D

    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.float16)
    temb = jnp.asarray(rng.standard_normal((1, 1280), dtype=np.float32), jnp.float16)
    block = ResnetBlock2D(1280)
    params = block.init(jax.random.key(0), x, temb)
    auto = ops.Implementations.preset("auto")

    def run(impls):
        with ops.use(impls):
            fn = jax.jit(block.apply)
            hlo = fn.lower(params, x, temb).compile().as_text()
            return fn(params, x, temb), hlo.count("concatenate(")

    with ops.use(auto):
        assert ops.norm_writes_planes(shape, 1280, jnp.float16)
    got, concats = run(auto)
    want, concats_xla = run(dataclasses.replace(auto, conv_planes="xla"))
    assert concats == 0 and concats_xla >= 2, (concats, concats_xla)  # one per convolution
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
