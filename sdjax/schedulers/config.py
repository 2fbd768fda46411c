"""The scheduler config (`scheduler/scheduler_config.json`) and the noise-schedule tables it implies.

A checkpoint names one scheduler class, but any of ours can be built from its config, as
diffusers' `from_config` does: fields the chosen scheduler does not read are ignored, and fields
the file leaves out take the chosen scheduler's own default (`None` below stands for that).
Options we do not implement raise instead of being ignored.

The tables are computed in float32 the way diffusers computes them in PyTorch, so that
`alphas_cumprod` matches it bit for bit; everything else is derived in numpy, once per
`make(...)`, and enters the traced step functions as constants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

# The scheduler config shipped with SD 1.x checkpoints (runwayml/stable-diffusion-v1-5). Note that
# it sets no `timestep_spacing`, so each scheduler uses its own default.
SD15_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
)

# Options that change the math in ways we do not implement, with the value that means "off".
_REFUSED: Mapping[str, Any] = MappingProxyType(
    {
        "thresholding": False,
        "rescale_betas_zero_snr": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "timestep_type": "discrete",
        "interpolation_type": "linear",
        "sigma_min": None,
        "sigma_max": None,
        "variance_type": None,
        "lambda_min_clipped": -math.inf,
    }
)

_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTIONS = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """diffusers' scheduler config fields read by our schedulers. Hashable."""

    class_name: str | None = None
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # linear | scaled_linear (ignored when trained_betas is set)
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    steps_offset: int = 0
    timestep_spacing: str | None = None  # leading | trailing | linspace; None: the class default
    set_alpha_to_one: bool | None = None  # DDIM, PNDM; None: the class default
    clip_sample: bool | None = None  # DDIM; None: the class default (True)
    clip_sample_range: float = 1.0
    skip_prk_steps: bool | None = None  # PNDM; None: the class default (False: unsupported)
    use_karras_sigmas: bool = False  # Euler, DPM-Solver
    final_sigmas_type: str = "zero"  # Euler, DPM-Solver: zero | sigma_min
    solver_order: int = 2  # DPM-Solver: 1 | 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"  # midpoint | heun
    lower_order_final: bool = True
    euler_at_final: bool = False

    def __post_init__(self):
        if self.trained_betas is None and self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(
                f"unsupported beta_schedule={self.beta_schedule!r} "
                "(supported: 'linear', 'scaled_linear', or trained_betas)"
            )
        if self.prediction_type not in _PREDICTIONS:
            raise ValueError(
                f"unsupported prediction_type={self.prediction_type!r} (supported: {_PREDICTIONS})"
            )
        if self.timestep_spacing not in (None, *_SPACINGS):
            raise ValueError(
                f"unsupported timestep_spacing={self.timestep_spacing!r} (supported: {_SPACINGS})"
            )
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"unsupported final_sigmas_type={self.final_sigmas_type!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"{self.num_train_timesteps=} must be at least 2")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(self.trained_betas)} entries for "
                f"{self.num_train_timesteps=}"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SchedulerConfig:
        """Read a parsed `scheduler_config.json`. Unknown keys are ignored; refused options raise."""
        for key, off in _REFUSED.items():
            value = raw.get(key, off)
            if value != off and not (value is None and off is False):
                raise ValueError(f"unsupported scheduler option {key}={value!r} (only {off!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"class_name"}
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(class_name=raw.get("_class_name"), **kwargs)

    @classmethod
    def load(cls, source: os.PathLike | str | Mapping | SchedulerConfig | None) -> SchedulerConfig:
        """A config from a json file, a `scheduler/` folder, a checkpoint folder or a dict.

        None gives the SD 1.x config (`SD15_CONFIG`)."""
        if source is None:
            return cls.from_dict(SD15_CONFIG)
        if isinstance(source, SchedulerConfig):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = pathlib.Path(source)
        for candidate in (
            path,
            path / "scheduler_config.json",
            path / "scheduler" / "scheduler_config.json",
        ):
            if candidate.is_file():
                try:
                    return cls.from_dict(json.loads(candidate.read_text()))
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"scheduler config {candidate} is not valid JSON: {e}"
                    ) from None
        raise FileNotFoundError(
            f"no scheduler config at {path} (looked for the file itself, "
            "scheduler_config.json and scheduler/scheduler_config.json)"
        )

    def with_defaults(self, **defaults) -> SchedulerConfig:
        """Fill the fields left as None with a scheduler class's defaults."""
        return dataclasses.replace(
            self, **{k: v for k, v in defaults.items() if getattr(self, k) is None}
        )


# --- noise-schedule tables ------------------------------------------------------------------


def _linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
    """float32 linspace as PyTorch computes it (float32 step, fused multiply-add, both ends)."""
    f32 = np.float32
    step = np.float64((f32(stop) - f32(start)) / f32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(f32(start)) + i * step
    hi = np.float64(f32(stop)) - (n - 1 - i) * step
    return np.where(i < n // 2, lo, hi).astype(f32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """ᾱ_t for t in [0, T), float32 [T]."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, np.float32)
    elif cfg.beta_schedule == "linear":
        betas = _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    else:  # scaled_linear
        betas = _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), float32 [T], increasing in t."""
    return ((np.float32(1) - ac) / ac) ** np.float32(0.5)


def spaced_timesteps(cfg: SchedulerConfig, num_steps: int, *, round_linspace: bool) -> np.ndarray:
    """The S inference timesteps, decreasing, float64 (DDIM, PNDM and Euler spacing)."""
    n, s = cfg.num_train_timesteps, num_steps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, s)
        ts = ts.round() if round_linspace else ts.astype(np.float32).astype(np.float64)
        return ts[::-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(s) * (n // s))[::-1].astype(np.float64) + cfg.steps_offset
    return np.round(np.arange(n, 0, -n / s)) - 1  # trailing


def karras_sigmas(lo: float, hi: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022): S values of σ from `hi` down to `lo`, even in σ^(1/ρ), float64."""
    lo, hi = float(lo), float(hi)
    ramp = np.linspace(0, 1, num_steps)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def sigma_to_t(sigma: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The fractional train timestep of each σ: linear interpolation in log σ, float64."""
    log_table = np.log(sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(sigmas) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)
