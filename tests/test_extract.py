"""Latent extraction with tiny random encoders: record contents, resume after a crash, stats, PCA, `--mode` entry."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import assert_close
from sfd_jax import config_loader
from sfd_jax.data import records
from sfd_jax.data.encoders import Encoders
from sfd_jax.data.extract import ExtractOptions, extract
from sfd_jax.data.preprocess import adm_center_crop, dino_transform
from sfd_jax.data.sources import BadImageError, ImageFolderSource
from sfd_jax.models.dinov2 import Dinov2, Dinov2Config
from sfd_jax.models.semvae import SemVAE, SemVAEConfig
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig

TEX_CFG = TextureVAEConfig(
    ch=8,
    ch_mult=(1, 1, 1),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=32,
    z_channels=4,
    embed_dim=4,
    num_groups=4,
)
DINO_CFG = Dinov2Config(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, num_register_tokens=2
)
SEM_CFG = SemVAEConfig(input_dim=32, hidden_dim=16, bottleneck_dim=3, num_heads=2, num_blocks=1)
# 32 px crops → texture 8×8×4 (factor 4); DINOv2 at 112 px, patch 14 → 8×8 tokens of width 32.
OPTS = dict(image_size=32, dino_size=112, batch_size_per_device=1, shard_size=4, stats_images=6, seed=3)
NUM_IMAGES = 14


def load_config(name, variant):
    return config_loader.load_config(f"configs/{name}:{variant}")


def numpy_init(ctor, seed):
    """Build a module with random numpy parameters (N(0, 1/fan_in) weights, unit scales, zero biases).

    Eager flax initialisation compiles one XLA program per parameter shape, which costs far more than these tests;
    the encoders only need to be fixed random functions.
    """
    graphdef, params, rest = nnx.split(nnx.eval_shape(ctor), nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        name = str(path[-1])
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = max(math.prod(leaf.shape[:-1]), 1)
        return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, params), rest)


@pytest.fixture(scope="module")
def encoders():
    return Encoders(
        numpy_init(lambda: TextureVAE(TEX_CFG, rngs=nnx.Rngs(0)), 0),
        numpy_init(lambda: Dinov2(DINO_CFG, rngs=nnx.Rngs(0)), 1),
        numpy_init(lambda: SemVAE(SEM_CFG, rngs=nnx.Rngs(0)), 2),
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for k in range(NUM_IMAGES):
        cls = root / f"class{k % 3}"
        cls.mkdir(exist_ok=True)
        h, w = 32 + 3 * (k % 4), 40 - 2 * (k % 3)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(cls / f"img{k:02d}.png")
    return str(root)


@pytest.fixture(scope="module")
def reference_run(folder, encoders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    summary = extract(ImageFolderSource(folder), out, encoders, ExtractOptions(**OPTS), progress=False)
    return out, summary


class FailingSource:
    """Wraps a source and raises at one index, like a job killed in the middle of a shard."""

    def __init__(self, source, fail_at):
        self.source, self.fail_at = source, fail_at
        self.num_classes = source.num_classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.source[i]

    def describe(self):
        return self.source.describe()


read_all = records.read_images  # (meta, layout, unpacked image records)


def test_records_hold_image_and_flip_tokens(reference_run, folder, encoders):
    out, summary = reference_run
    assert summary["complete"] and summary["num_shards"] == 4
    meta, layout, recs = read_all(out)
    assert layout.texture_shape == (8, 8, 4) and layout.semantic_shape == (8, 8, 3)
    assert layout.dino_shape == (64, 32) and layout.feature_dtype == "float16"
    src = ImageFolderSource(folder)
    assert [r["index"] for r in recs] == list(range(NUM_IMAGES))
    assert [r["label"] for r in recs] == [int(label) for label in src.labels]
    # REPA targets: DINOv2 tokens of the reference preprocessing (numpy path) of the crop and of its mirror image.
    patch_tokens = nnx.jit(lambda m, p: m.patch_tokens(p))  # compiled: one program, not one per eager operation
    for i in (0, 9):
        crop = adm_center_crop(src[i][0], 32)
        for flip, key in ((False, "dino"), (True, "dino_flip")):
            pixels = dino_transform(crop[:, ::-1] if flip else crop, 112)
            want = np.asarray(patch_tokens(encoders.dinov2, pixels[None]))[0]
            np.testing.assert_allclose(recs[i][key].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    # Posterior samples: μ + σ·ε with fresh noise per image and per flip.
    crop = adm_center_crop(src[5][0], 32)
    x = crop.astype(np.float32) / 127.5 - 1
    mean, logvar = (np.asarray(a)[0] for a in nnx.jit(lambda m, v: m.encode(v))(encoders.texture_vae, x[None]))
    eps = (recs[5]["texture"] - mean) / np.exp(0.5 * logvar)
    assert 0.5 < eps.std() < 1.5 and abs(eps.mean()) < 0.3
    assert not np.allclose(recs[5]["texture"], recs[5]["texture_flip"])
    assert not np.allclose(recs[5]["texture"], recs[6]["texture"])


def test_stats_are_moments_of_selected_records(reference_run):
    out, _ = reference_run
    _, _, recs = read_all(out)
    stats = records.read_json(os.path.join(out, "stats.json"), "stats")
    chosen = records.stats_selection(NUM_IMAGES, OPTS["stats_images"], OPTS["seed"])
    assert stats["num_images"] == len(chosen) == 6
    for part, ch in (("texture", 4), ("semantic", 3)):
        values = np.stack([recs[i][part] for i in chosen]).astype(np.float64).reshape(-1, ch)
        # float64 sums of n values in another order: n·eps of the values' largest |value| (measured ≤ 6e-17 of it)
        rel = len(values) * np.finfo(np.float64).eps
        assert_close(stats[part]["mean"], values.mean(0), rel, scale=np.abs(values).max())
        assert_close(stats[part]["std"], values.std(0, ddof=1), rel, scale=np.abs(values).max())
    made_by = stats["made_by"]
    assert set(made_by) == {"texture_vae", "dinov2", "semvae"}
    assert made_by["dinov2"]["config"]["hidden_size"] == 32 and len(made_by["semvae"]["sha256"]) == 64


def test_crash_and_resume_gives_identical_dataset(reference_run, folder, encoders, tmp_path):
    ref_dir, _ = reference_run
    out = str(tmp_path / "resumed")
    names = [records.shard_name("latents", s, 4) for s in range(4)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(
            FailingSource(ImageFolderSource(folder), fail_at=9), out, encoders, ExtractOptions(**OPTS), progress=False
        )
    assert [records.shard_done(out, n) for n in names] == [True, True, False, False]
    assert not [f for f in os.listdir(out) if ".tmp-" in f]  # the failed shard left no partial file
    assert not os.path.exists(os.path.join(out, "stats.json"))
    # Aftermath of a hard kill: shard 1 renamed but its .json never written, a stale temp file of shard 3.
    os.remove(os.path.join(out, names[1] + ".json"))
    with open(os.path.join(out, names[3] + ".tmp-99999"), "wb") as f:
        f.write(b"partial")
    kept = os.stat(os.path.join(out, names[0])).st_mtime_ns
    # max_shards stops early (no stats yet), the next run finishes.
    partial = extract(ImageFolderSource(folder), out, encoders, ExtractOptions(**OPTS, max_shards=1), progress=False)
    assert partial["shards_written"] == 1 and not partial["complete"]
    summary = extract(ImageFolderSource(folder), out, encoders, ExtractOptions(**OPTS), progress=False)
    assert summary["shards_written"] == 2 and summary["complete"]
    assert os.stat(os.path.join(out, names[0])).st_mtime_ns == kept  # finished shard not redone
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    for name in names:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(ref_dir, name), "rb") as b:
            assert a.read() == b.read(), name
    for name in ("stats.json", "dataset.json"):
        assert records.read_json(os.path.join(out, name), name) == records.read_json(os.path.join(ref_dir, name), name)


def test_two_processes_split_the_shards(reference_run, folder, encoders, tmp_path):
    ref_dir, _ = reference_run
    out = str(tmp_path / "two")
    names = [records.shard_name("latents", s, 4) for s in range(4)]
    second = extract(
        ImageFolderSource(folder),
        out,
        encoders,
        ExtractOptions(**OPTS),
        process_index=1,
        process_count=2,
        progress=False,
    )
    assert [records.shard_done(out, n) for n in names] == [False, True, False, True]
    assert "stats" not in second  # process 0 writes the statistics
    extract(
        ImageFolderSource(folder),
        out,
        encoders,
        ExtractOptions(**OPTS),
        process_index=0,
        process_count=2,
        progress=False,
    )
    for name in names + ["stats.json"]:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(ref_dir, name), "rb") as b:
            assert a.read() == b.read(), name


def test_resume_refuses_other_settings(reference_run, folder, encoders):
    out, _ = reference_run
    with pytest.raises(ValueError, match="different extraction"):
        extract(ImageFolderSource(folder), out, encoders, ExtractOptions(**{**OPTS, "seed": 4}), progress=False)


def test_bad_images_error_or_skip(folder, encoders, tmp_path):
    root = tmp_path / "with_bad"
    shutil.copytree(folder, root)
    (root / "class1" / "img99.png").write_bytes(b"\x89PNG broken")
    src = ImageFolderSource(str(root))
    with pytest.raises(BadImageError, match="img99.png"):
        extract(src, str(tmp_path / "strict"), encoders, ExtractOptions(**OPTS), progress=False)
    out = str(tmp_path / "skip")
    summary = extract(src, out, encoders, ExtractOptions(**OPTS, skip_bad_images=True), progress=False)
    assert summary["complete"] and summary["stats"]["skipped_images_in_dataset"] == 1
    _, _, recs = read_all(out)
    bad_index = src.files.index(str(root / "class1" / "img99.png"))
    assert len(recs) == NUM_IMAGES and bad_index not in [r["index"] for r in recs]
    metas = [records.read_json(os.path.join(out, n + ".json"), "meta") for n in records.load_dataset(out)[0]["shards"]]
    skipped = [s for m in metas for s in m["skipped"]]
    assert len(skipped) == 1 and "img99.png" in skipped[0]["error"]


def test_pca_semantic_latents(folder, encoders, tmp_path):
    out = str(tmp_path / "pca")
    pca_encoders = Encoders(encoders.texture_vae, encoders.dinov2)
    extract(
        ImageFolderSource(folder),
        out,
        pca_encoders,
        ExtractOptions(**OPTS, semantic="pca", pca_components=3, pca_fit_images=5),
        progress=False,
    )
    _, layout, recs = read_all(out)
    assert layout.semantic_shape == (8, 8, 3)
    with np.load(os.path.join(out, "pca.npz")) as z:
        comps, mean, std = z["components"], z["token_mean"], z["token_std"]
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-5)
    for r in recs[:3]:
        for suffix in ("", "_flip"):
            tokens = r["dino" + suffix].astype(np.float32)
            want = ((tokens - mean) / std) @ comps.T
            np.testing.assert_allclose(r["semantic" + suffix].reshape(64, 3), want, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="semantic='semvae'.*lack a SemVAE"):
        extract(ImageFolderSource(folder), str(tmp_path / "x"), pca_encoders, ExtractOptions(**OPTS))


def test_mode_extract_from_checkpoint_files(folder, encoders, reference_run, tmp_path):
    from sfd_jax.convert.dinov2 import save_pretrained
    from sfd_jax.convert.semvae import save_semvae
    from sfd_jax.convert.texture_vae import save_texture_vae
    from sfd_jax.data.extract import run

    save_texture_vae(tmp_path / "tvae", encoders.texture_vae)
    save_pretrained(encoders.dinov2, tmp_path / "dino")
    save_semvae(tmp_path / "semvae", encoders.semvae)
    config = load_config("extract.py", "folder")
    config.extract.source.path = folder
    config.extract.texture_vae = str(tmp_path / "tvae")
    config.extract.dinov2 = str(tmp_path / "dino")
    config.extract.semvae = str(tmp_path / "semvae")
    config.extract.semvae_num_heads = 2
    config.extract.num_workers = 2
    config.extract.progress = False
    for key, value in OPTS.items():
        config.extract[key] = value
    out = str(tmp_path / "work")
    summary = run(config, out)
    assert summary["complete"]
    ref_dir, _ = reference_run
    # Same weights through checkpoint files → the same records as the in-memory encoders.
    _, _, a = read_all(out)
    _, _, b = read_all(ref_dir)
    for ra, rb in zip(a, b):
        for key in ("texture", "semantic_flip", "dino"):
            np.testing.assert_array_equal(ra[key], rb[key])
    made_by = json.load(open(os.path.join(out, "stats.json")))["made_by"]
    assert made_by["texture_vae"]["source"].endswith("tvae")
    assert (
        made_by["texture_vae"]["sha256"]
        == records.read_json(os.path.join(ref_dir, "stats.json"), "stats")["made_by"]["texture_vae"]["sha256"]
    )
