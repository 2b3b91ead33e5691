"""The training loop: SIGTERM in a separate process, exact resume, resume on another mesh, NaN guard, eval hook.

One subprocess runs `python -m sfd_jax.main --config=configs/sfd.py:tiny` (8 fake CPU devices inherited from
conftest, mesh (1, 8, 1)) and is stopped with SIGTERM after a few steps; it must write a checkpoint and exit 0.
That workdir is then resumed in this (new) process and compared with an uninterrupted run.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from conftest import assert_trees_close
from sfd_jax.config_loader import load_config
from sfd_jax import parallel
from sfd_jax.train import loop
from sfd_jax.train.build import build
from sfd_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(num_steps, **train):
    c = load_config("configs/sfd.py:tiny")
    c.train.update(num_steps=num_steps, log_every=1, ckpt_every=1000, export_ema=False, async_checkpoint=True)
    c.train.update(train)
    return c


def losses_by_step(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A CLI training run in a child process, sent SIGTERM once it has logged two steps."""
    workdir = tmp_path_factory.mktemp("interrupted")
    cmd = [
        sys.executable,
        "-m",
        "sfd_jax.main",
        "--config=configs/sfd.py:tiny",
        f"--workdir={workdir}",
        "--config.train.num_steps=1000",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=1000",
        "--config.train.export_ema=False",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training exited before it could be interrupted:\n" + proc.stdout.read().decode()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0].decode()
    copy = tmp_path_factory.mktemp("interrupted_copy")
    shutil.copytree(workdir, copy, dirs_exist_ok=True)
    return workdir, copy, proc.returncode, output


@pytest.fixture(scope="module")
def straight(interrupted, tmp_path_factory):
    """The uninterrupted run: 2k steps where k is the step the interrupted run stopped at."""
    k = max(losses_by_step(interrupted[0]))
    workdir = tmp_path_factory.mktemp("straight")
    # a checkpoint every step: async saves overlapping the next (donating) steps
    summary = loop.run(tiny_config(2 * k, ckpt_every=1, keep_last=4 * k), str(workdir))
    return k, workdir, summary


def test_sigterm_saves_a_checkpoint_and_exits_zero(interrupted):
    workdir, _, returncode, output = interrupted
    assert returncode == 0, output[-3000:]
    k = max(losses_by_step(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(k)], output[-3000:]
    assert "preempted: checkpoint of step" in output
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["derived"]["mesh_shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert saved["config"]["train"]["num_steps"] == 1000


def test_resume_in_a_new_process_equals_uninterrupted_run(interrupted, straight):
    workdir = interrupted[0]
    k, straight_dir, straight_summary = straight
    resumed = loop.run(tiny_config(2 * k), str(workdir))
    assert resumed["step"] == straight_summary["step"] == 2 * k
    # bit-identical parameters, EMA and optimizer state
    chex.assert_trees_all_equal(jax.device_get(resumed["state"]), jax.device_get(straight_summary["state"]))
    # every logged loss, steps 1..k from the killed process and k+1..2k from this one
    assert losses_by_step(workdir) == losses_by_step(straight_dir)
    assert sorted(losses_by_step(workdir)) == list(range(1, 2 * k + 1))
    losses = losses_by_step(straight_dir)
    assert losses[2 * k] < losses[1]  # it learns


def test_async_checkpoints_hold_the_state_of_their_step(interrupted, straight):
    """The straight run saved asynchronously at every step while the next steps reused the buffers; its step-k
    checkpoint equals the one the interrupted process wrote (synchronously, then exited)."""
    from sfd_jax.checkpoint import Checkpoints

    k, straight_dir, _ = straight
    abstract = build(tiny_config(2 * k)).setup.abstract_state
    saved = []
    for workdir in (interrupted[1], straight_dir):
        ckpt = Checkpoints(workdir)
        saved.append(ckpt.restore(k, abstract))
        ckpt.close()
    chex.assert_trees_all_equal(jax.device_get(saved[0][0]), jax.device_get(saved[1][0]))
    assert saved[0][1] == saved[1][1]  # data-iterator state


def test_resume_onto_a_different_mesh(interrupted, straight):
    copy = interrupted[1]
    k, _, straight_summary = straight
    config = tiny_config(2 * k)
    config.mesh.ici = (2, 4, 1)
    resumed = loop.run(config, str(copy))
    state = resumed["state"]
    kernel = state.params["blocks"][0]["attn"]["qkv"]["kernel"]
    assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # same run on another layout: equal up to the order of fp32 reductions (measured max |Δ| ~1e-6; max|param| = 1)
    assert_trees_close(jax.device_get(state.params), jax.device_get(straight_summary["state"].params), 5e-6)
    a, b = losses_by_step(copy), losses_by_step(straight[1])
    np.testing.assert_allclose([a[s] for s in sorted(b)], [b[s] for s in sorted(b)], rtol=1e-5)


def _nan_at(step_with_nan):
    """Wraps the synthetic source so that the batch of `step_with_nan` (1-based) holds NaN latents."""
    make = loop.make_data_iterator

    class NaNAt:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            batch = next(self.inner)
            if self.inner.step == step_with_nan:
                batch["x1"] = np.full_like(batch["x1"], np.nan)
            return batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    return lambda *a, **kw: NaNAt(make(*a, **kw))


def test_nonfinite_skip_keeps_training_and_eval_hook_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_data_iterator", _nan_at(3))
    seen = []

    def eval_fn(ctx):
        model = ctx.model()
        chex.assert_trees_all_equal(
            model.final_layer.linear.kernel[...], ctx.ema_params["final_layer"]["linear"]["kernel"]
        )
        seen.append(ctx.step)
        return {"step_seen": ctx.step}

    config = tiny_config(4, nonfinite="skip")
    config.eval.every = 2
    summary = loop.run(config, str(tmp_path), eval_fn=eval_fn)
    assert summary["skipped_steps"] == [3] and summary["step"] == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(summary["state"])))
    records = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert records[3]["nonfinite_steps"] == 1 and records[3]["loss"] == "nan"
    assert records[4]["nonfinite_steps"] == 0 and np.isfinite(records[4]["loss"])
    assert seen == [2, 4]
    assert [r["eval/step_seen"] for r in read_metrics(tmp_path) if "eval/step_seen" in r] == [2, 4]


def test_nonfinite_stop_raises_with_the_step_and_saves_nothing_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "make_data_iterator", _nan_at(3))
    with pytest.raises(FloatingPointError, match="non-finite DiT loss, gradient or updated state at step 3"):
        loop.run(tiny_config(5, nonfinite="stop", ckpt_every=1, log_every=5), str(tmp_path))
    assert max(int(s) for s in os.listdir(tmp_path / "checkpoints")) == 2


