"""The Grain latent reader: sharding, flips, normalisation, resumable state, refusals."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import assert_close
from sfd_jax.data import pipeline, records
from sfd_jax.models.dinov2 import Dinov2Config
from sfd_jax.models.semvae import SemVAEConfig
from sfd_jax.models.texture_vae import TextureVAEConfig

N = 42
LAYOUT = records.RecordLayout((2, 2, 3), (2, 2, 2), (4, 5), "float32", "float16")
TEX_MEAN, TEX_STD = np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 4.0])
SEM_MEAN, SEM_STD = np.array([0.25, 3.0]), np.array([1.5, 8.0])


def fields_of(index: int, flip: bool) -> dict:
    """Record contents that encode (index, flip) in every field, exactly representable in fp16/fp32."""
    f = 0.5 if flip else 0.0
    return {
        "texture": np.full(LAYOUT.texture_shape, index * 4 + f) + np.arange(3) * 0.25,
        "semantic": np.full(LAYOUT.semantic_shape, -index * 4 - f) + np.arange(2) * 0.125,
        "dino": np.full(LAYOUT.dino_shape, index + f),
    }


def write_dataset(directory, n=N, shard_sizes=(10, 10, 12, 10), stats=True):
    os.makedirs(directory, exist_ok=True)
    names = [records.shard_name("latents", s, len(shard_sizes)) for s in range(len(shard_sizes))]
    start = 0
    for name, size in zip(names, shard_sizes):
        idx = np.arange(start, start + size)
        arrays = {}
        for flip, suffix in ((False, ""), (True, "_flip")):
            per = [fields_of(int(i), flip) for i in idx]
            for key in records.BLOCK_FIELDS:
                arrays[key + suffix] = np.stack([p[key] for p in per])
        w = records.ShardWriter(os.path.join(directory, name))
        w.write(LAYOUT.pack_pairs(index=idx, label=idx % 7, **arrays))
        w.commit()
        records.write_json_atomic(os.path.join(directory, name + ".json"), {"num_records": size})
        start += size
    assert start == n
    records.write_json_atomic(
        os.path.join(directory, "dataset.json"), {"format": records.FORMAT, "layout": LAYOUT.to_json(), "shards": names}
    )
    if stats:
        records.write_json_atomic(
            os.path.join(directory, "stats.json"),
            {
                "format": records.STATS_FORMAT,
                "texture": {"mean": TEX_MEAN.tolist(), "std": TEX_STD.tolist()},
                "semantic": {"mean": SEM_MEAN.tolist(), "std": SEM_STD.tolist()},
            },
        )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("latents"))
    write_dataset(d)
    return d


# Tiny encoders that produce the DiT's data format (configs/sfd.py:tiny): 16×16 grid, 32 texture + 16 semantic
# channels, 256 REPA tokens of width 768. Shared with tests/test_gcs.py.
DIT_TEX_CFG = TextureVAEConfig(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=32,
    z_channels=32,
    embed_dim=32,
    num_groups=4,
)
DIT_DINO_CFG = Dinov2Config(
    hidden_size=768, num_hidden_layers=1, num_attention_heads=12, mlp_ratio=1, image_size=56, num_register_tokens=1
)
DIT_SEM_CFG = SemVAEConfig(input_dim=768, hidden_dim=16, bottleneck_dim=16, num_heads=2, num_blocks=1)


def cfg(path, **kw):
    return {"source": "arrayrecord", "path": path, "read_threads": 2, "prefetch_batches": 2, **kw}


def take(it, k):
    return [next(it) for _ in range(k)]


def test_two_processes_disjoint_and_covering(dataset):
    seen = []
    for pi in range(2):
        it = pipeline.make_iterator(
            cfg(dataset), batch_size=3, process_index=pi, process_count=2, seed=5, with_meta=True
        )
        seen.append(np.concatenate([b["index"] for b in take(it, 7)]))  # 21 records = one epoch per process
    assert len(set(seen[0])) == 21 and len(set(seen[1])) == 21
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(N))
    assert not np.array_equal(np.sort(seen[0]), seen[0])  # shuffled, not shard order


def test_batch_contents_flip_consistency_and_normalisation(dataset):
    it = pipeline.make_iterator(
        cfg(dataset, latent_multiplier=0.5), batch_size=6, process_index=0, process_count=1, seed=1, with_meta=True
    )
    batches = take(it, 7)  # one full epoch
    b = batches[0]
    assert b["x1"].shape == (6, 2, 2, 5) and b["x1"].dtype == np.float32
    assert b["y"].dtype == np.int32 and b["dino"].shape == (6, 4, 5) and b["dino"].dtype == np.float16
    flips = np.concatenate([x["flip"] for x in batches])
    assert 0 < flips.sum() < len(flips)  # both choices occur
    mean = np.concatenate([TEX_MEAN, SEM_MEAN])
    std = np.concatenate([TEX_STD, SEM_STD])
    for batch in batches:
        for row in range(6):
            i, flip = int(batch["index"][row]), bool(batch["flip"][row])
            want = fields_of(i, flip)
            raw = np.concatenate([want["texture"], want["semantic"]], axis=-1)
            np.testing.assert_allclose(batch["x1"][row], (raw - mean) / std * 0.5, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(batch["dino"][row], want["dino"].astype(np.float16))
            assert batch["y"][row] == i % 7
    # One epoch of a single process covers every record once.
    assert sorted(np.concatenate([x["index"] for x in batches])) == list(range(N))


def test_no_flip_option(dataset):
    it = pipeline.make_iterator(
        cfg(dataset, random_flip=False), batch_size=7, process_index=0, process_count=1, seed=1, with_meta=True
    )
    assert not any(b["flip"].any() for b in take(it, 3))


def test_state_roundtrip_continues_exact_order(dataset):
    kw = dict(batch_size=4, process_index=1, process_count=2, seed=3, with_meta=True)
    it = pipeline.make_iterator(cfg(dataset), **kw)
    take(it, 6)  # crosses the epoch boundary (21 records per process per epoch)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    resumed = pipeline.make_iterator(cfg(dataset), **kw)
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 3)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = pipeline.make_iterator(cfg(dataset), **{**kw, "seed": 4})
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_global_batches_do_not_depend_on_process_count(dataset):
    """Same global batch (12): 2 processes × 6 or 3 processes × 4 or 1 × 12 give the same samples and flips, and a
    state saved with 2 processes restores onto 3."""

    def global_batches(pc, steps, state=None):
        out = []
        its = [
            pipeline.make_iterator(
                cfg(dataset), batch_size=12 // pc, process_index=p, process_count=pc, seed=7, with_meta=True
            )
            for p in range(pc)
        ]
        if state is not None:
            for it in its:
                it.set_state(state)
        for _ in range(steps):
            parts = [next(it) for it in its]
            out.append(sorted(zip(*(np.concatenate([b[k] for b in parts]).tolist() for k in ("index", "flip")))))
        return out, its[0].get_state()

    single, _ = global_batches(1, 5)  # 42 images → 3 global batches per epoch: crosses two epoch boundaries
    two, state = global_batches(2, 2)
    assert two == single[:2]
    three, _ = global_batches(3, 3, state=state)
    assert three == single[2:]
    assert len({i for batch in single[:3] for i, _ in batch}) == 36  # one epoch: 36 distinct images


def test_epochs_reshuffle_and_seeds_differ(dataset):
    it = pipeline.make_iterator(cfg(dataset), batch_size=6, process_index=0, process_count=1, seed=0, with_meta=True)
    epochs = [np.concatenate([b["index"] for b in take(it, 7)]) for _ in range(2)]
    assert sorted(epochs[1]) == list(range(N)) and not np.array_equal(epochs[0], epochs[1])
    it2 = pipeline.make_iterator(cfg(dataset), batch_size=6, process_index=0, process_count=1, seed=9, with_meta=True)
    assert not np.array_equal(next(it2)["index"], epochs[0][:6])


def test_refuses_missing_or_mismatched_stats(tmp_path):
    d = str(tmp_path / "d")
    write_dataset(d, stats=False)
    with pytest.raises(FileNotFoundError, match="stats.json"):
        pipeline.make_iterator(cfg(d), batch_size=2, process_index=0, process_count=1, seed=0)
    records.write_json_atomic(
        os.path.join(d, "stats.json"),
        {
            "format": records.STATS_FORMAT,
            "texture": {"mean": [0.0] * 4, "std": [1.0] * 4},
            "semantic": {"mean": SEM_MEAN.tolist(), "std": SEM_STD.tolist()},
        },
    )
    with pytest.raises(ValueError, match=r"texture.mean has shape \(4,\).*\(2, 2, 3\)"):
        pipeline.make_iterator(cfg(d), batch_size=2, process_index=0, process_count=1, seed=0)


def test_refuses_incomplete_dataset_and_bad_config(dataset, tmp_path):
    d = str(tmp_path / "copy")
    shutil.copytree(dataset, d)
    os.remove(os.path.join(d, records.shard_name("latents", 2, 4) + ".json"))
    with pytest.raises(FileNotFoundError, match="unfinished.*latents-00002-of-00004"):
        pipeline.make_iterator(cfg(d), batch_size=2, process_index=0, process_count=1, seed=0)
    with pytest.raises(ValueError, match="data.source='tfds'"):
        pipeline.make_iterator(cfg(dataset, source="tfds"), batch_size=2, process_index=0, process_count=1, seed=0)
    with pytest.raises(ValueError, match="fewer than the global batch 60"):
        pipeline.make_iterator(cfg(dataset), batch_size=30, process_index=0, process_count=2, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_iterator(cfg(dataset), batch_size=2, process_index=2, process_count=2, seed=0)


def test_record_layout_roundtrip_and_errors():
    idx = np.array([3, 9])
    arrays = {}
    for flip, suffix in ((False, ""), (True, "_flip")):
        for key in records.BLOCK_FIELDS:
            arrays[key + suffix] = np.stack([fields_of(int(i), flip)[key] for i in idx])
    packed = LAYOUT.pack_pairs(index=idx, label=[1, 2], **arrays)
    assert len(packed) == 4 and all(len(r) == LAYOUT.size and LAYOUT.size % 16 == 0 for r in packed)
    assert [LAYOUT.header(r) for r in packed] == [(3, 1, 0), (3, 1, 1), (9, 2, 0), (9, 2, 1)]
    rec = LAYOUT.unpack_pair(packed[2], packed[3])
    assert rec["index"] == 9 and rec["label"] == 2
    np.testing.assert_array_equal(rec["semantic_flip"], fields_of(9, True)["semantic"])
    np.testing.assert_array_equal(rec["dino"], fields_of(9, False)["dino"])
    with pytest.raises(ValueError, match="not the two views of one image"):
        LAYOUT.unpack_pair(packed[1], packed[2])
    assert records.RecordLayout.from_json(json.loads(json.dumps(LAYOUT.to_json()))) == LAYOUT
    with pytest.raises(ValueError, match="missing fields"):
        LAYOUT.pack_pairs(index=idx, label=[1, 2], texture=arrays["texture"])
    with pytest.raises(ValueError, match="field dino has shape"):
        LAYOUT.pack_pairs(index=idx, label=[1, 2], **{**arrays, "dino": arrays["dino"][:, :2]})
    with pytest.raises(ValueError, match="latent_dtype='int8'"):
        records.RecordLayout((2, 2, 3), (2, 2, 2), (4, 5), "int8")


def test_moments_merge_equals_direct():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (50, 4, 4, 3))
    merged = records.Moments()
    for part in np.array_split(x, [7, 8, 30]):
        merged = merged.merge(records.Moments.of(part))
    flat = x.reshape(-1, 3)
    # merged float64 moments vs one pass: n·eps of the values' largest |value| (measured ≤ 2e-16 of it)
    rel = len(flat) * np.finfo(np.float64).eps
    assert_close(merged.mean, flat.mean(0), rel, scale=np.abs(flat).max())
    assert_close(merged.std(), flat.std(0, ddof=1), rel, scale=np.abs(flat).max())


def test_train_mode_on_extracted_latents(tmp_path):
    """Image folder → `--mode=extract` encoders (tiny, random) → `--mode=train` on the ArrayRecord latents."""
    from flax import nnx
    from PIL import Image
    from test_extract import load_config, numpy_init

    from sfd_jax.data.encoders import Encoders
    from sfd_jax.data.extract import ExtractOptions, extract
    from sfd_jax.data.sources import ImageFolderSource
    from sfd_jax.main import resolve_mode
    from sfd_jax.models.dinov2 import Dinov2
    from sfd_jax.models.semvae import SemVAE
    from sfd_jax.models.texture_vae import TextureVAE
    from sfd_jax.train.metrics import read_metrics

    rng = np.random.default_rng(0)
    for k in range(16):
        (tmp_path / "img" / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 32, 3), np.uint8)).save(tmp_path / "img" / f"c{k % 3}" / f"{k}.png")
    encoders = Encoders(
        numpy_init(lambda: TextureVAE(DIT_TEX_CFG, rngs=nnx.Rngs(0)), 0),
        numpy_init(lambda: Dinov2(DIT_DINO_CFG, rngs=nnx.Rngs(0)), 1),
        numpy_init(lambda: SemVAE(DIT_SEM_CFG, rngs=nnx.Rngs(0)), 2),
    )
    data_dir = str(tmp_path / "latents")
    extract(
        ImageFolderSource(str(tmp_path / "img")),
        data_dir,
        encoders,
        ExtractOptions(image_size=32, dino_size=224, batch_size_per_device=1, shard_size=8),
        progress=False,
    )

    config = load_config("sfd.py", "tiny")
    config.data.update(source="arrayrecord", path=data_dir, read_threads=2, prefetch_batches=2)
    config.train.update(num_steps=3, log_every=1, ckpt_every=3, export_ema=False, async_checkpoint=False)
    workdir = str(tmp_path / "train")
    resolve_mode("train")(config, workdir)
    losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))


def _reference_files(directory, sizes=(5, 3), seed=0, drop=None):
    """Synthetic reference shards: NCHW latents, fp16 DINOv2 features, int64 labels (SFD extract_features.py)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    out = []
    for r, n in enumerate(sizes):
        arrays = {
            "latents": rng.normal(size=(n, 32, 4, 4)).astype(np.float32),
            "latents_flip": rng.normal(size=(n, 32, 4, 4)).astype(np.float32),
            "latents_sv": rng.normal(2.0, 3.0, size=(n, 16, 4, 4)).astype(np.float32),
            "latents_sv_flip": rng.normal(size=(n, 16, 4, 4)).astype(np.float32),
            "feats_dino": rng.normal(size=(n, 24, 4, 4)).astype(np.float16),
            "feats_dino_flip": rng.normal(size=(n, 24, 4, 4)).astype(np.float16),
            "labels": rng.integers(0, 1000, n).astype(np.int64),
        }
        if drop:
            arrays.pop(drop)
        save_file(arrays, os.path.join(directory, f"latents_rank{r:02d}_shard000.safetensors"))
        out.append(arrays)
    return out


