"""The pipeline end to end: golden images against diffusers, determinism, and bad input.

Golden check (issue 3): a small random diffusers `StableDiffusionPipeline` saved with
`save_pretrained`, loaded by `StableDiffusion.from_checkpoint`, and both pipelines run from
the same initial latents (ours NHWC, diffusers' NCHW) in float32 with the reference kernels.
Tolerance: mean |ours - theirs| <= 1 in 0..255 pixel space (ours is rounded to uint8, theirs
is float, so rounding alone gives ~0.25), and the final latents within 1e-4 relative.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax.pipeline import StableDiffusion, device_noise, image_noise
from tests._pipeline_util import random_pipeline, save_diffusers_checkpoint

PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor of a lighthouse"]
STEPS = 4


def _mad(ours: np.ndarray, theirs_01: np.ndarray) -> float:
    """Mean absolute difference in 0..255 pixel space; theirs is diffusers' float [0, 1]."""
    return float(np.abs(ours.astype(np.float64) - theirs_01.astype(np.float64) * 255).mean())


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------------------------
# Golden images against diffusers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return save_diffusers_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-sd")


@pytest.fixture(scope="module")
def ours(checkpoint):
    return StableDiffusion.from_checkpoint(checkpoint, dtype="float32", kernels="reference")


@pytest.fixture(scope="module")
def theirs(checkpoint):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.mark.parametrize(
    "scheduler,guidance", [("ddim", 7.5), ("dpmpp_2m", 7.5), ("ddim", 1.0)], ids=str
)
def test_golden_against_diffusers(ours, theirs, scheduler, guidance):
    import diffusers
    import torch

    cls = getattr(diffusers, _DIFFUSERS_SCHEDULERS[scheduler])
    theirs.scheduler = cls.from_config(theirs.scheduler.config)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kwargs = dict(
        num_inference_steps=STEPS, guidance_scale=guidance, negative_prompt=["blurry"] * 2
    )
    with torch.no_grad():
        ref = theirs(PROMPTS, latents=_nchw(latents), output_type="np", **kwargs).images
        ref_latents = theirs(PROMPTS, latents=_nchw(latents), output_type="latent", **kwargs).images

    got = ours.generate(
        PROMPTS, "blurry", steps=STEPS, guidance=guidance, scheduler=scheduler, latents=latents
    )
    assert got.images.shape == ref.shape == (2, 16, 16, 3)
    assert got.images.dtype == np.uint8
    assert ref.std() * 255 > 10, "degenerate reference image: the comparison would be vacuous"
    assert _mad(got.images, ref) <= 1.0
    assert _rel(got.latents, ref_latents.numpy().transpose(0, 2, 3, 1)) <= 1e-4


def test_img2img_against_diffusers(checkpoint, ours, monkeypatch):
    """diffusers draws its two noises (VAE posterior sample, added noise) from torch; they are
    replaced by ours: the seed's "vae" stream and caller-given `latents`."""
    import diffusers
    import torch
    from diffusers.models.autoencoders import vae as diffusers_vae
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as i2i

    rng = np.random.default_rng(1)
    init = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    seed = 3
    vae_noise = image_noise(seed, range(2), (8, 8, 4), "vae")

    def fixed(array):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            assert tuple(shape) == array.shape[:1] + array.shape[3:] + array.shape[1:3]
            return _nchw(array).to(dtype)

        return randn_tensor

    monkeypatch.setattr(diffusers_vae, "randn_tensor", fixed(vae_noise))
    monkeypatch.setattr(i2i, "randn_tensor", fixed(noise))
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ref = pipe(
            PROMPTS,
            image=init.astype(np.float32) / 255,
            strength=0.75,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            output_type="np",
        ).images

    got = ours.generate(
        PROMPTS,
        steps=STEPS,
        scheduler="ddim",
        init_image=init,
        strength=0.75,
        latents=noise,
        seed=seed,
    )
    assert got.timings["denoise"]["steps"] == 3  # strength 0.75 of 4 steps
    assert "vae_encode" in got.timings
    assert _mad(got.images, ref) <= 1.0


