"""Guidance for the three-phase sampler (docs/diffusion.md#sampling): classifier-free guidance and AutoGuidance on all
48 channels.

    CFG(scale, interval_start=None)               out = u + w·(c − u), u = model with the null label
    AutoGuidance(guide_model, scale,               out = g + w·(main − g), g = a weaker model with the SAME labels,
                 scale_sem=None, scale_tex=None,   w_tex on the texture channels and w_sem on the semantic ones
                 interval_start=None)

Interval rule, decided per sample (not from element 0 as the reference does; docs/diffusion.md#cfg-interval): a part
stays unguided (= the conditional / main output) while its own time is strictly below `interval_start` — t_tex for the
texture channels, t_sem for the semantic channels. `interval_start=None` (or 0) guides everywhere.

`guided_velocity` is the pure function the sampler traces; tests call it directly against `dit.npz`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sfd_jax.diffusion import schedule

NULL_LABEL = 1000


@dataclasses.dataclass(frozen=True)
class CFG:
    """Classifier-free guidance with the null label (1000 for ImageNet; a model with more classes passes its own)."""

    scale: float
    interval_start: float | None = None
    null_label: int = NULL_LABEL

    def scales(self) -> tuple[float, float]:
        return float(self.scale), float(self.scale)


@dataclasses.dataclass(frozen=True, eq=False)
class AutoGuidance:
    """AutoGuidance with a guide model (an nnx module or any callable (x, t_tex, t_sem, y) -> velocity)."""

    guide_model: Any
    scale: float
    scale_sem: float | None = None
    scale_tex: float | None = None
    interval_start: float | None = None

    def scales(self) -> tuple[float, float]:
        """(w_tex, w_sem); each defaults to `scale`."""
        w_tex = self.scale if self.scale_tex is None else self.scale_tex
        w_sem = self.scale if self.scale_sem is None else self.scale_sem
        return float(w_tex), float(w_sem)


Guidance = CFG | AutoGuidance | None


def check_guidance(guidance) -> None:
    if guidance is not None and not isinstance(guidance, (CFG, AutoGuidance)):
        raise TypeError(f"guidance must be None, CFG(...) or AutoGuidance(...), got {type(guidance).__name__}")
    if isinstance(guidance, AutoGuidance) and not callable(guidance.guide_model):
        raise TypeError(
            "AutoGuidance.guide_model must be callable as guide(x, t_tex, t_sem, y), got "
            f"{type(guidance.guide_model).__name__}"
        )


def combine(base, main, t_tex, t_sem, scale_tex, scale_sem, interval_start, semantic_chans: int) -> jax.Array:
    """base + w·(main − base) with w = scale_tex / scale_sem per part; parts below interval_start keep `main`.

    base, main: (B, H, W, C); t_tex, t_sem: (B,); scales and interval_start: scalars (interval_start may be −inf).
    """
    num_channels = main.shape[-1]
    tex_chans = schedule.check_channels(num_channels, semantic_chans)
    is_tex = jnp.arange(num_channels) < tex_chans
    w = jnp.where(is_tex, jnp.asarray(scale_tex, main.dtype), jnp.asarray(scale_sem, main.dtype))
    guided = base + w * (main - base)
    if interval_start is None:
        return guided
    start = jnp.asarray(interval_start, jnp.float32)
    unguided = schedule.channel_mask(
        jnp.asarray(t_tex) < start, jnp.asarray(t_sem) < start, num_channels, semantic_chans
    )  # (B, C)
    return jnp.where(unguided[:, None, None, :], main, guided)


def guided_velocity(
    guidance: Guidance,
    model_fn: Callable,
    x,
    t_tex,
    t_sem,
    y,
    *,
    guide_fn: Callable | None = None,
    semantic_chans: int = 16,
    scale_tex=None,
    scale_sem=None,
    interval_start=None,
) -> jax.Array:
    """The (unmasked) sampling velocity for one batch.

    model_fn / guide_fn: (x, t_tex, t_sem, y) -> velocity, with x (B, H, W, C) and per-sample times (B,).
    For AutoGuidance, guide_fn defaults to `guidance.guide_model`. scale_tex / scale_sem / interval_start override
    the guidance object's values (the sampler passes them as traced arrays so a scale sweep does not recompile).
    """
    if guidance is None:
        return model_fn(x, t_tex, t_sem, y)
    check_guidance(guidance)
    w_tex, w_sem = guidance.scales()
    w_tex = w_tex if scale_tex is None else scale_tex
    w_sem = w_sem if scale_sem is None else scale_sem
    start = guidance.interval_start if interval_start is None else interval_start
    y = jnp.asarray(y)
    if isinstance(guidance, CFG):
        # One forward of the doubled batch [cond; uncond], as the reference's forward_with_cfg.
        b = x.shape[0]
        out = model_fn(
            jnp.concatenate([x, x]),
            jnp.concatenate([t_tex, t_tex]),
            jnp.concatenate([t_sem, t_sem]),
            jnp.concatenate([y, jnp.full_like(y, guidance.null_label)]),
        )
        cond, uncond = out[:b], out[b:]
        return combine(uncond, cond, t_tex, t_sem, w_tex, w_sem, start, semantic_chans)
    guide_fn = guidance.guide_model if guide_fn is None else guide_fn
    main = model_fn(x, t_tex, t_sem, y)
    weak = guide_fn(x, t_tex, t_sem, y)
    return combine(weak, main, t_tex, t_sem, w_tex, w_sem, start, semantic_chans)
