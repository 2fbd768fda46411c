"""Converts SD checkpoints between formats, and measures how long each format takes to load.

    python -m experiments.convert --src v1-5.safetensors --to diffusers --dst out/sd15
    python -m experiments.convert --src v1-5.safetensors --to sdjax --dst out/sd15-sdjax
    python -m experiments.convert --src out/sd15 --to single_file --dst sd15.safetensors
    python -m experiments.convert --measure_load_times     # full-size random SD1.5, 3 formats

--src is a single ldm-named file, a diffusers folder, or an sdjax fast-format folder.
`--to sdjax` writes sdjax's fast format (`sdjax.fast_format`: Flax params as safetensors in
our naming and layout, float16 by default, plus the configs and a tokenizer), which
`sdjax.single_file.load_checkpoint` and `sdjax.fast_format.load` read.

--measure_load_times writes a random full-size SD1.5 (float16 files) in the three formats
under --workdir and times loading each into float16 and float32 params; the files are in the
page cache when timed (warm reads). Results: experiments/results/load_times_cpu.json.
"""

from __future__ import annotations

import gc
import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from sdjax import fast_format, single_file, weights
from sdjax.config import PipelineConfig, preset

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "single file, diffusers folder or sdjax fast-format folder")
flags.DEFINE_string("dst", None, "output folder (diffusers, sdjax) or file (single_file)")
flags.DEFINE_enum("to", "sdjax", ["diffusers", "sdjax", "single_file"], "output format")
flags.DEFINE_string("config", None, "single files: a preset name instead of inferring the config")
flags.DEFINE_enum(
    "prediction_type",
    None,
    ["epsilon", "v_prediction"],
    "single files: the weights cannot tell; default epsilon (SD 2.x 768-v: v_prediction)",
)
flags.DEFINE_bool("use_ema", False, "single files: take the UNet from its model_ema.* copy")
flags.DEFINE_enum("dtype", "float16", ["float16", "bfloat16", "float32"], "output tensor dtype")
flags.DEFINE_bool("measure_load_times", False, "time the formats on a random full-size SD1.5")
flags.DEFINE_string("workdir", "/tmp/sdjax_load_times", "where --measure_load_times writes")
flags.DEFINE_integer("repeats", 3, "timed loads per format and dtype (after one warm-up)")

_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def _write_tokenizer(folder: pathlib.Path, config: PipelineConfig) -> None:
    """The embedded CLIP tokenizer; SD 2 (OpenCLIP) pads with "!" as its own tokenizer does."""
    from sdjax.tokenizer import DEFAULT_FOLDER

    folder.mkdir(parents=True, exist_ok=True)
    for item in DEFAULT_FOLDER.iterdir():
        shutil.copyfile(item, folder / item.name)
    if config.text_encoder.hidden_act == "gelu":
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config["pad_token"] = "!"
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_diffusers_folder(
    dst, config: PipelineConfig, state_dicts, *, dtype=np.float16, tokenizer=True
) -> pathlib.Path:
    """{component: diffusers-named tensors} -> a diffusers folder that diffusers and sdjax load."""
    from safetensors.numpy import save_file

    dst = pathlib.Path(dst)
    files = single_file.diffusers_configs(config)
    for comp, name in _FILES.items():
        (dst / comp).mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in state_dicts[comp].items()}
        save_file(tensors, dst / comp / name, metadata={"format": "pt"})
        (dst / comp / "config.json").write_text(json.dumps(files[comp], indent=2))
        del tensors
    (dst / "scheduler").mkdir(exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(files["scheduler"]))
    (dst / "model_index.json").write_text(json.dumps(files["model_index"], indent=2))
    if tokenizer:
        _write_tokenizer(dst / "tokenizer", config)
    return dst


def to_diffusers_folder(src, dst, *, dtype=np.float16, **kwargs) -> PipelineConfig:
    """A single ldm-named file -> a diffusers folder (kwargs: config, prediction_type, use_ema)."""
    config, state_dicts = single_file.read_diffusers_state_dicts(src, **kwargs)
    write_diffusers_folder(dst, config, state_dicts, dtype=dtype)
    return config


def _read_folder(src: pathlib.Path) -> tuple[PipelineConfig, dict]:
    from safetensors.numpy import load_file

    config = PipelineConfig.from_folder(src)
    state_dicts = {}
    for comp in _FILES:
        state_dicts[comp] = {}
        for path in weights.weight_files(src / comp):
            if path.suffix != ".safetensors":
                raise ValueError(f"{path}: only safetensors folders convert to a single file")
            state_dicts[comp].update(load_file(path))
    return config, state_dicts


def to_single_file(src, dst, *, dtype=np.float16) -> PipelineConfig:
    """A diffusers folder -> one ldm-named .safetensors file (SD 2: see single_file.to_ldm)."""
    from safetensors.numpy import save_file

    config, state_dicts = _read_folder(pathlib.Path(src))
    ldm = single_file.to_ldm(config, state_dicts)
    save_file({k: np.ascontiguousarray(v, dtype=dtype) for k, v in ldm.items()}, dst)
    return config


def to_fast_format(src, dst, *, dtype=jnp.float16, **kwargs) -> PipelineConfig:
    """Any checkpoint sdjax reads -> the sdjax fast format (with a tokenizer)."""
    config, params = single_file.load_checkpoint(src, dtype=dtype, **kwargs)
    src = pathlib.Path(src)
    tokenizer = src / "tokenizer" if (src / "tokenizer" / "vocab.json").exists() else None
    fast_format.save(dst, config, params, dtype=dtype, tokenizer_folder=tokenizer)
    if tokenizer is None:
        _write_tokenizer(pathlib.Path(dst) / "tokenizer", config)
    return config


