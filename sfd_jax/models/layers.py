"""Building blocks of the LightningDiT denoiser (docs/model.md#architecture), channels-last, Flax NNX.

Every weight carries logical axis names (`out_sharding` metadata) from the project vocabulary: 'embed' (model width
D), 'mlp' (wide hidden / fused outputs), 'vocab' (label-table rows), None for small dims. Parameters are float32;
`dtype` is the compute dtype. Norms, softmax and the sinusoidal tables are computed in float32.

Fixed tables (2-D sin-cos position embedding, RoPE cos/sin) are `FixedBuffer` variables, not `nnx.Param`, so an
optimiser built on `nnx.Param` never sees them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

xavier_uniform = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


# ----------------------------------------------------------------------------------------------------------------
# nnx-native layers shared by the transformer encoders (SemVAE, DINOv2): fp32 params with logical axis names
# ----------------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name) -> Any:
    if name in _DTYPES.values():
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; allowed: {sorted(_DTYPES)}")
    return _DTYPES[name]


_TRUNC_NORMAL_002 = jax.nn.initializers.truncated_normal(0.02)


def dense(
    din: int,
    dout: int,
    names: tuple,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    use_bias: bool = True,
    kernel_init=_TRUNC_NORMAL_002,
    bias_init=jax.nn.initializers.zeros,
) -> nnx.Linear:
    """nnx.Linear with fp32 params carrying logical axis names (bias takes the output name)."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
        kernel_init=nnx.with_partitioning(kernel_init, names),
        bias_init=nnx.with_partitioning(bias_init, (names[1],)),
    )


def torch_linear(
    din: int, dout: int, names: tuple, *, rngs: nnx.Rngs, dtype=jnp.float32, zero_bias: bool = False, kernel_init=None
) -> nnx.Linear:
    """`dense` initialised like torch's nn.Linear: kernel and bias U(±1/√fan_in) (bias optionally zero), so
    training from scratch starts where the reference starts."""
    bound = din**-0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa
    return dense(
        din,
        dout,
        names,
        rngs=rngs,
        dtype=dtype,
        kernel_init=kernel_init or uniform,
        bias_init=jax.nn.initializers.zeros if zero_bias else uniform,
    )


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm computed in fp32 (two-pass variance, like torch) whatever the input dtype; output fp32."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nnx.with_partitioning(jax.nn.initializers.ones, ("embed",)),
        bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, ("embed",)),
        rngs=rngs,
    )


