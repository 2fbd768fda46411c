"""The `Scheduler` base: a frozen object of precomputed per-step constants and pure step functions.

Every method is a pure function of arrays, so a whole denoising loop traces into one `lax.scan`:

    sched = schedulers.make("dpmpp_2m", config, num_steps=20)
    start = sched.start_index(strength) if img2img else 0
    x = noise * sched.init_noise_sigma            # img2img: sched.add_noise(x0, noise, start)
    state = sched.init_state(x)

    def body(carry, xs):
        x, state = carry
        i, step_noise = xs                         # step_noise: only if sched.needs_noise
        eps = unet(sched.scale_model_input(x, i), sched.timestep(i), ...)
        x, state = sched.step(state, i, eps, x, noise=step_noise)
        return (x, state), None

    idx = jnp.arange(start, len(sched.timesteps))
    (x, _), _ = lax.scan(body, (x, state), (idx, per_step_noise))

`len(sched.timesteps)` is the number of model calls; it is `num_steps`, except for PNDM
(`num_steps + 1` when `num_steps > 1`, as in diffusers). `step_index` may be a traced int32;
the state holds what multistep methods remember between calls, and counts the calls made
since `init_state`, which is what lets img2img start in the middle of the schedule.

The arithmetic runs in float32 (or wider) whatever the sample's dtype, and `step` returns the
sample's dtype, so the scan carry keeps one type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.config import SchedulerConfig

State = dict[str, jax.Array]


def at(table: np.ndarray, i) -> jax.Array:
    """table[i] for a numpy table of per-step constants and a static or traced index."""
    return jnp.asarray(table)[i]


def compute_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Scheduler:
    """One scheduler for one step count. Hashable by (name, config, num_inference_steps), so it can
    be a static argument of `jax.jit`."""

    name: str
    config: SchedulerConfig  # with the class defaults filled in
    num_inference_steps: int
    timesteps: np.ndarray  # [N] the timestep the model sees at each call (int32, or float32)
    init_noise_sigma: float
    needs_noise: ClassVar[bool] = False  # True: `step` takes fresh N(0, 1) noise each call

    def _key(self) -> tuple:
        return (type(self), self.name, self.config, self.num_inference_steps)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Scheduler) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def timestep(self, step_index) -> jax.Array:
        """The model's timestep at `step_index` (static or traced)."""
        return at(self.timesteps, step_index)

    def init_state(self, sample: jax.Array) -> State:
        """The loop state before the first call of `step`."""
        del sample
        return {"count": jnp.zeros((), jnp.int32)}

    def scale_model_input(self, sample: jax.Array, step_index) -> jax.Array:
        """The model's input at `step_index` (the identity except for the σ-space schedulers)."""
        del step_index
        return sample

    def step(
        self,
        state: State,
        step_index,
        model_output: jax.Array,
        sample: jax.Array,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        """One reverse step: (the sample after this call, the new state). `noise` is read only when
        `needs_noise`; it is then required, with the sample's shape."""
        x = sample.astype(compute_dtype(sample))
        if self.needs_noise and noise is None:
            raise ValueError(f"scheduler {self.name!r} needs `noise` (N(0, 1), the sample's shape)")
        prev, state = self._step(state, step_index, model_output.astype(x.dtype), x, noise)
        state = {**state, "count": state["count"] + 1}
        return prev.astype(sample.dtype), state

    def _step(self, state, i, model_output, x, noise):
        raise NotImplementedError

    def add_noise(self, original: jax.Array, noise: jax.Array, step_index) -> jax.Array:
        """`original` noised to the level of `step_index`, where an img2img loop starts."""
        raise NotImplementedError

    def start_index(self, strength: float) -> int:
        """Where img2img's loop starts for `strength` in (0, 1], as diffusers' `get_timesteps`."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"{strength=} must be in [0, 1]")
        s = self.num_inference_steps
        start = s - min(int(s * strength), s)
        if start >= len(self.timesteps):
            raise ValueError(
                f"{strength=} with {s} steps leaves no denoising step (need strength >= {1 / s:g})"
            )
        return start

    def timesteps_for_strength(self, strength: float) -> np.ndarray:
        """The timesteps img2img runs for `strength` (`timesteps[start_index(strength):]`)."""
        return self.timesteps[self.start_index(strength) :]
