"""The ops seam: dispatch, `auto`, fallbacks, and that every implementation computes the same."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import custom_calls
from sdjax import autotune, ops
from sdjax import config as sd_config
from sdjax.models.unet import UNet2DConditionModel, init_params

# Relative-norm tolerances vs the float32 reference (interpret-mode kernels are float32 exact
# up to summation order).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all()
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown attention implementation"):
        ops.Implementations(attention="fastest")
    with pytest.raises(ValueError, match="unknown kernel preset"):
        ops.Implementations.preset("nope")
    q = jnp.ones((1, 4, 1, 8))
    with pytest.raises(ValueError, match="unknown attention implementation"):
        ops.attention(q, q, q, implementation="nope")
    x = jnp.ones((1, 2, 2, 8))
    with pytest.raises(ValueError, match="unknown activation"):
        ops.group_norm(x, jnp.ones(8), jnp.zeros(8), groups=2, activation="relu6")


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="attention wants"):
        ops.attention(jnp.ones((1, 4, 8)), jnp.ones((1, 4, 8)), jnp.ones((1, 4, 8)))
    with pytest.raises(ValueError, match="not divisible"):
        ops.group_norm(jnp.ones((1, 2, 2, 10)), jnp.ones(10), jnp.zeros(10), groups=4)
    with pytest.raises(ValueError, match="geglu wants"):
        ops.geglu(jnp.ones((2, 8)), jnp.ones((8, 7)), jnp.ones(7))


def test_use_is_scoped_and_restores():
    assert ops.current() == ops.PRESETS["reference"]
    with ops.use("pallas") as impls:
        assert ops.current() is impls and impls.attention == "flash"
        with ops.use(ops.Implementations(geglu="xla")):
            assert ops.current().geglu == "xla"
        assert ops.current() is impls
    assert ops.current() == ops.PRESETS["reference"]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_on_cpu_never_runs_interpret_mode_kernels(monkeypatch, rng):
    def forbidden(*args, **kwargs):
        raise AssertionError("auto picked a Pallas kernel on CPU (interpret mode)")

    for name in ("flash_attention", "fused_softmax_attention", "cross_attention", "group_norm",
                 "geglu", "layer_norm"):  # fmt: skip
        monkeypatch.setattr(custom_calls, name, forbidden)
    cfg = sd_config.preset("tiny").unet
    params = jax.jit(lambda: init_params(cfg, jax.random.PRNGKey(0)))()
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, cfg.cross_attention_dim)), jnp.float32)
    with ops.use("auto"):
        out = jax.jit(lambda p, x, c: UNet2DConditionModel(cfg).apply({"params": p}, x, 10, c))(
            params, x, ctx
        )
    assert np.isfinite(np.asarray(out)).all()
    q = jnp.ones((2, 16, 2, 8))
    assert ops._auto_attention(q, q, q) == "xla"
    assert ops._auto_group_norm(jnp.ones((2, 4, 4, 8))) == "xla"
    assert ops._auto_geglu(jnp.ones((2, 4, 8)), jnp.ones((8, 16))) == "xla"
    assert ops._auto_layer_norm(jnp.ones((2, 4, 8))) == "xla"


def test_autotune_table_keys_match_the_model_shapes():
    """Every recorded choice names a real implementation, under a key `ops` will look up."""
    table = autotune._table()
    valid = {
        "attention": set(ops._ATTENTION),
        "group_norm": set(ops._GROUP_NORM),
        "geglu": set(ops._GEGLU),
        "layer_norm": set(ops._LAYER_NORM),
    }
    assert table, "sdjax/assets/autotune.json is missing or empty"
    for op, choices in table.items():
        for key, impl in choices.items():
            assert key.startswith(f"{op}:") and impl in valid[op], (key, impl)
    key = autotune.shape_key("attention", (2, 4096, 8, 40), (2, 4096, 8, 40), jnp.float16)
    assert key in table["attention"]


@pytest.mark.parametrize("impl", ["xla", "flash", "fused_softmax", "cross"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_implementations_agree(impl, dtype, rng):
    q = jnp.asarray(rng.standard_normal((3, 40, 2, 40)), dtype)
    k = jnp.asarray(rng.standard_normal((3, 77, 2, 40)), dtype)
    v = jnp.asarray(rng.standard_normal((3, 77, 2, 40)), dtype)
    ref = ops.attention(q, k, v, implementation="reference")
    out = ops.attention(q, k, v, implementation=impl)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("impl", ["xla", "columns", "pallas", "pallas_split", "pallas_stats"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_implementations_agree(impl, activation, rng):
    x = jnp.asarray(rng.standard_normal((3, 6, 5, 40)) + 3.0, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(40), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(40), jnp.float32)
    kw = dict(groups=4, eps=1e-6, activation=activation)
    ref = ops.group_norm(x, scale, bias, implementation="reference", **kw)
    assert rel(ops.group_norm(x, scale, bias, implementation=impl, **kw), ref) <= 1e-5


# (shape, groups): batch 3, 10 channels per group (SD's 320 / 32), odd spatial sizes, one
# spatial position, and 2D input [N, C] (one position per sample).
@pytest.mark.parametrize("shape, groups", [((3, 7, 5, 80), 8), ((2, 1, 1, 40), 4),
                                           ((3, 9, 40), 4), ((1, 16, 16, 320), 32)])  # fmt: skip
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=["float32", "float16", "bfloat16"])  # fmt: skip
@pytest.mark.parametrize("activation", [None, "silu", "gelu"])
@pytest.mark.parametrize("impl", ["columns", "pallas_stats"])
def test_group_norm_columns_matches_the_reference(shape, groups, dtype, activation, impl, rng):
    """The XLA column form and the Pallas-statistics form against the two-pass reference, with
    a mean far from zero (100 standard deviations: shifted sums must not cancel) and
    per-channel offsets."""
    c = shape[-1]
    offsets = rng.standard_normal(c) * 5.0
    x = jnp.asarray(rng.standard_normal(shape) + 100.0 + offsets, dtype)
    scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    kw = dict(groups=groups, eps=1e-5, activation=activation)
    want = ops.group_norm_reference(x, scale, bias, **kw)
    got = ops.group_norm(x, scale, bias, implementation=impl, **kw)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert np.isfinite(np.asarray(got, np.float32)).all()
    # the reference rounds to the same dtype: differences are a few output ulps
    assert rel(got, want) <= {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_geglu_implementations_agree(impl, rng):
    x = jnp.asarray(rng.standard_normal((3, 19, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 2 * 48)) / np.sqrt(40), jnp.float32)
    b = jnp.asarray(rng.standard_normal(96), jnp.float32)
    ref = ops.geglu(x, w, b, implementation="reference")
    assert rel(ops.geglu(x, w, b, implementation=impl), ref) <= 1e-5


def test_kernel_choice_falls_back_to_xla_above_head_dim_256_and_records_it(rng):
    q = jnp.asarray(rng.standard_normal((1, 12, 1, 512)), jnp.float32)
    out = ops.attention(q, q, q, implementation="flash")
    assert rel(out, ops.attention(q, q, q, implementation="reference")) <= 1e-5
    assert "attention flash->xla at head_dim 512" in ops.fallbacks()


@pytest.mark.parametrize("preset", ["xla", "pallas"])
def test_tiny_unet_same_output_under_every_preset(preset, rng):
    """The whole model through each preset matches the reference path (float32, CPU)."""
    cfg = sd_config.preset("tiny").unet
    params = jax.jit(lambda: init_params(cfg, jax.random.PRNGKey(1)))()
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, cfg.cross_attention_dim)), jnp.float32)

    def run(name):
        with ops.use(name):
            return jax.jit(
                lambda p, x, c: UNet2DConditionModel(cfg).apply({"params": p}, x, 500, c)
            )(params, x, ctx)

    assert rel(run(preset), run("reference")) <= 1e-5


def test_autotune_keys_leave_the_batch_out():
    """A choice measured at batch 2 holds for a batch of prompts or a per-device shard."""
    key = autotune.shape_key
    assert key("attention", (2, 4096, 8, 40), (2, 77, 8, 40), "float16") == key(
        "attention", (6, 4096, 8, 40), (6, 77, 8, 40), "float16"
    )
    assert key("geglu", (2, 4096, 320), (320, 2560), "float16") == key(
        "geglu", (8, 4096, 320), (320, 2560), "float16"
    )
    assert key("geglu", (2, 4096, 320), (320, 2560), "float16") != key(
        "geglu", (2, 4096, 320), (640, 2560), "float16"
    )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU message")
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_layer_norm_implementations_agree(impl, rng):
    x = jnp.asarray(rng.standard_normal((3, 77, 40)) * 2.0 + 1.0, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(40), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(40), jnp.float32)
    ref = ops.layer_norm(x, scale, bias, implementation="reference")
    assert rel(ops.layer_norm(x, scale, bias, implementation=impl), ref) <= 1e-5
    with pytest.raises(ValueError, match="unknown layer_norm implementation"):
        ops.layer_norm(x, scale, bias, implementation="cudnn")
    with pytest.raises(ValueError, match="scale/bias must be"):
        ops.layer_norm(x, scale[:8], bias)


def test_bfloat16_borrows_the_float16_choices():
    import ml_dtypes

    table = autotune._table()["attention"]
    key = autotune.shape_key("attention", (2, 4096, 8, 40), (2, 4096, 8, 40), jnp.float16)
    recorded = table[key]
    bf16 = ml_dtypes.bfloat16
    assert autotune.choose("attention", (2, 4096, 8, 40), (2, 4096, 8, 40), bf16, default="-") == recorded
    # float32 has no same-width stand-in: the default
    assert autotune.choose("attention", (2, 4096, 8, 40), (2, 4096, 8, 40), jnp.float32, default="-") == "-"


def test_cudnn_off_gpu_is_a_clear_error():
    q = jnp.ones((1, 4, 1, 8), jnp.float16)
    with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
        ops.attention(q, q, q, implementation="cudnn")


@pytest.mark.gpu
def test_auto_on_gpu_uses_the_recorded_kernels():
    q = jnp.ones((2, 1024, 8, 80), jnp.float16)
    k = jnp.ones((2, 77, 8, 80), jnp.float16)
    recorded = autotune._table()["attention"][
        autotune.shape_key("attention", q.shape, k.shape, q.dtype)
    ]
    assert ops._auto_attention(q, k, k) == recorded
    q4, k4 = jnp.ones((4, 1024, 8, 80), jnp.float16), jnp.ones((4, 77, 8, 80), jnp.float16)
    assert ops._auto_attention(q4, k4, k4) == recorded  # same choice at another batch
    vae = jnp.ones((1, 4096, 1, 512), jnp.float16)
    assert ops._auto_attention(vae, vae, vae) == "xla"
    q32 = jnp.ones((2, 100, 3, 64), jnp.float32)  # unmeasured, float32: cuDNN cannot run it
    assert ops._auto_attention(q32, q32, q32) == "xla"


def test_flash_hopper_off_hopper_is_a_clear_error():
    q = jnp.ones((1, 128, 1, 64), jnp.float16)
    with pytest.raises(ValueError, match="flash_hopper.*needs a GPU"):
        ops.attention(q, q, q, implementation="flash_hopper")
    assert ops.attention_head_padding(q.shape, q.shape, q.dtype) is None  # reference in force


@pytest.mark.parametrize("padded", [64, 40], ids=["padded", "unpadded"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_packed_self_attention_is_the_same_attention(monkeypatch, qkv_bias, padded, rng):
    """Where our Hopper kernel is the attention in force, `Attention` projects x once into
    qkv [B, L, 3, H, padded] and hands it over packed; where `padded` exceeds the head dim
    (40 here), q, k, v are widened by zero weight columns and the output projection by zero
    rows. The result must be the plain attention's."""
    from sdjax.models.layers import Attention

    seen = []

    def hopper_stand_in(qkv, *, scale):
        seen.append(qkv.shape)
        q, k, v = (qkv[:, :, i] for i in range(3))
        return ops.attention_reference(q, k, v, scale=scale)

    module = Attention(dim=80, heads=2, qkv_bias=qkv_bias)
    x = jnp.asarray(rng.standard_normal((3, 24, 80)), jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # non-zero biases
    plain = module.apply(params, x)
    monkeypatch.setattr(ops, "packed_self_attention_plan", lambda s, d: ("flash_hopper", padded))
    monkeypatch.setitem(ops._ATTENTION_PACKED, "flash_hopper", hopper_stand_in)
    packed = module.apply(params, x)
    assert seen == [(3, 24, 3, 2, padded)]
    np.testing.assert_allclose(np.asarray(packed), np.asarray(plain), rtol=1e-5, atol=1e-5)
    # cross-attention is never packed
    ctx = jnp.asarray(rng.standard_normal((3, 7, 80)), jnp.float32)
    module.apply(params, x, ctx)
    assert len(seen) == 1


def test_self_attention_packed_other_implementations(rng):
    """Implementations without a packed entry get the three slices: same as `attention`."""
    qkv = jnp.asarray(rng.standard_normal((2, 33, 3, 2, 16)), jnp.float32)
    q, k, v = (qkv[:, :, i] for i in range(3))
    for impl in ("xla", "reference"):
        np.testing.assert_allclose(
            np.asarray(ops.self_attention_packed(qkv, implementation=impl)),
            np.asarray(ops.attention(q, k, v, implementation=impl)),
            rtol=1e-6,
        )
    with pytest.raises(ValueError, match=r"qkv \[B, L, 3, H, D\]"):
        ops.self_attention_packed(q)
    with pytest.raises(ValueError, match="flash_hopper.*needs a GPU"):
        ops.self_attention_packed(qkv.astype(jnp.float16), implementation="flash_hopper")


def test_auto_head_padding_on_a_faked_hopper(monkeypatch):
    """The decision path that runs only on a GPU: `auto` picks flash_hopper where the table
    says so, and `attention_head_padding` then asks for padded heads where the tuned config's
    head_align does not divide the head dim (SD1.5's 40 at 4096 tokens: 48 or 64). Here the
    backend, the device and the choice table are stand-ins; the tuning table is the real one."""
    from custom_calls.flash_attention_hopper import padded_head_dim, tuned_config

    class FakeHopper:
        compute_capability = "9.0"

    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops.jax, "devices", lambda: [FakeHopper()])
    monkeypatch.setattr(autotune, "choose", lambda *a, default: "flash_hopper")
    shape = (2, 4096, 8, 40)
    assert ops.hopper_supports(jnp.ones(shape, jnp.float16), jnp.ones(shape, jnp.float16)) is None
    with ops.use("auto"):
        for s in (shape, (2, 1024, 8, 80), (2, 256, 8, 160)):
            d_pad = padded_head_dim(s[-1], tuned_config(s, s, jnp.float16).head_align)
            want = None if d_pad == s[-1] else d_pad
            assert ops.attention_head_padding(s, s, jnp.float16) == want, s
        assert ops.attention_head_padding(shape, shape, jnp.float16) in (48, 64)
        for s in (shape, (2, 1024, 8, 80)):  # packed wherever flash_hopper is chosen
            d_pad = padded_head_dim(s[-1], tuned_config(s, s, jnp.float16).head_align)
            assert ops.packed_self_attention_head_dim(s, jnp.float16) == d_pad
        # where the Hopper kernel cannot run it (100 rows), `auto` gives the Triton kernel,
        # which reads the packed projection at the head dim itself
        assert ops.packed_self_attention_plan((2, 100, 8, 80), jnp.float16) == ("flash", 80)
        assert ops.attention_head_padding((2, 1024, 5, 64), (2, 1024, 5, 64), jnp.float16) is None
        assert ops.attention_head_padding((2, 100, 8, 80), (2, 100, 8, 80), jnp.float16) is None
    FakeHopper.compute_capability = "8.0"  # an A100: the table's Hopper choice becomes flash
    q = jnp.ones(shape, jnp.float16)
    assert "Hopper" in ops.hopper_supports(q, q)
    assert ops._auto_attention(q, q, q) == "flash"


