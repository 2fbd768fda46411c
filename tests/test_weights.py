"""Checkpoint loading: name/layout conversion, strictness, file formats, pipelines, the Hub."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from sdjax import weights
from sdjax.config import CLIPTextConfig
from sdjax.weights import CheckpointError
from tests._pipeline_util import UNET, VAE

CLIP = CLIPTextConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=8,
)


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _torch_named(params) -> dict[str, np.ndarray]:
    """The inverse of the naming contract, for models whose names have no `_N` of their own."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        module = ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1])
        leaf = np.asarray(leaf)
        if path[-1] == "kernel":
            leaf = leaf.T if leaf.ndim == 2 else leaf.transpose(3, 2, 0, 1)
        name = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
        out[f"{module}.{name}"] = np.ascontiguousarray(leaf)
    return out


@pytest.fixture(scope="module")
def clip_params():
    from sdjax.models import clip

    return clip.init_params(CLIP, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def clip_expected():
    return weights.expected_params("text_encoder", CLIP)


@pytest.fixture
def clip_folder(tmp_path, clip_params):
    save_file(_torch_named(clip_params), tmp_path / "model.safetensors")
    return tmp_path


def _assert_tree_equal(a, b, **tol):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(
            np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), **tol
        )


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def test_convert_layouts(rng):
    expected = {
        "conv_in": {"kernel": _sds(3, 3, 2, 4), "bias": _sds(4)},
        "norm": {"scale": _sds(4), "bias": _sds(4)},
        "proj_in": {"kernel": _sds(4, 5)},  # a linear layer stored as a 1x1 conv
        "proj_out": {"kernel": _sds(1, 1, 5, 4)},  # a 1x1 conv stored as a linear layer
        "emb": {"embedding": _sds(7, 4)},
        "mid_block": {  # diffusers' legacy VAE attention names, as 1x1 convs
            "attentions_0": {
                n: {"kernel": _sds(4, 4)} for n in ("to_q", "to_k", "to_v", "to_out_0")
            }
        },
    }
    conv = rng.standard_normal((4, 2, 3, 3))
    proj_in, proj_out = rng.standard_normal((5, 4, 1, 1)), rng.standard_normal((4, 5))
    legacy = {n: rng.standard_normal((4, 4, 1, 1)) for n in ("query", "key", "value", "proj_attn")}
    tensors = {
        "conv_in.weight": conv,
        "conv_in.bias": np.arange(4.0),
        "norm.weight": np.ones(4),
        "norm.bias": np.zeros(4),
        "proj_in.weight": proj_in,
        "proj_out.weight": proj_out,
        "emb.weight": np.arange(28.0).reshape(7, 4),
        **{f"mid_block.attentions.0.{n}.weight": w for n, w in legacy.items()},
    }
    p = weights.convert_state_dict(tensors, expected, component="vae", dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        p["conv_in"]["kernel"], conv.transpose(2, 3, 1, 0).astype(jnp.bfloat16)
    )
    assert p["conv_in"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        p["proj_in"]["kernel"], proj_in[:, :, 0, 0].T.astype(jnp.bfloat16)
    )
    np.testing.assert_array_equal(p["proj_out"]["kernel"][0, 0], proj_out.T.astype(jnp.bfloat16))
    np.testing.assert_array_equal(p["emb"]["embedding"], tensors["emb.weight"])
    attn = p["mid_block"]["attentions_0"]
    for old, new in (
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out_0"),
    ):
        np.testing.assert_array_equal(
            attn[new]["kernel"], legacy[old][:, :, 0, 0].T.astype(jnp.bfloat16)
        )


def test_flax_module_path():
    assert weights.flax_module_path("down_blocks.0.attentions.1.to_out.0") == (
        "down_blocks_0",
        "attentions_1",
        "to_out_0",
    )
    assert weights.flax_module_path("time_embedding.linear_1") == ("time_embedding", "linear_1")


def test_clip_roundtrip(clip_folder, clip_params, clip_expected):
    loaded = weights.load_component(clip_folder, clip_expected, component="text_encoder")
    _assert_tree_equal(loaded, clip_params, rtol=0, atol=0)


