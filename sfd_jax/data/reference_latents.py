"""Convert latents extracted by the reference code (SFD `extract_features.py`) into this project's format.

    python -m sfd_jax.data.reference_latents --src=/data/imagenet-sfd-latents/train_256 --dst=/data/sfd_latents

Reference layout (one `latents_rankRR_shardKKK.safetensors` per 1,000 images and rank, NCHW):
  latents, latents_flip          (N, 32, 16, 16)   texture posterior samples (float32)
  latents_sv, latents_sv_flip    (N, 16, 16, 16)   SemVAE posterior samples, from tokens 'b (h w) d -> b d h w'
  feats_dino, feats_dino_flip    (N, 768, 16, 16)  DINOv2 x_norm_patchtokens, 'b (h w) d -> b d h w', float16
  labels                         (N,)              int64
and, beside them, `latents_stats.pt` / `latents_sv_stats.pt` = {'mean': (1, C, 1, 1), 'std': (1, C, 1, 1)} (torch).

Each input file becomes one shard (sorted by file name, which is the reference reader's order); records get source
index = running position over those files. Stats come from the reference .pt files when both exist (reading them
needs torch), else they are computed like extraction does (`stats_images` seeded random non-flipped records).
`semantic_key='latents_dino'` converts the reference's PCA variant instead of the SemVAE latents.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Sequence

import numpy as np

from sfd_jax.data import records

TEXTURE_KEYS = ("latents", "latents_flip")
DINO_KEYS = ("feats_dino", "feats_dino_flip")


def _read_file(path: str, semantic_key: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    wanted = (*TEXTURE_KEYS, semantic_key, semantic_key + "_flip", *DINO_KEYS, "labels")
    try:
        with safe_open(path, framework="np") as f:
            keys = set(f.keys())
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise ValueError(
                    f"{path}: missing keys {missing}; present: {sorted(keys)} (REPA targets "
                    "feats_dino* are required; pass semantic_key='latents_dino' for the PCA variant)"
                )
            arrays = {k: f.get_tensor(k) for k in wanted}
    except (OSError, RuntimeError) as e:  # safetensors raises these on truncated / non-safetensors files
        raise ValueError(f"cannot read reference latents {path}: {type(e).__name__}: {e}") from e
    n = len(arrays["labels"])
    for k in wanted[:-1]:
        a = arrays[k]
        if a.ndim != 4 or a.shape[0] != n:
            raise ValueError(f"{path}: {k} has shape {a.shape}, expected NCHW with N={n} (labels)")
    for a, b in (("latents", "latents_flip"), (semantic_key, semantic_key + "_flip"), DINO_KEYS):
        if arrays[a].shape != arrays[b].shape:
            raise ValueError(f"{path}: {b} has shape {arrays[b].shape}, {a} has {arrays[a].shape}")
    if arrays[semantic_key].shape[2:] != arrays["latents"].shape[2:]:
        raise ValueError(
            f"{path}: {semantic_key} grid {arrays[semantic_key].shape[2:]} differs from the texture "
            f"latents' {arrays['latents'].shape[2:]}"
        )
    return arrays


def _to_records(arrays: dict[str, np.ndarray], semantic_key: str) -> dict[str, np.ndarray]:
    nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    tokens = lambda a: nhwc(a).reshape(a.shape[0], a.shape[2] * a.shape[3], a.shape[1])  # noqa: E731
    return {
        "texture": nhwc(arrays["latents"]),
        "texture_flip": nhwc(arrays["latents_flip"]),
        "semantic": nhwc(arrays[semantic_key]),
        "semantic_flip": nhwc(arrays[semantic_key + "_flip"]),
        "dino": tokens(arrays["feats_dino"]),
        "dino_flip": tokens(arrays["feats_dino_flip"]),
    }


def _count_images(files: list[str]) -> list[int]:
    """Images per file, from the 'labels' tensor's shape alone (nothing is read yet)."""
    from safetensors import safe_open

    counts = []
    for path in files:
        with safe_open(path, framework="np") as f:
            if "labels" not in f.keys():
                raise ValueError(f"{path}: no 'labels' tensor; present: {sorted(f.keys())}")
            counts.append(int(f.get_slice("labels").get_shape()[0]))
    return counts


def _dataset_meta(src: str, files: list[str], layout, total: int, use_reference: bool, settings: dict) -> dict:
    """dataset.json of the conversion; `settings`: semantic_key, latent_dtype, feature_dtype, seed, stats_images."""
    return {
        "format": records.FORMAT,
        "layout": layout.to_json(),
        "shards": [records.shard_name("latents", s, len(files)) for s in range(len(files))],
        "num_source_images": total,
        "extraction": {"converted_from": "SFD reference safetensors", **settings},
        "source": {"kind": "reference_latents", "src": os.path.abspath(src)},
        "made_by": {
            "reference_latents": {
                "src": os.path.abspath(src),
                "files": [os.path.basename(f) for f in files],
                "semantic_key": settings["semantic_key"],
                "stats": "reference .pt files" if use_reference else "computed",
            }
        },
    }


def _check_or_write_dataset_json(dst: str, meta: dict) -> None:
    os.makedirs(dst, exist_ok=True)
    meta_path = os.path.join(dst, "dataset.json")
    if os.path.exists(meta_path):
        old = records.read_json(meta_path, "dataset description")
        if {k: old.get(k) for k in ("layout", "shards", "num_source_images")} != {
            k: meta[k] for k in ("layout", "shards", "num_source_images")
        }:
            raise ValueError(f"{dst} already holds a different dataset; use a new directory")
    else:
        records.write_json_atomic(meta_path, meta)


