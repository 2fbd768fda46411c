"""Schedulers against diffusers' PyTorch schedulers: timesteps, and the sample after every step.

Our loop is the one a pipeline runs: one jitted `lax.scan` over the steps (compiled once per
scheduler and step count), fed the same random model outputs and noise as diffusers' loop.
"""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import schedulers

SD15 = dict(schedulers.SD15_CONFIG)  # no timestep_spacing: each class's default applies
SD15_LEADING = {**SD15, "timestep_spacing": "leading"}
V_TRAILING = {  # SD 2.x-like (v-prediction), with trailing spacing
    **SD15,
    "_class_name": "DDIMScheduler",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}
CONFIGS = {"sd15": SD15, "sd15_leading": SD15_LEADING, "v_trailing": V_TRAILING}
SHAPE = (2, 4, 8, 8)
# fp32 relative error (max |ours - diffusers| / max |diffusers|) allowed after each step.
RTOL = 1e-5


def _diffusers_scheduler(name: str, raw: dict):
    pytest.importorskip("torch")
    d = pytest.importorskip("diffusers")
    cls, extra = {
        "ddim": (d.DDIMScheduler, {}),
        "pndm": (d.PNDMScheduler, {}),
        "euler": (d.EulerDiscreteScheduler, {}),
        "euler_a": (d.EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m": (d.DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_karras": (d.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    }[name]
    return cls.from_config({**raw, **extra})


def _run_diffusers(ref, timesteps, x, model_outputs, noises, monkeypatch):
    """diffusers' loop; returns (model inputs, samples) after each step, float32 numpy."""
    import torch
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea

    noise_iter = iter(noises)
    monkeypatch.setattr(ea, "randn_tensor", lambda *a, **k: torch.from_numpy(next(noise_iter)))
    x = torch.from_numpy(x)
    inputs, samples = [], []
    for t, mo in zip(timesteps, model_outputs, strict=True):
        inputs.append(ref.scale_model_input(x, t).numpy())
        x = ref.step(torch.from_numpy(mo), t, x, return_dict=False)[0]
        samples.append(x.numpy())
    return np.stack(inputs), np.stack(samples)


def _run_ours(sched: schedulers.Scheduler, x, model_outputs, noises, start: int = 0):
    """The pipeline's loop: one jitted scan over the steps from `start`."""

    @jax.jit
    def loop(x, model_outputs, noises):
        def body(carry, xs):
            x, state = carry
            i, mo, noise = xs
            x_in = sched.scale_model_input(x, i)
            x, state = sched.step(state, i, mo, x, noise=noise)
            return (x, state), (x_in, x)

        idx = jnp.arange(start, len(sched.timesteps))
        _, out = jax.lax.scan(body, (x, sched.init_state(x)), (idx, model_outputs, noises))
        return out

    return jax.tree.map(np.asarray, loop(x, model_outputs, noises))


def _assert_close(ours, ref, what):
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        assert err <= RTOL, f"{what}: step {k}: relative error {err:.2e} > {RTOL:g}"


def _compare_loop(name, raw, steps, rng, monkeypatch, strength=None):
    sched = schedulers.make(name, raw, steps)
    ref = _diffusers_scheduler(name, raw)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(sched.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)

    x = rng.standard_normal(SHAPE).astype(np.float32)
    start, timesteps = 0, ref.timesteps
    if strength is None:
        x = x_ref = x * np.float32(sched.init_noise_sigma)
    else:  # img2img: diffusers' get_timesteps (which also sets the begin index) and add_noise
        from diffusers import StableDiffusionImg2ImgPipeline

        fake_pipe = types.SimpleNamespace(scheduler=ref)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
            fake_pipe, steps, strength, "cpu"
        )
        start = sched.start_index(strength)
        np.testing.assert_array_equal(sched.timesteps_for_strength(strength), timesteps.numpy())
        import torch

        noise = rng.standard_normal(SHAPE).astype(np.float32)
        t0 = timesteps[:1].repeat(SHAPE[0])
        x_ref = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), t0).numpy()
        x = np.asarray(sched.add_noise(jnp.asarray(x), jnp.asarray(noise), start))
        _assert_close([x], [x_ref], "add_noise")
    n = len(timesteps)
    model_outputs = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    noises = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    ins, xs = _run_ours(sched, x, model_outputs, noises, start)
    ref_ins, ref_xs = _run_diffusers(ref, timesteps, x_ref, model_outputs, noises, monkeypatch)
    _assert_close(ins, ref_ins, f"{name} scale_model_input")
    _assert_close(xs, ref_xs, f"{name} sample")


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_matches_diffusers(name, config, steps, rng, monkeypatch):
    _compare_loop(name, CONFIGS[config], steps, rng, monkeypatch)


