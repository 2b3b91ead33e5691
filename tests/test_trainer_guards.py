"""The loop every trainer shares (sfd_jax.train.skeleton), driven through the DiT, SemVAE and texture-VAE trainers
alike: a NaN step between log steps, SIGTERM/SIGINT mid-run, resume == uninterrupted; and the guards: a non-finite
*updated state*, the workdir lock, a failed asynchronous save, honest metrics windows after a resume."""

import errno
import json
import os
import signal
import socket
import time

import chex
import jax
import numpy as np
import optax
import pytest

from sfd_jax.config_loader import load_config
from sfd_jax import checkpoint as checkpoint_lib
from sfd_jax.train import lock as lock_lib
from sfd_jax.train import loop, semvae, skeleton, texture_vae
from sfd_jax.train.config import ConfigError
from sfd_jax.train.metrics import read_metrics
from sfd_jax.train.state import TrainState
from sfd_jax.train.step import guarded_update

STEPS = 6


def _config(file, variant):
    return load_config(f"configs/{file}.py:{variant}")


def dit_config():
    c = _config("sfd", "tiny")
    c.train.update(export_ema=False)
    return c


def semvae_config():
    c = _config("semvae", "tiny")
    c.eval.update(every=0)
    return c


def texture_config():
    c = _config("texture_vae", "tiny")
    c.eval.update(every=0)
    return c


# name -> (config factory, run(config, workdir) -> {'step', 'state', 'preempted'})
TRAINERS = {
    "dit": (dit_config, loop.run),
    "semvae": (semvae_config, semvae.run),
    "texture_vae": (texture_config, lambda c, w: texture_vae.run(c, w)),
}


def _settings(config, **train):
    config.train.update(num_steps=STEPS, log_every=3, ckpt_every=2, keep_last=10, async_checkpoint=True)
    config.train.update(train)
    return config


def _run(name, workdir, **train):
    make, run = TRAINERS[name]
    return run(_settings(make(), **train), str(workdir))


def _last_state(workdir, name):
    """The final state of checkpoint `STEPS` (the trainers' return values differ; the checkpoint does not)."""
    ckpt = checkpoint_lib.Checkpoints(str(workdir), keep_last=100)
    try:
        step = ckpt.latest_step()
        return step, jax.device_get(
            ckpt.manager.restore(
                step, args=checkpoint_lib.ocp.args.Composite(state=checkpoint_lib.ocp.args.StandardRestore())
            ).state
        )
    finally:
        ckpt.close()


class _NaNStep:
    """Wraps a Task's step so that the step number `bad` (1-based) sees a NaN learning signal: its batch is made
    NaN. Installed by patching skeleton.run."""

    def __init__(self, monkeypatch, bad):
        real = skeleton.run

        def patched(task, config, workdir):
            inner = task.make_data

            def make_data(start, state):
                data = inner(start, state)
                return _Poison(data, start, bad)

            task.make_data = make_data
            return real(task, config, workdir)

        monkeypatch.setattr(skeleton, "run", patched)


class _Poison:
    def __init__(self, data, start, bad):
        self.data, self.step, self.bad = data, start, bad

    def __next__(self):
        batch = next(self.data)
        self.step += 1
        if self.step == self.bad:
            if isinstance(batch, dict):
                return {k: (np.full_like(v, np.nan) if k == "x1" else v) for k, v in batch.items()}
            return np.full_like(batch, np.nan)
        return batch

    def get_state(self):
        return self.data.get_state()


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_nan_between_log_steps_stops_at_that_step(name, tmp_path, monkeypatch):
    """log_every=3, ckpt_every=2: a NaN at step 5 is reported as step 5 and nothing past step 4 is saved."""
    _nan_at_step_5(name, monkeypatch)
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 5 \(train.nonfinite='stop'\)"):
        _run(name, tmp_path, nonfinite="stop")
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 4]


def _nan_at_step_5(name, monkeypatch):
    """The texture VAE draws its batches itself (load_images), the others through the skeleton's make_data."""
    if name == "texture_vae":
        monkeypatch.setattr(texture_vae, "load_images", _nan_images_at(texture_vae.load_images, call=5))
    else:
        _NaNStep(monkeypatch, 5)


