"""SemVAE trainer: a tiny CPU run learns, resumes mid-way exactly, exports loadable weights; the features input."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from configs.semvae import VARIANTS, get_config
from conftest import assert_trees_close
from sfd_jax import parallel
from sfd_jax.convert.semvae import load_semvae
from sfd_jax.train import semvae as trainer
from sfd_jax.train.metrics import read_metrics

STEPS, HALF = 12, 6


def _tiny(**train):
    config = get_config("tiny")
    config.train.update(num_steps=STEPS, ckpt_every=HALF, log_every=HALF, keep_last=5, **train)
    config.eval.update(every=STEPS)
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("semvae_a")
    return workdir, trainer.run(_tiny(), str(workdir))


def test_tiny_run_learns(uninterrupted):
    workdir, out = uninterrupted
    first, last = out["first_eval"], out["eval"]
    # held-out reconstruction of the (random-DINOv2) tokens of unseen synthetic images improves
    assert last["eval/mse"] < 0.7 * first["eval/mse"], (first, last)
    assert last["eval/cos_sim"] > first["eval/cos_sim"] + 0.3, (first, last)
    assert set(last) == {"eval/mse", "eval/cos_sim", "eval/mse_mu", "eval/cos_sim_mu"}
    lines = [m for m in read_metrics(str(workdir)) if "mse" in m]
    assert [m["step"] for m in lines] == [HALF, STEPS]
    assert lines[-1]["mse"] < lines[0]["mse"] and all(np.isfinite(m["total"]) for m in lines)
    assert lines[0]["lr"] == pytest.approx(get_config("tiny").optim.lr)  # warmup (2 steps) is over


def test_resume_mid_way_equals_uninterrupted(uninterrupted, tmp_path):
    workdir, out = uninterrupted
    resumed_dir = tmp_path / "semvae_b"
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / str(STEPS))  # as if the job died after the mid-way checkpoint
    shutil.rmtree(resumed_dir / trainer.EXPORT_DIR)
    config = _tiny()
    config.eval.every = 0  # evaluation does not touch the training state; skipping it saves a compilation
    resumed = trainer.run(config, str(resumed_dir))
    assert (out["start_step"], resumed["start_step"]) == (0, HALF)
    assert int(jax.device_get(resumed["state"].step)) == STEPS
    assert resumed["train"]["mse"] == pytest.approx(out["train"]["mse"], abs=1e-6)
    assert_trees_close(
        parallel.global_to_host(resumed["state"].params), parallel.global_to_host(out["state"].params), 1e-6
    )  # of the largest |param| (LayerNorm weights, 1.0)
    steps = [m["step"] for m in read_metrics(str(resumed_dir)) if "mse" in m]
    assert steps == [HALF, STEPS]  # the interrupted run's lines were kept once, the resumed run appended


def test_exported_weights_load(uninterrupted):
    workdir, out = uninterrupted
    cfg, model = load_semvae(workdir / trainer.EXPORT_DIR)  # the directory the extraction is pointed at
    assert cfg == trainer.semvae_config(_tiny())
    trained = jax.tree.leaves(parallel.global_to_host(out["state"].ema_params))
    loaded = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert len(trained) == len(loaded)
    for a, b in zip(trained, loaded):
        np.testing.assert_array_equal(a, np.asarray(b))
    meta = json.loads((workdir / trainer.EXPORT_DIR / "meta.json").read_text())
    assert meta["step"] == STEPS


def test_features_input(tmp_path):
    """data.kind='features' differs from the image path only in its items (the step then skips DINOv2)."""
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(40, 9, 32)).astype(np.float16)  # pre-extracted tokens are often stored as fp16
    np.save(tmp_path / "tokens.npy", tokens)
    config = get_config("tiny")
    config.data.update(kind="features", features=str(tmp_path / "tokens.npy"))
    config.eval.update(num_images=16)
    trainer.validate(config, parallel.make_mesh((-1, 1, 1)))
    train, held, info = trainer.build_inputs(config)
    assert (len(train), len(held)) == (24, 16)  # the last eval.num_images rows are held out
    assert info["train_items"] == 24
    np.testing.assert_array_equal(held[0], tokens[24].astype(np.float32))
    batch = next(trainer.train_batches(train, config, 8, 0))
    assert batch.shape == (8, 9, 32) and batch.dtype == np.float32
    rows = {tuple(r.ravel()[:4]) for r in tokens[:24].astype(np.float32)}
    assert all(tuple(b.ravel()[:4]) in rows for b in batch)  # drawn from the training rows only
    assert trainer.load_frozen_dino(config, None, {}) == (None, None)
    config.data.features = str(tmp_path / "wrong_dim.npy")
    np.save(config.data.features, np.zeros((8, 9, 31), np.float32))
    with pytest.raises(ValueError, match=r"expected \(N, L, 32\)"):
        trainer.build_inputs(config)


def test_batches_depend_only_on_the_step():
    config = get_config("tiny")
    items = trainer._Rows(np.arange(10), range(10), lambda base, i: base[i])
    full = trainer.train_batches(items, config, 4, 0)
    seen = [next(full) for _ in range(6)]
    resumed = trainer.train_batches(items, config, 4, 3)
    for want in seen[3:]:
        np.testing.assert_array_equal(next(resumed), want)
    epoch = np.concatenate(seen)[:10]  # 2.5 batches = one epoch: a permutation, reshuffled afterwards
    assert sorted(epoch) == list(range(10))


def test_schedule_is_the_reference_recipe():
    o = get_config("imagenet").optim
    _, schedule = trainer.make_optimizer(o)
    lr = o.lr
    assert float(schedule(0)) == pytest.approx(0.01 * lr)
    assert float(schedule(250)) == pytest.approx(0.505 * lr)
    for step in (500, 10_000, 800_000):
        assert float(schedule(step)) == pytest.approx(lr)
    assert float(schedule(900_000)) == pytest.approx(0.55 * lr)  # half-way down the cosine to 0.1x
    assert float(schedule(1_000_000)) == pytest.approx(0.1 * lr)


def test_config_variants_and_errors():
    mesh = parallel.make_mesh((-1, 1, 1))
    for name in VARIANTS:
        config = get_config(name)
        if name == "features":
            with pytest.raises(ValueError, match="config.data.features"):
                trainer.validate(config, mesh)
            config.data.features = "tokens.npy"
        trainer.validate(config, mesh)
    cases = [
        (("data", "kind", "pixels"), "config.data.kind"),
        (("loss", "cos_axis", "channel"), "config.loss.cos_axis"),
        (("train", "batch_size", 12), "multiple of the data-parallel size 8"),
        (("data", "crop", 50), "not a multiple of the DINOv2 patch size 14"),
        (("optim", "decay_start", 1), "decay_start"),
        (("eval", "num_images", 20), "multiple of eval.batch_size"),
    ]
    for (block, field, value), message in cases:
        config = get_config("tiny")
        config[block][field] = value
        with pytest.raises(ValueError, match=message):
            trainer.validate(config, mesh)
    with pytest.raises(ValueError, match="not a variant"):
        get_config("xl")
