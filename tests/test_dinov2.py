"""DINOv2-with-registers: golden parity (both interpolation directions), key spellings, transformers round trips."""

import json
import logging

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax.convert.common import ConversionError, to_numpy
from sfd_jax.convert.dinov2 import export_dinov2, infer_config, load_dinov2, save_pretrained
from sfd_jax.models.dinov2 import Dinov2Config, resize_position_grid
from tests.conftest import assert_close, load_golden

# max |Δ| ≤ REL · max |reference| (LayerNorm outputs, scale ≈ 4): we measure ≤ 1.05e-6 of that scale against the
# golden files and 3.5e-7 against transformers; the reference is bit-identical between its own reruns.
REL = 2.5e-6
CASES = {  # golden file → [(pixels, last_hidden_state, patch_tokens)]
    "dinov2reg.npz": [
        ("pixels", "last_hidden_state", "patch_tokens"),  # native 4×4 grid
        ("pixels_big", "last_hidden_state_big", "patch_tokens_big"),
    ],  # 4×4 → 5×5 (up)
    "dinov2reg_native518.npz": [
        ("pixels_0", "last_hidden_state_0", "patch_tokens_0"),  # 37×37 → 16×16 (down)
        ("pixels_1", "last_hidden_state_1", "patch_tokens_1"),
    ],  # 37×37 → 7×7 (down)
}


@nnx.jit
def _forward(model, pixels):
    return model(pixels)


@nnx.jit
def _patch_tokens(model, pixels):
    return model.patch_tokens(pixels)


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=sorted(CASES))
def golden_model(request):
    g = load_golden(request.param)
    hf = json.loads(str(g["config_json"]))["hf_config"]
    sd = to_numpy(g, prefix="sd/")
    cfg, model = load_dinov2(sd, hf)
    return request.param, g, hf, sd, cfg, model


def test_golden_forward(golden_model):
    name, g, _, _, cfg, model = golden_model
    for i, (pixels, lhs, patches) in enumerate(CASES[name]):
        out = _forward(model, _nhwc(g[pixels]))
        chex.assert_shape(out, g[lhs].shape)
        assert_close(out, g[lhs], REL, err_msg=f"{name}:{lhs}")
        tokens = _patch_tokens(model, _nhwc(g[pixels])) if i == 0 else out[:, cfg.num_prefix_tokens :]
        chex.assert_shape(tokens, g[patches].shape)
        assert_close(tokens, g[patches], REL, err_msg=f"{name}:{patches}")


def test_export_is_exact_inverse(golden_model):
    _, _, _, sd, _, model = golden_model
    exported = export_dinov2(model)
    assert set(exported) == set(sd)
    for key in sd:
        np.testing.assert_array_equal(exported[key], sd[key], err_msg=key)


