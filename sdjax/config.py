"""Model configs as frozen dataclasses, parsed from a diffusers-layout checkpoint's config.json.

Only the fields the models use are kept. Every SD 1.x / 2.x variant loads by its own config
files; the named presets below exist for the no-checkpoint default and for tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from sdjax.schedulers.config import SD15_CONFIG


def _read_json(source: os.PathLike | str | Mapping) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    path = pathlib.Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None


def _per_block(value, n: int, name: str) -> tuple:
    """diffusers lets some fields be one value or one per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields used by the SD text encoder."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD1: quick_gelu (OpenAI CLIP); SD2: gelu (OpenCLIP)
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, source) -> CLIPTextConfig:
        raw = _read_json(source)
        if "text_config" in raw:  # a full CLIPConfig
            raw = raw["text_config"]
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """diffusers' UNet2DConditionModel fields used by SD 1.x / 2.x."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    cross_attention_dim: int = 768
    # Heads per block. diffusers' SD configs store this in `attention_head_dim` (a historical
    # misnomer); `num_attention_heads`, when set, takes precedence, as in diffusers.
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    upcast_attention: bool = False  # attention runs with float32 softmax in every path anyway

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels differ in length"
            )
        for c, h in zip(self.block_out_channels, self.num_attention_heads, strict=True):
            if c % h:
                raise ValueError(f"block channels {c} not divisible by {h} heads")

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(
            c // h for c, h in zip(self.block_out_channels, self.num_attention_heads, strict=True)
        )

    @classmethod
    def from_json(cls, source) -> UNetConfig:
        raw = _read_json(source)
        n = len(raw.get("block_out_channels", cls.block_out_channels))
        supported_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
        supported_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
        for key, ok in (("down_block_types", supported_down), ("up_block_types", supported_up)):
            bad = set(raw.get(key, ())) - ok
            if bad:
                raise ValueError(f"unsupported UNet {key}: {sorted(bad)} (supported: {sorted(ok)})")
        for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim"):
            if raw.get(key) is not None:
                raise ValueError(
                    f"unsupported UNet option {key}={raw[key]!r} (SD 1.x/2.x have none)"
                )
        heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)
        kwargs: dict[str, Any] = {
            f.name: raw[f.name]
            for f in dataclasses.fields(cls)
            if f.name in raw and f.name != "num_attention_heads"
        }
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        kwargs["num_attention_heads"] = _per_block(heads, n, "num_attention_heads")
        kwargs["transformer_layers_per_block"] = _per_block(
            raw.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
        )
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """diffusers' AutoencoderKL fields used by SD."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, source) -> VAEConfig:
        raw = _read_json(source)
        for key, ok in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            bad = set(raw.get(key, ())) - {ok}
            if bad:
                raise ValueError(f"unsupported VAE {key}: {sorted(bad)} (supported: {ok})")
        if raw.get("shift_factor") not in (None, 0, 0.0):
            raise ValueError("VAE shift_factor is not supported (SD 1.x/2.x have none)")
        kwargs = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The three models plus the scheduler's raw config (parsed by `sdjax.schedulers`)."""

    name: str
    text_encoder: CLIPTextConfig
    unet: UNetConfig
    vae: VAEConfig
    scheduler: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, hash=False, compare=False
    )

    @property
    def default_resolution(self) -> int:
        return self.unet.sample_size * self.vae.downscale

    @classmethod
    def from_folder(cls, folder: os.PathLike | str) -> PipelineConfig:
        folder = pathlib.Path(folder)
        scheduler_path = folder / "scheduler" / "scheduler_config.json"
        return cls(
            name=folder.name,
            text_encoder=CLIPTextConfig.from_json(folder / "text_encoder"),
            unet=UNetConfig.from_json(folder / "unet"),
            vae=VAEConfig.from_json(folder / "vae"),
            scheduler=_read_json(scheduler_path) if scheduler_path.exists() else {},
        )


# The scheduler config SD checkpoints ship (no timestep_spacing key: each scheduler class then
# uses its own default, as diffusers does). One source: sdjax.schedulers.
_SD_SCHEDULER = dict(SD15_CONFIG)

_SD2_TEXT = CLIPTextConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
)
_SD2_UNET = dict(
    cross_attention_dim=1024, num_attention_heads=(5, 10, 20, 20), use_linear_projection=True
)

PRESETS: dict[str, PipelineConfig] = {
    "sd15": PipelineConfig(
        name="sd15",
        text_encoder=CLIPTextConfig(),
        unet=UNetConfig(),
        vae=VAEConfig(),
        scheduler=_SD_SCHEDULER,
    ),
    "sd21": PipelineConfig(
        name="sd21",
        text_encoder=_SD2_TEXT,
        unet=UNetConfig(sample_size=96, upcast_attention=True, **_SD2_UNET),
        vae=VAEConfig(sample_size=768),
        scheduler={
            **_SD_SCHEDULER,
            "_class_name": "DDIMScheduler",
            "prediction_type": "v_prediction",
        },
    ),
    "sd21-base": PipelineConfig(
        name="sd21-base",
        text_encoder=_SD2_TEXT,
        unet=UNetConfig(sample_size=64, **_SD2_UNET),
        vae=VAEConfig(),
        scheduler={**_SD_SCHEDULER, "_class_name": "DDIMScheduler"},
    ),
    # Small but structurally complete: two levels, cross-attention, non-power-of-two head dims.
    "tiny": PipelineConfig(
        name="tiny",
        text_encoder=CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            num_attention_heads=(4, 4),
            transformer_layers_per_block=(1, 1),
            norm_num_groups=8,
        ),
        vae=VAEConfig(
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16
        ),
        scheduler=_SD_SCHEDULER,
    ),
}


def preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
