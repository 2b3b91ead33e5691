"""SIGTERM (TPU preemption, `scancel`, `kill`) -> finish the current unit of work, save, exit 0.

For the loops outside the DiT trainer: extraction (unit: a shard), sampling (a batch) and evaluation (a batch of
Inception features). Single process: a signal handler sets a flag. Several processes that step in lockstep
(`sync=True`: sampling and evaluation run global batches) agree on one step through jax's preemption service,
`reached_preemption_sync_point`; processes that work independently (extraction) each stop by themselves.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised from inside a loop once its progress is saved; the mode's `run` turns it into a clean return."""


class Preemption:
    def __init__(self, *, sync: bool):
        self.requested = False
        self._previous = None
        self._multi = sync and jax.process_count() > 1 and jax.distributed.is_initialized()

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving progress at the next step, then exiting", signum)
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class NoPreemption:
    """For library calls outside a mode's `run`: never stops."""

    def reached(self, step: int) -> bool:
        del step
        return False
