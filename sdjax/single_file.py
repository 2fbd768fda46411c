"""Single-file SD 1.x / 2.x checkpoints in the original CompVis ("ldm") naming.

    config, params = single_file.load_single_file("v1-5-pruned-emaonly.safetensors")

One file holds the three models under these prefixes:

    model.diffusion_model.*         UNet   input_blocks.I.J / middle_block.J / output_blocks.I.J
    first_stage_model.*             VAE    encoder.down.I.block.J / decoder.up.I ... / mid.attn_1
    cond_stage_model.transformer.*  SD 1   transformers' CLIPTextModel names
    cond_stage_model.model.*        SD 2   OpenCLIP: transformer.resblocks.I, fused attn.in_proj

Loading renames each ldm key to its diffusers key (`diffusers_sources`: a plan naming, for every
diffusers tensor, the ldm tensor and rows it comes from) and hands the tensors, read lazily one
at a time, to `weights.convert_state_dict`, which does the diffusers -> Flax layout and the
strict checks. `to_ldm` is the inverse (diffusers state dicts -> one ldm state dict).

The config is inferred from tensor shapes (`infer_config`); what weights cannot tell comes from
the SD conventions, and a preset or explicit `PipelineConfig` overrides all of it:
  - prediction type: epsilon unless `prediction_type="v_prediction"` (SD 2.x 768-v models,
    which then also get sample_size 96). Nothing in the weights distinguishes the two.
  - attention heads: 8 per UNet block for SD 1 (CLIP text encoder), 64 channels per head for
    SD 2 (OpenCLIP); text encoders use 64 channels per head.
  - GroupNorm with 32 groups, VAE scaling factor 0.18215, SD's scheduler.
  - SD 2: OpenCLIP's last (24th) layer is dropped, as diffusers does: SD 2 conditions on the
    penultimate layer, followed by the final LayerNorm.

Ignored tensors: DDPM schedule buffers (`betas`, `alphas_cumprod`, ...), EMA copies
(`model_ema.*`, unless `use_ema=True`, which loads the UNet from them), OpenCLIP's
`text_projection` / `logit_scale`. Anything else unknown raises `CheckpointError`.

Files are read through mmap (safetensors; `safe_open`'s numpy mode cannot read bf16) or, for
`.ckpt`/`.pt`/`.bin` pickles, only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from sdjax import weights
from sdjax.config import CLIPTextConfig, PipelineConfig, UNetConfig, VAEConfig, preset
from sdjax.weights import CheckpointError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."

_IGNORED = re.compile(
    r"(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar"
    r"|model_ema\.(decay|num_updates)"
    r"|cond_stage_model\.model\.(text_projection|logit_scale|attn_mask))"
)
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# --------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """Zero-copy, read-only views into a safetensors file (mmap). Keeps the header's order."""

    def __init__(self, path: os.PathLike | str):
        self.path = pathlib.Path(path)
        weights._check_safetensors_size(self.path)  # header and data length vs file size
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + header_len
        self._entries = header
        for key, info in header.items():
            start, end = info["data_offsets"]
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} has unsupported {info['dtype']}"
                )
            nbytes = math.prod(info["shape"]) * np.dtype(_DTYPES[info["dtype"]]).itemsize
            if end - start != nbytes:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r}: {end - start} bytes for {info}"
                )

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(info["shape"]) for key, info in self._entries.items()}

    def read(self, key: str) -> np.ndarray:
        info = self._entries[key]
        dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
        if not math.prod(shape):
            return np.empty(shape, dtype)
        offset = self._base + info["data_offsets"][0]
        return np.frombuffer(self._buffer, dtype, math.prod(shape), offset).reshape(shape)


class _Tensors:
    """A state dict in memory (a pickle read by torch's weights-only loader)."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self._tensors = tensors
        self.shapes = {key: tuple(value.shape) for key, value in tensors.items()}

    def read(self, key: str) -> np.ndarray:
        return self._tensors[key]


def open_tensors(path: os.PathLike | str) -> SafetensorsFile | _Tensors:
    """A `.safetensors` file, or a pickle that `torch.load(weights_only=True)` accepts."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in _PICKLE_SUFFIXES:
        return _Tensors(dict(weights._iter_pickle(path)))
    raise CheckpointError(
        f"{path}: not a .safetensors file or a {'/'.join(_PICKLE_SUFFIXES)} pickle"
    )