# --------------------------------------------------------------------------------------------
# Determinism (no torch: a random `tiny` pipeline)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return random_pipeline()


def _gen(pipe, prompts=PROMPTS[:1], **kwargs):
    kwargs = {"steps": 3, "scheduler": "ddim", **kwargs}
    return pipe.generate(prompts, **kwargs)


def test_same_seed_same_image_other_seed_differs(tiny):
    a, b, c = _gen(tiny, seed=7), _gen(tiny, seed=7), _gen(tiny, seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.latents, b.latents)
    assert np.abs(a.images.astype(int) - c.images).mean() > 5
    assert a.images.shape == (1, 16, 16, 3) and a.images.dtype == np.uint8
    assert a.timings["denoise"]["compile_s"] > 0 and b.timings["denoise"]["compile_s"] == 0


def test_unsynced_components_make_the_same_image_and_time_it_end_to_end(tiny, monkeypatch):
    synced = _gen(tiny, seed=3)
    waits = []
    real_wait = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(1) or real_wait(x))
    unsynced = _gen(tiny, seed=3, sync_components=False)
    np.testing.assert_array_equal(unsynced.images, synced.images)
    np.testing.assert_array_equal(unsynced.latents, synced.latents)
    assert len(waits) == 1  # once, at the end
    components = {"text_encoder", "denoise", "vae_decode"}
    assert set(synced.timings) == set(unsynced.timings) == components | {"end_to_end"}
    assert all(synced.timings[c]["run_s"] > 0 for c in components)
    # the image's wall time covers the components and the host work between them
    waited = sum(synced.timings[c]["run_s"] for c in components)
    assert synced.timings["end_to_end"]["run_s"] >= waited
    # unsynced: compile times per component, one wall time for the whole image
    assert all("run_s" not in unsynced.timings[c] for c in components)
    assert unsynced.timings["denoise"]["steps"] == 3
    assert unsynced.timings["end_to_end"]["run_s"] > 0
    assert unsynced.timings["end_to_end"]["compile_s"] == 0  # compiled by the synced call
    # img2img's encode is a component too
    image = synced.images
    waits.clear()
    img2img = _gen(tiny, seed=3, init_image=image, sync_components=False)
    assert len(waits) == 1 and "vae_encode" in img2img.timings
    assert img2img.timings["end_to_end"]["run_s"] > 0


def test_one_program_makes_the_components_image(tiny):
    """generate(one_program=True): the text encoder, the loop and the decoder as one compiled
    program make the components' image (within one uint8 level and float rounding: XLA may
    fuse across their boundaries), with guidance and without, with an ancestral scheduler,
    and after img2img's encoder (its own program); one "image" timing for the three."""
    for kw in (dict(seed=3), dict(seed=3, guidance=1.0), dict(seed=4, scheduler="euler_a")):
        parts, whole = _gen(tiny, **kw), _gen(tiny, one_program=True, **kw)
        assert np.abs(parts.images.astype(int) - whole.images).max() <= 1
        assert _rel(whole.latents, parts.latents) < 1e-5
    assert set(whole.timings) == {"image", "end_to_end"}
    assert whole.timings["image"]["steps"] == 3 and whole.timings["image"]["run_s"] > 0
    again = _gen(tiny, one_program=True, seed=4, scheduler="euler_a")
    assert again.timings["image"]["compile_s"] == 0 == again.timings["end_to_end"]["compile_s"]
    np.testing.assert_array_equal(again.images, whole.images)
    a = _gen(tiny, seed=5, init_image=parts.images)
    b = _gen(tiny, seed=5, init_image=parts.images, one_program=True)
    assert np.abs(a.images.astype(int) - b.images).max() <= 1
    assert set(b.timings) == {"vae_encode", "image", "end_to_end"}


