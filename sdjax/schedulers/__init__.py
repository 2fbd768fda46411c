"""Diffusion schedulers as pure functions over arrays, matching diffusers step for step.

    sched = schedulers.make("euler_a", "ckpt/", num_steps=20)

See `base.py` for the loop a pipeline runs, and `api.py` for the names.
"""

from sdjax.schedulers.api import CLASS_NAMES, NAMES, SchedulerName, make
from sdjax.schedulers.base import Scheduler, State
from sdjax.schedulers.config import SD15_CONFIG, SchedulerConfig

__all__ = [
    "CLASS_NAMES",
    "NAMES",
    "SD15_CONFIG",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerName",
    "State",
    "make",
]
