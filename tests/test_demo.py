"""The demo's CI guard: configs/demo.py:tiny runs every stage of `make demo` end to end (seconds-long settings) on
a small synthetic dataset written in Fashion-MNIST's IDX format, then a re-run skips every stage and an interrupted
DiT stage resumes to exactly the weights of the uninterrupted run. The ablation driver runs on the same stages."""

import gzip
import json
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from sfd_jax.config_loader import load_config


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _fake_fashion_mnist(root, n_train=512, n_test=256, seed=0):
    """Class k: a bright block whose height and width grow with k, on a dark noisy background."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            h, w = 6 + 2 * (k // 2), 6 + 4 * (k % 2) + k
            top, left = (28 - h) // 2, (28 - min(w, 24)) // 2
            images[i, top : top + h, left : left + min(w, 24)] = rng.integers(150, 256)
        _write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
        _write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return root


def _config(data_dir):
    """configs/demo.py:tiny reading `data_dir`."""
    return load_config("configs/demo.py:tiny", {"demo.data_dir": str(data_dir)})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from sfd_jax import demo

    root = tmp_path_factory.mktemp("demo")
    os.makedirs(root / "idx")
    data = _fake_fashion_mnist(str(root / "idx"))
    workdir = str(root / "run")
    report = demo.run(_config(data), workdir)
    return {"data": data, "workdir": workdir, "report": report, "root": root}


def test_every_stage_runs_and_reports(finished):
    report, workdir = finished["report"], finished["workdir"]
    stages = (
        "dinov2_pretrain",
        "texture_vae",
        "semvae",
        "semvae_random",
        "extract",
        "dit",
        "classifier",
        "sample_unguided",
        "sample_autoguidance",
        "evaluate",
    )
    assert set(report["wall_time_s"]["stages"]) == set(stages)
    assert all(report["wall_time_s"]["stages"][s] > 0 for s in stages)
    assert report["wall_time_s"]["cached_in_this_run"] == []
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["summary"] == json.loads(json.dumps(report["summary"]))

    s = report["summary"]
    # The scores, recomputed here from the saved judge, the saved samples and the test split: the judge applied
    # unbatched in one call, argmax compared in NumPy. An argmax may only differ where the top two logits tie to
    # within float rounding (counted), FID (judge features) to float rounding.
    import jax.numpy as jnp
    from sfd_jax.demo.data import padded_split, unit_range
    from sfd_jax.eval.classifier import load_classifier
    from sfd_jax.eval.metrics import frechet_distance, statistics

    judge = load_classifier(os.path.join(workdir, "classifier"))

    def judged(images):
        x = jnp.asarray(unit_range(images))
        return np.asarray(judge(x), np.float64), np.asarray(judge.features(x), np.float64)

    def hits_and_ties(logits, labels):
        top2 = np.sort(logits, axis=-1)[:, -2:]
        ties = int(np.sum(top2[:, 1] - top2[:, 0] <= 1e-4 * np.abs(logits).max()))
        return float(np.mean(logits.argmax(-1) == labels)), ties

    test_x, test_y = padded_split(finished["data"], "test")
    accuracy, ties = hits_and_ties(judged(test_x)[0], test_y)
    assert abs(s["classifier_test_accuracy"] - accuracy) <= ties / len(test_y) + 1e-12
    ref_stats = statistics(judged(test_x)[1].astype(np.float32))  # fid_test_images (all 256 here)
    for mode in ("unguided", "autoguidance"):
        with np.load(os.path.join(workdir, "samples", f"{mode}.npz")) as z:
            logits, feats = judged(z["images"])
            consistency, ties = hits_and_ties(logits, z["labels"])
        assert abs(s["class_consistency"][mode] - consistency) <= ties / len(logits) + 1e-12, mode
        fid = frechet_distance(*statistics(feats.astype(np.float32)), *ref_stats)
        assert s["fid_classifier_features"][mode] == pytest.approx(fid, rel=1e-4), mode
        assert s["nfe_per_image"][mode] >= 6  # at least one Dopri5 step in each of the three phases
    assert s["autoguidance"]["guide_step"] == 4 and s["autoguidance"]["final_step"] == 12

    # One grid for the latent, the semantic tokens and REPA: the DiT's token count is the DINOv2 patch count.
    g = report["geometry"]
    with open(os.path.join(workdir, "latents", "dataset.json")) as f:
        layout = json.load(f)["layout"]
    with open(os.path.join(workdir, "dinov2", "config.json")) as f:
        patch = json.load(f)["patch_size"]
    assert g["latent"][:2] == [g["dino_size"] // patch] * 2 == list(layout["texture_shape"][:2])
    assert layout["dino_shape"] == [g["tokens"], g["dino_width"]]
    with open(os.path.join(workdir, "dit", "ema", "config.json")) as f:
        dit_cfg = json.load(f)
    assert dit_cfg["input_size"] ** 2 == g["tokens"] and dit_cfg["repa_dim"] == g["dino_width"]
    # The DINOv2 is pretrained (self-supervised) from the random one, which stays beside it for the comparison.
    d = report["dinov2"]
    assert d["random"] is False and d["ssl_steps"] == 4
    assert set(d["linear_probe_test_accuracy"]) == {"random", "pretrained"}
    assert all(0.0 <= v <= 1.0 for v in d["linear_probe_test_accuracy"].values())
    assert set(d["semvae_heldout_cosine"]) == {"random", "pretrained"}
    assert all(-1.0 <= v["posterior_mean"] <= 1.0 for v in d["semvae_heldout_cosine"].values())
    from sfd_jax.convert.dinov2 import load_dinov2

    pre, rnd = (load_dinov2(os.path.join(workdir, n))[1] for n in ("dinov2", "dinov2_random"))
    assert not np.array_equal(np.asarray(pre.patch_embed.kernel[...]), np.asarray(rnd.patch_embed.kernel[...]))
    assert report["machine"]["matmul_2048_fp32_gflops"] > 0

    with np.load(os.path.join(workdir, "samples", "autoguidance.npz")) as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [4] * 10)  # class-balanced
    for name in ("samples.png", "loss.png"):
        with Image.open(os.path.join(workdir, name)) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_rerun_skips_finished_stages(finished):
    from sfd_jax import demo

    before = finished["report"]["wall_time_s"]["stages"]
    report = demo.run(_config(finished["data"]), finished["workdir"])
    assert sorted(report["wall_time_s"]["cached_in_this_run"]) == sorted(before)
    assert report["wall_time_s"]["stages"] == before
    assert report["summary"] == finished["report"]["summary"]


def test_interrupted_dit_resumes_to_the_uninterrupted_weights(finished):
    """A copy of the finished workdir rolled back to how a run killed after the step-8 checkpoint leaves it."""
    from flax import nnx

    from sfd_jax import demo
    from sfd_jax.convert.dit import restore_dit

    src, dst = finished["workdir"], str(finished["root"] / "killed")
    shutil.copytree(src, dst)
    for stage in ("dit", "sample_unguided", "sample_autoguidance", "evaluate"):
        os.remove(os.path.join(dst, "stages", f"{stage}.json"))
    shutil.rmtree(os.path.join(dst, "dit", "ema"))
    ckpt_dir = os.path.join(dst, "dit", "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert steps[-1] == 12 and 8 in steps
    shutil.rmtree(os.path.join(ckpt_dir, "12"))

    report = demo.run(_config(finished["data"]), dst)
    assert report["stages"]["dit"]["steps"] == 12 and report["stages"]["dit"]["resumed_from_step"] == 8
    assert "texture_vae" in report["wall_time_s"]["cached_in_this_run"]
    with open(os.path.join(dst, "dit", "metrics.jsonl")) as f:
        steps_logged = [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]
    assert steps_logged == [4, 8, 12]  # steps 9-12 ran once more; nothing before step 8 was repeated
    a = nnx.to_flat_state(nnx.state(restore_dit(os.path.join(src, "dit", "ema"))[1], nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(restore_dit(os.path.join(dst, "dit", "ema"))[1], nnx.Param)))
    for path, value in a:  # the same program on the same restored state and batches: bit for bit
        np.testing.assert_array_equal(np.asarray(b[path][...]), np.asarray(value[...]), err_msg=str(path))


def test_workdir_refuses_other_settings_and_missing_data(finished, tmp_path):
    from sfd_jax import demo

    other = _config(finished["data"])
    other.dit.train.num_steps = 13
    with pytest.raises(ValueError, match="dit.train.num_steps"):
        demo.run(other, finished["workdir"])
    with pytest.raises(FileNotFoundError, match="IDX files"):
        demo.run(_config(tmp_path / "empty"), str(tmp_path / "w"))


def test_workdir_of_an_older_version_keeps_its_stages(finished, tmp_path, caplog):
    """A workdir made before a setting existed (or after one was removed) is not "other settings": its stages are
    kept and the saved config is brought up to date, so that changing the new setting later is refused."""
    from sfd_jax import demo
    from sfd_jax.demo.pipeline import CONFIG_FILE

    workdir = str(tmp_path / "old")
    shutil.copytree(finished["workdir"], workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path) as f:
        saved = json.load(f)
    del saved["demo"]["grid_columns"]  # a setting added since
    saved["demo"]["retired_setting"] = 1  # one removed since
    with open(path, "w") as f:
        json.dump(saved, f)
    with caplog.at_level("WARNING", logger="sfd_jax.demo"):
        report = demo.run(_config(finished["data"]), workdir)
    assert sorted(report["wall_time_s"]["cached_in_this_run"]) == sorted(finished["report"]["wall_time_s"]["stages"])
    assert "demo.grid_columns, demo.retired_setting" in caplog.text
    with open(path) as f:
        updated = json.load(f)["demo"]
    assert updated["grid_columns"] == 4 and "retired_setting" not in updated
    other = _config(finished["data"])
    other.demo.grid_columns = 5
    with pytest.raises(ValueError, match="demo.grid_columns"):
        demo.run(other, workdir)


def test_a_vfm_checkpoint_replaces_the_random_dinov2_and_sets_the_geometry(tmp_path):
    """With demo.vfm_checkpoint the given DINOv2 is used as is: its patch size fixes the input size that gives the
    latent grid, its width the SemVAE input and the REPA target width."""
    from flax import nnx

    from sfd_jax.convert.dinov2 import save_pretrained
    from sfd_jax.demo import train_stages
    from sfd_jax.models.dinov2 import Dinov2, Dinov2Config

    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, patch_size=14, image_size=56)
    save_pretrained(nnx.jit(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))(), str(tmp_path / "vfm"))
    config = _config(tmp_path)
    config.demo.vfm_checkpoint = str(tmp_path / "vfm")
    path, is_random = train_stages.dinov2(config, str(tmp_path / "work"))
    assert path == str(tmp_path / "vfm") and not is_random
    assert not os.path.exists(tmp_path / "work" / "dinov2")
    assert train_stages.dino_geometry(path, 4) == (56, 48)


# ---------------------------------------------------------------------------------------------------------------
# `--mode=ablation` in miniature (configs/ablation.py:tiny) on the finished demo's stages: every run is trained and
# scored, a stopped ablation finishes only the missing runs, and a run killed mid-training resumes from its
# checkpoint. It lives in this file so that it runs in the demo's process and reuses its workdir.
# ---------------------------------------------------------------------------------------------------------------
def _ablation_config(data_dir, **ablation):
    cfg = load_config("configs/ablation.py:tiny", {"demo.data_dir": str(data_dir)})
    cfg.ablation.update(ablation)
    return cfg


@pytest.fixture(scope="module")
def stopped_then_resumed(finished):
    """The ablation on a copy of the finished demo's stages (its default place, <workdir>/demo): the two configs
    agree on every demo field, so nothing before the ablation's own runs is trained again."""
    from sfd_jax.demo import ablation

    data, workdir = finished["data"], str(finished["root"] / "ablation")
    shutil.copytree(finished["workdir"], os.path.join(workdir, "demo"))
    first = ablation.run(_ablation_config(data, max_runs=2), workdir)  # "stopped" after two runs
    second = ablation.run(_ablation_config(data), workdir)  # the same command again
    return {"data": data, "workdir": workdir, "first": first, "second": second}


