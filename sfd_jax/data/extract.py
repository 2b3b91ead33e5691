"""Latent extraction (`--mode=extract`): images → ArrayRecord shards of latents + REPA targets, and stats.json.

    python -m sfd_jax.main --config=configs/extract.py:imagenet --workdir=/data/sfd_latents --mode=extract

The dataset is split into fixed shards of `shard_size` consecutive source indices. Process p of P handles the shards
s with s % P == p and spreads each batch over its local devices. Each record holds, for one image and its
horizontal flip, the texture posterior sample, the semantic posterior sample (SemVAE, or PCA-k of the tokens) and the
DINOv2 patch tokens, plus the label and source index (format: records.py; the two views are two consecutive
records). A shard is computed in memory, written
under a temporary name and renamed, then its `.json` is written and renamed: a run killed at any moment resumes by
redoing only shards without `.json`. After the last shard, process 0 merges the shards' partial moments into
stats.json (per-channel mean and unbiased std over (N, H, W) of up to `stats_images` random non-flipped images).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from sfd_jax import paths
from sfd_jax.data import records
from sfd_jax.data.encoders import (
    SEMANTIC_KINDS,
    Encoders,
    TokenCovariance,
    PCA,
    describe_source,
    load_encoders,
    make_encode_fn,
    make_token_fn,
)
from sfd_jax.data.preprocess import adm_center_crop
from sfd_jax.data.sources import BadImageError, make_source
from sfd_jax.preemption import NoPreemption, Preemption
from sfd_jax.profiling import Profiler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ExtractOptions:
    image_size: int = 256  # ADM center crop size fed to the texture VAE
    dino_size: int = 224  # DINOv2 input size (whole-image torch-bicubic resize of the crop)
    batch_size_per_device: int = 16
    shard_size: int = 1000  # images per shard (before skips)
    seed: int = 0  # posterior noise, stats selection, PCA fitting subset
    semantic: str = "semvae"  # or "pca"
    pca_components: int = 8  # k of PCA-k (the reference's ReDi baseline uses 8)
    pca_fit_images: int = 1000
    latent_dtype: str = "float32"
    feature_dtype: str = "float16"
    stats_images: int = 10000
    skip_bad_images: bool = False
    prefix: str = "latents"
    num_workers: int = 8  # threads decoding and cropping images
    max_shards: int | None = None  # stop after this many new shards in this run (resume later)

    def __post_init__(self):
        if self.semantic not in SEMANTIC_KINDS:
            raise ValueError(f"extract.semantic={self.semantic!r}; choose one of {', '.join(SEMANTIC_KINDS)}")
        for name in (
            "image_size",
            "dino_size",
            "batch_size_per_device",
            "shard_size",
            "pca_components",
            "pca_fit_images",
            "stats_images",
            "num_workers",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"extract.{name} must be a positive integer, got {getattr(self, name)}")
        records._dtype(self.latent_dtype, "extract.latent_dtype")
        records._dtype(self.feature_dtype, "extract.feature_dtype")

    def identity(self) -> dict:
        """The options that decide the bytes of the records (a resumed run must use the same)."""
        keep = (
            "image_size",
            "dino_size",
            "shard_size",
            "seed",
            "semantic",
            "latent_dtype",
            "feature_dtype",
            "stats_images",
            "skip_bad_images",
            "prefix",
        )
        out = {k: getattr(self, k) for k in keep}
        if self.semantic == "pca":
            out.update(pca_components=self.pca_components, pca_fit_images=self.pca_fit_images)
        return out


class _Barrier:
    """Waits for every JAX process; a no-op in a single process (also when process_index/count are simulated)."""

    def __call__(self, name: str) -> None:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)


def _local_mesh() -> Mesh:
    # Shards are independent per process, so each process only needs a mesh over its own devices.
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def _load_one(source, i: int, options: ExtractOptions) -> tuple[int, Any, str | None]:
    """(index, (crop, label), None), or (index, None, error) for an unreadable image being skipped."""
    try:
        image, label = source[int(i)]
    except BadImageError as e:
        if not options.skip_bad_images:
            raise
        return int(i), None, str(e)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return int(i), (adm_center_crop(image, options.image_size), int(label)), None


def _submit(pool, source, indices, options: ExtractOptions) -> list:
    """Start decoding + cropping `indices` on the thread pool (PIL releases the GIL); collect with `_collect`."""
    return [pool.submit(_load_one, source, int(i), options) for i in indices]


def _collect(futures) -> list:
    return [f.result() for f in futures]


def _fit_pca(source, encoders: Encoders, options: ExtractOptions, pool) -> PCA:
    subset = records.stats_selection(len(source), options.pca_fit_images, options.seed + 1)
    token_fn = make_token_fn(encoders, dino_size=options.dino_size)
    batch = options.batch_size_per_device
    chunks = [subset[k : k + batch] for k in range(0, len(subset), batch)]
    cov = None
    pending = _submit(pool, source, chunks[0], options)
    for k in range(len(chunks)):
        crops = _collect(pending)
        if k + 1 < len(chunks):
            pending = _submit(pool, source, chunks[k + 1], options)
        good = [item for _, item, _ in crops if item is not None]
        if good:
            images = np.stack([crop for crop, _ in good])
            padded = np.concatenate([images, np.repeat(images[-1:], batch - len(good), axis=0)])
            tokens = np.asarray(token_fn(padded))[: len(good)]
            if cov is None:
                cov = TokenCovariance(tokens.shape[-1])
            cov.add(tokens)
    if cov is None:
        raise ValueError("no readable image in the PCA fitting subset")
    return cov.fit(options.pca_components)


def _probe_layout(encoders: Encoders, options: ExtractOptions) -> records.RecordLayout:
    """Record shapes from one abstract evaluation of the encode function (no compute)."""
    fn = make_encode_fn(
        encoders, seed=options.seed, dino_size=options.dino_size, feature_dtype=records.DTYPES[options.feature_dtype]
    )
    images = jax.ShapeDtypeStruct((1, options.image_size, options.image_size, 3), np.uint8)
    shapes = jax.eval_shape(fn, images, jax.ShapeDtypeStruct((1,), np.int32))
    tex, sem, dino = (tuple(shapes[k].shape[1:]) for k in ("texture", "semantic", "dino"))
    if tex[:2] != sem[:2]:
        raise ValueError(
            f"texture latents are {tex[0]}x{tex[1]} but semantic latents {sem[0]}x{sem[1]}: the "
            f"composite latent needs one grid (image_size={options.image_size} / texture VAE factor must "
            f"equal dino_size={options.dino_size} / DINOv2 patch size)"
        )
    return records.RecordLayout(tex, sem, dino, options.latent_dtype, options.feature_dtype)


def _check_or_write_dataset_json(out_dir: str, meta: dict, is_writer: bool) -> None:
    path = paths.join(out_dir, "dataset.json")
    if paths.exists(path):
        old = records.read_json(path, "dataset description")
        for key in ("format", "layout", "shards", "num_source_images", "extraction", "source"):
            if old.get(key) != meta.get(key):
                raise ValueError(
                    f"{out_dir} holds a dataset made with different {key}: existing "
                    f"{old.get(key)!r}, this run {meta.get(key)!r}; use a new output directory"
                )
        old_models = {k: v.get("sha256") for k, v in old.get("made_by", {}).items()}
        new_models = {k: v.get("sha256") for k, v in meta.get("made_by", {}).items()}
        if old_models != new_models:
            raise ValueError(
                f"{out_dir} was extracted with other encoder weights (sha256 {old_models} vs "
                f"{new_models}); use a new output directory"
            )
    elif is_writer:
        records.write_json_atomic(path, meta)


def _check_job(pi: int, pc: int, encoders: Encoders, options: ExtractOptions) -> None:
    if not 0 <= pi < pc:
        raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
    if (encoders.semvae is None) != (options.semantic == "pca"):
        raise ValueError(
            f"extract.semantic={options.semantic!r} but the encoders "
            f"{'have' if encoders.semvae is not None else 'lack'} a SemVAE"
        )


def _prepare_dataset(source, out_dir: str, encoders: Encoders, options: ExtractOptions, pool, pi: int, barrier):
    """The dataset's encoders (with a fitted PCA where asked), record layout and shard names, after checking them
    against (or writing) its dataset.json. Returns (encoders, layout, names, made_by)."""
    if options.semantic == "pca" and encoders.pca is None:
        encoders = _with_fitted_pca(source, out_dir, encoders, options, pool, pi, barrier)
    layout = _probe_layout(encoders, options)
    num_images = len(source)
    num_shards = math.ceil(num_images / options.shard_size)
    names = [records.shard_name(options.prefix, s, num_shards) for s in range(num_shards)]
    made_by = encoders.describe()
    meta = {
        "format": records.FORMAT,
        "layout": layout.to_json(),
        "shards": names,
        "num_source_images": num_images,
        "extraction": options.identity(),
        "source": describe_source(source),
        "made_by": made_by,
        "record_fields": "see sfd_jax/data/records.py and docs/data.md",
    }
    _check_or_write_dataset_json(out_dir, meta, pi == 0)
    return encoders, layout, names, made_by


def _with_fitted_pca(source, out_dir: str, encoders: Encoders, options: ExtractOptions, pool, pi: int, barrier):
    """`encoders` with the PCA of `out_dir/pca.npz`, which process 0 fits first when it is not there yet."""
    pca_path = paths.join(out_dir, "pca.npz")
    if not paths.exists(pca_path) and pi == 0:
        _fit_pca(source, encoders, options, pool).save(pca_path)
    barrier("sfd_extract_pca")
    return dataclasses.replace(
        encoders, pca=PCA.load(pca_path), sources={**encoders.sources, "pca": f"fitted:{pca_path}"}
    )


def _shard_writer(source, out_dir: str, names: list, encoders: Encoders, layout, selection, options, pool, mesh):
    """write_shard(s, bar) -> images processed: encodes shard `s` on `mesh` and writes it."""
    encode = make_encode_fn(
        encoders,
        seed=options.seed,
        dino_size=options.dino_size,
        feature_dtype=records.DTYPES[options.feature_dtype],
        mesh=mesh,
    )
    batch = options.batch_size_per_device * mesh.size

    def write_shard(s: int, bar) -> int:
        indices = _shard_range(s, options.shard_size, len(source))
        return _extract_shard(source, out_dir, names[s], indices, encode, layout, batch, selection, options, pool, bar)

    return write_shard


def _write_shards(todo: list, write_shard, bar, profile: Profiler, preemption) -> tuple[int, int, bool]:
    """Writes the shards in `todo` with `write_shard(s, bar)`, stopping after the one in progress when preempted.
    Returns (images processed, shards written, preempted)."""
    processed, written = 0, 0
    try:
        for k, s in enumerate(todo):
            profile(k)
            processed += write_shard(s, bar)
            written += 1
            if preemption.reached(k) and k + 1 < len(todo):
                log.warning("preempted: %d shards written this run, the rest is left to the rerun", k + 1)
                return processed, written, True
    finally:
        bar.close()
        profile.close()
    return processed, written, False


def _finalize_stats(out_dir: str, names: list, made_by: dict, options: ExtractOptions, selection) -> dict:
    return records.finalize_stats(
        out_dir,
        names,
        made_by=made_by,
        selection={
            "seed": options.seed,
            "max_images": options.stats_images,
            "flipped": False,
            "requested": int(len(selection)),
        },
    )


def extract(
    source,
    out_dir: str,
    encoders: Encoders,
    options: ExtractOptions | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    preemption=None,
    profile_config=None,
    profile_workdir: str = "",
) -> dict:
    """Extract `source` into `out_dir` (local or gs://), resuming finished shards. Returns a summary dict.

    preemption: stops after the shard in progress once `preemption.reached(k)` (summary 'preempted': True).
    profile_config: `config.profile` (a step is a shard), traced into `profile_workdir` (default out_dir)."""
    preemption = preemption or NoPreemption()
    profile = Profiler(profile_config, profile_workdir or out_dir)
    options = options or ExtractOptions()
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    _check_job(pi, pc, encoders, options)
    barrier = _Barrier()
    paths.makedirs(out_dir)
    num_images = len(source)
    if num_images < 1:
        raise ValueError("the image source is empty")
    pool = concurrent.futures.ThreadPoolExecutor(options.num_workers)
    try:
        encoders, layout, names, made_by = _prepare_dataset(source, out_dir, encoders, options, pool, pi, barrier)
        num_shards = len(names)
        selection = records.stats_selection(num_images, options.stats_images, options.seed)
        mine = [s for s in range(num_shards) if s % pc == pi]
        todo = [s for s in mine if not records.shard_done(out_dir, names[s])]
        if options.max_shards is not None:
            todo = todo[: options.max_shards]
        size = {s: len(_shard_range(s, options.shard_size, num_images)) for s in mine}
        write_shard = _shard_writer(
            source, out_dir, names, encoders, layout, selection, options, pool, mesh or _local_mesh()
        )
        bar = _progress(sum(size.values()), sum(size[s] for s in mine if s not in todo), progress)
        t0 = time.time()
        processed, written, preempted = _write_shards(todo, write_shard, bar, profile, preemption)
        remaining = [s for s in mine if not records.shard_done(out_dir, names[s])]
        summary = {
            "out_dir": out_dir,
            "num_shards": num_shards,
            "shards_written": written,
            "images_processed": processed,
            "seconds": time.time() - t0,
            "images_per_second": processed / max(time.time() - t0, 1e-9),
            "complete": False,
            "preempted": preempted,
        }
        if remaining:  # stopped early by max_shards or SIGTERM: no stats until every shard exists
            return summary
        barrier("sfd_extract_shards")
        if pi == 0:
            summary["stats"] = _finalize_stats(out_dir, names, made_by, options, selection)
        barrier("sfd_extract_stats")
        summary["complete"] = True
        return summary
    finally:
        pool.shutdown(wait=True)


def _shard_range(s: int, shard_size: int, num_images: int) -> range:
    return range(s * shard_size, min((s + 1) * shard_size, num_images))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="extract", smoothing=0.1, dynamic_ncols=True)


def _extract_shard(
    source,
    out_dir,
    name,
    indices: range,
    encode,
    layout: records.RecordLayout,
    batch: int,
    selection: np.ndarray,
    options: ExtractOptions,
    pool,
    bar,
) -> int:
    """Encode one shard batch by batch, streaming records into a temporary file renamed at the end.

    Three stages overlap: the thread pool decodes batch k + 1, the devices encode batch k (dispatch is
    asynchronous), and the host packs and writes batch k - 1. A batch shortened by skipped images or by the end of
    the shard is padded with copies of its last image, so every call runs the one compiled shape; the padding rows
    are dropped.
    """
    chunks = [indices[k : k + batch] for k in range(0, len(indices), batch)]
    writer = records.ShardWriter(paths.join(out_dir, name))
    skipped, tex_sel, sem_sel = [], [], []
    try:
        pending_crops = _submit(pool, source, chunks[0], options)
        in_flight = None
        for k in range(len(chunks)):
            crops = _collect(pending_crops)
            if k + 1 < len(chunks):
                pending_crops = _submit(pool, source, chunks[k + 1], options)
            skipped += [(i, err) for i, item, err in crops if item is None]
            good = [(i, item) for i, item, _ in crops if item is not None]
            dispatched = _dispatch(good, encode, batch) if good else None
            if in_flight is not None:
                writer.write(_finish(in_flight, layout, selection, tex_sel, sem_sel))
            in_flight = dispatched
            bar.update(len(crops))
        if in_flight is not None:
            writer.write(_finish(in_flight, layout, selection, tex_sel, sem_sel))
        if writer.count == 0:
            raise ValueError(
                f"shard {name}: every image in source indices [{indices.start}, {indices.stop}) was unreadable"
            )
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    tex_m = records.Moments.of(np.concatenate(tex_sel)) if tex_sel else records.Moments()
    sem_m = records.Moments.of(np.concatenate(sem_sel)) if sem_sel else records.Moments()
    shard_meta = {
        "num_records": writer.count,
        "num_images": writer.count // 2,
        "first_index": indices.start,
        "stop_index": indices.stop,
        "skipped": [{"index": i, "error": err} for i, err in skipped],
        "moments": {
            "images": int(sum(len(t) for t in tex_sel)),
            "texture": tex_m.to_json(),
            "semantic": sem_m.to_json(),
        },
    }
    records.write_json_atomic(paths.join(out_dir, name + ".json"), shard_meta)
    if skipped:
        log.warning("shard %s: skipped %d unreadable images, e.g. %s", name, len(skipped), skipped[0][1])
    return len(indices)


def _dispatch(good, encode, batch: int):
    """Start encoding one batch on the devices; returns what `_finish` needs (device arrays not yet fetched)."""
    n = len(good)
    images = np.stack([crop for _, (crop, _) in good])
    idx = np.asarray([i for i, _ in good], np.int64)
    labels = np.asarray([label for _, (_, label) in good], np.int64)
    if n < batch:
        images = np.concatenate([images, np.repeat(images[-1:], batch - n, axis=0)])
    padded_idx = np.concatenate([idx, np.repeat(idx[-1:], batch - n)])
    return idx, labels, encode(images, padded_idx)


def _finish(dispatched, layout: records.RecordLayout, selection, tex_sel, sem_sel) -> list:
    idx, labels, device_out = dispatched
    n = len(idx)
    out = {k: np.asarray(v)[:n] for k, v in jax.device_get(device_out).items()}
    for k, v in out.items():
        finite = np.isfinite(v.astype(np.float32)).reshape(n, -1).all(axis=1)
        if not finite.all():
            raise FloatingPointError(
                f"non-finite {k} (stored as {layout.field_spec(k)[0]}) for source images {idx[~finite][:8].tolist()}"
            )
    chosen = np.isin(idx, selection)
    if chosen.any():
        # Statistics of the stored values (after the cast to the storage dtype): what the reader will normalise.
        tex_sel.append(out["texture"][chosen].astype(layout.field_spec("texture")[0]))
        sem_sel.append(out["semantic"][chosen].astype(layout.field_spec("semantic")[0]))
    return layout.pack_pairs(index=idx, label=labels, **out)


# ---------------------------------------------------------------------------------------------------- --mode
def options_from_config(cfg) -> ExtractOptions:
    names = {f.name for f in dataclasses.fields(ExtractOptions)}
    return ExtractOptions(**{k: cfg[k] for k in names if k in cfg and cfg[k] is not None})


def run(config, workdir: str) -> dict:
    """`--mode=extract`: source from `config.extract.source`, encoders from checkpoint paths in `config.extract`,
    output into `config.extract.out_dir` (default: `workdir`)."""
    from sfd_jax import parallel

    parallel.maybe_initialize_distributed(config.get("distributed", "auto") if hasattr(config, "get") else "auto")
    cfg = config.extract
    out_dir = cfg.get("out_dir") or workdir
    source = make_source(cfg.source)
    encoders = load_encoders(cfg)
    # Shards are independent per process, so each process stops on its own signal (no sync point).
    with Preemption(sync=False) as preemption:
        summary = extract(
            source,
            out_dir,
            encoders,
            options_from_config(cfg),
            progress=bool(cfg.get("progress", True)),
            preemption=preemption,
            profile_config=config.get("profile"),
            profile_workdir=workdir,
        )
    log.info("extraction: %s", {k: v for k, v in summary.items() if k != "stats"})
    return summary
