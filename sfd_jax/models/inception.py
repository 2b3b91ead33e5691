"""The FID Inception-v3 (pytorch-fid's port of the TF graph the ADM evaluator runs), in Flax NNX, channels-last.

Architecture = torchvision `inception_v3(num_classes=1008, aux_logits=False)` with pytorch-fid's FID blocks: the
pool branch of blocks A, C and E_1 is a 3×3/1 average pool that does not count the padding, the pool branch of the
last block (E_2, Mixed_7c) is a 3×3/1 max pool. Every BasicConv2d is conv (no bias) → BatchNorm (eps 1e-3, running
statistics) → ReLU. Attribute names equal the torchvision state-dict names, so `sfd_jax.convert.inception` maps
`Mixed_6d.branch1x1.conv.weight` to `model.Mixed_6d.branch1x1.conv.kernel` mechanically.

Outputs of `InceptionV3.__call__` (input: the normalised 299×299 image, NHWC):
- `pool3` (B, 2048): the FID feature (TF `pool_3:0`).
- `logits_nobias` (B, 1008) = pool3 @ fc.weightᵀ: ADM's Inception Score feeds softmax of these (the TF graph's
  `softmax/logits/MatMul`, no bias). `logits` adds the fc bias (torchvision's fc layer).
- `spatial` (B, 17·17·7): the sFID feature. ADM uses the TF tensor `mixed_6/conv:0`, the 1×1 branch (after batch
  norm and ReLU) of the TF block `mixed_6`, which is torchvision's `Mixed_6d` (TF `mixed_3` = Mixed_6a,
  `mixed_4..7` = Mixed_6b..6e, the mapping torch-fidelity's weight converter uses). So the feature is
  `Mixed_6d.branch1x1` output, channels [:7], flattened in (h, w, c) order like ADM's `reshape([N, -1])`.

Input preprocessing (`preprocess`): ADM feeds uint8 values (0..255, float32) to the graph, which resizes with TF1
bilinear (no half-pixel offset) and normalises with (x − 128)/128 — `resize='tf1'`, the default, needed for
numbers comparable with ADM/SFD papers. pytorch-fid divides by 255, resizes with half-pixel bilinear and maps to
2x − 1 — `resize='torch'`. The two resizes differ by up to ~15 levels, so their FIDs are not interchangeable.

Convolutions and the fc layer run at `precision='highest'` by default: the default float32 precision is TF32 on
GPUs and bfloat16 passes on TPUs, both far less precise than the float32 features ADM's numbers come from.

The weights start at zero (no random init: this network is never trained); load them with
`sfd_jax.convert.inception.load_inception`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SFID_CHANNELS = 7
BN_EPS = 1e-3
RESIZE_MODES = ("tf1", "torch")

# Order of `stage_means` (matches the golden `net/stage_mean/*` keys).
STAGES = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "MaxPool_1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "MaxPool_2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "AvgPool",
)


def _host_zeros(key, shape, dtype=jnp.float32):
    # A fixed feature extractor: weights always come from a checkpoint (sfd_jax.convert.inception), so start from
    # host zeros instead of a random init (~10 s for 24M parameters on CPU) that would be overwritten.
    del key
    return np.zeros(shape, dtype)


def _host_ones(key, shape, dtype=jnp.float32):
    del key
    return np.ones(shape, dtype)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """conv (no bias) → BatchNorm(eps 1e-3, running statistics) → ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dtype=jnp.float32,
        precision="highest",
        rngs: nnx.Rngs,
    ):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            _pair(kernel_size),
            strides=_pair(stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=dtype,
            precision=precision,
            kernel_init=nnx.with_partitioning(_host_zeros, (None, None, "conv_in", "conv_out")),
            rngs=rngs,
        )
        # Normalisation in float32 whatever the compute dtype (house rule); the next conv casts back.
        self.bn = nnx.BatchNorm(
            out_channels,
            use_running_average=True,
            epsilon=BN_EPS,
            dtype=jnp.float32,
            scale_init=nnx.with_partitioning(_host_ones, ("conv_out",)),
            bias_init=nnx.with_partitioning(_host_zeros, ("conv_out",)),
            rngs=rngs,
        )

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TF's AVG pool with SAME padding averages over the valid taps only (torch: count_include_pad=False).
    return nnx.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s1(x):
    return nnx.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
    return nnx.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nnx.Module):
    """FIDInceptionA (Mixed_5b/c/d): concat [1x1, 5x5, 3x3dbl, pool]."""

    def __init__(self, in_channels: int, pool_features: int, **kw):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, **kw)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (35×35 → 17×17): concat [3x3, 3x3dbl, max pool]."""

    def __init__(self, in_channels: int, **kw):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC (Mixed_6b..6e): concat [1x1, 7x7, 7x7dbl, pool]. Returns (output, branch1x1 output)."""

    def __init__(self, in_channels: int, channels_7x7: int, **kw):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, **kw)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nnx.Module):
    """Mixed_7a (17×17 → 8×8): concat [3x3, 7x7x3, max pool]."""

    def __init__(self, in_channels: int, **kw):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (Mixed_7b, `pool='avg'`) / FIDInceptionE_2 (Mixed_7c, `pool='max'`):
    concat [1x1, 3x3_2a, 3x3_2b, 3x3dbl_3a, 3x3dbl_3b, pool]."""

    def __init__(self, in_channels: int, *, pool: Literal["avg", "max"], **kw):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' (E_1) or 'max' (E_2), got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, **kw)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3_s1(x)
        return jnp.concatenate(
            [
                b1,
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(bd),
                self.branch3x3dbl_3b(bd),
                self.branch_pool(pooled),
            ],
            axis=-1,
        )


class InceptionV3(nnx.Module):
    """FID Inception-v3 on a normalised NHWC input (299×299 for ADM/pytorch-fid features; ≥ 75×75 works).
    Zero weights until loaded (`sfd_jax.convert.inception.load_inception`)."""

    def __init__(
        self, *, num_classes: int = NUM_CLASSES, dtype=jnp.float32, precision="highest", rngs: nnx.Rngs | None = None
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)
        self.dtype = dtype
        self.precision = precision
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = InceptionE(2048, pool="max", **kw)
        self.fc = nnx.Linear(
            POOL_DIM,
            num_classes,
            precision=precision,
            kernel_init=nnx.with_partitioning(_host_zeros, (None, None)),
            bias_init=nnx.with_partitioning(_host_zeros, (None,)),
            rngs=rngs,
        )

    def __call__(self, x, *, return_stage_means: bool = False) -> dict:
        """x: (B, H, W, 3) normalised input (see `preprocess`). Returns a dict of float32 arrays:
        pool3 (B, 2048), logits_nobias / logits (B, 1008), spatial (B, h·w·7) and, if asked, `stage_means`
        {stage: (B, C) spatial mean} for locating a mismatch."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects (B, H, W, 3) channels-last input, got shape {x.shape}")
        means = {}

        def keep(name, h):
            if return_stage_means:
                means[name] = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
            return h

        h = keep("Conv2d_1a_3x3", self.Conv2d_1a_3x3(x))
        h = keep("Conv2d_2a_3x3", self.Conv2d_2a_3x3(h))
        h = keep("Conv2d_2b_3x3", self.Conv2d_2b_3x3(h))
        h = keep("MaxPool_1", _max_pool_3x3_s2(h))
        h = keep("Conv2d_3b_1x1", self.Conv2d_3b_1x1(h))
        h = keep("Conv2d_4a_3x3", self.Conv2d_4a_3x3(h))
        h = keep("MaxPool_2", _max_pool_3x3_s2(h))
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"):
            h = keep(name, getattr(self, name)(h))
        spatial = None
        for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            h, branch1x1 = getattr(self, name)(h)
            keep(name, h)
            if name == "Mixed_6d":
                spatial = branch1x1[..., :SFID_CHANNELS]
        for name in ("Mixed_7a", "Mixed_7b", "Mixed_7c"):
            h = keep(name, getattr(self, name)(h))
        pool3 = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        if return_stage_means:
            means["AvgPool"] = pool3
        w = self.fc.kernel[...].astype(jnp.float32)
        logits_nobias = jnp.dot(pool3, w, precision=self.precision)
        out = {
            "pool3": pool3,
            "logits_nobias": logits_nobias,
            "logits": logits_nobias + self.fc.bias[...].astype(jnp.float32),
            "spatial": spatial.astype(jnp.float32).reshape(spatial.shape[0], -1),
        }
        if return_stage_means:
            out["stage_means"] = means
        return out


