"""The DiT training loop: `python -m sfd_jax.main --config=configs/sfd.py:<variant> --workdir=DIR --mode=train`.

Sections: data-iterator protocol | eval hook | preemption | the loop (logging, checkpoints). The run itself (config
-> mesh, model, sharded state, compiled step) is built by `sfd_jax.train.build`. See docs/training.md.

The loop never waits on the device except at log steps (metrics are fetched there), checkpoint steps (orbax copies
the state to the host) and evaluation steps. Everything random derives from (seed, step): the model's
initialisation from the seed, each step's draws from fold_in(rng, step), each batch from the data iterator's
position, which is checkpointed with the state -- so a run resumed from its workdir continues exactly as if it had
never stopped.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from etils import epath
from flax import nnx

from sfd_jax import parallel
from sfd_jax.checkpoint import Checkpoints, export_ema
from sfd_jax.profiling import Profiler
from sfd_jax.train import config as config_lib
from sfd_jax.train.build import Run, build, config_json, loss_config, model_config  # noqa: F401 (re-exported)
from sfd_jax.train.metrics import MetricsWriter, format_duration, is_remote, peak_flops_per_device
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
        from sfd_jax.data.pipeline import make_iterator
    else:
        raise config_lib.ConfigError(f"config.data.source: {source!r}; valid: {config_lib.SOURCES}")
    return make_iterator(config.data, batch_size=batch_size, process_index=process_index,
                         process_count=process_count, seed=int(config.seed))


_BATCH_KEYS = ("x1", "y", "dino")


def _check_batch(batch: dict, local_batch: int, channels: int = 48) -> dict:
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"data iterator returned keys {sorted(batch)}; missing {missing} (expected {_BATCH_KEYS})")
    x1, y, dino = batch["x1"], batch["y"], batch["dino"]
    if x1.ndim != 4 or x1.shape[0] != local_batch or x1.shape[-1] < channels:
        raise ValueError(f"batch['x1'] has shape {x1.shape}; expected ({local_batch}, H, W, >= {channels}) "
                         "(the per-process batch, channels-last)")
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
        raise config_lib.ConfigError(f"config.eval.fn: {spec!r}; eval.every={config.eval.every} needs "
                                     "'module:function' (or set eval.every=0)")
    module, name = spec.split(":", 1)
    return getattr(importlib.import_module(module), name)


# ================================================================================================================
# Preemption
# ================================================================================================================
class _Preemption:
    """SIGTERM (TPU preemption, `scancel`, `kill`) -> save at the next step boundary and exit 0.

    Single process: a signal handler sets a flag. Several processes: jax's preemption service (started by
    jax.distributed.initialize) agrees on one step for all of them via `reached_preemption_sync_point`.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1 and jax.distributed.is_initialized()

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint at the next step, then exiting", signum)
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ================================================================================================================
# The loop
# ================================================================================================================
class _Window:
    """Per-step metrics still on the device since the last log line, and the non-finite guard."""

    def __init__(self, mode: str):
        self.mode = mode
        self.entries: list[tuple[int, dict]] = []
        self.checked = 0
        self.skipped: list[int] = []

    def add(self, step: int, metrics: dict) -> None:
        self.entries.append((step, metrics))

    def check_finite(self) -> None:
        """Reads only the `finite` flags not yet read (a small device sync); raises in 'stop' mode."""
        new = self.entries[self.checked:]
        if not new:
            return
        flags = jax.device_get([m["finite"] for _, m in new])
        self.checked = len(self.entries)
        bad = [s for (s, _), ok in zip(new, flags) if not bool(ok)]
        if not bad:
            return
        if self.mode == "stop":
            raise FloatingPointError(
                f"non-finite loss or gradient at step {bad[0]} (train.nonfinite='stop'); the update of that step "
                "was not applied. Resume from the last checkpoint with a lower lr, grad clipping, or "
                "--config.train.nonfinite=skip")
        for s in bad:
            log.warning("non-finite loss or gradient at step %d: update skipped (train.nonfinite='skip')", s)
        self.skipped.extend(bad)

    def drain(self) -> tuple[int, dict, int]:
        """(steps in window, mean of each metric over the finite steps, number of non-finite steps)."""
        self.check_finite()
        host = jax.device_get([m for _, m in self.entries])
        n = len(host)
        finite = [h for h in host if bool(h["finite"])]
        means = {}
        for key in (host[0] if host else {}):
            if key == "finite":
                continue
            vals = [float(h[key]) for h in finite]
            means[key] = float(np.mean(vals)) if vals else float("nan")
        nonfinite = n - len(finite)
        self.entries, self.checked = [], 0
        return n, means, nonfinite


def _log_line(step, num_steps, values):
    parts = [f"step {step}/{num_steps}", f"loss {values.get('loss', float('nan')):.4f}",
             f"grad {values.get('grad_norm', float('nan')):.3g}", f"{values['img_per_s']:.1f} img/s"]
    if values.get("mfu") is not None:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    parts.append(f"ETA {format_duration(values['eta_s'])}")
    log.info(" | ".join(parts))


def run(config, workdir: str, *, eval_fn: Callable | None = None) -> dict:
    """Trains until `train.num_steps`, resuming from the newest readable checkpoint in `workdir`.

    Returns {'step', 'last_metrics', 'preempted', 'skipped_steps', 'state'} ('state' is the final TrainState).
    """
    parallel.maybe_initialize_distributed(config.get("distributed", "auto"))
    # orbax reports every save at INFO through absl; keep the console to the training log.
    absl_logger = logging.getLogger("absl")
    absl_level = absl_logger.level
    absl_logger.setLevel(max(absl_level, logging.WARNING))
    try:
        with _Preemption() as preemption:
            workdir = workdir if is_remote(workdir) else os.path.abspath(workdir)
            return _train(config, workdir, eval_fn, preemption)
    finally:
        absl_logger.setLevel(absl_level)