def test_packed_weights_of_another_width_are_rebuilt(monkeypatch, rng):
    """A `conditioning` entry stacked for another padded width (another size, another kernel
    choice) is not used: the module stacks its weights itself, and the result is the same."""
    from sdjax.models.layers import CONDITIONING, Attention

    module = Attention(dim=80, heads=2)
    x = jnp.asarray(rng.standard_normal((2, 24, 80)), jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x)
    plain = module.apply(params, x)
    stale = module.apply(params, 80, 48, jnp.float32, method="packed_weights")
    assert stale["qkv_kernel"].shape == (80, 3 * 2 * 48)
    monkeypatch.setattr(ops, "packed_self_attention_plan", lambda s, d: ("flash_hopper", 64))
    monkeypatch.setitem(
        ops._ATTENTION_PACKED, "flash_hopper",
        lambda qkv, *, scale: ops.attention_reference(*(qkv[:, :, i] for i in range(3)), scale=scale),
    )  # fmt: skip
    out = module.apply({**params, CONDITIONING: stale}, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_qkv_projection_dot_bias_adds_a_zero_bias_and_changes_nothing(monkeypatch, rng):
    """`qkv_projection="dot_bias"`: the packed weights of projections without biases get a
    zero bias (which XLA gives to cuBLASLt as an epilogue where the weights are prepared);
    "dot" and `auto` (off a measured choice) keep none; the attention's output is the same
    with the conditioning from either."""
    from sdjax.models.layers import CONDITIONING, Attention

    assert ops.qkv_projection_choice("auto") == "dot"
    with pytest.raises(ValueError, match="unknown qkv_projection implementation"):
        ops.Implementations(qkv_projection="bias")
    module = Attention(dim=80, heads=2)
    x = jnp.asarray(rng.standard_normal((2, 24, 80)), jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x)
    # the packed path (as on a Hopper GPU), its kernel the reference; count its calls
    calls = []
    monkeypatch.setattr(ops, "packed_self_attention_plan", lambda s, d: ("flash_hopper", 48))

    def packed(qkv, *, scale):
        calls.append(qkv.shape)
        return ops.attention_reference(*(qkv[:, :, i] for i in range(3)), scale=scale)

    monkeypatch.setitem(ops._ATTENTION_PACKED, "flash_hopper", packed)
    outs = {}
    for choice in ("dot", "dot_bias", "auto"):
        with ops.use(ops.Implementations(qkv_projection=choice)):
            w = module.apply(params, 80, 48, jnp.float32, method="packed_weights")
            outs[choice] = module.apply({**params, CONDITIONING: w}, x)
        assert ("qkv_bias" in w) == (choice == "dot_bias"), choice
        if choice == "dot_bias":
            assert w["qkv_bias"].shape == (3 * 2 * 48,) and not np.any(np.asarray(w["qkv_bias"]))
    assert calls == [(2, 24, 3, 2, 48)] * 3  # the packed path ran, with the prepared weights
    assert np.isfinite(np.asarray(outs["dot"])).all()
    plain = module.apply(params, x)  # heads of 40, unpacked weights stacked by the module
    np.testing.assert_allclose(np.asarray(outs["dot"]), np.asarray(plain), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(outs["dot_bias"]), np.asarray(outs["dot"]))
    np.testing.assert_array_equal(np.asarray(outs["auto"]), np.asarray(outs["dot"]))


def test_qkv_projection_dot_batched_broadcasts_the_weights_where_it_applies(monkeypatch, rng):
    """`qkv_projection="dot_batched"`: from `BATCHED_QKV_MIN_TOKENS` tokens and for several
    samples, the packed weights are one copy per sample and the product is a batched one;
    fewer tokens, one sample, or another form keep the plain [in, out] weights. A batch-1
    input (the guided UNet's shared samples) uses the first copy. The output matches the
    plain product's within float32 rounding, on fresh random inputs."""
    from sdjax.models.layers import CONDITIONING, Attention, BasicTransformerBlock

    monkeypatch.setattr(ops, "BATCHED_QKV_MIN_TOKENS", 24)
    with ops.use(ops.Implementations(qkv_projection="dot_batched")):
        assert ops.qkv_projection_batched(2, 24) and ops.qkv_projection_batched(3, 4096)
        assert not ops.qkv_projection_batched(1, 4096) and not ops.qkv_projection_batched(2, 23)
    with ops.use(ops.Implementations(qkv_projection="dot")):
        assert not ops.qkv_projection_batched(2, 4096)
    module = Attention(dim=80, heads=2)
    x = jnp.asarray(rng.standard_normal((3, 24, 80)), jnp.float32)
    params = module.init(jax.random.PRNGKey(2), x)
    monkeypatch.setattr(ops, "packed_self_attention_plan", lambda s, d: ("flash_hopper", 48))
    monkeypatch.setitem(
        ops._ATTENTION_PACKED,
        "flash_hopper",
        lambda qkv, *, scale: ops.attention_reference(*(qkv[:, :, i] for i in range(3)), scale=scale),
    )  # fmt: skip
    plain = module.apply(params, x)
    with ops.use(ops.Implementations(qkv_projection="dot_batched")):
        w = module.apply(params, 80, 48, jnp.float32, method="packed_weights", batch=3)
        assert w["qkv_kernel"].shape == (3, 80, 3 * 2 * 48)
        got = module.apply({**params, CONDITIONING: w}, x)
        one = module.apply({**params, CONDITIONING: w}, x[:1])
    assert np.isfinite(np.asarray(got)).all()
    assert rel(got, plain) < 1e-5 and rel(one, plain[:1]) < 1e-5
    with ops.use(ops.Implementations(qkv_projection="dot_batched")):
        block = BasicTransformerBlock(dim=80, heads=2)  # its own choice, by tokens and batch
        bparams = block.init(jax.random.PRNGKey(3), x[:2], x[:2, :5])
        cond = block.apply(bparams, 2, 24, jnp.float32, method="weight_conditioning")
        assert cond["attn1"]["qkv_kernel"].shape == (2, 80, 3 * 2 * 48)
        cond = block.apply(bparams, 2, 23, jnp.float32, method="weight_conditioning")
        assert cond["attn1"]["qkv_kernel"].shape == (80, 3 * 2 * 48)


@pytest.mark.gpu
def test_qkv_product_with_a_bias_input_is_a_cublaslt_product_on_gpu(rng):
    """What `qkv_projection="dot_bias"` relies on: at SD1.5's 64x64 fused QKV shape (batch 2,
    heads padded 40 -> 48), the product with a bias that is an input (as the prepared zero
    bias is) compiles to a cuBLASLt matmul with the bias in its epilogue; without it, to a
    cuBLAS GEMM. Numerically the product, within TOL_CONV.

    Compiled with the pipeline's GPU options (Triton GEMMs off), as the pipeline compiles
    it: with XLA's defaults the autotuner may pick a Triton GEMM fusion instead (on the
    H200 it did, at this shape: `experiments/results/README.md`, item 268)."""
    from sdjax.pipeline import default_compiler_options

    x = jnp.asarray(rng.standard_normal((8192, 320)), jnp.float16)
    w = jnp.asarray(rng.standard_normal((320, 1152)) / np.sqrt(320), jnp.float16)
    b = jnp.zeros((1152,), jnp.float16)
    opts = default_compiler_options("gpu")
    with_bias = jax.jit(lambda x, w, b: jnp.dot(x, w) + b).lower(x, w, b)
    with_bias = with_bias.compile(compiler_options=opts)
    hlo = with_bias.as_text()
    assert "cublas$lt$matmul" in hlo, hlo[-3000:]
    plain = jax.jit(jnp.dot).lower(x, w).compile(compiler_options=opts).as_text()
    assert "cublas" in plain
    with jax.default_matmul_precision("float32"):
        want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    got = with_bias(x, w, b)
    assert not jnp.isnan(got).any() and rel(got, want) <= TOL_CONV[jnp.float16]


def test_geglu_hopper_off_gpu_is_a_clear_error():
    x = jnp.ones((128, 64), jnp.float16)
    w, b = jnp.ones((64, 256), jnp.float16), jnp.ones((256,), jnp.float16)
    with pytest.raises(ValueError, match="pallas_hopper.*needs a GPU"):
        ops.geglu(x, w, b, implementation="pallas_hopper")


def test_auto_geglu_takes_triton_where_the_recorded_hopper_kernel_cannot_run(monkeypatch):
    """A table recorded on an H100 may name the Hopper kernel; on a GPU (or at a shape) it
    cannot run, `auto` gives its Triton sibling rather than an error."""
    x = jnp.ones((128, 64), jnp.float16)
    w = jnp.ones((64, 256), jnp.float16)
    monkeypatch.setattr(ops, "_recorded", lambda *a, **k: "pallas_hopper")
    assert ops._auto_geglu(x, w) == "pallas"  # no GPU here
    monkeypatch.setattr(ops, "geglu_hopper_supports", lambda x, w: None)
    assert ops._auto_geglu(x, w) == "pallas_hopper"


def _upsample_case(shape, dtype, rng, stack):
    """Fresh random x [N, H, W, I], kernel [3, 3, I, O], bias [O] in `dtype`, and the float32
    textbook-order result they should give."""
    n, h, w, i, o = shape
    if dtype == jnp.float32:  # on a GPU, float32 convs would otherwise round through TF32
        stack.enter_context(jax.default_matmul_precision("float32"))
    x = jnp.asarray(rng.standard_normal((n, h, w, i)), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, i, o)) / 3, dtype)
    bias = jnp.asarray(rng.standard_normal(o), dtype)
    want = ops.upsample_conv_reference(*(jnp.asarray(a, jnp.float32) for a in (x, kernel, bias)))
    return x, kernel, bias, want


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.float16, 5e-3),
                                        (jnp.bfloat16, 2e-2)])  # fmt: skip
