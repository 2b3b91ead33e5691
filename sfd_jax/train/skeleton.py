"""The training loop all three trainers share (DiT, SemVAE, texture VAE); each supplies only a `Task`.

The skeleton owns everything that is not model-specific, so the trainers cannot drift apart:
- the workdir lock (`sfd_jax.train.lock`), held by process 0 for the whole run;
- resume from the newest readable checkpoint, and the checkpoint cadence and retention (`config.train.ckpt_every`,
  `keep_last`, `keep_every`, `async_checkpoint`); a failed asynchronous save stops the run at the next step boundary;
- the metrics window, logged every `train.log_every` steps (`window_steps` says how many steps a line averages);
- the non-finite guard: every step's `finite` flag is read one step late (the device never waits for the host),
  so a NaN/Inf step is reported by its own number; `train.nonfinite='stop'` raises before anything after it is
  saved, 'skip' logs it (the step itself already dropped the update on the device);
- SIGTERM and SIGINT: save at the next step boundary and return with `preempted=True` (the CLI then exits 0);
- evaluation every `eval.every` steps and after the last (0 = never);
- closing the checkpoint manager and the metrics writer on every exit path.

The loop never waits on the device except for the previous step's `finite` flag, at log steps (metrics are
fetched), checkpoint steps (orbax copies the state to the host) and evaluation steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np

from sfd_jax.checkpoint import Checkpoints
from sfd_jax.train import lock as lock_lib
from sfd_jax.preemption import Preemption
from sfd_jax.profiling import Profiler
from sfd_jax.train.metrics import MetricsWriter, format_duration, is_remote

log = logging.getLogger(__name__)

NONFINITE = ("stop", "skip")


class Data(Protocol):
    """What the loop reads batches from: `next(data)` is whatever `Task.step` takes; `get_state()` is a JSON dict
    saved with each checkpoint (the position after the batches already returned) and handed back to
    `Task.make_data` on resume."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict: ...


class StepIndexed:
    """A `Data` for trainers whose batch order depends only on (seed, step): the position is the step itself."""

    def __init__(self, batches: Iterator, start_step: int):
        self._batches, self._next = batches, start_step

    def __next__(self):
        self._next += 1
        return next(self._batches)

    def get_state(self) -> dict:
        return {"next_batch": self._next}


@dataclasses.dataclass
class Task:
    """One trainer's part of a run.

    step(state, batch) -> (state, metrics): asynchronous; metrics hold at least 'finite' (bool scalar), usually
    'loss' and 'grad_norm'. make_data(start_step, saved data state or None) -> Data. evaluate(step, state) ->
    {'eval/<name>': float} (written and logged by the loop). line(means) -> the model-specific part of the log line.
    """

    name: str
    setup: Any  # TrainSetup: abstract_state and init(seed)
    seed: int  # config.seed: the initial weights and the state's training key of a fresh run
    step: Callable
    make_data: Callable[[int, dict | None], Data]
    saved_config: dict  # JSON saved with every checkpoint; its 'config' entry is compared on resume
    global_batch: int
    lr: Callable[[int], Any]
    line: Callable[[dict], str]
    evaluate: Callable[[int, Any], dict] | None = None
    eval_at_start: bool = False  # also evaluate before the first step of a fresh run
    flops_per_image: float | None = None
    peak_flops: float | None = None
    device_count: int = 1


@dataclasses.dataclass
class Result:
    step: int
    start_step: int
    state: Any
    last_metrics: dict
    last_eval: dict
    first_eval: dict
    preempted: bool
    skipped_steps: list


