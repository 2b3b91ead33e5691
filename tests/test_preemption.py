"""SIGTERM in the middle of --mode=extract and --mode=sample: progress is saved, the run returns normally (exit 0
from the CLI), and rerunning the same call gives exactly what an uninterrupted run gives. (--mode=train: see
test_train.py.) The signal is sent by the process to itself from inside the loop, at a chosen point."""

import os
import pathlib
import signal

import numpy as np
from test_extract import OPTS, encoders, folder, reference_run  # noqa: F401  (fixtures)
from test_sample import assets, sample_config, sampled  # noqa: F401  (fixtures)

from sfd_jax.data import records
from sfd_jax.data.extract import ExtractOptions, extract
from sfd_jax.data.sources import ImageFolderSource
from sfd_jax.eval import sample
from sfd_jax.preemption import Preemption


class SignallingSource:
    """Sends SIGTERM to this process when image `at` is read (in the middle of a shard)."""

    def __init__(self, source, at):
        self.source, self.at = source, at
        self.num_classes = source.num_classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.source[i]

    def describe(self):
        return self.source.describe()


def test_extract_sigterm_finishes_the_shard_and_resumes_to_the_same_dataset(
    folder,
    encoders,  # noqa: F811
    reference_run,
    tmp_path,
):  # noqa: F811
    out = str(tmp_path / "latents")
    source = ImageFolderSource(folder)
    with Preemption(sync=False) as preemption:  # the handler `--mode=extract` installs
        first = extract(
            SignallingSource(source, at=5), out, encoders, ExtractOptions(**OPTS), progress=False, preemption=preemption
        )
    assert first["preempted"] and not first["complete"] and first["shards_written"] == 2  # shard 1 holds image 5
    done = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
    assert len(done) == 2 and not os.path.exists(os.path.join(out, "stats.json"))
    second = extract(source, out, encoders, ExtractOptions(**OPTS), progress=False)
    assert second["complete"] and second["shards_written"] == 2  # 14 images in shards of 4: the last two
    ref_dir, _ = reference_run
    _, _, a = records.read_images(out)
    _, _, b = records.read_images(ref_dir)
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            np.testing.assert_array_equal(ra[key], rb[key])
    assert (
        records.read_json(os.path.join(out, "stats.json"), "s")["texture"]
        == records.read_json(os.path.join(ref_dir, "stats.json"), "s")["texture"]
    )


def test_sample_sigterm_saves_finished_images_and_resumes_to_the_same_npz(
    assets,
    sampled,
    tmp_path,  # noqa: F811
    monkeypatch,
):
    _, first = sampled
    real_write = sample.write_chunk

    def signalling_write(directory, start, images):
        path = real_write(directory, start, images)
        if start == 0:  # chunk [0, 24) completes with the second batch of 16, which also half-fills [24, 48)
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    monkeypatch.setattr(sample, "write_chunk", signalling_write)
    stopped = sample.run(sample_config(assets, chunk_size=24), str(tmp_path))
    monkeypatch.setattr(sample, "write_chunk", real_write)
    assert stopped["preempted"] and stopped["sampled_this_run"] == 32
    # the finished chunk and the first part of the one in progress are kept
    assert [(s, e) for s, e, _ in sample.scan_chunks(str(tmp_path / "chunks"), 64)] == [(0, 24), (24, 32)]
    assert not (tmp_path / "sample.json").exists()
    resumed = sample.run(sample_config(assets, chunk_size=24), str(tmp_path))
    assert not resumed["preempted"] and resumed["resumed_images"] == 32 and resumed["sampled_this_run"] == 32
    assert pathlib.Path(resumed["npz"]).read_bytes() == pathlib.Path(first["npz"]).read_bytes()


def test_evaluate_sigterm_saves_sample_features_and_resumes_to_the_same_scores(
    assets,
    sampled,
    tmp_path,  # noqa: F811
    monkeypatch,
):
    from test_sample import eval_config as base_config

    def eval_config(*args, batch_size, cache_reference=False, **fields):
        c = base_config(*args, **fields)
        c.eval.update(batch_size=batch_size, cache_reference=cache_reference)  # 8 batches of 8 images
        return c

    from sfd_jax.eval import evaluate
    from sfd_jax.eval.features import InceptionExtractor

    _, first = sampled
    ref = str(tmp_path / "ref.npz")
    evaluate.run(
        eval_config(assets, "build_reference", images=first["npz"], reference_out=ref, batch_size=8),
        str(tmp_path / "build"),
    )

    def scored(workdir):
        return evaluate.run(
            eval_config(assets, "score", samples=first["npz"], ref_batch=ref, batch_size=8, cache_reference=True),
            str(workdir),
        )

    straight = scored(tmp_path / "straight")
    real_rows, calls = InceptionExtractor._local_rows, []

    def signalling_rows(self, source, start, n):
        calls.append(start)
        if calls.count(24) == 2:  # the reference's 8 batches come first; SIGTERM during the samples' fourth batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_rows(self, source, start, n)

    monkeypatch.setattr(InceptionExtractor, "_local_rows", signalling_rows)
    assert scored(tmp_path / "stopped") == {"preempted": True}
    monkeypatch.setattr(InceptionExtractor, "_local_rows", real_rows)
    progress = [d for d in os.listdir(tmp_path / "stopped" / "cache") if d.startswith("sample_features_")]
    assert len(progress) == 1 and os.listdir(tmp_path / "stopped" / "cache" / progress[0]) == [
        "000000000-000000032.npz"
    ]
    calls.clear()
    monkeypatch.setattr(InceptionExtractor, "_local_rows", lambda self, *a: calls.append(a[1]) or real_rows(self, *a))
    resumed = scored(tmp_path / "stopped")
    assert calls == [32, 40, 48, 56]  # reference features from the cache, the samples' first 32 from the progress
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "num_samples"):
        assert resumed[key] == straight[key], key