def test_missing_tensor(clip_params, clip_expected):
    tensors = _torch_named(clip_params)
    del tensors["text_model.encoder.layers.1.mlp.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"1 missing.*\n.*layers_1/mlp/fc2/kernel \[24, 16\]"):
        weights.convert_state_dict(tensors, clip_expected, component="text_encoder")


def test_unexpected_tensor(clip_params, clip_expected):
    tensors = {**_torch_named(clip_params), "text_model.extra.weight": np.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected.*\n.*text_model\.extra\.weight \[3\]"):
        weights.convert_state_dict(tensors, clip_expected, component="text_encoder")


def test_wrong_shape(clip_params, clip_expected):
    tensors = _torch_named(clip_params)
    tensors["text_model.final_layer_norm.weight"] = np.ones(17, np.float32)
    with pytest.raises(
        CheckpointError, match=r"final_layer_norm\.weight: checkpoint \[17\], model wants \[16\]"
    ):
        weights.convert_state_dict(tensors, clip_expected, component="text_encoder")


def test_one_error_names_all_problems_capped(clip_expected):
    tensors = {f"junk.{i}.weight": np.zeros(1) for i in range(30)}
    with pytest.raises(CheckpointError) as info:
        weights.convert_state_dict(tensors, clip_expected, component="text_encoder")
    msg = str(info.value)
    assert "30 unexpected" in msg and "... and 18 more" in msg and "missing" in msg
    assert "No tensor matched" in msg
    assert len(msg.splitlines()) < 40


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_truncated_safetensors(clip_folder, clip_expected):
    path = clip_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        weights.load_component(clip_folder, clip_expected, component="text_encoder")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        weights.load_component(clip_folder, clip_expected, component="text_encoder")


def test_pickle_code_is_refused(tmp_path, clip_expected):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w"), creating the file
            return (open, (str(marker), "w"))

    torch.save({"text_model.final_layer_norm.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused.*weights_only=True"):
        weights.load_component(tmp_path, clip_expected, component="text_encoder")
    assert not marker.exists()


def test_plain_torch_pickle_loads(tmp_path, clip_params, clip_expected):
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v.copy()) for k, v in _torch_named(clip_params).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(8)[None]  # a buffer: ignored
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = weights.load_component(tmp_path, clip_expected, component="text_encoder")
    _assert_tree_equal(loaded, clip_params, rtol=0, atol=0)


def test_pickle_without_torch_is_refused(tmp_path, clip_expected, monkeypatch):
    import pickle
    import sys

    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(CheckpointError, match=r"pickled PyTorch checkpoint, and torch is not"):
        weights.load_component(tmp_path, clip_expected, component="unet")


def test_fp16_variant(clip_folder, clip_params, clip_expected):
    half = {k: v.astype(np.float16) for k, v in _torch_named(clip_params).items()}
    save_file(half, clip_folder / "model.fp16.safetensors")
    loaded = weights.load_component(
        clip_folder, clip_expected, component="text_encoder", variant="fp16"
    )
    leaf = loaded["text_model"]["final_layer_norm"]["scale"]
    assert leaf.dtype == jnp.float32  # cast to the model's dtype
    _assert_tree_equal(loaded, clip_params, rtol=1e-3, atol=1e-4)
    with pytest.raises(CheckpointError, match=r"no weights found \(variant 'bf16' requested\)"):
        weights.load_component(clip_folder, clip_expected, component="text_encoder", variant="bf16")


def test_sharded_index(tmp_path, clip_params, clip_expected):
    tensors = _torch_named(clip_params)
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, tmp_path / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = weights.load_component(tmp_path, clip_expected, component="text_encoder")
    _assert_tree_equal(loaded, clip_params, rtol=0, atol=0)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard files missing.*00002-of-00002"):
        weights.load_component(tmp_path, clip_expected, component="text_encoder")


# --------------------------------------------------------------------------------------------
# Pipelines: a tiny diffusers-layout checkpoint written by diffusers and transformers
# --------------------------------------------------------------------------------------------

_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "PNDMScheduler"],
}


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from sdjax.tokenizer import DEFAULT_FOLDER

    folder = tmp_path_factory.mktemp("ckpt") / "tiny-sd"
    torch.manual_seed(0)
    transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=999,
        )
    ).save_pretrained(folder / "text_encoder")
    diffusers.UNet2DConditionModel(**UNET).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(**VAE).save_pretrained(folder / "vae")
    diffusers.PNDMScheduler(skip_prk_steps=True).save_pretrained(folder / "scheduler")
    shutil.copytree(DEFAULT_FOLDER, folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps(_MODEL_INDEX))
    # fp16 variants, as `save_pretrained(variant="fp16")` names them.
    for comp, stem in (
        ("text_encoder", "model"),
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
    ):
        full = load_file(folder / comp / f"{stem}.safetensors")
        save_file(
            {k: v.astype(np.float16) for k, v in full.items()},
            folder / comp / f"{stem}.fp16.safetensors",
        )
    return folder