@pytest.mark.parametrize("shape", [(3, 5, 7, 6, 10), (1, 8, 8, 16, 16)], ids=["odd", "square"])
def test_upsample_conv_subpixel_matches_the_textbook_order(shape, dtype, tol, rng, stack):
    """The four-phase 2x2 convolution of the small map is conv3x3(nearest_2x(x)), padding
    included (border phases read the zero padding exactly where the upsampled map would)."""
    n, h, w, i, o = shape
    x, kernel, bias, want = _upsample_case(shape, dtype, rng, stack)
    got = ops.upsample_conv(x, kernel, bias, implementation="subpixel")
    assert got.shape == (n, 2 * h, 2 * w, o) and got.dtype == dtype
    assert rel(got, want) <= tol
    with ops.use(ops.Implementations(upsample_conv="subpixel")):
        np.testing.assert_array_equal(np.asarray(ops.upsample_conv(x, kernel, bias)),
                                      np.asarray(got))  # fmt: skip


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.float16, 5e-3),
                                        (jnp.bfloat16, 2e-2)])  # fmt: skip
@pytest.mark.parametrize("shape", [(3, 5, 7, 6, 10), (1, 8, 8, 16, 16)], ids=["odd", "square"])
def test_upsample_conv_transposed_matches_the_textbook_order(shape, dtype, tol, rng, stack):
    """One convolution of x dilated by zeros, with `transposed_kernel`'s 4x4 taps, is
    conv3x3(nearest_2x(x)), borders included (fresh random inputs, odd sizes, batch 3)."""
    n, h, w, i, o = shape
    x, kernel, bias, want = _upsample_case(shape, dtype, rng, stack)
    kernel4 = ops.transposed_kernel(kernel)
    assert kernel4.shape == (4, 4, i, o) and kernel4.dtype == jnp.float32
    got = ops.upsample_conv_transposed(x, kernel4, bias)
    assert got.shape == (n, 2 * h, 2 * w, o) and got.dtype == dtype
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert rel(got, want) <= tol


