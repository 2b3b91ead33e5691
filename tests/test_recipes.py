"""The paper's recipes as configs: guide checkpoints a sampling row needs survive training, the PCA ablation trains
on PCA-extracted latents with the reference's channel layout and normalisation, and every paper row has a
training variant and a sampling variant that go together."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from sfd_jax.checkpoint import Checkpoints
from sfd_jax.train import config as config_lib
from sfd_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config_module(name):
    spec = importlib.util.spec_from_file_location(f"recipes_{name[:-3]}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sfd_configs = load_config_module("sfd.py")
sample_configs = load_config_module("sample.py")


def shrink_to_tiny(c, num_steps):
    c.model.update(size="tiny", dtype="float32")
    c.optim.update(lr=1e-3, ema_decay=0.99)
    c.train.update(batch_size=8, num_steps=num_steps, log_every=1, export_ema=False)
    c.data.update(num_classes=10)
    return c


# ---------------------------------------------------------------------------------------------------------------
# 1. guide checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_guide_steps_of_every_sampling_row_survive_a_shortened_guide_run(tmp_path):
    full = sfd_configs.get_config("guide_b")
    used = {
        int(sample_configs.get_config(v).sample.guide_step)
        for v in sample_configs.VARIANTS
        if sample_configs.get_config(v).sample.guidance == "autoguidance"
    }
    assert used == {60_000, 70_000, 120_000}
    assert used <= set(full.train.keep_steps) and max(used) <= full.train.num_steps
    # The same run scaled down 10,000×: saves every step, keeps the newest 3 and every 2nd, like 10K / 20K. The
    # retention is guide_b's; the model, optimizer and batch are the tiny run's, whose step the other tiny DiT tests
    # have compiled already (the suite's compilation cache), since what is kept does not depend on them.
    scale = 10_000
    c = sfd_configs.get_config("tiny")
    c.train.update(
        num_steps=full.train.num_steps // scale,
        log_every=1,
        export_ema=False,
        keep_last=full.train.keep_last,
        ckpt_every=full.train.ckpt_every // scale,
        keep_every=full.train.keep_every // scale,
        keep_steps=tuple(s // scale for s in full.train.keep_steps),
    )
    loop.run(c, str(tmp_path))
    steps = Checkpoints(str(tmp_path)).all_steps()
    for step in sorted(used):
        assert step // scale in steps, f"guide step {step} (scaled: {step // scale}) was deleted; kept {steps}"


def test_keep_steps_are_validated():
    c = sfd_configs.get_config("guide_b")
    c.train.keep_steps = (60_000, 130_000)
    with pytest.raises(config_lib.ConfigError, match="config.train.keep_steps"):
        config_lib.validate(c, device_count=8)


# ---------------------------------------------------------------------------------------------------------------
# 2. PCA ablation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,ok", [(0, True), (1, True), (8, True), (16, True), (17, False), (-1, False)])
def test_semantic_channel_counts(k, ok):
    c = sfd_configs.get_config("ablate_pca")
    c.diffusion.update(semantic_chans=k, delta_t=0.3 if k > 0 else 0.0)
    if ok:
        assert config_lib.validate(c, device_count=8)["model_channels"] == 32 + k
    else:
        with pytest.raises(config_lib.ConfigError, match="config.diffusion.semantic_chans"):
            config_lib.validate(c, device_count=8)


@pytest.fixture(scope="module")
def pca_dataset(tmp_path_factory):
    """A PCA-8 extraction of 20 random images by tiny random encoders with the real latent geometry: 16×16 grid,
    32 texture channels, 768-wide DINOv2 tokens (the REPA target width)."""
    from test_extract import numpy_init

    from sfd_jax.data.encoders import Encoders
    from sfd_jax.data.extract import ExtractOptions, extract
    from sfd_jax.data.sources import ImageFolderSource
    from sfd_jax.models.dinov2 import Dinov2, Dinov2Config
    from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig

    root = tmp_path_factory.mktemp("pca_imgs")
    rng = np.random.default_rng(1)
    for i in range(20):
        (root / f"c{i % 4}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"c{i % 4}" / f"{i}.png")
    tex = TextureVAEConfig(
        ch=8,
        ch_mult=(1, 1, 1),
        num_res_blocks=1,
        attn_resolutions=(),
        resolution=64,
        z_channels=32,
        embed_dim=32,
        num_groups=4,
    )
    dino = Dinov2Config(
        hidden_size=768, num_hidden_layers=1, num_attention_heads=12, image_size=224, num_register_tokens=4
    )
    encoders = Encoders(
        numpy_init(lambda: TextureVAE(tex, rngs=nnx.Rngs(0)), 0), numpy_init(lambda: Dinov2(dino, rngs=nnx.Rngs(0)), 1)
    )
    out = str(tmp_path_factory.mktemp("pca_latents"))
    extract(
        ImageFolderSource(str(root)),
        out,
        encoders,
        ExtractOptions(
            image_size=64,
            dino_size=224,
            batch_size_per_device=1,
            shard_size=10,
            stats_images=20,
            seed=0,
            semantic="pca",
            pca_components=8,
            pca_fit_images=10,
        ),
        progress=False,
    )
    return out


def test_ablate_pca_trains_on_pca_latents_with_the_reference_layout(pca_dataset, tmp_path):
    from sfd_jax.data import records
    from sfd_jax.data.pipeline import make_iterator

    c = shrink_to_tiny(sfd_configs.get_config("ablate_pca"), 3)
    c.data.update(source="arrayrecord", path=pca_dataset, num_classes=4, read_threads=0, prefetch_batches=1)
    assert c.diffusion.semantic_chans == 8 and c.diffusion.delta_t == 0.3

    # Layout and normalisation: [texture 0:32 standardised with the dataset's texture stats | PCA 32:40 as stored].
    meta, layout, images = records.read_images(pca_dataset)
    assert layout.texture_shape == (16, 16, 32) and layout.semantic_shape == (16, 16, 8)
    stats = json.load(open(os.path.join(pca_dataset, "stats.json")))
    mean, std = np.asarray(stats["texture"]["mean"]), np.asarray(stats["texture"]["std"])
    it = make_iterator(c.data, batch_size=4, process_index=0, process_count=1, seed=0, with_meta=True)
    batch = next(it)
    assert batch["x1"].shape == (4, 16, 16, 40)
    for row, (index, flip) in enumerate(zip(batch["index"], batch["flip"])):
        rec = images[int(index)]
        suffix = "_flip" if flip else ""
        np.testing.assert_allclose(
            batch["x1"][row, ..., :32], (rec["texture" + suffix] - mean) / std, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(batch["x1"][row, ..., 32:], rec["semantic" + suffix])
    # The PCA channels are far from standardised, so normalising them would be visible above.
    sem_std = np.asarray(stats["semantic"]["std"])
    assert np.abs(sem_std - 1).max() > 0.05, sem_std

    summary = loop.run(c, str(tmp_path))
    assert summary["step"] == 3 and np.isfinite(summary["last_metrics"]["loss"])
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["derived"]["model_channels"] == 40


def test_semvae_sized_data_is_refused_by_a_pca_model(pca_dataset, tmp_path):
    c = shrink_to_tiny(sfd_configs.get_config("ablate_pca"), 1)
    c.data.update(source="arrayrecord", path=pca_dataset, num_classes=4, read_threads=0, prefetch_batches=1)
    c.diffusion.semantic_chans = 16
    refused = r"32 texture \+ 8 semantic channels, the model needs 32 texture \+ 16 semantic"
    with pytest.raises(ValueError, match=refused):
        loop.run(c, str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# 3. paper rows
# ---------------------------------------------------------------------------------------------------------------
def test_every_paper_row_pairs_a_training_and_a_sampling_variant():
    doc = (REPO / "docs" / "training.md").read_text()
    rows = [
        line
        for line in doc.splitlines()
        if line.startswith("| ") and "configs/sfd.py:" in line and "configs/sample.py:" in line
    ]
    assert len(rows) == 14
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        train_variant = cells[1].split("configs/sfd.py:")[1].split("`")[0].split(" ")[0]
        sample_variant = cells[2].split("configs/sample.py:")[1].split("`")[0]
        train = sfd_configs.get_config(train_variant)
        config_lib.validate(train, device_count=8)
        s = sample_configs.get_config(sample_variant).sample
        assert s.delta_t == train.diffusion.delta_t, line
        if s.guidance == "autoguidance":
            assert s.guide_step in sfd_configs.get_config("guide_b").train.keep_steps, line
            assert f"{s.guide_step // 1000}K" in cells[4], line
            assert f"w {s.scale:g}" in cells[4], line
        steps = cells[1].split("(")[1].split(")")[0]
        assert train.train.num_steps >= {"4M": 4_000_000, "400K": 400_000}[steps], line
        # the 400K checkpoint of a 4M run must be kept (keep_every), the last step always is
        assert 400_000 % train.train.keep_every == 0, line
