"""benchmarks/accelerator.sh --dry-run: the one-shot accelerator benchmark runs end to end on CPU with the tiny
model, so the script cannot rot between the rare runs on a lent accelerator."""

import json
import math
import os
import pathlib
import subprocess
import sys

from conftest import TEST_XLA_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_accelerator_dry_run():
    # The 8-minute cap is for an accelerator; a shared CI CPU may compile slower.
    env = dict(os.environ, PYTHON=sys.executable, ACCELERATOR_TIMEOUT_S="880")
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # one real CPU device, as on a single accelerator
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "accelerator.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}: {proc.stdout[:500]}"
    out = json.loads(lines[0])
    assert out["dry_run"] is True
    assert [r["global_batch"] for r in out["train"]] == [2]
    for r in out["train"]:
        assert 0 < r["mfu"] < 2 and r["peak_flops_per_s_per_device"] > 0 and r["img_per_s"] > 0
    assert out["attention"]["implementation"] == "xla"  # CPU: cuDNN is not tried
    assert set(out["memory"]) >= {"peak_bytes_in_use"}
    names = [r["name"] for r in out["sampler"]]
    assert names == ["dopri5 rtol 1e-3 atol 1e-6", "euler 16 steps"]
    assert out["sampler"][1]["nfe"] == 16 and out["sampler"][0]["nfe"] > 0
    assert all(r["img_per_s"] > 0 for r in out["sampler"])
    # bf16 (8-bit mantissa) against fp32 on the golden model: a real difference, of the order of bf16's resolution.
    d = out["bf16_vs_fp32"]
    assert math.isfinite(d["max_rel_diff"]) and 0 < d["max_rel_diff"] < 0.1