# --------------------------------------------------------------------------------------------
# ldm -> diffusers names
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one diffusers tensor comes from in the ldm file."""

    key: str
    part: int | None = None  # this third (q, k, v) of a fused in_proj tensor's rows
    squeeze: bool = False  # a 1x1-conv weight [O, I, 1, 1] stored for a linear layer


def _swap(name: str, table) -> str | None:
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


_UNET_TOP = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)
_UNET_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
_UNET_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"middle_block\.([012])\.(.+)")


def _unet_name(key: str, layers: int) -> str | None:
    """'input_blocks.4.1.proj_in.weight' -> 'down_blocks.1.attentions.0.proj_in.weight'."""
    if (top := _swap(key, _UNET_TOP)) is not None:
        return top
    if m := _UNET_MID.fullmatch(key):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        inner = _swap(m[2], _UNET_RESNET)
        return inner and f"mid_block.resnets.{int(m[1]) // 2}.{inner}"
    if not (m := _UNET_BLOCK.fullmatch(key)):
        return None
    index, sub, rest = int(m[2]), int(m[3]), m[4]
    if m[1] == "input_blocks":  # 0 is conv_in; then per level: `layers` resnets, a downsampler
        block, j = divmod(index - 1, layers + 1)
        prefix = f"down_blocks.{block}"
        if j == layers:
            ok = sub == 0 and rest.startswith("op.")
            return f"{prefix}.downsamplers.0.conv.{rest[3:]}" if ok else None
    else:  # per level: layers + 1 resnets, the last one followed by the upsampler
        block, j = divmod(index, layers + 1)
        prefix = f"up_blocks.{block}"
        if sub > 0 and rest.startswith("conv."):
            return f"{prefix}.upsamplers.0.{rest}" if j == layers else None
    if sub == 0:
        inner = _swap(rest, _UNET_RESNET)
        return inner and f"{prefix}.resnets.{j}.{inner}"
    return f"{prefix}.attentions.{j}.{rest}" if sub == 1 else None


_VAE_TOP = (
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    ("decoder.norm_out.", "decoder.conv_norm_out."),
    *((p, p) for p in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.")),
    *((p, p) for p in ("decoder.conv_out.", "quant_conv.", "post_quant_conv.")),
)
_VAE_RESNET = tuple((p, p) for p in ("norm1.", "conv1.", "norm2.", "conv2.")) + (
    ("nin_shortcut.", "conv_shortcut."),
)
_VAE_ATTENTION = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
_VAE_LEVEL = re.compile(
    r"(encoder\.down|decoder\.up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)"
)
_VAE_MID = re.compile(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)")


def _vae_name(key: str, levels: int) -> str | None:
    """'decoder.up.3.block.0.nin_shortcut.weight' (4 levels)
    -> 'decoder.up_blocks.0.resnets.0.conv_shortcut.weight': ldm numbers decoder levels from
    the bottom, diffusers from the top."""
    if (top := _swap(key, _VAE_TOP)) is not None:
        return top
    if m := _VAE_MID.fullmatch(key):
        if m[2] == "attn_1":
            inner = _swap(m[3], _VAE_ATTENTION)
            return inner and f"{m[1]}.mid_block.attentions.0.{inner}"
        inner = _swap(m[3], _VAE_RESNET)
        return inner and f"{m[1]}.mid_block.resnets.{int(m[2][-1]) - 1}.{inner}"
    if not (m := _VAE_LEVEL.fullmatch(key)):
        return None
    encoder, level, rest = m[1] == "encoder.down", int(m[2]), m[5]
    prefix = "encoder.down_blocks." if encoder else "decoder.up_blocks."
    prefix += str(level if encoder else levels - 1 - level)
    if m[4] is not None:
        inner = _swap(rest, _VAE_RESNET)
        return inner and f"{prefix}.resnets.{m[4]}.{inner}"
    if m[3] == ("downsample" if encoder else "upsample") and rest.startswith("conv."):
        return f"{prefix}.{m[3]}rs.0.{rest}"
    return None


_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _openclip_names(key: str) -> list[tuple[str, int | None]]:
    """One OpenCLIP key -> [(diffusers name, third of the rows)]; in_proj gives q, k and v."""
    if key in _OPENCLIP_TOP:
        return [(_OPENCLIP_TOP[key], None)]
    if not (m := _RESBLOCK.fullmatch(key)):
        return []
    layer = f"text_model.encoder.layers.{m[1]}."
    if m[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = m[2].rpartition("_")[2]
        return [(f"{layer}self_attn.{p}_proj.{leaf}", i) for i, p in enumerate("qkv")]
    inner = _swap(m[2], _OPENCLIP_LAYER)
    return [(layer + inner, None)] if inner else []


def _ema_key(key: str) -> str:
    """ldm's EMA copy drops the dots:
    model.diffusion_model.out.0.weight -> model_ema.diffusion_modelout0weight."""
    return "model_ema." + "".join(key.split(".")[1:])


def _layout(keys) -> str:
    """'sd1' or 'sd2'; raises for anything else."""
    keys = list(keys)
    has = {p: any(k.startswith(p) for k in keys) for p in (UNET, VAE, CLIP, OPENCLIP)}
    if has[UNET] and has[VAE] and has[CLIP] != has[OPENCLIP]:
        return "sd1" if has[CLIP] else "sd2"
    tops = sorted({".".join(k.split(".")[:2]) for k in keys})
    hint = ""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        hint = " This looks like an SDXL checkpoint, which sdjax does not run."
    elif any(
        k.startswith(("down_blocks.", "unet.", "text_model.", "encoder.down_blocks.")) for k in keys
    ):
        hint = (
            " This looks like diffusers naming: load a diffusers folder with weights.load_pipeline."
        )
    missing = [p + "*" for p in (UNET, VAE) if not has[p]]
    if has[CLIP] == has[OPENCLIP]:
        missing.append(f"text encoder (exactly one of {CLIP}* for SD 1, {OPENCLIP}* for SD 2)")
    shown = ", ".join(tops[:12]) + (f", ... ({len(tops)} in all)" if len(tops) > 12 else "")
    raise CheckpointError(
        "unknown single-file layout: expected an SD 1.x/2.x checkpoint in the original (ldm) "
        f"naming, but found no {'; no '.join(missing)}. Top-level names: {shown}.{hint}"
    )


def diffusers_sources(
    shapes: Mapping[str, tuple[int, ...]], config: PipelineConfig, *, use_ema: bool = False
) -> dict[str, dict[str, Source]]:
    """The renaming plan: {component: {diffusers name: Source}}. Raises for unknown ldm keys."""
    layout = _layout(shapes)
    plan: dict[str, dict[str, Source]] = {"text_encoder": {}, "unet": {}, "vae": {}}
    resblocks = {int(m[1]) for k in shapes if (m := _RESBLOCK.match(k.removeprefix(OPENCLIP)))}
    dropped = (
        max(resblocks) if len(resblocks) == config.text_encoder.num_hidden_layers + 1 else None
    )
    levels = len(config.vae.block_out_channels)
    unknown = []
    for key in shapes:
        if _IGNORED.fullmatch(key) or key.startswith("model_ema."):
            continue
        names: list[tuple[str, Source | None]] = []
        if key.startswith(UNET):
            comp, name = "unet", _unet_name(key[len(UNET) :], config.unet.layers_per_block)
            source = Source(_ema_key(key)) if use_ema else None
            names = [(name, source)] if name else []
        elif key.startswith(VAE):
            comp, name = "vae", _vae_name(key[len(VAE) :], levels)
            squeeze = ".mid.attn_1." in key and key.endswith("weight") and "norm" not in key
            names = [(name, Source(key, squeeze=squeeze))] if name else []
        elif key.startswith(CLIP) and layout == "sd1":
            comp, name = "text_encoder", key[len(CLIP) :]
            names = [(name if name.startswith("text_model.") else "text_model." + name, None)]
        elif key.startswith(OPENCLIP) and layout == "sd2":
            m = _RESBLOCK.match(key[len(OPENCLIP) :])
            if m and int(m[1]) == dropped:
                continue
            parts = _openclip_names(key[len(OPENCLIP) :])
            comp, names = "text_encoder", [(n, Source(key, part=i)) for n, i in parts]
        if not names:
            unknown.append(f"{key} {weights._shape(shapes[key])}")
        for name, source in names:
            plan[comp][name] = source or Source(key)
    if unknown:
        raise CheckpointError(
            "single-file checkpoint: tensors with names sdjax does not know:\n"
            + weights._listing("unknown tensors", unknown)
        )
    if use_ema:
        absent = [s.key for s in plan["unet"].values() if s.key not in shapes]
        if absent:
            raise CheckpointError(
                "use_ema=True but the file has no EMA copy of the UNet:\n"
                + weights._listing("missing EMA tensors", absent)
            )
    return plan


class _Lazy(Mapping):
    """Diffusers-named tensors, each read (and split or squeezed) only when asked for."""

    def __init__(self, tensors, sources: Mapping[str, Source]):
        self._tensors, self._sources = tensors, sources

    def __getitem__(self, name: str) -> np.ndarray:
        source = self._sources[name]
        array = self._tensors.read(source.key)
        if source.part is not None:
            third = array.shape[0] // 3
            array = array[source.part * third : (source.part + 1) * third]
        if source.squeeze and array.ndim == 4:
            array = array[:, :, 0, 0]
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


# --------------------------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------------------------


def _indices(shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes if (m := regex.match(k))})


def _infer_unet(s: Mapping[str, tuple], family: str, prediction_type: str) -> UNetConfig:
    blocks = _indices(s, r"input_blocks\.(\d+)\.")
    ops = _indices(s, r"input_blocks\.(\d+)\.0\.op\.weight")
    layers = ops[0] - 1 if ops else len(blocks) - 1
    if not blocks or layers < 1 or len(blocks) % (layers + 1):
        raise CheckpointError(f"UNet: cannot infer the block structure from input_blocks {blocks}")
    levels = len(blocks) // (layers + 1)
    first = [1 + b * (layers + 1) for b in range(levels)]
    channels = tuple(s[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first)
    attn_down = [f"input_blocks.{i}.1.norm.weight" in s for i in first]
    attn_up = [f"output_blocks.{b * (layers + 1)}.1.norm.weight" in s for b in range(levels)]
    depth = tuple(
        len(_indices(s, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) or 1 for i in first
    )
    context = [v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in s.items() if k.endswith("proj_in.weight")]
    v_model = family == "sd2" and prediction_type == "v_prediction"
    return UNetConfig(
        sample_size=96 if v_model else 64,
        in_channels=s["input_blocks.0.0.weight"][1],
        out_channels=s["out.2.weight"][0],
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up),
        cross_attention_dim=context[0] if context else 768,
        num_attention_heads=tuple(8 if family == "sd1" else max(c // 64, 1) for c in channels),
        transformer_layers_per_block=depth,
        use_linear_projection=bool(proj_in) and len(proj_in[0]) == 2,
        upcast_attention=v_model,
    )


def _infer_vae(s: Mapping[str, tuple], v_model: bool) -> VAEConfig:
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=s["encoder.conv_in.weight"][1],
        out_channels=s["decoder.conv_out.weight"][0],
        latent_channels=s["post_quant_conv.weight"][0],
        block_out_channels=tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels),
        layers_per_block=len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
        sample_size=768 if v_model else 512,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in s,
    )


def _infer_text(s: Mapping[str, tuple], family: str) -> CLIPTextConfig:
    if family == "sd1":
        s = {k.removeprefix("text_model."): v for k, v in s.items()}
        vocab, hidden = s["embeddings.token_embedding.weight"]
        positions = s["embeddings.position_embedding.weight"][0]
        layers = len(_indices(s, r"encoder\.layers\.(\d+)\."))
        intermediate = s["encoder.layers.0.mlp.fc1.weight"][0]
    else:
        vocab, hidden = s["token_embedding.weight"]
        positions = s["positional_embedding"][0]
        layers = len(_indices(s, r"transformer\.resblocks\.(\d+)\.")) - 1  # penultimate layer
        intermediate = s["transformer.resblocks.0.mlp.c_fc.weight"][0]
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=positions,
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
    )


def infer_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    prediction_type: str = "epsilon",
    name: str = "single_file",
) -> PipelineConfig:
    """The PipelineConfig of an ldm-named checkpoint from its tensor shapes (see the module doc)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
        )
    family = _layout(shapes)
    part = lambda prefix: {
        k[len(prefix) :]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)
    }
    try:
        unet = _infer_unet(part(UNET), family, prediction_type)
        vae = _infer_vae(part(VAE), unet.upcast_attention)
        text = _infer_text(part(CLIP if family == "sd1" else OPENCLIP), family)
    except KeyError as e:
        raise CheckpointError(f"cannot infer the config: tensor {e} is missing") from None
    scheduler = preset("sd15" if family == "sd1" else "sd21-base").scheduler
    return PipelineConfig(
        name=name,
        text_encoder=text,
        unet=unet,
        vae=vae,
        scheduler={**scheduler, "prediction_type": prediction_type},
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _resolve_config(shapes, config, prediction_type, name) -> PipelineConfig:
    if config is None:
        return infer_config(shapes, prediction_type=prediction_type or "epsilon", name=name)
    config = preset(config) if isinstance(config, str) else config
    if prediction_type is not None:
        scheduler = {**config.scheduler, "prediction_type": prediction_type}
        config = dataclasses.replace(config, scheduler=scheduler)
    return config


def read_diffusers_state_dicts(
    path: os.PathLike | str,
    *,
    config: PipelineConfig | str | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
) -> tuple[PipelineConfig, dict[str, Mapping[str, np.ndarray]]]:
    """(config, {component: diffusers-named tensors}); the tensors are read lazily."""
    path = pathlib.Path(path)
    tensors = open_tensors(path)
    config = _resolve_config(tensors.shapes, config, prediction_type, path.stem)
    plan = diffusers_sources(tensors.shapes, config, use_ema=use_ema)
    return config, {comp: _Lazy(tensors, sources) for comp, sources in plan.items()}


def load_single_file(
    path: os.PathLike | str,
    *,
    config: PipelineConfig | str | None = None,
    prediction_type: str | None = None,
    dtype=jnp.float32,
    use_ema: bool = False,
) -> tuple[PipelineConfig, dict[str, dict]]:
    """Loads an ldm-named SD 1.x/2.x `.safetensors` (or weights-only `.ckpt`) file.

    Args:
      path: the checkpoint file.
      config: None to infer it from the shapes, a preset name ("sd15", "sd21", ...) or a
        PipelineConfig. The tensors must match it exactly.
      prediction_type: "epsilon" or "v_prediction" (SD 2.x 768-v); the weights cannot tell.
        None: epsilon when inferring, else the config's own.
      dtype: the dtype of every parameter.
      use_ema: load the UNet from the file's `model_ema.*` copy.
    Returns:
      (config, {"text_encoder": params, "unet": params, "vae": params}), as `weights.load_pipeline`.
    """
    config, state_dicts = read_diffusers_state_dicts(
        path, config=config, prediction_type=prediction_type, use_ema=use_ema
    )
    models = {"text_encoder": config.text_encoder, "unet": config.unet, "vae": config.vae}
    params = {}
    for comp, tensors in state_dicts.items():
        expected = weights.expected_params(comp, models[comp])
        try:
            params[comp] = weights.convert_state_dict(
                tensors, expected, component=comp, dtype=dtype
            )
        except CheckpointError as e:
            raise CheckpointError(f"{path} (ldm names, renamed to diffusers'): {e}") from None
    return config, params


def load_checkpoint(
    path: os.PathLike | str, *, dtype=jnp.float32, **kwargs
) -> tuple[PipelineConfig, dict]:
    """Any format sdjax reads: a diffusers folder or Hub id, an sdjax fast-format folder, or a
    single file. kwargs go to `load_single_file` (single files only) or `load_pipeline`."""
    from sdjax import fast_format

    p = pathlib.Path(path).expanduser()
    if fast_format.is_fast_format(p):
        return fast_format.load(p, dtype=dtype)
    if p.is_file():
        return load_single_file(p, dtype=dtype, **kwargs)
    return weights.load_pipeline(path, dtype=dtype, **kwargs)


def tokenizer_for(config: PipelineConfig):
    """The embedded CLIP tokenizer, padded as the checkpoint family expects (a single file
    brings no tokenizer): SD 1 pads with <|endoftext|>, SD 2 (OpenCLIP, gelu) with "!"."""
    from transformers import CLIPTokenizer

    from sdjax.tokenizer import DEFAULT_FOLDER, Tokenizer

    kwargs = {"pad_token": "!"} if config.text_encoder.hidden_act == "gelu" else {}
    return Tokenizer(CLIPTokenizer.from_pretrained(str(DEFAULT_FOLDER), **kwargs))


# --------------------------------------------------------------------------------------------
# diffusers -> ldm (export) and diffusers folder configs
# --------------------------------------------------------------------------------------------

_INVERSE_UNET_RESNET = tuple((new, old) for old, new in _UNET_RESNET)
_INVERSE_VAE_RESNET = tuple((new, old) for old, new in _VAE_RESNET)
_INVERSE_VAE_ATTENTION = tuple((new, old) for old, new in _VAE_ATTENTION)
_DIFFUSERS_VAE_LEVEL = re.compile(
    r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets\.\d+|downsamplers\.0|upsamplers\.0)"
    r"\.(.+)"
)
_DIFFUSERS_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)