# ================================================================================================================
# Metrics window and the non-finite guard
# ================================================================================================================
class Window:
    """Per-step metrics still on the device since the last log line, and the non-finite guard."""

    def __init__(self, mode: str, name: str = ""):
        self.mode, self.name = mode, name
        self.entries: list[tuple[int, dict]] = []
        self.checked = 0
        self.skipped: list[int] = []

    def add(self, step: int, metrics: dict) -> None:
        self.entries.append((step, metrics))

    def check_finite(self, lag: int = 0) -> None:
        """Reads the `finite` flags not yet read except the newest `lag` (a small device sync); raises in 'stop'
        mode."""
        new = self.entries[self.checked : len(self.entries) - lag]
        if not new:
            return
        flags = jax.device_get([m["finite"] for _, m in new])
        self.checked += len(new)
        bad = [s for (s, _), ok in zip(new, flags) if not bool(ok)]
        if not bad:
            return
        what = f"{self.name} loss, gradient or updated state" if self.name else "loss, gradient or updated state"
        if self.mode == "stop":
            raise FloatingPointError(
                f"non-finite {what} at step {bad[0]} (train.nonfinite='stop'); the update of that step was not "
                "applied and nothing after it was saved. Resume from the last checkpoint with a lower optim.lr, "
                "optim.grad_clip, or --config.train.nonfinite=skip"
            )
        for s in bad:
            log.warning("non-finite %s at step %d: update skipped (train.nonfinite='skip')", what, s)
        self.skipped.extend(bad)

    def drain(self) -> tuple[int, dict, int]:
        """(steps in window, mean of each metric over the finite steps, number of non-finite steps)."""
        self.check_finite()
        host = jax.device_get([m for _, m in self.entries])
        finite = [h for h in host if bool(h["finite"])]
        means = {}
        for key in host[0] if host else {}:
            if key != "finite":
                vals = [float(h[key]) for h in finite]
                means[key] = float(np.mean(vals)) if vals else float("nan")
        self.entries, self.checked = [], 0
        return len(host), means, len(host) - len(finite)


# ================================================================================================================
# The loop
# ================================================================================================================
def loop_settings(config) -> dict:
    """The loop's settings, read once: the same names in every trainer's config."""
    t = config.train
    return dict(
        num_steps=t.num_steps,
        log_every=t.log_every,
        ckpt_every=t.ckpt_every,
        keep_last=t.keep_last,
        keep_every=t.keep_every,
        keep_steps=frozenset(int(k) for k in t.get("keep_steps", ()) or ()),
        async_checkpoint=t.async_checkpoint,
        nonfinite=t.nonfinite,
        eval_every=config.eval.every,
    )


def validate_loop(config, error=ValueError) -> None:
    """The loop fields' checks, shared by the trainers' validations."""
    s = loop_settings(config)
    for name in ("num_steps", "log_every", "ckpt_every", "keep_last"):
        if not s[name] > 0:
            raise error(f"config.train.{name}: {s[name]} must be a positive integer")
    if s["keep_every"] < 0:
        raise error(f"config.train.keep_every: {s['keep_every']} must be >= 0 (0 = off)")
    if not all(0 < k <= s["num_steps"] for k in s["keep_steps"]):
        raise error(
            f"config.train.keep_steps: {sorted(s['keep_steps'])}: each must be a step in "
            f"[1, train.num_steps={s['num_steps']}]"
        )
    if s["eval_every"] < 0:
        raise error(f"config.eval.every: {s['eval_every']} must be >= 0 (0 = never)")
    if s["nonfinite"] not in NONFINITE:
        raise error(f"config.train.nonfinite: {s['nonfinite']!r}; valid: {NONFINITE}")


def run(task: Task, config, workdir: str) -> Result:
    """Trains `task` to `train.num_steps` in `workdir`, resuming from its newest readable checkpoint."""
    workdir = workdir if is_remote(workdir) else os.path.abspath(workdir)
    # orbax reports every save at INFO through absl; keep the console to the training log.
    absl_logger = logging.getLogger("absl")
    absl_level = absl_logger.level
    absl_logger.setLevel(max(absl_level, logging.WARNING))
    try:
        with lock_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0), Preemption() as preemption:
            return _Loop(task, loop_settings(config), workdir, preemption, config.get("profile")).run()
    finally:
        absl_logger.setLevel(absl_level)


