"""On-disk format of an extracted latent dataset (written by extract.py and reference_latents.py, read by
pipeline.py).

A dataset directory holds
- `dataset.json`: format version, the record layout, the shard list, and what made the data (`made_by`);
- `<prefix>-SSSSS-of-NNNNN.array_record`: ArrayRecord shards, `group_size:1` (random access) and uncompressed
  (fp16 DINOv2 tokens and fp32 latents barely compress; decompression would cost reader time);
- `<shard>.json` beside each shard: its image count, skipped images and the partial channel moments used for the
  statistics. It is written (then renamed) *after* the shard is renamed into place, so a shard counts as done only
  when its `.json` exists: a run killed at any point leaves no shard that looks complete but is not;
- `stats.json`: per-channel mean and unbiased std of the texture and semantic latents (see `Moments`).

Every image is stored as TWO consecutive records, its view 0 (the image) and view 1 (its horizontal flip): record
2k and 2k + 1 of the dataset (shards hold whole pairs). The trainer uses one view per image and step, so a reader
that fetches only the chosen view reads half the bytes; with the DINOv2 tokens making up 89 % of a view, this
halves the reader's cost. A view record is a fixed-size little-endian byte string (`RecordLayout`): a 16-byte
header (int64 source index, int32 label, int32 view), then texture | semantic | dino, each 16-byte aligned. Reading
a field is an `np.frombuffer` at a fixed offset, no parsing. Latents are float32 by default (they are the diffusion
targets; bf16 would add a 0.4 % relative error to every target) and DINOv2 tokens float16 by default (REPA only
needs their direction; fp16 keeps 11 significant bits where bf16 keeps 8, and layer-normed tokens are far below
fp16's 65504 limit). Both are configurable.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from sfd_jax import paths

FORMAT = "sfd_jax.latents.v1"
STATS_FORMAT = "sfd_jax.latent_stats.v1"
WRITER_OPTIONS = "group_size:1,uncompressed"
_ALIGN = 16
_HEADER = 16
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
BLOCK_FIELDS = ("texture", "semantic", "dino")


def _dtype(name: str, field: str) -> np.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} is not a storage dtype; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclasses.dataclass(frozen=True)
class RecordLayout:
    texture_shape: tuple[int, int, int]  # (H, W, C_tex), channels-last
    semantic_shape: tuple[int, int, int]  # (H, W, C_sem)
    dino_shape: tuple[int, int]  # (T, D)
    latent_dtype: str = "float32"
    feature_dtype: str = "float16"

    def __post_init__(self):
        for name in ("texture_shape", "semantic_shape", "dino_shape"):
            shape = tuple(int(s) for s in getattr(self, name))
            if any(s < 1 for s in shape):
                raise ValueError(f"RecordLayout.{name} must be positive, got {shape}")
            object.__setattr__(self, name, shape)
        if len(self.texture_shape) != 3 or len(self.semantic_shape) != 3 or len(self.dino_shape) != 2:
            raise ValueError(
                f"RecordLayout: texture/semantic shapes must be (H, W, C) and dino (T, D); got "
                f"{self.texture_shape}, {self.semantic_shape}, {self.dino_shape}"
            )
        _dtype(self.latent_dtype, "latent_dtype")
        _dtype(self.feature_dtype, "feature_dtype")

    # -- offsets
    def field_spec(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        base = name.removesuffix("_flip")
        if base == "dino":
            return DTYPES[self.feature_dtype], self.dino_shape
        if base in ("texture", "semantic"):
            return DTYPES[self.latent_dtype], getattr(self, f"{base}_shape")
        raise KeyError(f"record field {name!r}; fields: {self.fields}")

    @property
    def fields(self) -> tuple[str, ...]:
        """Fields of one view record (the flip view has the same fields)."""
        return BLOCK_FIELDS

    @property
    def pair_fields(self) -> tuple[str, ...]:
        """Names of an image's two views together, as `pack_pairs` takes and `unpack_pair` returns them."""
        return BLOCK_FIELDS + tuple(f + "_flip" for f in BLOCK_FIELDS)

    @property
    def offsets(self) -> dict[str, int]:
        out, pos = {}, _HEADER
        for name in self.fields:
            dtype, shape = self.field_spec(name)
            out[name] = pos
            pos = _align(pos + dtype.itemsize * math.prod(shape))
        return out

    @property
    def size(self) -> int:
        """Bytes of one view record."""
        last = self.fields[-1]
        dtype, shape = self.field_spec(last)
        return _align(self.offsets[last] + dtype.itemsize * math.prod(shape))

    # -- (de)serialisation
    def pack_pairs(self, *, index: np.ndarray, label: np.ndarray, **arrays: np.ndarray) -> list[bytes]:
        """B images → 2B records [view 0 of image 0, view 1 of image 0, view 0 of image 1, ...].

        `arrays` holds every name of `pair_fields` ((B, *shape) each): texture, semantic, dino for view 0 and the
        same names with `_flip` for view 1.
        """
        missing = sorted(set(self.pair_fields) - set(arrays))
        extra = sorted(set(arrays) - set(self.pair_fields))
        if missing or extra:
            raise ValueError(f"RecordLayout.pack_pairs: missing fields {missing}, unexpected fields {extra}")
        index = np.asarray(index, np.int64).reshape(-1)
        b = len(index)
        buf = np.zeros((b, 2, self.size), np.uint8)
        buf[:, :, 0:8].view(np.int64)[..., 0] = index[:, None]
        buf[:, :, 8:12].view(np.int32)[..., 0] = np.asarray(label, np.int32).reshape(-1)[:, None]
        buf[:, :, 12:16].view(np.int32)[..., 0] = np.arange(2, dtype=np.int32)
        offsets = self.offsets
        for view, suffix in ((0, ""), (1, "_flip")):
            for name in self.fields:
                dtype, shape = self.field_spec(name)
                value = np.asarray(arrays[name + suffix])
                if value.shape != (b, *shape):
                    raise ValueError(
                        f"RecordLayout.pack_pairs: field {name + suffix} has shape {value.shape}, "
                        f"expected {(b, *shape)}"
                    )
                nbytes = dtype.itemsize * math.prod(shape)
                dest = buf[:, view, offsets[name] : offsets[name] + nbytes].view(dtype).reshape(b, *shape)
                dest[...] = value.astype(dtype)
        return [row.tobytes() for row in buf.reshape(2 * b, self.size)]

    def check(self, record: bytes, where: str = "record") -> None:
        if len(record) != self.size:
            raise ValueError(f"{where}: {len(record)} bytes, the layout in dataset.json says {self.size}")

    def header(self, record: bytes) -> tuple[int, int, int]:
        """(source index, label, view) of a view record; view 1 is the horizontal flip."""
        index = int(np.frombuffer(record, np.int64, 1, 0)[0])
        label, view = (int(v) for v in np.frombuffer(record, np.int32, 2, 8))
        return index, label, view

    def field(self, record: bytes, name: str) -> np.ndarray:
        """Read-only zero-copy view of one field."""
        dtype, shape = self.field_spec(name)
        return np.frombuffer(record, dtype, math.prod(shape), self.offsets[name]).reshape(shape)

    def unpack_pair(self, view0: bytes, view1: bytes) -> dict[str, Any]:
        """The two records of one image → {index, label, texture, ..., dino_flip}."""
        (index, label, v0), (index1, _, v1) = self.header(view0), self.header(view1)
        if (v0, v1) != (0, 1) or index != index1:
            raise ValueError(
                f"records are not the two views of one image: (index, view) = ({index}, {v0}) and ({index1}, {v1})"
            )
        out = {name: self.field(view0, name) for name in self.fields}
        out.update({name + "_flip": self.field(view1, name) for name in self.fields})
        out.update(index=index, label=label)
        return out

    def to_json(self) -> dict:
        return {
            "texture_shape": list(self.texture_shape),
            "semantic_shape": list(self.semantic_shape),
            "dino_shape": list(self.dino_shape),
            "latent_dtype": self.latent_dtype,
            "feature_dtype": self.feature_dtype,
            "record_bytes": self.size,
            "views_per_image": 2,
            "offsets": self.offsets,
            "header": {"index": [0, "int64"], "label": [8, "int32"], "view": [12, "int32"]},
            "byte_order": "little",
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RecordLayout":
        layout = cls(
            tuple(d["texture_shape"]),
            tuple(d["semantic_shape"]),
            tuple(d["dino_shape"]),
            d["latent_dtype"],
            d["feature_dtype"],
        )
        if "record_bytes" in d and int(d["record_bytes"]) != layout.size:
            raise ValueError(
                f"dataset.json layout says {d['record_bytes']} bytes per record, this version of "
                f"sfd_jax computes {layout.size} for the same fields: incompatible format"
            )
        return layout


# ----------------------------------------------------------------------------------------------- channel moments
@dataclasses.dataclass
class Moments:
    """Per-channel count, mean and sum of squared deviations (float64), mergeable in any grouping (Chan et al.),
    so partial moments saved per shard combine into the same statistics whether or not the run was resumed."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        """Moments over every axis but the last (channels) of x."""
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        if len(x) == 0:
            return cls()
        mean = x.mean(axis=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge moments over {self.mean.shape} and {other.mean.shape} channels")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def std(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"an unbiased std needs at least 2 values per channel, have {self.count}")
        return np.sqrt(self.m2 / (self.count - 1))

    def to_json(self) -> dict:
        if self.count == 0:
            return {"count": 0}
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Moments":
        if not d.get("count"):
            return cls()
        return cls(int(d["count"]), np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64))


def stats_selection(num_images: int, max_images: int, seed: int) -> np.ndarray:
    """The source indices whose (non-flipped) latents feed the statistics: a seeded random subset."""
    k = min(int(max_images), int(num_images))
    return np.sort(np.random.default_rng(seed).choice(int(num_images), size=k, replace=False))


# ------------------------------------------------------------------------------------------------- json helpers
# Local path or gs:// URL alike (sfd_jax.paths); kept under these names for the modules that import them from here.
write_json_atomic = paths.write_json_atomic
read_json = paths.read_json


def shard_name(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}.array_record"


class ShardWriter:
    """Streams records into a local temporary file; `commit()` makes it `path`, `abort()` deletes it.

    Locally the temporary file is `<path>.tmp-<pid>`, renamed on commit. ArrayRecord writes only local files, so for
    a gs:// `path` it is a file under the system temporary directory, uploaded as one object on commit (an object
    appears whole or not at all). Left-over temporary files of killed runs never look like shards (the reader and
    the resume logic only know the final names); `remove_stale` deletes local ones when the shard is redone.
    """

    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = os.fspath(path)
        if not paths.is_remote(self.path):
            self.remove_stale(self.path)
        self._target = paths.local_target(self.path)
        self.tmp = self._target.__enter__()
        self._writer = ArrayRecordWriter(self.tmp, WRITER_OPTIONS)
        self.count = 0

    @staticmethod
    def remove_stale(path: str) -> None:
        directory, base = os.path.split(path)
        for name in os.listdir(directory or "."):
            if name.startswith(base + ".tmp-"):
                os.remove(os.path.join(directory, name))

    def write(self, batch: Sequence[bytes]) -> None:
        for record in batch:
            self._writer.write(record)
        self.count += len(batch)

    def commit(self) -> None:
        self._writer.close()
        self._target.__exit__(None, None, None)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._target.__exit__(RuntimeError, RuntimeError("aborted"), None)


def shard_done(directory: str, name: str) -> bool:
    return paths.exists(paths.join(directory, name)) and paths.exists(paths.join(directory, name + ".json"))


def finalize_stats(
    directory: str, shard_names: Sequence[str], *, made_by: Mapping[str, Any], selection: Mapping[str, Any]
) -> dict:
    """Merge the shards' partial moments (in shard order) into stats.json and return it."""
    tex, sem, images, skipped = Moments(), Moments(), 0, 0
    for name in shard_names:
        meta = read_json(paths.join(directory, name + ".json"), "shard metadata")
        tex = tex.merge(Moments.from_json(meta["moments"]["texture"]))
        sem = sem.merge(Moments.from_json(meta["moments"]["semantic"]))
        images += int(meta["moments"]["images"])
        skipped += len(meta.get("skipped", []))
    if images < 2:
        raise ValueError(f"{directory}: only {images} images were selected for the statistics; need at least 2")
    stats = {
        "format": STATS_FORMAT,
        "texture": {"mean": tex.mean.tolist(), "std": tex.std().tolist(), "channels": len(tex.mean)},
        "semantic": {"mean": sem.mean.tolist(), "std": sem.std().tolist(), "channels": len(sem.mean)},
        "num_images": images,
        "values_per_channel": {"texture": tex.count, "semantic": sem.count},
        "selection": dict(selection),
        "skipped_images_in_dataset": skipped,
        "made_by": dict(made_by),
    }
    write_json_atomic(paths.join(directory, "stats.json"), stats)
    return stats


