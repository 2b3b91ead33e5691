"""The asynchronous (semantic-first) time schedule — the one place τ maps to (t_tex, t_sem) and to phase masks.

One global time τ ∈ [0, 1 + Δt] drives both parts of the composite latent (docs/diffusion.md#phase-rule):

    t_sem = min(τ, 1)          t_tex = max(τ − Δt, 0)

Sampling integrates dx/dτ over three phases whose boundaries are Δt and 1:

    Phase I   τ ∈ [0, Δt)        semantics move, texture frozen   (t_tex = 0)
    Phase II  τ ∈ [Δt, 1)        both move
    Phase III τ ∈ [1, 1 + Δt]    texture moves, semantics frozen  (t_sem = 1)

Δt = 0 collapses phases I and III to empty intervals: synchronous joint denoising. Training draws τ = (1 + Δt)·t
with t logit-normal (default) or uniform. Training (`losses.py`) and sampling (`sampler.py`) both import from here.
"""

from __future__ import annotations

import fractions
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TIME_DISTS = ("lognorm", "uniform")


def check_delta_t(delta_t) -> float:
    """Validates Δt and returns it as a Python float (Δt must be static: it fixes the phase structure)."""
    try:
        value = float(delta_t)
    except TypeError as e:
        raise TypeError(f"delta_t must be a Python number (it fixes the phase structure), got {type(delta_t)}") from e
    if not 0.0 <= value < 1.0:
        raise ValueError(f"delta_t must lie in [0, 1) (0 = synchronous diffusion), got {delta_t!r}")
    return value


def tau_end(delta_t) -> float:
    """End of the sampling interval, 1 + Δt."""
    return 1.0 + check_delta_t(delta_t)


def times_from_tau(tau, delta_t) -> tuple[jax.Array, jax.Array]:
    """(t_tex, t_sem) = (max(τ − Δt, 0), min(τ, 1)), in τ's float dtype (float32 gives the reference's rounding)."""
    delta_t = check_delta_t(delta_t)
    tau = jnp.asarray(tau)
    if not jnp.issubdtype(tau.dtype, jnp.floating):
        tau = tau.astype(jnp.float32)
    t_tex = jnp.maximum(tau - jnp.asarray(delta_t, tau.dtype), jnp.zeros((), tau.dtype))
    t_sem = jnp.minimum(tau, jnp.ones((), tau.dtype))
    return t_tex, t_sem


def sample_t(key, batch: int, dist: str = "lognorm", n=None) -> jax.Array:
    """Per-sample base time t ∈ (0, 1), float32.

    dist='lognorm': t = sigmoid(n), n ~ N(0, 1). dist='uniform': t ~ U[0, 1).
    `n` injects the base draw instead of using `key` (the normal sample for 'lognorm', the uniform sample itself
    for 'uniform'). A concrete float64 NumPy `n` is pushed through the sigmoid in float64 and then rounded, which is
    how the reference computes it (scipy draw → float64 sigmoid → float32); a float32 sigmoid can be 1 ulp off.
    """
    if dist not in TIME_DISTS:
        raise ValueError(f"time distribution must be one of {TIME_DISTS}, got {dist!r}")
    if n is None:
        if key is None:
            raise ValueError("sample_t needs a PRNG key when no draw `n` is injected")
        if dist == "lognorm":
            n = jax.random.normal(key, (batch,), jnp.float32)
        else:
            return jax.random.uniform(key, (batch,), jnp.float32)
    if np.shape(n) != (batch,):
        raise ValueError(f"injected draw n must have shape ({batch},), got {np.shape(n)}")
    if dist == "uniform":
        return jnp.asarray(n, jnp.float32)
    if isinstance(n, np.ndarray) and n.dtype == np.float64:
        return jnp.asarray((1.0 / (1.0 + np.exp(-n))).astype(np.float32))
    return jax.nn.sigmoid(jnp.asarray(n, jnp.float32))


def sample_tau(key, batch: int, delta_t, dist: str = "lognorm", n=None) -> jax.Array:
    """Training draw of the global time τ = (1 + Δt)·t over [0, 1 + Δt], float32 (B,). See `sample_t`."""
    delta_t = check_delta_t(delta_t)
    t = sample_t(key, batch, dist, n)
    return t * jnp.float32(1.0 + delta_t)


# ---------------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------------
class Phase(NamedTuple):
    """One sampling phase [start, end): which parts move there."""

    start: float
    end: float
    tex_moves: bool
    sem_moves: bool