def _nan_images_at(real, call):
    """load_images whose `call`-th training call returns float NaN images (the step converts with astype)."""
    count = {"n": 0}

    def load(source, indices, size):
        out = real(source, indices, size)
        if len(indices) == 16:  # the training batches (the evaluation images are 8)
            count["n"] += 1
            if count["n"] == call:
                return np.full(out.shape, np.nan, np.float32)
        return out

    return load


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_nan_skip_drops_only_that_step(name, tmp_path, monkeypatch):
    _nan_at_step_5(name, monkeypatch)
    _run(name, tmp_path, nonfinite="skip")
    step, state = _last_state(tmp_path, name)
    assert step == STEPS
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating))
    lines = {r["step"]: r for r in read_metrics(tmp_path) if "nonfinite_steps" in r}
    assert (lines[3]["nonfinite_steps"], lines[6]["nonfinite_steps"]) == (0, 1)
    assert lines[3]["window_steps"] == lines[6]["window_steps"] == 3


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_signal_saves_exits_and_resume_equals_uninterrupted(name, tmp_path, monkeypatch):
    """SIGTERM (dit, texture VAE) or SIGINT (SemVAE) after step 3: a checkpoint of step 3, a normal return; the
    rerun resumes to a final state bit-identical to an uninterrupted run's, with an honest metrics window."""
    _run(name, tmp_path / "straight")
    sig = signal.SIGINT if name == "semvae" else signal.SIGTERM
    real = skeleton.Window.add

    def add(self, step, metrics):
        real(self, step, metrics)
        if step == 3:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(skeleton.Window, "add", add)
    out = _run(name, tmp_path / "resumed")
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2", "3"]
    if isinstance(out, dict) and "preempted" in out:
        assert out["preempted"]
    monkeypatch.setattr(skeleton.Window, "add", real)
    _run(name, tmp_path / "resumed")
    a, b = _last_state(tmp_path / "straight", name), _last_state(tmp_path / "resumed", name)
    assert a[0] == b[0] == STEPS
    chex.assert_trees_all_equal(a[1], b[1])
    lines = [r for r in read_metrics(tmp_path / "resumed") if "window_steps" in r]
    # step 3 logged by the interrupted run (3 steps), 6 by the resumed one: 3 steps (4, 5, 6), labelled so
    assert [(r["step"], r["window_steps"]) for r in lines] == [(3, 3), (6, 3)]


def test_resumed_window_is_labelled_with_its_length(tmp_path, monkeypatch):
    """Preempted at step 4 (log_every=3): the first line after the resume averages steps 5-6 only, and says so."""
    real = skeleton.Window.add

    def add(self, step, metrics):
        real(self, step, metrics)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(skeleton.Window, "add", add)
    _run("dit", tmp_path)
    monkeypatch.setattr(skeleton.Window, "add", real)
    _run("dit", tmp_path)
    lines = [(r["step"], r["window_steps"]) for r in read_metrics(tmp_path) if "window_steps" in r]
    assert lines == [(3, 3), (6, 2)]


# ---------------------------------------------------------------------------------------------------------------
# A non-finite updated state
# ---------------------------------------------------------------------------------------------------------------
def test_infinite_lr_with_finite_loss_and_gradient_is_not_kept():
    params = {"w": np.ones((3,), np.float32)}
    tx = optax.sgd(float("inf"))
    state = TrainState(
        params=params, ema_params=params, opt_state=tx.init(params), step=np.int32(0), rng=jax.random.PRNGKey(0)
    )
    grads = {"w": np.full((3,), 0.5, np.float32)}
    new, guard = jax.jit(lambda s, g: guarded_update(s, tx, g, np.float32(1.0), 0.5))(state, grads)
    assert np.isfinite(float(guard["grad_norm"]))  # loss and gradient are finite ...
    assert not bool(guard["finite"])  # ... the new weights are not: the step is dropped
    np.testing.assert_array_equal(np.asarray(new.params["w"]), params["w"])
    np.testing.assert_array_equal(np.asarray(new.ema_params["w"]), params["w"])
    assert int(new.step) == 1


@pytest.mark.parametrize("name", sorted(TRAINERS))
@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("inf"))])
def test_non_finite_optimizer_settings_are_refused(name, field, value, tmp_path):
    config = _settings(TRAINERS[name][0]())
    config.optim[field] = value
    with pytest.raises(ConfigError, match=f"config.optim.{field}: .* must be a finite number"):
        TRAINERS[name][1](config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_stop_mode_never_writes_a_nan_checkpoint(tmp_path, monkeypatch):
    """A non-finite step 1 with ckpt_every=1: 'stop' raises before the first save."""
    _NaNStep(monkeypatch, 1)
    with pytest.raises(FloatingPointError, match="at step 1"):
        _run("dit", tmp_path, nonfinite="stop", ckpt_every=1)
    assert not os.listdir(tmp_path / "checkpoints")


# ---------------------------------------------------------------------------------------------------------------
# The workdir lock
# ---------------------------------------------------------------------------------------------------------------
def _write_lock(workdir, **fields):
    now = time.time()
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": lock_lib._process_start(os.getpid()),
        "started": now,
        "heartbeat": now,
    }
    holder.update(fields)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / lock_lib.LOCK_NAME).write_text(json.dumps(holder))
    return holder


