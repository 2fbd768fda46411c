"""Loading diffusers-layout checkpoints (local folders or Hub repo ids) into Flax parameters.

The models name their parameters after the PyTorch checkpoint, so the conversion is one
generic rule, not a per-model table:

    PyTorch key                                  Flax path
    ...attn1.to_out.0.weight  (Linear [out,in])  .../attn1/to_out_0/kernel  [in, out]
    ...conv_in.weight         (Conv OIHW)        .../conv_in/kernel         HWIO
    ...norm1.weight                              .../norm1/scale
    ...token_embedding.weight                    .../token_embedding/embedding
    ...bias                                      .../bias

A `weight` becomes whichever of kernel / scale / embedding the model declares at that path.
Two historical spellings are accepted: diffusers' old VAE attention names (`query`, `key`,
`value`, `proj_attn`, possibly as 1x1-conv weights) and transformers >= 5 text encoders saved
without the `text_model.` prefix.

Loading is strict. Missing, unexpected and wrong-shape tensors are collected and raised as one
`CheckpointError` that names them. Tensors are read, converted and cast one at a time, so
peak host memory stays near the size of one model. Pickled `.bin`/`.ckpt` files are read only
through `torch.load(weights_only=True)`; arbitrary objects are never unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import pathlib
import re
import struct
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.config import PipelineConfig

logger = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "unet", "vae")
# model_index.json class names we know how to run.
_CLASSES = {
    "text_encoder": ("CLIPTextModel",),
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
}
_MODEL_MODULES = {
    "text_encoder": "sdjax.models.clip",
    "unet": "sdjax.models.unet",
    "vae": "sdjax.models.vae",
}
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers, transformers
_PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model", "model")

_IGNORED_BUFFERS = ("position_ids",)  # text_model.embeddings.position_ids (older transformers)
_KEY_PREFIX = {"text_encoder": "text_model."}  # transformers >= 5 saves without it
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
_LEAF_NAMES = {"weight": ("kernel", "scale", "embedding")}
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model architecture."""


# --------------------------------------------------------------------------------------------
# Name and layout conversion
# --------------------------------------------------------------------------------------------


def flax_module_path(torch_module: str) -> tuple[str, ...]:
    """'down_blocks.0.attentions.1.to_out.0' -> ('down_blocks_0', 'attentions_1', 'to_out_0')."""
    out: list[str] = []
    for part in torch_module.split(".") if torch_module else ():
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _to_flax_layout(array: np.ndarray, leaf: str, want: tuple[int, ...]) -> np.ndarray:
    """OIHW -> HWIO and [out, in] -> [in, out] for kernels; 1x1 conv <-> linear as needed."""
    if leaf != "kernel":
        return array
    if array.ndim == 4 and len(want) == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2 and len(want) == 2:
        return array.T
    if array.ndim == 4 and array.shape[2:] == (1, 1) and len(want) == 2:
        return array[:, :, 0, 0].T
    if array.ndim == 2 and len(want) == 4 and want[:2] == (1, 1):
        return array.T[None, None]
    return array


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {len(items)} {title}:\n    {shown}{more}"


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


