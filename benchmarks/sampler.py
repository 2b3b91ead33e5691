"""Sampler cost and accuracy: NFE, wall time and img/s of the three-phase ODE solvers; prints one JSON object.

    python benchmarks/sampler.py                              # the golden tiny DiT (dit.npz), errors vs final_exact
    python benchmarks/sampler.py --quick                      # fewer configurations
    python benchmarks/sampler.py --checkpoint 0400000.pt --guide 0070000.pt --batch 64
    python benchmarks/sampler.py --size b --batch 32          # random weights (timing only)

Rows: Dopri5 at rtol 1e-3 / atol 1e-6 with batch vs per-sample step control and phase_mode jump / split / none
(none = straight through the switches, as the reference), a tolerance sweep for the phase-aware modes, CFG and
AutoGuidance, and fixed-grid Euler / Heun. `err_max` / `err_rel_rms` compare with `final_exact` of dopri5.npz
for the golden model, otherwise with a tight (rtol 1e-7, atol 1e-9) per-sample split solve computed here.
Wall times exclude compilation (reported separately as `compile_s`); they are medians over --repeats calls.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sfd_jax.convert.dit import load_dit  # noqa: E402
from sfd_jax.diffusion.sampler import CFG, AutoGuidance, sample  # noqa: E402
from sfd_jax.models.lightningdit import DiTConfig  # noqa: E402
from common import golden_dit_state_dicts, random_dit  # noqa: E402

OFFICIAL = REPO / "tests" / "golden" / "official"


def _golden():
    main_sd, guide_sd = golden_dit_state_dicts()
    _, main = load_dit(main_sd)
    _, guide = load_dit(guide_sd)
    ref = dict(np.load(OFFICIAL / "dopri5.npz"))
    nhwc = lambda a: np.moveaxis(a, 1, -1)
    return main, guide, nhwc(ref["z0"]), ref["y"], nhwc(ref["final_exact"]), int(ref["nfe_dopri5"])


def _random_model(size: str, dtype: str, seed: int):
    cfg = DiTConfig.from_size(size, dtype=dtype)
    return random_dit(cfg, seed), cfg  # perturbed: zero-initialised adaLN / final layers would make the field 0


def _errors(x, exact):
    d = np.asarray(x, np.float64) - exact
    return float(np.abs(d).max()), float(np.sqrt(np.mean(d**2)) / np.sqrt(np.mean(exact**2)))


def _run(name, model, z0, y, exact, repeats, **kw):
    t = time.perf_counter()
    x, stats = sample(model, z0, y, **kw)
    jax.block_until_ready(x)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x, stats = sample(model, z0, y, **kw)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t)
    wall = statistics.median(times)
    err_max, err_rel = _errors(x, exact)
    g = kw.get("guidance")
    row = {
        "name": name,
        "solver": kw.get("solver", "dopri5"),
        "step_control": kw.get("step_control", "per_sample"),
        "phase_mode": kw.get("phase_mode", "jump"),
        "rtol": kw.get("rtol", 1e-3),
        "atol": kw.get("atol", 1e-6),
        "num_steps": kw.get("num_steps"),
        "guidance": None if g is None else type(g).__name__,
        "nfe": stats["nfe"],
        "nfe_per_sample_max": int(stats["nfe_per_sample"].max()),
        "rejected_steps_max": int(stats["num_rejected_steps"].max()),
        "err_max": err_max,
        "err_rel_rms": err_rel,
        "compile_s": round(max(first - wall, 0.0), 3),
        "wall_s": round(wall, 4),
        "img_per_s": round(z0.shape[0] / wall, 2),
    }
    print(f"{name:<40s} nfe {row['nfe']:4d}  err {err_max:.2e}  {row['wall_s']:.3f}s", file=sys.stderr)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="reference .pt checkpoint (EMA weights); default: the golden tiny DiT")
    p.add_argument("--guide", help="guide checkpoint for AutoGuidance (default: golden guide / random 'b')")
    p.add_argument("--size", help="random-weight DiT size instead (tiny, b, l, xl, xxl)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=None, help="batch size (golden: 4, from dopri5.npz)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="only the rtol 1e-3 comparison and Euler-100")
    args = p.parse_args(argv)

    if args.checkpoint or args.size:
        if args.checkpoint:
            _, model = load_dit(args.checkpoint)
            cfg = model.cfg
        else:
            model, cfg = _random_model(args.size, args.dtype, 0)
        guide = (
            load_dit(args.guide)[1]
            if args.guide
            else _random_model("tiny" if args.size == "tiny" else "b", args.dtype, 1)[0]
        )
        batch = args.batch or 8
        z0 = np.asarray(
            jax.random.normal(jax.random.key(0), (batch, cfg.input_size, cfg.input_size, cfg.in_channels)), np.float32
        )
        y = (np.arange(batch) * 37 % cfg.num_classes).astype(np.int32)
        exact = np.asarray(
            sample(model, z0, y, rtol=1e-7, atol=1e-9, phase_mode="split", max_steps=100_000)[0], np.float64
        )
        reference = {"exact": "per-sample split solve, rtol 1e-7 / atol 1e-9", "nfe_reference_dopri5": None}
        model_name = args.checkpoint or f"random {args.size}"
    else:
        model, guide, z0, y, exact, ref_nfe = _golden()
        if args.batch:
            reps = -(-args.batch // z0.shape[0])
            z0, y, exact = (np.concatenate([a] * reps)[: args.batch] for a in (z0, y, exact))
        reference = {
            "exact": "dopri5.npz final_exact (rtol 1e-7)",
            "nfe_reference_dopri5": ref_nfe,
            "err_max_reference_dopri5": 0.1598,
        }
        model_name = "golden tiny DiT (dit.npz)"

    r = args.repeats
    rows = []
    for step_control in ("batch", "per_sample"):
        for phase_mode in ("jump", "split", "none"):
            rows.append(
                _run(
                    f"dopri5 {step_control} {phase_mode}",
                    model,
                    z0,
                    y,
                    exact,
                    r,
                    step_control=step_control,
                    phase_mode=phase_mode,
                )
            )
    if not args.quick:
        for phase_mode in ("jump", "split"):
            for rtol, atol in ((1e-4, 1e-7), (1e-5, 1e-8)):
                rows.append(
                    _run(
                        f"dopri5 per_sample {phase_mode} rtol {rtol:g}",
                        model,
                        z0,
                        y,
                        exact,
                        r,
                        phase_mode=phase_mode,
                        rtol=rtol,
                        atol=atol,
                    )
                )
        for dt0 in (0.002, 0.05):
            rows.append(_run(f"dopri5 per_sample jump dt0 {dt0:g}", model, z0, y, exact, r, dt0=dt0))
        rows.append(_run("dopri5 per_sample jump PID(0.4,0.3,0)", model, z0, y, exact, r, pid=(0.4, 0.3, 0.0)))
    # Guided rows: the error column compares with the unguided exact solution, so it is not an accuracy figure.
    rows.append(_run("dopri5 per_sample jump CFG 1.5", model, z0, y, exact, r, guidance=CFG(1.5)))
    rows.append(
        _run("dopri5 per_sample jump AutoGuidance 1.5", model, z0, y, exact, r, guidance=AutoGuidance(guide, 1.5))
    )
    for n in (99,) if args.quick else (11, 49, 99):
        rows.append(_run(f"euler {n + 1} grid points", model, z0, y, exact, r, solver="euler", num_steps=n))
    if not args.quick:
        # With Δt = 0.3, num_steps a multiple of 13 puts both switches on the grid (no step straddles a kink).
        rows.append(_run("euler 53 grid points (switch-aligned)", model, z0, y, exact, r, solver="euler", num_steps=52))
        rows.append(_run("heun 50 grid points", model, z0, y, exact, r, solver="heun", num_steps=49))
        rows.append(_run("heun 27 grid points (switch-aligned)", model, z0, y, exact, r, solver="heun", num_steps=26))
        rows.append(
            _run(
                "euler 100 grid points CFG 1.5", model, z0, y, exact, r, solver="euler", num_steps=99, guidance=CFG(1.5)
            )
        )

    out = {
        "benchmark": "sampler",
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "model": model_name,
        "batch": int(z0.shape[0]),
        "repeats": r,
        "reference": reference,
        "note": "guided rows: err_* is the distance to the UNGUIDED exact solution (cost figures only)",
        "runs": rows,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
