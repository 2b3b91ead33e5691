"""Reference latent statistics (`latents_stats.pt`, `latents_sv_stats.pt`) → our `stats.json`, without any shard.

    python -m sfd_jax.convert stats imagenet_train_256/latents_stats.pt weights/latent_stats \
        --semantic imagenet_train_256/latents_sv_stats.pt

The reference computes each file as `{'mean': m, 'std': s}`, torch tensors of shape (1, C, 1, 1): the per-channel
mean and unbiased std over (images, H, W) of 10,000 random training latents (C = 32 for the texture latent
`latents`, 16 for the SemVAE latent `latents_sv`). It ships them with the released weights but without latent
shards, and sampling needs only the texture part (to denormalise before decoding). The reference's PCA variant
(`latents_dino`) has no statistics file: those channels are fed to the DiT un-normalised, so without `--semantic`
the semantic entry is written as identity (mean 0, std 1, `normalise: false`) for `--semantic-channels` channels.

`convert_reference_stats(texture, semantic=None, *, semantic_channels=16, out=None)` is the importable form (the
model-bundle converter calls it); `read_reference_stats(path_or_obj, channels=None)` reads one file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sfd_jax.data import records

REFERENCE_FILES = {"texture": "latents_stats.pt", "semvae": "latents_sv_stats.pt"}


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, np.float64)


def read_reference_stats(src, channels: int | None = None, *, what: str = "stats") -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 vectors of one reference stats file (a path, or the already-loaded dict).

    Accepts the reference's (1, C, 1, 1) tensors and any shape holding C values in one axis (C, (C,), (1, C), ...);
    refuses anything else, naming the file, the key and the shape.
    """
    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else what
    if isinstance(src, (str, os.PathLike)):
        from sfd_jax.convert.common import read_checkpoint

        src = read_checkpoint(src)
    if not isinstance(src, dict):
        raise ValueError(f"{name}: expected a dict with 'mean' and 'std' tensors, got {type(src).__name__}")
    out = []
    for key in ("mean", "std"):
        if key not in src:
            raise ValueError(f"{name}: expected a dict with 'mean' and 'std', got keys {sorted(src)}")
        value = _as_numpy(src[key])
        if sum(s != 1 for s in value.shape) > 1:
            raise ValueError(
                f"{name}: {key} has shape {tuple(value.shape)}; expected per-channel values, e.g. the "
                "reference's (1, C, 1, 1)"
            )
        value = value.reshape(-1)
        if channels is not None and value.size != channels:
            raise ValueError(f"{name}: {key} has {value.size} channels, expected {channels}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name}: {key} has non-finite entries")
        out.append(value)
    mean, std = out
    if mean.shape != std.shape or mean.size == 0:
        raise ValueError(f"{name}: mean ({mean.size} channels) and std ({std.size}) must have the same channels")
    if not np.all(std > 0):
        raise ValueError(f"{name}: std has non-positive entries {std[std <= 0][:4].tolist()}")
    return mean, std


def convert_reference_stats(
    texture,
    semantic=None,
    *,
    semantic_channels: int = 16,
    texture_channels: int = 32,
    out: str | os.PathLike | None = None,
) -> dict:
    """Our stats.json document from the reference files; written atomically to `out` (a directory or a .json path)
    when given. `texture` / `semantic`: paths or loaded dicts; `semantic=None` = un-normalised semantic channels."""
    tex_mean, tex_std = read_reference_stats(texture, texture_channels, what="texture stats")
    sources = {"texture": os.path.abspath(texture) if isinstance(texture, (str, os.PathLike)) else "in-memory"}
    if semantic is None:
        if not 0 < int(semantic_channels) <= 16:
            raise ValueError(f"semantic_channels={semantic_channels} must lie in [1, 16]")
        sem_mean, sem_std = np.zeros(int(semantic_channels)), np.ones(int(semantic_channels))
        semantic_block = {"normalise": False}
    else:
        sem_mean, sem_std = read_reference_stats(semantic, None, what="semantic stats")
        sources["semantic"] = os.path.abspath(semantic) if isinstance(semantic, (str, os.PathLike)) else "in-memory"
        semantic_block = {}
    doc = {
        "format": records.STATS_FORMAT,
        "texture": {"mean": tex_mean.tolist(), "std": tex_std.tolist(), "channels": len(tex_mean)},
        "semantic": {"mean": sem_mean.tolist(), "std": sem_std.tolist(), "channels": len(sem_mean), **semantic_block},
        "num_images": None,
        "selection": {"from": "reference stats files", "files": sources},
        "skipped_images_in_dataset": 0,
        "made_by": {"reference_stats": sources},
    }
    if out is not None:
        path = os.fspath(out)
        if not path.endswith(".json"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, "stats.json")
        records.write_json_atomic(path, doc)
    return doc


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "stats",
        help="reference latents_stats.pt (+ latents_sv_stats.pt) -> stats.json",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("input", help="the reference's latents_stats.pt (texture latent statistics)")
    p.add_argument("output_dir", help="directory to write stats.json into")
    p.add_argument(
        "--semantic",
        default=None,
        help="latents_sv_stats.pt (SemVAE latent statistics); omit for un-normalised (PCA) channels",
    )
    p.add_argument(
        "--semantic-channels",
        type=int,
        default=16,
        help="semantic channel count when --semantic is omitted (the reference's PCA variant: 8)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    doc = convert_reference_stats(
        args.input, args.semantic, semantic_channels=args.semantic_channels, out=args.output_dir
    )
    print(
        f"wrote {os.path.join(args.output_dir, 'stats.json')}: texture {doc['texture']['channels']} channels, "
        f"semantic {doc['semantic']['channels']} channels"
        f"{'' if doc['semantic'].get('normalise', True) else ' (un-normalised)'}"
    )
    return 0