@pytest.mark.parametrize(
    "name, raw, steps",
    [
        ("ddim", {k: v for k, v in SD15.items() if k != "clip_sample"}, 4),  # DDIM's clip default
        ("ddim", {**SD15, "set_alpha_to_one": True, "timestep_spacing": "linspace"}, 7),
        ("pndm", {**SD15, "timestep_spacing": "linspace"}, 7),
        ("euler", {**SD15, "use_karras_sigmas": True}, 20),
        ("euler", {**V_TRAILING, "final_sigmas_type": "sigma_min"}, 4),
        ("dpmpp_2m", {**SD15, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 20),
        ("dpmpp_2m", {**SD15, "euler_at_final": True, "lower_order_final": False}, 16),
        ("dpmpp_2m", {**SD15_LEADING, "solver_order": 1}, 4),
    ],
)
def test_options_match_diffusers(name, raw, steps, rng, monkeypatch):
    _compare_loop(name, raw, steps, rng, monkeypatch)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_timesteps_match_diffusers(name, spacing):
    raw = {**SD15, "timestep_spacing": spacing}
    for steps in (1, 2, 3, 7, 25, 100, 999):
        ref = _diffusers_scheduler(name, raw)
        ref.set_timesteps(steps)
        sched = schedulers.make(name, raw, steps)
        np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy(), err_msg=f"{steps=}")
        if hasattr(sched, "sigmas"):
            # torch's vectorized pow(·, 0.5) is off by an ulp from sqrt at a few entries.
            np.testing.assert_allclose(
                sched.sigmas, ref.sigmas.numpy(), rtol=3e-7, err_msg=f"{steps=}"
            )


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_img2img_matches_diffusers(name, rng, monkeypatch):
    """Strength picks the start as diffusers' img2img does; add_noise and the steps from there
    (with multistep history starting empty) match."""
    _compare_loop(name, SD15, 20, rng, monkeypatch, strength=0.75)


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_strength_timesteps(name):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionImg2ImgPipeline

    for steps in (1, 4, 10, 50):
        sched = schedulers.make(name, SD15, steps)
        ref = _diffusers_scheduler(name, SD15)
        ref.set_timesteps(steps)
        for strength in (0.05, 0.1, 0.33, 0.5, 0.99, 1.0):
            fake_pipe = types.SimpleNamespace(scheduler=ref)
            want, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
                fake_pipe, steps, strength, "cpu"
            )
            if len(want) == 0:
                with pytest.raises(ValueError, match="no denoising step"):
                    sched.start_index(strength)
            else:
                got = sched.timesteps_for_strength(strength)
                np.testing.assert_array_equal(got, want.numpy(), err_msg=f"{steps=} {strength=}")


# --- properties that need no reference --------------------------------------------------------


def test_hashable_static_argument():
    a, b = schedulers.make("dpmpp_2m", SD15, 8), schedulers.make("dpmpp_2m", SD15, 8)
    assert a == b and hash(a) == hash(b)
    assert a != schedulers.make("dpmpp_2m", SD15, 9)
    assert a != schedulers.make("dpmpp_2m_karras", SD15, 8)

    traces = []

    @jax.jit
    def f(x, sched):
        traces.append(sched.name)
        return sched.step(sched.init_state(x), 0, x, x)[0]

    f = jax.jit(f.__wrapped__, static_argnums=1)
    x = jnp.ones(SHAPE)
    f(x, a)
    f(x, b)
    assert len(traces) == 1


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_low_precision_sample_keeps_dtype(name):
    sched = schedulers.make(name, SD15, 4)
    x = jnp.ones(SHAPE, jnp.bfloat16)
    state = sched.init_state(x)
    out, state2 = sched.step(state, 0, x, x, noise=x)
    assert out.dtype == jnp.bfloat16
    assert sched.scale_model_input(x, 0).dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: a.dtype, state2) == jax.tree.map(lambda a: a.dtype, state)


def test_config_from_checkpoint_folder(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps({**SD15, "_diffusers_version": "x"}))
    sched = schedulers.make(None, tmp_path, 4)  # the config's own class: PNDMScheduler
    assert sched.name == "pndm" and sched.config.steps_offset == 1
    assert schedulers.make("euler", folder, 4).config.timestep_spacing == "linspace"
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        schedulers.make("ddim", tmp_path / "missing", 4)


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown scheduler 'lms'") as e:
        schedulers.make("lms", SD15, 4)
    for name in schedulers.NAMES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        schedulers.make(None, {**SD15, "_class_name": "LMSDiscreteScheduler"}, 4)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_count(steps):
    with pytest.raises(ValueError, match="num_steps"):
        schedulers.make("ddim", SD15, steps)


@pytest.mark.parametrize(
    "name, raw, match",
    [
        ("ddim", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ("ddim", {"timestep_spacing": "even"}, "timestep_spacing"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("euler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("pndm", {"skip_prk_steps": False}, "skip_prk_steps"),
        ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
        ("dpmpp_2m", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_unsupported_config_raises(name, raw, match):
    with pytest.raises(ValueError, match=match):
        schedulers.make(name, {**SD15, **raw}, 4)


def test_bad_strength_and_missing_noise():
    sched = schedulers.make("ddim", SD15, 20)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sched.start_index(strength)
    with pytest.raises(ValueError, match="no denoising step"):
        sched.start_index(0.04)
    euler_a = schedulers.make("euler_a", SD15, 4)
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="needs `noise`"):
        euler_a.step(euler_a.init_state(x), 0, x, x)
