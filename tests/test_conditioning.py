"""Precomputed conditioning: the cross-attention K/V of the text states and every resnet's time
projection, computed once before the denoising loop instead of in every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import config as sd_config
from sdjax import pipeline, schedulers, weights
from sdjax.models import unet as unet_lib
from tests._pipeline_util import random_pipeline, two_prompt_latents

CFG = sd_config.preset("tiny")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def params():
    return weights.random_params(CFG, seed=3)["unet"]


def inputs(batch=3, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    cfg = CFG.unet
    x = jax.random.normal(k[0], (batch, 16, 16, cfg.in_channels))
    ctx = jax.random.normal(k[1], (batch, 77, cfg.cross_attention_dim))
    t = jax.random.randint(k[2], (batch,), 0, 1000)
    return x, t, ctx


def test_conditioned_apply_matches_the_plain_unet(params):
    x, t, ctx = inputs()
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    ref = model.apply({"params": params}, x, t, ctx)
    variables = {"params": params}
    cc = model.apply(variables, ctx, jnp.float32, method="context_conditioning")
    tc = model.apply(variables, t, jnp.float32, method="time_conditioning")
    # one entry per cross-attention (K and V) and per resnet (its time projection)
    n_cross = sum(1 for path in _paths(params) if path.endswith("attn2/to_k/kernel"))
    n_resnets = sum(1 for path in _paths(params) if path.endswith("time_emb_proj/kernel"))
    assert len([p for p in _paths(cc) if p.endswith("/k")]) == n_cross > 0
    assert len([p for p in _paths(tc) if p.endswith("/temb")]) == n_resnets > 0
    out = unet_lib.conditioned_apply(params, CFG.unet, x, t, unet_lib.merge_conditioning(cc, tc))
    assert rel(out, ref) < 1e-6


def test_missing_context_is_a_clear_error(params):
    x, t, _ = inputs(batch=1)
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    with pytest.raises(ValueError, match="neither a context nor precomputed"):
        model.apply({"params": params}, x, t, None)


def _paths(tree) -> list[str]:
    return [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _loop(params, scheduler_name, guided, hoist, steps=3, pack=True, prepared=None):
    sched = schedulers.make(scheduler_name, CFG.scheduler, steps)
    x, _, ctx = inputs(batch=2, seed=1)
    uctx = jax.random.normal(jax.random.PRNGKey(9), ctx.shape) if guided else None
    noise = None
    if sched.needs_noise:
        noise = jax.random.normal(jax.random.PRNGKey(4), (steps, *x.shape))

    def run(p, x, ctx, uctx, noise):
        return pipeline.denoise_loop(
            p, x, ctx, uctx, 7.5, noise, unet_config=CFG.unet, scheduler=sched,
            hoist_conditioning=hoist, pack_time_rows=pack, prepared=prepared,
        )  # fmt: skip

    return run, (params, x * sched.init_noise_sigma, ctx, uctx, noise)


@pytest.mark.parametrize("scheduler_name", ["ddim", "euler_a", "dpmpp_2m", "pndm"])
@pytest.mark.parametrize("guided", [True, False])
def test_hoisted_loop_matches_the_per_step_loop(params, scheduler_name, guided):
    outs = {}
    for hoist in (True, False):
        run, args = _loop(params, scheduler_name, guided, hoist)
        outs[hoist] = jax.jit(run)(*args)
    assert rel(outs[True], outs[False]) < 1e-5


def test_packed_time_rows_give_the_per_leaf_loop_exactly(params):
    """`pack_time_rows` only changes how the scan slices the time projections: the same
    latents, bit for bit."""
    outs = [jax.jit(run)(*args) for run, args in
            (_loop(params, "ddim", True, True, pack=pack) for pack in (True, False))]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


def _scan_body_dots(jaxpr) -> int:
    """dot_generals inside the scan's body (nested calls included)."""
    return sum(e.primitive.name == "dot_general" for e in _scan_body_eqns(jaxpr))


