"""Three-phase asynchronous ODE sampler (docs/diffusion.md#sampling): adaptive Dopri5 (diffrax), fixed-grid Euler and
Heun.

    x, stats = sample(model, z0, y)                                   # Dopri5, rtol 1e-3 / atol 1e-6, Δt = 0.3
    x, stats = sample(model, z0, y, solver="euler", num_steps=99)     # the reference's 100 grid points
    x, stats = sample(model, z0, y, guidance=AutoGuidance(guide, 1.5))

dx/dτ = mask(τ)·v̂(x, t_tex = max(τ − Δt, 0), t_sem = min(τ, 1)) from τ = 0 to 1 + Δt, x(0) = z0 on all channels;
texture frozen for τ < Δt, semantics frozen for τ ≥ 1. `x` is the whole composite latent at τ = 1 + Δt (texture
channels first); the caller keeps the texture part for decoding.

The masked field jumps at τ = Δt and τ = 1. `phase_mode` says how an adaptive solve handles that:
  'split' — one solve per phase with that phase's smooth field, integrating only the channels that move (default):
            each phase restarts its step size from `dt0` and its error norm covers only the moving channels;
  'jump'  — one diffrax solve with `jump_ts=[Δt, 1]`: no step straddles a switch, but the step size carries over
            the switch and frozen channels dilute the RMS error norm (docs/diffusion.md: why this is not default);
  'none'  — straight through the switches, as the reference (for comparison only).
`step_control`: 'per_sample' vmaps each image's own solve (own step sizes and error norm), so an image does not
depend on the batch it is in; 'batch' uses one RMS error norm over the whole batch tensor, as the reference.

`model` is an nnx.Module (split once into graphdef + state, so the jitted sampler is reused across calls) or any
callable (x, t_tex, t_sem, y) -> velocity (then the callable itself is the cache key). One compilation per
(shapes, static settings); guidance scales and interval are traced values, so a scale sweep does not recompile.
Inputs may be sharded over a mesh along the batch axis.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax.programs import ProgramCache
from sfd_jax.diffusion import schedule
from sfd_jax.diffusion.guidance import CFG, AutoGuidance, check_guidance, guided_velocity

__all__ = ["sample", "CFG", "AutoGuidance", "SOLVERS", "STEP_CONTROLS", "PHASE_MODES", "trace_count"]

SOLVERS = ("dopri5", "euler", "heun")
STEP_CONTROLS = ("per_sample", "batch")
PHASE_MODES = ("jump", "split", "none")
_DOPRI5_NEW_STAGES = 6  # 7 stages, FSAL: the first stage reuses the previous step's last one


@jax.custom_batching.custom_vmap
def _any_lane(flag):
    """`flag` outside vmap; under vmap, whether any lane's flag is set, as one unbatched value.

    diffrax evaluates Dopri5's first stage (a `lax.cond`) when any lane of a vmapped solve needs it, so the batched
    forward runs for all lanes at once; counting it needs the same reduction over the batch.
    """
    return flag


@_any_lane.def_vmap
def _any_lane_vmap(axis_size, in_batched, flag):
    (batched,) = in_batched
    return (jnp.any(flag, axis=0) if batched else flag), False


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one sampler compilation (the guidance scales and Dopri5's rtol/atol are traced
    inputs instead: a sweep over them reuses one program)."""

    solver: str
    num_steps: int | None
    delta_t: float
    step_control: str
    phase_mode: str
    semantic_chans: int
    max_steps: int
    pid: tuple[float, float, float]
    dt0: float
    guidance_kind: str  # 'none' | 'cfg' | 'autoguidance'
    null_label: int
    has_interval: bool
    return_trajectory: bool


_PROGRAMS = ProgramCache(size=32)


def trace_count(reset: bool = False) -> int:
    """How many times a sampler program was traced (each trace = one compilation)."""
    return _PROGRAMS.trace_count(reset)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------------
