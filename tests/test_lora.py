"""LoRA merging against diffusers' `load_lora_weights` + `fuse_lora` on the same files.

The LoRAs are made by the tests: a PEFT one through peft + diffusers' `save_lora_weights`
(with its adapter metadata: alpha, alpha_pattern, rank_pattern), the same renamed into the
older diffusers naming, and a kohya one written by hand (conv 3x3 / 1x1 and linear layers,
per-module `.alpha`), each on the UNet and the text encoder.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.torch import save_file

from sdjax import lora, weights
from sdjax.config import CLIPTextConfig, UNetConfig
from sdjax.weights import CheckpointError

pytest.importorskip("peft")

UNET = dict(
    sample_size=8,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)  # conv proj_in / proj_out (SD 1): 1x1-conv LoRAs
TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj"]
UNET_TARGETS += ["ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
STRENGTH = 0.7


@pytest.fixture(scope="module", autouse=True)
def _peft_for_transformers():
    """transformers 5.24 asks for peft >= 0.22 for text-encoder adapters; where only an older
    peft is installable (0.21.2 here), lift that version check. diffusers' UNet path does not
    go through it."""
    import peft
    from packaging import version
    from transformers.integrations import peft as hf_peft

    with pytest.MonkeyPatch.context() as patch:
        if version.parse(peft.__version__) < version.parse("0.22"):
            patch.setattr(hf_peft, "check_peft_version", lambda min_version: None)
        yield


@pytest.fixture(scope="module")
def pipe():
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdjax.tokenizer import DEFAULT_FOLDER

    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=[8], norm_num_groups=8, sample_size=8),
        text_encoder=CLIPTextModel(HFConfig(**TEXT)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(DEFAULT_FOLDER)),
        unet=UNet2DConditionModel(**UNET).eval(),
        scheduler=PNDMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _flax(pipe) -> dict[str, dict]:
    """Our params of the pipeline's UNet and text encoder (through sdjax.weights)."""
    configs = {
        "unet": UNetConfig.from_json(dict(pipe.unet.config)),
        "text_encoder": CLIPTextConfig(**TEXT),
    }
    out = {}
    for comp, config in configs.items():
        state = {k: v.detach().numpy() for k, v in getattr(pipe, comp).state_dict().items()}
        expected = weights.expected_params(comp, config)
        out[comp] = weights.convert_state_dict(state, expected, component=comp)
    return out


@pytest.fixture(scope="module")
def params(pipe):
    return _flax(pipe)


def _fused_by_diffusers(pipe, folder, weight_name, strength):
    fresh = copy.deepcopy(pipe)
    fresh.load_lora_weights(str(folder), weight_name=weight_name)
    fresh.fuse_lora(lora_scale=strength)
    fresh.unload_lora_weights()
    return _flax(fresh)


def _assert_close(ours, theirs, base):
    changed = {"unet": 0, "text_encoder": 0}
    for comp in changed:
        fo, ft = traverse_util.flatten_dict(ours[comp]), traverse_util.flatten_dict(theirs[comp])
        fb = traverse_util.flatten_dict(base[comp])
        assert fo.keys() == ft.keys()
        for k in fo:
            o, t = np.asarray(fo[k], np.float64), np.asarray(ft[k], np.float64)
            err = np.linalg.norm(o - t) / max(np.linalg.norm(t), 1e-30)
            assert err <= 1e-5, (comp, k, err)
            changed[comp] += not np.array_equal(np.asarray(fb[k]), np.asarray(ft[k]))
    assert changed["unet"] >= 20 and changed["text_encoder"] >= 12, changed  # the LoRA did act


