"""LoRA adapters for the SD 1.x / 2.x UNet and text encoder, merged into the params.

    params = lora.merge_lora(params, "style.safetensors", strength=0.8)

Each adapted layer gets W += strength * scale * up @ down, computed in float32 and cast back
to W's dtype, with scale = alpha / rank (alpha / sqrt(rank) for rsLoRA). This is what
diffusers' `load_lora_weights` + `fuse_lora(lora_scale=strength)` computes. In Flax layout a
Dense kernel is [in, out], so it gets (up @ down).T; a conv kernel is HWIO, so a conv LoRA
(down [r, in, kh, kw], up [out, r, 1, 1]) adds einsum("or,rihw->hwio", up, down).

Namings read (one file may mix them):

    kohya (sd-scripts)   lora_unet_<module, dots as _>.lora_down.weight / .lora_up.weight / .alpha
                         lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
    diffusers / PEFT     unet.<module>.lora_A.weight / .lora_B.weight, text_encoder.<module>...
                         alpha from the file's `lora_adapter_metadata` (lora_alpha,
                         alpha_pattern, use_rslora), as diffusers' save_lora_weights writes it
    older diffusers      <prefix>.<module>.lora.down.weight / .lora.up.weight / .alpha,
                         <prefix>.<module>.lora_linear_layer.down.weight,
                         unet.<...>.attn1.processor.to_q_lora.down.weight

Without an alpha, alpha = rank (scale 1). Module names are the diffusers names (kohya's SD 1/2
LoRAs use them too; with dots as underscores). Strict: any key that names no layer of the
model, or has an unsupported type (LoHa, LoKr, DoRA, SDXL's lora_te1_/te2_), raises a
`CheckpointError` listing them; so do shape mismatches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util

from sdjax import weights
from sdjax.weights import CheckpointError

COMPONENTS = ("unet", "text_encoder")

_KOHYA = re.compile(r"lora_(unet|te)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)")
_DIFFUSERS = re.compile(
    r"(unet|text_encoder)\.(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|(?:lora|lora_linear_layer)\.(?:down|up)\.weight|alpha)"
)
_PROCESSOR = re.compile(
    r"(unet|text_encoder)\.(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"
)
_PROCESSOR_MODULES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_UNSUPPORTED = re.compile(
    r"hada_|lokr_|dora_scale|lora_magnitude_vector|lora_mid|lora_B\.bias|^lora_te[12]_|\.diff(_b)?$"
)


@dataclasses.dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: down [r, in(, kh, kw)], up [out, r(, 1, 1)], scale = alpha / r."""

    down: np.ndarray
    up: np.ndarray
    scale: float
    name: str  # the file's name for the layer, for messages


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_file(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    from sdjax.single_file import open_tensors

    tensors = open_tensors(path)
    arrays = {key: np.asarray(tensors.read(key)) for key in tensors.shapes}
    raw = getattr(tensors, "metadata", {}).get("lora_adapter_metadata")
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid lora_adapter_metadata ({e})") from None
    return arrays, metadata


def _parse_key(key: str) -> tuple[str, str, str, bool] | None:
    """key -> (component, module name, 'down' | 'up' | 'alpha', kohya?) or None."""
    if m := _KOHYA.fullmatch(key):
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]]
        return ("unet" if m[1] == "unet" else "text_encoder"), m[2], role, True
    if m := _PROCESSOR.fullmatch(key):
        return m[1], f"{m[2]}.{_PROCESSOR_MODULES[m[1]][m[3]]}", m[4], False
    if m := _DIFFUSERS.fullmatch(key):
        role = m[3].split(".")[-2] if m[3] != "alpha" else "alpha"
        role = {"lora_A": "down", "lora_B": "up"}.get(role, role)
        return m[1], m[2], role, False
    return None


