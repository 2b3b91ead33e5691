"""Shared helpers of the benchmark scripts: config loading, the measured matmul peak, timing, JSON output.

Every benchmark prints ONE JSON object on stdout (progress goes to stderr). Timings are medians over repeats; the
machine's load average is recorded beside them because a shared machine slows both the benchmark and the peak it
is compared with.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def set_host_device_count(n: int | None) -> None:
    """Fakes `n` CPU devices. Must run before jax is imported (XLA reads the flag once, at backend start-up)."""
    if not n:
        return
    if "jax" in sys.modules:
        raise RuntimeError("set_host_device_count must be called before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={int(n)}"])


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_config(spec: str, overrides=()):
    """sfd_jax.config_loader.load_config, imported when called: importing sfd_jax imports jax, which must wait
    for set_host_device_count."""
    from sfd_jax.config_loader import load_config as load

    return load(spec, overrides)


GOLDEN_DIT = REPO / "tests" / "golden" / "official" / "dit.npz"


@functools.cache
def golden_dit_state_dicts() -> tuple[dict, dict]:
    """(model, AutoGuidance guide) state dicts of the golden tiny DiT (`sd/…` and `guide_sd/…` in GOLDEN_DIT), read
    once per process. Callers must not modify them."""
    import numpy as np

    if not GOLDEN_DIT.exists():
        raise FileNotFoundError(f"golden model {GOLDEN_DIT} is missing (it ships with the repository)")
    with np.load(GOLDEN_DIT) as d:
        part = lambda prefix: {k[len(prefix) :]: d[k] for k in d.files if k.startswith(prefix)}  # noqa: E731
        return part("sd/"), part("guide_sd/")


def random_dit(cfg, seed: int = 0, scale: float = 0.02):
    """A LightningDiT whose every parameter is perturbed by scale·N(0, 1).

    The zero-initialised adaLN and final layers would otherwise make most of the network (and its gradient) zero.
    Built in one jitted program: eager flax initialisation compiles one XLA program per operation and parameter
    shape, ~10 s for the tiny DiT on the 2-core CPU, more than the benchmark it feeds.
    """
    import jax
    from flax import nnx

    from sfd_jax.models.lightningdit import LightningDiT

    @nnx.jit
    def build():
        graphdef, params, rest = nnx.split(LightningDiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        return nnx.merge(graphdef, jax.tree.unflatten(tree, noisy), rest)

    return build()


def jit_without_donation(run):
    """The trainer's step (`sfd_jax.train.build.Run`) jitted with the same shardings but no buffer donation."""
    import jax

    from sfd_jax import parallel
    from sfd_jax.diffusion.losses import sfd_loss
    from sfd_jax.train.step import make_train_step

    config, setup = run.config, run.setup
    step_fn = make_train_step(
        setup.graphdef,
        setup.tx,
        sfd_loss,
        run.loss_cfg,
        ema_decay=float(config.optim.ema_decay),
        label_dropout=float(config.optim.label_dropout),
        null_class=run.model_cfg.num_classes,
        model_channels=run.derived["model_channels"],
    )
    return jax.jit(
        step_fn,
        in_shardings=(setup.state_shardings, setup.aux_shardings, parallel.batch_sharding(run.mesh)),
        out_shardings=(setup.state_shardings, parallel.replicated(run.mesh)),
    )


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn()` (which must block until its result is ready) for each of `repeats` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def matmul_peak(dtype: str = "float32", n: int | None = None, repeats: int = 7, chain: int = 4) -> dict:
    """Dense-matmul FLOP/s of this process's first device, measured now.

    A jitted chain of `chain` (n × n) @ (n × n) products (each feeding the next, so none can be skipped) amortises
    the dispatch. n defaults to 2048 on CPU (about the size of the DiT's largest per-step matmuls; larger ones get
    slower there as they leave the cache) and 8192 on accelerators. Returns median and best FLOP/s over `repeats`.
    """
    import jax

    if n is None:
        n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    chain_fn, a, b = _peak_kernel(dtype, n, chain)
    chain_fn(a, b).block_until_ready()
    cpu0 = time.process_time()
    times = timed(lambda: chain_fn(a, b).block_until_ready(), repeats, warmup=0)
    cpu = time.process_time() - cpu0
    flops = 2.0 * n**3 * chain
    return {
        "dtype": dtype,
        "n": n,
        "chain": chain,
        "flops_per_s_median": flops / statistics.median(times),
        "flops_per_s_best": flops / min(times),
        "flops_per_cpu_s": flops * repeats / cpu,
        "repeats": repeats,
    }


@functools.cache
def _peak_kernel(dtype: str, n: int, chain: int):
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    dt = jnp.dtype(dtype)
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt), dev)
    b = jax.device_put((jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n**0.5).astype(dt), dev)

    @jax.jit
    def chain_fn(a, b):
        for _ in range(chain):
            a = jnp.dot(a, b, preferred_element_type=dt)
        return a

    return chain_fn, a, b


def environment() -> dict:
    import jax

    dev = jax.devices()[0]
    env = {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return env


def emit(result: dict) -> None:
    """The benchmark's one JSON object, on stdout."""
    print(json.dumps(result, default=_jsonable))


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:
        pass
    return str(x)