def _train(config, workdir: str, eval_fn: Callable | None, preemption: _Preemption) -> dict:
    t = config.train
    run_ = build(config)
    eval_fn = resolve_eval_fn(config, eval_fn)
    derived = run_.derived
    is_main = jax.process_index() == 0
    if is_main:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "config.json").write_text(json.dumps(config_json(run_), indent=2))
    log.info("model %s: %.2fM params | mesh %s | global batch %d (%d per process) | %d devices",
             config.model.size, run_.setup.num_params / 1e6, dict(run_.mesh.shape), derived["global_batch"],
             derived["per_process_batch"], derived["device_count"])

    ckpt = Checkpoints(workdir, keep_last=int(t.keep_last), keep_every=int(t.keep_every),
                       async_save=bool(t.async_checkpoint))
    data = make_data_iterator(config, batch_size=derived["per_process_batch"],
                              process_index=jax.process_index(), process_count=jax.process_count())
    restored = ckpt.restore_latest(run_.setup.abstract_state)
    if restored is None:
        state, aux = run_.setup.init()
        step = 0
    else:
        step, state, data_state, saved = restored
        aux = run_.setup.init_aux()
        if data_state is not None:
            data.set_state(data_state)
        _warn_config_changes(saved.get("config", {}), config_json(run_)["config"])
        log.info("resumed from %s/%d", ckpt.directory, step)
        if int(jax.device_get(state.step)) != step:
            raise RuntimeError(f"checkpoint {step} holds state.step={int(jax.device_get(state.step))}")

    writer = MetricsWriter(workdir, resume_step=step)
    profile = Profiler(config.get("profile"), workdir)
    num_steps = int(t.num_steps)
    log_every, ckpt_every, eval_every = int(t.log_every), int(t.ckpt_every), int(config.eval.every)
    n_dev, global_batch = derived["device_count"], derived["global_batch"]
    peak = peak_flops_per_device(t.get("peak_flops_per_device"))
    window = _Window(str(t.nonfinite))
    last_saved = step if restored is not None else -1
    preempted = False
    last_values: dict = {}
    compiled = None
    t_window = time.perf_counter()

    def save(at: int, wait: bool = False):
        nonlocal last_saved
        window.check_finite()  # in 'stop' mode no checkpoint is written past a non-finite step
        ckpt.save(at, state, data.get_state(), config_json(run_), wait=wait)
        last_saved = at

    def log_window(at: int):
        nonlocal last_values, t_window
        n, means, nonfinite = window.drain()  # waits for the device: the window's wall time is now known
        seconds = max(time.perf_counter() - t_window, 1e-9)
        t_window = time.perf_counter()
        rate = n * global_batch / seconds
        values = dict(means)
        values.update(lr=float(run_.schedule(at - 1)), img_per_s=rate, img_per_s_per_device=rate / n_dev,
                      steps_per_s=n / seconds, nonfinite_steps=nonfinite, eta_s=(num_steps - at) * seconds / n)
        values["mfu"] = rate * run_.flops_per_image / (peak * n_dev) if peak and run_.flops_per_image else None
        writer.write(at, values)
        if is_main:
            _log_line(at, num_steps, values)
        last_values = values

    def evaluate(at: int):
        values = eval_fn(EvalContext(step=at, config=config, workdir=workdir, mesh=run_.mesh,
                                     model_cfg=run_.model_cfg, setup=run_.setup, params=state.params,
                                     ema_params=state.ema_params, aux=aux)) or {}
        writer.write(at, {f"eval/{k}": float(v) for k, v in values.items()})
        log.info("eval at step %d: %s", at, values)

    try:
        while step < num_steps:
            profile(step)
            batch = _check_batch(next(data), derived["per_process_batch"], derived["model_channels"])
            batch = parallel.host_to_global(batch, run_.mesh)
            if compiled is None:
                compiled = run_.compile(state, aux, batch)
                t_window = time.perf_counter()
            state, metrics = compiled(state, aux, batch)  # asynchronous: returns before the device is done
            step += 1
            window.add(step, metrics)
            if step % log_every == 0 or step == num_steps:
                log_window(step)
            if step % ckpt_every == 0 or step == num_steps:
                save(step)
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == num_steps):
                evaluate(step)
            if preemption.reached(step):
                if last_saved != step:
                    save(step)
                ckpt.wait()
                log.warning("preempted: checkpoint of step %d written to %s, exiting", step, ckpt.directory)
                preempted = True
                break
        if not preempted and step > 0 and last_saved != step:
            save(step)
        window.check_finite()
    finally:
        ckpt.close()  # waits for the async save in flight
        writer.close()
        profile.close()

    if not preempted and step >= num_steps and bool(t.export_ema):
        out = os.fspath(epath.Path(workdir) / "ema")
        export_ema(out, run_.model_cfg, run_.setup.merge(state.ema_params, aux),
                   meta={"step": step, "weights": "ema", "workdir": workdir})
        log.info("EMA weights of step %d exported to %s", step, out)
    return {"step": step, "last_metrics": last_values, "preempted": preempted, "skipped_steps": window.skipped,
            "state": state}


def _warn_config_changes(saved: dict, current: dict, prefix: str = "") -> None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            log.warning("config.%s%s changed since the checkpoint: %r -> %r", prefix, key, a, b)
