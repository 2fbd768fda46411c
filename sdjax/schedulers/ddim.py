"""DDIM (Song et al., 2020) with η = 0, and PNDM's PLMS (Liu et al., 2022) as SD 1.x runs it.

Both live on the discrete ᾱ_t table and take the model's timestep by value: DDIM goes from t to
t - T // S whatever the spacing, and reads ᾱ at the end as `final_alpha_cumprod` (1, or ᾱ_0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.base import Scheduler, at
from sdjax.schedulers.config import SchedulerConfig, alphas_cumprod, spaced_timesteps

F32 = np.float32


def _alpha_pair(ac: np.ndarray, t: np.ndarray, prev: np.ndarray, final: np.float32):
    """(ᾱ_t, ᾱ_prev) float32, ᾱ_prev = `final` where prev < 0."""
    a_t = ac[np.clip(t, 0, len(ac) - 1)]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, len(ac) - 1)], final).astype(F32)
    return a_t, a_prev


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AlphaScheduler(Scheduler):
    """A scheduler on the ᾱ table: noising is sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε."""

    sqrt_ac: np.ndarray  # [N] sqrt(ᾱ_t) at each call's timestep
    sqrt_1m_ac: np.ndarray  # [N] sqrt(1 - ᾱ_t)

    @staticmethod
    def _noise_tables(ac: np.ndarray, timesteps: np.ndarray) -> dict:
        if timesteps.max() >= len(ac):  # diffusers fails with an IndexError in `step`
            raise ValueError(
                f"timestep {timesteps.max()} is past the schedule's last ({len(ac) - 1}): "
                "too many 'leading' steps for this steps_offset"
            )
        a = ac[timesteps]
        return {"sqrt_ac": a ** F32(0.5), "sqrt_1m_ac": (F32(1) - a) ** F32(0.5)}

    def add_noise(self, original, noise, step_index):
        dt = jnp.promote_types(original.dtype, jnp.float32)
        out = at(self.sqrt_ac, step_index) * original.astype(dt)
        out = out + at(self.sqrt_1m_ac, step_index) * noise.astype(dt)
        return out.astype(original.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class DDIM(AlphaScheduler):
    sqrt_a: np.ndarray  # [S] sqrt(ᾱ_t)
    sqrt_b: np.ndarray  # [S] sqrt(1 - ᾱ_t)
    sqrt_a_prev: np.ndarray  # [S] sqrt(ᾱ_prev)
    sqrt_b_prev: np.ndarray  # [S] sqrt(1 - ᾱ_prev): the direction to x_t (η = 0)

    @classmethod
    def build(cls, name: str, cfg: SchedulerConfig, num_steps: int) -> DDIM:
        cfg = cfg.with_defaults(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True)
        ac = alphas_cumprod(cfg)
        ts = spaced_timesteps(cfg, num_steps, round_linspace=True).astype(np.int64)
        final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
        a_t, a_prev = _alpha_pair(ac, ts, ts - cfg.num_train_timesteps // num_steps, final)
        half = F32(0.5)
        return cls(
            name=name,
            config=cfg,
            num_inference_steps=num_steps,
            timesteps=ts.astype(np.int32),
            init_noise_sigma=1.0,
            sqrt_a=a_t**half,
            sqrt_b=(F32(1) - a_t) ** half,
            sqrt_a_prev=a_prev**half,
            sqrt_b_prev=(F32(1) - a_prev) ** half,
            **cls._noise_tables(ac, ts),
        )

    def _step(self, state, i, model_output, x, noise):
        sqrt_a, sqrt_b = at(self.sqrt_a, i), at(self.sqrt_b, i)
        if self.config.prediction_type == "epsilon":
            x0 = (x - sqrt_b * model_output) / sqrt_a
            eps = model_output
        else:  # v_prediction
            x0 = sqrt_a * x - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * x
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = jnp.clip(x0, -r, r)
        return at(self.sqrt_a_prev, i) * x0 + at(self.sqrt_b_prev, i) * eps, state


def _plms_combine(count: jax.Array, n: jax.Array, m: jax.Array, ets: jax.Array) -> jax.Array:
    """PLMS's multistep estimate. ets[0] is the newest stored output, n how many are stored."""
    branches = (
        lambda: m,  # first call: plain
        lambda: (m + ets[0]) / 2,  # second call: the Heun-like correction of the first step
        lambda: (3 * ets[0] - ets[1]) / 2,
        lambda: (23 * ets[0] - 16 * ets[1] + 5 * ets[2]) / 12,
        lambda: (1 / 24) * (55 * ets[0] - 59 * ets[1] + 37 * ets[2] - 9 * ets[3]),
    )
    case = jnp.where(count <= 1, count, n)
    return jax.lax.switch(case, branches)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PNDM(AlphaScheduler):
    """PNDM with `skip_prk_steps=True`: linear multistep (PLMS) only.

    For S > 1 steps the model is called S + 1 times: the list repeats the second timestep, and the
    second call redoes the first step (from the same sample, t → t - T // S) with the average of the
    two outputs. Tables are indexed [variant, step]: variant 1 is that second call."""

    coeff_x: np.ndarray  # [2, N] sqrt(ᾱ_prev / ᾱ_t)
    coeff_diff: np.ndarray  # [2, N] ᾱ_prev - ᾱ_t
    coeff_den: np.ndarray  # [2, N] ᾱ_t sqrt(1 - ᾱ_prev) + sqrt(ᾱ_t (1 - ᾱ_t) ᾱ_prev)
    v_a: np.ndarray  # [2, N] sqrt(ᾱ_t), for v → ε
    v_b: np.ndarray  # [2, N] sqrt(1 - ᾱ_t)

    @classmethod
    def build(cls, name: str, cfg: SchedulerConfig, num_steps: int) -> PNDM:
        cfg = cfg.with_defaults(
            timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=False
        )
        if not cfg.skip_prk_steps:
            raise ValueError(
                "PNDM with skip_prk_steps=False (Runge-Kutta warm-up steps) is unsupported; "
                "SD checkpoints set skip_prk_steps=true"
            )
        ac = alphas_cumprod(cfg)
        base = spaced_timesteps(cfg, num_steps, round_linspace=True)[::-1].astype(np.int64)
        ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        ratio = cfg.num_train_timesteps // num_steps
        final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
        tables = {k: [] for k in ("coeff_x", "coeff_diff", "coeff_den", "v_a", "v_b")}
        for t, prev in ((ts, ts - ratio), (ts + ratio, ts)):  # variant 0, variant 1
            a_t, a_prev = _alpha_pair(ac, t, prev, final)
            b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
            tables["coeff_x"].append((a_prev / a_t) ** F32(0.5))
            tables["coeff_diff"].append(a_prev - a_t)
            tables["coeff_den"].append(a_t * b_prev ** F32(0.5) + (a_t * b_t * a_prev) ** F32(0.5))
            tables["v_a"].append(a_t ** F32(0.5))
            tables["v_b"].append(b_t ** F32(0.5))
        return cls(
            name=name,
            config=cfg,
            num_inference_steps=num_steps,
            timesteps=ts.astype(np.int32),
            init_noise_sigma=1.0,
            **{k: np.stack(v) for k, v in tables.items()},
            **cls._noise_tables(ac, ts),
        )

    def init_state(self, sample):
        state = super().init_state(sample)
        dt = jnp.promote_types(sample.dtype, jnp.float32)
        state["ets"] = jnp.zeros((4, *sample.shape), dt)  # newest first
        state["cur_sample"] = jnp.zeros(sample.shape, dt)
        return state

    def _step(self, state, i, model_output, x, noise):
        count, ets = state["count"], state["ets"]
        second = count == 1
        # Every call but the second stores its output; at most four are kept.
        ets = jnp.where(second, ets, jnp.concatenate([model_output[None], ets[:3]]))
        n = jnp.minimum(jnp.maximum(count, 1), 4)
        m = _plms_combine(count, n, model_output, ets)
        cur_sample = jnp.where(count == 0, x, state["cur_sample"])
        x = jnp.where(second, cur_sample, x)
        v = second.astype(jnp.int32)
        if self.config.prediction_type == "v_prediction":
            m = at(self.v_a, (v, i)) * m + at(self.v_b, (v, i)) * x
        prev = at(self.coeff_x, (v, i)) * x - at(self.coeff_diff, (v, i)) * m / at(
            self.coeff_den, (v, i)
        )
        return prev, {**state, "ets": ets, "cur_sample": cur_sample}