def test_the_loop_body_no_longer_projects_text_or_time(params):
    """Hoisted, the step has 2 fewer dots per cross-attention (K, V), one fewer per resnet
    (its time projection), 2 fewer for the time MLP, and 2 fewer per self-attention (q, k and
    v in one product with weights stacked in the conditioning; off GPU none runs packed)."""
    counts = {}
    for hoist in (True, False):
        run, args = _loop(params, "ddim", True, hoist)
        counts[hoist] = _scan_body_dots(jax.make_jaxpr(run)(*args).jaxpr)
    n_cross = sum(1 for p in _paths(params) if p.endswith("attn2/to_k/kernel"))
    n_resnets = sum(1 for p in _paths(params) if p.endswith("time_emb_proj/kernel"))
    n_self = sum(1 for p in _paths(params) if p.endswith("attn1/to_q/kernel"))
    assert n_cross > 0 and n_self > 0
    assert counts[False] - counts[True] == 2 * n_cross + n_resnets + 2 + 2 * n_self


def test_pipeline_images_same_with_and_without_hoisting():
    latents = {hoist: two_prompt_latents(hoist_conditioning=hoist) for hoist in (True, False)}
    assert rel(latents[True], latents[False]) < 1e-5


def _scan_body_eqns(jaxpr) -> list:
    """Every equation inside the scan's body (nested calls included)."""

    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    return _eqns(scans[0].params["jaxpr"].jaxpr)