# --------------------------------------------------------------------------------------------
# LoRA files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_lora(pipe, tmp_path_factory):
    """diffusers' own LoRA file (PEFT naming + adapter metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("peft_lora")
    torch.manual_seed(1)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,  # random A and B
        target_modules=UNET_TARGETS,
        rank_pattern={"conv1": 2},
        alpha_pattern={"proj_in": 3},
    )
    text_config = LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=False, target_modules=TEXT_TARGETS
    )
    trained = copy.deepcopy(pipe)
    trained.unet.add_adapter(unet_config)
    trained.text_encoder.add_adapter(text_config)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(trained.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(trained.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
        weight_name="peft.safetensors",
    )
    return folder, "peft.safetensors"


def _modules(model, suffixes):
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(tuple(suffixes))
    }


@pytest.fixture(scope="module")
def kohya_lora(pipe, tmp_path_factory):
    """sd-scripts naming: lora_unet_<module with _>.lora_down/.lora_up/.alpha, lora_te_..."""
    gen = torch.Generator().manual_seed(2)
    state = {}
    for prefix, model, rank, alpha, targets in (
        ("lora_unet_", pipe.unet, 4, 2.0, UNET_TARGETS),
        ("lora_te_", pipe.text_encoder, 2, 1.0, TEXT_TARGETS),
    ):
        for name, module in _modules(model, targets).items():
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name  # kohya names the transformers <5 modules
            key = prefix + name.replace(".", "_")
            if isinstance(module, torch.nn.Conv2d):
                r = 2  # conv_dim, as sd-scripts' LoCon
                down = (r, module.in_channels, *module.kernel_size)
                up = (module.out_channels, r, 1, 1)
            else:
                r = rank
                down, up = (r, module.in_features), (module.out_features, r)
            state[f"{key}.lora_down.weight"] = torch.randn(down, generator=gen) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(up, generator=gen) * 0.1
            state[f"{key}.alpha"] = torch.tensor(alpha)
    folder = tmp_path_factory.mktemp("kohya_lora")
    save_file(state, folder / "kohya.safetensors")
    return folder, "kohya.safetensors"


@pytest.fixture(scope="module")
def old_diffusers_lora(peft_lora, tmp_path_factory):
    """The PEFT file in diffusers' pre-PEFT naming (UNet `.lora.down.weight`, text encoder
    `.lora_linear_layer.down.weight`), without metadata: alpha = rank."""
    from safetensors.torch import load_file

    folder, name = peft_lora
    renamed = {}
    for key, value in load_file(folder / name).items():
        layer = "lora" if key.startswith("unet.") else "lora_linear_layer"
        key = key.replace(".lora_A.weight", f".{layer}.down.weight")
        renamed[key.replace(".lora_B.weight", f".{layer}.up.weight")] = value
    out = tmp_path_factory.mktemp("old_lora")
    save_file(renamed, out / "old.safetensors")
    return out, "old.safetensors"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["peft_lora", "kohya_lora", "old_diffusers_lora"])
def test_merge_matches_diffusers_fuse_lora(naming, request, pipe, params):
    folder, name = request.getfixturevalue(naming)
    ours = lora.merge_lora(params, folder / name, strength=STRENGTH)
    theirs = _fused_by_diffusers(pipe, folder, name, STRENGTH)
    _assert_close(ours, theirs, params)


def test_read_scales_and_strength_zero(peft_lora, kohya_lora, params):
    folder, name = peft_lora
    layers = lora.read_lora(folder / name, params)
    unet = {"/".join(p): layer for p, layer in layers["unet"].items()}
    proj_in = unet["down_blocks_0/attentions_0/proj_in"]
    assert proj_in.scale == pytest.approx(3 / 4)  # alpha_pattern
    assert unet["down_blocks_0/resnets_0/conv1"].scale == pytest.approx(8 / 2)  # rank_pattern
    assert unet["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"].scale == 2.0
    assert {layer.scale for layer in layers["text_encoder"].values()} == {1.5}
    folder, name = kohya_lora
    same = lora.merge_lora(params, folder / name, strength=0.0)
    for comp in ("unet", "text_encoder"):
        a, b = traverse_util.flatten_dict(same[comp]), traverse_util.flatten_dict(params[comp])
        assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_half_precision_params(peft_lora, params):
    folder, name = peft_lora
    half = {c: {k: v for k, v in p.items()} for c, p in params.items()}
    half = {
        c: traverse_util.unflatten_dict(
            {k: v.astype(jnp.float16) for k, v in traverse_util.flatten_dict(p).items()}
        )
        for c, p in half.items()
    }
    merged = lora.merge_lora(half, folder / name)
    full = lora.merge_lora(params, folder / name)
    kernel = ("down_blocks_0", "attentions_0", "proj_in", "kernel")
    got = traverse_util.flatten_dict(merged["unet"])[kernel]
    assert got.dtype == jnp.float16
    want = np.asarray(traverse_util.flatten_dict(full["unet"])[kernel])
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-3, atol=2e-3)


def _save(tmp_path, state, name="bad.safetensors"):
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / name)
    return tmp_path / name


def test_unmatched_and_malformed_keys(kohya_lora, params, tmp_path):
    from safetensors.torch import load_file

    folder, name = kohya_lora
    state = load_file(folder / name)
    extra = {
        **state,
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2),
        "unet.mid_block.nothing.lora_A.weight": torch.zeros(2, 4),
        "vae.encoder.conv_in.lora_A.weight": torch.zeros(2, 4),
    }
    with pytest.raises(CheckpointError) as e:
        lora.merge_lora(params, _save(tmp_path, extra))
    message = str(e.value)
    assert "name no UNet/text-encoder layer" in message and "down_blocks_9" in message
    assert "unet.mid_block.nothing.lora_A.weight" in message
    assert "known LoRA naming" in message and "vae.encoder.conv_in" in message

    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
    wrong = {**state, key: torch.zeros(31, state[key].shape[1], 1, 1)}
    with pytest.raises(CheckpointError, match="does not fit the kernel"):
        lora.merge_lora(params, _save(tmp_path, wrong, "wrong.safetensors"))
    no_up = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match="needs down and up"):
        lora.merge_lora(params, _save(tmp_path, no_up, "no_up.safetensors"))
    loha = {**state, "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="unsupported adapter type"):
        lora.merge_lora(params, _save(tmp_path, loha, "loha.safetensors"))