@pytest.mark.gpu
def test_upsample_conv_transposed_on_gpu_matches_the_textbook_order(rng):
    """The same on the GPU at a VAE-like size in fp16 (cuDNN's backward-data kernels there)."""
    x = jnp.asarray(rng.standard_normal((1, 32, 32, 128)), jnp.float16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 128, 128)) / np.sqrt(9 * 128), jnp.float16)
    bias = jnp.asarray(rng.standard_normal(128), jnp.float16)
    want = ops.upsample_conv_reference(*(jnp.asarray(a, jnp.float32) for a in (x, kernel, bias)))
    got = jax.jit(ops.upsample_conv_transposed)(x, ops.transposed_kernel(kernel), bias)
    assert rel(got, want) <= 5e-3


@pytest.mark.parametrize("interleave", ["xla", "pallas"])
@pytest.mark.parametrize("form", ["reference", "subpixel", "transposed"])
def test_upsample_conv_with_skip_is_the_concatenate(form, interleave, rng):
    """upsample_conv(x, skip=s) is [upsample_conv(x), s] along channels, in every form and
    interleave (the subpixel form's kernel writes the concatenate in its pass)."""
    x = jnp.asarray(rng.standard_normal((3, 3, 5, 6)), jnp.float16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 6, 8)) / 3, jnp.float16)
    bias = jnp.asarray(rng.standard_normal(8), jnp.float16)
    skip = jnp.asarray(rng.standard_normal((3, 6, 10, 4)), jnp.float16)
    with ops.use(ops.Implementations(upsample_conv=form, interleave=interleave)):
        alone = ops.upsample_conv(x, kernel, bias)
        joined = ops.upsample_conv(x, kernel, bias, skip=skip)
    assert joined.shape == (3, 6, 10, 12) and joined.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(joined[..., :8]), np.asarray(alone))
    np.testing.assert_array_equal(np.asarray(joined[..., 8:]), np.asarray(skip))
    with ops.use(ops.Implementations(upsample_conv=form, interleave="xla")):
        np.testing.assert_array_equal(np.asarray(ops.upsample_conv(x, kernel, bias, skip=skip)),
                                      np.asarray(joined))  # fmt: skip