def _eqns(jaxpr, *, into_scans: bool = True) -> list:
    """Every equation of jaxpr, nested calls included (a scan's body only with into_scans)."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        if eqn.primitive.name == "scan" and not into_scans:
            continue
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _eqns(inner, into_scans=into_scans)
    return out


@pytest.fixture
def packed_everywhere(monkeypatch):
    """Every self-attention runs packed, heads padded by 8, through a stand-in for the Hopper
    kernel (which needs a GPU): the reference attention on the three slices."""
    from sdjax import ops

    calls = []

    def stand_in(qkv, *, scale):
        calls.append(qkv.shape)
        return ops.attention_reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=scale)

    monkeypatch.setattr(ops, "packed_self_attention_plan",
                        lambda shape, dtype: ("flash_hopper", shape[-1] + 8))  # fmt: skip
    monkeypatch.setitem(ops._ATTENTION_PACKED, "flash_hopper", stand_in)
    return calls


def test_packed_projection_weights_are_stacked_once_per_generation(params, packed_everywhere):
    """Hoisted, every packed self-attention reads its fused q/k/v and output weights from the
    conditioning (`Attention.packed_weights`, built once before the loop): the step stacks
    no weights, where the per-step loop stacks one [dim, 3, heads, padded] matrix per
    self-attention. Same latents either way."""
    n_self = sum(1 for p in _paths(params) if p.endswith("attn1/to_q/kernel"))
    stacks, outs = {}, {}
    for hoist in (True, False):
        run, args = _loop(params, "ddim", True, hoist)
        eqns = _scan_body_eqns(jax.make_jaxpr(run)(*args).jaxpr)
        stacks[hoist] = sum(
            1
            for e in eqns
            if e.primitive.name in ("concatenate", "stack")  # jnp.stack's, by jax version
            and len(e.outvars[0].aval.shape) == 4
            and e.outvars[0].aval.shape[1] == 3  # [dim, 3, heads, padded]
        )  # fmt: skip
        outs[hoist] = jax.jit(run)(*args)
    assert packed_everywhere  # the packed path ran
    assert stacks == {True: 0, False: n_self} and n_self > 0
    assert rel(outs[True], outs[False]) < 1e-5


def test_packed_weights_in_the_conditioning_match_the_level(params, packed_everywhere):
    """`context_conditioning` with the latent's size gives every self-attention its packed
    weights; without it, none (the K/V alone, as before)."""
    x, t, ctx = inputs()
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    variables = {"params": params}
    with_hw = model.apply(variables, ctx, jnp.float32, x.shape[1:3], method="context_conditioning")
    without = model.apply(variables, ctx, jnp.float32, method="context_conditioning")
    n_self = sum(1 for p in _paths(params) if p.endswith("attn1/to_q/kernel"))
    assert len([p for p in _paths(with_hw) if p.endswith("attn1/qkv_kernel")]) == n_self
    assert not [p for p in _paths(without) if "attn1" in p]
    tc = model.apply(variables, t, jnp.float32, method="time_conditioning")
    ref = model.apply(variables, x, t, ctx)
    out = unet_lib.conditioned_apply(
        params, CFG.unet, x, t, unet_lib.merge_conditioning(with_hw, tc)
    )
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("batch_of_temb", [1, 3])
def test_shared_time_embedding_is_folded_into_the_conv_bias(batch_of_temb, rng):
    """A ResnetBlock2D whose precomputed time projection has batch 1 (one timestep for the
    whole guided batch) adds it to conv1's bias; per-sample projections are added to the
    map. Both match the textbook order (conv + bias, then + projection)."""
    from sdjax.models.layers import CONDITIONING, ResnetBlock2D

    block = ResnetBlock2D(out_channels=16, groups=4)
    x = jnp.asarray(rng.standard_normal((3, 6, 6, 8)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((3, 12)), jnp.float32)
    params = block.init(jax.random.PRNGKey(0), x, temb)["params"]
    proj = jnp.asarray(rng.standard_normal((batch_of_temb, 16)), jnp.float32)
    out = block.apply({"params": params, CONDITIONING: {"temb": proj}}, x)

    def part(method, v):
        return block.apply({"params": params}, v, method=method)

    h = part(lambda m, v: m.conv1(m.norm1(v)), x) + proj[:, None, None, :]
    expected = part(lambda m, v: m.conv_shortcut(v), x) + part(lambda m, v: m.conv2(m.norm2(v)), h)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out)).max() > 0.1  # not a vacuous zero map


def test_pack_rows_round_trips_a_tree_of_per_step_leaves():
    """`pipeline.pack_rows`: one [T, K] array of the leaves; each row unpacks into the tree of
    that step's leaves, exactly."""
    from sdjax.pipeline import pack_rows

    rng = np.random.default_rng(0)
    tree = {"a": {"r0": {"temb": jnp.asarray(rng.standard_normal((4, 6)), jnp.float16)}},
            "b": {"r1": {"temb": jnp.asarray(rng.standard_normal((4, 2, 3)), jnp.float16)}}}  # fmt: skip
    packed, unpack = pack_rows(tree)
    assert packed.shape == (4, 12) and packed.dtype == jnp.float16
    for t in range(4):
        row = jax.jit(unpack)(packed[t])
        for got, want in zip(jax.tree.leaves(row), jax.tree.leaves(tree), strict=True):
            assert got.shape == want.shape[1:]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want[t]))
    with pytest.raises(ValueError, match="one dtype"):
        pack_rows({"a": jnp.ones((2, 3), jnp.float16), "b": jnp.ones((2, 3), jnp.float32)})


# --------------------------------------------------------------------------------------------
# The conditioning's weight-only part, prepared once per pipeline (`UNet2DConditionModel.prepare`)
# --------------------------------------------------------------------------------------------


def _prepare(params, hw=(16, 16), kernels=None):
    from sdjax import ops

    kernels = kernels or ops.PRESETS["reference"]
    return pipeline.prepare_unet(params, unet_config=CFG.unet, sample_hw=hw, dtype=jnp.float32,
                                 kernels=kernels)  # fmt: skip