def sample(
    model,
    z0,
    y,
    *,
    solver: str = "dopri5",
    num_steps: int | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    delta_t: float = 0.3,
    guidance=None,
    step_control: str = "per_sample",
    phase_mode: str = "split",
    semantic_chans: int = 16,
    max_steps: int = 4096,
    on_max_steps: str = "raise",
    pid: tuple[float, float, float] = (0.0, 1.0, 0.0),
    dt0: float = 0.05,
    return_trajectory: bool = False,
):
    """Integrates the three-phase ODE from noise z0 (B, H, W, C) with labels y (B,); returns (x_final, stats).

    num_steps: fixed-grid steps for 'euler' / 'heun' (the reference's `num_sampling_steps` N grid points are
    N − 1 steps). pid: diffrax PIDController (pcoeff, icoeff, dcoeff); (0, 1, 0) is the classic I controller.
    dt0: Dopri5's first step (in τ; each phase solve of phase_mode='split' starts with it too).
    on_max_steps: 'raise' | 'warn' when an adaptive solve hits `max_steps` (its result would be truncated).

    stats: nfe (velocity evaluations on the batch — with CFG each is one doubled-batch forward, with AutoGuidance
    one main + one guide forward), nfe_per_sample (B,) (what each image's own solve needed), num_steps /
    num_accepted_steps / num_rejected_steps (B,), max_steps_reached (B,) bool, and 'trajectory' (N, B, H, W, C)
    for fixed-grid solvers with return_trajectory=True. Called under an outer jit the stats stay traced arrays and
    the max_steps check is left to the caller.
    """
    plan = _make_plan(
        solver,
        num_steps,
        rtol,
        atol,
        delta_t,
        guidance,
        step_control,
        phase_mode,
        semantic_chans,
        max_steps,
        pid,
        dt0,
        return_trajectory,
    )
    if on_max_steps not in ("raise", "warn"):
        raise ValueError(f"on_max_steps must be 'raise' or 'warn', got {on_max_steps!r}")
    z0 = jnp.asarray(z0)
    y = jnp.asarray(y)
    if z0.ndim != 4 or not jnp.issubdtype(z0.dtype, jnp.floating):
        raise ValueError(f"z0 must be a float (B, H, W, C) channels-last latent, got {z0.dtype} {z0.shape}")
    schedule.check_channels(z0.shape[-1], semantic_chans)
    if y.shape != (z0.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be integer labels of shape ({z0.shape[0]},), got {y.dtype} {y.shape}")

    main_static, main_state = _split(model, "model")
    guide_static, guide_state = (
        _split(guidance.guide_model, "AutoGuidance.guide_model") if isinstance(guidance, AutoGuidance) else (None, None)
    )
    gparams = jnp.concatenate([_guidance_params(guidance), jnp.asarray([rtol, atol], jnp.float32)])
    key = (plan, main_static, guide_static)
    fn = _PROGRAMS.get(key, lambda: jax.jit(_build(plan, main_static, guide_static)))
    x_final, stats = fn(main_state, guide_state, gparams, z0.astype(jnp.float32), y.astype(jnp.int32))
    if isinstance(x_final, jax.core.Tracer):
        return x_final, stats
    return x_final, _host_stats(stats, plan, (rtol, atol), on_max_steps)


def _make_plan(
    solver,
    num_steps,
    rtol,
    atol,
    delta_t,
    guidance,
    step_control,
    phase_mode,
    semantic_chans,
    max_steps,
    pid,
    dt0,
    return_trajectory,
) -> _Plan:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if step_control not in STEP_CONTROLS:
        raise ValueError(f"step_control must be one of {STEP_CONTROLS}, got {step_control!r}")
    if phase_mode not in PHASE_MODES:
        raise ValueError(f"phase_mode must be one of {PHASE_MODES}, got {phase_mode!r}")
    delta_t = schedule.check_delta_t(delta_t)
    check_guidance(guidance)
    if solver == "dopri5":
        if num_steps is not None:
            raise ValueError(
                "num_steps applies to the fixed-grid solvers ('euler', 'heun'); dopri5 picks its "
                "steps from rtol/atol (the reference's num_steps only sets output points)"
            )
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"dopri5 needs rtol > 0 and atol > 0, got rtol={rtol}, atol={atol}")
        if return_trajectory:
            raise ValueError("return_trajectory is only available for the fixed-grid solvers")
    elif isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(
            f"solver {solver!r} needs num_steps, a positive int (grid points = num_steps + 1), got {num_steps!r}"
        )
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if not dt0 > 0:
        raise ValueError(f"dt0 (Dopri5's first step) must be > 0, got {dt0!r}")
    if len(pid) != 3:
        raise ValueError(f"pid must be (pcoeff, icoeff, dcoeff), got {pid!r}")
    kind = "none" if guidance is None else "cfg" if isinstance(guidance, CFG) else "autoguidance"
    return _Plan(
        solver=solver,
        num_steps=None if num_steps is None else int(num_steps),
        delta_t=delta_t,
        step_control=step_control,
        phase_mode=phase_mode,
        semantic_chans=int(semantic_chans),
        max_steps=max_steps,
        pid=tuple(float(p) for p in pid),
        dt0=float(dt0),
        guidance_kind=kind,
        null_label=int(guidance.null_label) if kind == "cfg" else 0,
        has_interval=guidance is not None and guidance.interval_start is not None,
        return_trajectory=bool(return_trajectory),
    )


