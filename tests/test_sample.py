"""Sampling at scale (`--mode=sample`) and the in-training FID.

A tiny random DiT (8×8 latent, 10 classes) and a tiny random texture VAE (f2, 16×16 images) stand in for the real
weights; their parameters are drawn with numpy and loaded through the public converters, so no model is initialised
eagerly. The tests share one compiled generation program per mesh (Euler, 6 steps, 2 images per device; one more
with AutoGuidance) and one random FID Inception at 75×75 input. Run with OPENBLAS_NUM_THREADS=1 on a busy machine:
the two 2048×2048 FID eigendecompositions are ~10× slower with contended OpenBLAS threads.
"""

import json
import os
import pathlib
import random
import types

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401  (switches off eager sharding)
from sfd_jax import config_loader
from sfd_jax import parallel
from sfd_jax.convert.dit import expected_shapes, load_dit, save_dit
from sfd_jax.convert.inception import export_inception
from sfd_jax.convert.texture_vae import save_texture_vae
from sfd_jax.data import records
from sfd_jax.eval import evaluate, generator, in_training, sample
from sfd_jax.eval.generator import ImageGenerator, SamplerSettings, TextureDecoder, class_labels
from sfd_jax.models.inception import InceptionV3
from sfd_jax.models.lightningdit import DiTConfig, fixed_tables
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig

N = 64  # images of the sampling run
NUM_CLASSES = 10
SETTINGS = SamplerSettings(solver="euler", num_steps=6)
PER_DEVICE = 2
DIT_CFG = DiTConfig.from_size("tiny", input_size=8, num_classes=NUM_CLASSES)
VAE_CFG = TextureVAEConfig(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=16,
    z_channels=32,
    embed_dim=32,
    num_groups=4,
)
INCEPTION_SIZE = 75  # smallest input the network accepts: cheap on CPU, same code path as 299