def test_one_program_reads_a_replaced_parameter_tree(tiny):
    """The whole image's program reads the components' trees as they are at each call: a UNet
    tree replaced in the params dict after it ran (a merged LoRA, say) changes its image as
    it changes the components' (and alternating the modes keeps both right)."""
    params = dict(tiny.params)
    before = _gen(tiny, seed=2, one_program=True)
    try:
        tiny.params["unet"] = jax.tree.map(lambda a: a * 1.05, params["unet"])
        whole = _gen(tiny, seed=2, one_program=True)
        parts = _gen(tiny, seed=2)
        assert np.abs(whole.images.astype(int) - before.images).mean() > 0.5
        assert np.abs(whole.images.astype(int) - parts.images).max() <= 1
        assert _rel(_gen(tiny, seed=2, one_program=True).latents, parts.latents) < 1e-5
    finally:
        tiny.params.update(params)
    restored = _gen(tiny, seed=2, one_program=True)
    np.testing.assert_array_equal(restored.images, before.images)


def test_parameter_signatures_are_walked_once_per_tree(tiny, monkeypatch):
    """The compiled-program lookup walks a parameter tree's ~700 arrays once, not per image;
    a new tree is walked again."""
    _gen(tiny, seed=1)
    walked = []
    real_flatten = jax.tree.flatten
    params = tiny.params

    def counting_flatten(tree, *a, **k):
        # a component's tree, or a dict that holds one (the UNet's with its prepared
        # conditioning, `_unet_inputs`)
        trees = [tree, *(tree.values() if isinstance(tree, dict) else ())]
        if any(t is params[c] for t in trees for c in params):
            walked.append(1)
        return real_flatten(tree, *a, **k)

    monkeypatch.setattr(jax.tree, "flatten", counting_flatten)
    first = _gen(tiny, seed=1)
    assert walked == []
    tiny.params = {**params, "unet": jax.tree.map(lambda a: a, params["unet"])}  # a new tree
    params = tiny.params
    second = _gen(tiny, seed=1)
    assert walked == [1]  # the new UNet tree, once
    np.testing.assert_array_equal(first.images, second.images)
    monkeypatch.undo()
    tiny.params = {**params}


def test_batch_of_prompts_matches_single_runs(tiny):
    """Image i depends on (seed, i) only; index_offset places a block in a longer list."""
    batch = _gen(tiny, PROMPTS, seed=5)
    first = _gen(tiny, PROMPTS[:1], seed=5)
    second = _gen(tiny, PROMPTS[1:], seed=5, index_offset=1)
    assert batch.images.shape == (2, 16, 16, 3)
    # Different batch sizes may round differently on the CPU: allow one uint8 level.
    assert np.abs(batch.images[:1].astype(int) - first.images).max() <= 1
    assert np.abs(batch.images[1:].astype(int) - second.images).max() <= 1
    assert np.abs(batch.images[0].astype(int) - batch.images[1]).mean() > 5


def test_caller_latents(tiny):
    seeded = _gen(tiny, seed=11)
    given = _gen(tiny, seed=0, latents=image_noise(11, [0], (8, 8, 4)))
    np.testing.assert_array_equal(seeded.images, given.images)
    other = _gen(tiny, latents=np.zeros((1, 8, 8, 4), np.float32))
    assert not np.array_equal(other.images, seeded.images)


@pytest.mark.parametrize("seed", [0, 11, -5, 2**31 - 1, 2**31 + 7])
def test_device_noise_is_image_noise(seed):
    """The one-program noise `generate` draws equals the eager per-image `image_noise`, bit
    for bit, for each stream, scaled and with the images' axis moved (a seed beyond int32
    takes the eager path)."""
    for stream in ("latents", "vae", "steps"):
        want = image_noise(seed, [0, 3, 3], (5, 4, 2), stream)
        got = device_noise(seed, [0, 3, 3], (5, 4, 2), stream)
        np.testing.assert_array_equal(np.asarray(got), want)
    scaled = device_noise(seed, [2, 1], (3, 4, 4), "steps", scale=14.6, batch_axis=1)
    want = np.moveaxis(image_noise(seed, [2, 1], (3, 4, 4), "steps") * np.float32(14.6), 0, 1)
    assert scaled.shape == (3, 2, 4, 4)
    np.testing.assert_array_equal(np.asarray(scaled), want)
    with pytest.raises(ValueError, match="noise stream"):
        device_noise(seed, [0], (2,), "nope")
    # written where it is asked for (the pipeline's batch sharding), the same values
    where = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("batch",)), P("batch"))
    placed = device_noise(seed, [0, 3], (5, 4, 2), sharding=where)
    assert placed.sharding == where
    np.testing.assert_array_equal(np.asarray(placed), image_noise(seed, [0, 3], (5, 4, 2)))