def _split(model, what: str):
    """nnx.Module -> (('nnx', graphdef), state); other callables -> (('fn', callable), None)."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return ("nnx", graphdef), state
    if callable(model):
        return ("fn", model), None
    raise TypeError(
        f"{what} must be an nnx.Module or a callable (x, t_tex, t_sem, y) -> velocity, got {type(model).__name__}"
    )


def _bind(static, state) -> Callable:
    if static is None:
        return None
    kind, obj = static
    if kind == "fn":
        return obj
    return lambda x, t_tex, t_sem, y: nnx.merge(obj, state)(x, t_tex, t_sem, y)


def _guidance_params(guidance) -> jax.Array:
    """(w_tex, w_sem, interval_start) as a traced float32 vector."""
    if guidance is None:
        return jnp.zeros((3,), jnp.float32)
    w_tex, w_sem = guidance.scales()
    start = -math.inf if guidance.interval_start is None else float(guidance.interval_start)
    return jnp.asarray([w_tex, w_sem, start], jnp.float32)


def _host_stats(stats: dict, plan: _Plan, tolerances: tuple[float, float], on_max_steps: str) -> dict:
    out = {k: (v if k == "trajectory" else np.asarray(v)) for k, v in stats.items()}
    out["nfe"] = int(out["nfe"])
    hit = out["max_steps_reached"]
    if hit.any():
        msg = (
            f"dopri5 hit max_steps={plan.max_steps} for samples {np.flatnonzero(hit).tolist()} "
            f"(rtol={tolerances[0]}, atol={tolerances[1]}); their results are truncated. Raise max_steps or loosen the "
            "tolerances."
        )
        if on_max_steps == "raise":
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The traced program
# ---------------------------------------------------------------------------------------------------------------
def _build(plan: _Plan, main_static, guide_static) -> Callable:
    def program(main_state, guide_state, gparams, z0, y):
        """gparams: (w_tex, w_sem, interval start, rtol, atol), float32."""
        _PROGRAMS.note_trace()
        main_fn = _bind(main_static, main_state)
        guide_fn = _bind(guide_static, guide_state)
        if plan.guidance_kind == "cfg":
            gobj = CFG(scale=0.0, null_label=plan.null_label)
        elif plan.guidance_kind == "autoguidance":
            gobj = AutoGuidance(guide_model=guide_fn, scale=0.0)
        else:
            gobj = None
        start = gparams[2] if plan.has_interval else None

        def velocity(x, tau, labels):
            """Unmasked guided velocity for x (b, H, W, C) at one global time τ (scalar)."""
            tau_b = jnp.full((x.shape[0],), tau, jnp.float32)
            t_tex, t_sem = schedule.times_from_tau(tau_b, plan.delta_t)
            return guided_velocity(
                gobj,
                main_fn,
                x,
                t_tex,
                t_sem,
                labels,
                guide_fn=guide_fn,
                semantic_chans=plan.semantic_chans,
                scale_tex=gparams[0],
                scale_sem=gparams[1],
                interval_start=start,
            )

        if plan.solver != "dopri5":
            return _fixed_grid(plan, velocity, z0, y)
        tol = (gparams[3], gparams[4])
        if plan.step_control == "batch":
            x, counts = _adaptive(plan, tol, velocity, z0, y)
            return x, _stats_from_counts(counts, z0.shape[0], batched=False)

        def one_sample(z, label):
            x, counts = _adaptive(plan, tol, velocity, z[None], label[None])
            return x[0], counts

        x, counts = jax.vmap(one_sample)(z0, y)
        return x, _stats_from_counts(counts, z0.shape[0], batched=True)

    return program


def _stats_from_counts(counts: list[dict], batch: int, batched: bool) -> dict:
    """Sums per-phase solver counts; 'nfe' counts batched forwards (max over lanes per phase under vmap)."""
    total = lambda k: sum(c[k] for c in counts)
    per_sample = {
        k: jnp.broadcast_to(total(k), (batch,))
        for k in ("nfe", "num_steps", "num_accepted_steps", "num_rejected_steps")
    }
    hit = jnp.broadcast_to(sum(c["max_steps_reached"].astype(jnp.int32) for c in counts) > 0, (batch,))
    calls = sum((jnp.max(c["calls"]) if batched else c["calls"]) for c in counts)
    return {
        "nfe": calls,
        "nfe_per_sample": per_sample["nfe"],
        "num_steps": per_sample["num_steps"],
        "num_accepted_steps": per_sample["num_accepted_steps"],
        "num_rejected_steps": per_sample["num_rejected_steps"],
        "max_steps_reached": hit,
    }


# ---------------------------------------------------------------------------------------------------------------
# Fixed grids
# ---------------------------------------------------------------------------------------------------------------
def _fixed_grid(plan: _Plan, velocity: Callable, z0, y):
    """Euler / Heun on τ_k = k·(1 + Δt)/N_steps; step k uses the phase of its start τ_k (exact-grid decision)."""
    n_points = plan.num_steps + 1
    grid = schedule.fixed_grid(n_points, plan.delta_t)
    tex_moves, sem_moves = schedule.grid_phase_masks(n_points, plan.delta_t)
    num_channels = z0.shape[-1]
    xs = (
        jnp.asarray(grid[:-1]),
        jnp.asarray(grid[1:]),
        jnp.asarray(tex_moves, jnp.float32),
        jnp.asarray(sem_moves, jnp.float32),
    )

    def step(x, inp):
        tau0, tau1, tex_m, sem_m = inp
        mask = schedule.channel_mask(tex_m, sem_m, num_channels, plan.semantic_chans)
        h = tau1 - tau0
        v0 = velocity(x, tau0, y) * mask
        if plan.solver == "euler":
            x_next = x + h * v0
        else:
            v1 = velocity(x + h * v0, tau1, y) * mask
            x_next = x + (0.5 * h) * (v0 + v1)
        return x_next, (x_next if plan.return_trajectory else None)

    x, traj = jax.lax.scan(step, z0, xs)
    batch = z0.shape[0]
    evals_per_step = 1 if plan.solver == "euler" else 2
    steps = jnp.full((batch,), plan.num_steps, jnp.int32)
    stats = {
        "nfe": jnp.asarray(evals_per_step * plan.num_steps, jnp.int32),
        "nfe_per_sample": evals_per_step * steps,
        "num_steps": steps,
        "num_accepted_steps": steps,
        "num_rejected_steps": jnp.zeros_like(steps),
        "max_steps_reached": jnp.zeros((batch,), bool),
    }
    if plan.return_trajectory:
        stats["trajectory"] = jnp.concatenate([z0[None], traj], axis=0)
    return x, stats


# ---------------------------------------------------------------------------------------------------------------
# Adaptive Dopri5
# ---------------------------------------------------------------------------------------------------------------
def _adaptive(plan: _Plan, tol, velocity: Callable, z0, y):
    """Dopri5 over [0, 1 + Δt] for the batch z0 (b, H, W, C) sharing one error norm; returns (x, [per-phase counts])."""
    num_channels = z0.shape[-1]
    tex_chans = num_channels - plan.semantic_chans
    tau_end = np.float32(1.0 + plan.delta_t)

    if plan.phase_mode in ("jump", "none"):

        def field(tau, x, args):
            tex_m, sem_m = schedule.phase_masks(tau, plan.delta_t)
            return velocity(x, tau, y) * schedule.channel_mask(tex_m, sem_m, num_channels, plan.semantic_chans)

        jump_ts = schedule.phase_boundaries(plan.delta_t) if plan.phase_mode == "jump" else ()
        x, counts = _dopri5(plan, tol, field, z0, np.float32(0.0), tau_end, jump_ts)
        return x, [counts]

    x = z0
    all_counts = []
    for phase in schedule.phases(plan.delta_t):
        lo = 0 if phase.sem_moves and phase.tex_moves else (tex_chans if phase.sem_moves else 0)
        hi = num_channels if phase.sem_moves else tex_chans
        if hi <= lo:  # a texture-only latent (semantic_chans = 0) has nothing to move in phase I
            continue

        def field(tau, part, args, x_frozen=x, lo=lo, hi=hi):
            full = jnp.concatenate([x_frozen[..., :lo], part, x_frozen[..., hi:]], axis=-1)
            return velocity(full, tau, y)[..., lo:hi]

        t0, t1 = np.float32(phase.start), np.float32(phase.end)
        part, counts = _dopri5(plan, tol, field, x[..., lo:hi], t0, t1, ())
        x = jnp.concatenate([x[..., :lo], part, x[..., hi:]], axis=-1)
        all_counts.append(counts)
    return x, all_counts


def _dopri5(plan: _Plan, tol, field: Callable, y0, t0, t1, jump_ts) -> tuple[jax.Array, dict]:
    pcoeff, icoeff, dcoeff = plan.pid
    controller = diffrax.PIDController(
        rtol=tol[0],
        atol=tol[1],
        pcoeff=pcoeff,
        icoeff=icoeff,
        dcoeff=dcoeff,
        jump_ts=list(jump_ts) if jump_ts else None,
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Dopri5(),
        t0=t0,
        t1=t1,
        dt0=np.float32(min(plan.dt0, float(t1 - t0))),
        y0=y0,
        stepsize_controller=_CountingController(controller),
        saveat=diffrax.SaveAt(t1=True, controller_state=True),
        max_steps=plan.max_steps,
        throw=False,
        adjoint=diffrax.ForwardMode(),
    )
    _, _, nfe, calls = sol.controller_state
    counts = {
        "nfe": nfe,
        "calls": calls,
        "num_steps": sol.stats["num_steps"],
        "num_accepted_steps": sol.stats["num_accepted_steps"],
        "num_rejected_steps": sol.stats["num_rejected_steps"],
        "max_steps_reached": sol.result == diffrax.RESULTS.max_steps_reached,
    }
    return sol.ys[0], counts


class _CountingController(diffrax.AbstractStepSizeController):
    """Wraps a step-size controller to count Dopri5's vector-field evaluations exactly.

    The controller state is the only solver state diffrax never rolls back on a rejected step, so the count lives
    here. Each attempt costs 6 new stages, plus the first stage when the FSAL value is invalid (the first step, or
    the step after a jump, until one is accepted) — the same condition diffrax uses. `calls` reduces that condition
    over the vmapped lanes as diffrax does, so under vmap it counts the batched forwards actually executed.
    """

    inner: diffrax.AbstractStepSizeController

    def wrap(self, direction):
        return _CountingController(self.inner.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        if dt0 is None:
            # diffrax's automatic first step would add evaluations this counter cannot see.
            raise ValueError("_CountingController needs an explicit dt0")
        t1, inner_state = self.inner.init(terms, t0, t1, y0, dt0, args, func, error_order)
        zero = jnp.zeros((), jnp.int32)
        return t1, (inner_state, jnp.asarray(True), zero, zero)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner_state, first_stage_pending, nfe, calls = controller_state
        keep, next_t0, next_t1, made_jump, inner_state, result = self.inner.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner_state
        )
        nfe = nfe + _DOPRI5_NEW_STAGES + first_stage_pending.astype(jnp.int32)
        calls = calls + _DOPRI5_NEW_STAGES + _any_lane(first_stage_pending).astype(jnp.int32)
        first_stage_pending = jnp.where(keep, jnp.asarray(made_jump), first_stage_pending)
        return keep, next_t0, next_t1, made_jump, (inner_state, first_stage_pending, nfe, calls), result