def _assert_same_trees(a, b, tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert rel(x, y) < tol


def test_prepared_conditioning_gives_the_same_trees(params, packed_everywhere):
    """With `prepare`'s stacks, `context_conditioning` and `time_conditioning` give the trees
    they give without: every K, V and time projection from one product each, the upsamplers'
    phase kernels as prepared, the fused q/k/v weights made as before."""
    from sdjax import ops

    subpixel = ops.Implementations(upsample_conv="subpixel")
    x, t, ctx = inputs()
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    v = {"params": params}
    prepared = _prepare(params, kernels=subpixel)
    with ops.use(subpixel):
        plain_c = model.apply(v, ctx, jnp.float32, x.shape[1:3], method="context_conditioning")
        prep_c = model.apply(v, ctx, jnp.float32, x.shape[1:3], prepared,
                             method="context_conditioning")  # fmt: skip
    plain_t = model.apply(v, t, jnp.float32, method="time_conditioning")
    prep_t = model.apply(v, t, jnp.float32, prepared, method="time_conditioning")
    _assert_same_trees(prep_c, plain_c, 1e-6)
    _assert_same_trees(prep_t, plain_t, 1e-6)
    paths = _paths(prep_c)
    assert any(p.endswith("phase_kernel") for p in paths)
    assert any(p.endswith("attn1/qkv_kernel") for p in paths)
    # the stacks: every resnet's projection columns, every cross-attention's K and V columns
    widths = [k.shape[1] for p, k in zip(_paths(params), jax.tree.leaves(params), strict=True)
              if p.endswith("time_emb_proj/kernel")]  # fmt: skip
    kv = [k.shape[1] for p, k in zip(_paths(params), jax.tree.leaves(params), strict=True)
          if p.endswith(("attn2/to_k/kernel", "attn2/to_v/kernel"))]  # fmt: skip
    assert prepared["time"]["kernel"].shape[1] == sum(widths) and len(widths) > 1
    assert prepared["key_value"]["kernel"].shape == (CFG.unet.cross_attention_dim, sum(kv))
    assert "bias" not in prepared["key_value"]  # SD's K and V projections have none
    # the phase kernels are prepared; the fused q/k/v weights are not (memory: `prepare`)
    assert [p for p in _paths(prepared["conditioning"]) if p.endswith("phase_kernel")]
    assert not [p for p in _paths(prepared["conditioning"]) if "attn1" in p]


def test_prepared_qkv_biases_reach_the_packed_projections(params, packed_everywhere):
    """`qkv_projection="dot_bias"`: `prepare` gives every packed self-attention (whose
    projections have no bias) a zero "qkv_bias" of the fused width, and nothing else of its
    weights; the prepared conditioning carries them (the runtime input that keeps XLA from
    folding the add); the UNet's output is the same as without. "dot": none prepared."""
    from sdjax import ops

    x, t, ctx = inputs()
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    v = {"params": params}
    n_self = sum(1 for p in _paths(params) if p.endswith("attn1/to_q/kernel"))
    outs = {}
    for choice in ("dot", "dot_bias"):
        kernels = ops.Implementations(qkv_projection=choice)
        prepared = _prepare(params, hw=x.shape[1:3], kernels=kernels)
        biases = prepared.get("attention_bias", {})
        paths = _paths(biases)
        if choice == "dot":
            assert not paths
        else:
            assert len(paths) == n_self and all(p.endswith("attn1/qkv_bias") for p in paths)
            for leaf in jax.tree.leaves(biases):  # heads padded by 8 (`packed_everywhere`)
                assert leaf.ndim == 1 and leaf.shape[0] % 3 == 0 and not np.any(np.asarray(leaf))
        with ops.use(kernels):
            cond = model.apply(v, ctx, jnp.float32, x.shape[1:3], prepared,
                               method="context_conditioning")  # fmt: skip
            tc = model.apply(v, t, jnp.float32, prepared, method="time_conditioning")
            got = [p for p in _paths(cond) if p.endswith("attn1/qkv_bias")]
            assert len(got) == (n_self if choice == "dot_bias" else 0)
            outs[choice] = unet_lib.conditioned_apply(
                params, CFG.unet, x, t, unet_lib.merge_conditioning(cond, tc))
    assert packed_everywhere  # the packed path ran
    assert rel(outs["dot_bias"], outs["dot"]) < 1e-6 and np.isfinite(np.asarray(outs["dot"])).all()


def test_batched_qkv_products_match_the_plain_ones(params, packed_everywhere, monkeypatch):
    """`qkv_projection="dot_batched"` (its token threshold lowered to this model's sizes):
    every packed self-attention's conditioning holds one copy of the fused weights per
    sample, [batch, in, out], and the UNet's output matches the plain product's; with a guided
    batch (each sample shared by two contexts) the shared self-attention reads the first
    copy."""
    from sdjax import ops

    monkeypatch.setattr(ops, "BATCHED_QKV_MIN_TOKENS", 1)
    x, t, ctx = inputs()
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    v = {"params": params}
    n_self = sum(1 for p in _paths(params) if p.endswith("attn1/to_q/kernel"))
    outs, guided = {}, {}
    for choice in ("dot", "dot_batched"):
        kernels = ops.Implementations(qkv_projection=choice)
        prepared = _prepare(params, hw=x.shape[1:3], kernels=kernels)
        with ops.use(kernels):
            cond = model.apply(v, ctx, jnp.float32, x.shape[1:3], prepared,
                               method="context_conditioning")  # fmt: skip
            tc = model.apply(v, t, jnp.float32, prepared, method="time_conditioning")
            qkv = [leaf for path, leaf in zip(_paths(cond), jax.tree.leaves(cond), strict=True)
                   if path.endswith("attn1/qkv_kernel")]  # fmt: skip
            assert len(qkv) == n_self
            want_ndim = 3 if choice == "dot_batched" else 2
            assert all(k.ndim == want_ndim for k in qkv), [k.shape for k in qkv]
            outs[choice] = unet_lib.conditioned_apply(
                params, CFG.unet, x, t, unet_lib.merge_conditioning(cond, tc))
            # one sample shared by two contexts: its first self-attention runs at batch 1
            ctx2 = jnp.concatenate([ctx[:1], ctx[1:2]], axis=0)
            cond2 = model.apply(v, ctx2, jnp.float32, x.shape[1:3], prepared,
                                method="context_conditioning")  # fmt: skip
            tc2 = model.apply(v, t[:1], jnp.float32, prepared, method="time_conditioning")
            guided[choice] = unet_lib.conditioned_apply(
                params, CFG.unet, x[:1], t[:1], unet_lib.merge_conditioning(cond2, tc2))
    assert packed_everywhere  # the packed path ran
    assert np.isfinite(np.asarray(outs["dot"])).all() and guided["dot"].shape[0] == 2
    assert rel(outs["dot_batched"], outs["dot"]) < 1e-5
    assert rel(guided["dot_batched"], guided["dot"]) < 1e-5


def test_prepared_sd15_fits_its_memory_share():
    """SD1.5's prepared conditioning at 512x512 in fp16 (shapes only): the stacked
    time-projection (1280 x 20160) and K/V (768 x 24960) kernels and the phase-kernel stacks,
    here with every upsampler in the subpixel form (0.194 GiB, an upper bound: on the H100
    `auto` keeps the 8x8 input's textbook order, 0.145 GiB). With the parameters (1.99 GiB)
    and the VAE decode's temporary memory the H100 run's allocator peak stays under the 2.6
    GiB bound (s17e: 2.37 GiB unprepared, +0.246 with 0.238 GiB prepared)."""
    from sdjax import ops

    sd15 = sd_config.preset("sd15")
    shapes = jax.eval_shape(lambda: weights.random_params(sd15, 0, dtype=jnp.float16))["unet"]
    kernels = ops.Implementations(upsample_conv="subpixel")
    prepared = jax.eval_shape(lambda p: pipeline.prepare_unet(
        p, unet_config=sd15.unet, sample_hw=(64, 64), dtype=jnp.float16, kernels=kernels),
        shapes)  # fmt: skip
    assert prepared["time"]["kernel"].shape == (1280, 20160)
    assert prepared["key_value"]["kernel"].shape == (768, 24960)
    phases = [a.shape for a in jax.tree.leaves(prepared["conditioning"])]
    # the 8x8 input's upsampler is in this list too: "subpixel" everywhere in this test
    assert sorted(phases) == sorted([(2, 2, 1280, 5120)] * 2 + [(2, 2, 640, 2560)])
    gib = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(prepared)) / 2**30
    assert gib < 0.2, gib


