"""Texture latent (normalised, as the DiT sees it) → uint8 image: the dataset statistics and the texture VAE decoder
used by every sampling path (`ImageGenerator`, `--mode=sample`, the in-training FID, the demo)."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx


def read_latent_stats(path: str, texture_channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(texture mean, texture std) float32 from the extraction job's stats.json (or a directory holding it).

    Format (`sfd_jax.data.records`): {"format": "sfd_jax.latent_stats.v1", "texture": {"mean": [...], "std": [...]},
    "semantic": {...}}.
    """
    from sfd_jax import paths
    from sfd_jax.data import records

    path = os.fspath(path)
    if paths.isdir(path):
        path = paths.join(path, "stats.json")
    if not paths.exists(path):
        raise FileNotFoundError(
            f"latent statistics not found: {path} (the stats.json written by --mode=extract beside the latent shards)"
        )
    from sfd_jax.errors import DataError

    stats = paths.read_json(path, "latent statistics")
    if not isinstance(stats, dict) or stats.get("format") != records.STATS_FORMAT:
        raise DataError(
            f"{path} has format {stats.get('format') if isinstance(stats, dict) else None!r}, "
            f"expected {records.STATS_FORMAT!r}"
        )
    texture = stats.get("texture", {}) if isinstance(stats.get("texture"), dict) else {}
    mean = records.check_stats_vector(path, "texture.mean", texture.get("mean", []), texture_channels)
    std = records.check_stats_vector(path, "texture.std", texture.get("std", []), mean.size)
    return mean.astype(np.float32), std.astype(np.float32)


class TextureDecoder:
    """Texture latent (normalised, as the DiT sees it) → uint8 image, with the texture VAE.

    decode_batch: images decoded at once per device (the f16d32 decoder at 256×256 needs ~0.1 GB of temporary
    memory per image in float32, XLA CPU estimate); None decodes a device's whole batch together.
    """

    def __init__(
        self,
        vae: nnx.Module,
        texture_mean,
        texture_std,
        *,
        latent_multiplier: float = 1.0,
        decode_batch: int | None = None,
    ):
        self.vae = vae
        self.mean = np.asarray(texture_mean, np.float32).reshape(-1)
        self.std = np.asarray(texture_std, np.float32).reshape(-1)
        embed_dim = vae.cfg.embed_dim
        if self.mean.shape != (embed_dim,) or self.std.shape != (embed_dim,):
            raise ValueError(
                f"texture stats have shapes {self.mean.shape} / {self.std.shape}; the texture VAE "
                f"decodes {embed_dim} channels"
            )
        if not latent_multiplier > 0:
            raise ValueError(f"latent_multiplier must be > 0, got {latent_multiplier}")
        if decode_batch is not None and decode_batch < 1:
            raise ValueError(f"decode_batch must be a positive int or None, got {decode_batch}")
        self.latent_multiplier = float(latent_multiplier)
        self.decode_batch = decode_batch
        self.channels = embed_dim

    @classmethod
    def from_files(
        cls,
        vae_path: str,
        stats_path: str,
        *,
        latent_multiplier: float = 1.0,
        decode_batch: int | None = None,
        dtype: str | None = None,
    ) -> "TextureDecoder":
        from sfd_jax.convert.texture_vae import load_texture_vae

        _, vae = load_texture_vae(vae_path, dtype=dtype)
        mean, std = read_latent_stats(stats_path, vae.cfg.embed_dim)
        return cls(vae, mean, std, latent_multiplier=latent_multiplier, decode_batch=decode_batch)

    def key(self) -> tuple:
        return (nnx.graphdef(self.vae), self.latent_multiplier, self.decode_batch)

    def image_shape(self, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
        f = self.vae.cfg.downsample_factor
        return latent_hw[0] * f, latent_hw[1] * f, self.vae.cfg.out_ch

    def local_decode(self, graphdef, vae_state, mean, std, z_local):
        """Per-device decode of normalised texture latents (b, h, w, C) → uint8 (b, H, W, 3)."""
        vae = nnx.merge(graphdef, vae_state)
        z = z_local * (std / self.latent_multiplier) + mean

        def decode(zz):
            return vae.to_uint8(vae.decode(zz))

        b = z.shape[0]
        micro = self.decode_batch or b
        if micro >= b:
            return decode(z)
        if b % micro:
            raise ValueError(f"per-device batch {b} is not a multiple of decode_batch {micro}")
        return jax.lax.map(lambda one: decode(one[None])[0], z, batch_size=micro)
