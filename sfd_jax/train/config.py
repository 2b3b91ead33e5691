"""Validation and derived values of a DiT training config (configs/sfd.py), done once at start-up.

`validate(config, device_count=..., process_count=...)` raises `ConfigError` naming the field and the allowed
values, or returns the derived values (mesh shape, per-process batch, model channels, ...) that are saved as JSON
beside the checkpoints. It needs no devices, so configs can be checked on a laptop for a pod
(`device_count=256, process_count=64`).
"""
from __future__ import annotations

import math

from sfd_jax import parallel
from sfd_jax.errors import InputError

SOURCES = ("synthetic", "arrayrecord")
REPA_MODES = ("cos", "mse", "cos_mse")
TIME_DISTS = ("lognorm", "uniform")
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE = ("stop", "skip")
TEXTURE_CHANS = 32


class ConfigError(InputError):
    """A config field holds a value the trainer cannot use; the message names the field."""


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {message}")


def model_sizes() -> tuple[str, ...]:
    from sfd_jax.models.lightningdit import SIZES
    return tuple(SIZES)


def validate(config, *, device_count: int, process_count: int = 1, num_slices: int | None = None) -> dict:
    """Checks `config` for a run on `device_count` devices in `process_count` processes; returns derived values.

    num_slices: DCN units available when `mesh.dcn` holds -1 (TPU slices; default: process_count).
    """
    m, d, r, o, t, data = config.model, config.diffusion, config.repa, config.optim, config.train, config.data
    sizes = model_sizes()
    _require(str(m.size).lower() in sizes, "model.size", f"{m.size!r} is not a model size; valid sizes: {sizes}")
    _require(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r}; valid: {DTYPES}")
    from sfd_jax.models.lightningdit import REMAT_POLICIES
    policy = m.get("remat_policy", "full")
    _require(policy in REMAT_POLICIES, "model.remat_policy", f"{policy!r}; valid: {tuple(REMAT_POLICIES)}")

    _require(0.0 <= float(d.delta_t) < 1.0, "diffusion.delta_t", f"{d.delta_t} must lie in [0, 1)")
    _require(int(d.semantic_chans) in (0, 16), "diffusion.semantic_chans",
             f"{d.semantic_chans}; valid: 16 (SemVAE latent) or 0 (texture-only ablation)")
    if int(d.semantic_chans) == 0:
        _require(float(d.delta_t) == 0.0, "diffusion.delta_t",
                 f"{d.delta_t}: without a semantic latent there is nothing to lead; use 0")
    _require(float(d.semantic_weight) >= 0, "diffusion.semantic_weight", f"{d.semantic_weight} must be >= 0")
    _require(d.time_dist in TIME_DISTS, "diffusion.time_dist", f"{d.time_dist!r}; valid: {TIME_DISTS}")
    _require(r.mode in REPA_MODES, "repa.mode", f"{r.mode!r}; valid: {REPA_MODES}")
    _require(float(r.weight) >= 0, "repa.weight", f"{r.weight} must be >= 0 (0 switches REPA off)")

    _require(float(o.lr) > 0, "optim.lr", f"{o.lr} must be > 0")
    _require(0 <= float(o.b1) < 1, "optim.b1", f"{o.b1} must lie in [0, 1)")
    _require(0 <= float(o.b2) < 1, "optim.b2", f"{o.b2} must lie in [0, 1)")
    _require(float(o.eps) > 0, "optim.eps", f"{o.eps} must be > 0")
    _require(float(o.weight_decay) >= 0, "optim.weight_decay", f"{o.weight_decay} must be >= 0")
    _require(int(o.warmup_steps) >= 0, "optim.warmup_steps", f"{o.warmup_steps} must be >= 0")
    _require(float(o.grad_clip) >= 0, "optim.grad_clip", f"{o.grad_clip} must be >= 0 (0 = off)")
    _require(0 <= float(o.ema_decay) <= 1, "optim.ema_decay", f"{o.ema_decay} must lie in [0, 1]")
    _require(0 <= float(o.label_dropout) < 1, "optim.label_dropout", f"{o.label_dropout} must lie in [0, 1)")

    for name in ("batch_size", "num_steps", "log_every", "ckpt_every", "keep_last"):
        _require(int(t[name]) > 0, f"train.{name}", f"{t[name]} must be a positive integer")
    _require(int(t.keep_every) >= 0, "train.keep_every", f"{t.keep_every} must be >= 0 (0 = off)")
    _require(t.nonfinite in NONFINITE, "train.nonfinite", f"{t.nonfinite!r}; valid: {NONFINITE}")
    peak = t.get("peak_flops_per_device")
    _require(peak is None or float(peak) > 0, "train.peak_flops_per_device", f"{peak} must be > 0 or None (auto)")

    _require(data.source in SOURCES, "data.source", f"{data.source!r}; valid: {SOURCES}")
    if data.source == "arrayrecord":
        _require(bool(data.get("path")), "data.path", "the extracted dataset directory is required for "
                                                       "data.source='arrayrecord'")
    _require(1 <= int(data.num_classes) <= 1000, "data.num_classes", f"{data.num_classes} must lie in [1, 1000]")

    _require(int(config.eval.every) >= 0, "eval.every", f"{config.eval.every} must be >= 0 (0 = off)")
    _require(config.get("distributed", "auto") in ("auto", "on", "off"), "distributed",
             f"{config.get('distributed')!r}; valid: ('auto', 'on', 'off')")

    # Mesh: sizes against the devices, rules against the mesh axes.
    try:
        rules = parallel.parse_rules(config.mesh.rules)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    try:
        dcn = tuple(int(v) for v in config.mesh.dcn)
    except (TypeError, ValueError):
        raise ConfigError(f"config.mesh.dcn={config.mesh.dcn!r}: expected {len(parallel.AXES)} integers for axes "
                          f"{parallel.AXES}, e.g. (1, 1, 1)") from None
    slices = process_count if num_slices is None else num_slices
    try:
        dcn_shape = parallel.fill_shape(dcn, slices if -1 in dcn else math.prod(dcn), "mesh.dcn")
        _require(device_count % math.prod(dcn_shape) == 0, "mesh.dcn",
                 f"{dcn}: {device_count} devices cannot be split into {math.prod(dcn_shape)} equal parts")
        ici_shape = parallel.fill_shape(tuple(config.mesh.ici), device_count // math.prod(dcn_shape), "mesh.ici")
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.{e} (device count {device_count})") from None
    shape = {a: i * j for a, i, j in zip(parallel.AXES, ici_shape, dcn_shape)}
    dp = shape["data"] * shape["fsdp"]
    batch = int(t.batch_size)
    _require(batch % dp == 0, "train.batch_size",
             f"{batch} is not divisible by the data-parallel size {dp} (mesh data={shape['data']} x "
             f"fsdp={shape['fsdp']})")
    _require(batch % process_count == 0, "train.batch_size",
             f"{batch} is not divisible by the process count {process_count}")
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
        "model_channels": TEXTURE_CHANS + int(d.semantic_chans),
    }
