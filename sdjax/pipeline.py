"""Text-to-image (and image-to-image) Stable Diffusion: prompts in, uint8 images out.

Three jitted programs, each compiled once per shape and reused:

  encode_text   token ids [N, 77]            -> context [N, 77, D]
  denoise       latents [N, h, w, 4], context -> latents, the whole loop in one `lax.scan`
  decode        latents [N, h, w, 4]          -> images uint8 [N, H, W, 3]

or, with `generate(one_program=True)`, the three as one program ("image": one launch, no
host work between them). `denoise_loop` is importable on its own for research code. The
implementations of the hot ops (`sdjax.ops`) are a static argument of each program, entered
inside the trace.

Parameter layouts: each program is compiled with its parameters' memory layouts left to XLA
(`jax.experimental.layout`, `Layout.AUTO`), and the parameters are moved into the layouts
it chose once, before its first call (`auto_layouts=False` keeps them row-major). On a GPU
XLA picks the filter layout cuDNN reads (OHWI, "KRSC") for every conv kernel, which we store
HWIO: with row-major parameters each program would transpose all its conv kernels on every
call, keeping the transposed copies in its temporary memory.

Batches are sharded over every local device along the batch axis (a 1-D `Mesh` named
"batch"); the parameters are placed once, replicated. A batch that does not divide by the
device count is padded and the padding dropped from the result. Each image's noise comes from
`fold_in(PRNGKey(seed), index)`, so an image depends on its seed and index only, not on the
batch size or the number of devices (see `image_noise`; `generate` draws it on the device with
`device_noise`, which gives the same values in one program).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax import ops, schedulers
from sdjax.config import PipelineConfig
from sdjax.models import clip
from sdjax.models import unet as unet_lib
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# The parameter trees of `StableDiffusion.params`, and the name `_run` gives all of them at once
# (the whole image's program of `generate(one_program=True)`).
COMPONENTS = ("text_encoder", "unet", "vae")
WHOLE = "all"

# The text encoder runs its layers on the prompt's tokens padded to a multiple of this (77 ->
# 80; exact, `sdjax.models.clip.CLIPTextTransformer`): XLA would otherwise pad the rows of
# each of its 48 matrix products (2 x 77 = 154) to a multiple of 8 for cuBLAS, a copy kernel
# before each one on GPU (experiments/results/README.md, ninth session).
TEXT_PAD_MULTIPLE = 16


# The compile options a pipeline uses unless told otherwise (experiments/results/README.md).
# On a GPU, XLA's own Triton GEMM fusions off, so that every dot outside our kernels goes to
# cuBLAS: -0.23 and -0.32 ms per SD1.5 UNet step in two H100 ablations (predictions 7 and 11).
# XLA's cuDNN LayerNorm rewrite (xla_gpu_enable_cudnn_layer_norm) is not among them: two H100
# ablations disagreed in sign (-0.15 and +0.12 ms per step, each favouring the later row) and
# the loop profile shows no gain in kernel time (prediction 18). Nothing on CPU.
DEFAULT_GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

# The thunk types XLA records into its command buffers (CUDA graphs) on a GPU: XLA's default
# types and the convolution thunks (CONVOLUTION, which XLA leaves out by default). Left out,
# every cuDNN convolution is launched from the host between two command buffers, and where
# the GPU work between two of them is shorter than that launch the GPU waits: with them in,
# the SD1.5 UNet step took 4.775 against 4.878 ms and the image 102.2 against 104.5 ms back
# to back (H100, interleaved, experiments/results/README.md, prediction 244). XLA_FLAGS that
# set xla_gpu_enable_command_buffer themselves (the profiler's, which turn command buffers off
# to see each kernel's HLO instruction) win: the option is then not given.
GPU_COMMAND_BUFFER_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONVOLUTION"
COMMAND_BUFFER_OPTION = "xla_gpu_enable_command_buffer"


@functools.cache
def knows_command_buffer_types(types: str = GPU_COMMAND_BUFFER_TYPES) -> bool:
    """Whether this jaxlib's XLA accepts `types` as xla_gpu_enable_command_buffer (an XLA
    that does not know one of them refuses the option): one tiny compile, once a process."""
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(
            compiler_options={COMMAND_BUFFER_OPTION: types}
        )
    except Exception as e:  # the option refused: XLA's own command buffer types stay
        logger.warning("XLA refuses %s=%s (%s): keeping its default command buffer types",
                       COMMAND_BUFFER_OPTION, types, (str(e).splitlines() or [""])[0][:200])  # fmt: skip
        return False
    return True


def default_compiler_options(backend: str | None = None) -> dict:
    """The XLA compile options of `StableDiffusion(compiler_options=None)` on `backend`
    (default: JAX's default backend): on a GPU, `DEFAULT_GPU_COMPILER_OPTIONS` and the
    command buffer types `GPU_COMMAND_BUFFER_TYPES` (unless XLA_FLAGS sets them, or this XLA
    does not know them: `knows_command_buffer_types`); none on CPU."""
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return {}
    options = dict(DEFAULT_GPU_COMPILER_OPTIONS)
    if COMMAND_BUFFER_OPTION not in os.environ.get("XLA_FLAGS", "") and (
        knows_command_buffer_types()
    ):
        options[COMMAND_BUFFER_OPTION] = GPU_COMMAND_BUFFER_TYPES
    return options


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


# --------------------------------------------------------------------------------------------
# The denoising loop: one scan over the steps, guidance as one batch of 2N.
# --------------------------------------------------------------------------------------------


def guided_context(context, uncond_context):
    """The UNet's text states for guidance: [2N, S, D], each sample's unconditional and
    conditional copies side by side ([u0, c0, u1, c1, ...]); `context` alone without it."""
    if uncond_context is None:
        return context
    n = context.shape[0]
    return jnp.stack([uncond_context, context], axis=1).reshape(2 * n, *context.shape[1:])


def guided_unet(
    unet_params, x, t, context, uncond_context, guidance_scale, *, unet_config, dtype,
    conditioning=None, guided=None, share_prefix: bool = True,
):  # fmt: skip
    """One guided model call: x [N, h, w, C] -> guided prediction [N, h, w, C] in float32.

    With `uncond_context` None there is no guidance (one batch of N). Otherwise the UNet runs
    once on 2N, each sample's unconditional and conditional copies side by side ([x0, x0, x1,
    x1, ...]) so that a batch sharded over devices stays local to each device.

    share_prefix: the two copies of a sample are the same up to the UNet's first
    cross-attention, so the UNet gets the N samples once and the 2N text states, and widens
    the batch there (`UNet2DConditionModel.__call__`, shared samples): SD's conv_in, first
    resnet and first self-attention run at N. False: the UNet gets the samples repeated, 2N
    (the same values up to the order of sums in kernels chosen per batch).

    `conditioning`: a precomputed `conditioning` tree (`unet.context_conditioning` of
    `guided_context(...)`, merged with this step's `time_conditioning`); the contexts are then
    not read, and `guided` says whether the batch is guided.
    """
    guided = (uncond_context is not None) if guided is None else guided

    def run(sample):
        if conditioning is not None:
            return unet_lib.conditioned_apply(unet_params, unet_config, sample, t, conditioning)
        ctx = guided_context(context, uncond_context)
        return UNet2DConditionModel(unet_config).apply({"params": unet_params}, sample, t, ctx)

    if not guided:
        return run(x.astype(dtype)).astype(jnp.float32)
    n = x.shape[0]
    sample = x.astype(dtype)
    out = run(sample if share_prefix else jnp.repeat(sample, 2, axis=0)).astype(jnp.float32)
    out = out.reshape(n, 2, *out.shape[1:])
    uncond, cond = out[:, 0], out[:, 1]
    return uncond + guidance_scale * (cond - uncond)


def denoise_loop(
    unet_params,
    latents,
    context,
    uncond_context,
    guidance_scale,
    step_noise=None,
    *,
    unet_config,
    scheduler: schedulers.Scheduler,
    start_index: int = 0,
    dtype=jnp.float32,
    kernels: ops.Implementations = ops.PRESETS["reference"],
    sharding: NamedSharding | None = None,
    progress=None,
    hoist_conditioning: bool = True,
    pack_time_rows: bool = True,
    prepared: dict | None = None,
    share_guidance_prefix: bool = True,
):
    """Runs the scheduler's steps from `start_index` to the end, as one `lax.scan`.

    Args:
      latents: float32 [N, h, w, C], already scaled by `scheduler.init_noise_sigma` (or noised
        by `scheduler.add_noise` for img2img).
      context, uncond_context: [N, 77, D]; `uncond_context` None turns guidance off.
      guidance_scale: a scalar (traced: changing it does not recompile).
      step_noise: [S, N, h, w, C] fresh noise per step, only for schedulers that need it.
      sharding: where the latents live; the loop keeps them there.
      progress: a host callable(step) called after each step (None: no host callbacks).
      hoist_conditioning: compute what depends only on the prompt (each cross-attention's
        K and V) or on the timestep (each resnet's time projection) before the loop, for
        every step at once (`UNet2DConditionModel.context_conditioning`/`time_conditioning`).
        The same math; False computes them inside every step (as the UNet alone does).
      pack_time_rows: with hoist_conditioning, scan the resnets' time projections as one
        [T, sum C] array (`pack_rows`), not one [T, C] array per resnet: the same values, in
        fewer kernels a step.
      prepared: with hoist_conditioning, what the conditioning takes from the weights alone
        and XLA would otherwise copy per call (`prepare_unet` for these weights, dtype, op
        choices and latent size): made once per pipeline, it leaves this program one product
        for all K and V and one for all time projections. The same values (up to the order of
        sums in the stacked products); for another size they stay right, only slower.
      share_guidance_prefix: with guidance, run the UNet's part before its first
        cross-attention once per sample rather than once per copy (`guided_unet`'s
        `share_prefix`).
    Returns:
      float32 latents [N, h, w, C].
    """
    n_steps = len(scheduler.timesteps) - start_index
    if n_steps < 1:
        raise ValueError(f"{start_index=} leaves no step of {len(scheduler.timesteps)}")
    if scheduler.needs_noise and step_noise is None:
        raise ValueError(
            f"scheduler {scheduler.name!r} needs step_noise [{n_steps}, *latents.shape]"
        )

    guided = uncond_context is not None

    def constrain(x):
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    def body(carry, xs):
        x, state = carry
        i, noise, step_row = xs
        conditioning = None
        if hoist_conditioning:  # this step's time projections, keeping a batch axis of 1
            step_conditioning = unpack_time(step_row) if pack_time_rows else step_row
            step_conditioning = jax.tree.map(lambda a: a[None], step_conditioning)
            conditioning = unet_lib.merge_conditioning(context_conditioning, step_conditioning)
        model_in = scheduler.scale_model_input(x, i)
        pred = guided_unet(
            unet_params,
            model_in,
            scheduler.timestep(i),
            context,
            uncond_context,
            guidance_scale,
            unet_config=unet_config,
            dtype=dtype,
            conditioning=conditioning,
            guided=guided,
            share_prefix=share_guidance_prefix,
        )
        x, state = scheduler.step(state, i, pred, x, noise=noise)
        if progress is not None:
            jax.debug.callback(progress, i)
        return (constrain(x), state), None

    # Cast once here (a no-op for params already in `dtype`), not in every step of the scan.
    unet_params = jax.tree.map(functools.partial(_cast_floats, dtype=dtype), unet_params)
    with ops.use(kernels):
        x = constrain(latents.astype(jnp.float32))
        state = scheduler.init_state(x)
        idx = jnp.arange(start_index, len(scheduler.timesteps), dtype=jnp.int32)
        time_rows = None
        if hoist_conditioning:
            # Once per prompt and once per schedule, not once per step: the cross-attention
            # K/V of the text states and every resnet's time projection for every timestep.
            unet = UNet2DConditionModel(unet_config)
            variables = {"params": unet_params}
            ctx = guided_context(context, uncond_context)
            context_conditioning = unet.apply(
                variables,
                ctx,
                dtype,
                latents.shape[1:3],
                prepared,
                method=UNet2DConditionModel.context_conditioning,
            )
            timesteps = scheduler.timestep(idx)
            if prepared is not None and pack_time_rows:
                # the packed rows straight from one product with the stacked weights
                time_rows = unet.apply(variables, timesteps, dtype, prepared,
                                       method=UNet2DConditionModel.time_rows)  # fmt: skip
                layout = unet.apply(variables, method=UNet2DConditionModel.time_weights)
                unpack_time = functools.partial(unet_lib.split_projections, tree=layout)
            else:
                time_rows = unet.apply(variables, timesteps, dtype, prepared,
                                       method=UNet2DConditionModel.time_conditioning)  # fmt: skip
                if pack_time_rows:
                    time_rows, unpack_time = pack_rows(time_rows)
        (x, _), _ = jax.lax.scan(body, (x, state), (idx, step_noise, time_rows))
    return x


def prepare_unet(unet_params, *, unet_config, sample_hw, dtype, kernels) -> dict:
    """`UNet2DConditionModel.prepare` in one jitted call, under `kernels`: the weights' part of
    the conditioning for `denoise_loop(prepared=)` with sample_hw (h, w) latents. Made once
    per pipeline (`StableDiffusion` caches it)."""
    return _prepare_program(unet_params, model=UNet2DConditionModel, config=unet_config,
                            method="prepare", size=tuple(sample_hw), dtype=resolve_dtype(dtype),
                            kernels=kernels)  # fmt: skip


def prepare_vae_decode(vae_params, *, vae_config, latent_hw, dtype, kernels) -> dict:
    """`AutoencoderKL.prepare_decode` in one jitted call, under `kernels`: the variables (the
    upsamplers' phase kernels, the mid-block attention's stacked q/k/v weights) that
    `vae.decode` would otherwise build from the weights in every decode, for latents of
    latent_hw; {} where there are none. Made once per pipeline (`StableDiffusion` caches
    it)."""
    return _prepare_program(vae_params, model=AutoencoderKL, config=vae_config,
                            method="prepare_decode", size=tuple(latent_hw),
                            dtype=resolve_dtype(dtype), kernels=kernels)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("model", "config", "method", "size", "dtype",
                                             "kernels"))  # fmt: skip
def _prepare_program(params, *, model, config, method, size, dtype, kernels):
    """model(config)'s `method`(dtype, size) on params cast to dtype, under `kernels`."""
    params = jax.tree.map(functools.partial(_cast_floats, dtype=dtype), params)
    with ops.use(kernels):
        return model(config).apply({"params": params}, dtype, size, method=method)


def pack_rows(tree) -> tuple[jax.Array, Callable]:
    """A tree of [T, ...] leaves (one dtype) as one [T, K] array, and the function that turns
    one row [K] back into the tree of [...] leaves (static slices).

    The denoising scan slices one row per step instead of one per leaf: XLA then computes every
    resnet's bias + time projection of a step from that row in a few multi-output fusions (one
    per vector length: 3 kernels for SD1.5's 14 cuDNN-conv resnets) rather than one kernel per
    resnet (results README, sixteenth session)."""
    leaves, treedef = jax.tree.flatten(tree)
    if len({a.dtype for a in leaves}) > 1:
        raise ValueError(f"pack_rows wants one dtype; got {sorted({str(a.dtype) for a in leaves})}")
    shapes = [a.shape[1:] for a in leaves]
    packed = jnp.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=1)

    def unpack(row):
        parts = unet_lib.split_columns(row, [math.prod(s) for s in shapes])
        return jax.tree.unflatten(
            treedef, [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
        )

    return packed, unpack


# --------------------------------------------------------------------------------------------
# Per-image noise
# --------------------------------------------------------------------------------------------

# Independent noise streams of one image, all derived from key_i = fold_in(PRNGKey(seed), i).
NOISE_STREAMS = {"latents": None, "vae": 1, "steps": 2}


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int], stream: str = "latents"):
    """float32 [len(indices), *shape]: image i's N(0, 1) noise of one stream.

    "latents": the initial latents (text-to-image) or the noise img2img adds to the encoded
    image; "vae": the VAE encoder's posterior sample (img2img); "steps": the per-step noise of
    ancestral schedulers, [steps, h, w, C] per image. Depends only on (seed, i, stream, shape).
    """
    if stream not in NOISE_STREAMS:
        raise ValueError(f"unknown noise stream {stream!r}; choose from {sorted(NOISE_STREAMS)}")
    out = []
    for i in indices:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        if NOISE_STREAMS[stream] is not None:
            key = jax.random.fold_in(key, NOISE_STREAMS[stream])
        out.append(np.asarray(jax.random.normal(key, tuple(shape), jnp.float32)))
    return np.stack(out)