def test_a_live_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    _write_lock(tmp_path, pid=os.getppid(), pid_start=lock_lib._process_start(os.getppid()))
    with pytest.raises(
        lock_lib.WorkdirLocked,
        match=rf"in use by another run \(host '{socket.gethostname()}', "
        rf"pid {os.getppid()}, started \d{{4}}-",
    ):
        _run("texture_vae", tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_lock_of_another_live_host_refuses(tmp_path):
    _write_lock(tmp_path, host="other-host", pid=1, heartbeat=time.time() - 30)
    with pytest.raises(lock_lib.WorkdirLocked, match="host 'other-host', pid 1"):
        with lock_lib.WorkdirLock(str(tmp_path)):
            pass


@pytest.mark.parametrize("stale", ["dead_pid", "reused_pid", "old_heartbeat"])
def test_a_stale_lock_does_not_block_the_resume(stale, tmp_path):
    if stale == "dead_pid":
        _write_lock(tmp_path, pid=2**22 + 12345)  # above the default pid_max: never a live process
    elif stale == "reused_pid":
        _write_lock(tmp_path, pid=os.getppid(), pid_start="1")  # a live pid, but not the process that wrote it
    else:
        _write_lock(tmp_path, host="other-host", heartbeat=time.time() - 2 * lock_lib.STALE_S)
    with lock_lib.WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / lock_lib.LOCK_NAME).read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
    assert not (tmp_path / lock_lib.LOCK_NAME).exists()  # released on exit


def test_the_heartbeat_refreshes_the_lock_in_place(tmp_path, monkeypatch):
    """A live run's heartbeat moves forward (else after STALE_S another host would take its workdir), and each
    refresh replaces the file whole, leaving no temporary file behind."""
    monkeypatch.setattr(lock_lib, "HEARTBEAT_S", 0.05)
    with lock_lib.WorkdirLock(str(tmp_path)):
        first = json.loads((tmp_path / lock_lib.LOCK_NAME).read_text())
        time.sleep(0.5)
        later = json.loads((tmp_path / lock_lib.LOCK_NAME).read_text())
        assert later["heartbeat"] > first["heartbeat"] and later["started"] == first["started"]
    assert os.listdir(tmp_path) == []


def test_only_process_zero_holds_the_lock(tmp_path):
    with lock_lib.WorkdirLock(str(tmp_path), enabled=False):
        assert not (tmp_path / lock_lib.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------
# A failed asynchronous save, unreadable checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_a_failed_async_save_stops_at_the_next_step_with_one_line(tmp_path, monkeypatch):
    """The save of step 4 fails in the background with ENOSPC: the run stops before step 6 with the path, the OS
    error and the last good checkpoint (2), not at the next save."""
    from orbax.checkpoint import checkpoint_manager as cm

    real = cm.CheckpointManager._finalize_checkpoint

    def finalize(self, step):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "checkpoints" / "4"))
        return real(self, step)

    monkeypatch.setattr(cm.CheckpointManager, "_finalize_checkpoint", finalize)
    seen = []
    real_add = skeleton.Window.add
    monkeypatch.setattr(skeleton.Window, "add", lambda self, s, m: (seen.append(s), real_add(self, s, m)))
    with pytest.raises(checkpoint_lib.CheckpointSaveError) as info:
        _run("dit", tmp_path, num_steps=40, ckpt_every=2)
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint {tmp_path / 'checkpoints' / '4'} failed" in message
    assert "No space left on device" in message
    assert message.endswith(f"the last good checkpoint is {tmp_path / 'checkpoints' / '2'}")
    assert max(seen) < 6 + 2  # surfaced at a step boundary right after the failure, long before step 40


def test_no_readable_checkpoint_is_one_line_without_library_noise(tmp_path, capfd):
    _run("texture_vae", tmp_path)
    config = _settings(texture_config(), num_steps=STEPS + 2)
    config.model.ch = 8  # a different architecture: no checkpoint fits
    with pytest.raises(checkpoint_lib.NoReadableCheckpoint) as info:
        texture_vae.run(config, str(tmp_path))
    assert "\n" not in str(info.value) and f"no readable checkpoint in {tmp_path / 'checkpoints'}" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "Traceback" not in capfd.readouterr().err
