"""Reader throughput: records/s of `sfd_jax.data.pipeline` with full SFD records. Prints one JSON line.

    python benchmarks/data.py --num_images=1024 --batch_size=256 --read_threads=8 --seconds=20

Writes a synthetic dataset with the production records (per view: texture 16×16×32 and semantic 16×16×16 float32,
DINOv2 tokens 256×768 float16: 442,384 bytes; two views per image) into --dir (a temporary folder by default), then
iterates the training iterator (shuffle, flip choice, decode, normalise, batch) for --seconds after one warm-up
batch. The shards were just written, so they are read from the page cache: the figure is the reader's CPU cost,
not the disk's. `records_per_cpu_s` divides by the CPU time the process used, which stays meaningful on a machine
shared with other work. Target: ≥ 5,000 records/s per host.
"""

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sfd_jax.data import pipeline, records  # noqa: E402

LAYOUT = records.RecordLayout((16, 16, 32), (16, 16, 16), (256, 768), "float32", "float16")


def write_dataset(directory: str, num_images: int, shard_size: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    num_shards = -(-num_images // shard_size)
    names = [records.shard_name("latents", s, num_shards) for s in range(num_shards)]
    for s, name in enumerate(names):
        idx = np.arange(s * shard_size, min((s + 1) * shard_size, num_images))
        writer = records.ShardWriter(os.path.join(directory, name))
        for start in range(0, len(idx), 64):
            part = idx[start : start + 64]
            arrays = {}
            for field in LAYOUT.pair_fields:
                dtype, shape = LAYOUT.field_spec(field)
                arrays[field] = rng.standard_normal((len(part), *shape), np.float32).astype(dtype)
            writer.write(LAYOUT.pack_pairs(index=part, label=part % 1000, **arrays))
        writer.commit()
        records.write_json_atomic(
            os.path.join(directory, name + ".json"), {"num_images": len(idx), "num_records": 2 * len(idx)}
        )
    records.write_json_atomic(
        os.path.join(directory, "dataset.json"), {"format": records.FORMAT, "layout": LAYOUT.to_json(), "shards": names}
    )
    records.write_json_atomic(
        os.path.join(directory, "stats.json"),
        {
            "format": records.STATS_FORMAT,
            "texture": {"mean": [0.0] * 32, "std": [1.0] * 32},
            "semantic": {"mean": [0.0] * 16, "std": [1.0] * 16},
        },
    )


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--read_threads", type=int, default=8)
    p.add_argument("--prefetch_batches", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--dir", default="", help="dataset folder (kept); default: a temporary folder (deleted)")
    a = p.parse_args()
    directory = a.dir or tempfile.mkdtemp(prefix="sfd_data_bench_")
    try:
        if not os.path.exists(os.path.join(directory, "dataset.json")):
            os.makedirs(directory, exist_ok=True)
            write_dataset(directory, a.num_images)
        data_cfg = {
            "source": "arrayrecord",
            "path": directory,
            "read_threads": a.read_threads,
            "prefetch_batches": a.prefetch_batches,
        }
        it = pipeline.make_iterator(data_cfg, batch_size=a.batch_size, process_index=0, process_count=1, seed=0)
        next(it)  # threads started, first batches in flight
        n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
        while time.perf_counter() - t0 < a.seconds:
            batch = next(it)
            n += len(batch["y"])
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        print(
            json.dumps(
                {
                    "benchmark": "data_reader",
                    "records_per_s": round(n / dt, 1),
                    # CPU seconds of all reader threads: the cost per record, independent of other load on the machine.
                    "records_per_cpu_s": round(n / max(cpu, 1e-9), 1),
                    "cpu_s": round(cpu, 2),
                    "load_avg_1min": round(os.getloadavg()[0], 2),
                    "MB_per_s_read": round(n * LAYOUT.size / dt / 1e6, 1),  # one view record per sample
                    "record_bytes": LAYOUT.size,
                    "batch_size": a.batch_size,
                    "read_threads": a.read_threads,
                    "num_images": a.num_images,
                    "records_read": n,
                    "seconds": round(dt, 2),
                    "cpu_count": os.cpu_count(),
                    "page_cache": "warm",
                    "target_records_per_s": 5000,
                }
            )
        )
    finally:
        if not a.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
