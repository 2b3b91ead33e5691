"""Device mesh, logical-axis rules, sharded initialisation and host-local <-> global arrays.

The mesh always has the three axes ('data', 'fsdp', 'tensor'). Its shape comes from two triples in the config:
`mesh.ici` (devices inside one slice / node, fast interconnect) and `mesh.dcn` (slices / nodes, slow network); in
each, one entry may be -1 meaning "whatever is left". The full mesh is their element-wise product.

Weights carry *logical* axis names (Param metadata `out_sharding`, e.g. ('embed', 'mlp')). `mesh.rules` maps each
logical name to mesh axes with a plain table, e.g. {'embed': 'fsdp', 'mlp': 'tensor', 'vocab': ''}; '' means
replicated and 'data+fsdp' names two axes. A mesh axis that does not divide a dimension is dropped for that
dimension (the weight is replicated along it) instead of failing, so odd sizes such as the 1001-row label table
still work on any mesh.

The batch axis of every activation is sharded over ('data', 'fsdp') -- the data-parallel size is their product.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.nnx import traversals
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Environment variables that mean "this process is one of several": the launch scripts set SFD_DISTRIBUTED=1 on
# multi-host TPU VMs (whose metadata server jax queries itself); the others come from SLURM / Open MPI / explicit
# coordinator settings that jax.distributed.initialize() reads on its own.
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Multi-process start-up
# ----------------------------------------------------------------------------------------------------------------
def multiprocess_env_present(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("SFD_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return True
    if any(env.get(k) for k in _MULTIPROCESS_ENV):
        return True
    for count_var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(count_var, "1")) > 1:
                return True
        except ValueError:
            pass
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize()` once when several processes take part.

    mode: 'auto' (when the environment shows several processes, see `multiprocess_env_present`), 'on', 'off'.
    Must run before anything touches a jax backend. Returns whether the distributed runtime is up.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed={mode!r}: expected one of 'auto', 'on', 'off'")
    if mode == "off" or (mode == "auto" and not multiprocess_env_present()):
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize()
    log.info(
        "jax.distributed initialised: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# ----------------------------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------------------------
def _ints(shape: Sequence[int], field: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={shape!r}: expected {len(AXES)} integers for axes {AXES}, e.g. (1, -1, 1)") from None


def fill_shape(shape: Sequence[int], total: int, field: str) -> tuple[int, ...]:
    """`shape` (one entry per mesh axis, at most one -1) with the -1 resolved so the product is `total`; errors
    name `field`."""
    shape = _ints(shape, field)
    if len(shape) != len(AXES):
        raise ValueError(f"{field}={shape}: expected {len(AXES)} entries for axes {AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"{field}={shape}: at most one entry may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{field}={shape}: entries must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if total % known:
            raise ValueError(f"{field}={shape}: the other entries (product {known}) do not divide {total}")
        shape = tuple(total // known if s == -1 else s for s in shape)
    if math.prod(shape) != total:
        raise ValueError(
            f"{field}={shape}: mesh size {math.prod(shape)} != {total} available (set one entry to -1 to take the rest)"
        )
    return shape


def _granules(devices) -> tuple[int, bool]:
    """Number of DCN units (TPU slices, else processes) and whether they are processes."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        return len(slices), False
    return len({d.process_index for d in devices}), True


def dcn_units(devices) -> int:
    """How many DCN units `devices` form: TPU slices, else processes."""
    return _granules(list(devices))[0]


