"""sdjax's own checkpoint format: the Flax params as safetensors, in our naming and layout.

    folder/
      sdjax_pipeline.json        {"format": "sdjax-params", "version": 1, "name": ...,
                                  "text_encoder": {...}, "unet": {...}, "vae": {...},
                                  "scheduler": {...}}
      text_encoder.safetensors   "text_model/encoder/layers_0/mlp/fc1/kernel" [in, out], ...
      unet.safetensors           conv kernels already HWIO
      vae.safetensors
      tokenizer/                 optional, as in a diffusers folder

Loading is one mmap read and one `device_put` per tensor: no renaming, no transposes, no cast
unless `dtype` asks for one. It is as strict as the other loaders: the tensors must be exactly
the params (names and shapes) of the models that the stored config describes.

    fast_format.save("sd15-sdjax", config, params)          # float16 by default
    config, params = fast_format.load("sd15-sdjax")
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax import weights
from sdjax.config import CLIPTextConfig, PipelineConfig, UNetConfig, VAEConfig
from sdjax.weights import CheckpointError

FORMAT, VERSION = "sdjax-params", 1
CONFIG_FILE = "sdjax_pipeline.json"
_MODELS = {"text_encoder": CLIPTextConfig, "unet": UNetConfig, "vae": VAEConfig}


def config_to_dict(config: PipelineConfig) -> dict:
    out = {"format": FORMAT, "version": VERSION, "name": config.name}
    for comp in _MODELS:
        out[comp] = dataclasses.asdict(getattr(config, comp))
    out["scheduler"] = dict(config.scheduler)
    return out


def config_from_dict(raw: dict, *, source: str = "config") -> PipelineConfig:
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointError(
            f"{source}: not an {FORMAT} v{VERSION} config (format={raw.get('format')!r}, "
            f"version={raw.get('version')!r})"
        )
    models = {}
    for comp, cls in _MODELS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw[comp]) - fields
        if unknown:
            raise CheckpointError(f"{source}: unknown {comp} config fields {sorted(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw[comp].items()}
        models[comp] = cls(**kwargs)
    return PipelineConfig(name=raw["name"], scheduler=raw.get("scheduler", {}), **models)


def is_fast_format(path: os.PathLike | str) -> bool:
    return (pathlib.Path(path) / CONFIG_FILE).is_file()


def save(
    folder: os.PathLike | str,
    config: PipelineConfig,
    params: dict[str, dict],
    *,
    dtype=jnp.float16,
    tokenizer_folder: os.PathLike | str | None = None,
) -> pathlib.Path:
    """Writes `params` ({"text_encoder", "unet", "vae"} trees) cast to `dtype`, and `config`."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for comp in _MODELS:
        flat = traverse_util.flatten_dict(params[comp])
        tensors = {"/".join(path): np.asarray(leaf, dtype=dtype) for path, leaf in flat.items()}
        save_file(tensors, folder / f"{comp}.safetensors", metadata={"format": FORMAT})
    if tokenizer_folder is not None:
        target = folder / "tokenizer"
        target.mkdir(exist_ok=True)
        for item in pathlib.Path(tokenizer_folder).iterdir():
            if item.is_file():
                (target / item.name).write_bytes(item.read_bytes())
    (folder / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    return folder


def _load_component(path: pathlib.Path, expected, *, component: str, dtype) -> dict:
    from sdjax.single_file import SafetensorsFile

    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({component} of an sdjax fast-format folder)")
    tensors = SafetensorsFile(path)
    want = {
        "/".join(p): tuple(leaf.shape)
        for p, leaf in traverse_util.flatten_dict(dict(expected)).items()
    }
    have = tensors.shapes
    missing = [f"{k} {weights._shape(s)}" for k, s in want.items() if k not in have]
    unexpected = [f"{k} {weights._shape(s)}" for k, s in have.items() if k not in want]
    wrong = [
        f"{k}: file {weights._shape(have[k])}, model wants {weights._shape(s)}"
        for k, s in want.items()
        if k in have and have[k] != s
    ]
    if missing or unexpected or wrong:
        parts = [f"{path}: does not match the {component} of its config"]
        for title, items in (
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("tensors with the wrong shape", wrong),
        ):
            if items:
                parts.append(weights._listing(title, items))
        raise CheckpointError("\n".join(parts))
    flat = {}
    for key in want:
        array = tensors.read(key)
        flat[tuple(key.split("/"))] = jax.device_put(
            array if dtype is None else array.astype(dtype, copy=False)
        )
    return traverse_util.unflatten_dict(flat)


def load(folder: os.PathLike | str, *, dtype=None) -> tuple[PipelineConfig, dict[str, dict]]:
    """(config, params) from a folder written by `save`; `dtype` None keeps the stored dtype."""
    folder = pathlib.Path(folder)
    if not is_fast_format(folder):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; not an sdjax fast-format folder")
    source = str(folder / CONFIG_FILE)
    try:
        config = config_from_dict(json.loads((folder / CONFIG_FILE).read_text()), source=source)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: invalid config ({type(e).__name__}: {e})") from None
    params = {}
    for comp in _MODELS:
        expected = weights.expected_params(comp, getattr(config, comp))
        params[comp] = _load_component(
            folder / f"{comp}.safetensors", expected, component=comp, dtype=dtype
        )
    return config, params


__all__ = ["CONFIG_FILE", "FORMAT", "is_fast_format", "load", "save"]
