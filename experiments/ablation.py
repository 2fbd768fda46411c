"""The paper's ablation on one GPU: what each optimization buys end to end.

    python -m experiments.ablation --config sd15 --dtype float16 --anchors

Rows add our kernels one at a time to the plain-XLA baseline, then `auto`. For each row:
text encoder, UNet per step, VAE decode and their sum (`total_ms`; median of --repeats runs
of the whole pipeline, compile excluded, each component waited for before the next starts);
the image's wall time in those runs (`end_to_end_ms`: from tokenizing the prompts to the
decoded images, so the host work between the components counts too: what a caller waits
for); the same with the components dispatched back to back and one wait at the end
(`end_to_end_unsync_ms`, median of --end_to_end_repeats runs); the same with the three as one
compiled program (`generate(one_program=True)`: `end_to_end_one_program_ms`, as many runs,
its image checked against the float32 reference too); compile time, the programs'
memory (XLA's memory analysis) and the final image's difference from the float32 reference
path. All rows run in
one process on the same random weights and inputs. Anchors in the same process: the
diffusers PyTorch UNet (fp16, SDPA; eager and as a CUDA graph) and the last diffusers with
Flax models (0.35.x `FlaxUNet2DConditionModel`), where importable.

Writes ablation_<config>_<dtype>.json, .md and .png to results_dir().
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import traceback

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "sd15", "architecture preset (random weights)")
flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "compute dtype")
flags.DEFINE_integer("steps", 20, "denoising steps (DDIM: one UNet call per step)")
flags.DEFINE_integer("resolution", None, "pixels per side; default: the model's")
flags.DEFINE_float("guidance", 7.5, "guidance scale")
flags.DEFINE_integer("repeats", 3, "timed runs per row (median)")
flags.DEFINE_integer(
    "end_to_end_repeats",
    3,
    "runs per row with the components dispatched back to back and one wait at the end "
    "(generate(sync_components=False)): end_to_end_unsync_ms, median; as many again with the "
    "components as one program (generate(one_program=True)): end_to_end_one_program_ms; 0: none",
)
flags.DEFINE_list("rows", None, "subset of rows to run (default: all)")
flags.DEFINE_bool("anchors", True, "time the diffusers PyTorch and Flax UNets too")
flags.DEFINE_bool("reference", True, "compare every row's image with the float32 reference path")
flags.DEFINE_float(
    "max_rel_error_ratio",
    2.0,
    "a row fails if its latent error exceeds this times the baseline row's",
)
flags.DEFINE_string("tag", "", "suffix of the output file names")
flags.DEFINE_bool(
    "rates",
    None,
    "measure the machine's matmul rate and copy bandwidth (experiments.profile.measure_rates: "
    "an 8192^3 product, a 256 MiB copy) before the rows, recorded beside them: H100s differ "
    "by up to 10% in matmul rate (results README, item 174); default: on a GPU only",
)
flags.DEFINE_bool(
    "interleave",
    False,
    "compile every row first, then take the rows' timed images in turn (A, B, A, B, ... per "
    "mode) instead of each row's in a block: what drifts over the call falls on every row "
    "alike (results README, item 185); every row's pipeline is kept on the device meanwhile",
)
flags.DEFINE_integer("rates_matmul_size", 8192, "n of --rates' n^3 matmul")
flags.DEFINE_integer("rates_copy_mib", 256, "MiB of --rates' copy")
flags.DEFINE_bool(
    "warmup",
    False,
    "run the first selected row once, unrecorded, before the recorded rows (the first row of a "
    "process otherwise meets the machine cold)",
)
flags.DEFINE_multi_string(
    "xla_row",
    [],
    "NAME:OPTION=VALUE[,OPTION=VALUE...]: one more row, `auto` with these XLA options on top "
    "of the pipeline's defaults, named auto+NAME, run whether --rows names it or not (repeatable; e.g. "
    "cudnn_ln:xla_gpu_enable_cudnn_layer_norm=true)",
)


flags.DEFINE_multi_string(
    "hopper_row",
    [],
    "NAME:FIELD=VALUE[,FIELD=VALUE...]: one more row, `auto` with these fields replaced in "
    "every Hopper attention config (custom_calls.flash_attention_hopper.config_overrides), "
    "named auto+NAME, run whether --rows names it or not (repeatable; e.g. "
    "eager_sum:lazy_sum=false): a knob's A/B in one process",
)


def rows() -> dict:
    """{row: (Implementations, StableDiffusion keyword arguments)}. The paper's rows add one
    kernel at a time; `auto` is the product's choice; the last rows take one change away from
    `auto` (the conditioning computed in every step) or add one (our LayerNorm kernel, an XLA
    option)."""
    from sdjax.ops import Implementations as I

    xla = dict(attention="xla", group_norm="xla", geglu="xla", layer_norm="xla")
    auto = I.preset("auto")
    plain = {"compiler_options": {}}  # XLA's own defaults: the kernel rows change nothing else
    return {
        "baseline_xla": (I(**xla), plain),
        "+fused_groupnorm": (I(**{**xla, "group_norm": "pallas"}), plain),
        "+geglu": (I(**{**xla, "group_norm": "pallas", "geglu": "pallas"}), plain),
        "+fused_softmax": (I(attention="fused_softmax", group_norm="pallas", geglu="pallas",
                             layer_norm="xla"), plain),  # fmt: skip
        "+flash": (I(attention="flash", group_norm="pallas", geglu="pallas", layer_norm="xla"),
                   plain),  # fmt: skip
        "cudnn_attention_only": (I(**{**xla, "attention": "cudnn"}), plain),
        # the product: our kernels where measured faster, and the pipeline's default XLA
        # options (sdjax.pipeline.default_compiler_options: Triton GEMM fusions off and the
        # convolutions in the command buffers, on GPU)
        "auto": (auto, {}),
        "auto_conditioning_per_step": (auto, {"hoist_conditioning": False}),
        # auto with the UNet given each guided sample twice (as before the twentieth
        # session), where `auto` runs the part before the first cross-attention once per
        # sample (sdjax.pipeline.guided_unet's share_prefix)
        "auto_unshared_guidance": (auto, {"share_guidance_prefix": False}),
        # auto with one scanned [T, C] array per resnet's time projection (as before the
        # sixteenth session), where `auto` scans them packed (sdjax.pipeline.pack_rows)
        "auto_time_per_leaf": (auto, {"pack_time_rows": False}),
        # auto with the conditioning's weight-only part that XLA copies per call (stacked
        # time-projection and K/V kernels, upsampler phase kernels) made in every image's
        # program (as before the seventeenth session), where `auto` prepares it once per
        # pipeline (sdjax.pipeline.prepare_unet)
        "auto_unprepared": (auto, {"prepare_weights": False}),
        "auto+layer_norm": (dataclasses.replace(auto, layer_norm="pallas"), {}),
        # auto with row-major parameters: every call transposes the conv kernels for cuDNN
        # (the pipeline's default lets XLA choose the layouts: sdjax.pipeline's module doc)
        "auto_row_major_params": (auto, {"auto_layouts": False}),
        # auto with every 3x3 conv through cuDNN (the `auto` of sessions 1-6), where `auto`
        # takes the taps form at the weight-bound ones (sdjax.ops.taps_pays) and, from the
        # twenty-second session, our Hopper convolution at 16x16 (sdjax.ops.hopper_conv_pays)
        "auto_cudnn_convs": (dataclasses.replace(auto, conv3x3="reference"), {}),
        # auto with our convolution's input planes laid out by XLA (a fusion before each
        # kernel), where `auto` has our GroupNorm kernel write them (twenty-third session)
        "auto_xla_planes": (dataclasses.replace(auto, conv_planes="xla"), {}),
        # auto with the 1x1 convolutions (proj_in, proj_out, resnet shortcuts) through cuDNN
        # (every `auto` before the twenty-fourth session), where `auto` runs them as cuBLAS
        # matrix products on GPU (sdjax.ops.conv1x1_dot)
        "auto_cudnn_1x1": (dataclasses.replace(auto, conv1x1="reference"), {}),
        # auto with a zero bias, prepared with the weights, on the self-attentions' fused QKV
        # products, so that XLA gives them to cuBLASLt with a bias epilogue instead of legacy
        # cuBLAS (whose 64x64 pick brings a memset into the step's graph, s25b;
        # sdjax.ops.qkv_projection_choice; needs the default prepare_weights)
        "auto+qkv_bias": (dataclasses.replace(auto, qkv_projection="dot_bias"), {}),
        # auto with the 64x64 self-attentions' fused QKV products batched per sample against
        # weights broadcast with the conditioning, a shape for which cuBLAS may pick a kernel
        # without the memset (sdjax.ops.qkv_projection_batched)
        "auto+qkv_batched": (dataclasses.replace(auto, qkv_projection="dot_batched"), {}),
        # auto with every upsampler in the subpixel form (sdjax.ops.upsample_conv_subpixel),
        # where `auto` keeps the textbook order at 8x8 inputs (sdjax.ops.subpixel_pays)
        "auto+subpixel": (dataclasses.replace(auto, upsample_conv="subpixel"), {}),
        # auto with the subpixel form's interleave (and the next skip's concatenate) by XLA,
        # where `auto` runs our kernel (custom_calls.subpixel)
        "auto_xla_interleave": (dataclasses.replace(auto, interleave="xla"), {}),
        # auto with every upsampler in the textbook order (the `auto` of sessions 1-6)
        "auto_textbook_upsample": (dataclasses.replace(auto, upsample_conv="reference"), {}),
        # auto with the Triton GEGLU everywhere (where `auto` records the Hopper one)
        "auto_triton_geglu": (dataclasses.replace(auto, geglu="pallas"), {}),
        # auto with the GroupNorm table's cooperative entries run as the split plan (`auto`
        # takes our GroupNorm kernels at every SD1.5 shape: this row differs only there; the
        # table measured since the thirteenth session has none, so today it runs `auto`'s
        # kernels: an identical-row check, results README item 193)
        "auto_split_gn": (dataclasses.replace(auto, group_norm="pallas_split"), {}),
        # auto with XLA's default command buffer types: the cuDNN convolutions launched from
        # the host between command buffers (every `auto` before the twenty-fourth session),
        # where `auto` records them into the command buffers too
        # (sdjax.pipeline.GPU_COMMAND_BUFFER_TYPES)
        "auto_default_command_buffers": (auto, {"compiler_options": _without_command_buffer_types()}),
        # auto with XLA's default options: its Triton GEMM fusions back on (the `auto` row of
        # sessions 1-3; their `auto_no_triton_gemm` row is this session's `auto`)
        "auto_xla_options": (auto, plain),
    }


def _without_command_buffer_types() -> dict:
    """The pipeline's default compile options less its command buffer types (XLA's own)."""
    from sdjax.pipeline import COMMAND_BUFFER_OPTION, default_compiler_options

    options = default_compiler_options()
    options.pop(COMMAND_BUFFER_OPTION, None)
    return options


def select_rows(names, xla_specs, hopper_specs) -> dict:
    """The rows to run: those of `rows()` in `names` (all when None), then every row of
    --xla_row and --hopper_row, whether `names` lists it or not. An unknown name in `names`
    raises app.UsageError."""
    extra = {**xla_rows(xla_specs), **hopper_rows(hopper_specs)}
    selected = rows()
    if names:
        unknown = sorted(set(names) - set(selected) - set(extra))
        if unknown:
            raise app.UsageError(
                f"unknown rows {unknown}; choose from {', '.join([*selected, *extra])}"
            )
        selected = {k: v for k, v in selected.items() if k in names}
    return {**selected, **extra}


def xla_rows(specs) -> dict:
    """{auto+NAME: (auto, {"compiler_options": defaults + options})} from --xla_row specs
    (`experiments.common.parse_xla_row`)."""
    from experiments import common
    from sdjax.ops import Implementations as I
    from sdjax.pipeline import default_compiler_options

    auto = I.preset("auto")
    out = {}
    for spec in specs:
        try:
            name, options = common.parse_xla_row(spec)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        out[f"auto+{name}"] = (
            auto, {"compiler_options": {**default_compiler_options(), **options}}
        )  # fmt: skip
    return out


def hopper_rows(specs) -> dict:
    """{auto+NAME: (auto, {"hopper_overrides": fields})} from --hopper_row specs; the fields
    are checked against HopperConfig here, before any work."""
    import importlib

    from experiments import common
    from sdjax.ops import Implementations as I

    fah = importlib.import_module("custom_calls.flash_attention_hopper")
    out = {}
    for spec in specs:
        name, sep, items = spec.partition(":")
        try:
            pairs = items.split(",")
            if not sep or not name.strip() or not all("=" in p for p in pairs):
                raise ValueError("want NAME:FIELD=VALUE[,FIELD=VALUE...]")
            fields = common.parse_xla_options(pairs)  # typed values: bools, ints, floats
            with fah.config_overrides(**fields):  # unknown fields raise here
                pass
        except ValueError as e:
            raise app.UsageError(f"--hopper_row {spec!r}: {e}") from None
        out[f"auto+{name.strip()}"] = (I.preset("auto"), {"hopper_overrides": fields})
    return out


def _memory(pipe) -> dict:
    """Parameter bytes, the prepared conditioning's and the largest program's temp+output bytes
    (XLA's memory analysis)."""
    import jax

    params = sum(x.nbytes for x in jax.tree.leaves(pipe.params))
    prepared = pipe.prepared_nbytes()  # kept beside the parameters (its prepared conditioning)
    programs = {}
    for key, compiled in pipe._compiled.items():
        try:
            m = compiled.memory_analysis()
            programs[key[0]] = int(m.temp_size_in_bytes + m.output_size_in_bytes)
        except Exception:  # not every backend implements it
            pass
    peak = params + prepared + max(programs.values(), default=0)
    return {
        "params_gib": params / 2**30,
        "prepared_gib": prepared / 2**30,
        "program_gib": {k: v / 2**30 for k, v in programs.items()},
        "est_peak_gib": peak / 2**30,
    }


# generate's modes of one image: the components each waited for, dispatched back to back
# with one wait at the end, and as one program
MODES = {"sync": {}, "unsync": {"sync_components": False}, "whole": {"one_program": True}}


class RowRun:
    """One row's pipeline and its timed images. `prepare` compiles (the first image of each
    mode, untimed), `run(mode)` adds one timed image (`timed=False`: one untimed, e.g. to
    settle the parameters' placement after another mode's program ran: `StableDiffusion._run`
    checks ~1000 arrays' layouts then), `row` summarizes. `options` are
    StableDiffusion's keyword arguments, less "hopper_overrides" (fields replaced in every
    Hopper attention config while the row compiles and runs)."""

    def __init__(self, name, kernels, config, params, tokenizer, dtype, res, options=None):
        import importlib

        from sdjax.pipeline import StableDiffusion

        self.name, self.kernels = name, kernels
        self.options = dict(options or {})
        self.overrides = self.options.pop("hopper_overrides", {})
        self._fah = importlib.import_module("custom_calls.flash_attention_hopper")
        with self._config():
            self.pipe = StableDiffusion(config, params, tokenizer, dtype=dtype, kernels=kernels,
                                        **self.options)  # fmt: skip
        self.kw = dict(steps=FLAGS.steps, guidance=FLAGS.guidance, scheduler="ddim", seed=0,
                       height=res, width=res)  # fmt: skip
        self.first = self.whole_first = None
        self.runs = {mode: [] for mode in MODES}

    def _config(self):
        return self._fah.config_overrides(**self.overrides)

    def _image(self, mode):
        with self._config():
            return self.pipe.generate("a photograph of an astronaut riding a horse", **self.kw,
                                      **MODES[mode])  # fmt: skip

    def prepare(self, one_program: bool) -> None:
        self.first = self._image("sync")
        if one_program:
            self.whole_first = self._image("whole")

    def run(self, mode: str, timed: bool = True) -> None:
        result = self._image(mode)
        if timed:
            self.runs[mode].append(result)

    def row(self, ref_latents) -> tuple[dict, object]:
        import numpy as np

        from experiments import common
        from sdjax.hlo import count_hlo
        from sdjax.pipeline import component_timings

        first, runs, pipe = self.first, self.runs["sync"], self.pipe
        unsynced, whole = self.runs["unsync"], self.runs["whole"]

        def wall_ms(results):  # the median whole-call wall
            return statistics.median(r.timings["end_to_end"]["run_s"] for r in results) * 1e3

        components = list(component_timings(first.timings))
        med = {c: statistics.median(r.timings[c]["run_s"] for r in runs) * 1e3
               for c in components}  # fmt: skip
        steps = first.timings["denoise"]["steps"]
        row = {
            "row": self.name,
            "kernels": dataclasses.asdict(self.kernels),
            "options": {**self.options, "compiler_options": pipe.compiler_options},
            "text_encoder_ms": med["text_encoder"],
            "unet_step_ms": med["denoise"] / steps,
            "denoise_ms": med["denoise"],
            "vae_decode_ms": med["vae_decode"],
            # the components' wall times, each waited for: what the image costs, component by
            # component
            "total_ms": sum(med.values()),
            "compile_s": sum(first.timings[c]["compile_s"] for c in components),
            "compile_s_by_component": {c: first.timings[c]["compile_s"] for c in components},
            "memory": _memory(pipe),
        }
        # the image's wall time: tokenizing to decoded images, host work between components in
        row["end_to_end_ms"] = wall_ms(runs)
        if unsynced:
            row["end_to_end_unsync_ms"] = wall_ms(unsynced)
            same = all(np.array_equal(r.images, runs[-1].images) for r in unsynced)
            row["end_to_end_same_image"] = bool(same)
        if whole:
            row["end_to_end_one_program_ms"] = wall_ms(whole)
            row["one_program_compile_s"] = self.whole_first.timings["image"]["compile_s"]
            diff = np.abs(whole[-1].images.astype(int) - runs[-1].images.astype(int))
            row["one_program_image_max_diff"] = int(diff.max())
        row["est_peak_gib"] = row["memory"]["est_peak_gib"]
        for key, compiled in pipe._compiled.items():
            if key[0] == "denoise":
                row["hlo_per_step"] = count_hlo(compiled.as_text())
        if ref_latents is not None:
            ref = ref_latents["latents"]
            row["latent_rel_error"] = common.relative_error(runs[-1].latents, ref)
            if whole:
                row["one_program_latent_rel_error"] = common.relative_error(whole[-1].latents,
                                                                            ref)  # fmt: skip
            diff = np.abs(runs[-1].images.astype(np.float64)
                          - ref_latents["images"].astype(np.float64))  # fmt: skip
            row["image_mean_abs_diff"] = float(diff.mean())
        row["finite"] = bool(np.isfinite(runs[-1].latents).all())
        if self.overrides:
            row["hopper_overrides"] = self.overrides
        return row, runs[-1]


def _counts() -> dict:
    """Timed images per mode (--repeats waited for; --end_to_end_repeats of each other mode)."""
    return {"sync": FLAGS.repeats, "unsync": FLAGS.end_to_end_repeats,
            "whole": FLAGS.end_to_end_repeats}  # fmt: skip


def run_row(name, kernels, config, params, tokenizer, dtype, res, ref_latents, options=None):
    """One row, its timed images in a block: every waited-for image, then every unwaited one,
    then every one-program one (`interleaved_rows` of this row alone)."""
    run = RowRun(name, kernels, config, params, tokenizer, dtype, res, options)
    [result] = interleaved_rows([run], ref_latents)
    if isinstance(result, Exception):
        raise result
    return result


def interleaved_rows(runs: list, ref_latents) -> list:
    """The rows' timed images taken in turn (row A's image, B's, A's, ... per mode), after
    every row has compiled: a drift of the machine over the call (clocks, temperature, the
    host) then falls on every row alike instead of on whichever row ran during it. Returns
    (row, last result) per run, or the exception of a run whose compile or first images
    failed: that run is left out of the turns, so one bad row (an option XLA refuses, say)
    does not take the others with it."""
    counts = _counts()
    outcome = {}
    for run in runs:
        try:
            run.prepare(one_program=counts["whole"] > 0)
        except Exception as e:  # the caller records it
            outcome[run.name] = e
    ready = [run for run in runs if run.name not in outcome]
    for mode, n in counts.items():
        for run in ready if n else ():
            run.run(mode, timed=False)  # after the other mode's program
        for _ in range(n):
            for run in ready:
                run.run(mode)
    outcome.update((run.name, run.row(ref_latents)) for run in ready)
    return [outcome[run.name] for run in runs]


def anchors(config, dtype_name, res) -> dict:
    """diffusers UNet step times on the same GPU: PyTorch eager, PyTorch CUDA graph, Flax (XLA)."""
    out = {}
    latent = res // 8
    ucfg = config.unet
    diffusers_cfg = dict(
        sample_size=latent,
        block_out_channels=list(ucfg.block_out_channels),
        layers_per_block=ucfg.layers_per_block,
        down_block_types=list(ucfg.down_block_types),
        up_block_types=list(ucfg.up_block_types),
        cross_attention_dim=ucfg.cross_attention_dim,
        attention_head_dim=list(ucfg.num_attention_heads),
        use_linear_projection=ucfg.use_linear_projection,
    )
    try:
        import torch
        from diffusers import UNet2DConditionModel

        from experiments import common

        tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
            dtype_name
        ]
        unet = UNet2DConditionModel(**diffusers_cfg).to("cuda", tdtype).eval()
        x = torch.randn(2, 4, latent, latent, device="cuda", dtype=tdtype)
        t = torch.tensor([500, 500], device="cuda")
        ctx = torch.randn(2, 77, ucfg.cross_attention_dim, device="cuda", dtype=tdtype)
        with torch.inference_mode():
            out["torch_eager_ms"] = common.time_torch(lambda: unet(x, t, ctx), calls=20)[
                "median_ms"
            ]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    unet(x, t, ctx)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                unet(x, t, ctx)
            out["torch_cuda_graph_ms"] = common.time_torch(graph.replay, calls=20)["median_ms"]
        out["torch"] = torch.__version__
        unet = graph = None
        torch.cuda.empty_cache()
    except Exception as e:  # recorded, never silent
        out["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import diffusers
        import jax
        import jax.numpy as jnp
        from diffusers import FlaxUNet2DConditionModel

        jdtype = jnp.dtype(dtype_name)
        model = FlaxUNet2DConditionModel(**diffusers_cfg, dtype=jdtype)
        params = model.init_weights(jax.random.PRNGKey(0))
        params = jax.tree.map(lambda a: a.astype(jdtype), params)
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, latent, latent), jdtype)
        ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 77, ucfg.cross_attention_dim), jdtype)

        @jax.jit
        def loop(params, x, ctx):
            def body(i, x):
                return model.apply(
                    {"params": params}, x, jnp.full((2,), 999 - i * 50), ctx
                ).sample.astype(x.dtype)

            return jax.lax.fori_loop(0, FLAGS.steps, body, x)

        jax.block_until_ready(loop(params, x, ctx))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(loop(params, x, ctx))
            times.append((time.perf_counter() - t0) * 1e3 / FLAGS.steps)
        out["diffusers_flax_ms"] = statistics.median(times)
        out["diffusers_flax_version"] = diffusers.__version__
        del params
    except Exception as e:
        out["diffusers_flax_error"] = f"{type(e).__name__}: {e}"
    return out


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from experiments import common
    from sdjax import config as sd_config
    from sdjax import weights
    from sdjax.pipeline import StableDiffusion
    from sdjax.tokenizer import Tokenizer

    # bad flags fail before any work
    selected = select_rows(FLAGS.rows, FLAGS.xla_row, FLAGS.hopper_row)
    common.enable_compilation_cache()
    config = sd_config.preset(FLAGS.config)
    res = FLAGS.resolution or config.default_resolution
    params32 = weights.random_params(config, seed=0, dtype=jnp.float32)
    tokenizer = Tokenizer.default()
    record = {
        "device": common.device_info(),
        "config": FLAGS.config,
        "dtype": FLAGS.dtype,
        "resolution": res,
        "steps": FLAGS.steps,
        "scheduler": "ddim",
        "guidance": FLAGS.guidance,
        "rows": [],
    }

    ref = None
    if FLAGS.reference:
        pipe = StableDiffusion(config, params32, tokenizer, dtype="float32", kernels="reference")
        r = pipe.generate(
            "a photograph of an astronaut riding a horse",
            steps=FLAGS.steps,
            guidance=FLAGS.guidance,
            scheduler="ddim",
            seed=0,
            height=res,
            width=res,
        )
        ref = {"latents": r.latents, "images": r.images}
        record["reference"] = {"timings": r.timings}
        del pipe
    params = jax.tree.map(lambda a: a.astype(FLAGS.dtype), params32)
    del params32

    if FLAGS.rates if FLAGS.rates is not None else jax.default_backend() == "gpu":
        from experiments.profile import measure_rates

        record["rates"] = measure_rates(FLAGS.dtype, FLAGS.rates_matmul_size, FLAGS.rates_copy_mib)
        print({"rates": record["rates"]}, flush=True)
    if FLAGS.warmup and selected:
        name, (kernels, options) = next(iter(selected.items()))
        print(f"== warm-up: {name} (not recorded)", flush=True)
        run_row(name, kernels, config, params, tokenizer, FLAGS.dtype, res, None, options)
        record["warmup_row"] = name

    def failed(name, kernels, e) -> dict:
        traceback.print_exception(e)
        return {"row": name, "kernels": dataclasses.asdict(kernels),
                "error": f"{type(e).__name__}: {e}"[:2000]}  # fmt: skip

    def show(row) -> None:
        keys = ("latent_rel_error", "error")
        print({k: v for k, v in row.items() if k.endswith("_ms") or k in keys}, flush=True)

    def measure(group: dict) -> None:
        """The rows of `group` ({name: (kernels, options)}), their timed images interleaved
        (`interleaved_rows`; one row: in a block), appended to the record in `group`'s order."""
        runs, rows = [], {}
        for name, (kernels, options) in group.items():
            try:
                runs.append(RowRun(name, kernels, config, params, tokenizer, FLAGS.dtype, res,
                                   options))  # fmt: skip
            except Exception as e:
                rows[name] = failed(name, kernels, e)
        print(f"== {'interleaved: ' if FLAGS.interleave else ''}"
              f"{', '.join(r.name for r in runs)}", flush=True)  # fmt: skip
        try:
            for run, result in zip(runs, interleaved_rows(runs, ref), strict=True):
                bad = isinstance(result, Exception)
                rows[run.name] = failed(run.name, run.kernels, result) if bad else result[0]
        except Exception as e:
            for run in runs:
                rows[run.name] = failed(run.name, run.kernels, e)
        del runs  # the rows' pipelines leave the device before the next group's
        for name in group:
            record["rows"].append(rows[name])
            show(rows[name])

    if FLAGS.interleave:
        record["interleaved"] = True
        measure(selected)
    else:
        for name, row_spec in selected.items():
            measure({name: row_spec})

    base = next(
        (r for r in record["rows"] if r["row"] == "baseline_xla" and "latent_rel_error" in r), None
    )
    failures = []
    for r in record["rows"]:
        if "error" in r:
            failures.append(f"{r['row']}: {r['error'][:200]}")
        elif not r.get("finite", True):
            failures.append(f"{r['row']}: non-finite latents")
        elif base and "latent_rel_error" in r:
            limit = FLAGS.max_rel_error_ratio * max(base["latent_rel_error"], 1e-3)
            r["within_tolerance"] = r["latent_rel_error"] <= limit
            r["tolerance"] = limit
            if not r["within_tolerance"]:
                failures.append(
                    f"{r['row']}: latent error {r['latent_rel_error']:.3g} > {limit:.3g}"
                )
        if base and "unet_step_ms" in r:
            r["speedup_vs_baseline"] = base["unet_step_ms"] / r["unet_step_ms"]
    if FLAGS.anchors:
        record["anchors"] = anchors(config, FLAGS.dtype, res)
        print(record["anchors"], flush=True)
    record["failures"] = failures
    from sdjax import ops

    record["op_fallbacks"] = ops.fallbacks()

    out = common.results_dir()
    stem = f"ablation_{FLAGS.config}_{FLAGS.dtype}{FLAGS.tag}"
    common.write_json(out / f"{stem}.json", record)
    cols = [
        "row",
        "text_encoder_ms",
        "unet_step_ms",
        "vae_decode_ms",
        "total_ms",
        "end_to_end_ms",
        "end_to_end_unsync_ms",
        "end_to_end_one_program_ms",
        "speedup_vs_baseline",
        "est_peak_gib",
        "compile_s",
        "latent_rel_error",
        "image_mean_abs_diff",
    ]
    md = f"# Ablation: {FLAGS.config} {res}x{res}, {FLAGS.steps} DDIM steps, guidance, {FLAGS.dtype}\n\n"
    md += f"device: {record['device']['device_kind']}, jax {record['device']['jax']}\n\n"
    if rates := record.get("rates"):
        md += (f"machine: matmul {rates['matmul_tflops']:.1f} TFLOP/s ({rates['matmul_size']}^3 "
               f"{rates['matmul_dtype']}), copy {rates['copy_gbps']:.0f} GB/s\n\n")  # fmt: skip
    if record.get("warmup_row"):
        md += f"warm-up: one unrecorded run of {record['warmup_row']} before the rows\n\n"
    if record.get("interleaved"):
        md += "interleaved: the rows' timed images taken in turn, after every row compiled\n\n"
    md += common.markdown_table(record["rows"], cols)
    if FLAGS.anchors:
        md += (
            "\nAnchors (UNet step, same GPU, same process): "
            + ", ".join(
                f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                for k, v in record["anchors"].items()
            )
            + "\n"
        )
    (out / f"{stem}.md").write_text(md)
    _plot(record, out / f"{stem}.png")
    print(md)
    if failures:
        print("FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


def _plot(record, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows_ = [r for r in record["rows"] if "unet_step_ms" in r]
    names = [r["row"] for r in rows_]
    anchors_ = {k: v for k, v in record.get("anchors", {}).items() if k.endswith("_ms")}
    names += list(anchors_)
    vals = [r["unet_step_ms"] for r in rows_] + list(anchors_.values())
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, vals, color=["C0"] * len(rows_) + ["C3"] * len(anchors_))
    ax.invert_yaxis()
    ax.set_xlabel("UNet step (ms), batch 2")
    ax.set_title(
        f"{record['config']} {record['resolution']}px {record['dtype']} on {record['device']['device_kind']}"
    )
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app.run(main)
