"""Image preprocessing of the SFD data path (docs/data.md#2-preprocessing), matching the reference pixel for pixel.

- `adm_center_crop`: ADM's `center_crop_arr` (PIL BOX halvings, then BICUBIC, floor-offset crop). Pillow itself does
  the resampling, because PIL's 8-bit fixed-point antialiased bicubic is what the reference ran; any other
  implementation is off by ±1 level.
- `dino_transform`: the DINOv2 input of the extraction path: ImageNet-normalise the [-1, 1] image, then torch's plain
  `F.interpolate(mode='bicubic', align_corners=False)` on the whole image. torch's kernel is Keys' cubic with
  a = -0.75, source coordinates computed in float32 and border-clamped taps; `jax.image.resize` uses a = -0.5 with
  antialiasing, so it is reproduced here with explicit interpolation matrices (`torch_bicubic_matrix`), applied with
  numpy on the host (`torch_bicubic_resize_np`) or inside jit (`torch_bicubic_resize`).
- `semvae_train_transform`: the SemVAE-training input (torchvision Resize(256, BICUBIC) + CenterCrop(224)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCH_CUBIC_A = -0.75


def _check_image(image, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    return image


# ----------------------------------------------------------------------------------------------- ADM center crop
def adm_center_crop(image_uint8_hwc, size: int = 256) -> np.ndarray:
    """ADM / SFD `center_crop_arr`: uint8 (H, W, 3) -> uint8 (size, size, 3)."""
    pil = Image.fromarray(_check_image(image_uint8_hwc))
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def to_unit_range(image_uint8) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] as the reference does it: ToTensor (/255) then Normalize(0.5, 0.5)."""
    x = np.asarray(image_uint8).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


# ------------------------------------------------------------------------------------------ torch plain bicubic
def _cubic_weights_f32(t: np.ndarray) -> np.ndarray:
    """torch's `get_cubic_upsample_coefficients` (a = -0.75) in float32; t (n,) in [0, 1) -> (n, 4)."""
    a = np.float32(_TORCH_CUBIC_A)
    one = np.float32(1.0)

    def conv1(x):  # |x| <= 1
        return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + one

    def conv2(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a

    x2 = one - t
    return np.stack([conv2(t + one), conv1(t), conv1(x2), conv2(x2 + one)], axis=-1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with out = M @ in along one axis, equal to torch's plain bicubic.

    The source coordinate (in/out)·(dst + 0.5) - 0.5 is rounded in float32 as torch does on CPU and GPU; with
    float64 coordinates the 256 -> 224 resize already differs by ~6e-5. Taps beyond the border repeat the edge
    pixel, so their weights add onto the first/last column.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic resize sizes must be positive, got {in_size} -> {out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    weights = _cubic_weights_f32(t)
    taps = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    taps = np.clip(taps, 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.repeat(np.arange(out_size), 4)
    np.add.at(matrix, (rows, taps.reshape(-1)), weights.reshape(-1).astype(np.float64))
    matrix.setflags(write=False)
    return matrix


def torch_bicubic_resize_np(x, size: tuple[int, int]) -> np.ndarray:
    """numpy torch-bicubic resize of (..., H, W, C) float arrays (float64 accumulation, float32 result)."""
    x = np.asarray(x, np.float64)
    mh = torch_bicubic_matrix(x.shape[-3], size[0])
    mw = torch_bicubic_matrix(x.shape[-2], size[1])
    out = np.einsum("oh,...hwc->...owc", mh, x)
    out = np.einsum("pw,...owc->...opc", mw, out)
    return out.astype(np.float32)


def torch_bicubic_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """jit-friendly torch-bicubic resize of (..., H, W, C) arrays; the matrices are trace-time constants.

    The contractions run at HIGHEST precision so a bf16-matmul default on accelerators does not degrade the inputs
    of DINOv2; the cost is negligible next to the ViT.
    """
    mh = jnp.asarray(torch_bicubic_matrix(x.shape[-3], size[0]), jnp.float32)
    mw = jnp.asarray(torch_bicubic_matrix(x.shape[-2], size[1]), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = x.astype(jnp.float32)
    out = jnp.einsum("oh,...hwc->...owc", mh, x, precision=hi)
    return jnp.einsum("pw,...owc->...opc", mw, out, precision=hi)


def imagenet_normalize(x01):
    """(x - mean) / std per channel in float32, the torchvision Normalize order (subtract, then divide)."""
    xp = jnp if isinstance(x01, jax.Array) else np
    mean = xp.asarray(IMAGENET_MEAN, xp.float32)
    std = xp.asarray(IMAGENET_STD, xp.float32)
    return (x01 - mean) / std


# ------------------------------------------------------------------------------------------- DINOv2 transforms
def dino_from_unit_range(x: jax.Array, size: int = 224) -> jax.Array:
    """Batched, jit-friendly DINOv2 input from images in [-1, 1] (B, H, W, 3) -> (B, size, size, 3) float32."""
    x = imagenet_normalize((x.astype(jnp.float32) + 1.0) / 2.0)
    return torch_bicubic_resize(x, (size, size))


def dino_transform(image_uint8_hwc, size: int = 224) -> np.ndarray:
    """DINOv2 input of the extraction path for one uint8 image (normally the ADM crop): float32 (size, size, 3).

    Normalise first, then resize the whole image (no crop), as `extract_features.py` does.
    """
    x = to_unit_range(_check_image(image_uint8_hwc))
    x = imagenet_normalize((x + np.float32(1.0)) / np.float32(2.0))
    return torch_bicubic_resize_np(x, (size, size))


def semvae_train_transform(image_uint8_hwc, resize: int = 256, crop: int = 224) -> np.ndarray:
    """SemVAE-training DINOv2 input: torchvision Resize(resize, BICUBIC) on PIL, CenterCrop(crop), ImageNet norm."""
    image = _check_image(image_uint8_hwc)
    h, w = image.shape[:2]
    # torchvision: the short side becomes `resize`, the long side int(resize * long / short) (truncated).
    if h <= w:
        new_h, new_w = resize, int(resize * w / h)
    else:
        new_h, new_w = int(resize * h / w), resize
    if new_h < crop or new_w < crop:
        raise ValueError(f"semvae_train_transform: resized image {new_h}x{new_w} is smaller than the crop {crop}")
    pil = Image.fromarray(image)
    if (new_w, new_h) != pil.size:
        pil = pil.resize((new_w, new_h), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    arr = arr[top : top + crop, left : left + crop]
    return imagenet_normalize(arr.astype(np.float32) / np.float32(255.0)).astype(np.float32)
