"""The reference's two timestep-embedder forms: two D/2 embedders (semantic-first) and one D-wide embedder (its
ablations with Δt = 0 or no semantic channels). Both load; two-embedder weights convert exactly into the one-embedder
form; the one-embedder form round-trips through export; the impossible direction is refused."""

import dataclasses
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax.convert.common import ConversionError
from sfd_jax.convert.dit import export_dit, load_dit, restore_dit, save_dit
from sfd_jax.models.lightningdit import DiTConfig, LightningDiT
from sfd_jax.train import build

CFG = DiTConfig.from_size("tiny", in_channels=32, semantic_chans=0, num_classes=10)


def random_split_state_dict(seed):
    """A two-embedder model's reference state dict with every weight random (no zero-initialised layer)."""
    sd = export_dit(build_random(CFG))
    rng = np.random.default_rng(seed)
    fixed = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
    return {k: v if k in fixed else (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sd.items()}


# Compiled once each (per config / per model structure) instead of one XLA compilation per eager operation; the
# comparisons here do not need op-by-op execution.
build_random = nnx.jit(lambda cfg: LightningDiT(cfg, rngs=nnx.Rngs(0)), static_argnums=0)
forward = nnx.jit(lambda model, *args: model(*args))  # the eval forward


def joint_by_hand(sd):
    """The one-embedder state dict computing what `sd`'s two embedders compute when both get the same t."""
    out = {k: v for k, v in sd.items() if not k.startswith(("t_embedder_sem", "t_embedder_tex"))}
    s, t = "t_embedder_sem.mlp.", "t_embedder_tex.mlp."
    out["t_embedder.mlp.0.weight"] = np.vstack([sd[s + "0.weight"], sd[t + "0.weight"]])
    out["t_embedder.mlp.0.bias"] = np.concatenate([sd[s + "0.bias"], sd[t + "0.bias"]])
    h = sd[s + "2.weight"].shape[0]
    w = np.zeros((2 * h, 2 * h), np.float32)
    w[:h, :h], w[h:, h:] = sd[s + "2.weight"], sd[t + "2.weight"]
    out["t_embedder.mlp.2.weight"] = w
    out["t_embedder.mlp.2.bias"] = np.concatenate([sd[s + "2.bias"], sd[t + "2.bias"]])
    return out


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 16, 16, 32)), jnp.float32)
    t = jnp.asarray([0.05, 0.5, 0.93], jnp.float32)
    y = jnp.asarray([0, 4, 9], jnp.int32)
    return x, t, y


def assert_close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_reference_one_embedder_checkpoint_loads_and_matches_two_embedders(inputs):
    x, t, y = inputs
    split = random_split_state_dict(0)
    _, split_model = load_dit(split)
    assert split_model.cfg.dual_timestep
    cfg, joint_model = load_dit(joint_by_hand(split))
    assert not cfg.dual_timestep and cfg.in_channels == 32
    want = forward(split_model, x, t, t, y)
    assert np.abs(np.asarray(want)).max() > 0.1  # a model whose output depends on its weights
    assert_close(forward(joint_model, x, t, t, y), want)
    # export → import is exact in the one-embedder form (keys and layouts of the reference)
    exported = export_dit(joint_model)
    assert set(exported) == set(joint_by_hand(split))
    for k, v in joint_by_hand(split).items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_two_embedder_weights_convert_on_import_into_the_one_embedder_form(inputs, tmp_path):
    x, t, y = inputs
    split = random_split_state_dict(1)
    _, split_model = load_dit(split)
    joint_cfg = dataclasses.replace(CFG, dual_timestep=False)
    _, converted = load_dit(split, config=joint_cfg)
    want = forward(split_model, x, t, t, y)
    assert_close(forward(converted, x, t, t, y), want)
    save_dit(tmp_path / "w", joint_cfg, converted)
    cfg, restored = restore_dit(tmp_path / "w")
    assert not cfg.dual_timestep
    assert_close(forward(restored, x, t, t, y), want)


def test_one_embedder_weights_refused_by_a_two_embedder_config():
    joint = joint_by_hand(random_split_state_dict(2))
    with pytest.raises(ConversionError, match="one D-wide timestep embedder"):
        load_dit(joint, config=CFG)


@pytest.mark.parametrize(
    "variant,dual",
    [
        ("xl", True),
        ("ablate_pca", True),
        ("ablate_sync", False),
        ("ablate_no_semantic", False),
        ("ablate_baseline", False),
    ],
)
def test_training_builds_the_reference_form(variant, dual):
    spec = importlib.util.spec_from_file_location(
        "sfd_cfg", pathlib.Path(__file__).resolve().parents[1] / "configs" / "sfd.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(variant)
    assert build.model_config(c, 32 + int(c.diffusion.semantic_chans)).dual_timestep is dual
