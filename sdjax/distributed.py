"""Multi-host readiness: `jax.distributed.initialize` when the environment describes a job.

Image generation needs no communication between images, so each host runs the pipeline on a
mesh of its own local devices (`StableDiffusion` shards over `jax.local_devices()`) and takes
one contiguous block of the global prompt list (`process_block`). The image at global index i
always uses the noise `fold_in(PRNGKey(seed), i)`, so a picture does not depend on how many
hosts or devices made it.

    info = distributed.initialize_from_env()       # before anything touches a device
    block = distributed.process_block(len(prompts))  # this host's prompts[block]

Detected environments, in order (`SDJAX_DISTRIBUTED=0` turns all of them off):
  explicit   JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
  slurm      srun with SLURM_NTASKS > 1 (jax reads SLURM_* itself)
  ompi       mpirun with OMPI_COMM_WORLD_SIZE > 1 (jax reads OMPI_* itself)
  forced     SDJAX_DISTRIBUTED=1: plain `jax.distributed.initialize()`, jax's own detection
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax

logger = logging.getLogger(__name__)

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Info:
    """How this process joined (or did not join) a multi-process job."""

    method: str | None  # "explicit", "slurm", "ompi", "forced", or None: one process
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> tuple[str | None, dict]:
    """(method, keyword arguments of `jax.distributed.initialize`) for an environment."""
    env = os.environ if env is None else env
    switch = env.get("SDJAX_DISTRIBUTED", "").strip().lower()
    if switch in ("0", "false", "off"):
        return None, {}
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [name for name in _EXPLICIT if name not in env]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set all of "
                f"{', '.join(_EXPLICIT)} (or none of them)"
            )
        kwargs = {
            "coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
            "num_processes": _int_env(env, "JAX_NUM_PROCESSES"),
            "process_id": _int_env(env, "JAX_PROCESS_ID"),
        }
        return "explicit", kwargs
    if (
        "SLURM_JOB_ID" in env
        and "SLURM_STEP_NODELIST" in env
        and int(env.get("SLURM_NTASKS", 1)) > 1
    ):
        return "slurm", {}
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
        return "ompi", {}
    if switch in ("1", "true", "on"):
        return "forced", {}
    return None, {}


def initialize_from_env(env: Mapping[str, str] | None = None) -> Info:
    """Calls `jax.distributed.initialize` once if `env` (default os.environ) describes a job.

    Must run before the first use of a device. Calling it again is harmless.
    """
    method, kwargs = detect(env)
    if method is not None and not jax.distributed.is_initialized():
        logger.info("jax.distributed.initialize(%s) [%s]", kwargs, method)
        jax.distributed.initialize(**kwargs)
    elif method is None and jax.distributed.is_initialized():
        method = "already"
    return Info(
        method=method,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
    )


def process_block(
    n: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """This process's contiguous block of n items; blocks differ in size by at most one."""
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= p < count:
        raise ValueError(f"{p=} must be in [0, {count=})")
    base, extra = divmod(n, count)
    start = p * base + min(p, extra)
    return slice(start, start + base + (p < extra))
