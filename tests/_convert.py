"""Test helpers: load a `save_pretrained` folder through our own loader, and relative errors."""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from sdjax import weights

_COMPONENT = {"UNetConfig": "unet", "VAEConfig": "vae", "CLIPTextConfig": "text_encoder"}


def convert_state_dict(tensors, expected):
    """diffusers state dict (numpy) -> our params, strictly (sdjax.weights)."""
    component = "unet" if any(k.startswith("down_blocks") for k in tensors) else "vae"
    return weights.convert_state_dict(tensors, expected, component=component)


def load_folder(folder, config_cls, init_params):
    """A `save_pretrained` folder -> (config, params), through config.json and our loader."""
    folder = pathlib.Path(folder)
    config = config_cls.from_json(folder / "config.json")
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params = weights.load_component(folder, shapes, component=_COMPONENT[config_cls.__name__])
    return config, params


def rel_err(ours, theirs) -> float:
    """||ours - theirs|| / ||theirs||, in float64."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