class _Converter:
    """Accumulates converted tensors one at a time; `finish` checks completeness."""

    def __init__(self, expected, *, component: str, dtype=None):
        from flax import traverse_util

        self.expected = {
            path: (tuple(leaf.shape), leaf.dtype)
            for path, leaf in traverse_util.flatten_dict(dict(expected)).items()
        }
        self.modules = {path[:-1] for path in self.expected}
        self.component = component
        self.dtype = dtype
        self.params: dict[tuple[str, ...], jax.Array] = {}
        self.unexpected: list[str] = []
        self.wrong_shape: list[str] = []
        self.duplicate: list[str] = []

    def _resolve(self, key: str) -> tuple[str, ...] | None:
        prefix = _KEY_PREFIX.get(self.component)
        if prefix and not key.startswith(prefix):
            key = prefix + key
        module, _, leaf = key.rpartition(".")
        path = flax_module_path(module)
        if path not in self.modules:
            path = tuple(_LEGACY_ATTENTION.get(p, p) for p in path)
        for name in _LEAF_NAMES.get(leaf, (leaf,)):
            if path + (name,) in self.expected:
                return path + (name,)
        return None

    def add(self, key: str, array: np.ndarray) -> None:
        if key.rpartition(".")[2] in _IGNORED_BUFFERS:
            return
        path = self._resolve(key)
        if path is None:
            self.unexpected.append(f"{key} {_shape(array.shape)}")
            return
        if path in self.params:
            self.duplicate.append(key)
            return
        want, leaf_dtype = self.expected[path]
        converted = _to_flax_layout(array, path[-1], want)
        if converted.shape != want:
            self.wrong_shape.append(
                f"{key}: checkpoint {_shape(array.shape)}, model wants "
                f"{_shape(want)} at {'/'.join(path)}"
            )
            return
        target = self.dtype if self.dtype is not None else leaf_dtype
        self.params[path] = jax.device_put(np.asarray(converted, dtype=target))

    def finish(self, source: str) -> dict:
        from flax import traverse_util

        missing = [
            f"{'/'.join(p)} {_shape(s)}"
            for p, (s, _) in self.expected.items()
            if p not in self.params
        ]
        if missing or self.unexpected or self.wrong_shape or self.duplicate:
            parts = [f"{source}: checkpoint does not match the {self.component} architecture"]
            for title, items in (
                ("missing tensors (Flax path, shape)", missing),
                ("unexpected tensors", self.unexpected),
                ("tensors with the wrong shape", self.wrong_shape),
                ("tensors given twice", self.duplicate),
            ):
                if items:
                    parts.append(_listing(title, items))
            if not self.params:
                parts.append(
                    "  No tensor matched at all: is this a diffusers-layout checkpoint of the "
                    f"right model (expected names like {_example_key(self.expected)})?"
                )
            raise CheckpointError("\n".join(parts))
        return traverse_util.unflatten_dict(self.params)


def _example_key(expected) -> str:
    path = next(iter(expected))
    module = ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1])
    return f"'{module}.weight'"


def convert_state_dict(
    tensors: Mapping[str, np.ndarray], expected, *, component: str, dtype=None
) -> dict:
    """PyTorch state dict -> Flax params shaped like `expected`.

    Args:
      tensors: PyTorch-named arrays (numpy, or anything np.asarray accepts).
      expected: the params tree (arrays or ShapeDtypeStructs), e.g.
        `jax.eval_shape(clip.init_params, config, jax.random.key(0))`.
      component: 'text_encoder', 'unet' or 'vae' (used for names and messages).
      dtype: cast every tensor to this dtype; None keeps each expected leaf's dtype.
    Raises:
      CheckpointError naming every missing, unexpected and wrong-shape tensor.
    """
    converter = _Converter(expected, component=component, dtype=dtype)
    for key in tensors:
        converter.add(key, np.asarray(tensors[key]))
    return converter.finish(source="state dict")


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _check_safetensors_size(path: pathlib.Path) -> None:
    """Validates the header against the file size, so a truncated file never gets mmapped."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes, "
                f"file of {size} bytes)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    data_len = max(ends, default=0)
    if 8 + header_len + data_len > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header describes {data_len} bytes of "
            f"tensor data but only {size - 8 - header_len} are present (incomplete download?)"
        )


def _iter_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    _check_safetensors_size(path)
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError, not an OSError
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    with handle:
        for key in handle.keys():
            try:
                array = handle.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {key!r}: {e}") from e
            yield key, array


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def _iter_pickle(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """A pickled PyTorch state dict, read only if torch's weights-only unpickler accepts it."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: pickled PyTorch checkpoint, and torch is not installed. sdjax reads pickles "
            "only through torch.load(weights_only=True); install torch or convert the file to "
            "safetensors."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: refused: this pickle cannot be loaded with torch.load(weights_only=True), "
            f"so it may contain arbitrary objects or code ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Convert it to safetensors with a "
            "tool you trust."
        ) from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        yield key, _torch_to_numpy(value)