def test_auto_interleave_is_the_kernel_on_gpu_only():
    assert ops._auto_interleave() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="unknown interleave implementation"):
        ops.Implementations(interleave="triton")


def test_upsample_conv_bad_input_raises():
    x = jnp.ones((1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"skip must be \[1, 8, 8, S\]"):
        ops.upsample_conv(x, jnp.ones((3, 3, 8, 2)), jnp.ones(2), skip=jnp.ones((1, 4, 4, 2)))
    with pytest.raises(ValueError, match=r"kernel must be \[3, 3, 8, O\]"):
        ops.upsample_conv(x, jnp.ones((3, 3, 4, 2)), jnp.ones(2))
    with pytest.raises(ValueError, match="unknown upsample_conv implementation"):
        ops.upsample_conv(x, jnp.ones((3, 3, 8, 2)), jnp.ones(2), implementation="winograd")
    with pytest.raises(ValueError, match="unknown upsample_conv implementation"):
        ops.Implementations(upsample_conv="winograd")


@pytest.mark.parametrize(
    "impls",
    [
        ops.Implementations(upsample_conv="subpixel"),
        ops.Implementations(upsample_conv="subpixel", interleave="pallas"),
        ops.Implementations(conv3x3="taps"),
    ],
    ids=["subpixel_upsampling", "subpixel_pallas_interleave", "taps_convs"],
)
def test_tiny_unet_same_output_with_the_plain_xla_forms(impls, rng):
    """The UNet's upsamplers through the subpixel form (its interleave, and the next skip's
    concatenate, by XLA or by our kernel), or every 3x3 stride-1 conv through the taps form:
    the reference model's output."""
    cfg = sd_config.preset("tiny").unet
    params = jax.jit(lambda: init_params(cfg, jax.random.PRNGKey(1)))()
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 77, cfg.cross_attention_dim)), jnp.float32)

    def run(impls):
        with ops.use(impls), jax.default_matmul_precision("float32"):  # no TF32 on a GPU
            fn = lambda p, x, c: UNet2DConditionModel(cfg).apply({"params": p}, x, 500, c)  # noqa: E731
            return jax.jit(fn)(params, x, ctx)

    assert rel(run(impls), run("reference")) <= 1e-5


@pytest.fixture
def stack():
    import contextlib

    with contextlib.ExitStack() as s:
        yield s


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("form, key, taps", [("subpixel", "phase_kernel", 2),
                                             ("transposed", "transposed_kernel", 4)])  # fmt: skip
def test_subpixel_phase_kernels_are_built_once_per_generation(guided, form, key, taps, rng):
    """With upsample_conv="subpixel" (or "transposed") the per-generation conditioning
    carries every upsampler's phase kernels (its 4x4 kernel), the loop body builds none, and
    the loop's result is the reference loop's."""
    from sdjax import pipeline, schedulers

    cfg = sd_config.preset("tiny").unet
    params = jax.jit(lambda: init_params(cfg, jax.random.PRNGKey(2)))()
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 77, cfg.cross_attention_dim)), jnp.float32)
    sched = schedulers.make("ddim", sd_config.preset("tiny").scheduler, 2)
    subpixel = ops.Implementations(upsample_conv=form)
    with ops.use(subpixel):
        cond = UNet2DConditionModel(cfg).apply({"params": params}, ctx, jnp.float32, (8, 8),
                                               method=UNet2DConditionModel.context_conditioning)
    ups = [b for b in cond.values() if "upsamplers_0" in b]
    assert ups and all(b["upsamplers_0"][key].shape[:2] == (taps, taps) for b in ups)

    def loop(impls):
        fn = lambda p, x, c, u: pipeline.denoise_loop(  # noqa: E731
            p, x, c, u, 7.5, unet_config=cfg, scheduler=sched, kernels=impls)
        with jax.default_matmul_precision("float32"):
            return jax.jit(fn)(params, x, ctx, ctx * 0.5 if guided else None)

    assert rel(loop(subpixel), loop(ops.PRESETS["reference"])) <= 1e-5

    def body_dots(impls):  # the phase kernels' einsums would be dot_generals in the body
        from tests.test_conditioning import _scan_body_dots

        fn = lambda p, x, c: pipeline.denoise_loop(  # noqa: E731
            p, x, c, None, 7.5, unet_config=cfg, scheduler=sched, kernels=impls)
        return _scan_body_dots(jax.make_jaxpr(fn)(params, x, ctx).jaxpr)

    assert body_dots(subpixel) == body_dots(ops.PRESETS["reference"])


# --------------------------------------------------------------------------------------------
# 3x3 convolutions: the taps form
# --------------------------------------------------------------------------------------------

# float16 relative-norm tolerance against float32: both forms accumulate in float32 and
# round once (the taps form's shifted sum is float32 too).
TOL_CONV = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1e-2}
TOL_TAPS_HALF = {jnp.float32: 1e-5, jnp.float16: 3e-3, jnp.bfloat16: 1.5e-2}