def phases(delta_t) -> tuple[Phase, ...]:
    """The non-empty phases in order. Δt = 0 gives the single synchronous phase [0, 1]."""
    delta_t = check_delta_t(delta_t)
    all_phases = (
        Phase(0.0, delta_t, False, True),
        Phase(delta_t, 1.0, True, True),
        Phase(1.0, 1.0 + delta_t, True, False),
    )
    return tuple(p for p in all_phases if p.end > p.start)


def phase_boundaries(delta_t) -> tuple[float, ...]:
    """Interior switch points of the masked field (where it has kinks): the `jump_ts` of an adaptive solve."""
    delta_t = check_delta_t(delta_t)
    return tuple(b for b in (delta_t, 1.0) if 0.0 < b < 1.0 + delta_t)


def phase_masks(tau, delta_t) -> tuple[jax.Array, jax.Array]:
    """(tex_moves, sem_moves) as {0, 1} arrays in τ's dtype: texture moves for τ ≥ Δt, semantics for τ < 1
    (for Δt = 0, where phase III is empty and τ ends at 1, the semantics move everywhere).

    Comparisons happen in τ's dtype, so with float32 τ a step that diffrax clips to `prevbefore(Δt)` still belongs
    to phase I. (The reference tests the semantic mask as τ ≤ 1; that differs only at the single point τ = 1.)
    """
    delta_t = check_delta_t(delta_t)
    tau = jnp.asarray(tau)
    if not jnp.issubdtype(tau.dtype, jnp.floating):
        tau = tau.astype(jnp.float32)
    tex = (tau >= jnp.asarray(delta_t, tau.dtype)).astype(tau.dtype)
    if delta_t == 0.0:
        # No phase III: the semantics move on the whole closed interval [0, 1], including a last stage at τ = 1.
        return tex, jnp.ones_like(tex)
    sem = (tau < jnp.ones((), tau.dtype)).astype(tau.dtype)
    return tex, sem


def channel_mask(tex_moves, sem_moves, num_channels: int, semantic_chans: int) -> jax.Array:
    """Broadcastable (..., C) mask from per-sample part masks (shape (B,) or ()): [tex]*C_tex + [sem]*C_sem."""
    tex_chans = check_channels(num_channels, semantic_chans)
    tex_moves = jnp.asarray(tex_moves)[..., None]
    sem_moves = jnp.asarray(sem_moves)[..., None]
    is_tex = jnp.arange(num_channels) < tex_chans
    return jnp.where(is_tex, tex_moves, sem_moves)


def check_channels(num_channels: int, semantic_chans: int) -> int:
    """Returns the texture channel count, checking the composite layout [texture | semantic].

    semantic_chans = 0 is a texture-only latent (the no-semantic-latent baseline; train it with Δt = 0).
    """
    if not 0 <= semantic_chans < num_channels:
        raise ValueError(
            f"composite latent has {num_channels} channels; semantic_chans must be in [0, {num_channels - 1}], "
            f"got {semantic_chans}"
        )
    return num_channels - semantic_chans


# ---------------------------------------------------------------------------------------------------------------
# Fixed grids (Euler / Heun)
# ---------------------------------------------------------------------------------------------------------------
def fixed_grid(num_points: int, delta_t) -> np.ndarray:
    """float32 grid τ_k = k·(1 + Δt)/(N − 1), k = 0..N−1 (rounded once from float64; ends exactly at float32(1+Δt))."""
    delta_t = check_delta_t(delta_t)
    num_points = _check_num_points(num_points)
    k = np.arange(num_points, dtype=np.float64)
    grid = k * (1.0 + delta_t) / (num_points - 1)
    grid[-1] = 1.0 + delta_t
    return grid.astype(np.float32)


def grid_phase_masks(num_points: int, delta_t) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (tex_moves, sem_moves), bool (N − 1,), decided on the EXACT grid value of each step's start.

    Step k starts at τ_k = k·(1 + Δt)/(N − 1). Δt is read as the decimal the user wrote (its shortest repr), and
    the comparisons τ_k ≥ Δt and τ_k < 1 are done in rational arithmetic, so a float32 grid point such as
    0.29999998 for 0.3 cannot move a step into the wrong phase (docs/diffusion.md#exact-grid-euler-rule).
    """
    delta_t = check_delta_t(delta_t)
    num_points = _check_num_points(num_points)
    d = fractions.Fraction(repr(delta_t))
    steps = num_points - 1
    tex, sem = [], []
    for k in range(steps):
        tau_k = fractions.Fraction(k) * (1 + d) / steps
        tex.append(tau_k >= d)
        sem.append(tau_k < 1)
    return np.asarray(tex, bool), np.asarray(sem, bool)


def _check_num_points(num_points) -> int:
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 2:
        raise ValueError(f"a fixed grid needs an integer number of grid points >= 2, got {num_points!r}")
    return int(num_points)