# ---------------------------------------------------------------------------------------------------------------
# Input resizing. Index/weight tables are built once per (in, out) size in numpy float32, as both references
# compute their source coordinates in float32; the gathers and lerps then run on device.


def _tf1_table(n_in: int, n_out: int):
    """TF1 legacy ResizeBilinear (align_corners=False, half_pixel_centers=False): src = dst·(in/out)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.arange(n_out, dtype=np.float32) * scale
    lo = np.floor(src)
    i0 = np.maximum(lo.astype(np.int64), 0)
    i1 = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
    return i0, i1, (src - lo).astype(np.float32)


def _torch_table(n_in: int, n_out: int):
    """torch bilinear, align_corners=False: src = (dst + 0.5)·(in/out) − 0.5, clamped at 0."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, lam1


def _resize_axis(x, axis: int, table, form: str):
    i0, i1, lam = table
    shape = [1] * x.ndim
    shape[axis] = -1
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    lam = jnp.asarray(lam).reshape(shape)
    if form == "tf1":  # TF's kernel: top + (bottom − top)·lerp
        return a + (b - a) * lam
    return a * (1.0 - lam) + b * lam  # torch's kernel: x0·λ0 + x1·λ1


def resize_bilinear(x, size: int | Sequence[int], mode: str = "tf1"):
    """Bilinear resize of (B, H, W, C) float32 to `size`, TF1 legacy (`'tf1'`) or torch half-pixel (`'torch'`).
    Both references interpolate along W first, then H; so does this."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    out_h, out_w = _pair(size)
    _, h, w, _ = x.shape
    make = _tf1_table if mode == "tf1" else _torch_table
    x = x.astype(jnp.float32)
    if (h, w) == (out_h, out_w):
        return x  # both formulas reduce to the identity; skip the gathers
    x = _resize_axis(x, 2, make(w, out_w), mode)
    return _resize_axis(x, 1, make(h, out_h), mode)


def preprocess(images_u8, *, resize: str = "tf1", size: int = INPUT_SIZE):
    """uint8 (B, H, W, 3) images → the network input (B, size, size, 3) float32.

    'tf1' (ADM): resize the 0..255 values with TF1 bilinear, then (x − 128)/128.
    'torch' (pytorch-fid): x/255, half-pixel bilinear, then 2x − 1.
    """
    if images_u8.ndim != 4 or images_u8.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got shape {images_u8.shape}")
    if images_u8.dtype != jnp.uint8:
        raise ValueError(f"expected uint8 images (values 0..255), got dtype {images_u8.dtype}")
    x = images_u8.astype(jnp.float32)
    if resize == "tf1":
        return (resize_bilinear(x, size, "tf1") - 128.0) * 0.0078125
    if resize == "torch":
        return 2.0 * resize_bilinear(x / 255.0, size, "torch") - 1.0
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def features_from_uint8(model: InceptionV3, images_u8, *, resize: str = "tf1", size: int = INPUT_SIZE) -> dict:
    """`model(preprocess(images_u8))`: pool3, logits_nobias, logits and spatial features of uint8 images."""
    return model(preprocess(images_u8, resize=resize, size=size).astype(model.dtype))
