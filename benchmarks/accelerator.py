"""One-shot accelerator benchmark (≤ 8 minutes on one GPU or one TPU host); prints ONE JSON object.

    bash benchmarks/accelerator.sh             # XL, bf16, on the lent device
    bash benchmarks/accelerator.sh --dry-run   # tiny model on CPU, every code path, < 1 min (CI: test_benchmarks)

Sections of the JSON:
- `train`: the real train step (benchmarks/train_step.py) at XL in bf16 at two per-device batch sizes: MFU against
  the bf16 matmul peak measured in the same run (`peak_flops_per_s_per_device`), img/s, compile time;
- `memory`: the device's `memory_stats()` peak after the train steps (null on CPU, which keeps no stats);
- `attention`: which `jax.nn.dot_product_attention` implementation the run used: 'cudnn' where it compiles and
  runs on this device (NVIDIA GPUs), else 'xla'; the train step runs with it;
- `sampler`: images/s of Dopri5 at the paper's tolerance (rtol 1e-3, atol 1e-6) and of Euler with 250 steps, XL,
  random weights (cost only; the dry run samples the golden tiny DiT);
- `bf16_vs_fp32`: the golden model (tests/golden/official/dit.npz) evaluated in bf16 and in fp32 on the same
  inputs: max |bf16 − fp32| / max |fp32| of the velocity.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

from common import emit, environment, golden_dit_state_dicts, log


def attention_impl(platform: str) -> tuple[str, str | None]:
    """('cudnn', None) when the cuDNN fused attention runs here, else ('xla', why)."""
    if platform != "gpu":
        return "xla", f"platform {platform}: cuDNN attention is GPU-only"
    import jax
    import jax.numpy as jnp

    try:
        q = jnp.ones((2, 256, 16, 72), jnp.bfloat16)
        jax.block_until_ready(jax.jit(lambda a: jax.nn.dot_product_attention(a, a, a, implementation="cudnn"))(q))
        return "cudnn", None
    except Exception as e:  # noqa: BLE001 — any failure means the run falls back to XLA's attention
        return "xla", f"cudnn attention failed: {type(e).__name__}: {str(e)[:200]}"


def train_section(size, batches, steps, repeats, impl, dry_run) -> list[dict]:
    import train_step

    rows = []
    for b in batches:
        argv = [
            f"--size={size}",
            f"--batch={b}",
            "--dtype=bfloat16",
            f"--steps={steps}",
            f"--repeats={repeats}",
            "--config=configs/sfd.py:tiny" if dry_run else "--config=configs/sfd.py:xl",
        ]
        if impl == "cudnn":
            argv += ["--set", "model.attention_impl=cudnn"]
        with contextlib.redirect_stdout(io.StringIO()):  # train_step prints its own JSON; keep ours the only one
            r = train_step.main(argv)
        rows.append(
            {
                k: r[k]
                for k in (
                    "size",
                    "global_batch",
                    "img_per_s",
                    "step_s",
                    "mfu",
                    "peak_flops_per_s_per_device",
                    "model_flops_per_s",
                    "compile_s",
                    "memory_per_device_bytes",
                    "mesh",
                )
            }
        )
        log(f"[accelerator] train batch {b}: mfu {r['mfu']:.3f}, {r['img_per_s']:.2f} img/s")
    return rows


def memory_section() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return {"peak_bytes_in_use": None, "note": f"{jax.devices()[0].platform} keeps no memory_stats"}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def sampler_section(size, batch, euler_steps, dry_run) -> list[dict]:
    import jax
    import numpy as np

    from sampler import _random_model
    from sfd_jax.convert.dit import load_dit
    from sfd_jax.diffusion.sampler import sample

    if dry_run:  # the golden tiny DiT: loading it compiles nothing, a random initialisation compiles for seconds
        cfg, model = load_dit(golden_dit_state_dicts()[0], dtype="bfloat16")
    else:
        model, cfg = _random_model(size, "bfloat16", 0)
    z0 = np.asarray(
        jax.random.normal(jax.random.key(0), (batch, cfg.input_size, cfg.input_size, cfg.in_channels)), np.float32
    )
    y = (np.arange(batch) * 37 % cfg.num_classes).astype(np.int32)
    rows = []
    for name, kw in (
        ("dopri5 rtol 1e-3 atol 1e-6", dict(solver="dopri5", rtol=1e-3, atol=1e-6)),
        (f"euler {euler_steps} steps", dict(solver="euler", num_steps=euler_steps)),
    ):
        t = time.perf_counter()
        jax.block_until_ready(sample(model, z0, y, **kw)[0])  # compile + first run
        first = time.perf_counter() - t
        t = time.perf_counter()
        x, stats = sample(model, z0, y, **kw)
        jax.block_until_ready(x)
        wall = time.perf_counter() - t
        if not np.all(np.isfinite(np.asarray(x, np.float32))):
            raise FloatingPointError(f"sampler {name}: non-finite samples")
        rows.append(
            {
                "name": name,
                "size": size,
                "batch": batch,
                "nfe": int(stats["nfe"]),
                "wall_s": wall,
                "first_call_s": first,
                "img_per_s": batch / wall,
            }
        )
        log(f"[accelerator] sampler {name}: {batch / wall:.2f} img/s, nfe {int(stats['nfe'])}")
    return rows


def bf16_section(batch: int = 4) -> dict:
    import jax
    import numpy as np

    from sfd_jax.convert.dit import load_dit

    sd = golden_dit_state_dicts()[0]
    outs = {}
    for dtype in ("float32", "bfloat16"):
        cfg, model = load_dit(sd, dtype=dtype)
        r = np.random.default_rng(0)
        x = r.standard_normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
        t = r.uniform(size=batch).astype(np.float32)
        y = (np.arange(batch) * 37 % cfg.num_classes).astype(np.int32)
        outs[dtype] = np.asarray(
            jax.jit(lambda a, b, c, e: model(a, b, c, e))(x, t, np.clip(t + 0.3, 0, 1), y), np.float64
        )
    diff = np.abs(outs["bfloat16"] - outs["float32"])
    scale = np.abs(outs["float32"]).max()
    return {
        "model": "tests/golden/official/dit.npz",
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / scale),
        "rms_rel_diff": float(np.sqrt((diff**2).mean()) / np.sqrt((outs["float32"] ** 2).mean())),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny model, small batches, on whatever device (CPU)")
    args = p.parse_args(argv)
    import jax

    t0 = time.perf_counter()
    platform = jax.devices()[0].platform
    if args.dry_run:
        size, batches, steps, repeats, s_batch, euler = "tiny", (2,), 1, 1, 2, 16
    else:
        if platform == "cpu":
            raise SystemExit("accelerator.sh: no accelerator found (jax sees only CPU); use --dry-run on a CPU")
        size, batches, steps, repeats, s_batch, euler = "xl", (16, 32), 5, 2, 16, 250
    impl, why = attention_impl(platform)
    result = {
        "benchmark": "accelerator",
        "dry_run": args.dry_run,
        "env": environment(),
        "attention": {"implementation": impl, "note": why},
    }
    result["train"] = train_section(size, batches, steps, repeats, impl, args.dry_run)
    result["memory"] = memory_section()
    result["sampler"] = sampler_section(size, s_batch, euler, args.dry_run)
    result["bf16_vs_fp32"] = bf16_section()
    result["total_s"] = time.perf_counter() - t0
    emit(result)
    return result


if __name__ == "__main__":
    main()
