"""Multi-process training: two real processes (4 CPU devices each) form one 8-device mesh through
jax.distributed, started the way `launch/slurm_multi_node.sbatch` starts them (the SLURM variables jax's cluster
detection reads, `config.distributed='auto'`), with gloo for the cross-process collectives.

They must train exactly like one process with 8 devices (same global batch, same losses, same EMA weights), write
one checkpoint and one EMA export between them, and that checkpoint must resume in a single process.
"""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from sfd_jax.convert.dit import restore_dit
from sfd_jax.train import loop
from sfd_jax.train.metrics import read_metrics
from test_train import REPO, losses_by_step, tiny_config

STEPS = 4


def _free_slurm_job_id() -> int:
    """A job id whose coordinator port (jax: 61440 + id mod 4096) is free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port >= 61440:
            return port - 61440
    with socket.socket() as s:  # the kernel's ephemeral range is below jax's: try jax's range directly
        for port in range(61440 + os.getpid() % 2048, 65536):
            try:
                s.bind(("", port))
                return port - 61440
            except OSError:
                continue
    raise RuntimeError("no free port in 61440-65535 for the jax coordinator")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    job_id = _free_slurm_job_id()
    cmd = [sys.executable, "-m", "sfd_jax.main", "--config=configs/sfd.py:tiny", f"--workdir={workdir}",
           f"--config.train.num_steps={STEPS}", "--config.train.log_every=1", "--config.train.ckpt_every=2"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", SLURM_JOB_ID=str(job_id), SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="localhost")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {rank} failed:\n{out[-4000:]}"
    return workdir, outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in this process: 8 devices (conftest), mesh (1, 8, 1)."""
    workdir = tmp_path_factory.mktemp("one_process")
    loop.run(tiny_config(STEPS, ckpt_every=2, export_ema=True, async_checkpoint=False), str(workdir))
    return workdir


def _ema(directory):
    return dict(nnx.to_flat_state(nnx.state(restore_dit(str(directory))[1], nnx.Param)))


def _assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose(np.asarray(a[path][...]), np.asarray(b[path][...]), rtol=0, atol=atol,
                                   err_msg=str(path))


def test_two_processes_form_one_mesh(two_processes):
    _, outputs = two_processes
    for rank, out in enumerate(outputs):
        assert f"jax.distributed initialised: process {rank} of 2, 4 local / 8 global devices" in out
        assert "global batch 16 (8 per process) | 8 devices" in out


def test_two_processes_train_like_one(two_processes, one_process):
    """Same losses at every step and the same EMA weights; only the order of cross-device sums differs (the
    float32 rounding seen: losses 1e-7 relative, weights 1.5e-8)."""
    workdir, _ = two_processes
    multi, single = losses_by_step(workdir), losses_by_step(one_process)
    assert sorted(multi) == list(range(1, STEPS + 1)) and multi.keys() == single.keys()
    np.testing.assert_allclose([multi[s] for s in sorted(multi)], [single[s] for s in sorted(single)], rtol=1e-6)
    _assert_same_weights(_ema(workdir / "ema"), _ema(one_process / "ema"), atol=1e-6)
    # one metrics writer (process 0): each step logged once
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == list(range(1, STEPS + 1))


def test_checkpoint_of_two_processes_resumes_in_one(two_processes, one_process, tmp_path):
    """The two processes' checkpoint (state + both data-iterator states) continues in one process to the same
    weights as the single-process run continued from its own checkpoint."""
    workdir, _ = two_processes
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()
    continued = {}
    for name, src in (("multi", workdir), ("single", one_process)):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        shutil.rmtree(dst / "ema")
        loop.run(tiny_config(STEPS + 2, ckpt_every=2, export_ema=True, async_checkpoint=False), str(dst))
        steps = [r["step"] for r in read_metrics(dst) if "loss" in r]
        assert steps == list(range(1, STEPS + 3)), f"{name}: steps logged {steps} (resume must not repeat steps)"
        continued[name] = dst
    _assert_same_weights(_ema(continued["multi"] / "ema"), _ema(continued["single"] / "ema"), atol=1e-6)