def test_split_projections_refuses_a_product_of_another_width(params):
    model = unet_lib.UNet2DConditionModel(CFG.unet)
    layout = model.apply({"params": params}, method="time_weights")
    with pytest.raises(ValueError, match="columns for"):
        unet_lib.split_projections(jnp.ones((2, 7)), layout)


@pytest.mark.parametrize("pack", [True, False])
def test_prepared_loop_matches_the_unprepared_loop(params, pack, packed_everywhere):
    outs = []
    for prepared in (None, _prepare(params)):
        run, args = _loop(params, "ddim", True, True, pack=pack, prepared=prepared)
        outs.append(jax.jit(run)(*args))
    # float32; the stacked products may sum in another order (as XLA's dot merger's do)
    assert rel(outs[1], outs[0]) < 1e-5


def _dots_outside_the_scan(jaxpr) -> int:
    return sum(e.primitive.name == "dot_general" for e in _eqns(jaxpr, into_scans=False))


def test_the_prepared_loop_projects_text_and_time_once_each(params, packed_everywhere):
    """Before the scan, the prepared loop has one product for all K and V, one for all the
    time projections and the time MLP's two, where the unprepared one has one per K, V and
    resnet; the fused q/k/v weights are stacked there in both (not prepared: memory)."""
    n_cross = sum(1 for p in _paths(params) if p.endswith("attn2/to_k/kernel"))
    n_resnets = sum(1 for p in _paths(params) if p.endswith("time_emb_proj/kernel"))
    counts, stacks = {}, {}
    for prepared in (None, _prepare(params)):
        run, args = _loop(params, "ddim", True, True, prepared=prepared)
        jaxpr = jax.make_jaxpr(run)(*args).jaxpr
        counts[prepared is not None] = _dots_outside_the_scan(jaxpr)
        stacks[prepared is not None] = sum(
            1 for e in jaxpr.eqns if e.primitive.name in ("concatenate", "stack")
            and len(e.outvars[0].aval.shape) == 4 and e.outvars[0].aval.shape[1] == 3
        )  # fmt: skip
    assert counts == {False: 2 + n_resnets + 2 * n_cross, True: 4}
    assert stacks[True] == stacks[False] > 0


