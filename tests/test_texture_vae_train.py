"""Texture VAE trainer: a tiny CPU run (8 fake devices) whose reconstruction error falls, resumed half-way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sfd_jax.config_loader import load_config
from sfd_jax.convert.texture_vae import export_texture_vae, load_texture_vae, load_texture_vae_from_workdir
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig
from sfd_jax.train import texture_vae as trainer
from sfd_jax.train.metrics import read_metrics


def get_config(variant):
    return load_config(f"configs/texture_vae.py:{variant}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The `tiny` variant: 30 steps of batch 16 over 8 devices, evaluated at steps 0 and 30."""
    workdir = tmp_path_factory.mktemp("texture_vae_run")
    config = get_config("tiny")
    final = trainer.run(config, str(workdir))
    return workdir, config, final


def test_reconstruction_error_falls(trained):
    workdir, config, final = trained
    n = config.train.num_steps
    records = read_metrics(str(workdir))
    evals = {r["step"]: r for r in records if "eval/l1" in r}
    assert sorted(evals) == [0, n]
    print(
        "eval L1 by step:",
        {s: round(r["eval/l1"], 4) for s, r in evals.items()},
        "PSNR:",
        {s: round(r["eval/psnr"], 2) for s, r in evals.items()},
    )
    assert evals[n]["eval/l1"] < 0.7 * evals[0]["eval/l1"]
    assert evals[n]["eval/psnr"] > evals[0]["eval/psnr"] + 2.0
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30]
    assert train[-1]["l1"] < train[0]["l1"] and all(np.isfinite(r["loss"]) for r in train)
    assert final["eval/l1"] == evals[n]["eval/l1"]


def test_checkpoint_holds_the_exported_weights(trained):
    workdir, config, _ = trained
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [config.train.num_steps]
    cfg, restored = load_texture_vae_from_workdir(str(workdir))
    exported = export_texture_vae(load_texture_vae(workdir / "texture_vae")[1])
    assert cfg == TextureVAEConfig.from_dict(config.model.to_dict())
    for key, value in export_texture_vae(restored).items():
        np.testing.assert_array_equal(value, exported[key], err_msg=key)


def test_grids_and_final_weights(trained):
    workdir, config, final = trained
    n = config.train.num_steps
    for step in (0, n):
        grid = np.asarray(Image.open(workdir / f"recon_{step:06d}.png"))
        assert grid.shape == (2 * 18, 8 * 18, 3) and grid.dtype == np.uint8  # 8 images of 16² with 1-px borders

    cfg, model = load_texture_vae(workdir / "texture_vae")
    assert cfg == TextureVAEConfig.from_dict(config.model.to_dict())
    source = trainer.make_image_source(config.data.source)
    images = trainer.load_images(source, range(config.eval.num_images), 16).astype(np.float32) / 127.5 - 1

    @jax.jit
    def l1(images):
        return jnp.mean(jnp.abs(model.decode(model.encode(images)[0]) - images))

    assert float(l1(jnp.asarray(images))) == pytest.approx(final["eval/l1"], rel=1e-4)


def test_batch_order_depends_only_on_seed_and_step():
    n, b = 10, 4
    first_epoch = np.concatenate([trainer.batch_indices(s, b, n, seed=3) for s in range(5)])  # 20 slots = 2 epochs
    assert sorted(first_epoch[:10]) == list(range(10)) and sorted(first_epoch[10:]) == list(range(10))
    assert not np.array_equal(first_epoch[:10], first_epoch[10:])
    np.testing.assert_array_equal(trainer.batch_indices(2, b, n, seed=3), first_epoch[8:12])  # spans two epochs
    assert not np.array_equal(trainer.batch_indices(0, b, n, seed=4), first_epoch[:4])


def test_vae_loss_terms():
    rng = np.random.default_rng(0)
    x, r = rng.uniform(-1, 1, (2, 4, 4, 3)), rng.uniform(-1, 1, (2, 4, 4, 3))
    mean, logvar = rng.normal(size=(2, 2, 2, 4)), rng.normal(size=(2, 2, 2, 4))
    kl = 0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).sum(axis=(1, 2, 3)).mean()
    for kind, rec in (("l1", np.abs(x - r).mean()), ("l2", ((x - r) ** 2).mean())):
        loss, terms = trainer.vae_loss(
            jnp.asarray(x), jnp.asarray(r), jnp.asarray(mean), jnp.asarray(logvar), recon_loss=kind, kl_weight=0.5
        )
        np.testing.assert_allclose(float(loss), rec + 0.5 * kl / 48, rtol=1e-5)
        np.testing.assert_allclose(float(terms["kl"]), kl, rtol=1e-5)
    with pytest.raises(ValueError, match="loss.recon"):
        trainer.vae_loss(jnp.asarray(x), jnp.asarray(r), jnp.asarray(mean), jnp.asarray(logvar), recon_loss="l3")


def test_prepare_image_and_config_errors():
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    out = trainer.prepare_image(gray, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and np.array_equal(out[..., 0], out[..., 2])
    with pytest.raises(ValueError, match="uint8"):
        trainer.prepare_image(np.zeros((8, 8, 3), np.float32), 8)
    config = get_config("tiny")
    with config.unlocked():
        config.train.batch_size = 12  # not divisible by the 8 data-parallel devices
    with pytest.raises(ValueError, match="batch_size=12"):
        trainer.run(config, "/nonexistent/never_written")
    with pytest.raises(ValueError, match="not a variant"):
        get_config("huge")
    assert jax.device_count() == 8
    assert TextureVAE.to_uint8(jnp.zeros(1))[0] == 128
