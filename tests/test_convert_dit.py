"""Reference LightningDiT checkpoints: official training-checkpoint format, export round trip, weights directory,
CLI, and one clear error for wrong files."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import sfd_jax  # noqa: F401
from conftest import OFFICIAL, assert_close, load_golden
from sfd_jax.convert.common import ConversionError
from sfd_jax.convert.dit import export_dit, load_dit, restore_dit, save_dit
from sfd_jax.models.lightningdit import DiTConfig

# Golden forwards are compared as max |Δ| ≤ REL · max |reference|: the reference itself moves by ≤ 5.7e-7 of that scale
# between thread counts and eager/compiled runs (tests/golden/README.md); we measure ≤ 4.7e-7.
REL = 2e-6
PT = OFFICIAL / "dit_official_format.pt"


@pytest.fixture(scope="module")
def dit():
    return load_golden("dit.npz")


@pytest.fixture(scope="module")
def sd(dit):
    return {k[3:]: v for k, v in dit.items() if k.startswith("sd/")}


@pytest.fixture(scope="module")
def inputs(dit):
    return (
        jnp.asarray(dit["x"].transpose(0, 2, 3, 1)),
        jnp.asarray(dit["t_tex"]),
        jnp.asarray(dit["t_sem"]),
        jnp.asarray(dit["y"]),
    )


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def torch_ckpt():
    import torch
    import omegaconf  # noqa: F401 (the reference checkpoints pickle omegaconf objects)

    return torch.load(PT, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------------------------
# The official training-checkpoint format


def test_official_format_ema(inputs, torch_ckpt):
    expected = load_golden("dit_official_format_expected.npz")["out_eval_ema"]
    cfg, model = load_dit(PT)  # use_ema=True by default: what official inference loads
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.repa_depth) == (2, 64, 4, 2)
    assert_close(nchw(model(*inputs)), expected, REL)


def test_official_format_raw_weights(dit, inputs, torch_ckpt):
    _, model = load_dit(PT, use_ema=False)
    assert_close(nchw(model(*inputs)), dit["out_eval"], REL)


def test_in_memory_torch_state_dict(dit, inputs, torch_ckpt):
    _, model = load_dit(torch_ckpt["model"])  # torch tensors, reference names
    assert_close(nchw(model(*inputs)), dit["out_eval"], REL)


# ---------------------------------------------------------------------------------------------------------------
# Export / weights directory


def test_export_round_trip_exact(sd):
    _, model = load_dit(sd)
    exported = export_dit(model)
    assert set(exported) == set(sd)
    for key, value in sd.items():
        assert exported[key].shape == value.shape and exported[key].dtype == np.float32, key
        if key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
            # recomputed sin/cos tables (|values| ≤ 1): angles up to 15 rad carry float32 rounding of ~eps·15
            assert_close(exported[key], value, 1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again = export_dit(load_dit(exported)[1])
    for key, value in exported.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_guide_without_repa_tap_round_trips(dit):
    guide_sd = {k[len("guide_sd/") :]: v for k, v in dit.items() if k.startswith("guide_sd/")}
    cfg, guide = load_dit(guide_sd)
    assert cfg.depth == 1 and "repa_projector.4.weight" in export_dit(guide)


def test_save_restore_weights_directory(sd, inputs, tmp_path):
    cfg, model = load_dit(sd)
    save_dit(tmp_path / "w", cfg, model, meta={"step": 7})
    cfg2, model2 = restore_dit(tmp_path / "w")
    assert cfg2 == cfg
    for key, value in export_dit(model2).items():
        np.testing.assert_array_equal(value, export_dit(model)[key], err_msg=key)
    cfg_bf16, _ = restore_dit(tmp_path / "w", dtype="bfloat16")
    assert cfg_bf16.dtype == "bfloat16"
    with pytest.raises(FileNotFoundError, match="not a DiT weights directory"):
        restore_dit(tmp_path)


def test_safetensors_state_dict(sd, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "dit.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    _, model = load_dit(path)
    np.testing.assert_array_equal(export_dit(model)["blocks.1.mlp.w3.weight"], sd["blocks.1.mlp.w3.weight"])


def test_cli_converts_and_reports(inputs, tmp_path, capsys, torch_ckpt):
    from sfd_jax.convert.__main__ import main

    named = tmp_path / "0400000.pt"  # the reference names checkpoints {step:07d}.pt
    os.symlink(PT, named)
    assert main(["dit", str(named), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "TINY" in printed and "step: 400000" in printed and "EMA" in printed and "246,872" in printed
    _, restored = restore_dit(tmp_path / "out")
    expected = load_golden("dit_official_format_expected.npz")["out_eval_ema"]
    assert_close(nchw(restored(*inputs)), expected, REL)
    with pytest.raises(SystemExit, match="not empty"):
        main(["dit", str(named), str(tmp_path / "out")])
    assert main(["dit", str(named), str(tmp_path / "out"), "--raw", "--overwrite"]) == 0
    assert "raw" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Wrong files: one error listing what is missing / unexpected / mis-shaped


def test_texture_vae_checkpoint_rejected():
    tex = load_golden("texture_vae.npz")
    state = {k[3:]: v for k, v in tex.items() if k.startswith("sd/")}
    assert state, "texture_vae.npz has no sd/ entries"
    with pytest.raises(ConversionError) as err:
        load_dit(state)
    msg = str(err.value)
    assert "missing keys" in msg and "x_embedder.proj.weight" in msg
    assert "unexpected keys" in msg and "decoder.conv_in.weight" in msg and "does not look like a LightningDiT" in msg


def test_other_model_checkpoint_rejected():
    semvae = load_golden("semvae.npz")
    state = {k[3:]: v for k, v in semvae.items() if k.startswith("sd/")}
    with pytest.raises(ConversionError, match="missing keys"):
        load_dit(state)


def test_missing_and_mismatched_keys_listed_together(sd):
    broken = dict(sd)
    del broken["blocks.1.attn.qkv.bias"]
    broken["blocks.0.mlp.w3.weight"] = sd["blocks.0.mlp.w3.weight"].T
    broken["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        load_dit(broken, config=None)
    e = err.value
    assert e.missing == ["blocks.1.attn.qkv.bias"]
    assert e.unexpected == ["blocks.0.attn.extra.weight"]
    assert e.mismatched == [("blocks.0.mlp.w3.weight", (170, 64), (64, 170))]
    assert "<mapping>" in str(e)


def test_explicit_config_checked(sd):
    with pytest.raises(ConversionError, match=r"missing keys \(14\)"):
        load_dit(sd, config=DiTConfig.from_size("tiny", depth=3))
    with pytest.raises(ConversionError, match="shape mismatches"):
        load_dit(sd, config=DiTConfig.from_size("tiny", repa_projector_dim=256))


def test_wrong_fixed_tables_rejected(sd):
    """Same shapes, other RoPE layout (e.g. another head split): the architecture check catches it."""
    broken = dict(sd, **{"feat_rope.freqs_cos": sd["feat_rope.freqs_cos"][::-1].copy()})
    with pytest.raises(ConversionError, match="feat_rope.freqs_cos"):
        load_dit(broken)


def test_truncated_file_rejected(tmp_path):
    import torch  # noqa: F401 (needed by the reader of .pt files)

    data = PT.read_bytes()
    truncated = tmp_path / "0100000.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="0100000.pt"):
        load_dit(truncated)


def test_missing_ema_entry(tmp_path, torch_ckpt):
    import torch

    path = tmp_path / "no_ema.pt"
    torch.save({"model": torch_ckpt["model"], "opt": torch_ckpt["opt"]}, path)
    with pytest.raises(ConversionError, match="use_ema=False"):
        load_dit(path)
