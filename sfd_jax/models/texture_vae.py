"""Texture VAE: the LDM KL autoencoder ("SD-VAE f16d32") in Flax NNX, channels-last (docs/texture_vae.md#forward-order).

Module and attribute names mirror the reference (`encoder.down.{i}.block.{j}.conv1`, `decoder.up.{i}.attn.{j}.q`,
`quant_conv`, ...) so that a parameter's nnx path *is* its reference key; only the leaf names differ
(kernel/scale ↔ weight) and conv kernels are stored HWIO instead of torch's OIHW. `sfd_jax.convert.texture_vae`
relies on this.

Parameters are float32; `TextureVAEConfig.dtype` sets the compute dtype of convolutions and matmuls, while
GroupNorm statistics and the attention softmax always run in float32. Every shape decision is taken from the
config at construction, so encode/decode trace once per input shape and run batched under jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers
from sfd_jax.models.layers import count_params  # noqa: F401 (this model's API: tests, docs)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# torch's default conv init (kaiming_uniform with a = sqrt(5) → U(±1/sqrt(fan_in))), so models trained from
# scratch start where the reference's would.
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class TextureVAEConfig:
    """Architecture of the LDM KL autoencoder. The defaults are the reference f16d32 at 256×256.

    `num_res_blocks` counts encoder ResBlocks per level; the decoder has one more per level (LDM convention).
    A level has attention when its spatial size (resolution // 2**level) is in `attn_resolutions`.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 32
    embed_dim: int = 32
    num_groups: int = 32
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"TextureVAEConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        for name in (
            "ch",
            "num_res_blocks",
            "resolution",
            "in_channels",
            "out_ch",
            "z_channels",
            "embed_dim",
            "num_groups",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TextureVAEConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        bad = sorted(c for c in {self.ch * m for m in self.ch_mult} | {self.ch} if c % self.num_groups)
        if bad:
            raise ValueError(
                f"TextureVAEConfig: GroupNorm({self.num_groups}) needs every width divisible by "
                f"num_groups; widths {bad} (ch={self.ch} × ch_mult={self.ch_mult}) are not"
            )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"TextureVAEConfig.resolution={self.resolution} is not divisible by the downsample "
                f"factor {self.downsample_factor} of ch_mult={self.ch_mult}"
            )
        try:
            jnp.dtype(self.dtype)
        except TypeError as e:
            raise ValueError(
                f"TextureVAEConfig.dtype={self.dtype!r} is not a dtype name (use 'float32' or 'bfloat16')"
            ) from e

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor

    def level_has_attn(self, level: int) -> bool:
        return self.resolution // 2**level in self.attn_resolutions

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextureVAEConfig":
        return layers.config_from_dict(cls, d)