def _unet_ldm_name(name: str, config: UNetConfig) -> str | None:
    if (top := _swap(name, tuple((new, old) for old, new in _UNET_TOP))) is not None:
        return top
    if m := re.fullmatch(r"mid_block\.(resnets\.[01]|attentions\.0)\.(.+)", name):
        if m[1] == "attentions.0":
            return f"middle_block.1.{m[2]}"
        inner = _swap(m[2], _INVERSE_UNET_RESNET)
        return inner and f"middle_block.{2 * int(m[1][-1])}.{inner}"
    if not (m := _DIFFUSERS_BLOCK.fullmatch(name)):
        return None
    block, kind, j, rest = int(m[2]), m[3], int(m[4]), m[5]
    layers = config.layers_per_block
    if kind == "downsamplers":
        return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
    if kind == "upsamplers":
        sub = 2 if config.up_block_types[block].startswith("CrossAttn") else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{sub}.{rest}"
    if m[1] == "down":
        base = f"input_blocks.{1 + block * (layers + 1) + j}"
    else:
        base = f"output_blocks.{block * (layers + 1) + j}"
    if kind == "attentions":
        return f"{base}.1.{rest}"
    inner = _swap(rest, _INVERSE_UNET_RESNET)
    return inner and f"{base}.0.{inner}"


