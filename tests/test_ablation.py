"""`--mode=ablation` in miniature (configs/ablation.py:tiny on synthetic IDX data): every run is trained and scored,
a stopped ablation finishes only the missing runs, and a run killed mid-training resumes from its checkpoint."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(data_dir, **ablation):
    cfg = _load("_ablation_config", os.path.join(HERE, "..", "configs", "ablation.py")).get_config("tiny")
    cfg.demo.data_dir = str(data_dir)
    cfg.ablation.update(ablation)
    return cfg


@pytest.fixture(scope="module")
def stopped_then_resumed(tmp_path_factory):
    from sfd_jax.demo import ablation

    root = tmp_path_factory.mktemp("ablation")
    os.makedirs(root / "idx")
    data = _load("_test_demo", os.path.join(HERE, "test_demo.py"))._fake_fashion_mnist(str(root / "idx"))
    workdir = str(root / "run")
    first = ablation.run(_config(data, max_runs=2), workdir)  # "stopped" after two runs
    second = ablation.run(_config(data), workdir)  # the same command again
    return {"data": data, "workdir": workdir, "first": first, "second": second}


def _all_runs():
    cfg = _config("unused")
    return [f"{s['name']}/seed{k}" for k in cfg.ablation.seeds for s in cfg.ablation.settings]


def test_a_stopped_ablation_finishes_only_the_missing_runs(stopped_then_resumed):
    first, second = stopped_then_resumed["first"], stopped_then_resumed["second"]
    runs = _all_runs()
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
        assert json.load(f)["finished_runs"] == len(_all_runs())
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
    again = ablation.run(_config(data), workdir)
    assert again["ran_in_this_invocation"] == ["sfd_dt0.3/seed1"]
    with open(os.path.join(run, "result.json")) as f:
        after = json.load(f)
    assert after["resumed_from_step"] == 2
    # The resumed run reaches the uninterrupted run's weights, hence the same samples and scores.
    assert after["scores"]["4"]["fid"] == pytest.approx(before["scores"]["4"]["fid"], rel=1e-6)
    assert after["scores"]["4"]["class_consistency"] == before["scores"]["4"]["class_consistency"]
