"""Euler and Euler ancestral (Karras et al., 2022, k-diffusion's samplers) in σ space.

The sample lives at scale sqrt(σ² + 1): the model sees x / sqrt(σ² + 1), the loop starts from
noise · `init_noise_sigma`, and each step moves along the ODE's derivative (x - x̂0) / σ.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import Scheduler, at
from sdjax.schedulers.config import (
    SchedulerConfig,
    alphas_cumprod,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)

F32 = np.float32


def _euler_sigmas(cfg: SchedulerConfig, num_steps: int, *, karras: bool):
    """(timesteps float32 [S], σ float32 [S + 1] ending in the final σ)."""
    table = train_sigmas(alphas_cumprod(cfg))
    ts = spaced_timesteps(cfg, num_steps, round_linspace=False)
    sigmas = np.interp(ts, np.arange(len(table)), table)
    if karras:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        ts = sigma_to_t(sigmas, table)
    last = table[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
    return ts.astype(F32), np.concatenate([sigmas, [last]]).astype(F32)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Euler(Scheduler):
    sigmas: np.ndarray  # [S + 1]
    in_den: np.ndarray  # [S + 1] sqrt(σ² + 1): the model input's divisor
    v_out: np.ndarray  # [S + 1] -σ / sqrt(σ² + 1): x̂0 = v_out · v + x / v_den
    v_den: np.ndarray  # [S + 1] σ² + 1
    dt: np.ndarray  # [S] the step in σ

    @classmethod
    def _tables(cls, sigmas: np.ndarray) -> dict:
        den = sigmas**2 + F32(1)
        return {
            "sigmas": sigmas,
            "in_den": den ** F32(0.5),
            "v_out": -sigmas / den ** F32(0.5),
            "v_den": den,
        }

    @staticmethod
    def _init_sigma(cfg: SchedulerConfig, sigmas: np.ndarray) -> float:
        top = sigmas.max()
        if cfg.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float((top**2 + F32(1)) ** F32(0.5))

    @classmethod
    def build(cls, name: str, cfg: SchedulerConfig, num_steps: int) -> Euler:
        cfg = cfg.with_defaults(timestep_spacing="linspace")
        ts, sigmas = _euler_sigmas(cfg, num_steps, karras=cfg.use_karras_sigmas)
        return cls(
            name=name,
            config=cfg,
            num_inference_steps=num_steps,
            timesteps=ts,
            init_noise_sigma=cls._init_sigma(cfg, sigmas),
            dt=sigmas[1:] - sigmas[:-1],
            **cls._tables(sigmas),
        )

    def scale_model_input(self, sample, step_index):
        dt = jnp.promote_types(sample.dtype, jnp.float32)
        return (sample.astype(dt) / at(self.in_den, step_index)).astype(sample.dtype)

    def add_noise(self, original, noise, step_index):
        dt = jnp.promote_types(original.dtype, jnp.float32)
        out = original.astype(dt) + noise.astype(dt) * at(self.sigmas, step_index)
        return out.astype(original.dtype)

    def _denoised(self, i, model_output, x):
        sigma = at(self.sigmas, i)
        if self.config.prediction_type == "epsilon":
            return sigma, x - sigma * model_output
        return sigma, model_output * at(self.v_out, i) + x / at(self.v_den, i)

    def _step(self, state, i, model_output, x, noise):
        sigma, x0 = self._denoised(i, model_output, x)
        return x + (x - x0) / sigma * at(self.dt, i), state


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class EulerAncestral(Euler):
    """Euler to σ_down, then fresh noise of scale σ_up, with σ_down² + σ_up² = σ_next²."""

    needs_noise = True
    sigma_up: np.ndarray  # [S]

    @classmethod
    def build(cls, name: str, cfg: SchedulerConfig, num_steps: int) -> EulerAncestral:
        # diffusers' EulerAncestralDiscreteScheduler has no Karras or final-σ options.
        cfg = dataclasses.replace(
            cfg.with_defaults(timestep_spacing="linspace"),
            use_karras_sigmas=False,
            final_sigmas_type="zero",
        )
        ts, sigmas = _euler_sigmas(cfg, num_steps, karras=False)
        s_from, s_to = sigmas[:-1], sigmas[1:]
        up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** F32(0.5)
        down = (s_to**2 - up**2) ** F32(0.5)
        return cls(
            name=name,
            config=cfg,
            num_inference_steps=num_steps,
            timesteps=ts,
            init_noise_sigma=cls._init_sigma(cfg, sigmas),
            dt=down - s_from,
            sigma_up=up,
            **cls._tables(sigmas),
        )

    def _step(self, state, i, model_output, x, noise):
        sigma, x0 = self._denoised(i, model_output, x)
        x = x + (x - x0) / sigma * at(self.dt, i)
        return x + noise.astype(x.dtype) * at(self.sigma_up, i), state
