"""DPM-Solver++ 2M (Lu et al., 2022): multistep, second order, in data (x̂0) prediction.

With α_t = 1 / sqrt(σ² + 1), σ_t = σ α_t and λ = log(α_t / σ_t), one step from s0 to t is

    x_t = (σ_t / σ_s0) x - α_t (e^{-h} - 1) D0 [- ½ α_t (e^{-h} - 1) D1]      h = λ_t - λ_s0

with D0 = x̂0 now and D1 = (x̂0 now - x̂0 before) · h / h_prev. The first call, and the last one
when the schedule ends at σ = 0 (or has fewer than 15 steps), are first order.
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
    train_sigmas,
)

F32 = np.float32


def _dpm_timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
    """DPM-Solver's own spacing (it divides into S + 1 parts for linspace and leading)."""
    n, s = cfg.num_train_timesteps, num_steps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, s + 1).round()[::-1][:-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(s + 1) * (n // (s + 1)))[::-1][:-1] + cfg.steps_offset
    return np.arange(n, 0, -n / s).round() - 1  # trailing


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class DPMSolverPP2M(Scheduler):
    alpha: np.ndarray  # [S + 1] α_t at each σ
    sigma: np.ndarray  # [S + 1] σ_t = σ α_t
    coeff_x: np.ndarray  # [S] σ_t / σ_s0
    coeff_d0: np.ndarray  # [S] α_t (e^{-h} - 1)
    coeff_d1: np.ndarray  # [S] the signed coefficient of D1 (midpoint or Heun)
    inv_r0: np.ndarray  # [S] h / h_prev (0 where unused)
    second_order: np.ndarray  # [S] bool: the step may be second order

    @classmethod
    def build(cls, name: str, cfg: SchedulerConfig, num_steps: int) -> DPMSolverPP2M:
        cfg = cfg.with_defaults(timestep_spacing="linspace")
        if cfg.algorithm_type != "dpmsolver++":
            raise ValueError(
                f"unsupported algorithm_type={cfg.algorithm_type!r} (only 'dpmsolver++')"
            )
        if cfg.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"unsupported solver_type={cfg.solver_type!r} (midpoint, heun)")
        if cfg.solver_order not in (1, 2):
            raise ValueError(f"unsupported solver_order={cfg.solver_order} (1 or 2)")
        table = train_sigmas(alphas_cumprod(cfg))
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(table[0], table[-1], num_steps)
            ts = sigma_to_t(sigmas, table).round()
        else:
            ts = _dpm_timesteps(cfg, num_steps)
            sigmas = np.interp(ts, np.arange(len(table)), table)
        last = table[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        s = np.concatenate([sigmas, [last]]).astype(F32)

        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = F32(1) / (s**2 + F32(1)) ** F32(0.5)
            sigma = s * alpha
            lam = np.log(alpha) - np.log(sigma)  # +inf at σ = 0
            h = lam[1:] - lam[:-1]
            em1 = np.exp(-h) - F32(1)
            coeff_x = sigma[1:] / sigma[:-1]
            coeff_d0 = alpha[1:] * em1
            if cfg.solver_type == "midpoint":
                coeff_d1 = -(F32(0.5) * coeff_d0)
            else:
                coeff_d1 = alpha[1:] * (em1 / h + F32(1))
            h_prev = np.concatenate([[np.nan], h[:-1]]).astype(F32)
            inv_r0 = F32(1) / (h_prev / h)
        steps = np.arange(num_steps)
        final_first = (
            cfg.euler_at_final
            or (cfg.lower_order_final and num_steps < 15)
            or cfg.final_sigmas_type == "zero"
        )
        second = (steps > 0) & ~((steps == num_steps - 1) & final_first) & (cfg.solver_order == 2)

        def used(a):  # zero where a step is first order (there h_prev or h may be infinite)
            return np.where(second, a, 0).astype(F32)

        return cls(
            name=name,
            config=cfg,
            num_inference_steps=num_steps,
            timesteps=ts.astype(np.int32),
            init_noise_sigma=1.0,
            alpha=alpha,
            sigma=sigma,
            coeff_x=coeff_x,
            coeff_d0=coeff_d0,
            coeff_d1=used(coeff_d1),
            inv_r0=used(inv_r0),
            second_order=second,
        )

    def init_state(self, sample):
        state = super().init_state(sample)
        state["prev_x0"] = jnp.zeros(sample.shape, jnp.promote_types(sample.dtype, jnp.float32))
        return state

    def add_noise(self, original, noise, step_index):
        dt = jnp.promote_types(original.dtype, jnp.float32)
        out = at(self.alpha, step_index) * original.astype(dt)
        out = out + at(self.sigma, step_index) * noise.astype(dt)
        return out.astype(original.dtype)

    def _step(self, state, i, model_output, x, noise):
        alpha_s, sigma_s = at(self.alpha, i), at(self.sigma, i)
        if self.config.prediction_type == "epsilon":
            x0 = (x - sigma_s * model_output) / alpha_s
        else:  # v_prediction
            x0 = alpha_s * x - sigma_s * model_output
        first = at(self.coeff_x, i) * x - at(self.coeff_d0, i) * x0
        d1 = at(self.inv_r0, i) * (x0 - state["prev_x0"])
        second = first + at(self.coeff_d1, i) * d1
        use_second = (state["count"] >= 1) & at(self.second_order, i)
        return jnp.where(use_second, second, first), {**state, "prev_x0": x0}
