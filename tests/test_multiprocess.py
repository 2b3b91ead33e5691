"""Multi-process training and sampling: two real processes (4 CPU devices each) form one 8-device mesh through
jax.distributed, started the way `launch/slurm_multi_node.sbatch` starts them (the SLURM variables jax's cluster
detection reads, `config.distributed='auto'`), with gloo for the cross-process collectives.

They must train exactly like one process with 8 devices (same global batch, same losses, same EMA weights), write
one checkpoint and one EMA export between them, and that checkpoint must resume in a single process. Sampling over
two processes must give the single-process run's images bit for bit.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from conftest import TEST_XLA_FLAGS, assert_close
from sfd_jax.convert.dit import restore_dit
from sfd_jax.train import loop
from sfd_jax.train.metrics import read_metrics
from sfd_jax.eval import evaluate
from test_extract import OPTS, encoders, folder, reference_run  # noqa: F401 (fixtures)
from test_sample import INCEPTION_SIZE, N, PER_DEVICE, SETTINGS, assets, eval_config, sampled  # noqa: F401 (fixtures)
from test_train import REPO, losses_by_step, tiny_config

STEPS = 4


def _free_slurm_job_id() -> int:
    """A job id whose coordinator port (jax: 61440 + id mod 4096) is free now."""
    for port in range(61440 + os.getpid() % 2048, 65536):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port - 61440
    raise RuntimeError("no free port in 61440-65535 for the jax coordinator")


def run_two_processes(args, workdir, timeout=600):
    """`python -m sfd_jax.main ARGS --workdir=WORKDIR` as SLURM tasks 0 and 1 of one step; returns their outputs.

    Each pair takes 20-50 s here; the timeout only ends a hang (a collective waiting for a dead peer), with room for
    a CI machine several times slower."""
    job_id = _free_slurm_job_id()
    cmd = [sys.executable, "-m", "sfd_jax.main", *args, f"--workdir={workdir}"]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
            SLURM_JOB_ID=str(job_id),
            SLURM_NTASKS="2",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_STEP_NODELIST="localhost",
        )
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {rank} failed:\n{out[-4000:]}"
    return outputs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    outputs = run_two_processes(
        [
            "--config=configs/sfd.py:tiny",
            f"--config.train.num_steps={STEPS}",
            "--config.train.log_every=1",
            "--config.train.ckpt_every=2",
        ],
        workdir,
    )
    return workdir, outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in this process: 8 devices (conftest), mesh (1, 8, 1)."""
    workdir = tmp_path_factory.mktemp("one_process")
    loop.run(tiny_config(STEPS, ckpt_every=2, export_ema=True, async_checkpoint=False), str(workdir))
    return workdir


def _ema(directory):
    return dict(nnx.to_flat_state(nnx.state(restore_dit(str(directory))[1], nnx.Param)))


def _assert_same_weights(a, b, rel):
    """Every weight within rel × the largest |weight| of the model (1.0 for the tiny DiT: the RMSNorm weights)."""
    assert a.keys() == b.keys()
    scale = max(float(np.max(np.abs(np.asarray(b[path][...])))) for path in b)
    for path in a:
        assert_close(a[path][...], b[path][...], rel, scale=scale, err_msg=str(path))


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
    _assert_same_weights(_ema(workdir / "ema"), _ema(one_process / "ema"), 1e-6)
    # one metrics writer (process 0): each step logged once
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == list(range(1, STEPS + 1))


def _continue_in_this_process(src, dst):
    """A copy of the run in `src` (its EMA export removed) continued in this process to step STEPS + 2."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "ema")
    loop.run(tiny_config(STEPS + 2, ckpt_every=2, export_ema=True, async_checkpoint=False), str(dst))
    steps = [r["step"] for r in read_metrics(dst) if "loss" in r]
    assert steps == list(range(1, STEPS + 3)), f"{dst.name}: steps logged {steps} (resume must not repeat steps)"
    return dst


@pytest.fixture(scope="module")
def single_continued(one_process, tmp_path_factory):
    return _continue_in_this_process(one_process, tmp_path_factory.mktemp("continued") / "single")


def test_checkpoint_of_two_processes_resumes_in_one(two_processes, single_continued, tmp_path):
    """The two processes' checkpoint (state + both data-iterator states) continues in one process to the same
    weights as the single-process run continued from its own checkpoint."""
    workdir, _ = two_processes
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()
    multi = _continue_in_this_process(workdir, tmp_path / "multi")
    _assert_same_weights(_ema(multi / "ema"), _ema(single_continued / "ema"), 1e-6)


def test_one_process_checkpoint_continues_in_two_on_a_hybrid_mesh(one_process, single_continued, tmp_path):
    """More hosts after a preemption, on the multi-slice / multi-node layout: the single process's checkpoint
    continues in two processes with mesh.dcn=(2,1,1), mesh.ici=(1,4,1) (data parallel over the slow network, FSDP
    inside each process, built by create_hybrid_device_mesh with processes as the DCN units). Steps 5 and 6 have the
    losses, and the run ends on the EMA weights, of the single process's own continuation."""
    dst = tmp_path / "single_then_two"
    shutil.copytree(one_process, dst)
    shutil.rmtree(dst / "ema")
    outputs = run_two_processes(
        [
            "--config=configs/sfd.py:tiny",
            f"--config.train.num_steps={STEPS + 2}",
            "--config.train.log_every=1",
            "--config.train.ckpt_every=2",
            "--config.mesh.dcn=(2,1,1)",
            "--config.mesh.ici=(1,4,1)",
        ],
        dst,
    )
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in outputs[0]
    assert "written by 1 processes, resuming with 2" in outputs[1]
    assert [r["step"] for r in read_metrics(dst) if "loss" in r] == list(range(1, STEPS + 3))
    hybrid, single = losses_by_step(dst), losses_by_step(single_continued)
    assert hybrid.keys() == single.keys()
    np.testing.assert_allclose([hybrid[s] for s in sorted(hybrid)], [single[s] for s in sorted(single)], rtol=1e-6)
    _assert_same_weights(_ema(dst / "ema"), _ema(single_continued / "ema"), 1e-6)