def test_reference_latents_conversion(tmp_path):
    from sfd_jax.data import reference_latents

    src, dst = str(tmp_path / "ref"), str(tmp_path / "converted")
    ref = _reference_files(src)
    stats = reference_latents.convert(src, dst, stats="compute", stats_images=6, seed=1)
    meta, layout, paths = records.load_dataset(dst)
    assert layout.texture_shape == (4, 4, 32) and layout.semantic_shape == (4, 4, 16)
    assert layout.dino_shape == (16, 24) and len(paths) == 2
    _, _, recs = records.read_images(dst)
    allref = {k: np.concatenate([r[k] for r in ref]) for k in ref[0]}
    assert [r["index"] for r in recs] == list(range(8))
    for i, r in enumerate(recs):
        assert r["label"] == allref["labels"][i]
        np.testing.assert_array_equal(r["texture"], allref["latents"][i].transpose(1, 2, 0))
        np.testing.assert_array_equal(r["semantic_flip"], allref["latents_sv_flip"][i].transpose(1, 2, 0))
        # 'b (h w) d -> b d h w' inverted: token h·W + w is feature map position (h, w).
        np.testing.assert_array_equal(r["dino"][1 * 4 + 2], allref["feats_dino"][i][:, 1, 2])
        np.testing.assert_array_equal(r["dino_flip"].reshape(4, 4, 24), allref["feats_dino_flip"][i].transpose(1, 2, 0))
    chosen = records.stats_selection(8, 6, 1)
    sem = allref["latents_sv"][chosen].transpose(0, 2, 3, 1).reshape(-1, 16).astype(np.float64)
    assert_close(
        stats["semantic"]["std"], sem.std(0, ddof=1), len(sem) * np.finfo(np.float64).eps, scale=np.abs(sem).max()
    )
    it = pipeline.make_iterator(
        cfg(dst, random_flip=False), batch_size=4, process_index=0, process_count=1, seed=0, with_meta=True
    )
    b = next(it)
    i = int(b["index"][0])
    tex = (allref["latents"][i].transpose(1, 2, 0) - np.asarray(stats["texture"]["mean"])) / np.asarray(
        stats["texture"]["std"]
    )
    assert_close(b["x1"][0, ..., :32], tex, 1e-6)  # float32 normalisation; measured 9e-8
    # Converting again keeps the finished shards.
    before = os.stat(paths[0]).st_mtime_ns
    reference_latents.convert(src, dst, stats="compute", stats_images=6, seed=1)
    assert os.stat(paths[0]).st_mtime_ns == before