def _peft_alpha(metadata: Mapping, module: str, rank: int) -> float:
    """PEFT's LoraConfig: alpha_pattern (a suffix match on the module name), else lora_alpha."""
    alpha = metadata.get("lora_alpha", rank)
    for pattern, value in (metadata.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if metadata.get("use_rslora") else alpha / rank


def _kernel_modules(params: Mapping) -> set[tuple[str, ...]]:
    return {p[:-1] for p in traverse_util.flatten_dict(dict(params)) if p[-1] == "kernel"}


def _resolve(component: str, module: str, kohya: bool, modules, kohya_names):
    if kohya:
        if component == "text_encoder" and not module.startswith("text_model_"):
            module = "text_model_" + module  # transformers >= 5 names drop the prefix
        return kohya_names.get(module)
    path = weights.flax_module_path(module)
    if component == "text_encoder" and path[:1] != ("text_model",):
        path = ("text_model", *path)  # transformers >= 5 names drop the prefix
    return path if path in modules else None


def read_lora(
    source: os.PathLike | str | Mapping[str, np.ndarray],
    params: Mapping[str, Mapping],
    *,
    metadata: Mapping | None = None,
) -> dict[str, dict[tuple[str, ...], LoRALayer]]:
    """A LoRA file (or state dict) -> {component: {Flax module path: LoRALayer}}.

    `params` ({"unet": ..., "text_encoder": ...}) tells which layers exist; every LoRA key
    must name one of them. `metadata` is diffusers' lora_adapter_metadata (read from the
    file when `source` is a path).
    """
    if isinstance(source, Mapping):
        arrays, where = {k: np.asarray(v) for k, v in source.items()}, "LoRA state dict"
        metadata = dict(metadata or {})
    else:
        arrays, file_metadata = _read_file(pathlib.Path(source))
        metadata, where = dict(metadata or file_metadata), str(source)
    if metadata.get("use_dora") or any(metadata.get(f"{c}.use_dora") for c in COMPONENTS):
        raise CheckpointError(f"{where}: DoRA adapters are not supported")

    unsupported = sorted(k for k in arrays if _UNSUPPORTED.search(k))
    if unsupported:
        raise CheckpointError(
            f"{where}: unsupported adapter type (LoHa/LoKr/DoRA/LoCon-Tucker/SDXL/full diff):\n"
            + weights._listing("unsupported keys", unsupported)
        )
    groups: dict[tuple[str, str, bool], dict[str, tuple[str, np.ndarray]]] = {}
    unknown = []
    for key, array in arrays.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        comp, module, role, kohya = parsed
        groups.setdefault((comp, module, kohya), {})[role] = (key, array)

    modules = {c: _kernel_modules(params[c]) for c in COMPONENTS if c in params}
    kohya_names = {c: {"_".join(p): p for p in paths} for c, paths in modules.items()}
    out: dict[str, dict[tuple[str, ...], LoRALayer]] = {c: {} for c in COMPONENTS}
    unmatched, broken = [], []
    for (comp, module, kohya), roles in groups.items():
        keys = [k for k, _ in roles.values()]
        path = comp in modules and _resolve(comp, module, kohya, modules[comp], kohya_names[comp])
        if not path:
            unmatched += keys
            continue
        if "down" not in roles or "up" not in roles:
            broken.append(f"{module}: has {sorted(roles)}, needs down and up")
            continue
        down, up = roles["down"][1], roles["up"][1]
        rank = down.shape[0]
        if up.ndim < 2 or up.shape[1] != rank or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            broken.append(
                f"{module}: down {weights._shape(down.shape)}, up {weights._shape(up.shape)}"
            )
            continue
        if "alpha" in roles:
            scale = float(roles["alpha"][1]) / rank
        else:
            prefix = f"{comp}."
            comp_meta = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
            scale = _peft_alpha(comp_meta or metadata, module, rank)
        if path in out[comp]:
            broken.append(f"{module}: given twice")
            continue
        out[comp][path] = LoRALayer(down=down, up=up, scale=scale, name=module)
    if unknown or unmatched or broken:
        parts = [f"{where}: LoRA does not match the model"]
        if unknown:
            parts.append(weights._listing("keys in no known LoRA naming", sorted(unknown)))
        if unmatched:
            parts.append(
                weights._listing("keys that name no UNet/text-encoder layer", sorted(unmatched))
            )
        if broken:
            parts.append(weights._listing("malformed layers", broken))
        raise CheckpointError("\n".join(parts))
    return out


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def delta(layer: LoRALayer, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """scale * up @ down in float32, in the Flax layout of a kernel of `kernel_shape`."""
    up = layer.up.astype(np.float32).reshape(layer.up.shape[0], -1)  # [out, r]
    down = layer.down.astype(np.float32)
    if len(kernel_shape) == 2:  # Dense [in, out]; a 1x1-conv LoRA fits too
        out = (up @ down.reshape(down.shape[0], -1)).T
    else:  # conv HWIO; a linear LoRA on a 1x1 conv too
        down = down if down.ndim == 4 else down[:, :, None, None]
        out = np.einsum("or,rihw->hwio", up, down)
    if out.shape != tuple(kernel_shape):
        raise CheckpointError(
            f"LoRA layer {layer.name}: update {weights._shape(out.shape)} (from down "
            f"{weights._shape(layer.down.shape)}, up {weights._shape(layer.up.shape)}) does not "
            f"fit the kernel {weights._shape(kernel_shape)}"
        )
    return out * np.float32(layer.scale)


def merge_lora(
    params: Mapping[str, Mapping],
    lora: os.PathLike | str | Mapping[str, dict],
    *,
    strength: float = 1.0,
) -> dict[str, dict]:
    """params with the LoRA merged: kernel += strength * scale * up @ down.

    Args:
      params: {"text_encoder": ..., "unet": ..., "vae": ...} (as `load_pipeline` returns).
      lora: a LoRA file, or what `read_lora` returned.
      strength: diffusers' `lora_scale`; 0 leaves the weights unchanged.
    Returns a new params dict; untouched leaves are shared with `params`.
    """
    layers = lora if _is_read(lora) else read_lora(lora, params)
    out = dict(params)
    for comp, adapted in layers.items():
        if not adapted:
            continue
        flat = traverse_util.flatten_dict(dict(params[comp]))
        for path, layer in adapted.items():
            kernel = flat[(*path, "kernel")]
            update = strength * delta(layer, kernel.shape)
            merged = np.asarray(kernel, np.float32) + update
            flat[(*path, "kernel")] = jax.device_put(merged.astype(kernel.dtype))
        out[comp] = traverse_util.unflatten_dict(flat)
    return out


def _is_read(lora) -> bool:
    return isinstance(lora, Mapping) and all(
        isinstance(v, dict) and all(isinstance(x, LoRALayer) for x in v.values())
        for v in lora.values()
    )


__all__ = ["LoRALayer", "delta", "merge_lora", "read_lora"]
