"""Dual-timestep LightningDiT (docs/model.md#architecture), patch size 1, channels-last.

    model = LightningDiT(DiTConfig.from_size("xl"), rngs=nnx.Rngs(0))
    v = model(x, t_tex, t_sem, y)                        # x (B, 16, 16, 48) → velocity (B, 16, 16, 48)
    v, repa = model(x, t_tex, t_sem, y, train=True)      # repa (B, 256, 768): REPA projector after block repa_depth

The model applies no label dropout: the training step replaces labels by the null label `num_classes` itself.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax.models import layers

# Width / depth / heads of the reference sizes (docs/model.md#sizes-and-cost). "xxl" is the reference's "1p0B"; "tiny"
# is the golden-test model of tests/golden/official/dit.npz; "s" is for benchmarks.
SIZES: dict[str, dict] = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=4, repa_projector_dim=128),
    "b": dict(depth=12, hidden_size=768, num_heads=12),
    "l": dict(depth=24, hidden_size=1024, num_heads=16),
    "xl": dict(depth=28, hidden_size=1152, num_heads=16),
    "xxl": dict(depth=24, hidden_size=1536, num_heads=24),
    # DiT-S width (not a released SFD model): the CPU benchmark size between tiny and B.
    "s": dict(depth=12, hidden_size=384, num_heads=6),
}
_ALIASES = {"1p0b": "xxl", "b/1": "b", "l/1": "l", "xl/1": "xl", "xxl/1": "xxl", "1p0b/1": "xxl"}
DTYPES = ("float32", "bfloat16", "float16")
# What a rematerialised block (remat=True) keeps for the backward pass; everything else is recomputed there.
#   'full': nothing but the block's inputs (recomputes the whole block: +1 forward, the least memory);
#   'dots': every matmul output, attention logits included;
#   'dots_no_batch': the outputs of the linear layers (qkv, proj, w12, w3, adaLN) only -- norms, RoPE, the
#     attention core (logits, softmax, probs @ v) and activations are recomputed (a few % more FLOPs).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    input_size: int = 16
    in_channels: int = 48
    semantic_chans: int = 16
    num_classes: int = 1000  # the label table has num_classes + 1 rows; row num_classes is the null label
    use_repa: bool = True
    repa_depth: int = 2
    repa_projector_dim: int = 2048
    repa_dim: int = 768
    dtype: str = "float32"  # compute dtype; params are always float32
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(2/3 · mlp_ratio · D)
    remat: bool = False  # rematerialise each block in the backward pass (memory for compute)
    remat_policy: str = "full"  # what a rematerialised block saves: one of REMAT_POLICIES
    attention_impl: str | None = None  # jax.nn.dot_product_attention implementation (None: XLA picks)
    # Two D/2 timestep embedders (t_sem | t_tex), or one D-wide embedder of the single time, as the reference
    # builds for its ablations without semantic-first (Δt = 0 or no semantic channels).
    dual_timestep: bool = True

    def __post_init__(self):
        problems = []
        for name in ("depth", "hidden_size", "num_heads", "input_size", "in_channels", "num_classes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive int")
        if not problems:
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            elif self.head_dim % 4:
                problems.append(f"head_dim={self.head_dim} must be divisible by 4 for 2-D RoPE")
            if self.hidden_size % 4:
                problems.append(f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)")
            if not 0 <= self.semantic_chans <= self.in_channels:
                problems.append(f"semantic_chans={self.semantic_chans} must be in [0, in_channels]")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy={self.remat_policy!r} must be one of {tuple(REMAT_POLICIES)}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if self.use_repa and self.repa_depth < 1:
            problems.append(f"repa_depth={self.repa_depth} must be >= 1")
        if problems:
            raise ValueError("invalid DiTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(2 / 3 * self.mlp_ratio * self.hidden_size)

    @property
    def num_tokens(self) -> int:
        return self.input_size * self.input_size

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_size(cls, name: str, **overrides) -> "DiTConfig":
        key = name.strip().lower()
        key = _ALIASES.get(key, key)
        if key not in SIZES:
            raise ValueError(
                f"unknown DiT size {name!r}; valid sizes: {', '.join(SIZES)} (aliases: {', '.join(sorted(_ALIASES))})"
            )
        return cls(**{**SIZES[key], **overrides})

    def size_name(self) -> str | None:
        """The SIZES entry this config's architecture matches (ignoring dtype/remat), or None."""
        for name, _dims in SIZES.items():
            ref = DiTConfig.from_size(name)
            if (
                all(
                    getattr(self, f) == getattr(ref, f)
                    for f in ("depth", "hidden_size", "num_heads", "repa_projector_dim")
                )
                and self.mlp_ratio == ref.mlp_ratio
            ):
                return name
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return layers.config_from_dict(cls, d)