def _all_ablation_runs():
    cfg = _ablation_config("unused")
    return [f"{s['name']}/seed{k}" for k in cfg.ablation.seeds for s in cfg.ablation.settings]


def test_a_stopped_ablation_finishes_only_the_missing_runs(stopped_then_resumed):
    first, second = stopped_then_resumed["first"], stopped_then_resumed["second"]
    runs = _all_ablation_runs()
    assert first["ran_in_this_invocation"] == runs[:2] and first["finished_runs"] == 2 and not first["complete"]
    assert second["ran_in_this_invocation"] == runs[2:]
    assert second["finished_runs"] == second["total_runs"] == len(runs) and second["complete"]


def test_every_run_is_scored_at_each_fraction_of_the_budget(stopped_then_resumed):
    s, workdir = stopped_then_resumed["second"], stopped_then_resumed["workdir"]
    for entry in s["settings"].values():
        assert entry["finished_seeds"] == [0, 1]
        assert sorted(int(k) for k in entry["by_step"]) == [2, 4]
        for row in entry["by_step"].values():
            fids = row["fid"]["values"]
            assert len(fids) == 2 and all(np.isfinite(fids)) and min(fids) >= 0
            assert row["fid"]["mean"] == pytest.approx(np.mean(fids), rel=1e-12)
            assert row["fid"]["std"] == pytest.approx(np.std(fids, ddof=1), rel=1e-12, abs=1e-12)
            assert all(0 <= c <= 1 for c in row["class_consistency"]["values"])
    # Different seeds are different runs.
    finals = s["settings"]["sfd_dt0.3"]["final"]["fid"]["values"]
    assert finals[0] != finals[1]
    with open(os.path.join(workdir, "ablation.json")) as f:
        assert json.load(f)["finished_runs"] == len(_all_ablation_runs())
    for png in ("fid_vs_delta_t.png", "fid_vs_steps.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 1000
    # The random-encoder setting trains on its own extraction, made once in the demo's workdir.
    assert os.path.exists(os.path.join(workdir, "demo", "latents_random", "stats.json"))


def test_a_killed_run_resumes_from_its_checkpoint(stopped_then_resumed):
    from sfd_jax.demo import ablation

    workdir, data = stopped_then_resumed["workdir"], stopped_then_resumed["data"]
    run = os.path.join(workdir, "runs", "sfd_dt0.3", "seed1")
    with open(os.path.join(run, "result.json")) as f:
        before = json.load(f)
    # What a kill right after the step-2 checkpoint leaves: no result, no later score, no later checkpoint.
    os.remove(os.path.join(run, "result.json"))
    os.remove(os.path.join(run, "scores", "step_4.json"))
    shutil.rmtree(os.path.join(run, "checkpoints", "4"))
    again = ablation.run(_ablation_config(data), workdir)
    assert again["ran_in_this_invocation"] == ["sfd_dt0.3/seed1"]
    with open(os.path.join(run, "result.json")) as f:
        after = json.load(f)
    assert after["resumed_from_step"] == 2
    # The resumed run reaches the uninterrupted run's weights, hence the same samples and scores.
    assert after["scores"]["4"]["fid"] == pytest.approx(before["scores"]["4"]["fid"], rel=1e-6)
    assert after["scores"]["4"]["class_consistency"] == before["scores"]["4"]["class_consistency"]
