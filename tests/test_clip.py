"""Golden checks of the Flax CLIP text encoder against transformers' CLIPTextModel (fp32, CPU).

The PyTorch model is saved with `save_pretrained` and read back through `sdjax.weights`, so
these tests also cover the text encoder's name mapping end to end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import weights
from sdjax.config import CLIPTextConfig
from sdjax.models import clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # relative error, fp32


def _rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _torch_clip(act: str, seed: int = 0):
    """A small CLIPTextModel whose weights are all perturbed, so norm scales are not 1 and
    biases not 0 (a swapped or dropped tensor would otherwise go unnoticed)."""
    config = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,  # head dim 16
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
            elif "embedding" not in name:
                p.mul_(3.0)  # larger than the 0.02 init, so the MLP's nonlinearity matters
    return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers(act, tmp_path, rng):
    model = _torch_clip(act)
    model.save_pretrained(tmp_path)
    config = CLIPTextConfig.from_json(tmp_path)
    assert config.hidden_act == act
    params = weights.load_component(
        tmp_path, weights.expected_params("text_encoder", config), component="text_encoder"
    )
    for shape in [(2, 77), (3, 12)]:  # the full window and a shorter one
        ids = rng.integers(0, 1000, shape)
        with torch.no_grad():
            ref = model(torch.tensor(ids)).last_hidden_state.numpy()
        out = clip.encode(params, jnp.asarray(ids, jnp.int32), config)
        assert out.shape == (*shape, 64)
        assert _rel_err(out, ref) <= TOL, (act, shape, _rel_err(out, ref))


def test_legacy_text_model_prefix(tmp_path):
    """Checkpoints written by older transformers use `text_model.` keys and keep position_ids."""

    model = _torch_clip("quick_gelu", seed=1)
    state = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    expected = weights.expected_params("text_encoder", config)
    params = weights.convert_state_dict(state, expected, component="text_encoder")
    ids = np.arange(20)[None] * 7
    with torch.no_grad():
        ref = model(torch.tensor(ids)).last_hidden_state.numpy()
    assert _rel_err(clip.encode(params, jnp.asarray(ids, jnp.int32), config), ref) <= TOL


def test_rejects_unknown_activation():
    config = CLIPTextConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_act="relu",
    )
    with pytest.raises(ValueError, match="hidden_act"):
        clip.init_params(config, np.zeros(2, np.uint32))


def test_rejects_too_long_input():
    config = CLIPTextConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=4,
    )
    params = clip.init_params(config, np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match="input_ids"):
        clip.encode(params, jnp.zeros((1, 5), jnp.int32), config)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_padded_tokens_change_nothing_before_them(dtype):
    """pad_multiple runs the layers on zero vectors after the prompt: the causal attention
    keeps the first L outputs as they were."""
    from sdjax import config as sd_config

    cfg = sd_config.preset("tiny").text_encoder
    params = clip.init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, 13), 0, cfg.vocab_size)
    plain = clip.encode(params, ids, cfg, dtype=dtype)
    padded = clip.encode(params, ids, cfg, dtype=dtype, pad_multiple=16)
    assert padded.shape == plain.shape == (3, 13, cfg.hidden_size)
    a, b = np.asarray(padded, np.float64), np.asarray(plain, np.float64)
    assert np.isfinite(a).all()
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}[dtype]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= tol
    with pytest.raises(ValueError, match="pad_multiple"):
        clip.encode(params, ids, cfg, pad_multiple=0)