# Seeds that `device_noise` passes to its program as int32: PRNGKey(seed) of such a seed is
# bit-identical whether the seed is a Python int or a traced int32 (tests compare them).
_INT32 = (-(2**31), 2**31 - 1)


def device_noise(
    seed: int, indices: Sequence[int], shape: Sequence[int], stream: str = "latents", *,
    scale: float = 1.0, batch_axis: int = 0, sharding: jax.sharding.Sharding | None = None,
):  # fmt: skip
    """`image_noise(...) * scale` drawn by one compiled program, left on the device.

    Bit-identical to `image_noise` (the same threefry keys and normal transform, batched),
    without its per-image dispatches and its copy to the host, which a 512x512 image's wall
    time paid (about 3 ms on the H100's host, `experiments/results/README.md`, item 85).
    batch_axis: where the images' axis goes (1 puts the "steps" stream's [N, S, ...] as
    [S, N, ...]). sharding: where the result goes (the program writes it there; a later
    `device_put` would copy it). A seed outside int32 takes `image_noise`'s eager path (the
    same values).
    """
    if stream not in NOISE_STREAMS:
        raise ValueError(f"unknown noise stream {stream!r}; choose from {sorted(NOISE_STREAMS)}")
    if not _INT32[0] <= int(seed) <= _INT32[1]:
        noise = np.moveaxis(image_noise(seed, indices, shape, stream) * np.float32(scale), 0,
                            batch_axis)  # fmt: skip
        return jax.device_put(noise, sharding) if sharding is not None else jnp.asarray(noise)
    program = _noise_program(sharding)
    return program(np.int32(seed), np.asarray(list(indices), np.int32), np.float32(scale),
                   shape=tuple(int(d) for d in shape), stream=stream,
                   batch_axis=batch_axis)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _noise_program(sharding):
    """`_noise` jitted to write its result with `sharding` (None: the default device)."""
    return jax.jit(_noise, static_argnames=("shape", "stream", "batch_axis"),
                   out_shardings=sharding)  # fmt: skip