@pytest.mark.parametrize(
    "shape, out",
    [((3, 5, 7, 40), 16), ((1, 8, 8, 64), 4), ((2, 9, 6, 24), 80)],
    ids=["batch3_odd", "four_out", "wide_out"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["taps", "taps_half"])
def test_conv3x3_taps_is_the_convolution(shape, out, dtype, impl, rng):
    """Both taps forms against the float32 convolution; "taps_half" rounds each of its nine
    tap products to x's dtype before the float32 sum (TOL_TAPS_HALF: nine roundings of
    products as large as the output, against the one rounding of the output)."""
    x = jnp.asarray(rng.standard_normal(shape) + 0.5, dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], out)) / np.sqrt(9 * shape[-1]))
    bias = jnp.asarray(rng.standard_normal(out), jnp.float32)
    with jax.default_matmul_precision("float32"):  # no TF32 on a GPU
        want = ops.conv3x3_reference(x.astype(jnp.float32), kernel, bias)
        got = ops.conv3x3(x, kernel.astype(dtype), bias, implementation=impl)
    assert got.dtype == dtype and got.shape == (*shape[:-1], out)
    err = rel(got, want)
    assert err <= (TOL_CONV if impl == "taps" else TOL_TAPS_HALF)[dtype], err


# The split-K form rounds its partial sums to x's dtype before adding them (float32 partials
# round once, like the plain convolution): up to `splits` roundings of ~half the output.
TOL_SPLIT = {jnp.float32: 1e-5, jnp.float16: 3e-3, jnp.bfloat16: 1.5e-2}


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("partial", [None, jnp.float32], ids=["partials_in_x", "partials_f32"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_conv3x3_split_k_is_the_convolution(splits, partial, dtype, rng):
    shape, out = (3, 5, 7, 48), 40
    x = jnp.asarray(rng.standard_normal(shape) + 0.5, dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], out)) / np.sqrt(9 * shape[-1]))
    bias = jnp.asarray(rng.standard_normal(out), jnp.float32)
    grouped = ops.split_k_kernel(kernel, splits)
    assert grouped.shape == (3, 3, shape[-1] // splits, splits * out)
    with jax.default_matmul_precision("float32"):  # no TF32 on a GPU
        want = ops.conv3x3_reference(x.astype(jnp.float32), kernel, bias)
        got = ops.conv3x3_split_k(x, grouped.astype(dtype), bias, splits=splits,
                                  partial_dtype=partial)  # fmt: skip
    assert got.dtype == dtype and got.shape == (*shape[:-1], out)
    assert rel(got, want) <= TOL_SPLIT[dtype]
    # OHWI, as the bench gives cuDNN its kernels
    ohwi = jnp.transpose(grouped, (3, 0, 1, 2)).astype(dtype)
    with jax.default_matmul_precision("float32"):
        got_ohwi = ops.conv3x3_split_k(x, ohwi, bias, splits=splits, partial_dtype=partial,
                                       dimension_numbers=("NHWC", "OHWI", "NHWC"))  # fmt: skip
    assert rel(got_ohwi, want) <= TOL_SPLIT[dtype]


def test_split_k_kernel_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="do not split in 3"):
        ops.split_k_kernel(jnp.ones((3, 3, 40, 8)), 3)


def test_conv3x3_errors_and_cpu_choice(rng):
    x = jnp.ones((1, 8, 8, 16))
    with pytest.raises(ValueError, match="kernel \\[3, 3, I, O\\]"):
        ops.conv3x3(x, jnp.ones((3, 3, 8, 4)), jnp.ones(4))
    with pytest.raises(ValueError, match="unknown conv3x3 implementation"):
        ops.conv3x3(x, jnp.ones((3, 3, 16, 4)), jnp.ones(4), implementation="winograd")
    if jax.default_backend() != "gpu":
        assert ops._auto_conv3x3(x, jnp.ones((3, 3, 16, 4))) == "reference"


def test_taps_pays_where_it_measured_faster():
    """The rule against `bench_conv_*_s7`: SD1.5's UNet at 512x512, batch 2."""
    assert ops.taps_pays((2, 8, 8, 1280), (3, 3, 1280, 1280))  # 1.39x
    assert ops.taps_pays((2, 8, 8, 2560), (3, 3, 2560, 1280))  # 1.30x
    assert ops.taps_pays((2, 64, 64, 320), (3, 3, 320, 4))  # conv_out, 3.5x
    assert ops.taps_pays((1, 512, 512, 128), (3, 3, 128, 3))  # VAE conv_out, 1.46x
    assert not ops.taps_pays((2, 16, 16, 2560), (3, 3, 2560, 1280))  # 1.09x, z 0.4 of it
    assert not ops.taps_pays((2, 16, 16, 1280), (3, 3, 1280, 1280))  # 1.01x
    assert not ops.taps_pays((2, 32, 32, 640), (3, 3, 640, 640))  # 0.76x
    assert not ops.taps_pays((2, 64, 64, 4), (3, 3, 4, 320))  # conv_in, 0.09x
    # half-precision tap products at the 8x8 level, float32 ones for conv_out
    assert ops.taps_half_pays((3, 3, 1280, 1280)) and ops.taps_half_pays((3, 3, 2560, 1280))
    assert not ops.taps_half_pays((3, 3, 320, 4)) and not ops.taps_half_pays((3, 3, 128, 3))


# --------------------------------------------------------------------------------------------
# 1x1 convolutions: XLA's convolution or one matrix product
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, out", [((3, 5, 7, 40), 16), ((2, 8, 8, 64), 4)],
                         ids=["batch3_odd", "four_out"])  # fmt: skip
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "dot"])
def test_conv1x1_is_the_per_pixel_product(shape, out, dtype, impl, rng):
    """Both forms against the float32 per-pixel product (einsum), within one rounding of the
    output (TOL_CONV)."""
    x = jnp.asarray(rng.standard_normal(shape) + 0.5, dtype)
    kernel = jnp.asarray(rng.standard_normal((1, 1, shape[-1], out)) / np.sqrt(shape[-1]))
    bias = jnp.asarray(rng.standard_normal(out), jnp.float32)
    with jax.default_matmul_precision("float32"):  # no TF32 on a GPU
        want = jnp.einsum("nhwi,io->nhwo", x.astype(jnp.float32), kernel[0, 0]) + bias
        got = ops.conv1x1(x, kernel.astype(dtype), bias, implementation=impl)
    assert got.dtype == dtype and got.shape == (*shape[:-1], out)
    assert not jnp.isnan(got).any()
    err = rel(got, want)
    assert err <= TOL_CONV[dtype], err


