"""A bounded cache of built programs (jitted functions and what they close over), with a count of their traces.

    _PROGRAMS = ProgramCache(size=8)
    fn = _PROGRAMS.get(key, lambda: jax.jit(program))    # program calls _PROGRAMS.note_trace() when traced
    _PROGRAMS.trace_count()                              # tests: a second call with the same key traced nothing

The key holds everything static about a program (graph definitions, settings, shapes, mesh). jax.jit keeps its own
cache per function object, so building a new jitted function for a key already seen would compile again; keeping
the function alive here is what makes the second call cheap. The bound keeps a long sweep (many guidance settings,
many meshes) from holding every compiled program and the weights its closure references; the least recently used
goes first.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")

__all__ = ["ProgramCache", "config_key"]


def config_key(config, fields, *, mesh=None, **extra) -> str:
    """A cache key from the named top-level blocks of an ml_collections config, the mesh (its devices and axis sizes)
    and `extra` (JSON-able values): the trainers' programs depend on those blocks and nothing else of the config."""
    cfg = json.loads(config.to_json_best_effort())
    if mesh is not None:
        extra.update(devices=[d.id for d in mesh.devices.flat], mesh=dict(mesh.shape))
    return json.dumps({"fields": {k: cfg.get(k) for k in fields}, **extra}, sort_keys=True)


class ProgramCache:
    """Least-recently-used map key -> program, built on first use, and how many times its programs were traced."""

    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"ProgramCache size must be a positive int, got {size!r}")
        self.size = size
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._traces = 0

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The program stored under `key`, or `build()`'s result, stored (evicting the least recently used)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        program = build()
        self._entries[key] = program
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return program

    def note_trace(self) -> None:
        """Called from inside a program's traced body: each trace is one compilation."""
        self._traces += 1

    def trace_count(self, reset: bool = False) -> int:
        """How many times this cache's programs were traced (since the last reset)."""
        n = self._traces
        if reset:
            self._traces = 0
        return n

    def clear(self) -> None:
        """Drops every program (their compilations go with them once unreferenced) and the trace count."""
        self._entries.clear()
        self._traces = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
