"""Hostile inputs against the command-line entry points, as a user would meet them (issue: no silent wrong results).

Every case runs a CLI in a subprocess and checks three things: the exit code, that the LAST line of output names
the cause, and that no input file changed (hashes before and after). The fixtures are tiny (a 2-block DiT on a
4×4 latent, a 16-image latent dataset) and built once for the module; every refusal happens before anything is
compiled, so a case costs about one interpreter start.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
LAYOUT_ARGS = dict(texture=(4, 4, 32), semantic=(4, 4, 16), dino=(16, 8))
# The records' 4×4 grid does not fit the tiny DiT's 16×16: every refusal below comes before a batch reaches it.
TRAIN_OVERRIDES = [
    "--config.data.source=arrayrecord",
    "--config.train.batch_size=8",
    "--config.data.read_threads=1",
    "--config.data.prefetch_batches=1",
    "--config.train.num_steps=2",
]


# ------------------------------------------------------------------------------------------------------ fixtures
def write_dataset(directory, *, labels=None, texture_channels=32, label_range=False, shards=2, per_shard=8):
    from sfd_jax.data import records

    layout = records.RecordLayout((4, 4, texture_channels), LAYOUT_ARGS["semantic"], LAYOUT_ARGS["dino"])
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    n = shards * per_shard
    labels = np.arange(n) % NUM_CLASSES if labels is None else np.asarray(labels)
    names = [records.shard_name("latents", s, shards) for s in range(shards)]
    for s, name in enumerate(names):
        idx = np.arange(s * per_shard, (s + 1) * per_shard)
        arrays = {}
        for suffix in ("", "_flip"):
            for field in records.BLOCK_FIELDS:
                _, shape = layout.field_spec(field)
                arrays[field + suffix] = rng.standard_normal((per_shard, *shape))
        writer = records.ShardWriter(os.path.join(directory, name))
        writer.write(layout.pack_pairs(index=idx, label=labels[idx], **arrays))
        writer.commit()
        meta = {"num_records": 2 * per_shard}
        if label_range:
            meta["label_range"] = [int(labels[idx].min()), int(labels[idx].max())]
        records.write_json_atomic(os.path.join(directory, name + ".json"), meta)
    records.write_json_atomic(
        os.path.join(directory, "dataset.json"), {"format": records.FORMAT, "layout": layout.to_json(), "shards": names}
    )
    stats = {
        "format": records.STATS_FORMAT,
        "texture": {"mean": [0.0] * texture_channels, "std": [1.0] * texture_channels},
        "semantic": {"mean": [0.0] * 16, "std": [1.0] * 16},
    }
    records.write_json_atomic(os.path.join(directory, "stats.json"), stats)
    return directory


def dit_state_dict(input_size=4, num_classes=NUM_CLASSES, seed=0):
    from sfd_jax.convert.dit import expected_shapes
    from sfd_jax.models.lightningdit import DiTConfig, fixed_tables

    cfg = DiTConfig.from_size("tiny", input_size=input_size, num_classes=num_classes, repa_dim=8)
    rng = np.random.default_rng(seed)
    sd = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in expected_shapes(cfg).items()}
    pos_embed, (rope_cos, rope_sin) = fixed_tables(cfg)
    sd.update({"pos_embed": pos_embed[None], "feat_rope.freqs_cos": rope_cos, "feat_rope.freqs_sin": rope_sin})
    return cfg, sd


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Weights directories (model, guides), a texture VAE, stats, datasets and .pt files, built in-process once."""
    import torch
    from flax import nnx

    from sfd_jax.convert.dit import load_dit, save_dit
    from sfd_jax.convert.texture_vae import save_texture_vae
    from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig

    root = tmp_path_factory.mktemp("bad_inputs")
    for name, kw in (("dit", {}), ("guide_small", {"input_size": 2}), ("guide_1000", {"num_classes": 1000})):
        cfg, sd = dit_state_dict(**kw)
        save_dit(root / name, *load_dit(sd, config=cfg))
    vae_cfg = TextureVAEConfig(
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        resolution=8,
        z_channels=32,
        embed_dim=32,
        num_groups=4,
    )
    vae = nnx.eval_shape(lambda: TextureVAE(vae_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vae)
    flat = [(p, v.replace(np.full(v.shape, 0.01, np.float32))) for p, v in nnx.to_flat_state(state)]
    save_texture_vae(root / "vae", nnx.merge(graphdef, nnx.from_flat_state(flat)))
    write_dataset(str(root / "data"))
    _, sd = dit_state_dict()
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, root / "bf16.pt")
    bad = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    bad["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    bad["final_layer.linear.weight"][1, 1] = float("inf")
    torch.save(bad, root / "nonfinite.pt")
    return root


# --------------------------------------------------------------------------------------------------- the runner
def snapshot(*paths) -> dict:
    """{file: sha256} under `paths`: what must survive a refused run byte for byte."""
    out = {}
    for p in map(pathlib.Path, paths):
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_cli(args, cwd=REPO):
    env = dict(os.environ)  # with conftest's compilation cache
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # one CPU device: the refusals do not depend on the device count
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return proc.returncode, lines


def main_args(config, workdir, mode, *extra):
    return [
        "-m",
        "sfd_jax.main",
        f"--config={REPO / 'configs' / config}",
        f"--workdir={workdir}",
        f"--mode={mode}",
        *extra,
    ]


def train_args(data, workdir, *extra):
    return main_args("sfd.py:tiny", workdir, "train", *TRAIN_OVERRIDES, f"--config.data.path={data}", *extra)


def sample_args(assets, workdir, *extra, stats=None):
    return main_args(
        "sample.py:tiny",
        workdir,
        "sample",
        f"--config.sample.model={assets / 'dit'}",
        f"--config.sample.texture_vae={assets / 'vae'}",
        f"--config.sample.latent_stats={stats or assets / 'data' / 'stats.json'}",
        "--config.sample.num_images=4",
        "--config.sample.chunk_size=4",
        "--config.sample.num_steps=2",
        "--config.sample.per_device_batch=4",
        "--config.sample.grid_size=0",
        *extra,
    )


# ------------------------------------------------------------------------------------------------------ the cases
def copy_data(assets, tmp_path, **kw):
    d = tmp_path / "data"
    if kw:
        write_dataset(str(d), **kw)
    else:
        shutil.copytree(assets / "data", d)
    return d


def edit_json(path, fn):
    doc = json.loads(pathlib.Path(path).read_text())
    fn(doc)
    pathlib.Path(path).write_text(json.dumps(doc))


def case_label_null(assets, tmp):  # item 1: the null label, recorded at extraction -> refused when opened
    d = copy_data(assets, tmp, labels=np.full(16, NUM_CLASSES), label_range=True)
    return train_args(d, tmp / "w"), [d], ["latents-00000-of-00002.array_record", "labels span [10, 10]"]


def case_label_negative(assets, tmp):  # item 1: no recorded range -> refused by the batch check, shard named
    labels = np.arange(16) % NUM_CLASSES
    labels[:8] = -1  # all of shard 0: the first batch (8 of 16, shuffled) meets one
    d = copy_data(assets, tmp, labels=labels)
    return train_args(d, tmp / "w"), [d], ["latents-00000-of-00002.array_record", "label -1"]


def case_channels_40(assets, tmp):  # item 1: 40 texture channels are not sliced to the first 48
    d = copy_data(assets, tmp, texture_channels=40)
    return train_args(d, tmp / "w"), [d], ["40 texture + 16 semantic", "needs 32 texture"]


def case_stats_inf_std(assets, tmp):  # item 2
    d = copy_data(assets, tmp)
    edit_json(d / "stats.json", lambda s: s["texture"]["std"].__setitem__(5, float("inf")))
    return train_args(d, tmp / "w"), [d], ["stats.json: texture.std must be finite and > 0", "[5]"]


def case_stats_nan_mean_sample(assets, tmp):  # item 2, on the sampling side; not "lower the learning rate"
    stats = tmp / "stats.json"
    shutil.copy(assets / "data" / "stats.json", stats)
    edit_json(stats, lambda s: s["texture"]["mean"].__setitem__(0, float("nan")))
    return sample_args(assets, tmp / "w", stats=stats), [stats], ["texture.mean must be finite"]


def case_sample_50_classes(assets, tmp):  # item 3
    return (
        sample_args(assets, tmp / "w", "--config.sample.num_classes=50"),
        [assets / "dit"],
        ["num_classes=50", "has 10 classes"],
    )


def case_sample_null_class(assets, tmp):  # item 3: 11 would sample "class 10", the null label
    return (
        sample_args(assets, tmp / "w", "--config.sample.num_classes=11"),
        [assets / "dit"],
        ["num_classes=11", "10 is its null label"],
    )


def case_guide_classes(assets, tmp):  # items 3 and 12
    return (
        sample_args(
            assets, tmp / "w", "--config.sample.guidance=autoguidance", f"--config.sample.guide={assets / 'guide_1000'}"
        ),
        [assets / "guide_1000"],
        ["guide and model differ", "num_classes 1000 vs 10"],
    )


def case_guide_input_size(assets, tmp):  # item 12
    return (
        sample_args(
            assets,
            tmp / "w",
            "--config.sample.guidance=autoguidance",
            f"--config.sample.guide={assets / 'guide_small'}",
        ),
        [assets / "guide_small"],
        ["guide and model differ", "input_size 2 vs 4"],
    )


def case_export_nonempty(assets, tmp):  # item 6: another run's ema/ is not overwritten
    out = tmp / "ema"
    out.mkdir()
    (out / "config.json").write_text("another run")
    return (
        ["-m", "sfd_jax.train.export", f"--workdir={tmp / 'run'}", f"--out={out}"],
        [out],
        ["not empty", "--overwrite"],
    )


def case_convert_nonfinite(assets, tmp):  # item 7
    return (
        ["-m", "sfd_jax.convert", "dit", str(assets / "nonfinite.pt"), str(tmp / "out")],
        [assets / "nonfinite.pt"],
        ["NaN/Inf", "blocks.1.attn.qkv.weight", "--allow-nonfinite"],
    )


def case_shard_truncated(assets, tmp):  # item 10
    d = copy_data(assets, tmp)
    shard = d / "latents-00001-of-00002.array_record"
    shard.write_bytes(shard.read_bytes()[:5000])
    return train_args(d, tmp / "w"), [d], ["latents-00001-of-00002.array_record", "re-extract"]


def case_shard_emptied(assets, tmp):  # item 10
    d = copy_data(assets, tmp)
    (d / "latents-00000-of-00002.array_record").write_bytes(b"")
    return train_args(d, tmp / "w"), [d], ["latents-00000-of-00002.array_record", "re-extract"]


def case_dataset_path_missing(assets, tmp):  # a mistyped --config.data.path: one line, not a traceback
    return train_args(tmp / "no_such_data", tmp / "w"), [], ["dataset description not found", "no_such_data"]


def case_dataset_json_no_shards(assets, tmp):  # item 10
    d = copy_data(assets, tmp)
    edit_json(d / "dataset.json", lambda m: m.pop("shards"))
    return train_args(d, tmp / "w"), [d], ["dataset.json lacks ['shards']", "--mode=extract"]


def case_chunk_truncated(assets, tmp):  # item 10
    chunks = tmp / "w" / "chunks"
    chunks.mkdir(parents=True)
    whole = tmp / "whole.npy"
    np.save(whole, np.zeros((4, 8, 8, 3), np.uint8))
    (chunks / "0000000-0000004.npy").write_bytes(whole.read_bytes()[:300])
    return sample_args(assets, tmp / "w"), [chunks], ["0000000-0000004.npy", "delete it"]


def case_config_unknown_field(assets, tmp):  # item 11
    return (
        main_args("sfd.py:tiny", tmp / "w", "train", "--config.train.nonexistent=3"),
        [],
        ["--config.train.nonexistent", "no field 'nonexistent'", "num_steps"],
    )


def case_config_mesh_not_int(assets, tmp):  # item 11
    return main_args("sfd.py:tiny", tmp / "w", "train", "--config.mesh.ici=abc"), [], ["config.mesh.ici", "integers"]


def case_config_wrong_mode(assets, tmp):  # item 11
    return (
        main_args("sample.py:tiny", tmp / "w", "train"),
        [],
        ["--mode=train does not fit", "'sample' config", "valid modes"],
    )


def case_unicode_workdir(assets, tmp):  # already passing: unicode paths (here on a refusal path)
    d = copy_data(assets, tmp)
    edit_json(d / "stats.json", lambda s: s["semantic"]["std"].__setitem__(0, 0.0))
    return train_args(d, tmp / "wörk ☃"), [d], ["semantic.std must be finite and > 0"]


CASES = {name[len("case_") :]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_with_cause_last(assets, tmp_path, name):
    args, keep, expected = CASES[name](assets, tmp_path)
    before = snapshot(*keep)
    rc, lines = run_cli(args)
    assert rc == 1, f"exit code {rc}; last lines:\n" + "\n".join(lines[-15:])
    last = lines[-1] if lines else ""
    for text in expected:
        assert text in last, f"{text!r} not in the last line {last!r}; tail:\n" + "\n".join(lines[-15:])
    assert snapshot(*keep) == before, "an input file changed"
    assert not any(ln.startswith("Traceback") for ln in lines), "\n".join(lines[-30:])


def test_bf16_state_dict_converts_with_note(assets, tmp_path):
    """Item 12: a bf16 state dict is converted (widened to float32), not refused as another architecture; the
    converted weights equal the bf16 values exactly."""
    from sfd_jax.convert.dit import export_dit, restore_dit

    out = tmp_path / "out"
    rc, lines = run_cli(["-m", "sfd_jax.convert", "dit", str(assets / "bf16.pt"), str(out)])
    assert rc == 0, "\n".join(lines[-15:])
    assert any("note:" in ln and "bfloat16" in ln and "float32" in ln for ln in lines), lines
    import ml_dtypes

    _, sd = dit_state_dict()
    got = export_dit(restore_dit(out)[1])
    key = "blocks.0.attn.qkv.weight"
    np.testing.assert_array_equal(got[key], sd[key].astype(ml_dtypes.bfloat16).astype(np.float32))