def _vae_ldm_name(name: str, levels: int) -> str | None:
    if (top := _swap(name, tuple((new, old) for old, new in _VAE_TOP))) is not None:
        return top
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.(resnets\.[01]|attentions\.0)\.(.+)", name
    ):
        if m[2] == "attentions.0":
            inner = _swap(m[3], _INVERSE_VAE_ATTENTION)
            return inner and f"{m[1]}.mid.attn_1.{inner}"
        inner = _swap(m[3], _INVERSE_VAE_RESNET)
        return inner and f"{m[1]}.mid.block_{int(m[2][-1]) + 1}.{inner}"
    m = _DIFFUSERS_VAE_LEVEL.fullmatch(name)
    if m is None:
        return None
    level = int(m[2]) if m[1] == "encoder.down" else levels - 1 - int(m[2])
    if m[3].startswith("resnets"):
        inner = _swap(m[4], _INVERSE_VAE_RESNET)
        return inner and f"{m[1]}.{level}.block.{m[3].split('.')[1]}.{inner}"
    return f"{m[1]}.{level}.{m[3].split('.')[0][:-2]}.{m[4]}"


def _openclip_ldm(tensors: Mapping[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    inverse_top = {new: old for old, new in _OPENCLIP_TOP.items()}
    inverse_layer = tuple((new, old) for old, new in _OPENCLIP_LAYER)
    out, unknown = {}, []
    for name, value in tensors.items():
        if name in inverse_top:
            out[inverse_top[name]] = value
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", name)
        qkv = m and re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m[2])
        if qkv:
            if qkv[1] == "q":
                parts = [tensors[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{qkv[2]}"] = np.concatenate(parts)
        elif m and (inner := _swap(m[2], inverse_layer)):
            out[f"transformer.resblocks.{m[1]}.{inner}"] = value
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"not diffusers text-encoder tensors: {unknown[:12]}")
    # The layer SD 2 skips (it conditions on the penultimate one), zero-filled, so that
    # loaders that drop OpenCLIP's last layer (this one, diffusers, ComfyUI) keep all of ours.
    last = f"transformer.resblocks.{layers - 1}."
    for key in [k for k in out if k.startswith(last)]:
        out[key.replace(last, f"transformer.resblocks.{layers}.")] = np.zeros_like(out[key])
    return out


def to_ldm(
    config: PipelineConfig, state_dicts: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """diffusers state dicts {component: {name: array}} -> one ldm-named state dict.

    The text encoder is written in OpenCLIP naming (SD 2) when its activation is gelu, else
    in CLIP naming (SD 1). VAE attention weights become 1x1 convs, as in the original files.
    """
    out: dict[str, np.ndarray] = {}
    unknown = []
    for name, value in state_dicts["unet"].items():
        ldm = _unet_ldm_name(name, config.unet)
        unknown += [name] if ldm is None else []
        out[f"{UNET}{ldm}"] = np.asarray(value)
    levels = len(config.vae.block_out_channels)
    for name, value in state_dicts["vae"].items():
        ldm, value = _vae_ldm_name(name, levels), np.asarray(value)
        unknown += [name] if ldm is None else []
        if ".mid.attn_1." in f".{ldm}" and value.ndim == 2:
            value = value[:, :, None, None]
        out[f"{VAE}{ldm}"] = value
    if unknown:
        raise CheckpointError(f"not diffusers UNet/VAE tensors: {unknown[:12]}")
    text = {
        (k if k.startswith("text_model.") else "text_model." + k): np.asarray(v)
        for k, v in state_dicts["text_encoder"].items()
        if not k.endswith("position_ids")
    }
    if config.text_encoder.hidden_act == "gelu":
        layers = config.text_encoder.num_hidden_layers
        out.update({OPENCLIP + k: v for k, v in _openclip_ldm(text, layers).items()})
    else:
        out.update({CLIP + k: v for k, v in text.items()})
    return out


def diffusers_configs(config: PipelineConfig) -> dict[str, dict]:
    """The JSON files of a diffusers folder for `config`: {"model_index", "scheduler", "unet",
    "vae", "text_encoder"} (the last three are `<component>/config.json`)."""
    plain = lambda obj: {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()
    }
    unet = {"_class_name": "UNet2DConditionModel", **plain(config.unet), "act_fn": "silu"}
    unet["attention_head_dim"] = unet.pop("num_attention_heads")  # diffusers' SD spelling
    levels = len(config.vae.block_out_channels)
    vae = {
        "_class_name": "AutoencoderKL",
        **plain(config.vae),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "act_fn": "silu",
    }
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **plain(config.text_encoder),
        "projection_dim": config.text_encoder.hidden_size,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    scheduler = dict(config.scheduler)
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler.get("_class_name", "PNDMScheduler")],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    return {
        "model_index": model_index,
        "scheduler": scheduler,
        "unet": unet,
        "vae": vae,
        "text_encoder": text,
    }


__all__ = [
    "CLIP",
    "OPENCLIP",
    "UNET",
    "VAE",
    "SafetensorsFile",
    "Source",
    "diffusers_configs",
    "diffusers_sources",
    "infer_config",
    "load_checkpoint",
    "load_single_file",
    "open_tensors",
    "read_diffusers_state_dicts",
    "to_ldm",
    "tokenizer_for",
]
