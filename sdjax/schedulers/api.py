"""`make`: one scheduler by name, for a config and a step count."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal, get_args

from sdjax.schedulers.base import Scheduler
from sdjax.schedulers.config import SchedulerConfig
from sdjax.schedulers.ddim import DDIM, PNDM
from sdjax.schedulers.dpm import DPMSolverPP2M
from sdjax.schedulers.euler import Euler, EulerAncestral

SchedulerName = Literal["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]
NAMES: tuple[str, ...] = get_args(SchedulerName)


def _dpmpp_2m_karras(name: str, cfg: SchedulerConfig, num_steps: int) -> Scheduler:
    return DPMSolverPP2M.build(name, dataclasses.replace(cfg, use_karras_sigmas=True), num_steps)


_BUILDERS: Mapping[str, Callable[[str, SchedulerConfig, int], Scheduler]] = MappingProxyType(
    {
        "ddim": DDIM.build,
        "pndm": PNDM.build,
        "euler": Euler.build,  # Karras σ when the config sets use_karras_sigmas
        "euler_a": EulerAncestral.build,
        "dpmpp_2m": DPMSolverPP2M.build,  # Karras σ when the config sets use_karras_sigmas
        "dpmpp_2m_karras": _dpmpp_2m_karras,
    }
)

# diffusers' class names, for name=None: the scheduler the checkpoint's config names.
CLASS_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "DDIMScheduler": "ddim",
        "PNDMScheduler": "pndm",
        "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler_a",
        "DPMSolverMultistepScheduler": "dpmpp_2m",
    }
)


def make(
    name: SchedulerName | None,
    config: SchedulerConfig | Mapping[str, Any] | str | os.PathLike | None,
    num_steps: int,
) -> Scheduler:
    """The scheduler `name` for `num_steps` inference steps.

    `config`: a `SchedulerConfig`, a parsed `scheduler_config.json`, a path (the json, its folder,
    or the checkpoint folder), or None for the SD 1.x config. `name=None` takes the scheduler the
    config's `_class_name` names. Raises ValueError for an unknown name, a step count outside
    [1, num_train_timesteps], or a config option we do not implement.
    """
    cfg = SchedulerConfig.load(config)
    if name is None:
        if cfg.class_name not in CLASS_NAMES:
            raise ValueError(
                f"scheduler class {cfg.class_name!r} from the config is unsupported; "
                f"pass a name, one of {NAMES}"
            )
        name = CLASS_NAMES[cfg.class_name]
    if name not in _BUILDERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {NAMES}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(f"{num_steps=} must be an int")
    if not 1 <= num_steps <= cfg.num_train_timesteps:
        raise ValueError(f"{num_steps=} must be in [1, {cfg.num_train_timesteps}]")
    return _BUILDERS[name](name, cfg, num_steps)
