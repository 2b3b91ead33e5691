"""Grain reader of an extracted latent dataset: the training batches
(docs/data.md#4-training-reader-datasourcearrayrecord).

Order of operations (index arithmetic only, so the state of the whole pipeline is one integer):

  range(num_images)                        image k has view records 2k (image) and 2k + 1 (flip), records.py
  → shuffle(seed_shuffle)                  one global permutation, a different one each epoch (grain reseeds per epoch)
  → random_map: view ~ Bernoulli(1/2)      one draw per (epoch, position) → record 2k + view; the one record serves
                                           texture, semantic and DINOv2 tokens, so the flip is the same for all keys
  → [:M]                                   M = whole global batches per epoch (the remainder is dropped)
  → [process_index::process_count]         per-process sharding of each epoch's permutation: disjoint records
  → repeat()                               endless
  → batch(batch_size, read + collate)      read the chosen records (ArrayRecordDataSource), normalise, stack
  → to_iter_dataset(threads, prefetch)     `read_threads` batches are assembled concurrently

Global batch k is positions [k·B, (k+1)·B) of the epoch sequence (B = batch_size × process_count), whatever the
number of processes, so a checkpoint restores onto another process count with the same global batch. The collate
step builds x1 = concat(texture, semantic) normalised per channel with stats.json, times
`latent_multiplier`, as the reference does per latent kind: the texture latent is always standardised, a SemVAE
latent too, but PCA channels of the DINOv2 tokens are used as extracted (`semantic_is_normalised`); y (int32 labels)
and dino (the stored dtype, fp16 by default; the loss casts to float32). Reading only the chosen view halves the bytes
read per sample. Records are fetched one by one: `__getitems__` of ArrayRecordDataSource measured 3× slower here for
0.4 MB records.

Config (`data` block): source='arrayrecord', path=<dataset dir>, latent_multiplier=1.0, random_flip=True,
read_threads=8, prefetch_batches=8. See docs/data.md.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import bisect

import grain
import numpy as np

from sfd_jax import paths
from sfd_jax.data import records
from sfd_jax.errors import DataError

STATE_VERSION = 1


def _field(cfg, name, default):
    getter = getattr(cfg, "get", None)
    value = getter(name, default) if getter is not None else getattr(cfg, name, default)
    return default if value is None else value


def derive_seeds(seed: int) -> tuple[int, int]:
    """(shuffle seed, flip seed), two independent 32-bit seeds from the one training seed."""
    a, b = np.random.SeedSequence([int(seed), 0x5FD]).generate_state(2)
    return int(a), int(b)


class _NamedShards:
    """Grain's ArrayRecord source with errors that name the shard: a truncated, emptied or bit-flipped shard
    otherwise surfaces as a bare Riegeli error from a reader thread."""

    def __init__(self, paths: list[str]):
        from array_record.python.array_record_module import ArrayRecordReader

        counts = []
        for path in paths:  # opening reads the shard's footer and index: a cut or emptied file fails here
            try:
                reader = ArrayRecordReader(path)
                try:
                    counts.append(int(reader.num_records()))
                finally:
                    reader.close()
            except Exception as e:  # noqa: BLE001 - Riegeli raises RuntimeError/ValueError/OSError
                raise DataError(_corrupt(path, e)) from None
        self.paths = list(paths)
        self.ends = np.cumsum(counts).tolist()
        self.source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self.source)

    def shard_of(self, record_id: int) -> str:
        return self.paths[bisect.bisect_right(self.ends, int(record_id))]

    def __getitem__(self, record_id: int) -> bytes:
        try:
            return self.source[record_id]
        except Exception as e:  # noqa: BLE001
            raise DataError(_corrupt(self.shard_of(record_id), e)) from None


def _corrupt(path: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"latent shard {path} is corrupt or truncated ({type(error).__name__}: {first[:200]}); re-extract it: "
        f"delete it and its .json, then rerun --mode=extract with the same --workdir"
    )


def _check_layout(path: str, layout: records.RecordLayout, channels) -> None:
    """The records' channel layout against what the model needs: (texture channels, semantic channels), a
    semantic count of 0 accepting any (the texture-only ablation ignores them)."""
    if channels is None:
        return
    tex, sem = (int(c) for c in channels)
    have_tex, have_sem = layout.texture_shape[-1], layout.semantic_shape[-1]
    if have_tex != tex or (sem and have_sem != sem):
        raise DataError(
            f"{path}/dataset.json: the records hold {have_tex} texture + {have_sem} semantic channels, "
            f"the model needs {tex} texture + {sem or 'any'} semantic; extract the latents with the "
            "encoders this model was configured for (or fix diffusion.semantic_chans)"
        )


def _check_label_ranges(path: str, shard_names, num_classes) -> None:
    """Label ranges recorded by the extraction in each shard's .json, when present (older datasets are checked
    batch by batch instead)."""
    if num_classes is None:
        return
    for name in shard_names:
        meta = records.read_json(os.path.join(path, name + ".json"), "shard metadata")
        lo_hi = meta.get("label_range") if isinstance(meta, dict) else None
        if lo_hi and not (0 <= int(lo_hi[0]) and int(lo_hi[1]) < num_classes):
            raise DataError(
                f"{os.path.join(path, name)}: labels span [{lo_hi[0]}, {lo_hi[1]}], the model has "
                f"data.num_classes={num_classes} (valid labels 0..{num_classes - 1}; {num_classes} is the "
                "null label); extract with the right label mapping or set data.num_classes"
            )


class _ReadAndCollate:
    """Record indices → the training batch dict (one copy from each record into the batch arrays)."""

    def __init__(
        self,
        source,
        layout: records.RecordLayout,
        stats: Mapping[str, np.ndarray],
        multiplier: float,
        with_meta: bool,
        num_classes: int | None = None,
    ):
        self.source = source
        self.num_classes = num_classes
        self.layout = layout
        self.with_meta = with_meta
        mean = np.concatenate([stats["texture_mean"], stats["semantic_mean"]])
        std = np.concatenate([stats["texture_std"], stats["semantic_std"]])
        self.mean = mean.astype(np.float32)
        self.scale = (np.float32(multiplier) / std).astype(np.float32)
        self.c_tex = layout.texture_shape[-1]
        offsets = layout.offsets
        # (dtype, count, offset, shape) per field, computed once: this loop runs for every sample.
        self.specs = {}
        for name in layout.fields:
            dtype, shape = layout.field_spec(name)
            self.specs[name] = (dtype, int(np.prod(shape)), offsets[name], shape)

    def _field(self, record: bytes, name: str) -> np.ndarray:
        dtype, count, offset, shape = self.specs[name]
        return np.frombuffer(record, dtype, count, offset).reshape(shape)

    def __call__(self, record_ids):
        layout, b = self.layout, len(record_ids)
        h, w, _ = layout.texture_shape
        x1 = np.empty((b, h, w, self.c_tex + layout.semantic_shape[-1]), np.float32)
        dino_dtype, dino_shape = layout.field_spec("dino")
        dino = np.empty((b, *dino_shape), dino_dtype)
        y = np.empty((b,), np.int32)
        index = np.empty((b,), np.int64)
        views = np.empty((b,), np.int32)
        for i, rid in enumerate(record_ids):
            record = self.source[int(rid)]
            layout.check(record, f"latent record {rid}")
            index[i], y[i], views[i] = layout.header(record)
            if views[i] != rid % 2:
                raise ValueError(
                    f"latent record {rid} holds view {views[i]}, expected {rid % 2}: the shards do not "
                    "store (image, flip) pairs in order (records.py)"
                )
            x1[i, ..., : self.c_tex] = self._field(record, "texture")
            x1[i, ..., self.c_tex :] = self._field(record, "semantic")
            dino[i] = self._field(record, "dino")
        if self.num_classes is not None:  # one vectorised compare per batch; a bad label trains silently otherwise
            bad = np.flatnonzero((y < 0) | (y >= self.num_classes))
            if bad.size:
                rid = int(record_ids[bad[0]])
                raise DataError(
                    f"latent shard {self.source.shard_of(rid)}: record {rid} has label {int(y[bad[0]])}, "
                    f"outside 0..{self.num_classes - 1} (data.num_classes={self.num_classes}; "
                    f"{self.num_classes} is the null label); re-extract with the right labels or set "
                    "data.num_classes"
                )
        x1 -= self.mean
        x1 *= self.scale
        batch = {"x1": x1, "y": y, "dino": dino}
        if self.with_meta:
            batch.update(index=index, flip=views.astype(bool))
        return batch


def semantic_is_normalised(meta: Mapping[str, Any], stats_doc: Mapping[str, Any] | None = None) -> bool:
    """False for PCA channels: the reference concatenates them after the standardised texture latent unchanged
    (only the SemVAE latent has dataset statistics applied), so training on standardised PCA channels would be a
    different model input than the one its ablation was trained on."""
    if stats_doc is not None and stats_doc.get("semantic", {}).get("normalise") is False:
        return False
    extraction = meta.get("extraction", {}) or {}
    return extraction.get("semantic") != "pca" and extraction.get("semantic_key") != "latents_dino"


class _ChooseView:
    def __init__(self, random_flip: bool):
        self.random_flip = random_flip

    def __call__(self, image: int, rng: np.random.Generator) -> int:
        return 2 * int(image) + int(self.random_flip and rng.random() < 0.5)


class LatentIterator:
    """Endless host-local batch iterator with a JSON-serialisable, restorable position: the training-batch iterator
    of this process. `batch_size` is the per-process (host-local) batch.

    Batches: {x1 float32 (b, H, W, C_tex + C_sem), y int32 (b,), dino (b, T, D) in the stored dtype}; with
    `with_meta` also the source `index` (int64) and the `flip` choice (bool) of every row. `channels`: the model's
    (texture, semantic) channel counts, checked against the records (0 semantic: any); `data.num_classes`, when
    set, bounds the labels.
    """

    def __init__(
        self,
        data_config,
        *,
        batch_size: int,
        process_index: int,
        process_count: int,
        seed: int,
        with_meta: bool = False,
        channels: tuple[int, int] | None = None,
    ):
        source = _field(data_config, "source", "arrayrecord")
        if source != "arrayrecord":
            raise ValueError(f"data.source={source!r}: the latent pipeline reads 'arrayrecord' datasets only")
        path = _field(data_config, "path", "")
        if not path:
            raise ValueError("data.path must name a dataset directory (dataset.json, shards, stats.json)")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = os.fspath(path)
        meta, layout, shard_paths = records.load_dataset(self.path, local=True)  # gs:// shards: staged
        _check_layout(self.path, layout, channels)
        num_classes = _field(data_config, "num_classes", None)
        num_classes = None if num_classes is None else int(num_classes)
        _check_label_ranges(self.path, meta["shards"], num_classes)
        stats = records.load_stats(self.path, layout)
        self.semantic_normalised = semantic_is_normalised(
            meta, records.read_json(os.path.join(self.path, "stats.json"), "latent statistics")
        )
        if not self.semantic_normalised:
            stats = dict(
                stats,
                semantic_mean=np.zeros_like(stats["semantic_mean"]),
                semantic_std=np.ones_like(stats["semantic_std"]),
            )
        self.layout = layout
        self.dataset_meta = meta
        self.batch_size = int(batch_size)
        self.process_index, self.process_count, self.seed = int(process_index), int(process_count), int(seed)
        random_flip = bool(_field(data_config, "random_flip", True))
        multiplier = float(_field(data_config, "latent_multiplier", 1.0))
        read_threads = int(_field(data_config, "read_threads", 8))
        prefetch = int(_field(data_config, "prefetch_batches", 8))

        source_ds = _NamedShards(shard_paths)
        if len(source_ds) % 2:
            raise ValueError(f"{self.path} holds {len(source_ds)} records; a dataset stores two per image")
        self.num_images = len(source_ds) // 2  # each image has two view records
        self.global_batch = self.batch_size * self.process_count
        # Each epoch keeps a whole number of global batches (the rest, different images every epoch, is dropped),
        # so global batch k is the same set of samples for any process count with this global batch.
        per_epoch = self.num_images - self.num_images % self.global_batch
        if per_epoch == 0:
            raise ValueError(
                f"{self.path} holds {self.num_images} images, fewer than the global batch "
                f"{self.global_batch} (batch_size={self.batch_size} x process_count={process_count})"
            )
        shuffle_seed, flip_seed = derive_seeds(seed)
        ds = grain.MapDataset.range(self.num_images).shuffle(seed=shuffle_seed)
        ds = ds.random_map(_ChooseView(random_flip), seed=flip_seed)
        ds = ds[:per_epoch][process_index::process_count].repeat()
        ds = ds.batch(
            self.batch_size,
            drop_remainder=True,
            batch_fn=_ReadAndCollate(source_ds, layout, stats, multiplier, with_meta, num_classes),
        )
        options = grain.ReadOptions(num_threads=max(read_threads, 0), prefetch_buffer_size=max(prefetch, 1))
        self._iter = ds.to_iter_dataset(options).__iter__()
        self._identity = {
            "path": paths.absolute(self.path),
            "num_images": self.num_images,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "random_flip": random_flip,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count,
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        state = dict(self._identity)
        state.update(version=STATE_VERSION, grain=self._iter.get_state())
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        # The position is the number of global batches consumed; it means the same samples whenever the order is
        # built from the same inputs. The process layout may change (batch_size x process_count stays fixed).
        for key in ("num_images", "global_batch", "seed", "random_flip"):
            if state.get(key) != self._identity[key]:
                raise ValueError(
                    f"cannot restore the data iterator: saved {key}={state.get(key)!r}, this run has "
                    f"{self._identity[key]!r} (the data order would not continue)"
                )
        self._iter.set_state(dict(state["grain"]))


# The name the trainers use (sfd_jax.data.synthetic.make_iterator has the same signature).
make_iterator = LatentIterator