def test_guidance_at_most_one_turns_guidance_off(tiny):
    one = _gen(tiny, guidance=1.0, seed=2)
    half = _gen(tiny, guidance=0.5, negative_prompts="ignored without guidance", seed=2)
    guided = _gen(tiny, guidance=7.5, seed=2)
    np.testing.assert_array_equal(one.images, half.images)
    assert one.negative_truncations == ()
    assert not np.array_equal(one.images, guided.images)


def test_ancestral_scheduler_is_deterministic(tiny):
    a = _gen(tiny, scheduler="euler_a", seed=4)
    b = _gen(tiny, scheduler="euler_a", seed=4)
    c = _gen(tiny, scheduler="euler_a", seed=4, latents=image_noise(4, [0], (8, 8, 4)) * 0)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=15), r"height must be a positive multiple of 2; got 15"),
        (dict(width=0), r"width must be a positive multiple of 2; got 0"),
        (dict(steps=0), r"steps must be an integer >= 1; got 0"),
        (dict(guidance=-1.0), r"guidance scale must be a finite number >= 0; got -1.0"),
        (dict(scheduler="plms2"), r"unknown scheduler 'plms2'; choose one of \('ddim'"),
        (dict(prompts=[]), r"empty batch: give at least one prompt"),
        (dict(negative_prompts=["a", "b", "c"]), r"3 negative prompts for 1 prompts"),
        (dict(latents=np.zeros((1, 4, 4, 4))), r"latents must be \(1, 8, 8, 4\) \(NHWC\)"),
        (
            dict(init_image=np.zeros((16, 16, 3), np.uint8), strength=0.1),
            r"strength=0.1 with 3 steps leaves no denoising step",
        ),
        (dict(index_offset=-1), r"index_offset must be >= 0"),
        (dict(height=16.0), r"height must be a positive multiple of 2; got 16.0"),
        (
            dict(init_image=np.full((16, 16, 3), 0.5, np.float32)),
            r"init_image must be uint8 pixels in 0..255; got float32",
        ),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_input_raises(tiny, kwargs, message):
    kwargs = {"prompts": PROMPTS[:1], "steps": 3, "scheduler": "ddim", **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny.generate(kwargs.pop("prompts"), **kwargs)


def test_long_prompt_is_truncated_with_a_warning(tiny, caplog):
    long = "a photograph of an astronaut riding a horse on the moon " * 10  # ~110 tokens
    with caplog.at_level(logging.WARNING, logger="sdjax.tokenizer"):
        result = _gen(tiny, [PROMPTS[0], long])
    (cut,) = result.truncations
    assert cut.index == 1 and cut.num_dropped_tokens > 0 and cut.dropped
    assert any("longer than 77 tokens" in r.getMessage() for r in caplog.records)
    assert result.images.shape == (2, 16, 16, 3)


def test_missing_checkpoint_folder(tmp_path):
    from sdjax.weights import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        StableDiffusion.from_checkpoint(tmp_path / "no-such-model")


def test_tokenizer_outside_the_text_encoders_vocabulary_is_a_clear_error():
    """An id >= vocab_size would read NaN from the embedding: refuse it up front."""
    import dataclasses

    from sdjax import config as sd_config
    from sdjax.pipeline import StableDiffusion
    from sdjax.tokenizer import Tokenizer

    config = sd_config.preset("tiny")
    small = dataclasses.replace(
        config, text_encoder=dataclasses.replace(config.text_encoder, vocab_size=1000)
    )
    pipe = StableDiffusion.from_random(small, dtype="float32", kernels="reference")
    assert isinstance(pipe.tokenizer, Tokenizer)
    with pytest.raises(ValueError, match="vocab_size 1000"):
        pipe.generate("a cat", steps=1, height=16, width=16)


def test_changing_kernels_or_dtype_recompiles(tiny):
    """Programs are cached per implementation choice and dtype, never replayed across them."""
    import dataclasses

    _gen(tiny, steps=1)
    keys, original = set(tiny._compiled), tiny.kernels
    tiny.kernels = dataclasses.replace(
        original, group_norm="xla" if original.group_norm != "xla" else "reference"
    )
    result = _gen(tiny, steps=1)
    assert result.kernels["group_norm"] == tiny.kernels.group_norm
    new = set(tiny._compiled) - keys
    assert {k[0] for k in new} >= {"denoise", "decode"}
    assert all(k[1] == tiny.kernels for k in new)
    tiny.kernels = original


def test_compiler_options_reach_xla():
    """Per-pipeline XLA options: a real one compiles the same programs, a bad one is named."""
    kw = dict(steps=1, height=16, width=16, seed=1)
    base = random_pipeline().generate("a cat", **kw)
    pipe = random_pipeline(compiler_options={"xla_gpu_enable_triton_gemm": False})
    np.testing.assert_allclose(pipe.generate("a cat", **kw).latents, base.latents, rtol=1e-6)
    bad = random_pipeline(compiler_options={"xla_no_such_option": True})
    with pytest.raises(ValueError, match="bad compiler_options.*xla_no_such_option"):
        bad.generate("a cat", **kw)


def test_default_compiler_options(monkeypatch):
    """None: the pipeline's defaults for the backend (on a GPU only: XLA's Triton GEMMs off,
    the convolution thunks in the command buffers unless XLA_FLAGS chooses the command buffer
    types); {}: XLA's own defaults; given options are kept as given."""
    import jax
    import jax.numpy as jnp

    from sdjax import pipeline as pipeline_lib
    from sdjax.pipeline import GPU_COMMAND_BUFFER_TYPES, default_compiler_options

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert default_compiler_options("gpu") == {
        "xla_gpu_enable_triton_gemm": False,
        "xla_gpu_enable_command_buffer": GPU_COMMAND_BUFFER_TYPES,
    }
    assert "CONVOLUTION" in GPU_COMMAND_BUFFER_TYPES.split(",")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")  # the profiler's
    assert default_compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}
    monkeypatch.delenv("XLA_FLAGS")
    assert "xla_gpu_enable_command_buffer" in default_compiler_options("gpu")
    assert default_compiler_options("cpu") == {}
    # an XLA that does not know a type refuses the option: the probe says so, and the
    # defaults then leave XLA's own command buffer types alone
    assert pipeline_lib.knows_command_buffer_types()
    assert not pipeline_lib.knows_command_buffer_types("FUSION,NO_SUCH_COMMAND")
    monkeypatch.setattr(pipeline_lib, "knows_command_buffer_types", lambda *a: False)
    assert default_compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert random_pipeline().compiler_options == default_compiler_options()
    assert random_pipeline(compiler_options={}).compiler_options == {}
    given = {"xla_gpu_enable_triton_gemm": True}
    assert random_pipeline(compiler_options=given).compiler_options == given
    # the GPU defaults are fields of this jaxlib's DebugOptions (an unknown one fails to compile)
    x = jnp.ones(3)
    jax.jit(lambda a: a * 2).lower(x).compile(compiler_options=default_compiler_options("gpu"))


