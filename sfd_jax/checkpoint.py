"""Orbax checkpoints of a training run: train state | data-iterator state | config, restorable onto any mesh.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`:
- `state`  the TrainState pytree (orbax StandardSave, each host writes its own shards);
- `data`   JSON {"process_count": P, "processes": [state of process 0, ..., state of process P-1]};
- `config` JSON of the run's config plus derived values (mesh shape, per-process batch, parameter count).

Saves are asynchronous (the device->host copy happens before `save` returns, so the next step may donate the
buffers). Retention keeps the newest `keep_last` checkpoints plus every step divisible by `keep_every` (for FID
curves) plus the steps listed in `keep_steps` (e.g. the AutoGuidance guide steps a sampling recipe names).
`restore_latest` restores onto the shardings of the abstract state it is given -- so a run saved on one mesh resumes on
another mesh shape or device count -- and falls back to the previous checkpoint, with a warning naming the unreadable
one, when the newest cannot be read; the unreadable ones are moved to `<workdir>/checkpoints_corrupt/` so that training
can write those step numbers again.

This module knows the layout and nothing of what is stored: `sfd_jax.train.export` writes a DiT run's EMA weights
alone for sampling, and `restore_weights` reads one part of a stored state (e.g. the EMA weights) without the
optimizer it was saved with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"

log = logging.getLogger(__name__)

# orbax splits a replicated array between its replicas so that each writes a part ("replica-parallel" saving). Each
# part is cut by an eager slice, and every (shape, offset) is its own compiled program: a model of small arrays on 8
# devices spent 5.7 s on its first save and 1.9 s on each later one cutting parts of a few KiB (0.8 s / 0.6 s
# without). Parts below this size are written whole by one replica; large arrays (a DiT-XL's 1152×1152 weights)
# still spread over the replicas.
MIN_REPLICA_PARALLEL_BYTES = 256 * 1024


def _register_array_handler() -> None:
    """Registers orbax's jax.Array handler with MIN_REPLICA_PARALLEL_BYTES for every orbax save in this process.

    orbax keeps one process-wide registry; this only changes when a replicated array is split, never what is written
    or how it is read back.
    """
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES)
    absl_logger = logging.getLogger("absl")  # orbax warns of every override, this intended one included
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


def _allgather_json(obj: Any) -> list:
    """The JSON-serialisable `obj` of every process, in process order (orbax writes JSON from one host only)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(gathered[i, : sizes[i]].tobytes()) for i in range(len(sizes))]


class NoReadableCheckpoint(RuntimeError):
    """Every checkpoint of a workdir failed to read (typically a config that no longer fits the saved state)."""