def _read_index(index: pathlib.Path) -> list[pathlib.Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [s.name for s in shards if not s.exists()]
    if absent:
        raise CheckpointError(f"{index}: shard files missing: {absent}")
    return shards


def weight_files(folder: pathlib.Path, *, variant: str | None = None) -> list[pathlib.Path]:
    """The files holding a component's weights: safetensors first, then pickles."""
    infix = f".{variant}" if variant else ""
    for stem in _WEIGHT_STEMS:
        single = folder / f"{stem}{infix}.safetensors"
        if single.exists():
            return [single]
        for index in (
            folder / f"{stem}.safetensors.index{infix}.json",  # diffusers' variant spelling
            folder / f"{stem}{infix}.safetensors.index.json",
        ):
            if index.exists():
                return _read_index(index)
    for stem in _PICKLE_STEMS:
        for name in (f"{stem}{infix}.bin", f"{stem}{infix}.ckpt"):
            if (folder / name).exists():
                return [folder / name]
        index = folder / f"{stem}.bin.index{infix}.json"
        if index.exists():
            return _read_index(index)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    wanted = f"{_WEIGHT_STEMS[0]}{infix}.safetensors or {_WEIGHT_STEMS[1]}{infix}.safetensors"
    hint = f" (variant {variant!r} requested)" if variant else ""
    raise CheckpointError(f"{folder}: no weights found{hint}: looked for {wanted}; found {present}")


def _iter_file(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    if path.name.endswith(".safetensors"):
        return _iter_safetensors(path)
    return _iter_pickle(path)


def load_component(
    folder: os.PathLike | str,
    expected,
    *,
    component: str,
    dtype=None,
    variant: str | None = None,
) -> dict:
    """Loads one component folder (e.g. `<checkpoint>/unet`) into params shaped like `expected`.

    Reads `*.safetensors` (single, sharded through `*.safetensors.index.json`, or a variant
    such as `diffusion_pytorch_model.fp16.safetensors`) tensor by tensor; `.bin`/`.ckpt`
    pickles only through torch's weights-only loader. Raises `CheckpointError`.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{component} folder not found: {folder}")
    converter = _Converter(expected, component=component, dtype=dtype)
    for path in weight_files(folder, variant=variant):
        for key, array in _iter_file(path):
            converter.add(key, array)
            del array
    return converter.finish(source=str(folder))


# --------------------------------------------------------------------------------------------
# Whole pipelines
# --------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _allow_patterns(variant: str | None) -> list[str]:
    infix = f".{variant}" if variant else ""
    patterns = ["model_index.json", "scheduler/*.json", "tokenizer/*.json", "tokenizer/*.txt"]
    for comp in COMPONENTS:
        patterns.append(f"{comp}/config.json")
        for stem in _WEIGHT_STEMS:
            patterns += [
                f"{comp}/{stem}{infix}.safetensors",
                f"{comp}/{stem}.safetensors.index{infix}.json",
                f"{comp}/{stem}{infix}.safetensors.index.json",
                f"{comp}/{stem}{infix}-?????-of-?????.safetensors",
            ]
    return patterns


def _snapshot(repo_id: str, variant: str | None) -> pathlib.Path:
    import huggingface_hub

    offline = _hub_offline()
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=_allow_patterns(variant), local_files_only=offline
        )
    except Exception as e:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hub"
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and it could not be fetched from {where}: "
            f"{type(e).__name__}: {e}"
        ) from e
    return pathlib.Path(path)


def resolve_checkpoint(checkpoint: os.PathLike | str, *, variant: str | None = None):
    """A local diffusers-layout folder, or a Hub repo id downloaded (needed files only)."""
    path = pathlib.Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and _REPO_ID.match(str(checkpoint)):
        return _snapshot(str(checkpoint), variant)
    raise CheckpointError(f"checkpoint folder not found: {path}")


def _check_model_index(folder: pathlib.Path) -> None:
    index = folder / "model_index.json"
    if not index.exists():
        raise CheckpointError(
            f"{folder}: no model_index.json; expected a diffusers-layout checkpoint folder "
            f"with {', '.join(COMPONENTS)} subfolders"
        )
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    for comp in COMPONENTS:
        entry = entries.get(comp)
        if not entry or not isinstance(entry, list) or entry[-1] is None:
            raise CheckpointError(f"{folder}: model_index.json lists no {comp} component")
        if entry[-1] not in _CLASSES[comp]:
            raise CheckpointError(
                f"{folder}: {comp} is a {entry[-1]}; sdjax runs {' or '.join(_CLASSES[comp])}"
            )
        if not (folder / comp).is_dir():
            raise CheckpointError(f"{folder}: component folder {comp}/ is missing")


def _component_configs(config: PipelineConfig) -> dict:
    return {"text_encoder": config.text_encoder, "unet": config.unet, "vae": config.vae}


def _init_fn(component: str):
    return importlib.import_module(_MODEL_MODULES[component]).init_params


def expected_params(component: str, model_config) -> dict:
    """The params tree of a component as ShapeDtypeStructs (nothing is allocated)."""
    return jax.eval_shape(
        functools.partial(_init_fn(component), model_config), jax.random.PRNGKey(0)
    )


def load_pipeline(
    checkpoint: os.PathLike | str, *, dtype=jnp.float32, variant: str | None = None
) -> tuple[PipelineConfig, dict[str, dict]]:
    """Loads text encoder, UNet and VAE of a diffusers-layout SD checkpoint.

    Args:
      checkpoint: a local folder with model_index.json, or a Hub repo id (only the needed
        files are fetched; with HF_HUB_OFFLINE=1 only the local cache is used).
      dtype: the dtype of every parameter.
      variant: e.g. "fp16" to read `*.fp16.safetensors`.
    Returns:
      (config, {"text_encoder": params, "unet": params, "vae": params}).
    """
    folder = resolve_checkpoint(checkpoint, variant=variant)
    _check_model_index(folder)
    config = PipelineConfig.from_folder(folder)
    if not pathlib.Path(checkpoint).expanduser().is_dir():  # a repo id: name it, not its hash
        config = dataclasses.replace(config, name=str(checkpoint))
    params = {}
    for comp, model_config in _component_configs(config).items():
        params[comp] = load_component(
            folder / comp,
            expected_params(comp, model_config),
            component=comp,
            dtype=dtype,
            variant=variant,
        )
    return config, params


def numpy_params(shapes, seed: int, dtype=np.float32) -> dict:
    """Params of the given shape tree drawn with numpy: stable across jax and flax versions.

    Kernels N(0, 1/fan_in) (activations keep their scale through depth); norm scales
    N(1, 0.1) and everything else N(0, 0.1), so that swapped or missing parameters show.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, leaf in leaves:
        name = getattr(path[-1], "key", str(path[-1]))
        value = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "kernel":
            value *= np.float32(1.0 / np.sqrt(np.prod(leaf.shape[:-1])))
        elif name == "scale":
            value = 1.0 + 0.1 * value
        else:
            value *= np.float32(0.1)
        out.append(value.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_params(config: PipelineConfig, seed: int = 0, dtype=jnp.float32) -> dict[str, dict]:
    """Deterministic random weights of the real architecture. Images made with them are noise.

    Drawn with numpy on the host (`numpy_params`): seconds for SD1.5, where flax's eager
    initializers took minutes on a 2-core CPU. Component i uses seed (seed, i).
    """
    logger.warning(
        "using RANDOM weights for the %s architecture (seed %d): generated images will be noise. "
        "Pass a checkpoint for real images.",
        config.name,
        seed,
    )
    params = {}
    for i, (comp, model_config) in enumerate(_component_configs(config).items()):
        shapes = expected_params(comp, model_config)
        params[comp] = numpy_params(
            shapes, np.random.SeedSequence([seed, i]), dtype=jnp.dtype(dtype)
        )
    return params


__all__ = [
    "COMPONENTS",
    "CheckpointError",
    "convert_state_dict",
    "expected_params",
    "flax_module_path",
    "load_component",
    "load_pipeline",
    "numpy_params",
    "random_params",
    "resolve_checkpoint",
    "weight_files",
]