# --------------------------------------------------------------------------------------------
# Parameter layouts (auto_layouts)
# --------------------------------------------------------------------------------------------


def test_auto_layouts_give_the_same_images():
    """XLA's choice of parameter layouts moves bytes, not values; the parameters end up in
    the layouts the programs were compiled for."""
    kw = dict(steps=2, seed=3, scheduler="ddim")
    auto = random_pipeline()
    plain = random_pipeline(auto_layouts=False)
    a, b = auto.generate("a cat", **kw), plain.generate("a cat", **kw)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_allclose(a.latents, b.latents, rtol=1e-6, atol=1e-6)
    denoise = next(c for k, c in auto._compiled.items() if k[0] == "denoise")
    wanted = jax.tree.leaves(denoise.input_formats[0][0])
    # the loop's first argument: the UNet's parameters with their prepared conditioning
    inputs = auto._prepared[2]
    assert inputs["params"] is auto.params["unet"]
    have = jax.tree.leaves(inputs)
    assert len(wanted) == len(have) > len(jax.tree.leaves(auto.params["unet"]))
    assert all(
        f.layout is None or a.format.layout.major_to_minor == f.layout.major_to_minor
        for a, f in zip(have, wanted, strict=True)
    )


class _WantsColumnMajor:
    """A stand-in for a compiled program whose parameters are all column-major (what XLA
    may ask for on a GPU; on the CPU it keeps row-major, so the real programs cannot show
    the move)."""

    def __init__(self, params):
        def column_major(a):
            return Format(Layout(major_to_minor=tuple(reversed(range(a.ndim)))), a.sharding)

        self.input_formats = ((jax.tree.map(column_major, params),), {})

    def __call__(self, params, x):
        return jax.tree.map(lambda a: a.format.layout, params), x