def _count_calls(monkeypatch, name: str, key: str) -> list:
    """Wraps `pipeline.<name>`; returns the list its calls' `key` arguments are appended to."""
    made = []
    real = getattr(pipeline, name)

    def counting(*args, **kwargs):
        made.append(kwargs[key])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, name, counting)
    return made


def test_pipeline_prepares_once_per_unet_tree_and_size(monkeypatch):
    """The pipeline makes the prepared conditioning on its first image and reuses it (the
    one-program path and another batch too); a new UNet tree or another size makes it again.
    Same latents as a pipeline that does not prepare."""
    made = _count_calls(monkeypatch, "prepare_unet", "sample_hw")
    kw = dict(steps=2, height=16, width=16, seed=5)
    pipe = random_pipeline()
    plain = random_pipeline(prepare_weights=False)
    first = pipe.generate("a red cube", **kw)
    again = pipe.generate("a red cube", **kw)
    whole = pipe.generate("a red cube", one_program=True, **kw)
    assert made == [(8, 8)]
    assert pipe.prepared_nbytes() > 0 and plain.prepared_nbytes() == 0
    ref = plain.generate("a red cube", **kw)
    np.testing.assert_array_equal(first.latents, again.latents)
    assert rel(first.latents, ref.latents) < 1e-5
    assert rel(whole.latents, first.latents) < 1e-5
    pipe.generate(["a red cube", "a blue ball"], **kw)  # another batch: the same
    assert made == [(8, 8)]
    pipe.generate("a red cube", **{**kw, "height": 24})
    assert made[-1] == (12, 8)
    pipe.params = {**pipe.params, "unet": jax.tree.map(lambda a: a, pipe.params["unet"])}
    pipe.generate("a red cube", **{**kw, "height": 24})
    assert len(made) == 3