def mesh_shapes(ici: Sequence[int], dcn: Sequence[int], *, device_count: int, units: int):
    """(ici_shape, dcn_shape) for `device_count` devices forming `units` DCN units, the -1 entries filled in; errors
    name the field. Counts rather than devices, so a config can be checked for hardware this process does not see."""
    dcn = _ints(dcn, "mesh.dcn")
    dcn_shape = fill_shape(dcn, units if -1 in dcn else math.prod(dcn), "mesh.dcn")
    parts = math.prod(dcn_shape)
    if parts not in (1, units):
        raise ValueError(
            f"mesh.dcn={dcn}: {parts} DCN units requested, but the devices form {units} (TPU slices, else processes)"
        )
    if device_count % parts:
        raise ValueError(f"mesh.dcn={dcn}: {device_count} devices cannot be split into {parts} equal parts")
    return fill_shape(ici, device_count // parts, "mesh.ici"), dcn_shape


def resolve_mesh_shape(ici: Sequence[int], dcn: Sequence[int] = (1, 1, 1), devices=None):
    """(ici_shape, dcn_shape) with the -1 entries filled in and the totals checked against the devices."""
    devices = jax.devices() if devices is None else list(devices)
    return mesh_shapes(ici, dcn, device_count=len(devices), units=dcn_units(devices))


def make_mesh(ici: Sequence[int] = (1, -1, 1), dcn: Sequence[int] = (1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (GSPMD propagation decides what is not pinned)."""
    devices = jax.devices() if devices is None else list(devices)
    ici_shape, dcn_shape = resolve_mesh_shape(ici, dcn, devices)
    axis_types = (AxisType.Auto,) * len(AXES)
    if math.prod(dcn_shape) == 1:
        return jax.make_mesh(ici_shape, AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    _, by_process = _granules(devices)
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=by_process)
    return jax.sharding.Mesh(grid, AXES, axis_types=axis_types)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------------------------------------------
# Logical axis rules
# ----------------------------------------------------------------------------------------------------------------
def parse_rules(table: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """{'embed': 'fsdp', 'vocab': '', 'batch': 'data+fsdp'} -> {'embed': ('fsdp',), 'vocab': (), ...}."""
    rules = {}
    for name, value in dict(table).items():
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(
                f"mesh.rules.{name}={value!r}: expected a string of mesh axes joined by '+', "
                f"e.g. 'fsdp' or 'data+fsdp' ('' = replicated)"
            )
        axes = tuple(a for a in value.replace(" ", "").split("+") if a)
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ValueError(f"mesh.rules.{name}={value!r}: unknown mesh axis {bad[0]!r}; mesh axes are {AXES}")
        rules[name] = axes
    return rules


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    rules: Mapping[str, tuple[str, ...]],
    mesh: jax.sharding.Mesh,
    *,
    what: str = "array",
) -> P:
    """PartitionSpec for an array of `shape` whose dims carry logical `names`.

    A mesh axis is used at most once per array (first dim wins), axes of size 1 are left out, and an axis
    combination that does not divide the dimension is shortened from the right until it does.
    """
    if not names:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical names {tuple(names)} for a {len(shape)}-d shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(
                f"{what}: logical axis {name!r} has no entry in mesh.rules "
                f"(rules cover {sorted(rules)}); add mesh.rules.{name}"
            )
        axes = [a for a in rules[name] if a not in used and mesh.shape[a] > 1]
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Mapping[str, tuple[str, ...]]) -> dict:
    """Pure-dict tree of NamedSharding for an (abstract) nnx State, from each Variable's `out_sharding` names."""
    flat = {}
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        what = "/".join(str(p) for p in path)
        flat[path] = NamedSharding(mesh, logical_to_spec(names, var.get_value().shape, rules, mesh, what=what))
    return traversals.unflatten_mapping(flat)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shardings_like(tree: Any, params: Any, params_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a tree (an optax state) that embeds copies of the params tree: every subtree shaped exactly
    like `params` gets the params' shardings, every other leaf is replicated (step counters, scalars)."""
    target = jax.tree.structure(params)
    rep = replicated(mesh)

    def is_params_like(x):
        return jax.tree.structure(x) == target

    def assign(x):
        if is_params_like(x):
            return params_shardings
        return jax.tree.map(lambda _: rep, x)

    return jax.tree.map(assign, tree, is_leaf=is_params_like)


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------
def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def host_to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Turns this process's rows of the global batch into global arrays sharded over ('data', 'fsdp').

    Every process passes the same number of rows, in process order; no process ever holds the global batch.
    """
    sharding = batch_sharding(mesh)
    out = {}
    n_proc = jax.process_count()
    for key, local in batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * n_proc,) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def put_global(tree: Any, shardings: Any) -> Any:
    """Host values that every process holds identically (weights, statistics, a PRNG key) → global arrays laid out by
    `shardings` (one sharding, or a matching tree). `jax.device_put` when the target devices are all this process's;
    with several processes each process fills only its own shards (device_put refuses other processes' devices)."""

    def one(x, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def global_to_host(tree: Any) -> Any:
    """Fully replicated (or fully addressable) arrays -> numpy on this host; used for scalars and small trees."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