def test_nonfinite_update_is_dropped_on_device():
    """The step itself: a NaN batch leaves params, EMA and optimizer state untouched and advances the step."""
    run = build(tiny_config(1))
    state, aux = run.setup.init(int(run.config.seed))
    data = loop.make_data_iterator(run.config, batch_size=16, process_index=0, process_count=1)
    batch = next(data)
    batch["x1"][0, 0, 0, 0] = np.inf
    batch = parallel.host_to_global(batch, run.mesh)
    before = jax.device_get(state)
    after, metrics = run.compile(state, aux, batch)(state, aux, batch)
    after = jax.device_get(after)
    assert not bool(metrics["finite"])
    chex.assert_trees_all_equal(
        (before.params, before.ema_params, before.opt_state), (after.params, after.ema_params, after.opt_state)
    )
    assert int(after.step) == 1


def test_ema_export_from_a_workdir(straight, tmp_path):
    from sfd_jax.train.export import export_ema_from_workdir
    from sfd_jax.convert.dit import restore_dit

    k, straight_dir, summary = straight
    export_ema_from_workdir(str(straight_dir), str(tmp_path / "ema"))
    cfg, model = restore_dit(tmp_path / "ema")
    assert cfg.size_name() == "tiny"
    chex.assert_trees_all_equal(
        jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        jax.device_get(summary["state"].ema_params),
    )
    assert json.loads((tmp_path / "ema" / "meta.json").read_text())["step"] == 2 * k


def test_synthetic_batches_depend_on_seed_and_step_only():
    from sfd_jax.data.synthetic import SyntheticLatents

    whole = SyntheticLatents(batch_size=8, seed=5, num_classes=10)
    halves = [
        SyntheticLatents(batch_size=4, process_index=p, process_count=2, seed=5, num_classes=10) for p in range(2)
    ]
    for _ in range(2):
        full = next(whole)
        parts = [next(h) for h in halves]
        for key in ("x1", "y", "dino"):
            np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in parts]))
    assert full["x1"].shape == (8, 16, 16, 48) and full["x1"].dtype == np.float32
    assert full["y"].dtype == np.int32 and full["dino"].shape == (8, 256, 768)
    resumed = SyntheticLatents(batch_size=8, seed=5, num_classes=10)
    resumed.set_state(whole.get_state())
    chex.assert_trees_all_equal(next(resumed), next(whole))
    other_seed = next(SyntheticLatents(batch_size=8, seed=6, num_classes=10))
    assert not np.array_equal(other_seed["x1"], full["x1"])


def test_metrics_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX imports torch whenever it is installed (it is, beside the tests); the writer keeps it out of a
    training process, and torch still imports normally afterwards."""
    code = (
        "import sys\n"
        "from sfd_jax.train.metrics import MetricsWriter\n"
        f"w = MetricsWriter({str(tmp_path)!r}, enabled=True)\n"
        "w.write(1, {'loss': 0.5})\n"
        "w.close()\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "import torch\n"
        "print('torch', torch.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "torch imported: False" in out and "torch 2." in out, out
    assert [e.name for e in (tmp_path / "tb").iterdir()][0].startswith("events.out.tfevents"), "no TensorBoard events"