def _write_shard(dst: str, name: str, path: str, arrays: dict, start: int, layout, selection, semantic_key: str):
    """One reference file's images as shard `name` (records first, then its .json with the moments of the images
    in the stats `selection`); source indices run from `start`."""
    n = len(arrays["labels"])
    fields = _to_records(arrays, semantic_key)
    index = np.arange(start, start + n)
    writer = records.ShardWriter(os.path.join(dst, name))
    try:
        writer.write(layout.pack_pairs(index=index, label=arrays["labels"], **fields))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    chosen = np.isin(index, selection)
    stored = {k: fields[k][chosen].astype(layout.field_spec(k)[0]) for k in ("texture", "semantic")}
    shard_meta = {
        "num_records": 2 * n,
        "num_images": n,
        "first_index": start,
        "stop_index": start + n,
        "skipped": [],
        "label_range": [int(np.min(arrays["labels"])), int(np.max(arrays["labels"]))],
        "source_file": os.path.basename(path),
        "moments": {
            "images": int(chosen.sum()),
            "texture": records.Moments.of(stored["texture"]).to_json(),
            "semantic": records.Moments.of(stored["semantic"]).to_json(),
        },
    }
    records.write_json_atomic(os.path.join(dst, name + ".json"), shard_meta)


def _write_reference_stats(dst: str, ref_stats: list[str], layout, semantic_key: str, made_by: dict) -> dict:
    """stats.json from the reference's *_stats.pt files (reading them needs torch)."""
    missing = [p for p in ref_stats if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"stats='reference' but {missing} do not exist")
    from sfd_jax.data.reference_stats import convert_reference_stats

    doc = convert_reference_stats(
        ref_stats[0],
        ref_stats[1] if len(ref_stats) > 1 else None,
        semantic_channels=layout.semantic_shape[-1],
        texture_channels=layout.texture_shape[-1],
    )
    if doc["semantic"]["channels"] != layout.semantic_shape[-1]:
        raise ValueError(
            f"{ref_stats[1]}: mean has {doc['semantic']['channels']} entries, the {semantic_key} "
            f"latents have {layout.semantic_shape[-1]} channels"
        )
    doc["made_by"] = made_by
    records.write_json_atomic(os.path.join(dst, "stats.json"), doc)
    return doc


def convert(
    src: str,
    dst: str,
    *,
    semantic_key: str = "latents_sv",
    stats: str = "auto",
    latent_dtype: str = "float32",
    feature_dtype: str = "float16",
    stats_images: int = 10000,
    seed: int = 0,
) -> dict:
    """Convert every `*.safetensors` in `src` into a dataset in `dst` (resumable: finished shards are kept).

    `stats`: 'auto' (reference .pt files when both exist, else computed), 'reference' (require them), or 'compute'.
    """
    if stats not in ("auto", "reference", "compute"):
        raise ValueError(f"stats={stats!r}; choose 'auto', 'reference' or 'compute'")
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {src}")
    counts = _count_images(files)
    total = sum(counts)
    first = _read_file(files[0], semantic_key)
    sample = _to_records({k: v[:1] for k, v in first.items()}, semantic_key)
    layout = records.RecordLayout(
        sample["texture"].shape[1:], sample["semantic"].shape[1:], sample["dino"].shape[1:], latent_dtype, feature_dtype
    )
    # The PCA channels (latents_dino) are not normalised by the reference, so only the texture file is needed then.
    ref_stats = [os.path.join(src, "latents_stats.pt")]
    if semantic_key == "latents_sv":
        ref_stats.append(os.path.join(src, "latents_sv_stats.pt"))
    use_reference = stats == "reference" or (stats == "auto" and all(map(os.path.exists, ref_stats)))
    settings = {
        "semantic_key": semantic_key,
        "latent_dtype": latent_dtype,
        "feature_dtype": feature_dtype,
        "seed": seed,
        "stats_images": stats_images,
    }
    meta = _dataset_meta(src, files, layout, total, use_reference, settings)
    names, made_by = meta["shards"], meta["made_by"]
    _check_or_write_dataset_json(dst, meta)
    selection = records.stats_selection(total, stats_images, seed)
    start = 0
    for s, (path, n) in enumerate(zip(files, counts)):
        if not records.shard_done(dst, names[s]):
            arrays = first if s == 0 else _read_file(path, semantic_key)
            if len(arrays["labels"]) != n:
                raise ValueError(f"{path}: labels changed length while converting")
            _write_shard(dst, names[s], path, arrays, start, layout, selection, semantic_key)
        start += n
    if use_reference:
        return _write_reference_stats(dst, ref_stats, layout, semantic_key, made_by)
    selection_info = {"seed": seed, "max_images": stats_images, "flipped": False, "requested": int(len(selection))}
    return records.finalize_stats(dst, names, made_by=made_by, selection=selection_info)


def _main(argv: Sequence[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sfd_jax.data.reference_latents", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="folder with the reference *.safetensors (+ *_stats.pt)")
    p.add_argument("--dst", required=True, help="output dataset folder")
    p.add_argument("--semantic_key", default="latents_sv", choices=("latents_sv", "latents_dino"))
    p.add_argument("--stats", default="auto", choices=("auto", "reference", "compute"))
    p.add_argument("--latent_dtype", default="float32", choices=tuple(records.DTYPES))
    p.add_argument("--feature_dtype", default="float16", choices=tuple(records.DTYPES))
    p.add_argument("--stats_images", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    stats = convert(
        a.src,
        a.dst,
        semantic_key=a.semantic_key,
        stats=a.stats,
        latent_dtype=a.latent_dtype,
        feature_dtype=a.feature_dtype,
        stats_images=a.stats_images,
        seed=a.seed,
    )
    print({k: stats[k] for k in ("texture", "semantic")})


if __name__ == "__main__":
    _main(sys.argv[1:])