def test_conv1x1_errors_choice_and_module(rng):
    """Shape errors name the expected shapes; an unknown implementation is refused; `auto`
    is the matrix product on GPU only; the model's 1x1 Conv2d goes through `ops.conv1x1`
    (same output under either implementation) and its other convolutions do not."""
    from sdjax.models.layers import Conv2d

    x = jnp.ones((1, 4, 4, 16))
    with pytest.raises(ValueError, match="kernel \\[1, 1, I, O\\]"):
        ops.conv1x1(x, jnp.ones((1, 1, 8, 4)), jnp.ones(4))
    with pytest.raises(ValueError, match="kernel \\[1, 1, I, O\\]"):
        ops.conv1x1(x[0], jnp.ones((1, 1, 16, 4)), jnp.ones(4))
    with pytest.raises(ValueError, match="unknown conv1x1 implementation"):
        ops.conv1x1(x, jnp.ones((1, 1, 16, 4)), jnp.ones(4), implementation="winograd")
    with ops.use(ops.Implementations(conv1x1="auto")):
        assert ops.conv1x1_choice() == ("dot" if jax.default_backend() == "gpu" else "reference")
    assert ops.Implementations.preset("auto").conv1x1 == "auto"

    conv = Conv2d(24, kernel_size=1, padding=0)
    xm = jnp.asarray(rng.standard_normal((3, 5, 6, 16)), jnp.float32)
    params = conv.init(jax.random.PRNGKey(0), xm)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
    calls = []
    real = ops.conv1x1

    def spy(*args, **kw):
        calls.append(kw.get("implementation"))
        return real(*args, **kw)

    outs = {}
    for impl in ("reference", "dot"):
        with ops.use(ops.Implementations(conv1x1=impl)), pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops, "conv1x1", spy)
            outs[impl] = conv.apply(params, xm)
            # a strided 1x1 and a 3x3 are not 1x1 stride-1 convolutions
            Conv2d(8, kernel_size=1, stride=2, padding=0).init(jax.random.PRNGKey(1), xm)
            Conv2d(8).init(jax.random.PRNGKey(1), xm)
    assert len(calls) == 2
    with jax.default_matmul_precision("float32"):
        want = jnp.einsum("nhwi,io->nhwo", xm, params["params"]["kernel"][0, 0])
    want = want + params["params"]["bias"]
    for impl, got in outs.items():
        assert rel(got, want) <= 1e-5, impl


@pytest.mark.gpu
def test_conv1x1_dot_on_gpu_is_a_cublas_product_with_the_residual_fused(rng):
    """At SD1.5's 64x64 proj_out shape (with the residual add the model does next) `auto`
    compiles to a cuBLAS product, not a cuDNN convolution; within 2x TOL_CONV of the float32
    product (two roundings: the product's and the sum's)."""
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 320)), jnp.float16)
    residual = jnp.asarray(rng.standard_normal((2, 64, 64, 320)), jnp.float16)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 320, 320)) / np.sqrt(320), jnp.float16)
    bias = jnp.asarray(rng.standard_normal(320), jnp.float16)
    fn = jax.jit(lambda x, k, b, r: ops.conv1x1(x, k, b, implementation="auto") + r)
    hlo = fn.lower(x, kernel, bias, residual).compile().as_text()
    assert "cudnn-conv" not in hlo
    assert "cublas" in hlo
    with jax.default_matmul_precision("float32"):
        want = (jnp.einsum("nhwi,io->nhwo", x.astype(jnp.float32), kernel[0, 0].astype(jnp.float32))
                + bias.astype(jnp.float32) + residual.astype(jnp.float32))  # fmt: skip
    got = fn(x, kernel, bias, residual)
    assert not jnp.isnan(got).any()
    assert rel(got, want) <= 2 * TOL_CONV[jnp.float16]


# --------------------------------------------------------------------------------------------
# GroupNorm of a concatenation that is never written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "c1, c2, groups",
    [(40, 20, 4), (64, 32, 8), (24, 24, 6)],
    ids=["straddling", "aligned", "equal"],
)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_group_norm_concat_is_group_norm_of_the_concatenation(c1, c2, groups, impl, rng):
    """40 + 20 channels in 4 groups of 15: groups 2 straddles the boundary."""
    x1 = jnp.asarray(rng.standard_normal((3, 5, 6, c1)) * 2 + 3, jnp.float32)
    x2 = jnp.asarray(rng.standard_normal((3, 5, 6, c2)) - 1, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(c1 + c2), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c1 + c2), jnp.float32)
    kw = dict(groups=groups, activation="silu")
    want = ops.group_norm_reference(jnp.concatenate([x1, x2], -1), scale, bias, **kw)
    got = ops.group_norm_concat(x1, x2, scale, bias, implementation=impl, **kw)
    assert rel(got, want) <= 1e-5


def test_group_norm_concat_errors():
    x = jnp.ones((1, 4, 4, 8))
    with pytest.raises(ValueError, match="parts must agree"):
        ops.group_norm_concat(x, jnp.ones((1, 4, 5, 8)), jnp.ones(16), jnp.ones(16), groups=4)
    with pytest.raises(ValueError, match="scale/bias must be \\[16\\]"):
        ops.group_norm_concat(x, x, jnp.ones(8), jnp.ones(8), groups=4)
    with pytest.raises(ValueError, match="not divisible"):
        ops.group_norm_concat(x, x, jnp.ones(16), jnp.ones(16), groups=5)


@pytest.mark.gpu
def test_auto_conv3x3_on_gpu_reads_a_large_kernel_in_place(rng):
    """At the UNet's 8x8 level `auto` takes the taps form with half-precision tap products
    (conv_out's keeps float32 ones), and its compiled program uses the
    HWIO kernel as it is: no transpose of the 29.5 MB parameter (in call 2 of the seventh
    session, rearranging it cost 0.42 ms per step), and no cuDNN convolution."""
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 1280)), jnp.float16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 1280, 1280)) / 100, jnp.float16)
    bias = jnp.asarray(rng.standard_normal(1280), jnp.float16)
    assert ops._auto_conv3x3(x, kernel) == "taps_half"
    assert ops._auto_conv3x3(jnp.zeros((2, 64, 64, 320), jnp.float16),
                             jnp.zeros((3, 3, 320, 4), jnp.float16)) == "taps"  # fmt: skip
    fn = jax.jit(lambda x, k, b: ops.conv3x3(x, k, b, implementation="auto"))
    hlo = fn.lower(x, kernel, bias).compile().as_text()
    transposed = [line for line in hlo.splitlines() if "transpose(" in line
                  and ("1280,3,3" in line or "3,3,1280" in line)]  # fmt: skip
    assert not transposed, transposed
    assert "cudnn" not in hlo  # a matrix product (cuBLAS, or a Triton GEMM outside the
    # pipeline, whose options turn those off), not a convolution
    with jax.default_matmul_precision("float32"):
        want = ops.conv3x3_reference(x.astype(jnp.float32), kernel.astype(jnp.float32), bias)
    assert rel(fn(x, kernel, bias), want) <= TOL_TAPS_HALF[jnp.float16]


# --------------------------------------------------------------------------------------------
# Nearest 2x + 3x3 conv: where `auto` takes the subpixel form
# --------------------------------------------------------------------------------------------