def test_run_moves_parameters_into_the_compiled_layouts_once(monkeypatch):
    from sdjax import pipeline as pipeline_lib

    placed = []
    place = pipeline_lib.place_params
    monkeypatch.setattr(
        pipeline_lib, "place_params", lambda *a, **k: placed.append(1) or place(*a, **k)
    )
    pipe = random_pipeline()
    before = jax.tree.map(np.asarray, pipe.params["vae"])
    program = _WantsColumnMajor(pipe.params["vae"])
    layouts, _ = pipe._run(program, "vae", 1)
    wanted = jax.tree.map(lambda f: f.layout, program.input_formats[0][0])
    assert [x.major_to_minor for x in jax.tree.leaves(layouts)] == [
        x.major_to_minor for x in jax.tree.leaves(wanted)
    ]
    moved = jax.tree.leaves(pipe.params["vae"])
    assert all(a.format.layout.major_to_minor == tuple(reversed(range(a.ndim))) for a in moved)
    assert any(a.ndim > 1 for a in moved)  # so some did move off row-major
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pipe.params["vae"]),
                 before)  # fmt: skip
    pipe._run(program, "vae", 1)  # already there: the same arrays, not even checked again
    assert all(a is b for a, b in zip(moved, jax.tree.leaves(pipe.params["vae"]), strict=True))
    assert len(placed) == 1
    other = _WantsColumnMajor(pipe.params["vae"])  # another program: checked, nothing moves
    pipe._run(other, "vae", 1)
    assert len(placed) == 2
    assert all(a is b for a, b in zip(moved, jax.tree.leaves(pipe.params["vae"]), strict=True))
    # a new parameter tree (a merged LoRA, say) in row-major layouts: placed again
    pipe.params = {**pipe.params, "vae": jax.tree.map(lambda a: jnp.array(np.asarray(a)),
                                                      pipe.params["vae"])}  # fmt: skip
    layouts, _ = pipe._run(other, "vae", 1)
    assert len(placed) == 3
    assert [x.major_to_minor for x in jax.tree.leaves(layouts)] == [
        x.major_to_minor for x in jax.tree.leaves(wanted)
    ]
    plain = random_pipeline(auto_layouts=False)
    kept = jax.tree.leaves(plain.params["vae"])
    plain._run(program, "vae", 1)
    assert all(a is b for a, b in zip(kept, jax.tree.leaves(plain.params["vae"]), strict=True))