# ----------------------------------------------------------------------------------------------- tiny models
def random_dit(seed: int):
    """LightningDiT with random weights (adaLN and final layers non-zero, so the velocity is not 0)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in expected_shapes(DIT_CFG).items():
        if "norm" in key.rsplit(".", 2)[0].split(".")[-1] and key.endswith(".weight"):
            sd[key] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            sd[key] = rng.standard_normal(shape) * 0.5 / np.sqrt(shape[1])
        else:
            sd[key] = 0.05 * rng.standard_normal(shape)
    pos_embed, (rope_cos, rope_sin) = fixed_tables(DIT_CFG)
    sd.update({"pos_embed": pos_embed[None], "feat_rope.freqs_cos": rope_cos, "feat_rope.freqs_sin": rope_sin})
    return load_dit({k: np.asarray(v, np.float32) for k, v in sd.items()}, config=DIT_CFG)[1]


def random_module(abstract: nnx.Module, seed: int, fill) -> nnx.Module:
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    flat = [
        (path, var.replace(np.asarray(fill(path, var.shape, rng), np.float32)))
        for path, var in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _vae_fill(path, shape, rng):
    if path[-1] == "kernel":
        return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    if path[-1] == "scale":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.1 * rng.standard_normal(shape)


def _inception_fill(path, shape, rng):
    if path[-1] == "kernel":
        return rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
    if path[-1] in ("scale", "var"):
        return np.ones(shape)
    return np.zeros(shape)


def tiny_features(images: np.ndarray) -> np.ndarray:
    """A user feature function for the in-training FID: 2×2 average-pooled colour layout (12 numbers)."""
    x = np.asarray(images, np.float32) / 255.0
    n, h, w, c = x.shape
    return x.reshape(n, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4)).reshape(n, -1)


def load_config(name: str, arg: str):
    return config_loader.load_config(f"configs/{name}.py:{arg}")


def mesh_of(n: int):
    return parallel.make_mesh((n, 1, 1), devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_assets")
    model = random_dit(0)
    vae = random_module(nnx.eval_shape(lambda: TextureVAE(VAE_CFG, rngs=nnx.Rngs(0))), 1, _vae_fill)
    rng = np.random.default_rng(2)
    mean, std = 0.1 * rng.standard_normal(32), 1.0 + 0.2 * rng.random(32)
    stats = {
        "format": records.STATS_FORMAT,
        "texture": {"mean": mean.tolist(), "std": std.tolist(), "channels": 32},
        "semantic": {"mean": [0.0] * 16, "std": [1.0] * 16, "channels": 16},
    }
    (root / "stats.json").write_text(json.dumps(stats))
    save_dit(root / "dit", DIT_CFG, model)
    save_texture_vae(root / "vae", vae)
    inception = random_module(InceptionV3(), 3, _inception_fill)
    np.savez(root / "inception.npz", **export_inception(inception))
    decoder = TextureDecoder(vae, mean, std)
    return types.SimpleNamespace(
        root=root,
        model=model,
        vae=vae,
        decoder=decoder,
        stats=str(root / "stats.json"),
        dit_dir=str(root / "dit"),
        vae_dir=str(root / "vae"),
        inception=str(root / "inception.npz"),
    )


def sample_config(assets, **overrides):
    c = load_config("sample", "tiny")
    c.sample.update(
        model=assets.dit_dir,
        texture_vae=assets.vae_dir,
        latent_stats=assets.stats,
        num_images=N,
        per_device_batch=PER_DEVICE,
        num_steps=SETTINGS.num_steps,
        chunk_size=16,
        log_every_s=0.0,
    )
    c.sample.update(overrides)
    return c


# --------------------------------------------------------------------------------------------------- labels
def test_class_labels():
    # The reference's balanced labels: image g of 50,000 has label g // 50.
    np.testing.assert_array_equal(
        class_labels(np.arange(50_000), num_images=50_000, num_classes=1000), np.repeat(np.arange(1000), 50)
    )
    counts = np.bincount(class_labels(np.arange(1003), num_images=1003, num_classes=10), minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1003
    rand = class_labels(np.arange(5000), num_images=5000, num_classes=10, mode="random", seed=3)
    assert set(np.unique(rand)) == set(range(10))
    # a random label depends on (seed, index) only
    np.testing.assert_array_equal(
        rand[[7, 4000]], class_labels([7, 4000], num_images=4001, num_classes=10, mode="random", seed=3)
    )
    assert not np.array_equal(
        rand, class_labels(np.arange(5000), num_images=5000, num_classes=10, mode="random", seed=4)
    )
    assert set(class_labels(np.arange(9), num_images=9, num_classes=10, mode="unconditional")) == {10}
    with pytest.raises(ValueError, match="labels mode"):
        class_labels([0], num_images=1, num_classes=10, mode="balance")
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        class_labels([5], num_images=5, num_classes=10)


# ----------------------------------------------------------------------------------- device-count invariance
def test_same_images_on_1_and_8_devices(assets):
    indices = np.random.default_rng(0).permutation(N)[:16]
    labels = class_labels(indices, num_images=N, num_classes=NUM_CLASSES)
    generator.clear_programs()  # an earlier test in this process may have compiled one of these programs already
    before = generator.trace_count()
    one = ImageGenerator(assets.decoder, settings=SETTINGS, mesh=mesh_of(1), per_device_batch=PER_DEVICE)
    eight = ImageGenerator(assets.decoder, settings=SETTINGS, mesh=mesh_of(8), per_device_batch=PER_DEVICE)
    images_1, stats_1 = one(assets.model, indices, labels)  # 8 batches of 2 on one device
    images_8, stats_8 = eight(assets.model, indices, labels)  # 1 batch of 16 over 8 devices
    assert generator.trace_count() - before == 2  # one program per mesh, reused across batches
    assert len(stats_1) == 8 and len(stats_8) == 1 and stats_8[0].nfe == SETTINGS.num_steps
    chex.assert_shape(images_8, (16, 16, 16, 3))
    assert images_8.dtype == np.uint8 and images_8.std() > 10  # a real picture, not a constant
    assert len({im.tobytes() for im in images_8}) == 16
    np.testing.assert_array_equal(images_1, images_8)
    # other batch partners (reversed order, padded last batch) leave every image unchanged
    images_rev, _ = eight(assets.model, indices[::-1][:11], labels[::-1][:11])
    np.testing.assert_array_equal(images_rev, images_8[::-1][:11])
    assert generator.trace_count() - before == 2


def test_autoguidance_reaches_the_guide(assets):
    # out = g + w·(main − g): with w = 0 the images are the guide's own (same labels, same noise), up to the float
    # rounding of a differently fused program.
    from sfd_jax.diffusion.guidance import AutoGuidance

    indices = np.arange(0, N, 4)
    labels = class_labels(indices, num_images=N, num_classes=NUM_CLASSES)
    guide = random_dit(7)
    gen = ImageGenerator(assets.decoder, settings=SETTINGS, mesh=mesh_of(8), per_device_batch=PER_DEVICE)
    guided, _ = gen(assets.model, indices, labels, guidance=AutoGuidance(guide, scale=0.0))
    own, _ = gen(guide, indices, labels)
    main, _ = gen(assets.model, indices, labels)
    diff = np.abs(guided.astype(int) - own)
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
    assert np.mean(np.abs(guided.astype(int) - main)) > 1  # the main model alone: ~5 levels away


# ------------------------------------------------------------------------------------- the --mode=sample run
@pytest.fixture(scope="module")
def sampled(assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sample_run")
    summary = sample.run(sample_config(assets), str(workdir))
    return workdir, summary


def test_run_outputs(assets, sampled):
    workdir, summary = sampled
    assert summary["sampled_this_run"] == N and summary["resumed_images"] == 0
    assert summary["nfe_per_image_mean"] == SETTINGS.num_steps
    with np.load(summary["npz"]) as z:
        arr, lab = z["arr_0"], z["arr_1"]
    chex.assert_shape(arr, (N, 16, 16, 3))
    # Row r holds image perm[r], perm from Python's random.Random(42).shuffle (the reference's shuffle).
    perm = list(range(N))
    random.Random(42).shuffle(perm)
    labels = (np.arange(N) * NUM_CLASSES) // N
    np.testing.assert_array_equal(lab, labels[perm])
    chunks = sample.scan_chunks(str(workdir / "chunks"), N)
    assert [(s, e) for s, e, _ in chunks] == [(s, s + 16) for s in range(0, N, 16)]
    unshuffled = np.concatenate([np.load(p) for _, _, p in chunks])
    np.testing.assert_array_equal(arr, unshuffled[perm])
    # the in-memory generator gives the same images as the run
    gen = ImageGenerator(assets.decoder, settings=SETTINGS, mesh=mesh_of(8), per_device_batch=PER_DEVICE)
    some = np.array([0, 9, 33, 63])
    np.testing.assert_array_equal(gen(assets.model, some, labels[some])[0], unshuffled[some])
    assert (workdir / "grid.png").exists() and (workdir / "sample.json").exists()


def test_restart_gives_identical_npz(assets, sampled, tmp_path, monkeypatch):
    """Killed after its first chunk and restarted, a run ends with the same npz bytes as the uninterrupted one —
    here with chunks of 24 (batches of 16 straddle them, so the resumed images get other batch partners)."""
    _, first = sampled
    real_write, written = sample.write_chunk, []

    def interrupted_write(directory, start, images):
        if written:
            (pathlib.Path(directory) / "0000024-0000048.npy.tmp").write_bytes(b"half a chunk")
            raise KeyboardInterrupt("preempted")
        written.append(start)
        return real_write(directory, start, images)

    monkeypatch.setattr(sample, "write_chunk", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        sample.run(sample_config(assets, chunk_size=24), str(tmp_path))
    monkeypatch.setattr(sample, "write_chunk", real_write)
    assert [(s, e) for s, e, _ in sample.scan_chunks(str(tmp_path / "chunks"), N)] == [(0, 24)]
    resumed = sample.run(sample_config(assets, chunk_size=24), str(tmp_path))
    assert resumed["resumed_images"] == 24 and resumed["sampled_this_run"] == 40
    assert pathlib.Path(resumed["npz"]).read_bytes() == pathlib.Path(first["npz"]).read_bytes()
    # settings that change the images are refused in the same workdir
    with pytest.raises(ValueError, match="seed"):
        c = sample_config(assets, chunk_size=24)
        c.seed = 1
        sample.run(c, str(tmp_path))


def test_bad_sample_config(assets, tmp_path):
    with pytest.raises(ValueError, match="num_steps"):
        sample.run(sample_config(assets, num_steps=0), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="sample.model"):
        sample.run(sample_config(assets, model=str(tmp_path / "missing")), str(tmp_path))
    with pytest.raises(ValueError, match="guidance"):
        sample.run(sample_config(assets, guidance="classifier"), str(tmp_path))


# ---------------------------------------------------------------------------- end to end: npz → metrics JSON
def eval_config(assets, task: str, **fields):
    c = load_config("eval", task)
    c.eval.update(
        inception_weights=assets.inception,
        input_size=INCEPTION_SIZE,
        batch_size=N,
        reference_keep=0,
        cache_reference=False,
        **fields,
    )
    return c


def test_end_to_end_metrics_json(assets, sampled, tmp_path):
    """tiny model → 64 samples → npz → `--mode=evaluate` JSON against a reference batch that `--mode=evaluate`
    built from the run's own images in index order (the npz is shuffled): the scores of identical sets are known."""
    workdir, summary = sampled
    own = np.concatenate([np.load(p) for _, _, p in sample.scan_chunks(str(workdir / "chunks"), N)])
    np.savez(tmp_path / "own.npz", arr_0=own)
    ref = tmp_path / "ref_own.npz"
    evaluate.run(
        eval_config(assets, "build_reference", images=str(tmp_path / "own.npz"), reference_out=str(ref)),
        str(tmp_path / "build"),
    )
    with np.load(ref) as z:
        assert z["arr_0"].shape == (N, 16, 16, 3) and np.trace(z["sigma"]) > 0 and np.trace(z["sigma_s"]) > 0
    out = tmp_path / "score.json"
    evaluate.run(
        eval_config(assets, "score", samples=summary["npz"], ref_batch=str(ref), output=str(out)),
        str(tmp_path / "score"),
    )
    result = json.loads(out.read_text())
    assert result["num_samples"] == N and result["input_size"] == INCEPTION_SIZE
    assert result["samples"] == os.path.abspath(summary["npz"])
    # The same images in another order: FID and sFID 0, every sample inside the reference manifold and vice versa.
    assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    # IS, recomputed from the network's logits on the same images in one unsharded call, in float64 NumPy: exp of
    # the mean KL(p(y|x) || p(y)) over the one split these 64 images make (ADM splits by 5,000).
    from sfd_jax.convert.inception import load_inception
    from sfd_jax.models.inception import features_from_uint8

    with np.load(summary["npz"]) as z:
        images = z["arr_0"]
    net = load_inception(assets.inception)
    forward = jax.jit(lambda x: features_from_uint8(net, x, resize="tf1", size=INCEPTION_SIZE)["logits_nobias"])
    logits = np.asarray(forward(images), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kl = np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=-1)
    assert result["inception_score"] == pytest.approx(np.exp(kl.mean()), rel=1e-4)


