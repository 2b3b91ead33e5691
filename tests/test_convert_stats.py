"""Reference latent statistics files (torch dicts of (1, C, 1, 1) `mean` / `std`) → stats.json, with no shards."""

import json
import os

import numpy as np
import pytest
import torch

from sfd_jax.convert.__main__ import main as convert_main
from sfd_jax.data.reference_stats import convert_reference_stats
from sfd_jax.data import records
from sfd_jax.eval.decoding import read_latent_stats


def reference_stats_file(path, latents):
    """What the reference's dataset computes and caches: moments over (images, H, W) of NCHW latents."""
    latents = torch.from_numpy(latents)
    stats = {"mean": latents.mean(dim=[0, 2, 3], keepdim=True), "std": latents.std(dim=[0, 2, 3], keepdim=True)}
    torch.save(stats, path)
    return stats


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    tex = rng.standard_normal((6, 32, 4, 4)) * rng.uniform(0.5, 3, (1, 32, 1, 1)) + rng.normal(0, 2, (1, 32, 1, 1))
    sem = rng.standard_normal((6, 16, 4, 4)) * 0.2 - 0.7
    t = reference_stats_file(tmp_path / "latents_stats.pt", tex.astype(np.float32))
    s = reference_stats_file(tmp_path / "latents_sv_stats.pt", sem.astype(np.float32))
    assert t["mean"].shape == (1, 32, 1, 1) and s["std"].shape == (1, 16, 1, 1)
    return tmp_path, t, s


def test_round_trip_through_stats_json(files, tmp_path):
    src, t, s = files
    out = tmp_path / "out"
    convert_reference_stats(src / "latents_stats.pt", src / "latents_sv_stats.pt", out=out)
    doc = json.loads((out / "stats.json").read_text())
    # the values come back, in the reference's tensor shape, exactly (float32 → JSON float → float32)
    for part, ref in (("texture", t), ("semantic", s)):
        for key in ("mean", "std"):
            back = torch.tensor(doc[part][key], dtype=torch.float32).reshape(1, -1, 1, 1)
            assert torch.equal(back, ref[key]), (part, key)
    # and every reader of stats.json accepts it: the sampler's texture stats and the training layout check
    mean, std = read_latent_stats(str(out))
    np.testing.assert_array_equal(mean, t["mean"].reshape(-1).numpy())
    layout = records.RecordLayout((4, 4, 32), (4, 4, 16), (16, 8))
    loaded = records.load_stats(str(out), layout)
    np.testing.assert_array_equal(loaded["semantic_std"], s["std"].reshape(-1).numpy())


def test_cli_and_pca_stats(files, tmp_path, capsys):
    src, t, _ = files
    out = tmp_path / "cli"
    assert convert_main(["stats", str(src / "latents_stats.pt"), str(out), "--semantic-channels", "8"]) == 0
    assert "un-normalised" in capsys.readouterr().out
    doc = json.loads((out / "stats.json").read_text())
    assert doc["semantic"] == {"mean": [0.0] * 8, "std": [1.0] * 8, "channels": 8, "normalise": False}
    np.testing.assert_array_equal(np.float32(doc["texture"]["std"]), t["std"].reshape(-1).numpy())
    with pytest.raises(SystemExit, match="not empty"):
        convert_main(["stats", str(src / "latents_stats.pt"), str(out)])


def test_bad_files_are_named(files, tmp_path):
    src, t, s = files
    with pytest.raises(ValueError, match="texture stats: mean has 16 channels, expected 32"):
        convert_reference_stats(s, None)
    with pytest.raises(ValueError, match=r"expected a dict with 'mean' and 'std', got keys \['avg'"):
        convert_reference_stats({"avg": t["mean"], "std": t["std"]})
    torch.save({"mean": torch.zeros(2, 32), "std": torch.ones(2, 32)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: mean has shape \(2, 32\)"):
        convert_reference_stats(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="std has non-positive entries"):
        convert_reference_stats({"mean": t["mean"], "std": t["std"] * 0})
    assert not os.path.exists(tmp_path / "stats.json")
