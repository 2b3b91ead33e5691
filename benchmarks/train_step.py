"""Train-step throughput and MFU of the real jitted SFD step; prints one JSON object.

    python benchmarks/train_step.py --size=b --batch=8                     # CPU, fp32: the DiT-B MFU figure
    python benchmarks/train_step.py --size=s --batch=16
    python benchmarks/train_step.py --size=xl --batch=32 --dtype=bfloat16  # an accelerator
    python benchmarks/train_step.py --size=b --batch=8 --set model.remat=True --no-donate --loop

The step is `sfd_jax.train.build.build(config).train_step`: the same function, shardings and buffer donation the
trainer uses (label dropout, SFD loss with REPA, AdamW, EMA, non-finite guard), built from --config (default
configs/sfd.py:xl) with --size/--dtype/--batch/--set applied. The state is initialised sharded; the batch comes
from the synthetic source.

Figures:
- `step_s`: median wall time of one step when steps are dispatched back to back and only the last is waited for
  (what the training loop does between log steps); `step_s_synced`: waiting for every step's loss.
- `mfu` = analytic FLOPs per step / step_s ÷ (devices × dense-matmul peak measured in this process, in the compute
  dtype, right before and after the steps; the better of the two median peaks is used). FLOPs are forward +
  backward of the DiT and the REPA projector (`train_flops_per_image`, multiply-add = 2 FLOPs, element-wise work
  not counted). `xla_flops_per_step` is XLA's cost analysis of the compiled step (all devices), which also counts
  element-wise work and the optimizer.
- `--loop`: also times the data path the loop adds (synthetic batch on the host → `host_to_global` → step),
  synchronous as in `sfd_jax.train.loop` and with a background thread prefetching the next batch to the devices.
- `--no-donate`: the same step jitted without donating the state (for the before/after of donation).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time

from common import (
    emit,
    environment,
    jit_without_donation,
    load_config,
    log,
    matmul_peak,
    set_host_device_count,
    summary,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sfd.py:xl", help="config file:variant (default %(default)s)")
    p.add_argument("--size", default="b", help="model size: tiny | s | b | l | xl | xxl (overrides the config)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    p.add_argument("--devices", type=int, default=0, help="fake this many CPU devices (0: the real devices)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override, e.g. model.remat=True or mesh.ici='(1,-1,1)' (repeatable)",
    )
    p.add_argument("--no-donate", action="store_true", help="jit the step without donating the state")
    p.add_argument("--loop", action="store_true", help="also time host batch -> device transfer, with/without prefetch")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_host_device_count(args.devices)
    import jax

    from sfd_jax import parallel
    from sfd_jax.data.synthetic import make_iterator
    from sfd_jax.train.build import build

    platform = jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    config = load_config(
        args.config,
        [f"model.size={args.size}", f"model.dtype={dtype}", f"train.batch_size={args.batch}"] + list(args.set),
    )
    env = environment()
    log(f"[train_step] {env}")

    run = build(config)
    setup = run.setup
    train_step = jit_without_donation(run) if args.no_donate else run.train_step

    data = make_iterator(config.data, batch_size=args.batch, process_index=0, process_count=1, seed=0)
    host_batch = next(data)
    batch = parallel.host_to_global(host_batch, run.mesh)
    state, aux = setup.init(int(config.seed))

    t0 = time.perf_counter()
    lowered = train_step.lower(state, aux, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    log(f"[train_step] lowered in {t1 - t0:.1f}s, compiled in {t2 - t1:.1f}s")
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()

    # Warm-up: the first call also allocates the donated outputs.
    state, metrics = compiled(state, aux, batch)
    jax.block_until_ready(metrics["loss"])

    def pipelined():
        nonlocal state
        for _ in range(args.steps):
            state, m = compiled(state, aux, batch)
        jax.block_until_ready(m["loss"])

    def synced():
        nonlocal state
        for _ in range(args.steps):
            state, m = compiled(state, aux, batch)
            float(m["loss"])  # a host read per step, as a loop that logs every step would do

    # Rounds of (matmul peak, steps) so that each step time is compared with a peak taken under the same load of a
    # shared machine; wall and process-CPU seconds are both recorded.
    matmul_peak(dtype, repeats=1)  # compile the peak kernel outside the rounds
    rounds = []
    for r in range(args.repeats):
        peak = matmul_peak(dtype, repeats=3)
        wall, cpu = _clock(pipelined)
        rounds.append(
            {
                "peak_flops_per_s": peak["flops_per_s_median"],
                "peak_flops_per_cpu_s": peak["flops_per_cpu_s"],
                "step_s": wall / args.steps,
                "step_cpu_s": cpu / args.steps,
            }
        )
        log(
            f"[train_step] round {r}: peak {peak['flops_per_s_median'] / 1e9:.1f} GFLOP/s, "
            f"step {wall / args.steps:.3f}s"
        )
    synced_t = [t / args.steps for t in _repeat(synced, 1)]

    n_dev = jax.device_count()
    flops_step = run.flops_per_image * args.batch
    step_s = statistics.median(r["step_s"] for r in rounds)
    for r in rounds:
        r["mfu"] = flops_step / r["step_s"] / (n_dev * r["peak_flops_per_s"])
        # Process CPU time: on an oversubscribed host both figures count only the cycles this process got.
        r["mfu_cpu_time"] = flops_step / r["step_cpu_s"] / r["peak_flops_per_cpu_s"]
    peak = statistics.median(r["peak_flops_per_s"] for r in rounds)
    xla_flops = float(cost.get("flops", float("nan")))
    # cost_analysis of an SPMD program counts one device's partition.
    xla_flops_total = xla_flops * n_dev if n_dev > 1 else xla_flops
    result = {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + " ".join(_argv(argv)),
        "size": run.model_cfg.size_name() or args.size,
        "dtype": dtype,
        "global_batch": args.batch,
        "remat": run.model_cfg.remat,
        "donate": not args.no_donate,
        "mesh": dict(run.mesh.shape),
        "params": run.derived["num_params"],
        "compile_s": round(t2 - t1, 2),
        "lower_s": round(t1 - t0, 2),
        "step_s": step_s,
        "step_s_all": summary([r["step_s"] for r in rounds]),
        "step_s_synced": statistics.median(synced_t),
        "img_per_s": args.batch / step_s,
        "img_per_s_per_device": args.batch / step_s / n_dev,
        "flops_per_image": run.flops_per_image,
        "flops_per_step": flops_step,
        "xla_flops_per_step": xla_flops_total,
        "xla_over_analytic": xla_flops_total / flops_step,
        "model_flops_per_s": flops_step / step_s,
        "peak_flops_per_s_per_device": peak,
        "mfu": statistics.median(r["mfu"] for r in rounds),
        "mfu_cpu_time": statistics.median(r["mfu_cpu_time"] for r in rounds),
        "rounds": rounds,
        "memory_per_device_bytes": _memory(mem),
        "env": env,
    }
    if args.loop:
        result["loop"] = _loop_figures(compiled, state, aux, data, run.mesh, args, parallel)
    result["env"]["load_avg_1m_end"] = environment().get("load_avg_1m")
    emit(result)
    return result


def _clock(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _repeat(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _memory(mem) -> dict | None:
    if mem is None:
        return None
    out = {
        k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _loop_figures(compiled, state, aux, data, mesh, args, parallel) -> dict:
    """Per-step time of steps fed from the host iterator: synchronous transfer vs a prefetch thread."""
    import jax

    def sync_loop(n):
        nonlocal state
        t = time.perf_counter()
        for _ in range(n):
            batch = parallel.host_to_global(next(data), mesh)
            state, m = compiled(state, aux, batch)
        jax.block_until_ready(m["loss"])
        return (time.perf_counter() - t) / n

    def prefetch_loop(n, depth=2):
        nonlocal state
        q: queue.Queue = queue.Queue(maxsize=depth)

        def producer():
            for _ in range(n):
                q.put(parallel.host_to_global(next(data), mesh))

        th = threading.Thread(target=producer, daemon=True)
        t = time.perf_counter()
        th.start()
        for _ in range(n):
            state, m = compiled(state, aux, q.get())
        jax.block_until_ready(m["loss"])
        th.join()
        return (time.perf_counter() - t) / n

    t_host = _repeat(lambda: next(data), 3)
    batch = next(data)
    t_put = _repeat(lambda: jax.block_until_ready(parallel.host_to_global(batch, mesh)), 3)
    sync = [sync_loop(args.steps) for _ in range(args.repeats)]
    pre = [prefetch_loop(args.steps) for _ in range(args.repeats)]
    return {
        "host_batch_s": statistics.median(t_host),
        "host_to_global_s": statistics.median(t_put),
        "step_s_sync_transfer": statistics.median(sync),
        "step_s_prefetch": statistics.median(pre),
    }


def _argv(argv):
    import sys

    return list(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