@pytest.fixture(scope="module")
def loaded(pipeline_folder):
    return weights.load_pipeline(pipeline_folder)


def test_load_pipeline(pipeline_folder, loaded):
    config, params = loaded
    assert config.name == "tiny-sd" and config.unet.num_attention_heads == (4, 4)
    assert set(params) == {"text_encoder", "unet", "vae"}
    for comp, model_config in (
        ("text_encoder", config.text_encoder),
        ("unet", config.unet),
        ("vae", config.vae),
    ):
        expected = weights.expected_params(comp, model_config)
        assert jax.tree.structure(params[comp]) == jax.tree.structure(expected)
    unet = load_file(pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors")
    np.testing.assert_array_equal(
        params["unet"]["conv_in"]["kernel"], unet["conv_in.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["unet"]["time_embedding"]["linear_1"]["kernel"],
        unet["time_embedding.linear_1.weight"].T,
    )
    to_out = params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"][
        "to_out_0"
    ]
    np.testing.assert_array_equal(
        to_out["kernel"],
        unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"].T,
    )


def test_load_pipeline_fp16_variant(pipeline_folder, loaded):
    _, params = weights.load_pipeline(pipeline_folder, variant="fp16", dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _assert_tree_equal(params, loaded[1], rtol=1e-2, atol=1e-2)


def test_legacy_vae_attention_names(pipeline_folder, loaded, tmp_path):
    """Old diffusers VAEs name the mid-block attention query/key/value/proj_attn (1x1 convs)."""
    legacy = {}
    for k, v in load_file(pipeline_folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        for new, old in (
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    config = loaded[0]
    vae = weights.load_component(
        tmp_path, weights.expected_params("vae", config.vae), component="vae"
    )
    _assert_tree_equal(vae, loaded[1]["vae"], rtol=0, atol=0)


def test_load_pipeline_from_hub_cache_offline(pipeline_folder, loaded, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--sdjax-test--tiny-sd"
    shutil.copytree(pipeline_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config, params = weights.load_pipeline("sdjax-test/tiny-sd")
    assert config.name == "sdjax-test/tiny-sd"
    _assert_tree_equal(params, loaded[1], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"'sdjax-test/absent'.*HF_HUB_OFFLINE"):
        weights.load_pipeline("sdjax-test/absent")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        weights.load_pipeline(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model_index.json"):
        weights.load_pipeline(tmp_path)
    with pytest.raises(CheckpointError, match="unet folder not found"):
        weights.load_component(tmp_path / "unet", {}, component="unet")


def test_missing_component(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({**_MODEL_INDEX, "vae": [None, None]}))
    for comp in ("text_encoder", "unet", "vae"):
        (tmp_path / comp).mkdir()
    with pytest.raises(CheckpointError, match="lists no vae component"):
        weights.load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(_MODEL_INDEX))
    shutil.rmtree(tmp_path / "unet")
    with pytest.raises(CheckpointError, match=r"component folder unet/ is missing"):
        weights.load_pipeline(tmp_path)


def test_random_params_deterministic(caplog):
    from sdjax.config import preset

    config = preset("tiny")
    a = weights.random_params(config, seed=3, dtype=jnp.bfloat16)
    assert "RANDOM weights" in caplog.text
    b = weights.random_params(config, seed=3, dtype=jnp.bfloat16)
    c = weights.random_params(config, seed=4, dtype=jnp.bfloat16)
    _assert_tree_equal(a, b, rtol=0, atol=0)
    assert not np.array_equal(a["unet"]["conv_in"]["kernel"], c["unet"]["conv_in"]["kernel"])
    assert {leaf.dtype for leaf in jax.tree.leaves(a)} == {jnp.dtype(jnp.bfloat16)}
    for comp, model_config in (
        ("text_encoder", config.text_encoder),
        ("unet", config.unet),
        ("vae", config.vae),
    ):
        assert jax.tree.structure(a[comp]) == jax.tree.structure(
            weights.expected_params(comp, model_config)
        )


def test_pipeline_folder_is_found_by_pathlib_not_hub(tmp_path, monkeypatch):
    """A relative path that exists is never taken for a repo id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no model_index.json"):
        weights.load_pipeline("org/name")
    assert isinstance(weights.resolve_checkpoint("org/name"), pathlib.Path)