def test_vae_phase_kernels_prepared_once(monkeypatch):
    """With an upsampler in a precomputed form, the decoder's phase kernels (and its
    attention's stacked q/k/v weights) are made once per (VAE tree, size) and passed to every
    decode (components, one program); the images are the pipeline's that builds them in
    each decode. Where every upsampler takes the reference form (`auto` on a CPU) only the
    attention's weights are prepared."""
    from sdjax import ops

    made = _count_calls(monkeypatch, "prepare_vae_decode", "latent_hw")
    subpixel = ops.Implementations(upsample_conv="subpixel")
    kw = dict(steps=1, height=16, width=16, seed=5)
    pipe = random_pipeline(kernels=subpixel)
    plain = random_pipeline(kernels=subpixel, prepare_weights=False)
    first = pipe.generate("a red cube", **kw)
    again = pipe.generate("a red cube", **kw)
    whole = pipe.generate("a red cube", one_program=True, **kw)
    latent_hw = (16 // pipe.config.vae.downscale,) * 2
    assert made == [latent_hw]
    vae_bytes = sum(a.nbytes for a in jax.tree.leaves(pipe._vae_inputs(latent_hw)["prepared"]))
    assert vae_bytes > 0 and pipe.prepared_nbytes() > vae_bytes and plain.prepared_nbytes() == 0
    ref = plain.generate("a red cube", **kw)
    np.testing.assert_array_equal(first.images, again.images)
    assert np.abs(first.images.astype(int) - ref.images.astype(int)).max() <= 1
    assert np.abs(whole.images.astype(int) - first.images.astype(int)).max() <= 1
    pipe.params = {**pipe.params, "vae": jax.tree.map(lambda a: a, pipe.params["vae"])}
    pipe.generate("a red cube", **kw)  # a new VAE tree: made again
    assert made == [latent_hw] * 2
    auto = random_pipeline(kernels="auto")  # on a CPU: the attention's weights, no phases
    assert list(auto._vae_inputs(latent_hw)["prepared"]["conditioning"]["decoder"]) == ["mid_block"]


@pytest.mark.gpu
def test_vae_phase_kernels_prepared_under_auto_on_gpu():
    """On a GPU `auto` runs the decoder's upsampler in the subpixel form from 16x16 inputs
    (`ops.subpixel_pays`): the tiny pipeline at 32x32 pixels prepares its phase kernels in
    `generate`, and its decode of given latents with them is the decode that builds them
    itself, within one level (fp16; the whole images differ more, as the UNet's prepared
    weights round differently)."""
    pipe = random_pipeline(kernels="auto", dtype="float16")
    pipe.generate("a red cube", steps=1, height=32, width=32, seed=5)
    assert pipe._vae_prepared is not None and pipe._vae_prepared[2] is not None
    fresh = random_pipeline(kernels="auto", dtype="float16")  # parameters as made (layouts)
    inputs = fresh._vae_inputs((16, 16))
    latents = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 4), jnp.float32)
    prepared = jax.jit(fresh._decode_fn(prepared=True))(inputs, latents)
    built = jax.jit(fresh._decode_fn())(fresh.params["vae"], latents)
    assert np.abs(np.asarray(prepared, int) - np.asarray(built, int)).max() <= 1