class _Loop:
    def __init__(self, task: Task, settings: dict, workdir: str, preemption: Preemption, profile_config=None):
        self.task, self.s, self.workdir, self.preemption = task, settings, workdir, preemption
        self.config_profile = profile_config  # config.profile: jax.profiler traces of chosen steps
        self.window = Window(settings["nonfinite"], task.name)
        self.last_values: dict = {}
        self.last_eval: dict = {}

    def run(self) -> Result:
        task, s = self.task, self.s
        self.ckpt = Checkpoints(
            self.workdir,
            keep_last=s["keep_last"],
            keep_every=s["keep_every"],
            keep_steps=s["keep_steps"],
            async_save=s["async_checkpoint"],
        )
        self.writer = None
        self.profile = Profiler(self.config_profile, self.workdir)
        try:
            step, state, data_state = self._restore()
            self.start_step = self.last_saved = step
            self.writer = MetricsWriter(self.workdir, resume_step=step)
            self.data = task.make_data(step, data_state)
            first_eval = {}
            if step == 0 and task.eval_at_start and task.evaluate is not None and s["eval_every"]:
                first_eval = self._evaluate(0, state)
            self.last_saved = step if step > 0 else -1
            step, state, preempted = self._steps(step, state)
        finally:
            self.ckpt.close()  # waits for the async save in flight
            self.profile.close()
            if self.writer is not None:
                self.writer.close()
        return Result(
            step=step,
            start_step=self.start_step,
            state=state,
            last_metrics=self.last_values,
            last_eval=self.last_eval,
            first_eval=first_eval,
            preempted=preempted,
            skipped_steps=self.window.skipped,
        )

    def _restore(self):
        restored = self.ckpt.restore_latest(self.task.setup.abstract_state)
        if restored is None:
            return 0, self.task.setup.init(self.task.seed)[0], None
        step, state, data_state, saved = restored
        warn_config_changes(saved.get("config", {}), self.task.saved_config.get("config", {}))
        held = int(jax.device_get(state.step))
        if held != step:
            raise RuntimeError(f"checkpoint {self.ckpt.directory}/{step} holds state.step={held}")
        log.info("resumed from %s/%d", self.ckpt.directory, step)
        return step, state, data_state

    def _steps(self, step: int, state):
        s, task, window = self.s, self.task, self.window
        num_steps = s["num_steps"]
        self.t_window = None
        while step < num_steps:
            self.ckpt.check()  # a failed asynchronous save stops the run here, not one interval later
            self.profile(step)
            state, metrics = task.step(state, next(self.data))  # asynchronous
            if self.t_window is None:  # the first call compiled; time the window from here
                self.t_window = time.perf_counter()
            step += 1
            window.add(step, metrics)
            window.check_finite(lag=1)  # the previous step is done (or nearly): no stall
            if step % s["log_every"] == 0 or step == num_steps:
                self._log(step)
            if step % s["ckpt_every"] == 0 or step == num_steps or step in s["keep_steps"]:
                self._save(step, state)
            if task.evaluate is not None and s["eval_every"] and (step % s["eval_every"] == 0 or step == num_steps):
                self._evaluate(step, state)
            if self.preemption.reached(step):
                if self.last_saved != step:
                    self._save(step, state)
                self.ckpt.wait()
                log.warning("preempted: checkpoint of step %d written to %s, exiting", step, self.ckpt.directory)
                return step, state, True
        if step > 0 and self.last_saved != step:
            self._save(step, state)
        window.check_finite()
        self.ckpt.wait()
        return step, state, False

    def _save(self, step: int, state) -> None:
        self.window.check_finite()  # in 'stop' mode no checkpoint is written past a non-finite step
        self.ckpt.save(step, state, self.data.get_state(), self.task.saved_config)
        self.last_saved = step

    def _log(self, step: int) -> None:
        task = self.task
        n, means, nonfinite = self.window.drain()  # waits for the device: the window's wall time is now known
        now = time.perf_counter()
        seconds = max(now - (self.t_window or now), 1e-9)
        self.t_window = now
        rate = n * task.global_batch / seconds
        values = dict(means)
        values.update(
            lr=float(task.lr(step - 1)),
            img_per_s=rate,
            img_per_s_per_device=rate / task.device_count,
            steps_per_s=n / seconds,
            window_steps=n,
            nonfinite_steps=nonfinite,
            eta_s=(self.s["num_steps"] - step) * seconds / n,
        )
        peak = task.peak_flops
        values["mfu"] = (
            rate * task.flops_per_image / (peak * task.device_count) if peak and task.flops_per_image else None
        )
        self.writer.write(step, values)
        if jax.process_index() == 0:
            parts = [f"step {step}/{self.s['num_steps']}", task.line(values), f"{rate:.1f} img/s"]
            if values["mfu"] is not None:
                parts.append(f"MFU {100 * values['mfu']:.1f}%")
            parts.append(f"ETA {format_duration(values['eta_s'])}")
            log.info(" | ".join(parts))
        self.last_values = values

    def _evaluate(self, step: int, state) -> dict:
        values = {k: float(v) for k, v in (self.task.evaluate(step, state) or {}).items()}
        self.writer.write(step, values)
        log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.5g}" for k, v in values.items()))
        self.last_eval = values
        return values


def warn_config_changes(saved: dict, current: dict, prefix: str = "") -> None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            warn_config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            log.warning("config.%s%s changed since the checkpoint: %r -> %r", prefix, key, a, b)
