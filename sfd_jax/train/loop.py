"""The DiT training loop: `python -m sfd_jax.main --config=configs/sfd.py:<variant> --workdir=DIR --mode=train`.

Sections: data-iterator protocol | eval hook | the run. The run itself (config -> mesh, model, sharded state,
compiled step) is built by `sfd_jax.train.build`; the loop (resume, checkpoints, metrics, the non-finite guard,
SIGTERM/SIGINT, the workdir lock) is the one all trainers share, `sfd_jax.train.skeleton`. See docs/training.md.

Everything random derives from (seed, step): the model's
initialisation from the seed, each step's draws from fold_in(rng, step), each batch from the data iterator's
position, which is checkpointed with the state -- so a run resumed from its workdir continues exactly as if it had
never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
from typing import Any, Callable, Protocol

import jax
import numpy as np
from etils import epath
from flax import nnx

from sfd_jax import parallel
from sfd_jax.train import config as config_lib
from sfd_jax.train import skeleton
from sfd_jax.train.build import build, config_json
from sfd_jax.train.export import export_ema
from sfd_jax.train.metrics import is_remote, peak_flops_per_device
from sfd_jax.train.state import TrainSetup

log = logging.getLogger(__name__)


# ================================================================================================================
# Data
# ================================================================================================================
class DataIterator(Protocol):
    """What the loop needs from a data source (`data.source`); implemented by `sfd_jax.data.synthetic` and
    `sfd_jax.data.pipeline`, both made by `make_iterator(data_config, *, batch_size, process_index,
    process_count, seed)` with `batch_size` the per-process batch.

    - `next(it)` -> this process's rows of the next global batch, numpy:
      {'x1': float32 (b, 16, 16, 48) [texture 0:32 | semantic 32:48], 'y': int32 (b,) in [0, 1000),
       'dino': (b, 256, 768) float32/bfloat16/float16}. Extra keys are ignored.
    - `get_state()` -> a JSON-serialisable dict describing the position *after the batches already returned*
      (no read-ahead may leak into it). The loop calls it at checkpoint steps; it is saved per process.
    - `set_state(state)` -> continue so that the next `next(it)` returns what the saved iterator would have
      returned next. Called once after a restore, before the first `next`.
    """

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def make_data_iterator(config, *, batch_size: int, process_index: int, process_count: int) -> DataIterator:
    source = config.data.source
    if source == "synthetic":
        from sfd_jax.data.synthetic import make_iterator
    elif source == "arrayrecord":
        from sfd_jax.data.pipeline import make_iterator as _make

        make_iterator = functools.partial(
            _make, channels=(config_lib.TEXTURE_CHANS, int(config.diffusion.semantic_chans))
        )
    else:
        raise config_lib.ConfigError(f"config.data.source: {source!r}; valid: {config_lib.SOURCES}")
    return make_iterator(
        config.data,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=int(config.seed),
    )


_BATCH_KEYS = ("x1", "y", "dino")


def _check_batch(batch: dict, local_batch: int, channels: int = 48, exact: bool = False) -> dict:
    """exact: the data must hold exactly `channels` channels (a semantic latent of another width than the model's
    would otherwise be cut silently); without a semantic latent the model reads the texture part of any data."""
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"data iterator returned keys {sorted(batch)}; missing {missing} (expected {_BATCH_KEYS})")
    x1, y, dino = batch["x1"], batch["y"], batch["dino"]
    if x1.ndim != 4 or x1.shape[0] != local_batch or x1.shape[-1] < channels or (exact and x1.shape[-1] != channels):
        raise ValueError(
            f"batch['x1'] has shape {x1.shape}; expected ({local_batch}, H, W, {'' if exact else '>= '}"
            f"{channels}) (the per-process batch, channels-last; 32 texture + "
            "config.diffusion.semantic_chans semantic channels)"
        )
    if y.shape != (local_batch,):
        raise ValueError(f"batch['y'] has shape {y.shape}; expected ({local_batch},)")
    if dino.ndim != 3 or dino.shape[0] != local_batch:
        raise ValueError(f"batch['dino'] has shape {dino.shape}; expected ({local_batch}, T, 768)")
    return {k: batch[k] for k in _BATCH_KEYS}


# ================================================================================================================
# Evaluation hook
# ================================================================================================================
@dataclasses.dataclass
class EvalContext:
    """What an in-training evaluation receives (read-only: do not donate or modify these arrays).

    An eval function is `fn(ctx: EvalContext) -> dict[str, float]`, named by `config.eval.fn` ('module:function')
    or passed as `run(..., eval_fn=fn)`. It runs on every process (arrays are global, sharded over `mesh`) every
    `config.eval.every` steps and after the last step; its results are logged as `eval/<name>`.
    """

    step: int
    config: Any
    workdir: str
    mesh: jax.sharding.Mesh
    model_cfg: Any
    setup: TrainSetup
    params: Any
    ema_params: Any
    aux: Any

    def model(self, ema: bool = True) -> nnx.Module:
        """The DiT holding the EMA (default) or the raw weights."""
        return self.setup.merge(self.ema_params if ema else self.params, self.aux)


def resolve_eval_fn(config, eval_fn: Callable | None) -> Callable | None:
    if eval_fn is not None or int(config.eval.every) == 0:
        return eval_fn
    spec = str(config.eval.get("fn", ""))
    if ":" not in spec:
        raise config_lib.ConfigError(
            f"config.eval.fn: {spec!r}; eval.every={config.eval.every} needs 'module:function' (or set eval.every=0)"
        )
    module, name = spec.split(":", 1)
    return getattr(importlib.import_module(module), name)


# ================================================================================================================
# The run
# ================================================================================================================
def _line(values: dict) -> str:
    return f"loss {values.get('loss', float('nan')):.4f} | grad {values.get('grad_norm', float('nan')):.3g}"


def _step_fn(config, run_, aux) -> Callable:
    """The skeleton's step: checks this process's batch, makes it global and runs the step compiled at first use."""
    derived = run_.derived
    compiled = {}

    def step(state, batch):
        batch = _check_batch(
            batch,
            derived["per_process_batch"],
            derived["model_channels"],
            exact=int(config.diffusion.semantic_chans) > 0 and config.data.source != "synthetic",
        )
        batch = parallel.host_to_global(batch, run_.mesh)
        if "fn" not in compiled:
            compiled["fn"] = run_.compile(state, aux, batch)
        return compiled["fn"](state, aux, batch)

    return step


def _data_fn(config, per_process_batch: int) -> Callable:
    """The skeleton's make_data: this process's iterator, moved to a checkpointed position where there is one.

    The first iterator is opened here, so that a dataset that must be refused (layout, labels, statistics, shards)
    is refused before anything is compiled; the skeleton's first call takes it.
    """

    def open_iterator():
        return make_data_iterator(
            config,
            batch_size=per_process_batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    opened = [open_iterator()]

    def make_data(start_step: int, data_state: dict | None):
        data = opened.pop() if opened else open_iterator()
        if data_state is not None:
            data.set_state(data_state)
        return data

    return make_data


def _eval_hook(config, workdir: str, run_, aux, eval_fn: Callable) -> Callable:
    """The skeleton's evaluate: `eval_fn` on an EvalContext of the state, its results named `eval/<name>`."""

    def evaluate(at: int, state) -> dict:
        values = (
            eval_fn(
                EvalContext(
                    step=at,
                    config=config,
                    workdir=workdir,
                    mesh=run_.mesh,
                    model_cfg=run_.model_cfg,
                    setup=run_.setup,
                    params=state.params,
                    ema_params=state.ema_params,
                    aux=aux,
                )
            )
            or {}
        )
        return {f"eval/{k}": v for k, v in values.items()}

    return evaluate


