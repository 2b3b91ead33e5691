"""`--mode=sample`: N class-balanced images from a DiT → one ADM-format npz (+ PNGs, a grid), resumable.

    python -m sfd_jax.main --config=configs/sample.py:xl_autoguidance --workdir=runs/sample_xl --mode=sample \
        --config.sample.model=weights/sfd_xl_800ep --config.sample.guide=weights/guide_b_70k \
        --config.sample.texture_vae=weights/texture_vae --config.sample.latent_stats=/data/latents/stats.json

Image g of N (default 50,000) gets label (g · num_classes) // N (= g // 50, as the reference; or seeded random labels,
or the null label), noise N(0, I) from fold_in(key(seed), g), and is sampled by `sfd_jax.eval.generator` (three-phase
ODE → texture channels → denormalise → texture VAE → uint8), batches sharded over every device of every process.

Workdir layout:
  sample_manifest.json   what determines the images (weights, guidance, solver, seed, labels, N, VAE, stats);
                         a restart with a different manifest refuses to mix images
  chunks/SSSSSSS-EEEEEEE.npy   uint8 images of indices [S, E) in index order, each written to a temporary name and
                         renamed when complete; a restarted run skips every index a chunk already holds
  samples_{N}x{H}x{W}x3.npz    `arr_0` uint8 (N, H, W, 3) and `arr_1` int64 labels, in shuffled order (below)
  grid.png               `grid_size` images at evenly spaced indices (different classes when class-balanced)
  images/{g:06d}.png     (save_png) every image under its index, unshuffled, as the reference's sample folder
  sample.json            summary: settings, images/s, NFE, the shuffle, output paths

Shuffle: row r of the npz is image perm[r] with perm = list(range(N)) shuffled in place by Python's
`random.Random(shuffle_seed).shuffle` (seed 42). The reference copies its PNG folder (os.walk order, which is not
sorted) through `random.seed(42); random.shuffle(files)` before packing the npz, so with a name-ordered walk the
two permutations agree. Order matters only for the Inception Score, which splits the rows in consecutive groups of
5,000: unshuffled class-balanced rows would put 100 classes in each split.

The npz is written as a stored (uncompressed) zip with fixed timestamps, so identical images give a byte-identical
file; sample.json records its SHA-256 when `npz_sha256` is on.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import time
from typing import Iterator, NamedTuple

import jax
import numpy as np

from sfd_jax import parallel, paths
from sfd_jax.diffusion.guidance import CFG, AutoGuidance
from sfd_jax.errors import InputError
from sfd_jax.preemption import Preemption
from sfd_jax.profiling import Profiler
from sfd_jax.eval.generator import (
    LABEL_MODES,
    BatchStats,
    ImageGenerator,
    SamplerSettings,
    TextureDecoder,
    class_labels,
)
from sfd_jax.eval.sample_files import (
    ChunkReader,
    coverage,
    file_sha256,
    grid_indices,
    make_grid,
    save_png,
    scan_chunks,
    shuffle_order,
    write_chunk,
    write_npz,
)

log = logging.getLogger(__name__)

GUIDANCE_KINDS = ("none", "cfg", "autoguidance")
MANIFEST = "sample_manifest.json"
CHUNK_DIR = "chunks"


# ---------------------------------------------------------------------------------------------------------------
# Config → objects (shared with the in-training evaluation)
# ---------------------------------------------------------------------------------------------------------------
def config_get(block, name, default=None):
    value = block.get(name, default) if hasattr(block, "get") else getattr(block, name, default)
    return default if value is None else value


def settings_from_config(block, *, delta_t: float | None = None) -> SamplerSettings:
    """SamplerSettings from a config block with solver, num_steps (0 = None), rtol, atol, delta_t, step_control,
    phase_mode, max_steps."""
    get = lambda name, default: config_get(block, name, default)  # noqa: E731
    return SamplerSettings(
        solver=str(get("solver", "dopri5")),
        num_steps=int(get("num_steps", 0)) or None,
        rtol=float(get("rtol", 1e-3)),
        atol=float(get("atol", 1e-6)),
        delta_t=float(get("delta_t", 0.3) if delta_t is None else delta_t),
        step_control=str(get("step_control", "per_sample")),
        phase_mode=str(get("phase_mode", "split")),
        max_steps=int(get("max_steps", 4096)),
    )


def load_model(path: str, *, use_ema: bool = True, dtype: str | None = None, what: str = "sample.model"):
    """A LightningDiT from a weights directory (`sfd_jax.convert.dit` / the trainer's EMA export) or a reference
    checkpoint file (`use_ema` picks its 'ema' or 'model' weights). Returns (model, description dict)."""
    from sfd_jax.convert.dit import load_dit, restore_dit

    if not path:
        raise ValueError(f"config.{what} is required: a DiT weights directory or a reference .pt checkpoint")
    path = os.fspath(path)
    if not paths.exists(path):
        raise FileNotFoundError(f"config.{what}: {path} does not exist")
    meta = {"path": paths.absolute(path)}
    if paths.isdir(path):
        if paths.isdir(paths.join(path, "checkpoints")) and not paths.exists(paths.join(path, "config.json")):
            raise ValueError(
                f"config.{what}: {path} is a training workdir; export its EMA weights first with "
                f"`python -m sfd_jax.train.export --workdir={path} --out=OUT` and pass OUT"
            )
        _, model = restore_dit(path, dtype=dtype)
        meta_path = paths.join(path, "meta.json")
        if paths.exists(meta_path):
            meta["meta"] = paths.read_json(meta_path, "weights metadata")
    else:
        _, model = load_dit(paths.local_copy(path), use_ema=use_ema, dtype=dtype or "float32")
        st = paths.path(path).stat()
        meta.update(use_ema=bool(use_ema), size=st.length, mtime_ns=int(st.mtime * 1e9))
    return model, meta


def guidance_from_config(block, *, dtype: str | None = None, guide=None):
    """(guidance object or None, description) from guidance ('none' | 'cfg' | 'autoguidance'), scale, scale_sem,
    scale_tex, interval_start, guide (weights path), guide_use_ema. `guide` passes an already loaded guide model."""
    kind = str(config_get(block, "guidance", "none"))
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"config guidance={kind!r}; valid: {GUIDANCE_KINDS}")
    if kind == "none":
        return None, {"kind": "none"}
    scale = float(config_get(block, "scale", 1.5))
    start = config_get(block, "interval_start", None)
    start = None if start is None else float(start)
    if kind == "cfg":
        return CFG(scale=scale, interval_start=start), {"kind": "cfg", "scale": scale, "interval_start": start}
    scale_sem, scale_tex = config_get(block, "scale_sem", None), config_get(block, "scale_tex", None)
    desc = {
        "kind": "autoguidance",
        "scale": scale,
        "scale_sem": scale_sem,
        "scale_tex": scale_tex,
        "interval_start": start,
    }
    if guide is None:
        guide, desc["guide"] = load_model(
            str(config_get(block, "guide", "")),
            dtype=dtype,
            what="guide",
            use_ema=bool(config_get(block, "guide_use_ema", True)),
        )
        # A guide of the wrong step still samples, just with another FID than the recipe's: refuse when we can tell.
        want, got = int(config_get(block, "guide_step", 0) or 0), desc["guide"].get("meta", {}).get("step")
        if want and got is not None and int(got) != want:
            raise ValueError(
                f"config guide_step={want}, but the guide weights {desc['guide']['path']} are of step "
                f"{got}; pass the guide checkpoint of step {want} or set guide_step=0"
            )
    return AutoGuidance(
        guide_model=guide,
        scale=scale,
        scale_sem=None if scale_sem is None else float(scale_sem),
        scale_tex=None if scale_tex is None else float(scale_tex),
        interval_start=start,
    ), desc


def check_guide(model_cfg, guide_cfg, model_path: str = "model", guide_path: str = "guide") -> None:
    """AutoGuidance evaluates the guide on the model's inputs and labels: latent grid, channels and label table
    must be the same (a 1000-class guide would read a 10-class model's labels as other classes)."""
    if guide_cfg is None:
        return
    fields = ("input_size", "in_channels", "semantic_chans", "num_classes")
    diffs = [
        f"{f} {getattr(guide_cfg, f)} vs {getattr(model_cfg, f)}"
        for f in fields
        if getattr(guide_cfg, f) != getattr(model_cfg, f)
    ]
    if diffs:
        raise InputError(
            f"guide and model differ: {'; '.join(diffs)} (guide {guide_path}, model {model_path}); "
            "AutoGuidance needs a guide trained on the same latents and classes"
        )


# ---------------------------------------------------------------------------------------------------------------
# Multi-process helpers
# ---------------------------------------------------------------------------------------------------------------
def _is_main() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _from_main(value: np.ndarray) -> np.ndarray:
    """Process 0's value of a numpy array, on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def _check_manifest(path: str, manifest: dict, overwrite: bool) -> None:
    if not paths.exists(path) or overwrite:
        return
    old = paths.read_json(path, "sampling manifest")
    changed = sorted(
        k
        for k in set(old["identity"]) | set(manifest["identity"])
        if old["identity"].get(k) != manifest["identity"].get(k)
    )
    if changed:
        details = "; ".join(f"{k}: {old['identity'].get(k)!r} -> {manifest['identity'].get(k)!r}" for k in changed)
        raise ValueError(
            f"{path}: this workdir holds images made with other settings ({details}). Use a new "
            "--workdir, or set --config.sample.overwrite=True to discard the old chunks"
        )
    if old.get("execution") != manifest.get("execution"):
        log.warning(
            "sampling with %s (earlier chunks: %s): images agree up to float rounding only",
            manifest.get("execution"),
            old.get("execution"),
        )


def _progress_logger(total_todo: int, total: int, already: int, log_every_s: float):
    state = {"t0": time.perf_counter(), "last": 0.0, "done": 0, "nfe": [], "nfe_img": []}

    def on_batch(n_new: int, stats: BatchStats, force: bool = False):
        state["done"] += n_new
        state["nfe"].append(stats.nfe)
        state["nfe_img"].append(stats.nfe_per_image)
        now = time.perf_counter()
        if not (force or now - state["last"] >= log_every_s or state["done"] == total_todo):
            return
        state["last"] = now
        rate = state["done"] / max(now - state["t0"], 1e-9)
        eta = (total_todo - state["done"]) / max(rate, 1e-9)
        log.info(
            "sample: %d/%d images (%.1f%%), %.2f img/s, ETA %s, NFE %d per batch (%.1f per image)",
            already + state["done"],
            total,
            100.0 * (already + state["done"]) / total,
            rate,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
            stats.nfe,
            stats.nfe_per_image,
        )

    return on_batch, state


class _Job(NamedTuple):
    """What `config.sample` asks for, loaded and checked against itself."""

    num_images: int
    settings: SamplerSettings
    dtype: str
    model: object
    model_desc: dict
    guidance: object
    guidance_desc: dict
    decoder: TextureDecoder
    mesh: object
    gen: ImageGenerator
    num_classes: int
    latent_shape: tuple
    image_shape: tuple
    labels: np.ndarray


class _Plan(NamedTuple):
    """The images still missing (`todo`, in index order) and the pieces they are written as: runs of consecutive
    missing indices within one cell of the chunk grid (a whole chunk, unless an interrupted run left its first
    part). `piece_start[j]` is the piece of `todo[j]`; `piece_len` maps a piece's start to its length."""

    todo: np.ndarray
    already: int
    piece_start: np.ndarray
    piece_len: dict


def _decoder_from_config(c) -> TextureDecoder:
    stats_path = str(c.latent_stats)
    if not c.texture_vae or not stats_path:
        raise ValueError(
            "config.sample.texture_vae and config.sample.latent_stats are required (the texture VAE "
            "weights and the extraction job's stats.json)"
        )
    return TextureDecoder.from_files(
        str(c.texture_vae),
        stats_path,
        latent_multiplier=float(c.latent_multiplier),
        decode_batch=int(c.decode_batch) or None,
        dtype=str(c.vae_dtype),
    )


def _num_classes(c, cfg) -> int:
    num_classes = int(c.num_classes) or cfg.num_classes
    if not 0 < num_classes <= cfg.num_classes:
        raise InputError(
            f"config.sample.num_classes={int(c.num_classes)}: the model {c.model} has "
            f"{cfg.num_classes} classes (labels 0..{cfg.num_classes - 1}; {cfg.num_classes} is its "
            f"null label); use 1..{cfg.num_classes}, or 0 for all of them"
        )
    return num_classes


def _job_from_config(config, num_images: int) -> _Job:
    c = config.sample
    settings = settings_from_config(c)
    dtype = str(c.dtype)
    model, model_desc = load_model(str(c.model), use_ema=bool(c.use_ema), dtype=dtype)
    guidance, guidance_desc = guidance_from_config(c, dtype=dtype)
    decoder = _decoder_from_config(c)
    mesh = parallel.make_mesh(tuple(config.mesh.ici), tuple(config.mesh.dcn))
    rules = parallel.parse_rules(config.mesh.rules)
    gen = ImageGenerator(
        decoder,
        settings=settings,
        seed=int(config.seed),
        mesh=mesh,
        rules=rules,
        per_device_batch=int(c.per_device_batch),
    )
    cfg = model.cfg
    if isinstance(guidance, AutoGuidance):
        check_guide(cfg, getattr(guidance.guide_model, "cfg", None), str(c.model), str(c.guide))
    num_classes = _num_classes(c, cfg)
    latent_shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    labels = class_labels(
        np.arange(num_images),
        num_images=num_images,
        num_classes=num_classes,
        mode=str(c.labels),
        seed=int(c.label_seed),
        null_label=cfg.num_classes,
    )
    return _Job(
        num_images=num_images,
        settings=settings,
        dtype=dtype,
        model=model,
        model_desc=model_desc,
        guidance=guidance,
        guidance_desc=guidance_desc,
        decoder=decoder,
        mesh=mesh,
        gen=gen,
        num_classes=num_classes,
        latent_shape=latent_shape,
        image_shape=gen.image_shape(latent_shape),
        labels=labels,
    )


def _manifest(config, job: _Job) -> dict:
    """What makes the images what they are (`identity`: a workdir holds images of one identity only) and how they
    were computed (`execution`: changes the float rounding only)."""
    c = config.sample
    manifest = {
        "identity": {
            "model": job.model_desc,
            "dtype": job.dtype,
            "guidance": job.guidance_desc,
            "settings": job.settings.to_dict(),
            "seed": int(config.seed),
            "num_images": job.num_images,
            "labels": str(c.labels),
            "num_classes": job.num_classes,
            "label_seed": int(c.label_seed),
            "texture_vae": paths.absolute(str(c.texture_vae)),
            "vae_dtype": str(c.vae_dtype),
            "latent_stats": paths.absolute(str(c.latent_stats)),
            "texture_mean": job.decoder.mean.tolist(),
            "texture_std": job.decoder.std.tolist(),
            "latent_multiplier": float(c.latent_multiplier),
            "image_shape": list(job.image_shape),
        },
        "execution": {"per_device_batch": job.gen.per_device_batch, "decode_batch": job.decoder.decode_batch},
    }
    return json.loads(json.dumps(manifest, default=str))


def _claim_workdir(workdir: str, chunk_dir: str, num_images: int, manifest: dict, overwrite: bool) -> None:
    """Writes the manifest, after checking that the workdir's earlier chunks were made with the same identity
    (or removing them with `overwrite`)."""
    error = ""
    if _is_main():  # one process decides; the others learn the outcome instead of waiting forever
        try:
            if overwrite:
                for _, _, path in scan_chunks(chunk_dir, num_images):
                    paths.remove(path)
            _check_manifest(paths.join(workdir, MANIFEST), manifest, overwrite)
            paths.write_json_atomic(paths.join(workdir, MANIFEST), manifest, indent=2)
        except (ValueError, OSError) as e:
            error = str(e)
            if jax.process_count() == 1:
                raise
    if not int(_from_main(np.asarray(0 if error else 1, np.int32))):
        raise RuntimeError(error or "process 0 refused the workdir (see its log)")


def _plan(chunk_dir: str, num_images: int, chunk_size: int) -> _Plan:
    done = _from_main(
        coverage(scan_chunks(chunk_dir, num_images), num_images) if _is_main() else np.zeros(num_images, bool)
    )
    todo = np.flatnonzero(~done).astype(np.int64)
    new_piece = np.ones(todo.size, bool)
    new_piece[1:] = (np.diff(todo) != 1) | (todo[1:] // chunk_size != todo[:-1] // chunk_size)
    piece_start = todo[np.maximum.accumulate(np.where(new_piece, np.arange(todo.size), 0))] if todo.size else todo
    piece_len = dict(zip(*np.unique(piece_start, return_counts=True))) if todo.size else {}
    return _Plan(todo, num_images - todo.size, piece_start, piece_len)


def _sample_missing(job: _Job, plan: _Plan, chunk_dir: str, on_batch, profile: Profiler) -> bool:
    """Samples the plan's images, writing each piece as a chunk once it is complete. Returns True when preempted
    (then each unfinished piece's images so far are written too)."""
    todo, null_label = plan.todo, job.model.cfg.num_classes
    pending: dict[int, list] = {}  # piece start -> [images filled so far, images]
    preempted = False
    with Preemption(sync=True) as preemption:
        labels = job.labels[todo]
        batches = job.gen.batches(
            job.model, todo, labels, guidance=job.guidance, latent_shape=job.latent_shape, null_label=null_label
        )
        for b, (offset, images, stats) in enumerate(batches):
            profile(b)
            for k in range(len(images)):
                j = offset + k
                s = int(plan.piece_start[j])
                entry = pending.setdefault(s, [0, np.empty((int(plan.piece_len[s]),) + job.image_shape, np.uint8)])
                entry[1][int(todo[j]) - s] = images[k]
                entry[0] += 1
            for s in [s for s, (filled, buf) in pending.items() if filled == len(buf)]:
                _, chunk_images = pending.pop(s)
                if _is_main():
                    write_chunk(chunk_dir, s, chunk_images)
            on_batch(len(images), stats)
            if preemption.reached(b) and offset + len(images) < todo.size:
                # Pieces fill in index order, so what a piece holds so far is its first `filled` images.
                for s, (filled, buf) in pending.items():
                    if filled and _is_main():
                        write_chunk(chunk_dir, s, buf[:filled])
                preempted = True
                log.warning(
                    "sample: preempted after %d of %d images; rerun the command to finish",
                    plan.already + offset + len(images),
                    job.num_images,
                )
                break
    profile.close()
    return preempted


def _summary(config, job: _Job, plan: _Plan, progress: dict, sample_seconds: float) -> dict:
    todo = plan.todo
    return {
        "num_images": job.num_images,
        "image_shape": list(job.image_shape),
        "labels": str(config.sample.labels),
        "num_classes": job.num_classes,
        "sampled_this_run": int(todo.size),
        "resumed_images": int(plan.already),
        "preempted": False,
        "seconds": round(sample_seconds, 2),
        "images_per_s": round(todo.size / sample_seconds, 3) if todo.size and sample_seconds > 0 else None,
        "nfe_per_batch_mean": float(np.mean(progress["nfe"])) if progress["nfe"] else None,
        "nfe_per_image_mean": float(np.mean(progress["nfe_img"])) if progress["nfe_img"] else None,
        "devices": int(job.mesh.devices.size),
        "processes": jax.process_count(),
        "global_batch": job.gen.global_batch,
        "settings": job.settings.to_dict(),
        "guidance": job.guidance_desc,
        "seed": int(config.seed),
    }


def run(config, workdir: str) -> dict:
    """Entry point of `--mode=sample` (see the module doc and docs/sampling.md)."""
    c = config.sample
    parallel.maybe_initialize_distributed(str(config.get("distributed", "auto")))
    workdir = paths.absolute(workdir)
    chunk_dir = paths.join(workdir, CHUNK_DIR)
    if _is_main():
        paths.makedirs(chunk_dir)

    num_images = int(c.num_images)
    if num_images < 1:
        raise ValueError(f"config.sample.num_images must be positive, got {num_images}")
    if str(c.labels) not in LABEL_MODES:
        raise ValueError(f"config.sample.labels={c.labels!r}; valid: {LABEL_MODES}")
    job = _job_from_config(config, num_images)
    _claim_workdir(workdir, chunk_dir, num_images, _manifest(config, job), bool(c.overwrite))

    chunk_size = int(c.chunk_size)
    if chunk_size < 1:
        raise ValueError(f"config.sample.chunk_size must be positive, got {chunk_size}")
    plan = _plan(chunk_dir, num_images, chunk_size)
    log.info(
        "sample: %d images of %s, %d already in %s, %d to sample | %s | guidance %s | global batch %d on %d devices",
        num_images,
        job.image_shape,
        plan.already,
        chunk_dir,
        plan.todo.size,
        job.settings.to_dict(),
        job.guidance_desc["kind"],
        job.gen.global_batch,
        job.mesh.devices.size,
    )

    on_batch, progress = _progress_logger(plan.todo.size, num_images, plan.already, float(c.log_every_s))
    profile = Profiler(config.get("profile"), workdir)
    t0 = time.perf_counter()
    preempted = _sample_missing(job, plan, chunk_dir, on_batch, profile) if plan.todo.size else False
    sample_seconds = time.perf_counter() - t0
    _sync("sfd_sample_chunks")
    if preempted:
        return {
            "num_images": num_images,
            "preempted": True,
            "resumed_images": int(plan.already),
            "sampled_this_run": int(progress["done"]),
        }

    summary = _summary(config, job, plan, progress, sample_seconds)
    if _is_main():
        summary.update(_write_outputs(c, workdir, chunk_dir, num_images, job.image_shape, job.labels))
        paths.write_json_atomic(paths.join(workdir, "sample.json"), summary, indent=2)
        log.info(
            "sample: done, %s",
            {k: summary[k] for k in ("npz", "grid", "seconds", "images_per_s", "nfe_per_image_mean") if k in summary},
        )
    _sync("sfd_sample_outputs")
    return summary


def _write_outputs(c, workdir: str, chunk_dir: str, num_images: int, image_shape: tuple, labels: np.ndarray) -> dict:
    reader = ChunkReader(scan_chunks(chunk_dir, num_images), num_images, image_shape)
    out = {}
    if int(c.grid_size) > 0:
        grid = make_grid(reader.read(grid_indices(num_images, int(c.grid_size))), int(c.grid_cols))
        out["grid"] = paths.join(workdir, "grid.png")
        save_png(out["grid"], grid)
    if bool(c.save_png):
        png_dir = paths.join(workdir, "images")
        paths.makedirs(png_dir)
        have = set(paths.listdir(png_dir))
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [
                pool.submit(save_png, paths.join(png_dir, f"{g:06d}.png"), reader.read([g])[0])
                for g in range(num_images)
                if f"{g:06d}.png" not in have
            ]
            for fut in futures:
                fut.result()
        out["png_dir"] = png_dir
    if bool(c.save_npz):
        perm = shuffle_order(num_images, int(c.shuffle_seed))
        h, w, ch = image_shape
        name = str(c.npz_name) or f"samples_{num_images}x{h}x{w}x{ch}.npz"
        path = paths.join(workdir, name)
        block = 1024

        def image_blocks() -> Iterator[np.ndarray]:
            for s in range(0, num_images, block):
                yield reader.read(perm[s : s + block])

        write_npz(
            path,
            {
                "arr_0": ((num_images,) + tuple(image_shape), np.uint8, image_blocks()),
                "arr_1": ((num_images,), np.int64, [labels[perm].astype(np.int64)]),
            },
        )
        out["npz"] = path
        out["npz_order"] = (
            f"arr_0[r] = image perm[r], perm = list(range({num_images})) shuffled by "
            f"random.Random({int(c.shuffle_seed)}).shuffle; arr_1 = labels in the same order"
        )
        if bool(c.npz_sha256):
            out["npz_sha256"] = file_sha256(path)
    return out