class LightningDiT(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.compute_dtype
        d = cfg.hidden_size
        if d % 2 and cfg.dual_timestep:
            raise ValueError(f"hidden_size {d} must be even (two timestep embedders of width D/2)")
        rngs = layers.KeyStream(rngs)
        # The reference's 1×1 conv patch embed; xavier on the (D, 48) matrix, zero bias.
        self.x_embedder = layers.Dense(cfg.in_channels, d, names=(None, "embed"), dtype=dtype, rngs=rngs)
        if cfg.dual_timestep:
            self.t_embedder_sem = layers.TimestepEmbedder(d // 2, dtype=dtype, rngs=rngs)
            self.t_embedder_tex = layers.TimestepEmbedder(d // 2, dtype=dtype, rngs=rngs)
        else:
            self.t_embedder = layers.TimestepEmbedder(d, dtype=dtype, rngs=rngs)
        self.y_embedder = layers.LabelEmbedder(cfg.num_classes, d, rngs=rngs)
        self.blocks = nnx.List(
            [
                layers.DiTBlock(
                    d, cfg.num_heads, cfg.mlp_hidden, dtype=dtype, attention_impl=cfg.attention_impl, rngs=rngs
                )
                for _ in range(cfg.depth)
            ]
        )
        self.final_layer = layers.FinalLayer(d, cfg.in_channels, dtype=dtype, rngs=rngs)
        self.repa_projector = (
            layers.RepaProjector(d, cfg.repa_projector_dim, cfg.repa_dim, dtype=dtype, rngs=rngs)
            if cfg.use_repa
            else None
        )
        pos_embed, (rope_cos, rope_sin) = fixed_tables(cfg)
        self.pos_embed = layers.FixedBuffer(jnp.asarray(pos_embed), out_sharding=(None, None))
        self.rope_cos = layers.FixedBuffer(jnp.asarray(rope_cos), out_sharding=(None, None))
        self.rope_sin = layers.FixedBuffer(jnp.asarray(rope_sin), out_sharding=(None, None))

    def __call__(self, x: jax.Array, t_tex: jax.Array, t_sem: jax.Array, y: jax.Array, *, train: bool = False):
        cfg = self.cfg
        b, h, w, c = x.shape
        if (h, w, c) != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(
                f"LightningDiT expects x of shape (B, {cfg.input_size}, {cfg.input_size}, "
                f"{cfg.in_channels}) (NHWC), got {x.shape}"
            )
        want_repa = train and cfg.use_repa
        if want_repa and cfg.repa_depth > cfg.depth:
            raise ValueError(
                f"train=True needs the REPA features after block {cfg.repa_depth}, but this model has "
                f"only {cfg.depth} blocks (a guide model: call it with train=False)"
            )
        # Mixed precision as under torch autocast: matmuls run in the compute dtype, while the residual stream and
        # the conditioning vector stay float32 (float32 + low-precision outputs promote to float32).
        tokens = x.reshape(b, h * w, c)  # row-major (h, w) tokens, as the reference's flatten(2)
        hidden = self.x_embedder(tokens).astype(jnp.float32) + self.pos_embed[...][None]
        if cfg.dual_timestep:
            t_emb = jnp.concatenate([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], axis=-1)
        else:  # only built for Δt = 0 or no semantic channels, where both parts share one time
            t_emb = self.t_embedder(t_tex)
        cond = t_emb.astype(jnp.float32) + self.y_embedder(y)
        rope_cos, rope_sin = self.rope_cos[...], self.rope_sin[...]

        repa = None
        for i, block in enumerate(self.blocks):
            if cfg.remat and train:
                hidden = nnx.remat(
                    lambda blk, hh, cc, rc, rs: blk(hh, cc, rc, rs), policy=REMAT_POLICIES[cfg.remat_policy]
                )(block, hidden, cond, rope_cos, rope_sin)
            else:
                hidden = block(hidden, cond, rope_cos, rope_sin)
            if want_repa and i + 1 == cfg.repa_depth:
                repa = self.repa_projector(hidden).astype(jnp.float32)
        out = self.final_layer(hidden, cond).astype(jnp.float32).reshape(b, h, w, c)
        if train:
            return out, repa
        return out


def fixed_tables(cfg: DiTConfig) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(pos_embed (T, D), (rope_cos, rope_sin) (T, head_dim)) float32 numpy tables of `cfg`."""
    return (
        layers.sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size),
        layers.rope_tables_2d(cfg.head_dim, cfg.input_size),
    )


def abstract_model(cfg: DiTConfig) -> LightningDiT:
    """The model with ShapeDtypeStruct leaves (nnx.eval_shape): no parameter is allocated."""
    return nnx.eval_shape(lambda: LightningDiT(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: DiTConfig, *, include_repa: bool = False, include_pos_embed: bool = False) -> int:
    """Trainable parameter count (the reference's published counts exclude the REPA projector and pos_embed)."""
    model = abstract_model(cfg)
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "repa_projector" and not include_repa:
            continue
        total += int(np.prod(var.shape))
    if include_pos_embed:
        total += cfg.num_tokens * cfg.hidden_size
    return total


def forward_flops_per_image(cfg: DiTConfig, *, include_repa: bool = False) -> float:
    """Analytic matmul FLOPs of one forward for one image (multiply-add = 2 FLOPs).

    Per-token linears and attention scale with T tokens; the conditioning MLPs (timestep embedders, adaLN) run once
    per image. Element-wise work (norms, RoPE, softmax, activations) is left out, as is usual for MFU.
    """
    d, t, hf = cfg.hidden_size, cfg.num_tokens, cfg.mlp_hidden
    per_token = cfg.in_channels * d + cfg.depth * (d * 3 * d + d * d + d * 2 * hf + hf * d) + d * cfg.in_channels
    attention = cfg.depth * 2 * t * t * d  # q·kᵀ and softmax·v over all heads
    t_embed = 2 * (256 * d // 2 + (d // 2) ** 2) if cfg.dual_timestep else 256 * d + d * d
    per_image = t_embed + cfg.depth * d * 6 * d + d * 2 * d
    flops = 2.0 * (t * per_token + attention + per_image)
    if include_repa and cfg.use_repa:
        p = cfg.repa_projector_dim
        flops += 2.0 * t * (d * p + p * p + p * cfg.repa_dim)
    return flops


def train_flops_per_image(cfg: DiTConfig) -> float:
    """Forward + backward FLOPs of the DiT and REPA projector for one image (backward = 2× forward)."""
    return 3.0 * forward_flops_per_image(cfg, include_repa=cfg.use_repa and cfg.repa_depth <= cfg.depth)
