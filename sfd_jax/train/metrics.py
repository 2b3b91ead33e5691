"""Training metrics: <workdir>/metrics.jsonl, TensorBoard events, the progress line, MFU.

Only process 0 writes. One JSON object per line: {"step": s, "loss": ..., "grad_norm": ..., "lr": ...,
"img_per_s": ..., "img_per_s_per_device": ..., "mfu": ..., "eta_s": ...}; evaluation results are their own lines
{"step": s, "eval/<name>": value}. Lines are appended (a gs:// workdir: bounded segments, see `MetricsWriter`). On
resume, lines with a step beyond the restored checkpoint (written by the interrupted run after its last save) are
dropped so that the record reads like one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Iterator, Mapping

import jax
from etils import epath

from sfd_jax import paths

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (vendor figures), keyed by a lower-case substring of `device.device_kind`.
# Order matters: more specific names first.
PEAK_FLOPS = (
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e
    ("v5e", 197e12),
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),  # SXM
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops_per_device(configured: float | None = None, device=None) -> float | None:
    """The configured figure, else the table entry for the device kind, else None (MFU not reported)."""
    if configured:
        return float(configured)
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


is_remote = paths.is_remote
SEGMENT_DIR = "metrics"
SEGMENT_LINES = 1000  # lines per metrics segment of a gs:// workdir: bounds what one log step rewrites


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    """Imports inside see torch as not installed, unless it is imported already.

    tensorboardX imports torch at import time whenever it is installed, only to accept torch tensors as values. A
    training process that never touches torch then spends ~2.6 s CPU and a few hundred MB on it (measured here with
    the CPU build of torch 2.13 beside, as `make test` installs it); the metrics are plain floats.
    """
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


class MetricsWriter:
    """metrics.jsonl + TensorBoard events under `workdir` (local or gs://), written by process 0 only.

    A local workdir gets one `metrics.jsonl`, appended to. Cloud Storage objects cannot be appended to, so a gs://
    workdir gets `metrics/000000.jsonl`, `metrics/000001.jsonl`, ... of at most SEGMENT_LINES lines each: a log step
    rewrites only the last segment (one atomic upload), never the whole history. `read_metrics` reads either form.
    On resume, lines with a step beyond the restored checkpoint are dropped once, here, so the record reads like one
    uninterrupted run: nothing lost, nothing logged twice.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._remote = paths.is_remote(workdir)
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.segments = epath.Path(workdir) / SEGMENT_DIR
        self._lines: list[str] = []  # the open segment (gs:// only)
        self._tb_local = None
        self._segment = 0
        self._tb = None
        if not self.enabled:
            return
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        if self._remote:
            self._resume_segments(resume_step)
        else:
            self._truncate_file(resume_step)
        self._tb_dir = os.fspath(epath.Path(workdir) / "tb")
        # tensorboardX's own gs:// writer re-uploads the whole event file at every flush: events of a gs:// workdir
        # go to a local file instead, uploaded (a new object per run segment) when the writer closes.
        self._tb_local = tempfile.mkdtemp(prefix="sfd_jax_tb_") if self._remote else None
        try:
            with _torch_hidden():
                from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self._tb_local or self._tb_dir)
        except Exception as e:  # noqa: BLE001 - e.g. gs:// without google-cloud-storage installed
            log.warning("TensorBoard events disabled (%s: %s); metrics.jsonl is still written", type(e).__name__, e)

    def _truncate_file(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        keep = _lines_up_to(lines, step)
        if keep != lines:
            paths.write_atomic(self.path, "".join(keep))

    def _resume_segments(self, step: int) -> None:
        # Steps only grow along the segments, so the segments left after dropping are a prefix of the old ones.
        for name in _segment_names(self.segments):
            lines = (self.segments / name).read_text().splitlines(keepends=True)
            keep = _lines_up_to(lines, step)
            if not keep:
                (self.segments / name).unlink()
            elif keep != lines:
                paths.write_atomic(self.segments / name, "".join(keep))
        left = _segment_names(self.segments)
        if left:
            self._segment = int(left[-1][: -len(".jsonl")])
            self._lines = (self.segments / left[-1]).read_text().splitlines(keepends=True)
            if len(self._lines) >= SEGMENT_LINES:
                self._segment, self._lines = self._segment + 1, []

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
            self.segments.mkdir(parents=True, exist_ok=True)
            paths.write_atomic(self.segments / f"{self._segment:06d}.jsonl", "".join(self._lines))
            if len(self._lines) >= SEGMENT_LINES:
                self._segment, self._lines = self._segment + 1, []
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._tb_local:
                for name in os.listdir(self._tb_local):
                    paths.upload(os.path.join(self._tb_local, name), paths.join(self._tb_dir, name))
                shutil.rmtree(self._tb_local, ignore_errors=True)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them readable
    return v


def _lines_up_to(lines: list[str], step: int) -> list[str]:
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
    return keep


def _segment_names(directory: epath.Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".jsonl") and p.name[:-6].isdigit())


def read_metrics(workdir: str) -> list[dict]:
    """Every logged line of a run, in order: metrics.jsonl (local workdir) or its segments (gs:// workdir)."""
    root = epath.Path(workdir)
    texts = [(root / SEGMENT_DIR / n).read_text() for n in _segment_names(root / SEGMENT_DIR)]
    if (root / "metrics.jsonl").exists():
        texts.insert(0, (root / "metrics.jsonl").read_text())
    return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