@pytest.mark.gpu
def test_auto_layouts_remove_the_conv_kernel_transposes():
    """On the GPU the denoising program reads the conv kernels as cuDNN wants them: no
    transpose of a parameter left in its HLO, and less temporary memory than with row-major
    parameters (which it would transpose on every call)."""
    kw = dict(steps=2, seed=3, scheduler="ddim", height=64, width=64)
    auto = random_pipeline("tiny", dtype="float16", kernels="auto")
    plain = random_pipeline("tiny", dtype="float16", kernels="auto", auto_layouts=False)
    a, b = auto.generate("a cat", **kw), plain.generate("a cat", **kw)
    assert np.abs(a.images.astype(int) - b.images).max() <= 1

    def program(pipe):
        return next(c for k, c in pipe._compiled.items() if k[0] == "denoise")

    def transposes(pipe):
        return program(pipe).as_text().count("transpose(")

    assert transposes(auto) < transposes(plain), (transposes(auto), transposes(plain))
    temp = {n: program(p).memory_analysis().temp_size_in_bytes
            for n, p in (("auto", auto), ("plain", plain))}  # fmt: skip
    assert temp["auto"] < temp["plain"], temp


@pytest.mark.gpu
def test_convolutions_in_command_buffers_change_no_result(monkeypatch):
    """On the GPU the pipeline's default options record the convolution thunks into XLA's
    command buffers (`GPU_COMMAND_BUFFER_TYPES`): its images and latents equal those of the
    same pipeline with XLA's own command buffer types (the same kernels, launched otherwise;
    the tolerance covers XLA's autotuning picking another algorithm in the second compile)."""
    from sdjax.pipeline import COMMAND_BUFFER_OPTION, GPU_COMMAND_BUFFER_TYPES

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    kw = dict(steps=2, seed=3, scheduler="ddim", height=64, width=64)
    ours = random_pipeline("tiny", dtype="float16", kernels="auto")
    assert ours.compiler_options[COMMAND_BUFFER_OPTION] == GPU_COMMAND_BUFFER_TYPES
    xla_types = {k: v for k, v in ours.compiler_options.items() if k != COMMAND_BUFFER_OPTION}
    theirs = random_pipeline("tiny", dtype="float16", kernels="auto", compiler_options=xla_types)
    a, b = ours.generate("a cat", **kw), theirs.generate("a cat", **kw)
    assert np.isfinite(a.latents).all()
    err = np.linalg.norm(a.latents - b.latents) / np.linalg.norm(b.latents)
    assert err <= 5e-3, err
    assert np.abs(a.images.astype(int) - b.images).max() <= 2


def test_guided_prompts_are_encoded_in_one_call(tiny):
    """With guidance the prompts and the negative prompts go through the text encoder as one
    batch (one program call, ids [2, N, 77]); without, the prompts alone."""
    _gen(tiny, PROMPTS, guidance=7.5)
    _gen(tiny, PROMPTS, guidance=1.0)
    shapes = {k[-1][-1][0] for k in tiny._compiled if k[0] == "encode_text"}
    assert shapes >= {(2, 2, 77), (2, 77)}, shapes


def test_place_params_in_place_frees_each_moved_array():
    """The moved arrays are replaced inside the caller's dicts and the old ones are
    released (deleted once nothing holds them), the values unchanged."""
    import gc
    import weakref

    from sdjax.pipeline import place_params

    rng = np.random.default_rng(0)
    params = {"a": {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)},
              "b": jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)}  # fmt: skip
    before = jax.tree.map(lambda a: np.array(a, copy=True), params)  # no view of the arrays
    old = weakref.ref(params["a"]["w"])
    program = _WantsColumnMajor(params)
    out = place_params(program, params)
    assert out is params
    gc.collect()
    assert old() is None  # nothing kept the row-major original alive
    layouts, _ = program(params, 0)
    assert [x.major_to_minor for x in jax.tree.leaves(layouts)] == [(1, 0), (1, 0)]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)