def _noise(seed, indices, scale, *, shape, stream, batch_axis):
    def one(i):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        if NOISE_STREAMS[stream] is not None:
            key = jax.random.fold_in(key, NOISE_STREAMS[stream])
        return jax.random.normal(key, shape, jnp.float32)

    # The barrier keeps the scaling out of the normal transform's fusion: fused, XLA may round
    # its last products differently (1 ulp), and the values must be image_noise's * scale.
    noise = jax.lax.optimization_barrier(jax.vmap(one)(indices))
    return jnp.moveaxis(noise * scale, 0, batch_axis)


# --------------------------------------------------------------------------------------------
# The pipeline object
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """What `StableDiffusion.generate` returns."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    latents: np.ndarray  # float32 [N, h, w, C], the final (unscaled by the VAE factor) latents
    timings: dict  # per component: compile_s and run_s
    truncations: tuple  # tokenizer.Truncation for each prompt cut at 77 tokens
    negative_truncations: tuple  # the same for the negative prompts
    scheduler: str
    kernels: dict


class StableDiffusion:
    """A loaded pipeline: configs, params placed on the devices, tokenizer and op choices.

    Build it with `from_checkpoint` or `from_random`, then call `generate`.
    """

    def __init__(
        self,
        config: PipelineConfig,
        params: dict,
        tokenizer: Tokenizer,
        *,
        dtype="float32",
        kernels: ops.Implementations | str = "auto",
        devices: Sequence[jax.Device] | None = None,
        random_weights: bool = False,
        hoist_conditioning: bool = True,
        pack_time_rows: bool = True,
        prepare_weights: bool = True,
        compiler_options: dict | None = None,
        auto_layouts: bool = True,
        share_guidance_prefix: bool = True,
    ):
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.kernels = ops.Implementations.preset(kernels) if isinstance(kernels, str) else kernels
        self.tokenizer = tokenizer
        self.random_weights = random_weights
        # denoise_loop's `hoist_conditioning`: prompt- and timestep-only work outside the loop
        self.hoist_conditioning = hoist_conditioning
        self.pack_time_rows = pack_time_rows  # denoise_loop's `pack_time_rows`
        self.share_guidance_prefix = share_guidance_prefix  # denoise_loop's
        # weight-only work that XLA redoes per call otherwise, made once and kept on the
        # devices, not once per image: with hoist_conditioning the UNet conditioning's
        # (`prepare_unet`, 0.145 GiB for SD1.5 in fp16), and the VAE decoder's
        # (`prepare_vae_decode`, 19.6 MB at 512x512)
        self.prepare_weights = prepare_weights
        # XLA options for every program this pipeline compiles (DebugOptions fields by name,
        # e.g. {"xla_gpu_enable_triton_gemm": False}): per pipeline, unlike XLA_FLAGS. None:
        # `default_compiler_options()`; {}: XLA's own defaults.
        self.compiler_options = (
            default_compiler_options() if compiler_options is None else dict(compiler_options)
        )
        # parameters in the layouts each program asks for (see the module doc)
        self.auto_layouts = auto_layouts
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("batch"))
        cast = functools.partial(_cast_floats, dtype=self.dtype)
        self.params = jax.device_put(jax.tree.map(cast, params), self.replicated)
        self._compiled: dict = {}
        self._signatures: dict = {}  # program name -> (its last parameter tree, `_signature`)
        # component -> (the program, the parameter tree) last laid out for it (references, not
        # ids: a replaced tree's id may be reused; the next placement drops the old tree)
        self._placed_for: dict = {}
        self._whole: dict | None = None  # `_whole_params`' dict of the component trees
        # `_unet_inputs`' latest (UNet tree, key, {"params", "prepared"}): one kept at a time
        self._prepared: tuple | None = None
        # `_vae_inputs`' latest (VAE tree, key, {"params", "prepared"} or None): the same
        self._vae_prepared: tuple | None = None

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint,
        *,
        dtype="float16",
        variant=None,
        config=None,
        prediction_type=None,
        **kwargs,
    ) -> StableDiffusion:
        """Any checkpoint format sdjax reads.

        `checkpoint` is a diffusers-layout folder or Hub repo id (`sdjax.weights`), an sdjax
        fast-format folder (`sdjax.fast_format`), or one ldm-layout `.safetensors` / `.ckpt`
        file whose config is inferred from its tensor shapes (`sdjax.single_file`; such a
        file cannot tell epsilon from v-prediction, nor non-standard group or head counts:
        pass `prediction_type`, or the whole `config`: a preset name or a PipelineConfig).
        """
        from sdjax import fast_format, single_file, weights

        jdtype = resolve_dtype(dtype)
        path = pathlib.Path(checkpoint).expanduser()
        if path.is_file():
            config, params = single_file.load_single_file(
                path, dtype=jdtype, config=config, prediction_type=prediction_type
            )
            tokenizer = single_file.tokenizer_for(config)
        elif fast_format.is_fast_format(path):
            config, params = fast_format.load(path, dtype=jdtype)
            if (path / "tokenizer").is_dir():
                tokenizer = Tokenizer.from_folder(path / "tokenizer")
            else:  # saved without one: the embedded tokenizer, padded as the family expects
                tokenizer = single_file.tokenizer_for(config)
        else:
            folder = weights.resolve_checkpoint(checkpoint, variant=variant)
            config, params = weights.load_pipeline(checkpoint, dtype=jdtype, variant=variant)
            tokenizer = Tokenizer.from_folder(folder / "tokenizer")
        return cls(config, params, tokenizer, dtype=dtype, **kwargs)

    @classmethod
    def from_random(
        cls, config: PipelineConfig, *, seed: int = 0, dtype="float16", **kwargs
    ) -> StableDiffusion:
        """Deterministic random weights of `config`'s architecture: images are noise."""
        from sdjax import single_file, weights

        params = weights.random_params(config, seed, dtype=resolve_dtype(dtype))
        tokenizer = single_file.tokenizer_for(config)  # SD 2 pads with "!", SD 1 with EOS
        return cls(config, params, tokenizer, dtype=dtype, random_weights=True, **kwargs)

    # ---- compiled components ---------------------------------------------------------------

    def _compile(self, name: str, fn, *args, statics: tuple = ()):
        """Compiles fn(*args) once per (name, shapes, statics); returns (compiled, compile_s).

        args[0] is a component's parameters: with `auto_layouts` their layouts are XLA's
        choice (call the program through `_run`, which puts them there)."""
        leaves, treedef = jax.tree.flatten(args[1:])
        # The programs capture self.kernels and self.dtype: they belong in the key.
        options = tuple(sorted(self.compiler_options.items()))
        key = (name, self.kernels, str(self.dtype), statics, treedef, options, self.auto_layouts)
        key += (self._signature(name, args[0]), tuple((a.shape, str(a.dtype)) for a in leaves))
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        lowered = lower_auto_layouts(fn, *args) if self.auto_layouts else jax.jit(fn).lower(*args)
        try:
            compiled = lowered.compile(compiler_options=self.compiler_options or None)
        except Exception as e:  # XLA names a bad option deep in its stack: say which one
            if self.compiler_options and "compile option" in str(e):
                raise ValueError(f"bad compiler_options {self.compiler_options}: {e}") from e
            raise
        self._compiled[key] = compiled
        return compiled, time.perf_counter() - t0

    def _signature(self, name: str, params) -> tuple:
        """(tree structure, shapes and dtypes) of the parameter tree that program `name` was
        last given, computed once per tree object: ~700 UNet arrays take milliseconds of
        host time per image to walk (3.2 ms on a 2-core CPU), which the image's wall time
        would pay each call. A new tree (`pipe.params[...] = ...`) is walked again; arrays
        replaced in place must keep their shapes and dtypes (as `_run`'s layout moves do)."""
        cached = self._signatures.get(name)
        if cached is not None and cached[0] is params:
            return cached[1]
        leaves, treedef = jax.tree.flatten(params)
        signature = (treedef, tuple((a.shape, str(a.dtype)) for a in leaves))
        self._signatures[name] = (params, signature)  # holds the latest tree only
        return signature

    def _run(self, compiled, component: str, *args, params=None):
        """compiled(self.params[component], *args), first moving the parameters into the
        layouts `compiled` was built for, where they are not yet (once per component, unless
        two programs want different layouts). The moved parameters replace the old ones.
        `params`: the first argument where it is not the component's tree alone (the UNet's
        with its prepared conditioning, `_unet_inputs`; the whole image's, `_whole_params`)."""
        # Checking ~700 arrays' layouts costs milliseconds of host time: only when the
        # program, or the parameter tree (`pipe.params[c] = merged`, e.g. a LoRA merged in),
        # differs from the pair last placed.
        if params is None:
            params = self._whole_params() if component == WHOLE else self.params[component]
        last = self._placed_for.get(component)
        if self.auto_layouts and (last is None or last[0] is not compiled or last[1] is not params):
            place_params(compiled, params)
            # The whole image's program and the components' share the arrays: a placement for
            # one may have moved arrays the other's record still vouches for.
            for other in list(self._placed_for):
                if (other == WHOLE) != (component == WHOLE):
                    del self._placed_for[other]
            self._placed_for[component] = (compiled, params)
        return compiled(params, *args)

    def _whole_params(
        self, prepared: dict | None = None, vae_prepared: dict | None = None
    ) -> dict:
        """{component: self.params[component]} for the whole image's program (and
        "unet_prepared": `prepared`, "vae_prepared": `vae_prepared`, where given): the same
        dict object while every part is the same object (so that `_signature` and `_run` skip
        their walks), a new one once any is replaced (a merged LoRA)."""
        parts = {c: self.params[c] for c in COMPONENTS}
        if prepared is not None:
            parts["unet_prepared"] = prepared
        if vae_prepared is not None:
            parts["vae_prepared"] = vae_prepared
        cached = self._whole
        if (
            cached is None
            or cached.keys() != parts.keys()
            or any(cached[c] is not parts[c] for c in parts)
        ):
            self._whole = cached = parts
        return cached

    def _unet_inputs(self, latent_hw) -> dict | None:
        """{"params": self.params["unet"], "prepared": its `prepare_unet`} for a loop of
        latent_hw latents; None where the pipeline does not prepare (`prepare_weights` or
        `hoist_conditioning` off). Made on the first call for a (UNet tree, size) and kept,
        one at a time: a replaced UNet tree (a merged LoRA) is prepared again."""
        if not (self.prepare_weights and self.hoist_conditioning):
            return None
        return self._kept_inputs("_prepared", "unet", latent_hw, lambda params, hw: prepare_unet(
            params, unet_config=self.config.unet, sample_hw=hw, dtype=self.dtype,
            kernels=self.kernels))  # fmt: skip

    def _kept_inputs(self, slot: str, component: str, latent_hw, prepare) -> dict | None:
        """{"params": self.params[component], "prepared": prepare(params, latent_hw)} (None
        where that is empty), kept in attribute `slot` as (tree, key, inputs) and made again
        only for another tree (a merged LoRA), size, dtype or op choice."""
        params = self.params[component]
        key = (tuple(int(d) for d in latent_hw), self.kernels, str(self.dtype))
        cached = getattr(self, slot)
        if cached is None or cached[0] is not params or cached[1] != key:
            # the old arrays go before the new ones are made (the whole image's dict too)
            setattr(self, slot, None)
            self._whole = None
            prepared = prepare(params, key[0])
            inputs = None
            if prepared:
                inputs = {"params": params, "prepared": jax.device_put(prepared, self.replicated)}
            cached = (params, key, inputs)
            setattr(self, slot, cached)
        return cached[2]

    def _vae_inputs(self, latent_hw) -> dict | None:
        """{"params": self.params["vae"], "prepared": its `prepare_vae_decode`} for decoding
        latent_hw latents; None where the pipeline does not prepare (`prepare_weights` off)
        or there is nothing to prepare (no mid-block attention, every upsampler in the
        reference form). Made on the first call for a (VAE tree, size) and kept, one at a
        time."""
        if not self.prepare_weights:
            return None
        return self._kept_inputs("_vae_prepared", "vae", latent_hw, lambda params, hw: (
            prepare_vae_decode(params, vae_config=self.config.vae, latent_hw=hw,
                               dtype=self.dtype, kernels=self.kernels)))  # fmt: skip

    def prepared_nbytes(self) -> int:
        """Device bytes of the prepared weights kept now (`_unet_inputs`, `_vae_inputs`)."""
        kept = [c[2]["prepared"] for c in (self._prepared, self._vae_prepared) if c and c[2]]
        return sum(a.nbytes for a in jax.tree.leaves(kept))

    def _encode_fn(self):
        cfg, dtype, kernels = self.config.text_encoder, self.dtype, self.kernels

        def encode_text(params, ids):
            """ids [N, 77] -> [N, 77, D]; or [2, N, 77] (prompts, negative prompts) -> the two
            [N, 77, D] from one batch of 2N."""
            encode = functools.partial(
                clip.encode, config=cfg, dtype=dtype, pad_multiple=TEXT_PAD_MULTIPLE
            )
            with ops.use(kernels):
                if ids.ndim == 2:
                    return encode(params, ids)
                out = encode(params, ids.reshape(-1, ids.shape[-1]))
                out = out.reshape(*ids.shape, -1)
                return out[0], out[1]

        return encode_text

    def _decode_fn(self, prepared: bool = False):
        """decode(params, latents) -> uint8 images; with `prepared`, decode(inputs, latents)
        where inputs is `_vae_inputs`' {"params", "prepared"}."""
        vae_cfg, dtype, kernels = self.config.vae, self.dtype, self.kernels

        def decode_with(params, latents, variables):
            with ops.use(kernels):
                z = (latents / vae_cfg.scaling_factor).astype(dtype)
                image = AutoencoderKL(vae_cfg).apply(
                    {"params": params, **(variables or {})}, z, method="decode"
                )
            image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
            return jnp.round(image * 255).astype(jnp.uint8)

        # named "decode" either way: its XLA module (jit_decode) is how traces tell it apart
        if prepared:

            def decode(inputs, latents):
                return decode_with(inputs["params"], latents, inputs["prepared"])

        else:

            def decode(params, latents, variables=None):
                return decode_with(params, latents, variables)

        return decode

    def _image_fn(self, loop, use_guidance: bool):
        """The whole image as one program: params {component: tree}, ids, the initial latents,
        guidance, step noise -> (uint8 images, float32 latents). `loop`: `denoise_loop` with
        its statics bound."""
        encode, decode = self._encode_fn(), self._decode_fn()

        def image(params, ids, latents, guidance, step_noise):
            context = encode(params["text_encoder"], ids)
            context, uncond = context if use_guidance else (context, None)
            x = loop(params["unet"], latents, context, uncond, guidance, step_noise,
                     prepared=params.get("unet_prepared"))  # fmt: skip
            return decode(params["vae"], x, params.get("vae_prepared")), x

        return image

    def _encode_image_fn(self):
        vae_cfg, dtype, kernels = self.config.vae, self.dtype, self.kernels

        def encode_image(params, images, noise):
            with ops.use(kernels):
                x = (images.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)
                mean, logvar = AutoencoderKL(vae_cfg).apply({"params": params}, x, method="encode")
            mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
            return (mean + jnp.exp(0.5 * logvar) * noise) * vae_cfg.scaling_factor

        return encode_image

    # ---- generation ------------------------------------------------------------------------

    def make_scheduler(self, name: str | None, steps: int) -> schedulers.Scheduler:
        """`name` None: the checkpoint's own scheduler class."""
        return schedulers.make(name, self.config.scheduler, steps)

    def generate(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None = None,
        *,
        steps: int = 20,
        guidance: float = 7.5,
        scheduler: str | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        latents=None,
        init_image=None,
        strength: float = 0.8,
        index_offset: int = 0,
        progress=None,
        sync_components: bool = True,
        one_program: bool = False,
    ) -> Result:
        """Generates one image per prompt.

        Args:
          prompts: a prompt or a list (the batch). negative_prompts: one, one per prompt, or
            None (the empty prompt).
          steps: denoising steps (>= 1). guidance: classifier-free guidance scale (>= 0;
            <= 1 turns guidance off, as in diffusers). scheduler: a name from
            `sdjax.schedulers.NAMES`, or None for the checkpoint's own.
          height, width: pixels, multiples of the VAE factor (8 for SD); default the model's.
          latents: optional float [N, h, w, C] noise (NHWC) instead of the seed's: the initial
            latents, or for img2img the noise added to the encoded image (as diffusers' `noise`).
          init_image: optional uint8 [N, H, W, 3] (or [H, W, 3]) for img2img, with `strength`
            in (0, 1].
          index_offset: the global index of prompts[0]. Image i's noise is
            `image_noise(seed, [index_offset + i], ...)`, so one host generating a block of a
            longer list (`sdjax.distributed.process_block`) makes the same images as one host
            generating all of it.
          progress: optional host callable(step_index) after each step.
          sync_components: wait for each component (text encoder, VAE encode, denoising,
            VAE decode) before starting the next, so that `timings[c]["run_s"]` is that
            component's wall time. False dispatches them back to back and waits once at the
            end: the host's launch work for one component may then overlap the GPU's work on
            the one before, and `timings` gives only compile times per component.
          one_program: the text encoder, the denoising loop and the VAE decoder as one
            compiled program (img2img's VAE encoder stays its own): one launch and no host
            work between them, so the image's wall time is the GPU's, give or take one
            dispatch. The same computation as the components (XLA may fuse across their
            boundaries: the images agree within rounding); `timings` then has one entry,
            "image", for the three, instead of one per component.
            In every mode `timings["end_to_end"]["run_s"]` is the image's wall time: from
            tokenizing the prompts to the decoded images on the device, host work between the
            components included (drawing the noise, looking up the compiled programs), less
            any compile time in between (meaningful once compiled).
        """
        cfg = self.config
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = len(prompts)
        negative_prompts = _negatives(negative_prompts, n)
        _check_request(n=n, steps=steps, guidance=guidance, index_offset=index_offset)
        f = cfg.vae.downscale
        if init_image is not None:
            init_image = np.asarray(init_image)
            if init_image.dtype != np.uint8:
                # A float image could be in [0, 1] or [-1, 1]: refuse to guess.
                raise ValueError(
                    f"init_image must be uint8 pixels in 0..255; got {init_image.dtype}"
                )
            if init_image.ndim == 3:
                init_image = np.broadcast_to(init_image, (n, *init_image.shape))
            if init_image.ndim != 4 or init_image.shape[0] != n or init_image.shape[-1] != 3:
                raise ValueError(f"init_image must be [N={n}, H, W, 3]; got {init_image.shape}")
            image_hw = init_image.shape[1:3]
            if height not in (None, image_hw[0]) or width not in (None, image_hw[1]):
                raise ValueError(f"init_image is {image_hw}; got {height=} and {width=}")
            height, width = image_hw
        height = cfg.default_resolution if height is None else height
        width = cfg.default_resolution if width is None else width
        steps = int(steps) if isinstance(steps, np.integer) else steps
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int | np.integer) or value < f or value % f:
                raise ValueError(f"{name} must be a positive multiple of {f}; got {value}")
        latent_shape = (n, height // f, width // f, cfg.unet.in_channels)
        if latents is not None and np.shape(latents) != latent_shape:
            raise ValueError(f"latents must be {latent_shape} (NHWC); got {np.shape(latents)}")
        sched = self.make_scheduler(scheduler, steps)
        start = sched.start_index(strength) if init_image is not None else 0
        n_steps = len(sched.timesteps) - start
        use_guidance = guidance > 1.0
        indices = range(index_offset, index_offset + n)

        # Pad the batch to a multiple of the device count; the padding is dropped at the end.
        pad = -n % len(self.devices)
        padded = [*indices, *[indices[-1]] * pad]  # a padded image repeats the last one

        def batched(axis):  # the images' axis split over the devices
            return NamedSharding(self.mesh, P(*([None] * axis), "batch"))

        def batch(a, axis=0):
            a = np.asarray(a)
            if pad:
                last = np.take(a, [-1] * pad, axis=axis)
                a = np.concatenate([a, last], axis=axis)
            return jax.device_put(a, batched(axis))

        def noise_of(stream, shape, scale=1.0, axis=0):  # drawn on the device, kept there
            return device_noise(seed, padded, shape, stream, scale=scale, batch_axis=axis,
                                sharding=batched(axis))  # fmt: skip

        timings: dict = {}
        t_start = time.perf_counter()  # the image's wall time starts here (end_to_end)

        # The noise: one program per stream, its result left on the device (no copy to the
        # host and back), dispatched before the text encoder.
        given = None if latents is None else np.asarray(latents, np.float32)
        step_noise = None
        if sched.needs_noise:  # [S, N, h, w, C]
            step_noise = noise_of("steps", (n_steps, *latent_shape[1:]), axis=1)
        if init_image is not None:
            vae_noise = noise_of("vae", latent_shape[1:])
            noise = batch(given) if given is not None else noise_of("latents", latent_shape[1:])
        elif given is not None:
            x = batch(given * np.float32(sched.init_noise_sigma))
        else:
            x = noise_of("latents", latent_shape[1:], scale=sched.init_noise_sigma)

        # 1. text
        tokens = self.tokenizer(prompts)
        neg_tokens = self.tokenizer(negative_prompts) if use_guidance else None
        vocab = cfg.text_encoder.vocab_size
        for t in (tokens, neg_tokens):
            if t is not None and int(t.ids.max()) >= vocab:
                # An out-of-range id would make the embedding gather return NaN, silently.
                raise ValueError(
                    f"the tokenizer produced token id {int(t.ids.max())}, but the text encoder "
                    f"has vocab_size {vocab}: tokenizer and checkpoint do not belong together"
                )
        # With guidance, prompts and negative prompts in one call: [2, N, 77] -> two [N, 77, D]
        ids = np.stack([tokens.ids, neg_tokens.ids]) if use_guidance else tokens.ids
        ids = batch(ids, axis=1 if use_guidance else 0)

        def finished(name, out, t0, compile_s):
            """Records component `name` (waiting for `out` when sync_components)."""
            if sync_components:
                out = jax.block_until_ready(out)
                timings[name] = {"compile_s": compile_s, "run_s": time.perf_counter() - t0}
            else:
                timings[name] = {"compile_s": compile_s}
            return out

        # 2. initial latents (img2img: the VAE encoder, its own program in either mode)
        if init_image is not None:
            image = batch(init_image)
            enc, c_s = self._compile(
                "encode_image", self._encode_image_fn(), self.params["vae"], image, vae_noise
            )
            t0 = time.perf_counter()
            x0 = self._run(enc, "vae", image, vae_noise)
            x = sched.add_noise(x0, noise, start)
            x = finished("vae_encode", jax.device_put(x, self.batch_sharding), t0, c_s)

        loop = functools.partial(
            denoise_loop,
            unet_config=cfg.unet,
            scheduler=sched,
            start_index=start,
            dtype=self.dtype,
            kernels=self.kernels,
            sharding=self.batch_sharding,
            progress=progress,
            hoist_conditioning=self.hoist_conditioning,
            pack_time_rows=self.pack_time_rows,
            share_guidance_prefix=self.share_guidance_prefix,
        )
        statics = (sched, start, progress, self.hoist_conditioning, self.pack_time_rows,
                   self.share_guidance_prefix)  # fmt: skip
        guidance = np.float32(guidance)
        unet_inputs = self._unet_inputs(latent_shape[1:3])
        vae_inputs = self._vae_inputs(latent_shape[1:3])
        if one_program:  # 1, 3 and 4 as one program: one launch, no waits between them
            image_fn = self._image_fn(loop, use_guidance)
            whole = self._whole_params(unet_inputs and unet_inputs["prepared"],
                                       vae_inputs and vae_inputs["prepared"])  # fmt: skip
            args = (whole, ids, x, guidance, step_noise)
            run_image, c_s = self._compile("image", image_fn, *args, statics=statics)
            t0 = time.perf_counter()
            images, x = self._run(run_image, WHOLE, *args[1:], params=whole)
            _copy_to_host_async(images, x)
            images = jax.block_until_ready(images)
            timings["image"] = {"compile_s": c_s, "run_s": time.perf_counter() - t0,
                                "steps": n_steps}  # fmt: skip
        else:
            # 1. text
            encode, c_s = self._compile(
                "encode_text", self._encode_fn(), self.params["text_encoder"], ids
            )
            t0 = time.perf_counter()
            context = self._run(encode, "text_encoder", ids)
            context, uncond = context if use_guidance else (context, None)
            context, uncond = finished("text_encoder", (context, uncond), t0, c_s)

            # 3. the loop (with the prepared conditioning where there is one)
            loop_fn, first = loop, self.params["unet"]
            if unet_inputs is not None:
                loop_fn, first = _with_prepared(loop), unet_inputs
            args = (first, x, context, uncond, guidance, step_noise)
            run_loop, c_s = self._compile("denoise", loop_fn, *args, statics=statics)
            t0 = time.perf_counter()
            x = self._run(run_loop, "unet", *args[1:], params=first)
            _copy_to_host_async(x)  # the latents' copy overlaps the decoder
            x = finished("denoise", x, t0, c_s)
            timings["denoise"]["steps"] = n_steps

            # 4. decode
            decode_fn, first = self._decode_fn(), self.params["vae"]
            if vae_inputs is not None:  # the decoder's weight-only work made once, passed in
                decode_fn, first = self._decode_fn(prepared=True), vae_inputs
            decode, c_s = self._compile("decode", decode_fn, first, x)
            t0 = time.perf_counter()
            images = self._run(decode, "vae", x, params=first)
            _copy_to_host_async(images)
            images = jax.block_until_ready(finished("vae_decode", images, t0, c_s))
        compile_s = sum(t["compile_s"] for t in timings.values())
        timings["end_to_end"] = {
            "compile_s": compile_s,
            "run_s": time.perf_counter() - t_start - compile_s,
        }

        images, x = jax.device_get((images, x))  # both copies in flight at once
        return Result(
            images=np.asarray(images)[:n],
            latents=np.asarray(x)[:n],
            timings=timings,
            truncations=tokens.truncations,
            negative_truncations=neg_tokens.truncations if use_guidance else (),
            scheduler=sched.name,
            kernels=dataclasses.asdict(self.kernels),
        )


def _copy_to_host_async(*arrays) -> None:
    """Queues each array's copy to the host behind the kernels that write it (PjRt starts it
    when they finish), for the `device_get` that ends `generate`. Otherwise the copy is only
    issued once the host has seen the kernels finish: a traced `generate` on the H100 had
    the GPU idle 0.84 ms between the last kernel and the copy (s19a), 0.60 ms with this
    (s19b); the untraced image's wall did not move measurably (s19e, results README)."""
    for a in arrays:
        a.copy_to_host_async()


def _with_prepared(loop):
    """`loop` (denoise_loop with its statics bound) taking {"params", "prepared"} first."""

    # named as the loop is: its XLA module (jit_denoise_loop) is how traces and profiles
    # tell the loop's kernels from the other programs' (experiments.trace_generate)
    def denoise_loop(inputs, *args):
        return loop(inputs["params"], *args, prepared=inputs["prepared"])

    return denoise_loop


def component_timings(timings: dict) -> dict:
    """`Result.timings` less `end_to_end` (the whole call): one entry per component."""
    return {c: t for c, t in timings.items() if c != "end_to_end"}


def _negatives(negative_prompts, n: int) -> list[str]:
    if negative_prompts is None:
        return [""] * n
    if isinstance(negative_prompts, str):
        return [negative_prompts] * n
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != n:
        raise ValueError(f"{len(negative_prompts)} negative prompts for {n} prompts")
    return negative_prompts


def _check_request(*, n: int, steps, guidance, index_offset) -> None:
    if n == 0:
        raise ValueError("empty batch: give at least one prompt")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not np.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0; got {guidance}")
    if index_offset < 0:
        raise ValueError(f"index_offset must be >= 0; got {index_offset}")


def lower_auto_layouts(fn, params, *args):
    """`jax.jit(fn).lower(params, *args)` with the memory layouts of `params` (a pytree of
    arrays) left to XLA: `place_params` then moves them where the compiled program wants
    them. The other arguments keep their own layouts."""
    formats = jax.tree.map(lambda a: Format(Layout.AUTO, a.sharding), params)
    # Layout.AUTO wants abstract parameters: concrete ones carry a layout already.
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params
    )
    return jax.jit(fn, in_shardings=(formats, *[None] * len(args))).lower(abstract, *args)