def load_dataset(directory: str, *, local: bool = False) -> tuple[dict, RecordLayout, list[str]]:
    """dataset.json, its layout and the shard paths; refuses an incomplete dataset.

    local: the shard paths are local files ArrayRecord can open: for a gs:// dataset, copies staged under
    `paths.staging_dir()` (each checked against the object's size and MD5; a rerun keeps the verified ones)."""
    from sfd_jax.errors import DataError

    path = paths.join(directory, "dataset.json")
    try:
        meta = read_json(path, "dataset description")
    except ValueError as e:
        raise DataError(f"{e}; rerun --mode=extract into this directory to rewrite it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(
            f"{path} has format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}"
        )
    absent = [k for k in ("layout", "shards") if k not in meta]
    if absent or not isinstance(meta["shards"], list) or not meta["shards"]:
        raise DataError(
            f"{path} lacks {absent or ['a non-empty shards list']} (it holds {sorted(meta)}): the file "
            "is damaged; rerun --mode=extract into this directory to rewrite it (finished shards are "
            "kept)"
        )
    try:
        layout = RecordLayout.from_json(meta["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: unreadable layout ({type(e).__name__}: {e}); rerun --mode=extract") from None
    missing = [n for n in meta["shards"] if not shard_done(directory, n)]
    if missing:
        raise FileNotFoundError(
            f"{directory}: {len(missing)} of {len(meta['shards'])} shards are missing or "
            f"unfinished (e.g. {missing[0]}); rerun the extraction to complete them"
        )
    shards = [paths.join(directory, n) for n in meta["shards"]]
    if local:
        shards = [paths.local_copy(p) for p in shards]
    return meta, layout, shards


def read_images(directory: str) -> tuple[dict, RecordLayout, list[dict[str, Any]]]:
    """(dataset.json, layout, every image's unpacked pair of records in shard order): for inspecting a dataset and
    for tests; training reads through `sfd_jax.data.pipeline`."""
    from array_record.python.array_record_module import ArrayRecordReader

    meta, layout, shards = load_dataset(directory, local=True)
    images = []
    for path in shards:
        reader = ArrayRecordReader(path)
        try:
            views = reader.read_all()
        finally:
            reader.close()
        images += [layout.unpack_pair(views[k], views[k + 1]) for k in range(0, len(views), 2)]
    return meta, layout, images


def check_stats_vector(path: str, name: str, value, channels: int | None, why: str = "") -> np.ndarray:
    """One mean/std vector of stats.json as float64, refused unless finite (std also > 0) with the right length:
    an inf std would zero a channel and a NaN mean would poison every loss, both without an error."""
    from sfd_jax.errors import DataError

    try:
        value = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise DataError(
            f"{path}: {name} is not a list of numbers; re-run the extraction (or its stats step) to rewrite stats.json"
        ) from None
    if value.ndim != 1 or value.size == 0 or (channels is not None and value.shape != (channels,)):
        raise DataError(
            f"{path}: {name} has shape {value.shape}, expected ({channels if channels else 'C'},) "
            f"({why or 'one entry per latent channel'})"
        )
    bad = np.flatnonzero(~np.isfinite(value) | ((value <= 0) if name.endswith("std") else False))
    if bad.size:
        need = "finite and > 0" if name.endswith("std") else "finite"
        raise DataError(
            f"{path}: {name} must be {need}; channel(s) {bad[:8].tolist()} hold "
            f"{value[bad[:8]].tolist()}; recompute stats.json (rerun --mode=extract after deleting it)"
        )
    return value


def load_stats(directory: str, layout: RecordLayout) -> dict[str, np.ndarray]:
    """stats.json as float32 arrays, checked against the record layout's channel counts."""
    path = paths.join(directory, "stats.json")
    if not paths.exists(path):
        raise FileNotFoundError(
            f"latent statistics missing: {path}; the extraction writes it after its last shard "
            "(rerun `--mode=extract`, or convert the reference stats with reference_latents)"
        )
    stats = read_json(path, "latent statistics")
    if not isinstance(stats, dict) or stats.get("format") != STATS_FORMAT:
        from sfd_jax.errors import DataError

        raise DataError(f"{path} has format {stats.get('format')!r}, expected {STATS_FORMAT!r}")
    out = {}
    for part, shape in (("texture", layout.texture_shape), ("semantic", layout.semantic_shape)):
        for key in ("mean", "std"):
            value = check_stats_vector(
                path,
                f"{part}.{key}",
                stats.get(part, {}).get(key, []),
                shape[-1],
                f"the records hold {part} latents of shape {shape}",
            )
            out[f"{part}_{key}"] = value.astype(np.float32)
    return out