# --------------------------------------------------------------------------------------------
# Load-time measurement
# --------------------------------------------------------------------------------------------


def _random_sd15(seed: int = 0) -> tuple[PipelineConfig, dict]:
    """Random float16 diffusers state dicts of the full SD1.5 architecture (shapes from
    meta-device torch models, so nothing but the arrays is allocated)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = preset("sd15")
    files = single_file.diffusers_configs(config)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(files["unet"]),
            "vae": AutoencoderKL.from_config(files["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**files["text_encoder"])),
        }
    rng = np.random.default_rng(seed)
    state_dicts = {}
    for comp, model in models.items():
        state_dicts[comp] = {
            k: (rng.standard_normal(tuple(v.shape), np.float32) * 0.02).astype(np.float16)
            for k, v in model.state_dict().items()
            if not k.endswith("position_ids")
        }
    return config, state_dicts


def _size(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_load_times(workdir: pathlib.Path, repeats: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "diffusers_folder": workdir / "sd15-diffusers",
        "single_file": workdir / "sd15.safetensors",
        "sdjax_fast": workdir / "sd15-sdjax",
    }
    t0 = time.perf_counter()
    config, state_dicts = _random_sd15()
    n_params = sum(v.size for sd in state_dicts.values() for v in sd.values())
    write_diffusers_folder(paths["diffusers_folder"], config, state_dicts)
    to_single_file(paths["diffusers_folder"], paths["single_file"])
    del state_dicts
    gc.collect()
    to_fast_format(paths["single_file"], paths["sdjax_fast"])
    print(f"wrote {n_params / 1e6:.0f}M params in 3 formats in {time.perf_counter() - t0:.0f} s")

    loaders = {
        "diffusers_folder": lambda dtype: weights.load_pipeline(
            paths["diffusers_folder"], dtype=dtype
        ),
        "single_file": lambda dtype: single_file.load_single_file(
            paths["single_file"], dtype=dtype
        ),
        "sdjax_fast": lambda dtype: fast_format.load(paths["sdjax_fast"], dtype=dtype),
    }
    models = {"text_encoder": config.text_encoder, "unet": config.unet, "vae": config.vae}
    shapes = common.time_host(
        lambda: [weights.expected_params(c, m) for c, m in models.items()], repeats=repeats
    )
    rows = []
    for dtype in ("float16", "float32"):
        baseline = None
        for name, load in loaders.items():

            def run(load=load, dtype=dtype):
                jax.block_until_ready(load(jnp.dtype(dtype))[1])
                gc.collect()

            timing = common.time_host(run, repeats=repeats)
            seconds = timing["median_ms"] / 1e3
            baseline = baseline or seconds
            rows.append(
                {
                    "format": name,
                    "params_dtype": dtype,
                    "median_s": seconds,
                    "all_s": [t / 1e3 for t in timing["all_ms"]],
                    "vs_diffusers_folder": seconds / baseline,
                    "bytes_on_disk": _size(paths[name]),
                }
            )
            print(f"{name:17s} -> {dtype}: {seconds:6.2f} s ({seconds / baseline:.2f}x folder)")
    return {
        "experiment": "load_times",
        "device": common.device_info(),
        "checkpoint": {
            "architecture": "sd15 (random weights)",
            "params": int(n_params),
            "file_dtype": "float16",
        },
        "method": (
            f"median of {repeats} loads after 1 warm-up, in one process; files in the page "
            "cache (warm reads); each load ends with block_until_ready on every param. "
            "Includes building the expected param shapes (jax.eval_shape of each model's init)."
        ),
        "expected_params_s": shapes["median_ms"] / 1e3,
        "results": rows,
    }


def main(argv):
    del argv
    if FLAGS.measure_load_times:
        record = measure_load_times(pathlib.Path(FLAGS.workdir), FLAGS.repeats)
        out = common.write_json(common.results_dir() / "load_times_cpu.json", record)
        columns = ["format", "params_dtype", "median_s", "vs_diffusers_folder", "bytes_on_disk"]
        print(common.markdown_table(record["results"], columns))
        print(f"wrote {out}")
        return
    if not FLAGS.src or not FLAGS.dst:
        raise app.UsageError("--src and --dst are required (or --measure_load_times)")
    dtype = jnp.dtype(FLAGS.dtype)
    single = dict(config=FLAGS.config, prediction_type=FLAGS.prediction_type, use_ema=FLAGS.use_ema)
    t0 = time.perf_counter()
    if FLAGS.to == "diffusers":
        config = to_diffusers_folder(FLAGS.src, FLAGS.dst, dtype=dtype, **single)
    elif FLAGS.to == "single_file":
        config = to_single_file(FLAGS.src, FLAGS.dst, dtype=dtype)
    else:
        is_file = pathlib.Path(FLAGS.src).is_file()
        config = to_fast_format(FLAGS.src, FLAGS.dst, dtype=dtype, **(single if is_file else {}))
    print(
        f"{FLAGS.src} -> {FLAGS.dst} ({FLAGS.to}, {FLAGS.dtype}, "
        f"prediction_type={config.scheduler.get('prediction_type')}) in "
        f"{time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    app.run(main)
