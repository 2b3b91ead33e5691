"""SIGTERM (TPU preemption, `scancel`, `kill`) or SIGINT (Ctrl-C) -> finish the current unit of work, save, exit 0.

For every loop: the trainers (unit: a step, `sfd_jax.train.skeleton`), extraction (a shard), sampling (a batch) and
evaluation (a batch of Inception features). Single process: a signal handler sets a flag. Several processes that step
in lockstep (`sync=True`: sampling and evaluation run global batches) agree on one step through jax's preemption
service, `reached_preemption_sync_point`; processes that work independently (extraction) each stop by themselves.
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
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, sync: bool = True):
        self.requested = False
        self._previous: dict = {}
        self._multi = sync and jax.process_count() > 1 and jax.distributed.is_initialized()

    def __enter__(self):
        # With several processes in lockstep jax's preemption service owns SIGTERM; Ctrl-C reaches only one process,
        # so it is left to its default there.
        if not self._multi and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        log.warning("received %s: saving progress at the next step, then exiting", signal.Signals(signum).name)
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class NoPreemption:
    """For library calls outside a mode's `run`: never stops."""

    def reached(self, step: int) -> bool:
        del step
        return False
