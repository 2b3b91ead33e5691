"""One training run per workdir: `<workdir>/train.lock`, held by process 0 from start to exit.

Two runs on one workdir would interleave their metrics and race on checkpoint renames, so a second run is
refused with the holder's host, pid and start time. A run killed with -9 (or a crashed host) cannot remove its
lock, and such a lock must not block the resume. It is recognised as stale:
- same host: the pid is not running, or is running but started at another time (a reused pid);
- another host (shared filesystem): its heartbeat, rewritten every `HEARTBEAT_S` by a thread of the holder, is
  older than `STALE_S`.
A stale lock is replaced with a warning. Remote workdirs (gs://...) have no atomic create; the check is then
best-effort (the same rules, without the exclusive create).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from etils import epath

from sfd_jax import paths

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid apart; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"host {holder.get('host')!r}, pid {holder.get('pid')}, started {started}"


def is_stale(holder: dict, *, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return True
        start = _process_start(pid)
        return start is not None and holder.get("pid_start") not in (None, start)
    return now - float(holder.get("heartbeat", 0)) > STALE_S


class WorkdirLock:
    """Context manager; `enabled=False` (processes other than 0) makes it a no-op."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict = {}

    def __enter__(self):
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": now,
            "heartbeat": now,
        }
        for _ in range(3):
            if self._create():
                break
            holder = self._read()
            if holder is not None and not is_stale(holder):
                raise WorkdirLocked(
                    f"workdir {self.path.parent} is in use by another run ({_describe(holder)}; lock "
                    f"{self.path}). Stop that run first; if it is gone, delete the lock file."
                )
            log.warning("replacing the stale lock %s (%s)", self.path, _describe(holder) if holder else "unreadable")
            self._remove_stale()
        else:
            raise WorkdirLocked(f"could not take the lock {self.path}: other runs keep taking it")
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        text = json.dumps(self._record)
        if "://" in os.fspath(self.path):
            if self.path.exists():
                return False
            self.path.write_text(text)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _remove_stale(self) -> None:
        # Renaming first means two runs replacing the same stale lock cannot both win: only one rename succeeds,
        # and the exclusive create decides between them afterwards.
        aside = self.path.parent / f"{LOCK_NAME}.stale-{os.getpid()}"
        try:
            self.path.rename(aside)
            aside.unlink()
        except OSError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._read()
            if holder is None or holder.get("pid") != self._record["pid"] or holder.get("host") != self._record["host"]:
                return  # the lock was taken from us (deleted by hand); never overwrite another run's lock
            self._record["heartbeat"] = time.time()
            try:  # replaces the file whole (epath's rename refuses an existing destination)
                paths.write_atomic(os.fspath(self.path), json.dumps(self._record))
            except OSError as e:
                log.warning("cannot refresh the workdir lock %s: %s", self.path, e)

    def __exit__(self, *exc):
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if (
            holder is not None
            and holder.get("pid") == self._record["pid"]
            and holder.get("host") == self._record["host"]
        ):
            try:
                self.path.unlink()
            except OSError:
                pass
