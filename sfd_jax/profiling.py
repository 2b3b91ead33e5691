"""`--config.profile.*`: a jax.profiler trace of chosen loop steps, in any mode that loops.

    --config.profile.start_step=10 --config.profile.num_steps=5 [--config.profile.dir=DIR]

traces steps [start_step, start_step + num_steps) of the train loop (steps), sampling (global batches),
extraction (shards) or evaluation (Inception batches) into `dir` (default `<workdir>/profile`), as TensorBoard's
profile plugin and Perfetto read it (docs/training.md). start_step < 0 (the default) switches it off. A loop calls
`profile(step)` at the top of every step and `profile.close()` when it ends (a trace still open is written then).
The profiler writes local files only; for a gs:// workdir the trace goes to a local temporary directory and is
uploaded when it stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import jax

from sfd_jax import paths

log = logging.getLogger(__name__)


def _get(cfg, name, default):
    if cfg is None:
        return default
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None else value


class Profiler:
    def __init__(self, cfg, workdir: str):
        self.start = int(_get(cfg, "start_step", -1))
        self.num_steps = int(_get(cfg, "num_steps", 3))
        if self.start >= 0 and self.num_steps < 1:
            raise ValueError(f"config.profile.num_steps must be positive, got {self.num_steps}")
        self.dir = str(_get(cfg, "dir", "")) or paths.join(workdir, "profile")
        self._local = None

    def __call__(self, step: int) -> None:
        if self.start < 0:
            return
        if self._local is None and step == self.start:
            self._local = tempfile.mkdtemp(prefix="sfd_jax_trace_") if paths.is_remote(self.dir) else self.dir
            os.makedirs(self._local, exist_ok=True)
            log.info("profiling steps %d..%d into %s", step, step + self.num_steps - 1, self.dir)
            jax.profiler.start_trace(self._local)
        elif self._local is not None and step == self.start + self.num_steps:
            self.close()

    def close(self) -> None:
        if self._local is None:
            return
        jax.profiler.stop_trace()
        if self._local != self.dir:
            for root, _, files in os.walk(self._local):
                for name in files:
                    local = os.path.join(root, name)
                    paths.upload(local, paths.join(self.dir, os.path.relpath(local, self._local)))
            shutil.rmtree(self._local, ignore_errors=True)
        log.info("profile trace written to %s", self.dir)
        self._local = None