# ------------------------------------------------------------------------------------------- in-training FID
def eval_context(assets, model, workdir, step=10, **eval_fields):
    from sfd_jax.train.loop import EvalContext

    config = load_config("sfd", "tiny")
    config.eval.update(every=10, fn="sfd_jax.eval.in_training:fid")
    for k, v in dict(
        num_images=16,
        texture_vae=assets.vae_dir,
        latent_stats=assets.stats,
        solver="euler",
        num_steps=SETTINGS.num_steps,
        per_device_batch=PER_DEVICE,
        decode_batch=0,
        grid_size=4,
        **eval_fields,
    ).items():
        config.eval[k] = v
    setup = types.SimpleNamespace(merge=lambda params, aux: params)
    return EvalContext(
        step=step,
        config=config,
        workdir=str(workdir),
        mesh=mesh_of(8),
        model_cfg=DIT_CFG,
        setup=setup,
        params=None,
        ema_params=model,
        aux=None,
    )


def test_in_training_fid(assets, tmp_path):
    # The reference: the same 16 fixed images (indices, labels, noise) the callback draws, from the same model.
    labels = class_labels(np.arange(16), num_images=16, num_classes=NUM_CLASSES)
    gen = ImageGenerator(assets.decoder, settings=SETTINGS, mesh=mesh_of(8), per_device_batch=PER_DEVICE)
    np.savez(tmp_path / "ref.npz", arr_0=gen(assets.model, np.arange(16), labels)[0])

    # user feature function
    hook = in_training.make_eval_fn(feature_fn=tiny_features, ref_batch=str(tmp_path / "ref.npz"))
    same = hook(eval_context(assets, assets.model, tmp_path))
    assert abs(same["fid"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["nfe_per_image"] == SETTINGS.num_steps
    other = hook(eval_context(assets, random_dit(5), tmp_path, step=20))
    assert other["fid"] > 1e-3
    assert (tmp_path / "eval_grids" / "step_0000020.png").exists()

    # the config-driven hook with the FID Inception (the same extractor batch as the test above: one compile):
    # the five ADM numbers, for another model than the reference's
    ctx = eval_context(
        assets,
        random_dit(5),
        tmp_path,
        ref_batch=str(tmp_path / "ref.npz"),
        inception_weights=assets.inception,
        input_size=INCEPTION_SIZE,
        feature_batch=N,
    )
    result = in_training.fid(ctx)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(result)
    assert result["fid"] > 1e-3 and result["sfid"] > 1e-3
    assert all(isinstance(v, float) and np.isfinite(v) for v in result.values())


def test_in_training_needs_features(assets, tmp_path):
    with pytest.raises(ValueError, match="feature_fn"):
        in_training.fid(eval_context(assets, assets.model, tmp_path, ref_batch=str(tmp_path / "x.npz")))