def test_subpixel_pays_from_16x16_inputs():
    assert not ops.subpixel_pays(8, 8)  # UNet 8 -> 16: 0.78x alone, even in the loop
    assert ops.subpixel_pays(16, 16) and ops.subpixel_pays(32, 32) and ops.subpixel_pays(64, 64)
    with ops.use(ops.Implementations(upsample_conv="auto")):
        want = "subpixel" if jax.default_backend() == "gpu" else "reference"
        assert ops.upsample_conv_choice((2, 32, 32, 8)) == want
        assert ops.upsample_conv_choice((2, 8, 8, 8)) == "reference"


def test_auto_upsample_never_takes_the_transposed_form(monkeypatch):
    """On a GPU `auto` keeps the subpixel form at the VAE's upsamplers (64x64 inputs and up)
    too: the transposed form measured level with it there (`bench_upsample_*_s19c`)."""
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    with ops.use(ops.Implementations(upsample_conv="auto")):
        for side in (16, 32, 64, 128, 256):
            assert ops.upsample_conv_choice((1, side, side, 8)) == "subpixel"
        assert ops.upsample_conv_choice((2, 8, 8, 8)) == "reference"
    with ops.use(ops.Implementations(upsample_conv="transposed")):
        assert ops.upsample_conv_choice((1, 64, 64, 8)) == "transposed"


@pytest.mark.parametrize("latent, built", [(32, True), (16, False)])
def test_auto_upsample_phases_in_the_conditioning_where_subpixel_pays(monkeypatch, latent, built):
    """The tiny UNet's one upsampler reads its level at half the latent's side: 16x16 gets
    phase kernels in the per-generation conditioning (on a GPU), 8x8 does not."""
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    cfg = sd_config.preset("tiny").unet
    params = jax.jit(lambda: init_params(cfg, jax.random.PRNGKey(0)))()
    ctx = jnp.zeros((2, 77, cfg.cross_attention_dim), jnp.float32) + 0.5
    with ops.use(ops.Implementations(upsample_conv="auto")):
        cond = UNet2DConditionModel(cfg).apply(
            {"params": params}, ctx, jnp.float32, (latent, latent),
            method=UNet2DConditionModel.context_conditioning,
        )  # fmt: skip
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(cond)[0]]
    assert any("phase_kernel" in p for p in paths) == built, paths


def _causal_inputs(rng, shape, dtype):
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3)]


def _causal_by_hand(q, k, v, scale):
    """Query i attends to keys 0..i: each row's softmax over its own prefix, in float64."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    out = np.zeros_like(q)
    for i in range(q.shape[1]):
        logits = np.einsum("bhd,bkhd->bhk", q[:, i], k[:, : i + 1]) * scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, i] = np.einsum("bhk,bkhd->bhd", p, v[:, : i + 1])
    return out


def test_causal_attention_reference_is_the_prefix_softmax(rng):
    q, k, v = _causal_inputs(rng, (3, 77, 2, 40), jnp.float32)
    out = ops.causal_attention(q, k, v, implementation="reference")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, _causal_by_hand(q, k, v, 40**-0.5)) <= 1e-5
    # the first query sees only the first key: its output is v[:, 0]
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_causal_attention_xla_agrees(dtype, head_dim, rng):
    q, k, v = _causal_inputs(rng, (3, 77, 3, head_dim), dtype)
    ref = ops.causal_attention(q, k, v, implementation="reference")
    out = ops.causal_attention(q, k, v, implementation="xla")
    assert out.dtype == dtype
    assert rel(out, ref) <= {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}[dtype]


def test_attention_cross_past_its_keys_runs_flash_and_says_so(rng):
    q = jnp.asarray(rng.standard_normal((1, 20, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 300, 2, 16)), jnp.float32)
    ref = ops.attention(q, k, k, implementation="reference")
    assert rel(ops.attention(q, k, k, implementation="cross"), ref) <= 1e-5
    assert "attention cross->flash at Lk 300" in ops.fallbacks()


def test_causal_attention_kernels_without_a_mask_run_xla_and_say_so(rng):
    q, k, v = _causal_inputs(rng, (2, 77, 2, 64), jnp.float32)
    ref = ops.causal_attention(q, k, v, implementation="reference")
    for impl in ("flash", "fused_softmax", "cross"):
        assert rel(ops.causal_attention(q, k, v, implementation=impl), ref) <= 1e-5
        assert f"causal attention {impl}->xla" in ops.fallbacks()


def test_causal_attention_errors(rng):
    q = jnp.ones((2, 77, 2, 64), jnp.float16)
    with pytest.raises(ValueError, match="one shape"):
        ops.causal_attention(q, q[:, :10], q[:, :10])
    with pytest.raises(ValueError, match="unknown attention implementation"):
        ops.causal_attention(q, q, q, implementation="flashy")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
            ops.causal_attention(q, q, q, implementation="cudnn")
        with ops.use("auto"):  # auto off GPU: the float32 reference
            assert ops._auto_causal(q) == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 77, 12, 64), (3, 77, 16, 64), (1, 77, 20, 64), (2, 50, 8, 40)])
def test_causal_attention_cudnn_agrees_on_gpu(dtype, shape, rng):
    """cuDNN's fused causal attention (what `auto` takes on GPU) against the float32
    reference: SD1.x's text encoder (12 heads), SD2.x's (16), batch 3, an odd length."""
    q, k, v = _causal_inputs(rng, shape, dtype)
    ref = ops.causal_attention(q, k, v, implementation="reference")
    out = ops.causal_attention(q, k, v, implementation="cudnn")
    assert out.dtype == dtype
    assert rel(out, ref) <= {jnp.float16: 2e-3, jnp.bfloat16: 2e-2}[dtype]
    assert ops._auto_causal(q) == "cudnn"


def test_packed_plan_takes_the_triton_kernel_where_flash_is_in_force(rng):
    """With the Triton kernel in force (here in interpret mode), a self-attention runs packed
    through `flash_attention_qkv` at its own head dim, the same as the plain attention."""
    from sdjax.models.layers import Attention

    shape = (2, 24, 2, 40)
    with ops.use(ops.Implementations(attention="flash")):
        assert ops.packed_self_attention_plan(shape, jnp.float32) == ("flash", 40)
        assert ops.packed_self_attention_head_dim(shape, jnp.float32) == 40
    with ops.use(ops.Implementations(attention="xla")):
        assert ops.packed_self_attention_plan(shape, jnp.float32) is None
    module = Attention(dim=80, heads=2)
    x = jnp.asarray(rng.standard_normal((2, 24, 80)), jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x)
    with ops.use(ops.Implementations(attention="reference")):
        plain = module.apply(params, x)
    calls = []
    real = ops._ATTENTION_PACKED["flash"]
    with ops.use(ops.Implementations(attention="flash")):
        ops._ATTENTION_PACKED["flash"] = lambda qkv, *, scale: calls.append(qkv.shape) or real(
            qkv, scale=scale
        )
        try:
            packed = module.apply(params, x)
        finally:
            ops._ATTENTION_PACKED["flash"] = real
    assert calls == [(2, 24, 3, 2, 40)]
    np.testing.assert_allclose(np.asarray(packed), np.asarray(plain), rtol=1e-5, atol=1e-5)