def test_reference_latents_uses_reference_stats(tmp_path):
    import torch
    from sfd_jax.data import reference_latents

    src = str(tmp_path / "ref")
    _reference_files(src, sizes=(4,))
    mean_t, std_t = torch.linspace(-1, 1, 32).reshape(1, 32, 1, 1), torch.linspace(1, 2, 32).reshape(1, 32, 1, 1)
    torch.save({"mean": mean_t, "std": std_t}, os.path.join(src, "latents_stats.pt"))
    torch.save(
        {"mean": torch.zeros(1, 16, 1, 1), "std": torch.full((1, 16, 1, 1), 3.0)},
        os.path.join(src, "latents_sv_stats.pt"),
    )
    stats = reference_latents.convert(src, str(tmp_path / "out"))
    assert_close(stats["texture"]["mean"], mean_t.flatten().numpy(), np.finfo(np.float32).eps)  # float32 values kept
    assert stats["semantic"]["std"] == [3.0] * 16
    torch.save(
        {"mean": torch.zeros(1, 8, 1, 1), "std": torch.ones(1, 8, 1, 1)}, os.path.join(src, "latents_sv_stats.pt")
    )
    with pytest.raises(ValueError, match="latents_sv_stats.pt: mean has 8 entries.*16 channels"):
        reference_latents.convert(src, str(tmp_path / "out2"))


def test_reference_latents_bad_input(tmp_path):
    from sfd_jax.data import reference_latents

    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        reference_latents.convert(str(tmp_path), str(tmp_path / "o"))
    _reference_files(str(tmp_path / "nodino"), sizes=(2,), drop="feats_dino")
    with pytest.raises(ValueError, match=r"latents_rank00_shard000.safetensors: missing keys \['feats_dino'\]"):
        reference_latents.convert(str(tmp_path / "nodino"), str(tmp_path / "o"))