def place_params(compiled, params):
    """Moves `params` (the first argument of `compiled`, a tree of nested dicts) into the
    layouts `compiled` was built for, in place: each array not yet there is replaced by a
    copy (same sharding and values) and dropped as soon as the copy exists (freed if nothing
    else holds it), so the device holds one extra array at a time, not a copy of every moved
    one (1.1 GiB of SD1.5's conv kernels). Returns the same tree."""
    wanted = jax.tree.leaves(compiled.input_formats[0][0])
    # Key paths only: a list of the leaves would keep every old array alive to the end.
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for path, fmt in zip(paths, wanted, strict=True):
        *parents, last = (entry.key for entry in path)
        node = functools.reduce(lambda d, k: d[k], parents, params)
        old = node[last]
        # None: a parameter the program does not read (the VAE's encoder in decode)
        if fmt.layout is not None and not _same_layout(old.format.layout, fmt.layout):
            node[last] = jax.device_put(old, Format(fmt.layout, old.sharding))
        del old  # the old array's last reference here
    return params


def _same_layout(a: Layout, b: Layout) -> bool:
    """Layout equality that treats an unset tiling (None, as a user builds one) as none."""
    return a.major_to_minor == b.major_to_minor and (a.tiling or ()) == (b.tiling or ())


def _cast_floats(x, *, dtype):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
