"""DINOv2 ViT with register tokens (transformers `Dinov2WithRegistersModel`) in Flax NNX.

SFD uses DINOv2-B/14-reg as a frozen feature extractor: its layer-normed patch tokens (`x_norm_patchtokens`) are
the REPA targets and the SemVAE input (docs/semantic.md#dinov2-with-registers). The module reproduces the transformers
forward exactly:

  tokens = [CLS + pos[0], registers (no position), patches + pos[1:]]  →  N pre-LN blocks with LayerScale  →  LN

At a patch grid other than the checkpoint's (37×37 for the 518-pixel checkpoints) the patch position embeddings are
resized with torch's antialiased bicubic (`F.interpolate(..., 'bicubic', antialias=True)`), which is exactly
`jax.image.resize(..., 'bicubic', antialias=True)` on the float32 grid — in both directions.

Params are fp32; `dtype` sets the compute dtype of the matmuls (bf16 on accelerators). LayerNorms, softmax and the
position-embedding resize run in fp32; the outputs are the fp32 final LayerNorm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models.layers import dense, layer_norm, resolve_dtype

# transformers' ACT2FN names that DINOv2 configs use; 'gelu' is the exact (erf) GELU.
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """Architecture of a DINOv2-with-registers ViT. Defaults: ViT-B/14 with 4 registers at 518 (the SFD model).

    Field names follow transformers' `Dinov2WithRegistersConfig`; `from_hf` reads its `to_dict()` / config.json.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    patch_size: int = 14
    image_size: int = 518
    num_channels: int = 3
    num_register_tokens: int = 4
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    hidden_act: str = "gelu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Dinov2Config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"Dinov2Config.hidden_act={self.hidden_act!r} is not supported; allowed: {sorted(_ACTIVATIONS)}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"Dinov2Config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        resolve_dtype(self.dtype)

    @property
    def grid_size(self) -> int:
        """Side of the square position-embedding grid stored in the checkpoint."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # transformers keeps 2/3 of it, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "Dinov2Config":
        """Build from a transformers config dict (config.json or `config.to_dict()`), ignoring unrelated fields."""
        hf = dict(hf)
        model_type = hf.get("model_type", "dinov2_with_registers")
        if model_type != "dinov2_with_registers":
            raise ValueError(
                f"config model_type={model_type!r}; expected 'dinov2_with_registers' (a Dinov2WithRegistersConfig)"
            )
        for field in ("patch_size", "image_size"):
            value = hf.get(field)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"config {field}={value}: only square {field} is supported")
                hf[field] = value[0]
        if "intermediate_size" in hf and hf.get("hidden_size"):
            # transformers builds the MLP from mlp_ratio and ignores intermediate_size; refuse configs where the two
            # disagree rather than guess which one the weights follow.
            ratio = hf["intermediate_size"] / hf["hidden_size"]
            if "mlp_ratio" in hf and int(hf["hidden_size"] * hf["mlp_ratio"]) != hf["intermediate_size"]:
                raise ValueError(
                    f"config intermediate_size={hf['intermediate_size']} disagrees with "
                    f"hidden_size*mlp_ratio={hf['hidden_size']}*{hf['mlp_ratio']}"
                )
            hf.setdefault("mlp_ratio", ratio)
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        kwargs = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """A dict that `transformers.Dinov2WithRegistersConfig(**d)` accepts (and config.json holds)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dtype"}
        d["model_type"] = "dinov2_with_registers"
        return d


