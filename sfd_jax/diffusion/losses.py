"""The SFD training objective (docs/diffusion.md#the-objective): β-weighted velocity MSE + velocity cosine loss + REPA
alignment.

Per sample, with e = pred − u and u = x1 − x0 on all channels:

    L_mse  = (Σ_tex e² + β·Σ_sem e²) / (C·H·W)                 (not renormalised by the weights)
    L_cos  = mean_pixels(1 − cos(pred, u))                     (cosine across the C channels at each pixel)
    L_repa = λ·mean_tokens(1 − cos(proj, dino))                ('cos'; 'mse' and 'cos_mse' variants)
    total  = mean(L_mse) + mean(L_cos) + mean(L_repa)

Clamped parts (t_tex = 0 or t_sem = 1) are not masked, as in the reference. Arrays are channels-last: x1 is
(B, H, W, C) with texture channels first; dino and the projector output are (B, T, 768). Everything here is float32
whatever the model's compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from sfd_jax.diffusion import schedule
from sfd_jax.models.layers import cosine_similarity  # noqa: F401 (part of this module's API: tests, sampler)

REPA_MODES = ("cos", "mse", "cos_mse")
COSINE_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class LossConfig:
    delta_t: float = 0.3
    semantic_chans: int = 16
    semantic_weight: float = 2.0  # β on the semantic channels of the MSE
    use_cosine_loss: bool = True
    repa_weight: float = 1.0  # λ; 0 switches REPA off (the model's projector output is then ignored)
    repa_mode: str = "cos"  # 'cos' | 'mse' | 'cos_mse'
    time_dist: str = "lognorm"  # 'lognorm' | 'uniform'

    def __post_init__(self):
        schedule.check_delta_t(self.delta_t)
        if self.repa_mode not in REPA_MODES:
            raise ValueError(f"LossConfig.repa_mode must be one of {REPA_MODES}, got {self.repa_mode!r}")
        if self.time_dist not in schedule.TIME_DISTS:
            raise ValueError(f"LossConfig.time_dist must be one of {schedule.TIME_DISTS}, got {self.time_dist!r}")
        if self.repa_weight < 0 or self.semantic_weight < 0:
            raise ValueError(
                "LossConfig.repa_weight and semantic_weight must be >= 0, got "
                f"{self.repa_weight}, {self.semantic_weight}"
            )
        if self.semantic_chans < 0:
            raise ValueError(
                f"LossConfig.semantic_chans must be >= 0 (0: texture-only latent), got {self.semantic_chans}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Pure building blocks
# ---------------------------------------------------------------------------------------------------------------
def interpolate(x0, x1, t_tex, t_sem, semantic_chans: int) -> jax.Array:
    """x_t = t·x1 + (1 − t)·x0 per part: texture channels with t_tex, semantic channels with t_sem (per sample)."""
    x0 = jnp.asarray(x0, jnp.float32)
    x1 = jnp.asarray(x1, jnp.float32)
    if x0.shape != x1.shape:
        raise ValueError(f"noise x0 {x0.shape} and data x1 {x1.shape} must have the same shape")
    tex_chans = schedule.check_channels(x1.shape[-1], semantic_chans)
    expand = (slice(None),) + (None,) * (x1.ndim - 1)
    t_tex = jnp.asarray(t_tex, jnp.float32)[expand]
    t_sem = jnp.asarray(t_sem, jnp.float32)[expand]
    x_tex = t_tex * x1[..., :tex_chans] + (1.0 - t_tex) * x0[..., :tex_chans]
    x_sem = t_sem * x1[..., tex_chans:] + (1.0 - t_sem) * x0[..., tex_chans:]
    return jnp.concatenate([x_tex, x_sem], axis=-1)


def velocity_target(x0, x1) -> jax.Array:
    """u = dx_t/dt = x1 − x0 on all channels (the linear path; each part's own time does not change it)."""
    return jnp.asarray(x1, jnp.float32) - jnp.asarray(x0, jnp.float32)


def mse_loss(pred, target, semantic_chans: int, semantic_weight: float) -> jax.Array:
    """Per-sample (Σ_tex e² + β·Σ_sem e²) / (C·H·W), shape (B,)."""
    e = jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)
    tex_chans = schedule.check_channels(e.shape[-1], semantic_chans)
    axes = tuple(range(1, e.ndim))
    weights = jnp.where(jnp.arange(e.shape[-1]) < tex_chans, 1.0, semantic_weight).astype(jnp.float32)
    return jnp.sum(e * e * weights, axis=axes) / (e.size // e.shape[0])


def part_mse(pred, target, semantic_chans: int) -> tuple[jax.Array, jax.Array]:
    """Unweighted per-sample mean squared error of the texture and of the semantic channels (for logging)."""
    e = jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)
    tex_chans = schedule.check_channels(e.shape[-1], semantic_chans)
    axes = tuple(range(1, e.ndim))
    return jnp.mean(e[..., :tex_chans] ** 2, axis=axes), jnp.mean(e[..., tex_chans:] ** 2, axis=axes)


def cosine_loss(pred, target) -> jax.Array:
    """Per-sample mean over pixels of 1 − cos(pred, u), the cosine taken across all channels. Shape (B,)."""
    cos = cosine_similarity(pred, target, axis=-1)
    return jnp.mean(1.0 - cos, axis=tuple(range(1, cos.ndim)))