# ------------------------------------------------------------------------------------------------ --mode=sample
def test_two_processes_sample_the_same_images_as_one(assets, sampled, tmp_path):
    """`--mode=sample` over two processes (8 devices, 2 images each per batch): every process generates its share of
    each batch, process 0 writes the chunks and the npz — byte-identical to the single-process run's images."""
    overrides = {
        "model": assets.dit_dir,
        "texture_vae": assets.vae_dir,
        "latent_stats": assets.stats,
        "num_images": N,
        "per_device_batch": PER_DEVICE,
        "num_steps": SETTINGS.num_steps,
        "chunk_size": 16,
        "log_every_s": 0.0,
    }
    outputs = run_two_processes(
        ["--config=configs/sample.py:tiny", "--mode=sample"]
        + [f"--config.sample.{k}={v}" for k, v in overrides.items()],
        tmp_path / "two",
    )
    assert "process 1 of 2, 4 local / 8 global devices" in outputs[1]
    workdir, summary = sampled
    with np.load(summary["npz"]) as one, np.load(tmp_path / "two" / os.path.basename(summary["npz"])) as two:
        np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
        np.testing.assert_array_equal(two["arr_1"], one["arr_1"])


# ---------------------------------------------------------------------------------------------- --mode=evaluate
def test_two_processes_score_like_one(assets, sampled, tmp_path):
    """`--mode=evaluate` over two processes (Inception features of each batch split between them, statistics and
    metrics on process 0) gives the single-process scores. The reference is the samples flipped and brightened, so
    that every metric is away from its trivial value."""
    _, summary = sampled
    with np.load(summary["npz"]) as z:
        ref_images = np.clip(z["arr_0"][:, :, ::-1].astype(np.int32) + 40, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "ref_images.npz", arr_0=ref_images)
    ref = tmp_path / "ref.npz"
    evaluate.run(
        eval_config(assets, "build_reference", images=str(tmp_path / "ref_images.npz"), reference_out=str(ref)),
        str(tmp_path / "build"),
    )
    fields = dict(samples=summary["npz"], ref_batch=str(ref))
    evaluate.run(eval_config(assets, "score", output=str(tmp_path / "one.json"), **fields), str(tmp_path / "one"))
    cli = dict(
        inception_weights=assets.inception,
        input_size=INCEPTION_SIZE,
        batch_size=N,
        reference_keep=0,
        cache_reference=False,
        output=str(tmp_path / "two.json"),
        **fields,
    )
    run_two_processes(
        ["--config=configs/eval.py:score", "--mode=evaluate"] + [f"--config.eval.{k}={v}" for k, v in cli.items()],
        tmp_path / "two",
    )
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    # (measured: FID 0.122, sFID 0.092, precision 0.0625, recall 0.281 with the random Inception; two processes
    # agree to 2e-7 relative)
    assert one["fid"] > 0.01 and one["sfid"] > 0.01 and one["precision"] < 1 and one["recall"] < 1, one
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------------------------- --mode=extract
def test_two_processes_extract_the_same_dataset(encoders, folder, reference_run, tmp_path):
    """`--mode=extract` over two processes: each encodes its own shards, process 0 the statistics after a barrier;
    the shards are byte-identical to the single-process extraction's and the statistics equal."""
    from sfd_jax.convert.dinov2 import save_pretrained
    from sfd_jax.convert.semvae import save_semvae
    from sfd_jax.convert.texture_vae import save_texture_vae
    from sfd_jax.data import records

    save_texture_vae(tmp_path / "tvae", encoders.texture_vae)
    save_pretrained(encoders.dinov2, tmp_path / "dino")
    save_semvae(tmp_path / "semvae", encoders.semvae)
    fields = dict(
        texture_vae=tmp_path / "tvae",
        dinov2=tmp_path / "dino",
        semvae=tmp_path / "semvae",
        semvae_num_heads=2,
        num_workers=2,
        progress=False,
        **OPTS,
    )
    out = tmp_path / "two"
    outputs = run_two_processes(
        ["--config=configs/extract.py:folder", "--mode=extract", f"--config.extract.source.path={folder}"]
        + [f"--config.extract.{k}={v}" for k, v in fields.items()],
        out,
    )
    assert "process 1 of 2" in outputs[1]
    ref_dir, _ = reference_run
    for name in [records.shard_name("latents", s, 4) for s in range(4)]:
        assert (out / name).read_bytes() == (pathlib.Path(ref_dir) / name).read_bytes(), name
    # stats.json: the same moments; `made_by` names the weights files here and "in-memory" there, same sha256
    two, one = (records.read_json(os.path.join(d, "stats.json"), "stats") for d in (out, ref_dir))
    made_by_two, made_by_one = two.pop("made_by"), one.pop("made_by")
    assert two == one
    assert {k: v["sha256"] for k, v in made_by_two.items()} == {k: v["sha256"] for k, v in made_by_one.items()}
