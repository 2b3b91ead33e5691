"""The demo encoder's self-supervised pretraining (sfd_jax.train.vfm_ssl): the NT-Xent loss against a direct
computation, the augmentations, the linear probe, and a resumed pretraining equal to an uninterrupted one."""

import numpy as np
import pytest


def test_nt_xent_matches_a_direct_computation():
    import jax.numpy as jnp

    from sfd_jax.train.vfm_ssl import nt_xent

    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    loss, acc = nt_xent(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), 0.5)
    z = np.concatenate([z1, z2])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    total, hits = 0.0, 0
    for i in range(10):
        j = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        logits = np.array([z[i] @ z[k] / 0.5 for k in others])
        total += -(z[i] @ z[j] / 0.5 - np.log(np.exp(logits).sum()))
        hits += others[int(np.argmax(logits))] == j
    assert float(loss) == pytest.approx(total / 10, rel=1e-5)
    assert float(acc) == pytest.approx(hits / 10)


def test_augment_keeps_shape_and_range_and_differs_per_key():
    import jax

    from sfd_jax.train.vfm_ssl import SSLConfig, augment

    x = np.zeros((32, 32), np.float32)
    x[8:24, 10:22] = 0.8
    cfg = SSLConfig()
    aug = jax.jit(augment, static_argnums=2)  # one program for both keys (eagerly: one compile per operation)
    a, b = (np.asarray(aug(jax.random.key(k), x, cfg)) for k in (0, 1))
    assert a.shape == x.shape and a.min() >= 0.0 and a.max() <= 1.0
    assert not np.allclose(a, b)


def test_config_refuses_a_warmup_as_long_as_the_run():
    from sfd_jax.train.vfm_ssl import SSLConfig

    with pytest.raises(ValueError, match=r"warmup_steps \(50\) must be .* smaller than steps \(40\)"):
        SSLConfig(steps=40, warmup_steps=50)
    SSLConfig(steps=40, warmup_steps=39)  # the last step still decays


def test_linear_probe_separates_separable_features():
    from sfd_jax.train.vfm_ssl import linear_probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 8)) * 4
    y = rng.integers(0, 10, 2000)
    x = centres[y] + rng.normal(size=(2000, 8))
    out = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], steps=300)
    assert out["test_accuracy"] > 0.95
    # Labels unrelated to the features: chance level on held-out data.
    shuffled = linear_probe(x[:1500], rng.permutation(y[:1500]), x[1500:], y[1500:], steps=300)
    assert shuffled["test_accuracy"] < 0.3


def test_resumed_pretraining_equals_an_uninterrupted_one(tmp_path):
    from flax import nnx

    from sfd_jax.models.dinov2 import Dinov2, Dinov2Config
    from sfd_jax.train.vfm_ssl import SSLConfig, train

    cfg = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=8, image_size=32, num_register_tokens=1
    )
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32)).astype(np.uint8)
    ssl = SSLConfig(steps=4, batch_size=8, warmup_steps=1, proj_hidden=8, proj_dim=4, ckpt_every=2, log_every=1)
    whole, info = train(Dinov2(cfg, rngs=nnx.Rngs(0)), images, ssl, str(tmp_path / "a"))
    assert info["resumed_from_step"] == 0 and np.isfinite(info["last"]["loss"])
    train(Dinov2(cfg, rngs=nnx.Rngs(0)), images, ssl, str(tmp_path / "b"), stop_after=2)
    resumed, info = train(Dinov2(cfg, rngs=nnx.Rngs(0)), images, ssl, str(tmp_path / "b"))
    assert info["resumed_from_step"] == 2
    a, b = nnx.state(whole, nnx.Param), nnx.state(resumed, nnx.Param)
    for (path, x), (_, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        np.testing.assert_allclose(np.asarray(y[...]), np.asarray(x[...]), rtol=1e-6, atol=1e-7, err_msg=str(path))
    assert not np.allclose(
        np.asarray(whole.patch_embed.kernel[...]), np.asarray(Dinov2(cfg, rngs=nnx.Rngs(0)).patch_embed.kernel[...])
    )


def test_features_compile_once_per_architecture_and_size_and_match_one_call():
    """Two encoders of one architecture (the demo's pretrained and random DINOv2) on two splits share one compiled
    program per batch shape; batching and padding leave every image's features as one whole-set call gives them."""
    from flax import nnx

    from sfd_jax.models.dinov2 import Dinov2, Dinov2Config
    from sfd_jax.train import vfm_ssl

    cfg = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=4, image_size=16, num_register_tokens=1
    )
    a, b = Dinov2(cfg, rngs=nnx.Rngs(0)), Dinov2(cfg, rngs=nnx.Rngs(1))
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16), dtype=np.uint8)
    vfm_ssl._FEATURES.clear()
    whole = vfm_ssl.features(a, images)
    assert vfm_ssl._FEATURES.trace_count() == 1
    batched = vfm_ssl.features(a, images, batch=4)  # batches of 4, 4 and 2 padded to 4
    np.testing.assert_allclose(batched, whole, rtol=0, atol=1e-6 * np.abs(whole).max())
    assert vfm_ssl._FEATURES.trace_count() == 2  # the batch-4 shape
    other = vfm_ssl.features(b, images)
    assert vfm_ssl._FEATURES.trace_count() == 2  # the second encoder reuses the batch-10 program
    assert not np.allclose(other, whole)