class Checkpoints:
    """A thin policy layer over `ocp.CheckpointManager` for train runs."""

    def __init__(
        self, workdir: str, *, keep_last: int = 3, keep_every: int = 0, keep_steps=(), async_save: bool = True
    ):
        self.workdir = os.fspath(workdir)
        self.directory = os.fspath(epath.Path(self.workdir) / CHECKPOINT_DIR)
        policies = [ocp.checkpoint_managers.LatestN(n=max(1, int(keep_last)))]
        if keep_every and keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(int(keep_every)))
        if keep_steps:
            policies.append(ocp.checkpoint_managers.CustomSteps(sorted(int(s) for s in keep_steps)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # an interrupted save leaves a tmp dir; it is never a valid checkpoint
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))
        self._pending: int | None = None  # the step of the save in flight, until its outcome is known
        self.last_good: int | None = self.manager.latest_step()

    # -- writing ------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, config: dict, *, wait: bool = False) -> None:
        """Starts an async save of `state` at `step`; `wait=True` blocks until it is on disk."""
        processes = _allgather_json(data_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"process_count": len(processes), "processes": processes}),
            config=ocp.args.JsonSave(config),
        )
        self.check()
        previous = self._pending
        # orbax's save first waits for the previous one: an error raised here is that save's
        with _surface_save_errors(self, step if previous is None else previous):
            self.manager.wait_until_finished()
        if previous is not None:
            self.last_good = previous
        with _surface_save_errors(self, step):
            self.manager.save(int(step), args=args, force=True)
        self._pending = int(step)
        if wait:
            self.wait()

    def check(self) -> None:
        """Raises `CheckpointSaveError` if the save in flight has already failed; cheap (no waiting), so the loop
        calls it at every step boundary and a full disk stops the run at once instead of one interval later."""
        if self._pending is None:
            return
        with _surface_save_errors(self, self._pending):
            self.manager.check_for_errors()
            if not self.manager.is_saving_in_progress():
                self.manager.wait_until_finished()  # returns at once; raises the finalisation's error, if any
                self.last_good, self._pending = self._pending, None

    def wait(self) -> None:
        step = self._pending
        with _surface_save_errors(self, step):
            self.manager.wait_until_finished()
        if step is not None:
            self.last_good, self._pending = step, None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # -- reading ------------------------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data JSON, config JSON) of `step`, the state placed on `abstract_state`'s shardings."""
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return out.state, out.data, out.config

    def restore_latest(self, abstract_state: Any):
        """(step, state, data_state_of_this_process, config JSON) of the newest readable checkpoint, or None.

        An unreadable newest checkpoint is skipped with a warning naming it and the previous one is tried. If no
        checkpoint can be read, the newest one's error is raised (a config that no longer fits the saved state
        fails on every step, and silently starting from scratch would hide that).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                with quiet_libraries():
                    state, data, config = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure makes this checkpoint unusable
                path = os.path.join(self.directory, str(step))
                log.warning(
                    "checkpoint %s is unreadable (%s); falling back to the previous checkpoint", path, _root_cause(e)
                )
                errors.append((step, e))
                continue
            if errors:
                self._quarantine([s for s, _ in errors])
            return step, state, self._data_for_this_process(data), config
        if errors:
            step, err = errors[0]
            # Raised without chaining: the cause's own traceback is library noise; its first line is kept here.
            raise NoReadableCheckpoint(
                f"no readable checkpoint in {self.directory} (tried steps "
                f"{[s for s, _ in errors]}); the newest ({step}) failed with "
                f"{_root_cause(err)}"
            ) from None
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints aside (deletes them where a rename is impossible) so later saves can reuse
        their step numbers."""
        if jax.process_index() == 0:
            dest_root = epath.Path(self.workdir) / CORRUPT_DIR
            for step in steps:
                src = epath.Path(self.directory) / str(step)
                if not src.exists():
                    continue
                dest = dest_root / f"{step}-{int(time.time())}"
                try:
                    dest_root.mkdir(parents=True, exist_ok=True)
                    src.rename(dest)
                    log.warning("moved unreadable checkpoint %s to %s", src, dest)
                except OSError as e:
                    log.warning("cannot move unreadable checkpoint %s (%s); deleting it", src, e)
                    src.rmtree()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sfd_checkpoint_quarantine")
        self.manager.reload()

    @staticmethod
    def _data_for_this_process(data: dict | None) -> dict | None:
        if not data:
            return None
        processes = data.get("processes") or []
        if not processes:
            return None
        if len(processes) != jax.process_count():
            log.warning(
                "checkpoint was written by %d processes, resuming with %d: every process resumes the "
                "data iterator from process 0's state",
                len(processes),
                jax.process_count(),
            )
            return processes[0]
        return processes[jax.process_index()]


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, lost permissions, ...); the message is one line."""


@contextlib.contextmanager
def _surface_save_errors(ckpt: Checkpoints, step: int | None):
    try:
        yield
    except CheckpointSaveError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax wraps the OS error in its own types
        ckpt._pending = None
        cause = _root_cause(e)
        path = os.path.join(ckpt.directory, str(step)) if step is not None else ckpt.directory
        last = (
            os.path.join(ckpt.directory, str(ckpt.last_good))
            if ckpt.last_good is not None
            else "none (nothing was saved yet)"
        )
        raise CheckpointSaveError(
            f"saving checkpoint {path} failed: {cause}; the last good checkpoint is {last}"
        ) from e


def _root_cause(e: BaseException) -> str:
    """The innermost error's one-line description ("[Errno 28] No space left on device: '...'")."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def quiet_libraries():
    """Silences absl (orbax) and tensorstore chatter while checkpoints are probed: a failed read is reported once,
    by us, instead of as pages of library warnings burying the cause."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
    directory = os.fspath(epath.Path(workdir) / CHECKPOINT_DIR)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"no checkpoints under {directory}")
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True), item_names=("state", "data", "config")
    )


def _steps(manager: ocp.CheckpointManager, step: int | None) -> list[int]:
    """`[step]` if it exists, else all steps newest first; FileNotFoundError names what is there."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {manager.directory}")
    if step is None:
        return steps
    if int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} under {manager.directory} (steps: {sorted(steps)})")
    return [int(step)]


def read_config_json(workdir: str, step: int | None = None) -> dict:
    """The config JSON stored with checkpoint `step` (default: newest) of a run."""
    manager = _read_only_manager(workdir)
    try:
        step = _steps(manager, step)[0]
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    finally:
        manager.close()


def restore_weights(workdir: str, abstract_params: Any, *, step: int | None = None, part: str = "ema_params"):
    """(step, weights): the `part` field of the train state stored with checkpoint `step` (default: the newest
    readable), placed on the shardings of `abstract_params` (a tree of jax.ShapeDtypeStruct).

    Only that field is read, so a caller that wants a model needs neither the optimizer the run trained with nor
    memory for its moments. Unreadable checkpoints are skipped with a warning but left in place: unlike a resuming
    trainer, a reader does not move a run's files.
    """
    target = {part: abstract_params}
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
    )
    manager = _read_only_manager(workdir)
    try:
        errors = []
        for candidate in _steps(manager, step):
            try:
                with quiet_libraries():
                    return candidate, manager.restore(candidate, args=args).state[part]
            except Exception as e:  # noqa: BLE001 - any read failure makes this checkpoint unusable
                if step is not None:
                    raise
                log.warning(
                    "checkpoint %s of %s is unreadable (%s); trying the previous one",
                    candidate,
                    workdir,
                    _root_cause(e),
                )
                errors.append((candidate, e))
        newest, err = errors[0]
        raise NoReadableCheckpoint(
            f"no readable checkpoint in {manager.directory} (tried steps {[s for s, _ in errors]}); the newest "
            f"({newest}) failed with {_root_cause(err)}"
        ) from None
    finally:
        manager.close()
