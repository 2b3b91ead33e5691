"""Building a DiT training run from its config: validation, mesh, model and loss configs, the sharded-state
recipe (`TrainSetup`) and the jitted train step.

`build(config)` allocates nothing. The expensive parts -- the sharded-state recipe and the compiled step -- depend
only on the model/diffusion/REPA/optimizer/mesh fields, the seed, the global batch and the devices; runs in one
process that share those (a notebook re-running, the resume tests) reuse them instead of compiling again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable

import jax

from sfd_jax import parallel
from sfd_jax.programs import ProgramCache, config_key
from sfd_jax.train import config as config_lib
from sfd_jax.train.state import TrainSetup, make_optimizer
from sfd_jax.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything derived from the config for one training run on one mesh."""

    config: Any
    derived: dict
    mesh: jax.sharding.Mesh
    model_cfg: Any
    loss_cfg: Any
    setup: TrainSetup
    schedule: Callable
    train_step: Callable  # jitted (state, aux, global batch) -> (state, metrics), donates state
    flops_per_image: float | None
    compiled: dict  # batch signature -> compiled train_step (shared by runs with the same step)

    def compile(self, state, aux, batch):
        """The compiled step for this batch signature (compiled on first use; later runs reuse it)."""
        key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.train_step.lower(state, aux, batch).compile()
            _log_compile(self.compiled[key], time.perf_counter() - t0)
        return self.compiled[key]


# DiTConfig fields a config's `model` block may set on top of the size table: a model between the table's sizes,
# another latent grid (input_size), a REPA target of another width (repa_dim: the DINOv2 hidden size), a label table
# for fewer classes (num_classes). Absent or None: the table's / DiTConfig's value. Used by configs/demo.py.
ARCHITECTURE_FIELDS = (
    "depth",
    "hidden_size",
    "num_heads",
    "mlp_ratio",
    "repa_projector_dim",
    "input_size",
    "repa_dim",
    "num_classes",
)


def model_config(config, model_channels: int = 48):
    from sfd_jax.models.lightningdit import DiTConfig

    m = config.model
    overrides = {k: m[k] for k in ARCHITECTURE_FIELDS if m.get(k) is not None}
    return DiTConfig.from_size(
        str(m.size),
        dtype=str(m.dtype),
        remat=bool(m.remat),
        remat_policy=str(m.get("remat_policy", "full")),
        attention_impl=(m.attention_impl or None),
        repa_depth=int(m.repa_depth),
        use_repa=float(config.repa.weight) > 0,
        in_channels=int(model_channels),
        semantic_chans=int(config.diffusion.semantic_chans),
        # the reference's embedder choice, so that its ablation checkpoints load (and ours export to its format)
        dual_timestep=float(config.diffusion.delta_t) > 0 and int(config.diffusion.semantic_chans) > 0,
        **overrides,
    )


def loss_config(config):
    from sfd_jax.diffusion.losses import LossConfig

    d = config.diffusion
    return LossConfig(
        delta_t=float(d.delta_t),
        semantic_chans=int(d.semantic_chans),
        semantic_weight=float(d.semantic_weight),
        use_cosine_loss=bool(d.use_cosine_loss),
        repa_weight=float(config.repa.weight),
        repa_mode=str(config.repa.mode),
        time_dist=str(d.time_dist),
    )


# The sharded-state recipe and the compiled step depend only on these parts of the config, the global batch and the
# devices. (train.num_steps is not among them because make_optimizer's schedules ignore it; add it if one decays.)
_STEP_FIELDS = ("model", "diffusion", "repa", "optim", "mesh")
_BUILD_CACHE = ProgramCache(size=4)


def _build_key(config, devices, process_count) -> str:
    batch, ids = int(config.train.batch_size), [d.id for d in devices]
    return config_key(config, _STEP_FIELDS, batch=batch, devices=ids, processes=process_count)


def build(config, *, process_count: int | None = None, devices=None) -> Run:
    """Validates `config` and builds the mesh, the sharded-state recipe and the jitted step (nothing allocated)."""
    from sfd_jax.models.lightningdit import train_flops_per_image

    devices = jax.devices() if devices is None else list(devices)
    process_count = jax.process_count() if process_count is None else process_count
    # The DCN units of the devices themselves (TPU slices, else processes): the mesh built below uses the same count.
    derived = config_lib.validate(
        config, device_count=len(devices), process_count=process_count, num_slices=parallel.dcn_units(devices)
    )
    model_cfg = model_config(config, derived["model_channels"])
    loss_cfg = loss_config(config)
    mesh, setup, schedule, train_step, compiled = _BUILD_CACHE.get(
        _build_key(config, devices, process_count),
        lambda: _build_step(config, devices, model_cfg, derived["model_channels"], loss_cfg),
    )
    derived["num_params"] = int(setup.num_params)
    return Run(
        config=config,
        derived=derived,
        mesh=mesh,
        model_cfg=model_cfg,
        loss_cfg=loss_cfg,
        setup=setup,
        schedule=schedule,
        train_step=train_step,
        flops_per_image=float(train_flops_per_image(model_cfg)),
        compiled=compiled,
    )


def _build_step(config, devices, model_cfg, model_channels: int, loss_cfg) -> tuple:
    """(mesh, sharded-state recipe, learning-rate schedule, jitted step, {} for its compilations)."""
    from sfd_jax.diffusion.losses import sfd_loss
    from sfd_jax.models.lightningdit import LightningDiT

    mesh = parallel.make_mesh(tuple(config.mesh.ici), tuple(config.mesh.dcn), devices)
    rules = parallel.parse_rules(config.mesh.rules)
    tx, schedule = make_optimizer(config.optim, int(config.train.num_steps))
    setup = TrainSetup(lambda rngs: LightningDiT(model_cfg, rngs=rngs), tx, mesh, rules)
    step_fn = make_train_step(
        setup.graphdef,
        tx,
        sfd_loss,
        loss_cfg,
        ema_decay=float(config.optim.ema_decay),
        label_dropout=float(config.optim.label_dropout),
        null_class=model_cfg.num_classes,
        model_channels=model_channels,
    )
    return mesh, setup, schedule, jit_train_step(step_fn, setup, mesh), {}


def config_json(run: Run) -> dict:
    """The config, the derived values and the model config, as saved with every checkpoint."""
    return {
        "config": json.loads(run.config.to_json_best_effort()),
        "derived": run.derived,
        "model": run.model_cfg.to_dict(),
    }


def _log_compile(compiled, seconds: float) -> None:
    try:
        mem = compiled.memory_analysis()
        per_device = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        )
        log.info(
            "train step compiled in %.1fs; per-device memory: %.2f GiB (args %.2f, temp %.2f)",
            seconds,
            per_device / 2**30,
            mem.argument_size_in_bytes / 2**30,
            mem.temp_size_in_bytes / 2**30,
        )
    except Exception:  # noqa: BLE001 - memory analysis is not available on every backend
        log.info("train step compiled in %.1fs", seconds)
