"""Attention core, forward + backward: `jax.nn.dot_product_attention` (what the DiT uses) against the same math
written out with einsums and a float32 softmax; prints one JSON object.

    python benchmarks/attention.py                       # DiT-B shapes, batch 8, float32 (CPU)
    python benchmarks/attention.py --heads=16 --head-dim=72 --batch=32 --dtype=bfloat16   # XL shapes

Both take q, k, v of shape (B, T, heads, head_dim) and return (B, T, heads, head_dim). `implementation` is
passed to `jax.nn.dot_product_attention` ('' = let XLA choose; 'cudnn' = flash attention on NVIDIA GPUs).
Times are medians of process CPU seconds and wall seconds over --repeats calls; the two outputs and their
gradients are compared so that a faster path cannot be a wrong one.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import emit, environment


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--implementation", default="")
    p.add_argument("--repeats", type=int, default=7)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    dt = jnp.dtype(args.dtype)
    shape = (args.batch, args.tokens, args.heads, args.head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dt) for key in jax.random.split(jax.random.key(0), 3))

    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation=args.implementation or None)

    def explicit(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(args.head_dim)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    def train(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    out = {}
    results = {}
    for name, fn in (("dot_product_attention", fused), ("einsum_softmax", explicit)):
        step = train(fn)
        results[name] = jax.block_until_ready(step(q, k, v))
        wall, cpu = [], []
        for _ in range(args.repeats):
            w, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(step(q, k, v))
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        mem = step.lower(q, k, v).compile().memory_analysis()
        out[name] = {
            "wall_s": statistics.median(wall),
            "cpu_s": statistics.median(cpu),
            "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        }
    flat = [np.asarray(x, np.float32) for x in jax.tree.leaves(results["dot_product_attention"])]
    ref = [np.asarray(x, np.float32) for x in jax.tree.leaves(results["einsum_softmax"])]
    out["max_rel_diff"] = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30)) for a, b in zip(flat, ref))
    flops = 3 * 4 * args.batch * args.heads * args.tokens**2 * args.head_dim  # fwd+bwd of q·kᵀ and p·v
    for name in ("dot_product_attention", "einsum_softmax"):
        out[name]["gflops_per_cpu_s"] = flops / out[name]["cpu_s"] / 1e9
    out["speedup_cpu_time"] = out["einsum_softmax"]["cpu_s"] / out["dot_product_attention"]["cpu_s"]
    result = {
        "benchmark": "attention",
        "shape": shape,
        "dtype": args.dtype,
        "implementation": args.implementation or "xla default",
        **out,
        "env": environment(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
