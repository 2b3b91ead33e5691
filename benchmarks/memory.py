"""Per-device memory and FLOPs of the real train step for a target mesh, compiled without the hardware; one JSON object.

    python benchmarks/memory.py --config=configs/sfd.py:xl --devices=16                 # XLA:CPU, fake devices
    python benchmarks/memory.py --config=configs/sfd.py:xl --devices=16 --tpu=v5e       # the TPU compiler (libtpu)
    python benchmarks/memory.py --config=configs/sfd.py:xxl --devices=32 --set model.remat=True
    python benchmarks/memory.py --table [--tpu=v4]                                      # XL, XXL x 8/16/32 x remat

Check a config before renting hardware. The step is `sfd_jax.train.build.build(config).train_step` (the trainer's
function, shardings, FSDP rules and buffer donation), lowered with abstract inputs (`jax.ShapeDtypeStruct` with
shardings: no weight is ever allocated) for a mesh of --devices devices, and compiled. Figures come from
`compiled.memory_analysis()` (arguments, outputs, donated aliases, temporaries, per device) and
`compiled.cost_analysis()` (FLOPs of one device's partition).

Two compilers:
- default: XLA:CPU on --devices fake CPU devices. Its memory-optimised scheduler is switched on
  (`--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`; the default one runs as much as possible at once
  and reports ~1.4x more), but it still upcasts bf16 and schedules rematerialised blocks early, so for bf16 runs
  its temporaries overstate what an accelerator needs. A conservative figure.
- `--tpu=v4|v5e|v5p|v6e`: the real TPU compiler, compile-only, on this CPU machine: libtpu builds a TPU topology
  of --devices chips (`jax.experimental.topologies`) and compiles for it, as MaxText's train_compile does. Needs
  the libtpu wheel matching jax (`pip install libtpu==0.0.42.*`, or `jax[tpu]`); a private copy works too:
  `pip install --no-deps --target DIR libtpu==0.0.42.*` and `--libtpu=DIR/libtpu/libtpu.so`. No TPU is touched.
There is no compile-only path for GPUs here; read their rows from the CPU figure (see docs/performance.md).

Depth: `--depth-mode=extrapolate` compiles at two reduced depths (--depths, default 4 and 6 blocks: both past the
REPA block) and extrapolates every figure linearly to the real depth -- each block adds the same parameters,
optimizer state, saved activations and FLOPs. `full` (default) compiles the real depth; on this 2-core machine
XL takes ~30 s with XLA:CPU and ~2.5 min with the TPU compiler, and extrapolating was within 1% of it but not
faster. docs/performance.md lists the comparison.

`fits` keeps --headroom (default 10%) of each chip's memory free for the runtime, fragmentation and the
difference between this compile and the one on the machine.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

from common import emit, jit_without_donation, load_config, log, set_host_device_count

GiB = 2**30
# Memory per chip (GiB): TPU v4 32, v5e 16, v5p 95, v6e 32; NVIDIA H100 SXM 80, H200 141.
CHIPS = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "H100": 80, "H200": 141}
TPUS = {  # topology prefix, dimensions, chip config (megacore chips are one device)
    "v4": ("v4", 3, "megacore"),
    "v5p": ("v5p", 3, "megacore"),
    "v5e": ("v5e", 2, "default"),
    "v6e": ("v6e", 2, "default"),
}
CPU_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sfd.py:xl", help="config file:variant (default %(default)s)")
    p.add_argument("--devices", type=int, default=16, help="mesh size: fake CPU devices or TPU chips")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override, e.g. model.remat=True, mesh.ici='(2,-1,1)' (repeatable)",
    )
    p.add_argument("--tpu", choices=sorted(TPUS), default=None, help="compile for this TPU (needs libtpu)")
    p.add_argument(
        "--libtpu", default=None, help="path of libtpu.so (default: $TPU_LIBRARY_PATH or the libtpu package)"
    )
    p.add_argument("--depth-mode", choices=("full", "extrapolate"), default="full")
    p.add_argument("--depths", default="4,6", help="the two reduced depths for --depth-mode=extrapolate")
    p.add_argument("--no-donate", action="store_true", help="jit the step without donating the state")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of chip memory kept free in `fits`")
    p.add_argument(
        "--table",
        action="store_true",
        help="XL and XXL at global batch 256 on 8/16/32 devices, without remat and with the "
        "'dots_no_batch' and 'full' remat policies; one JSON object",
    )
    p.add_argument("--table-devices", default="8,16,32")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------------
def tpu_topology_name(kind: str, n: int) -> str:
    """'v5e:4x4' for 16 v5e chips: a power-of-two chip count split as evenly as possible over the torus dims."""
    prefix, dims, _ = TPUS[kind]
    if n < 1 or n & (n - 1):
        raise ValueError(f"--devices={n}: TPU slices here are a power of two chips (4, 8, 16, 32, ...)")
    shape = [1] * dims
    k = 0
    while math.prod(shape) < n:
        shape[k % dims] *= 2
        k += 1
    shape = sorted(s for s in shape if s > 1) + [1] * shape.count(1)  # v4 names: 2x2x1, 2x2x2, 2x2x4, 2x4x4
    return f"{prefix}:" + "x".join(str(s) for s in shape)


def prepare_tpu(libtpu: str | None) -> None:
    """Environment for compile-only TPU devices; before jax is imported."""
    path = libtpu or os.environ.get("TPU_LIBRARY_PATH")
    if path is None:
        try:
            import libtpu as _libtpu  # noqa: F401

            path = os.path.join(os.path.dirname(_libtpu.__file__), "libtpu.so")
        except ImportError:
            sys.exit(
                "--tpu needs libtpu: pip install libtpu==0.0.42.* (the version jax[tpu] pins), or "
                "pip install --no-deps --target DIR libtpu==0.0.42.* and pass --libtpu=DIR/libtpu/libtpu.so"
            )
    if not os.path.exists(path):
        sys.exit(f"--libtpu={path}: no such file")
    os.environ["TPU_LIBRARY_PATH"] = path
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: not on a TPU VM
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")  # silences libtpu's start-up probe; topology is explicit
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ["JAX_PLATFORMS"] = "cpu"  # the process runs on the CPU; TPU devices are compile-only


def tpu_devices(kind: str, n: int):
    from jax.experimental import topologies

    _, dims, chip_config = TPUS[kind]
    topo = topologies.get_topology_desc(
        tpu_topology_name(kind, n),
        "tpu",
        chip_config_name=chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
        wrap=(False,) * 3,
    )
    return list(topo.devices)


# ----------------------------------------------------------------------------------------------------------------
# Compile and measure
# ----------------------------------------------------------------------------------------------------------------
def compile_step(config, devices, depth: int | None = None, donate: bool = True) -> dict:
    """Compiles the train step of `config` on `devices` (at `depth` blocks if given); returns its figures."""
    import jax

    from sfd_jax import parallel
    from sfd_jax.models import lightningdit
    from sfd_jax.train.build import build

    if depth is not None:
        # A size entry that differs from the config's only in depth (validation reads the SIZES table).
        base = str(config.model.size).lower()
        base = lightningdit._ALIASES.get(base, base)
        name = f"{base}_depth{depth}"
        lightningdit.SIZES[name] = dict(lightningdit.SIZES[base], depth=int(depth))
        config = config.copy_and_resolve_references()
        config.model.size = name
    run = build(config, devices=devices, process_count=1)
    setup = run.setup
    b = int(config.train.batch_size)
    sharding = parallel.batch_sharding(run.mesh)
    dino_dtype = "bfloat16" if str(config.data.get("dino_dtype", "float32")) == "bfloat16" else "float32"
    batch = {
        "x1": jax.ShapeDtypeStruct((b, 16, 16, 48), "float32", sharding=sharding),
        "y": jax.ShapeDtypeStruct((b,), "int32", sharding=sharding),
        "dino": jax.ShapeDtypeStruct(
            (b, run.model_cfg.num_tokens, run.model_cfg.repa_dim), dino_dtype, sharding=sharding
        ),
    }
    t0 = time.perf_counter()
    step = run.train_step if donate else jit_without_donation(run)
    lowered = step.lower(setup.abstract_state, setup.abstract_aux, batch)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program that cannot fit the chip's HBM; report what it asked for.
        found = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if not found:
            raise
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state))
        return {
            "depth": run.model_cfg.depth,
            "oom": {"temp_required_gib": float(found.group(1)), "hbm_gib": float(found.group(2))},
            "state_bytes_global": int(state_bytes),
            "params": run.derived["num_params"],
            "mesh": dict(run.mesh.shape),
            "compile_s": round(time.perf_counter() - t1, 2),
        }
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    fig = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    fig["total"] = fig["argument"] + fig["output"] + fig["temp"] - fig["alias"]
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state))
    return {
        "depth": run.model_cfg.depth,
        "bytes": fig,
        "flops_per_device": float(cost.get("flops", 0.0)),
        "state_bytes_global": int(state_bytes),
        "params": run.derived["num_params"],
        "mesh": dict(run.mesh.shape),
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "flops_per_image": run.flops_per_image,
    }


def _extrapolate(lo: dict, hi: dict, depth: int) -> dict:
    """Linear in depth through the two compiled points."""
    d0, d1 = lo["depth"], hi["depth"]
    lin = lambda a, b: a + (b - a) * (depth - d0) / (d1 - d0)  # noqa: E731
    return {
        "depth": depth,
        "bytes": {k: int(round(lin(lo["bytes"][k], hi["bytes"][k]))) for k in lo["bytes"]},
        "flops_per_device": lin(lo["flops_per_device"], hi["flops_per_device"]),
        "state_bytes_global": int(round(lin(lo["state_bytes_global"], hi["state_bytes_global"]))),
        "params": int(round(lin(lo["params"], hi["params"]))),
        "mesh": hi["mesh"],
        "compile_s": round(lo["compile_s"] + hi["compile_s"], 2),
        "lower_s": lo["lower_s"] + hi["lower_s"],
        "extrapolated_from_depths": [d0, d1],
    }


def measure(config, devices, depth_mode: str, depths=(4, 6), headroom: float = 0.10, donate: bool = True) -> dict:
    from sfd_jax.models.lightningdit import train_flops_per_image
    from sfd_jax.train.build import model_config

    full_cfg = model_config(config)
    depth = full_cfg.depth
    if depth_mode == "full" or depth <= max(depths):
        fig = compile_step(config, devices, donate=donate)
        fig["extrapolated_from_depths"] = None
    else:
        lo, hi = (compile_step(config, devices, d, donate) for d in depths)
        fig = hi if "oom" in hi else lo if "oom" in lo else _extrapolate(lo, hi, depth)
    n = len(devices)
    b = int(config.train.batch_size)
    analytic = train_flops_per_image(full_cfg) * b
    kind = devices[0].device_kind
    if "oom" in fig:
        return {
            "size": str(config.model.size),
            "dtype": str(config.model.dtype),
            "remat": bool(config.model.remat),
            "remat_policy": str(config.model.get("remat_policy", "full")) if config.model.remat else None,
            "compiler": "tpu",
            "device_kind": kind,
            "global_batch": b,
            "devices": n,
            "mesh": fig["mesh"],
            "depth": fig["depth"],
            "params": fig["params"],
            "per_device_gib": None,
            "does_not_fit": (
                f"the TPU compiler needs {fig['oom']['temp_required_gib']} GiB of temporaries "
                f"(> {fig['oom']['hbm_gib']} GiB HBM of {kind})"
            ),
            "temp_required_gib": fig["oom"]["temp_required_gib"],
            "state_gib_per_device_if_fully_sharded": round(fig["state_bytes_global"] / n / GiB, 3),
            "compile_s": fig["compile_s"],
            "fits": {},
        }
    total = fig["bytes"]["total"]
    return {
        "size": str(config.model.size),
        "dtype": str(config.model.dtype),
        "remat": bool(config.model.remat),
        "remat_policy": str(config.model.get("remat_policy", "full")) if config.model.remat else None,
        "compiler": "tpu" if devices[0].platform == "tpu" else "cpu",
        "device_kind": kind,
        "global_batch": b,
        "devices": n,
        "per_device_batch": b / (fig["mesh"]["data"] * fig["mesh"]["fsdp"]),
        "mesh": fig["mesh"],
        "depth": fig["depth"],
        "params": fig["params"],
        "per_device_gib": round(total / GiB, 3),
        "per_device_bytes": fig["bytes"],
        "state_gib_per_device_if_fully_sharded": round(fig["state_bytes_global"] / n / GiB, 3),
        "xla_flops_per_step": fig["flops_per_device"] * n,
        "analytic_flops_per_step": analytic,
        "xla_over_analytic": fig["flops_per_device"] * n / analytic if analytic else None,
        "extrapolated_from_depths": fig["extrapolated_from_depths"],
        "compile_s": fig["compile_s"],
        "fits": {chip: total <= (1 - headroom) * gib * GiB for chip, gib in CHIPS.items()},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    depths = tuple(int(d) for d in args.depths.split(","))
    if len(depths) != 2 or depths[0] == depths[1]:
        sys.exit(f"--depths={args.depths}: expected two different depths, e.g. 4,6")
    depth_mode = args.depth_mode
    table_devices = [int(n) for n in args.table_devices.split(",")]
    if args.tpu:
        prepare_tpu(args.libtpu)
    else:
        set_host_device_count(max(table_devices) if args.table else args.devices)
        if "xla_cpu_scheduler_type" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_SCHEDULER_FLAG).strip()
    import jax

    from common import environment

    env = environment()
    env["xla_flags"] = os.environ.get("XLA_FLAGS", "")

    def devices_for(n):
        if args.tpu:
            return tpu_devices(args.tpu, n)
        if n > jax.device_count():
            sys.exit(f"--devices={n}: only {jax.device_count()} fake CPU devices")
        return jax.devices()[:n]

    overrides = list(args.set) + ([f"train.batch_size={args.batch}"] if args.batch is not None else [])
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.table:
        config = load_config(args.config, overrides)
        result = measure(config, devices_for(args.devices), depth_mode, depths, args.headroom, not args.no_donate)
        result.update(
            donate=not args.no_donate,
            benchmark="memory",
            config=args.config,
            command=command,
            depth_mode=depth_mode,
            chips_gib=CHIPS,
            headroom=args.headroom,
            env=env,
        )
        emit(result)
        return result

    rows = []
    variants = (
        ["model.remat=False"],
        ["model.remat=True", "model.remat_policy=dots_no_batch"],
        ["model.remat=True", "model.remat_policy=full"],
    )
    for spec in ("configs/sfd.py:xl", "configs/sfd.py:xxl"):
        for variant in variants:
            for n in table_devices:
                config = load_config(spec, ["train.batch_size=256"] + variant + overrides)
                t = time.perf_counter()
                row = measure(config, devices_for(n), depth_mode, depths, args.headroom)
                log(
                    f"[memory] {spec} {' '.join(variant)} devices={n}: {row['per_device_gib']} GiB/device "
                    f"({time.perf_counter() - t:.0f}s)"
                )
                rows.append(row)
    result = {
        "benchmark": "memory_table",
        "command": command,
        "compiler": "tpu" if args.tpu else "cpu",
        "tpu": args.tpu,
        "chips_gib": CHIPS,
        "headroom": args.headroom,
        "depth_mode": depth_mode,
        "rows": rows,
        "env": env,
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