def _params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _to_legacy_hf(sd):
    """transformers-5 names → the names of the hub's model.safetensors files (and of transformers' save_pretrained)."""
    renames = {
        "attention.q_proj.": "attention.attention.query.",
        "attention.k_proj.": "attention.attention.key.",
        "attention.v_proj.": "attention.attention.value.",
        "attention.o_proj.": "attention.output.dense.",
    }
    out = {}
    for key, value in sd.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def _to_torch_hub(sd, num_layers):
    """transformers-5 names → facebookresearch/dinov2 (torch.hub) names, with the fused qkv."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"],
        "register_tokens": sd["embeddings.register_tokens"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(num_layers):
        t, h = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[h + f"attn.qkv.{kind}"] = np.concatenate([sd[t + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            out[h + f"attn.proj.{kind}"] = sd[t + f"attention.o_proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[h + f"{name}.{kind}"] = sd[t + f"{name}.{kind}"]
        out[h + "ls1.gamma"] = sd[t + "layer_scale1.lambda1"]
        out[h + "ls2.gamma"] = sd[t + "layer_scale2.lambda1"]
    return out


def test_key_spellings_load_identically(golden_model):
    _, _, hf, sd, cfg, model = golden_model
    want = _params(model)
    spellings = {
        "legacy hub": _to_legacy_hf(sd),
        "torch.hub": _to_torch_hub(sd, cfg.num_hidden_layers),
        "classification wrapper": {"dinov2_with_registers." + k: v for k, v in sd.items()}
        | {"classifier.weight": np.zeros((2, 2 * cfg.hidden_size), np.float32)},
    }
    for what, variant in spellings.items():
        _, loaded = load_dinov2(variant, hf)
        got = _params(loaded)
        assert set(got) == set(want), what
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{what}: {path}")


def test_config_inferred_from_shapes(golden_model, caplog):
    _, _, hf, sd, cfg, _ = golden_model
    with caplog.at_level(logging.WARNING):
        inferred = infer_config(sd)
    assert inferred.num_attention_heads == max(cfg.hidden_size // 64, 1)
    assert "num_attention_heads" in caplog.text
    assert infer_config(sd, num_attention_heads=hf["num_attention_heads"]) == cfg


def test_logical_axis_names_and_bf16():
    g = load_golden("dinov2reg.npz")
    hf = json.loads(str(g["config_json"]))["hf_config"]
    _, model = load_dinov2(to_numpy(g, prefix="sd/"), hf, dtype="bfloat16")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim, path
        assert var.dtype == jnp.float32, path  # params stay fp32 whatever the compute dtype
    out = _forward(model, _nhwc(g["pixels_big"]))
    assert out.dtype == jnp.float32  # the final LayerNorm runs in fp32
    assert_close(out, g["last_hidden_state_big"], 2.5e-2)  # bf16 (3.9e-3 per rounding); measured 8.6e-3


def test_bad_inputs():
    g = load_golden("dinov2reg.npz")
    hf = json.loads(str(g["config_json"]))["hf_config"]
    sd = to_numpy(g, prefix="sd/")
    with pytest.raises(ConversionError, match="shape mismatches"):
        load_dinov2(sd, {**hf, "hidden_size": 32, "num_attention_heads": 2})
    with pytest.raises(ConversionError, match="missing keys.*encoder.layer.1"):
        load_dinov2({k: v for k, v in sd.items() if not k.startswith("encoder.layer.1.")}, hf)
    semvae = to_numpy(load_golden("semvae.npz"), prefix="sd/")
    with pytest.raises(ConversionError, match="not a DINOv2"):
        load_dinov2(semvae)
    with pytest.raises(ValueError, match="model_type"):
        Dinov2Config.from_hf({**hf, "model_type": "vit"})
    with pytest.raises(ValueError, match="intermediate_size"):
        Dinov2Config.from_hf({**hf, "intermediate_size": 100})
    _, model = load_dinov2(sd, hf)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(jnp.zeros((1, 57, 56, 3)))


def test_not_a_weights_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_dinov2(tmp_path)


def test_position_resize_matches_torch_antialiased_bicubic():
    import torch

    grid = np.random.default_rng(0).normal(size=(37, 37, 8)).astype(np.float32)
    for h, w in ((16, 16), (7, 7), (5, 9), (40, 40)):
        want = torch.nn.functional.interpolate(
            torch.from_numpy(grid.transpose(2, 0, 1))[None],
            size=(h, w),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        got = resize_position_grid(jnp.asarray(grid), h, w)
        # scale: the input grid (an antialiased shrink averages the output down); measured ≤ 2.4e-7 of it
        assert_close(got, want[0].numpy().transpose(1, 2, 0), 5e-7, scale=np.abs(grid).max(), err_msg=f"{h}x{w}")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=14,
        image_size=42,
        num_register_tokens=4,
    )
    model = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():  # registers, mask token and layer scales start at constants: make every tensor distinct
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf_dinov2")
    model.save_pretrained(directory)
    return torch, transformers, model, directory


def _torch_forward(torch, model, pixels_nhwc):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))))
    return out.last_hidden_state.numpy()


def test_transformers_save_pretrained_directory_loads(hf_model):
    torch, _, model, directory = hf_model
    cfg, ours = load_dinov2(directory)  # config.json + model.safetensors, no torch involved
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.grid_size) == (32, 2, 3)
    rng = np.random.default_rng(1)
    for size in (70, 28):  # upsampled and downsampled position embeddings (the golden files cover native)
        pixels = rng.normal(size=(2, size, size, 3)).astype(np.float32)
        assert_close(
            _forward(ours, jnp.asarray(pixels)), _torch_forward(torch, model, pixels), REL, err_msg=f"{size}x{size}"
        )


def test_our_directory_loads_in_transformers(hf_model, tmp_path):
    torch, transformers, model, directory = hf_model
    _, ours = load_dinov2(directory)
    save_pretrained(ours, tmp_path)
    reloaded = transformers.Dinov2WithRegistersModel.from_pretrained(tmp_path).eval()
    pixels = np.random.default_rng(2).normal(size=(1, 56, 56, 3)).astype(np.float32)
    np.testing.assert_array_equal(_torch_forward(torch, reloaded, pixels), _torch_forward(torch, model, pixels))