def _conv(
    cin: int, cout: int, k: int, cfg: TextureVAEConfig, rngs: nnx.Rngs, *, stride: int = 1, padding: Any = "SAME"
) -> nnx.Conv:
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=padding,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(_KERNEL_INIT, (None, None, "conv_in", "conv_out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


def swish(x):
    return x * jax.nn.sigmoid(x)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm semantics (biased variance, eps inside the sqrt), computed in float32."""

    def __init__(self, channels: int, num_groups: int, dtype: Any, eps: float = 1e-6):
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32), out_sharding=("conv_out",))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=("conv_out",))

    def __call__(self, x):
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class ResBlock(nnx.Module):
    """x' + conv2(swish(norm2(conv1(swish(norm1(x)))))); dropout is 0 in every reference config, so it is absent."""

    def __init__(self, cin: int, cout: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, cfg.num_groups, cfg.dtype)
        self.conv1 = _conv(cin, cout, 3, cfg, rngs)
        self.norm2 = GroupNorm(cout, cfg.num_groups, cfg.dtype)
        self.conv2 = _conv(cout, cout, 3, cfg, rngs)
        self.nin_shortcut = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H·W positions, scale C^-1/2, with a residual."""

    def __init__(self, c: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.norm = GroupNorm(c, cfg.num_groups, cfg.dtype)
        self.q = _conv(c, c, 1, cfg, rngs)
        self.k = _conv(c, c, 1, cfg, rngs)
        self.v = _conv(c, c, 1, cfg, rngs)
        self.proj_out = _conv(c, c, 1, cfg, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, h * w, c) for m in (self.q, self.k, self.v))
        # Reference order: logits = (q·kᵀ) then × C^-1/2, softmax over keys in float32.
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bij,bjc->bic", attn, v.astype(self.dtype)).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Asymmetric pad (0, 1) on H and W, then a 3×3 stride-2 VALID conv (LDM's resamp_with_conv)."""

    def __init__(self, c: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, cfg, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour ×2 then a 3×3 conv."""

    def __init__(self, c: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, cfg, rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: `block[j]` each followed by `attn[j]` when the level has attention, then the resampler."""

    def __init__(self, blocks: list, attns: list, resample):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        self.has_attn = bool(attns)
        self.resample_name = None
        if isinstance(resample, Downsample):
            self.downsample = resample
            self.resample_name = "downsample"
        elif isinstance(resample, Upsample):
            self.upsample = resample
            self.resample_name = "upsample"

    def __call__(self, x):
        for j, block in enumerate(self.block):
            x = block(x)
            if self.has_attn:
                x = self.attn[j](x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class Mid(nnx.Module):
    def __init__(self, c: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs):
        self.block_1 = ResBlock(c, c, cfg, rngs=rngs)
        self.attn_1 = AttnBlock(c, cfg, rngs=rngs)
        self.block_2 = ResBlock(c, c, cfg, rngs=rngs)

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) → moments before quant_conv (B, H/f, W/f, 2·z_channels)."""

    def __init__(self, cfg: TextureVAEConfig, *, rngs: nnx.Rngs):
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, cfg, rngs)
        in_mult = (1,) + cfg.ch_mult
        levels = []
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(block_in, block_out, cfg, rngs=rngs))
                block_in = block_out
                if cfg.level_has_attn(i):
                    attns.append(AttnBlock(block_in, cfg, rngs=rngs))
            down = Downsample(block_in, cfg, rngs=rngs) if i != cfg.num_levels - 1 else None
            levels.append(Level(blocks, attns, down))
        self.down = nnx.List(levels)
        self.mid = Mid(block_in, cfg, rngs=rngs)
        self.norm_out = GroupNorm(block_in, cfg.num_groups, cfg.dtype)
        self.conv_out = _conv(block_in, 2 * cfg.z_channels, 3, cfg, rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """Latent after post_quant_conv (B, h, w, z_channels) → image (B, h·f, w·f, out_ch)."""

    def __init__(self, cfg: TextureVAEConfig, *, rngs: nnx.Rngs):
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, block_in, 3, cfg, rngs)
        self.mid = Mid(block_in, cfg, rngs=rngs)
        levels = {}
        for i in reversed(range(cfg.num_levels)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(block_in, block_out, cfg, rngs=rngs))
                block_in = block_out
                if cfg.level_has_attn(i):
                    attns.append(AttnBlock(block_in, cfg, rngs=rngs))
            levels[i] = Level(blocks, attns, Upsample(block_in, cfg, rngs=rngs) if i != 0 else None)
        # Indexed by level like the reference (`up.0` is the full-resolution level), run deepest first.
        self.up = nnx.List([levels[i] for i in range(cfg.num_levels)])
        self.norm_out = GroupNorm(block_in, cfg.num_groups, cfg.dtype)
        self.conv_out = _conv(block_in, cfg.out_ch, 3, cfg, rngs)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(swish(self.norm_out(h)))


def reparameterize(mean, logvar, eps):
    """Posterior sample mean + exp(logvar / 2)·eps (the reference's DiagonalGaussianDistribution.sample)."""
    return mean + jnp.exp(0.5 * logvar) * eps


class TextureVAE(nnx.Module):
    """The LDM KL autoencoder. Images are NHWC in [-1, 1]; latents are (B, H/f, W/f, embed_dim)."""

    def __init__(self, cfg: TextureVAEConfig | None = None, *, rngs: nnx.Rngs):
        self.cfg = cfg = cfg if cfg is not None else TextureVAEConfig()
        self.encoder = Encoder(cfg, rngs=rngs)
        self.quant_conv = _conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, cfg, rngs)
        self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1, cfg, rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    def _check_images(self, images):
        f = self.cfg.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.cfg.in_channels or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"TextureVAE.encode expects NHWC images (B, H, W, {self.cfg.in_channels}) with H and W "
                f"divisible by {f}; got shape {tuple(images.shape)}"
            )

    def encode_moments(self, images):
        """quant_conv(encoder(images)) before the logvar clamp: [mean | logvar] on the channel axis, float32."""
        self._check_images(images)
        h = self.encoder(images.astype(jnp.dtype(self.cfg.dtype)))
        return self.quant_conv(h).astype(jnp.float32)

    def encode(self, images):
        """images (B, H, W, C) in [-1, 1] → (mean, logvar), each (B, H/f, W/f, embed_dim); logvar ∈ [-30, 20]."""
        moments = self.encode_moments(images)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def sample_posterior(mean, logvar, key):
        return reparameterize(mean, logvar, jax.random.normal(key, mean.shape, jnp.float32))

    @staticmethod
    def kl(mean, logvar):
        """KL(N(mean, exp(logvar)) ‖ N(0, I)) summed over (H, W, C), one value per sample."""
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))

    def decode(self, z):
        """z (B, h, w, embed_dim) → images (B, h·f, w·f, out_ch), float32, nominally in [-1, 1]."""
        if z.ndim != 4 or z.shape[-1] != self.cfg.embed_dim:
            raise ValueError(
                f"TextureVAE.decode expects latents (B, h, w, {self.cfg.embed_dim}); got shape {tuple(z.shape)}"
            )
        h = self.post_quant_conv(z.astype(jnp.dtype(self.cfg.dtype)))
        return self.decoder(h).astype(jnp.float32)

    @staticmethod
    def to_uint8(x):
        """Decoder output in [-1, 1] → uint8 as clamp(floor(127.5·x + 128), 0, 255), as the reference."""
        return to_uint8(x)


def to_uint8(x):
    y = jnp.floor(127.5 * jnp.asarray(x, jnp.float32) + 128.0)
    return jnp.clip(y, 0.0, 255.0).astype(jnp.uint8)