class PatchEmbed(nnx.Module):
    """Non-overlapping p×p patches → Linear; the same arithmetic as a stride-p Conv2d, as one matmul."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_size = p
        self.dtype = resolve_dtype(cfg.dtype)
        init = jax.nn.initializers.truncated_normal(0.02)
        self.kernel = nnx.Param(nnx.with_partitioning(init, (None, None, None, "embed"))(rngs.params(), (p, p, c, d)))
        self.bias = nnx.Param(nnx.with_partitioning(jax.nn.initializers.zeros, ("embed",))(rngs.params(), (d,)))

    def __call__(self, pixels):
        b, h, w, c = pixels.shape
        p = self.patch_size
        x = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        return x @ kernel + self.bias[...].astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention; q, k, v fused into one (D, 3D) matmul with outputs [q | k | v]."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.dtype = resolve_dtype(cfg.dtype)
        self.qkv = dense(d, 3 * d, ("embed", "mlp"), rngs=rngs, dtype=self.dtype, use_bias=cfg.qkv_bias)
        self.proj = dense(d, d, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        scale = (d // self.num_heads) ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        d, hidden = cfg.hidden_size, cfg.mlp_hidden
        dtype = resolve_dtype(cfg.dtype)
        self.swiglu = cfg.use_swiglu_ffn
        if self.swiglu:
            self.gate_proj = dense(d, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
            self.up_proj = dense(d, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
            self.down_proj = dense(hidden, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        else:
            self.act = _ACTIVATIONS[cfg.hidden_act]
            self.fc1 = dense(d, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
            self.fc2 = dense(hidden, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        if self.swiglu:
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nnx.Module):
    def __init__(self, dim: int, value: float):
        self.lambda1 = nnx.Param(
            nnx.with_partitioning(lambda *_: jnp.full((dim,), value, jnp.float32), ("embed",))(None, (dim,))
        )

    def __call__(self, x):
        return x * self.lambda1[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-LN ViT block: x + ls1·attn(norm1(x)), then x + ls2·mlp(norm2(x))."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = resolve_dtype(cfg.dtype)
        self.norm1 = layer_norm(d, cfg.layer_norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ls1 = LayerScale(d, cfg.layerscale_value)
        self.norm2 = layer_norm(d, cfg.layer_norm_eps, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.ls2 = LayerScale(d, cfg.layerscale_value)

    def __call__(self, x):
        x = x + self.ls1(self.attn(self.norm1(x).astype(self.dtype)))
        return x + self.ls2(self.mlp(self.norm2(x).astype(self.dtype)))


def resize_position_grid(grid: jax.Array, height: int, width: int) -> jax.Array:
    """(g, g, D) position embeddings → (height, width, D), torch's antialiased bicubic in float32."""
    if grid.shape[:2] == (height, width):
        return grid  # transformers skips the resize at the native grid (a same-size resize is the identity anyway)
    return jax.image.resize(grid.astype(jnp.float32), (height, width, grid.shape[-1]), method="bicubic", antialias=True)


class Dinov2(nnx.Module):
    """`Dinov2(cfg, rngs=nnx.Rngs(0))`; `model(pixels)` → last_hidden_state (B, 1 + R + N, D), fp32.

    `pixels` are NHWC, already ImageNet-normalised, with H and W multiples of the patch size.
    The model is frozen in SFD: nothing here is stochastic (no dropout, no drop-path), and callers never
    differentiate through it.
    """

    def __init__(self, cfg: Dinov2Config = Dinov2Config(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, r = cfg.hidden_size, cfg.num_register_tokens
        self.dtype = resolve_dtype(cfg.dtype)
        tn = jax.nn.initializers.truncated_normal(0.02)
        zeros = jax.nn.initializers.zeros
        self.cls_token = nnx.Param(nnx.with_partitioning(tn, (None, None, "embed"))(rngs.params(), (1, 1, d)))
        # Unused at inference (it replaces masked patches in DINOv2's pre-training); kept so exports are complete.
        self.mask_token = nnx.Param(nnx.with_partitioning(zeros, (None, "embed"))(rngs.params(), (1, d)))
        self.register_tokens = nnx.Param(nnx.with_partitioning(zeros, (None, None, "embed"))(rngs.params(), (1, r, d)))
        self.position_embeddings = nnx.Param(
            nnx.with_partitioning(tn, (None, None, "embed"))(rngs.params(), (1, 1 + cfg.grid_size**2, d))
        )
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = layer_norm(d, cfg.layer_norm_eps, rngs=rngs)

    def position_embedding(self, height: int, width: int) -> jax.Array:
        """(1 + height·width, D) float32 position embeddings for a height × width patch grid: [CLS, patches]."""
        pos = self.position_embeddings[...][0].astype(jnp.float32)
        g = self.cfg.grid_size
        patch_pos = resize_position_grid(pos[1:].reshape(g, g, -1), height, width)
        return jnp.concatenate([pos[:1], patch_pos.reshape(height * width, -1)], axis=0)

    def embed(self, pixels: jax.Array) -> jax.Array:
        b, h, w, c = pixels.shape
        p = self.cfg.patch_size
        if c != self.cfg.num_channels or h % p or w % p:
            raise ValueError(
                f"Dinov2 expects NHWC pixels with {self.cfg.num_channels} channels and H, W multiples "
                f"of the patch size {p}; got shape {pixels.shape}"
            )
        patches = self.patch_embed(pixels)
        pos = self.position_embedding(h // p, w // p).astype(self.dtype)
        cls = (self.cls_token[...].astype(self.dtype) + pos[None, :1]).repeat(b, axis=0)
        registers = jnp.broadcast_to(
            self.register_tokens[...].astype(self.dtype), (b,) + self.register_tokens.shape[1:]
        )
        return jnp.concatenate([cls, registers, patches + pos[None, 1:]], axis=1)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def patch_tokens(self, pixels: jax.Array) -> jax.Array:
        """Layer-normed patch tokens (B, N, D), row-major: `x_norm_patchtokens`, the REPA / SemVAE input."""
        return self(pixels)[:, self.cfg.num_prefix_tokens :]
