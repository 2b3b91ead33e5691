"""Validation and derived values of a DiT training config (configs/sfd.py), done once at start-up.

`validate(config, device_count=..., process_count=...)` raises `ConfigError` naming the field and the allowed
values, or returns the derived values (mesh shape, per-process batch, model channels, ...) that are saved as JSON
beside the checkpoints. It needs no devices, so configs can be checked on a laptop for a pod
(`device_count=256, process_count=64`).
"""

from __future__ import annotations

import math

from sfd_jax import parallel
from sfd_jax.diffusion.losses import REPA_MODES
from sfd_jax.diffusion.schedule import TIME_DISTS
from sfd_jax.models.lightningdit import DTYPES, REMAT_POLICIES, SIZES
from sfd_jax.train import skeleton
from sfd_jax.errors import InputError

SOURCES = ("synthetic", "arrayrecord")
TEXTURE_CHANS = 32
MAX_SEMANTIC_CHANS = 16


class ConfigError(InputError):
    """A config field holds a value the trainer cannot use; the message names the field."""


def require(cond: bool, field: str, message: str) -> None:
    """Raises ConfigError('config.<field>: <message>') unless `cond`; every trainer's validation uses it."""
    if not cond:
        raise ConfigError(f"config.{field}: {message}")


def require_finite_optim(o) -> None:
    """An infinite or NaN learning rate or weight decay turns every weight into NaN at the first step."""
    require(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"{o.lr} must be a finite number > 0")
    require(
        math.isfinite(o.weight_decay) and o.weight_decay >= 0,
        "optim.weight_decay",
        f"{o.weight_decay} must be a finite number >= 0",
    )


def _validate_model(m) -> None:
    sizes = tuple(SIZES)
    require(str(m.size).lower() in sizes, "model.size", f"{m.size!r} is not a model size; valid sizes: {sizes}")
    require(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r}; valid: {DTYPES}")
    policy = m.get("remat_policy", "full")
    require(policy in REMAT_POLICIES, "model.remat_policy", f"{policy!r}; valid: {tuple(REMAT_POLICIES)}")


def _validate_diffusion(d, r) -> None:
    """The diffusion and REPA blocks."""
    require(0.0 <= float(d.delta_t) < 1.0, "diffusion.delta_t", f"{d.delta_t} must lie in [0, 1)")
    require(
        0 <= int(d.semantic_chans) <= MAX_SEMANTIC_CHANS,
        "diffusion.semantic_chans",
        f"{d.semantic_chans}; valid: 16 (SemVAE latent), 1..{MAX_SEMANTIC_CHANS} (PCA-k of the DINOv2 tokens) "
        "or 0 (texture-only ablation)",
    )
    if int(d.semantic_chans) == 0:
        require(
            float(d.delta_t) == 0.0,
            "diffusion.delta_t",
            f"{d.delta_t}: without a semantic latent there is nothing to lead; use 0",
        )
    require(float(d.semantic_weight) >= 0, "diffusion.semantic_weight", f"{d.semantic_weight} must be >= 0")
    require(d.time_dist in TIME_DISTS, "diffusion.time_dist", f"{d.time_dist!r}; valid: {TIME_DISTS}")
    require(r.mode in REPA_MODES, "repa.mode", f"{r.mode!r}; valid: {REPA_MODES}")
    require(float(r.weight) >= 0, "repa.weight", f"{r.weight} must be >= 0 (0 switches REPA off)")


def _validate_optim(o) -> None:
    require_finite_optim(o)
    require(0 <= float(o.b1) < 1, "optim.b1", f"{o.b1} must lie in [0, 1)")
    require(0 <= float(o.b2) < 1, "optim.b2", f"{o.b2} must lie in [0, 1)")
    require(float(o.eps) > 0, "optim.eps", f"{o.eps} must be > 0")
    require(int(o.warmup_steps) >= 0, "optim.warmup_steps", f"{o.warmup_steps} must be >= 0")
    require(float(o.grad_clip) >= 0, "optim.grad_clip", f"{o.grad_clip} must be >= 0 (0 = off)")
    require(0 <= float(o.ema_decay) <= 1, "optim.ema_decay", f"{o.ema_decay} must lie in [0, 1]")
    require(0 <= float(o.label_dropout) < 1, "optim.label_dropout", f"{o.label_dropout} must lie in [0, 1)")


def _validate_run(config) -> None:
    """The train and data blocks and the distributed switch."""
    t, data = config.train, config.data
    require(t.batch_size > 0, "train.batch_size", f"{t.batch_size} must be a positive integer")
    skeleton.validate_loop(config, ConfigError)
    peak = t.get("peak_flops_per_device")
    require(peak is None or float(peak) > 0, "train.peak_flops_per_device", f"{peak} must be > 0 or None (auto)")

    require(data.source in SOURCES, "data.source", f"{data.source!r}; valid: {SOURCES}")
    if data.source == "arrayrecord":
        require(
            bool(data.get("path")),
            "data.path",
            "the extracted dataset directory is required for data.source='arrayrecord'",
        )
    require(1 <= int(data.num_classes) <= 1000, "data.num_classes", f"{data.num_classes} must lie in [1, 1000]")

    require(
        config.get("distributed", "auto") in ("auto", "on", "off"),
        "distributed",
        f"{config.get('distributed')!r}; valid: ('auto', 'on', 'off')",
    )


def _validate_mesh(config, device_count: int, process_count: int, num_slices: int | None) -> dict:
    """Mesh sizes against the devices, rules against the mesh axes, the batch against the data-parallel size and
    the processes. Returns the derived values of the mesh and the batch."""
    try:
        rules = parallel.parse_rules(config.mesh.rules)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    try:
        ici_shape, dcn_shape = parallel.mesh_shapes(
            config.mesh.ici,
            config.mesh.dcn,
            device_count=device_count,
            units=process_count if num_slices is None else num_slices,
        )
    except ValueError as e:
        raise ConfigError(f"config.{e} (device count {device_count})") from None
    shape = {a: i * j for a, i, j in zip(parallel.AXES, ici_shape, dcn_shape)}
    dp = shape["data"] * shape["fsdp"]
    batch = int(config.train.batch_size)
    require(
        batch % dp == 0,
        "train.batch_size",
        f"{batch} is not divisible by the data-parallel size {dp} (mesh data={shape['data']} x fsdp={shape['fsdp']})",
    )
    require(
        batch % process_count == 0, "train.batch_size", f"{batch} is not divisible by the process count {process_count}"
    )
    return {
        "mesh_shape": shape,
        "mesh_ici": list(ici_shape),
        "mesh_dcn": list(dcn_shape),
        "rules": {k: list(v) for k, v in rules.items()},
        "device_count": device_count,
        "process_count": process_count,
        "data_parallel": dp,
        "global_batch": batch,
        "per_process_batch": batch // process_count,
        "per_device_batch": batch / dp,
    }


def validate(config, *, device_count: int, process_count: int = 1, num_slices: int | None = None) -> dict:
    """Checks `config` for a run on `device_count` devices in `process_count` processes; returns derived values.

    num_slices: the DCN units of the devices (TPU slices, else processes; default: process_count): what a -1 in
    `mesh.dcn` takes, and the only product of `mesh.dcn` besides 1 that can be met.
    """
    _validate_model(config.model)
    _validate_diffusion(config.diffusion, config.repa)
    _validate_optim(config.optim)
    _validate_run(config)
    derived = _validate_mesh(config, device_count, process_count, num_slices)
    return {**derived, "model_channels": TEXTURE_CHANS + int(config.diffusion.semantic_chans)}