def cosine_similarity(a, b, axis: int = -1, eps: float = 1e-8) -> jax.Array:
    """torch.nn.functional.cosine_similarity: (a/max(‖a‖, eps))·(b/max(‖b‖, eps)) along `axis`.

    Each norm is clamped separately (torch ≥ 1.13), which differs from max(‖a‖·‖b‖, eps) only for near-zero vectors.
    The norm is sqrt(max(Σx², eps²)) so its gradient stays finite at x = 0 (a zero-initialised head predicts 0).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    norm_a = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=axis, keepdims=True), eps * eps))
    norm_b = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=axis, keepdims=True), eps * eps))
    return jnp.sum((a / norm_a) * (b / norm_b), axis=axis)


def count_params(module: nnx.Module) -> int:
    """Number of scalar parameters (works on abstract modules from nnx.eval_shape)."""
    return int(sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))))


class FixedBuffer(nnx.Variable):
    """A non-trainable constant table (position embedding, RoPE): stored in the state, never optimised."""


class KeyStream:
    """Stand-in for `nnx.Rngs` at construction: `params()` returns fold_in(key, n) for n = 0, 1, ...

    Drawing from `nnx.Rngs` updates its counter Variable, which under tracing (nnx.eval_shape) costs ~15 ms per
    draw in flax 0.12 — 6 s for the XL model's 414 parameters. A Python counter makes the same draws free.
    """

    def __init__(self, rngs: nnx.Rngs | jax.Array):
        self.key = rngs.params() if isinstance(rngs, nnx.Rngs) else rngs
        self.count = 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count - 1)


def _param(rngs: nnx.Rngs | KeyStream, init, shape: tuple, names: Sequence[str | None]) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), shape, jnp.float32))


class Dense(nnx.Module):
    """y = x @ kernel + bias with kernel (in, out); the reference's torch Linear weight is kernel.T."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: tuple[str | None, str | None],
        kernel_init=xavier_uniform,
        bias_init=zeros,
        use_bias: bool = True,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = _param(rngs, kernel_init, (in_features, out_features), names)
        self.bias = _param(rngs, bias_init, (out_features,), (names[1],)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """x·rsqrt(mean(x²) + eps) in float32, cast back to the input dtype, times a learnable weight (no bias)."""

    def __init__(self, dim: int, *, name: str | None = "embed", eps: float = 1e-6, rngs: nnx.Rngs):
        self.weight = _param(rngs, ones, (dim,), (name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation; shift/scale are per sample (B, D), x is (B, T, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """[cos(t·f_k), sin(t·f_k)] with f_k = exp(−ln(max_period)·k/(dim/2)): cos first, raw t (no ×1000), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
    """sinusoid(t) (256) → Linear → SiLU → Linear, width `dim` (D/2 in the dual-timestep DiT)."""

    def __init__(self, dim: int, *, freq_dim: int = 256, dtype=jnp.float32, rngs: nnx.Rngs):
        normal = jax.nn.initializers.normal(0.02)
        self.fc1 = Dense(freq_dim, dim, names=(None, "embed"), kernel_init=normal, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(dim, dim, names=("embed", None), kernel_init=normal, dtype=dtype, rngs=rngs)
        self.freq_dim = freq_dim

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(timestep_sinusoid(t, self.freq_dim))))


class LabelEmbedder(nnx.Module):
    """Label table with num_classes + 1 rows; row num_classes is the null label. No dropout here (train step)."""

    def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding_table = _param(
            rngs, jax.nn.initializers.normal(0.02), (num_classes + 1, dim), ("vocab", "embed")
        )

    def __call__(self, y: jax.Array) -> jax.Array:
        return jnp.take(self.embedding_table[...], y, axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Fixed tables (numpy, computed once at construction; the reference computes them the same way)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """(grid², dim) float32: token (i=row, j=col) → [sin(jω), cos(jω), sin(iω), cos(iω)], column first.

    Computed in float64 and cast, as the reference does (MAE's get_2d_sincos_pos_embed).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    coords = np.arange(grid_size, dtype=np.float32)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos):
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def rope_tables_2d(head_dim: int, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """EVA-02 2-D RoPE cos/sin tables, each (grid², head_dim) float32.

    θ_k = 10000^(−2k/(head_dim/2)), k < head_dim/4, each angle repeated twice (interleaved pairs); token (i, j) gets
    [i·θ (head_dim/2) | j·θ (head_dim/2)]. float32 arithmetic like the reference's torch buffers.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    theta = 1.0 / (np.float32(10000.0) ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half)))
    theta = theta.astype(np.float32)
    pos = np.arange(grid_size, dtype=np.float32)
    angles = np.repeat(pos[:, None] * theta[None, :], 2, axis=-1)  # (grid, half)
    rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, half))
    cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, half))
    full = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, head_dim)
    return np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """Each adjacent pair (x_2m, x_2m+1) → (−x_2m+1, x_2m)."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, heads, head_dim); cos/sin (T, head_dim). Rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[None, :, None, :] + rotate_half(x32) * sin[None, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Transformer parts


class Attention(nnx.Module):
    """Fused qkv → per-head qk-RMSNorm → 2-D RoPE → softmax attention (fp32 logits) → output projection."""

    def __init__(
        self, dim: int, num_heads: int, *, dtype=jnp.float32, attention_impl: str | None = None, rngs: nnx.Rngs
    ):
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Dense(dim, 3 * dim, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(self.head_dim, name=None, rngs=rngs)
        self.k_norm = RMSNorm(self.head_dim, name=None, rngs=rngs)
        self.proj = Dense(dim, dim, names=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array, rope_cos: jax.Array, rope_sin: jax.Array) -> jax.Array:
        b, t, d = x.shape
        # Output features are [q | k | v], each (head, head_dim) with head the slower index.
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(self.q_norm(q), rope_cos, rope_sin)
        k = apply_rope(self.k_norm(k), rope_cos, rope_sin)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.proj(out.reshape(b, t, d))


class SwiGLU(nnx.Module):
    """w12 → [gate | value] → SiLU(gate)·value → w3."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.w12 = Dense(dim, 2 * hidden, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.w3 = Dense(hidden, dim, names=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, value = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(gate) * value)


class DiTBlock(nnx.Module):
    """adaLN-Zero block: m = Linear(SiLU(c)) → [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp]."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        dtype=jnp.float32,
        attention_impl: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.norm1 = RMSNorm(dim, rngs=rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.norm2 = RMSNorm(dim, rngs=rngs)
        self.mlp = SwiGLU(dim, mlp_hidden, dtype=dtype, rngs=rngs)
        self.adaLN_modulation = Dense(dim, 6 * dim, names=("embed", "mlp"), kernel_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array, rope_cos: jax.Array, rope_sin: jax.Array) -> jax.Array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.adaLN_modulation(jax.nn.silu(c)), 6, axis=-1
        )
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_cos, rope_sin)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nnx.Module):
    """(shift, scale) = Linear(SiLU(c)) (shift first) → Linear(modulate(RMSNorm(x))) to the output channels."""

    def __init__(self, dim: int, out_channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm_final = RMSNorm(dim, rngs=rngs)
        self.linear = Dense(dim, out_channels, names=("embed", None), kernel_init=zeros, dtype=dtype, rngs=rngs)
        self.adaLN_modulation = Dense(dim, 2 * dim, names=("embed", "mlp"), kernel_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class RepaProjector(nnx.Module):
    """Linear(D → P) → SiLU → Linear(P → P) → SiLU → Linear(P → repa_dim), per token."""

    def __init__(self, dim: int, projector_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = Dense(dim, projector_dim, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(projector_dim, projector_dim, names=("mlp", None), dtype=dtype, rngs=rngs)
        self.fc3 = Dense(projector_dim, out_dim, names=("mlp", None), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x)))))


def config_from_dict(cls, d: Mapping[str, Any]):
    """`cls(**d)` for a config dataclass, refusing keys it does not have (a config.json from another version or a
    typo would otherwise be dropped or fail with a bare TypeError)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(known)}")
    return cls(**dict(d))