def _export_final_ema(workdir: str, run_, state, aux, step: int) -> None:
    out = os.fspath(epath.Path(workdir) / "ema")
    export_ema(
        out,
        run_.model_cfg,
        run_.setup.merge(state.ema_params, aux),
        meta={"step": step, "weights": "ema", "workdir": workdir},
    )
    log.info("EMA weights of step %d exported to %s", step, out)


def run(config, workdir: str, *, eval_fn: Callable | None = None) -> dict:
    """Trains until `train.num_steps`, resuming from the newest readable checkpoint in `workdir`.

    Returns {'step', 'last_metrics', 'preempted', 'skipped_steps', 'state'} ('state' is the final TrainState).
    """
    parallel.maybe_initialize_distributed(config.distributed)
    workdir = workdir if is_remote(workdir) else os.path.abspath(workdir)
    run_ = build(config)
    eval_fn = resolve_eval_fn(config, eval_fn)
    derived = run_.derived
    saved_config = config_json(run_)
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "config.json").write_text(json.dumps(saved_config, indent=2))
    log.info(
        "model %s: %.2fM params | mesh %s | global batch %d (%d per process) | %d devices",
        config.model.size,
        run_.setup.num_params / 1e6,
        dict(run_.mesh.shape),
        derived["global_batch"],
        derived["per_process_batch"],
        derived["device_count"],
    )
    make_data = _data_fn(config, derived["per_process_batch"])
    aux = run_.setup.init_aux(int(config.seed))
    task = skeleton.Task(
        name="DiT",
        setup=run_.setup,
        seed=int(config.seed),
        step=_step_fn(config, run_, aux),
        make_data=make_data,
        saved_config=saved_config,
        global_batch=derived["global_batch"],
        lr=run_.schedule,
        line=_line,
        evaluate=_eval_hook(config, workdir, run_, aux, eval_fn) if eval_fn is not None else None,
        flops_per_image=run_.flops_per_image,
        peak_flops=peak_flops_per_device(config.train.peak_flops_per_device),
        device_count=derived["device_count"],
    )
    result = skeleton.run(task, config, workdir)
    if not result.preempted and result.step >= config.train.num_steps and config.train.export_ema:
        _export_final_ema(workdir, run_, result.state, aux, result.step)
    return {
        "step": result.step,
        "last_metrics": result.last_metrics,
        "preempted": result.preempted,
        "skipped_steps": result.skipped_steps,
        "state": result.state,
    }