def repa_loss(proj, dino, mode: str = "cos") -> jax.Array:
    """Per-sample REPA alignment, unweighted, shape (B,): proj and dino are (B, T, F) token features.

    'cos': mean_tokens(1 − cos); 'mse': mean over tokens and features of (proj − dino)²; 'cos_mse': their average.
    """
    if mode not in REPA_MODES:
        raise ValueError(f"REPA mode must be one of {REPA_MODES}, got {mode!r}")
    proj = jnp.asarray(proj, jnp.float32)
    dino = jnp.asarray(dino).astype(jnp.float32)
    if proj.shape != dino.shape:
        raise ValueError(
            f"REPA projector output {proj.shape} and DINO targets {dino.shape} must match "
            "(both (B, T, F), tokens row-major)"
        )
    cos_term = jnp.mean(1.0 - cosine_similarity(proj, dino, axis=-1), axis=-1)
    if mode == "cos":
        return cos_term
    mse_term = jnp.mean((proj - dino) ** 2, axis=(1, 2))
    if mode == "mse":
        return mse_term
    return 0.5 * (cos_term + mse_term)


# ---------------------------------------------------------------------------------------------------------------
# The full objective
# ---------------------------------------------------------------------------------------------------------------
def sfd_loss(
    model_fn: Callable, x1, y, dino, key, cfg: LossConfig, *, x0=None, n=None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SFD training loss for one batch; returns (scalar loss, metrics of batch means, all float32).

    model_fn(x_t, t_tex, t_sem, y) -> (velocity, repa) is the train-mode model (label dropout already applied to y).
    x1: (B, H, W, C) clean composite latent; dino: (B, T, F) REPA targets (any float dtype), or None when
    cfg.repa_weight == 0. `key` drives both draws (τ and x0); `x0` and `n` inject them instead (see
    `schedule.sample_tau` for `n`).
    """
    x1 = jnp.asarray(x1, jnp.float32)
    if x1.ndim != 4:
        raise ValueError(f"x1 must be a (B, H, W, C) channels-last latent, got shape {x1.shape}")
    batch = x1.shape[0]
    schedule.check_channels(x1.shape[-1], cfg.semantic_chans)
    use_repa = cfg.repa_weight > 0
    if use_repa and dino is None:
        raise ValueError("sfd_loss: dino targets are required when LossConfig.repa_weight > 0")
    if key is None and (x0 is None or n is None):
        raise ValueError("sfd_loss needs a PRNG key unless both x0 and n are injected")
    key_tau, key_noise = jax.random.split(key) if key is not None else (None, None)

    tau = schedule.sample_tau(key_tau, batch, cfg.delta_t, cfg.time_dist, n=n)
    t_tex, t_sem = schedule.times_from_tau(tau, cfg.delta_t)
    if x0 is None:
        x0 = jax.random.normal(key_noise, x1.shape, jnp.float32)
    elif x0.shape != x1.shape:
        raise ValueError(f"injected noise x0 has shape {x0.shape}, expected x1's {x1.shape}")

    x_t = interpolate(x0, x1, t_tex, t_sem, cfg.semantic_chans)
    u = velocity_target(x0, x1)
    out = model_fn(x_t, t_tex, t_sem, y)
    pred, proj = out if isinstance(out, tuple) else (out, None)
    pred = jnp.asarray(pred, jnp.float32)
    if pred.shape != x1.shape:
        raise ValueError(f"model velocity has shape {pred.shape}, expected {x1.shape}")

    l_mse = mse_loss(pred, u, cfg.semantic_chans, cfg.semantic_weight)
    l_cos = cosine_loss(pred, u)
    total = jnp.mean(l_mse)
    if cfg.use_cosine_loss:
        total = total + jnp.mean(l_cos)
    mse_tex, mse_sem = part_mse(pred, u, cfg.semantic_chans)
    metrics = {
        "loss_mse": jnp.mean(l_mse),
        "loss_cos": jnp.mean(l_cos),
        "mse_tex": jnp.mean(mse_tex),
        "tau_mean": jnp.mean(tau),
    }
    if cfg.semantic_chans > 0:
        metrics["mse_sem"] = jnp.mean(mse_sem)
    if use_repa:
        if proj is None:
            raise ValueError(
                "sfd_loss: REPA is on (repa_weight > 0) but model_fn returned no projector output; "
                "call the model with train=True"
            )
        l_repa = cfg.repa_weight * repa_loss(proj, dino, cfg.repa_mode)
        total = total + jnp.mean(l_repa)
        metrics["loss_repa"] = jnp.mean(l_repa)
    metrics["loss"] = total
    return total, metrics


def sfd_loss_per_sample(model_fn: Callable, x1, y, dino, cfg: LossConfig, *, x0, tau) -> dict[str, jax.Array]:
    """Per-sample terms (B,) for a given noise x0 and global time τ — the quantities `loss.npz` stores.

    Keys: t_tex, t_sem, xt, pred, loss_mse, loss_cos, loss_repa (already multiplied by repa_weight, as the
    reference returns it; absent when REPA is off).
    """
    t_tex, t_sem = schedule.times_from_tau(jnp.asarray(tau, jnp.float32), cfg.delta_t)
    x_t = interpolate(x0, x1, t_tex, t_sem, cfg.semantic_chans)
    u = velocity_target(x0, x1)
    out = model_fn(x_t, t_tex, t_sem, y)
    pred, proj = out if isinstance(out, tuple) else (out, None)
    terms = {
        "t_tex": t_tex,
        "t_sem": t_sem,
        "xt": x_t,
        "pred": jnp.asarray(pred, jnp.float32),
        "loss_mse": mse_loss(pred, u, cfg.semantic_chans, cfg.semantic_weight),
        "loss_cos": cosine_loss(pred, u),
    }
    if cfg.repa_weight > 0:
        terms["loss_repa"] = cfg.repa_weight * repa_loss(proj, dino, cfg.repa_mode)
    return terms
