"""Forward vs forward + backward of the SFD loss (DiT + REPA), against the plain matmul peak; prints one JSON.

    python benchmarks/backward.py                       # depth 4, width 256, 4 heads, batch 8 (issue config)
    python benchmarks/backward.py --size=b --batch=8
    python benchmarks/backward.py --profile=/tmp/prof   # also: per-op table from the XLA:CPU profiler
    taskset -c 0 python benchmarks/backward.py --profile=/tmp/prof  # one core: the per-kind sums add up to the step

Rounds of (2048² fp32 matmul peak, forward, forward + backward), all in this process, so every ratio compares
figures taken under the same load of a shared machine. Reported per round and as medians:
- `bwd_over_fwd`: (time of value_and_grad − time of the loss alone) / time of the loss alone, CPU time;
- `fwd_frac_peak`, `fwdbwd_frac_peak`: analytic FLOPs (multiply-add = 2, backward = 2 × forward) per CPU-second
  over the matmul's FLOPs per CPU-second.
Only the loss + gradient are timed (no optimizer), which is what PyTorch's side in torch_compare.py times too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import re
import statistics
import time

from common import emit, environment, log, matmul_peak, random_dit


def build(size: str, batch: int, seed: int = 0):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sfd_jax.diffusion.losses import LossConfig, sfd_loss
    from sfd_jax.models.lightningdit import DiTConfig, forward_flops_per_image

    cfg = DiTConfig(depth=4, hidden_size=256, num_heads=4) if size == "d4w256" else DiTConfig.from_size(size)
    graphdef, params, rest = nnx.split(random_dit(cfg, seed), nnx.Param, ...)  # every path carries signal
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 2), 3)
    x1 = jax.random.normal(k1, (batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    y = jax.random.randint(k2, (batch,), 0, cfg.num_classes)
    dino = jax.random.normal(k3, (batch, cfg.num_tokens, cfg.repa_dim), jnp.float32)
    lcfg = LossConfig()

    def loss(params, x1, y, dino, key):
        m = nnx.merge(graphdef, params, rest)
        return sfd_loss(lambda *a: m(*a, train=True), x1, y, dino, key, lcfg)[0]

    flops_fwd = forward_flops_per_image(cfg, include_repa=True) * batch
    return cfg, loss, params, (x1, y, dino, jax.random.key(7)), flops_fwd


def clock(fn, n):
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        out = fn()
    import jax

    jax.block_until_ready(out)
    return (time.perf_counter() - w) / n, (time.process_time() - c) / n


PROFILE_CALLS = 3


def profile_table(fn, logdir: str, top: int = 10) -> dict:
    """Runs fn under jax.profiler and sums the XLA:CPU per-op events of the trace by HLO op name."""
    import jax

    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(PROFILE_CALLS):
            jax.block_until_ready(fn())
    path = sorted(pathlib.Path(logdir).rglob("perfetto_trace.json.gz"))[-1]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            per_op[e["name"]] = per_op.get(e["name"], 0.0) + float(e["dur"])
    return per_op


def categories(per_op: dict, hlo_text: str) -> dict:
    """ms per call of the thunks of one program by kind: YNNPACK dots (`ynn_fusion*`), Eigen dots (plain `dot`
    instructions, the weight gradients XLA:CPU does not give to YNNPACK), transposes/copies, and every other fusion.
    Only thunks named in the compiled HLO count (the trace also holds Python and runtime events). Pinned to one core
    (`taskset -c 0`) the thunks run one at a time, so the sums add up to the step; on more cores they overlap."""
    names = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo_text, re.M)}
    sums = {"ynnpack_dots": 0.0, "eigen_dots": 0.0, "transposes_copies": 0.0, "other_fusions": 0.0}
    counts = dict.fromkeys(sums, 0)
    for name, us in per_op.items():
        if name not in names:
            continue
        if name.startswith("ynn"):
            kind = "ynnpack_dots"
        elif " dot(" in names[name]:
            kind = "eigen_dots"
        elif "transpose" in name or "copy" in name:
            kind = "transposes_copies"
        else:
            kind = "other_fusions"
        sums[kind] += us / 1e3 / PROFILE_CALLS
        counts[kind] += 1
    return {k: {"ms": round(v, 1), "thunks": counts[k]} for k, v in sums.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="d4w256", help="d4w256 (depth 4, width 256, 4 heads) or a DiT size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=3, help="calls per timing")
    p.add_argument("--profile", default=None, help="trace directory: also print the per-op table")
    args = p.parse_args(argv)
    import jax

    cfg, loss, params, inputs, flops_fwd = build(args.size, args.batch)
    fwd = jax.jit(loss)
    fwdbwd = jax.jit(jax.value_and_grad(loss))
    f = lambda: fwd(params, *inputs)  # noqa: E731
    fb = lambda: fwdbwd(params, *inputs)  # noqa: E731
    jax.block_until_ready(f()), jax.block_until_ready(fb())
    matmul_peak("float32", repeats=1)
    env = environment()
    rounds = []
    for r in range(args.rounds):
        peak = matmul_peak("float32", repeats=3)
        tf, cf = clock(f, args.iters)
        tb, cb = clock(fb, args.iters)
        rounds.append(
            {
                "peak_flops_per_s": peak["flops_per_s_median"],
                "peak_flops_per_cpu_s": peak["flops_per_cpu_s"],
                "fwd_s": tf,
                "fwd_cpu_s": cf,
                "fwdbwd_s": tb,
                "fwdbwd_cpu_s": cb,
                "bwd_over_fwd": (cb - cf) / cf,
                "bwd_over_fwd_wall": (tb - tf) / tf,
                "fwd_frac_peak": flops_fwd / cf / peak["flops_per_cpu_s"],
                "fwdbwd_frac_peak": 3 * flops_fwd / cb / peak["flops_per_cpu_s"],
                "fwdbwd_frac_peak_wall": 3 * flops_fwd / tb / peak["flops_per_s_median"],
            }
        )
        shown = {k: round(v, 4) for k, v in rounds[-1].items() if "peak" not in k or "frac" in k}
        log(f"[backward] round {r}: {json.dumps(shown)}")
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result = {
        "benchmark": "backward",
        "size": args.size,
        "batch": args.batch,
        "depth": cfg.depth,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "flops_fwd": flops_fwd,
        "median": med,
        "rounds": rounds,
        "env": env,
    }
    if args.profile:
        out, cats = {}, {}
        for name, jitted in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            # The profiled executable is the one whose HLO names the thunks.
            compiled = jitted.lower(params, *inputs).compile()
            out[name] = profile_table(lambda: compiled(params, *inputs), f"{args.profile}/{name}")
            cats[name] = categories(out[name], compiled.as_text())
        result["profile"] = {k: sorted(v.items(), key=lambda kv: -kv[1])[:40] for k, v in out.items()}
        result["profile"]["categories_ms_per_call"] = cats
    result["env"]["load_avg_1m_end"] = environment().get("load_avg_1m")
    emit(result)
    return result


if __name__ == "__main__":
    main()
