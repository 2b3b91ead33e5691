"""Semantic VAE (docs/semantic.md#semantic-vae): compresses DINOv2 patch tokens (B, L, 768) to a (B, L, 16) Gaussian
latent.

Encoder: Linear(C_in → D) → N pre-LN transformer blocks → LayerNorm → Linear(D → 2·bottleneck) = [μ | logvar].
Decoder: Linear(bottleneck → D) → N blocks → LayerNorm → Linear(D → C_in). No positional embedding: the tokens are
processed as a set, so the latent of a token depends on its position only through the DINOv2 features themselves.

The reference reshapes its posterior to (B, C, h, w) for diffusers' `DiagonalGaussianDistribution`; that is a pure
relayout, so everything here stays (B, L, C) and the KL is summed over (L, C).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers
from sfd_jax.models.layers import count_params  # noqa: F401 (this model's API: tests, docs)
from sfd_jax.models.layers import cosine_similarity, layer_norm, resolve_dtype, torch_linear

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
COS_AXES = ("feature", "token")


@dataclasses.dataclass(frozen=True)
class SemVAEConfig:
    """SemVAE architecture; defaults are the reference checkpoint (ch16.yaml): 57.9M parameters."""

    input_dim: int = 768
    hidden_dim: int = 768
    bottleneck_dim: int = 16
    num_heads: int = 6
    num_blocks: int = 4
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("input_dim", "hidden_dim", "bottleneck_dim", "num_heads", "num_blocks"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SemVAEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"SemVAEConfig: hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}"
            )
        resolve_dtype(self.dtype)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SemVAEConfig":
        return layers.config_from_dict(cls, d)


class TransformerBlock(nnx.Module):
    """x + MHA(LN1(x)); x + MLP(LN2(x)) with exact GELU; torch nn.MultiheadAttention arithmetic (fused [q; k; v])."""

    def __init__(self, cfg: SemVAEConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.dtype = resolve_dtype(cfg.dtype)
        self.norm1 = layer_norm(d, cfg.layer_norm_eps, rngs=rngs)
        # nn.MultiheadAttention's init: xavier-uniform fused in_proj with zero bias, zero out_proj bias.
        self.qkv = torch_linear(
            d,
            3 * d,
            ("embed", "mlp"),
            rngs=rngs,
            dtype=self.dtype,
            zero_bias=True,
            kernel_init=jax.nn.initializers.xavier_uniform(),
        )
        self.proj = torch_linear(d, d, ("mlp", "embed"), rngs=rngs, dtype=self.dtype, zero_bias=True)
        self.norm2 = layer_norm(d, cfg.layer_norm_eps, rngs=rngs)
        self.fc1 = torch_linear(d, cfg.mlp_hidden, ("embed", "mlp"), rngs=rngs, dtype=self.dtype)
        self.fc2 = torch_linear(cfg.mlp_hidden, d, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)

    def attention(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (d // self.num_heads) ** -0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))

    def __call__(self, x):
        x = x + self.attention(self.norm1(x).astype(self.dtype))
        h = jax.nn.gelu(self.fc1(self.norm2(x).astype(self.dtype)), approximate=False)
        return x + self.fc2(h)


class Tower(nnx.Module):
    """Linear in → blocks → LayerNorm → Linear out (the reference's `nn.Sequential` of 4 + N entries)."""

    def __init__(self, cfg: SemVAEConfig, din: int, dout: int, *, rngs: nnx.Rngs):
        dtype = resolve_dtype(cfg.dtype)
        self.proj_in = torch_linear(din, cfg.hidden_dim, (None, "embed"), rngs=rngs, dtype=dtype)
        self.blocks = nnx.List([TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.norm = layer_norm(cfg.hidden_dim, cfg.layer_norm_eps, rngs=rngs)
        self.proj_out = torch_linear(cfg.hidden_dim, dout, ("embed", None), rngs=rngs, dtype=jnp.float32)

    def __call__(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        # The output projection stays fp32: its outputs are the posterior moments / reconstructed features.
        return self.proj_out(self.norm(x))


class SemVAE(nnx.Module):
    """`SemVAE(cfg, rngs=nnx.Rngs(0))`. Token sequences are (B, L, C); L may be anything (no positions)."""

    def __init__(self, cfg: SemVAEConfig = SemVAEConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Tower(cfg, cfg.input_dim, 2 * cfg.bottleneck_dim, rngs=rngs)
        self.decoder = Tower(cfg, cfg.bottleneck_dim, cfg.input_dim, rngs=rngs)

    def encode(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens (B, L, input_dim) → (μ, logvar), each (B, L, bottleneck) fp32, logvar clamped to [−30, 20]."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.cfg.input_dim:
            raise ValueError(f"SemVAE.encode expects tokens (B, L, {self.cfg.input_dim}); got {tokens.shape}")
        moments = self.encoder(tokens.astype(jnp.float32))
        mu, logvar = jnp.split(moments, 2, axis=-1)
        return mu, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, L, bottleneck) → reconstructed tokens (B, L, input_dim), fp32."""
        if z.ndim != 3 or z.shape[-1] != self.cfg.bottleneck_dim:
            raise ValueError(f"SemVAE.decode expects z (B, L, {self.cfg.bottleneck_dim}); got {z.shape}")
        return self.decoder(z.astype(jnp.float32))

    def __call__(self, tokens: jax.Array, key: jax.Array) -> dict:
        """Full training forward: encode, sample z with `key`, decode."""
        mu, logvar = self.encode(tokens)
        z = sample(mu, logvar, key)
        return {"mu": mu, "logvar": logvar, "z": z, "recon": self.decode(z)}


def reparameterize(mu: jax.Array, logvar: jax.Array, eps: jax.Array) -> jax.Array:
    """z = μ + σ·ε with σ = exp(½·logvar)."""
    return mu + jnp.exp(0.5 * logvar) * eps


def sample(mu: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A posterior sample; the noise comes only from `key`."""
    return reparameterize(mu, logvar, jax.random.normal(key, mu.shape, jnp.float32))


def kl(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """Per-sample KL(q ‖ N(0, I)) = ½·Σ_{L,C}(μ² + σ² − 1 − logvar), shape (B,)."""
    mu, logvar = mu.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(mu**2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mu.ndim)))


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The reference ch16.yaml weights."""

    mse: float = 1.0
    l1: float = 0.0
    cos: float = 1.0
    kl: float = 1e-7


def losses(
    recon: jax.Array,
    tokens: jax.Array,
    mu: jax.Array,
    logvar: jax.Array,
    *,
    weights: LossWeights = LossWeights(),
    cos_axis: str = "token",
) -> dict:
    """Every loss term (scalars, fp32) and their weighted `total`.

    cos_axis='token' (default) is what the released SemVAE was trained with: the reference training code's
    `F.cosine_similarity(recon, feats)` defaults to dim=1, the token axis of (B, L, C). 'feature' is the paper's
    description (the cosine over the C features of each token).
    """
    if cos_axis not in COS_AXES:
        raise ValueError(f"cos_axis={cos_axis!r}; allowed: {COS_AXES}")
    if recon.shape != tokens.shape:
        raise ValueError(f"recon {recon.shape} and tokens {tokens.shape} must have the same shape")
    recon, tokens = recon.astype(jnp.float32), tokens.astype(jnp.float32)
    err = recon - tokens
    kl_per_sample = kl(mu, logvar)
    terms = {
        "mse": jnp.mean(err**2),
        "l1": jnp.mean(jnp.abs(err)),
        "cos": 1.0 - jnp.mean(cosine_similarity(recon, tokens, axis=-1 if cos_axis == "feature" else 1)),
        "kl": jnp.mean(kl_per_sample),
    }
    terms["total"] = (
        weights.mse * terms["mse"] + weights.l1 * terms["l1"] + weights.cos * terms["cos"] + weights.kl * terms["kl"]
    )
    return terms
