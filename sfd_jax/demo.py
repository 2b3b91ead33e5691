"""`--mode=demo`: the whole SFD pipeline on Fashion-MNIST, end to end on a CPU (configs/demo.py, docs/demo.md).

    python -m sfd_jax.main --config=configs/demo.py --workdir=demo_workdir --mode=demo

Stages, each run by the module that owns it and cached in the workdir:

  texture_vae   sfd_jax.train.texture_vae on 32×32 Fashion-MNIST (28 → 32 padded, gray → RGB)
  semvae        a DINOv2-with-registers whose patch grid equals the texture latent grid (random, or
                demo.vfm_checkpoint), saved as a transformers directory, then sfd_jax.train.semvae on its tokens
  extract       sfd_jax.data.extract: texture + semantic posterior samples and DINOv2 tokens → ArrayRecord, stats.json
  dit           sfd_jax.train.loop with the SFD objective (Δt = 0.3, REPA); the loop's eval hook exports the EMA
                weights of step `guide.step` once: the weak model of AutoGuidance (the paper's guide is a smaller
                model trained for less time; here it is the same model, early)
  classifier    sfd_jax.eval.classifier: the SmallCNN judge, trained on the Fashion-MNIST train split
  sample_*      sfd_jax.eval.generator: class-balanced Dopri5 three-phase sampling, unguided and AutoGuidance
  evaluate      class consistency and a Fréchet distance in the judge's feature space against the test split

A finished stage leaves `stages/<name>.json` (its result and wall time) and is skipped on a re-run. The trainers
resume from their own checkpoints, so a run killed inside a stage continues where the last checkpoint was (the DiT
checkpoints every `dit.train.ckpt_every` steps together with its data-iterator position). Outputs: report.json,
samples.png (one row per class, unguided | guided), loss.png (training curves).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging

log = logging.getLogger(__name__)

from sfd_jax.data.sources import FASHION_MNIST_CLASSES, FashionMNISTSource

RANDOM_VFM_WARNING = ("DINOv2 IS RANDOMLY INITIALISED: random ViT features stand in for pretrained DINOv2 features "
                      "(no weights can be downloaded here). The pipeline is the real one, but the semantic latent "
                      "and REPA targets carry no pretrained semantics; pass --config.demo.vfm_checkpoint=<a "
                      "transformers Dinov2WithRegisters directory> for real features.")
CONFIG_FILE = "demo_config.json"


# ================================================================================================================
# Stage bookkeeping
# ================================================================================================================
def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, (np.generic, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


class Stages:
    """Runs each stage at most once per workdir; `stages/<name>.json` = {'wall_s', 'result'} marks it done."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "stages")
        os.makedirs(self.dir, exist_ok=True)
        self.records: dict[str, dict] = {}

    def run(self, name: str, fn) -> dict:
        path = os.path.join(self.dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            record["cached"] = True
            log.info("[demo] stage %s: done in an earlier run (%.1fs), skipped", name, record["wall_s"])
        else:
            log.info("[demo] stage %s: running", name)
            t0 = time.perf_counter()
            result = fn()
            record = {"wall_s": time.perf_counter() - t0, "result": result}
            _write_json(path, record)
            record["cached"] = False
            log.info("[demo] stage %s: finished in %.1fs", name, record["wall_s"])
        self.records[name] = record
        return record["result"]


def _check_workdir_config(workdir: str, config) -> None:
    """A workdir belongs to one config: cached stages made with other settings would be silently mixed."""
    path = os.path.join(workdir, CONFIG_FILE)
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(_diff(saved, current))
        if changed:
            raise ValueError(f"{workdir} holds a demo run with other settings ({', '.join(changed[:8])}); pass "
                             "another --workdir (or delete this one) to run with the new config")
    else:
        _write_json(path, current)


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _copy(block) -> ml_collections.ConfigDict:
    """An unlocked deep copy of a config block (the command-line config is locked)."""
    return ml_collections.ConfigDict(block.to_dict())


# ================================================================================================================
# Data
# ================================================================================================================
class Subset:
    """The first `n` images of a source (same interface: len, [i] -> (image, label), describe)."""

    def __init__(self, source, n: int):
        if not 0 < n <= len(source):
            raise ValueError(f"demo.num_train_images={n} must lie in [1, {len(source)}] (the train split's size)")
        self.source, self.n = source, int(n)
        self.num_classes = getattr(source, "num_classes", 10)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= int(index) < self.n:
            raise IndexError(f"Subset: index {index} out of range [0, {self.n})")
        return self.source[int(index)]

    def describe(self) -> dict:
        return {**self.source.describe(), "num_images": self.n, "subset": f"first {self.n}"}


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def check_data(data_dir: str) -> None:
    missing = [f for f in IDX_FILES if not any(os.path.exists(os.path.join(data_dir, f + ext)) for ext in ("", ".gz"))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {data_dir} (missing {', '.join(missing)}). Install the Debian package "
            "(sudo apt-get install dataset-fashion-mnist) or put the four IDX files (" + ", ".join(
                f + ".gz" for f in IDX_FILES) + ") in a directory and pass --config.demo.data_dir=DIR")


def fashion_mnist(data_dir: str, split: str) -> FashionMNISTSource:
    return FashionMNISTSource(data_dir, split=split, pad_to=32)


class UnitRangeImages:
    """uint8 (N, H, W, C) seen as float32 in [-1, 1], converted per batch (the whole train split as float32 would be
    0.7 GB): what the classifier helpers index."""

    def __init__(self, images_u8: np.ndarray):
        self.u8 = images_u8
        self.shape, self.ndim = images_u8.shape, images_u8.ndim

    def __len__(self) -> int:
        return len(self.u8)

    def __getitem__(self, index):
        return unit_range(self.u8[index])


def unit_range(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.astype(np.float32) / 127.5 - 1.0


def padded_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 32, 32, 3), int64 labels) of a whole split, padded and repeated to RGB in one vectorised step."""
    src = fashion_mnist(data_dir, split)
    images = np.pad(src.images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(images[..., None], 3, axis=-1), src.labels


# ================================================================================================================
# Stages 1-3: texture VAE, DINOv2 + SemVAE, latent extraction
# ================================================================================================================
def _texture_vae_stage(config, workdir: str) -> dict:
    from sfd_jax.train.texture_vae import run as train_texture_vae
    tv = _copy(config.texture_vae)
    tv.data.source.path = config.demo.data_dir
    tv.eval.source.path = config.demo.data_dir
    metrics = train_texture_vae(tv, os.path.join(workdir, "texture_vae"))
    return {"weights": os.path.join(workdir, "texture_vae", "texture_vae"), "eval": metrics,
            "steps": int(tv.train.num_steps), "batch_size": int(tv.train.batch_size)}


def latent_grid(config) -> int:
    from sfd_jax.models.texture_vae import TextureVAEConfig
    factor = TextureVAEConfig.from_dict(config.texture_vae.model.to_dict()).downsample_factor
    return int(config.texture_vae.data.image_size) // factor


def _dinov2(config, workdir: str) -> tuple[str, bool]:
    """(transformers directory of the DINOv2 used everywhere, is_random). The random one is created once and saved,
    so the SemVAE trainer, the extraction and a re-run all read the same weights."""
    if config.demo.vfm_checkpoint:
        return config.demo.vfm_checkpoint, False
    path = os.path.join(workdir, "dinov2")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        from flax import nnx

        from sfd_jax.convert.dinov2 import save_pretrained
        from sfd_jax.models.dinov2 import Dinov2, Dinov2Config
        d = config.dino
        cfg = Dinov2Config(hidden_size=d.hidden_size, num_hidden_layers=d.num_hidden_layers,
                           num_attention_heads=d.num_attention_heads, patch_size=d.patch_size,
                           image_size=d.image_size, num_register_tokens=d.num_register_tokens, mlp_ratio=d.mlp_ratio)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_pretrained(Dinov2(cfg, rngs=nnx.Rngs(int(d.seed))), tmp)
        os.replace(tmp, path)
    return path, True


def _dino_config(dino_dir: str) -> dict:
    from sfd_jax.models.dinov2 import Dinov2Config
    with open(os.path.join(dino_dir, "config.json")) as f:
        return {k: v for k, v in Dinov2Config.from_hf(json.load(f)).to_hf().items() if k != "model_type"}


def _dino_geometry(dino_dir: str, grid: int) -> tuple[int, int]:
    """(input size that gives a `grid`×`grid` patch grid, token width) of the DINOv2 in `dino_dir`."""
    hf = _dino_config(dino_dir)
    return grid * int(hf["patch_size"]), int(hf["hidden_size"])


def _semvae_stage(config, workdir: str, dino_dir: str, dino_size: int, width: int) -> dict:
    from sfd_jax.train.semvae import run as train_semvae
    sv = _copy(config.semvae)
    sv.dino.update(checkpoint=dino_dir, dtype="float32", config=_dino_config(dino_dir))
    sv.model.input_dim = width
    sv.data.update(resize=dino_size, crop=dino_size)
    sv.data.source.path = config.demo.data_dir
    sv.data.eval_source.path = config.demo.data_dir
    out = train_semvae(sv, os.path.join(workdir, "semvae"))
    return {"weights": out["export"], "dinov2": dino_dir, "dino_size": dino_size, "eval": out["eval"],
            "first_eval": out["first_eval"], "steps": out["step"]}


def _extract_stage(config, workdir: str, tv_dir: str, dino_dir: str, sv_dir: str, dino_size: int) -> dict:
    from sfd_jax.convert.dinov2 import load_dinov2
    from sfd_jax.convert.semvae import load_semvae
    from sfd_jax.convert.texture_vae import load_texture_vae
    from sfd_jax.data.encoders import Encoders
    from sfd_jax.data.extract import ExtractOptions, extract
    e = config.extract
    encoders = Encoders(load_texture_vae(tv_dir)[1], load_dinov2(dino_dir)[1], load_semvae(sv_dir)[1],
                        sources={"texture_vae": tv_dir, "dinov2": dino_dir, "semvae": sv_dir})
    source = Subset(fashion_mnist(config.demo.data_dir, "train"), int(config.demo.num_train_images))
    per_device = max(1, int(e.batch_size_per_device) // jax.local_device_count())
    options = ExtractOptions(image_size=int(config.texture_vae.data.image_size), dino_size=dino_size,
                             batch_size_per_device=per_device, shard_size=int(e.shard_size), seed=int(config.seed),
                             latent_dtype=e.latent_dtype, feature_dtype=e.feature_dtype,
                             stats_images=int(e.stats_images), num_workers=int(e.num_workers))
    summary = extract(source, os.path.join(workdir, "latents"), encoders, options, progress=False)
    if not summary["complete"]:
        raise RuntimeError(f"latent extraction stopped before the last shard: {summary}")
    return {k: v for k, v in summary.items() if k != "stats"}


# ================================================================================================================
# Stage 4: the DiT and its early-EMA guide
# ================================================================================================================
_MODEL_FIELDS = ("input_size", "repa_dim", "num_classes", "depth", "hidden_size", "num_heads", "repa_projector_dim")


@contextlib.contextmanager
def _dit_model_fields(config):
    """Applies `dit.model`'s architecture fields on top of the size table while the trainer builds the model.

    TEMPORARY: remove once sfd_jax.train.build.model_config reads these fields itself (docs/demo.md, issue 9).
    """
    from sfd_jax.train import build
    original = build.model_config
    overrides = {k: config.model[k] for k in _MODEL_FIELDS if k in config.model}

    def patched(cfg, model_channels: int = 48):
        return dataclasses.replace(original(cfg, model_channels), **overrides)

    build.model_config = patched
    try:
        yield
    finally:
        build.model_config = original


def dit_config(config, workdir: str, grid: int, width: int) -> ml_collections.ConfigDict:
    dit = _copy(config.dit)
    dit.seed = int(config.seed)
    dit.data.path = os.path.join(workdir, "latents")
    dit.model.update(input_size=grid, repa_dim=width, num_classes=int(dit.data.num_classes))
    return dit


def _dit_stage(config, workdir: str, grid: int, width: int) -> dict:
    from sfd_jax.convert.dit import save_dit
    from sfd_jax.train import loop
    dit = dit_config(config, workdir, grid, width)
    dit_dir = os.path.join(workdir, "dit")
    guide_dir, guide_step = os.path.join(dit_dir, "guide"), int(config.guide.step)

    def export_guide(ctx) -> dict:
        # The first evaluation at or after guide.step writes the guide (normally exactly at guide.step; later only
        # if a run died between that step's checkpoint and this export).
        if ctx.step >= guide_step and not os.path.exists(guide_dir):
            tmp = f"{guide_dir}.tmp-{os.getpid()}"
            save_dit(tmp, ctx.model_cfg, ctx.model(ema=True), meta={"step": ctx.step, "weights": "ema",
                                                                     "role": "AutoGuidance guide"})
            os.replace(tmp, guide_dir)
            log.info("[demo] AutoGuidance guide: EMA weights of step %d -> %s", ctx.step, guide_dir)
        return {}

    dit.eval.every = guide_step
    with _dit_model_fields(dit):
        out = loop.run(dit, dit_dir, eval_fn=export_guide)
    if out["preempted"]:
        raise SystemExit(f"[demo] DiT training stopped by a signal at step {out['step']}; its checkpoint is in "
                         f"{dit_dir}. Re-run the same command to resume.")
    with open(os.path.join(guide_dir, "meta.json")) as f:
        guide_meta = json.load(f)
    return {"weights": os.path.join(dit_dir, "ema"), "guide": guide_dir, "guide_step": guide_meta["step"],
            "steps": out["step"], "last_metrics": out["last_metrics"]}


# ================================================================================================================
# Stages 5-6: classifier, sampling, evaluation
# ================================================================================================================
def _classifier_stage(config, workdir: str) -> dict:
    from sfd_jax.eval.classifier import ClassifierConfig, accuracy, save_classifier, train_classifier
    c = config.classifier
    train_x, train_y = padded_split(config.demo.data_dir, "train")
    test_x, test_y = padded_split(config.demo.data_dir, "test")
    cfg = ClassifierConfig(width=int(c.width), feature_dim=int(c.feature_dim))
    model = train_classifier(UnitRangeImages(train_x), train_y, cfg=cfg, steps=int(c.steps),
                             batch_size=int(c.batch_size), lr=float(c.lr), seed=int(config.seed),
                             log_every=max(1, int(c.steps) // 4))
    path = os.path.join(workdir, "classifier")
    save_classifier(model, cfg, path)
    return {"weights": path, "test_accuracy": accuracy(model, UnitRangeImages(test_x), test_y),
            "train_images": len(train_x), "steps": int(c.steps)}


def _sample_stage(config, workdir: str, mode: str, tv_dir: str, dit_result: dict) -> dict:
    from sfd_jax.convert.dit import restore_dit
    from sfd_jax.convert.texture_vae import load_texture_vae
    from sfd_jax.diffusion.guidance import AutoGuidance
    from sfd_jax.eval.generator import (ImageGenerator, SamplerSettings, TextureDecoder, class_labels,
                                        read_latent_stats)
    s = config.sample
    _, vae = load_texture_vae(tv_dir)
    mean, std = read_latent_stats(os.path.join(workdir, "latents", "stats.json"), vae.cfg.embed_dim)
    settings = SamplerSettings(solver=s.solver, rtol=float(s.rtol), atol=float(s.atol),
                               delta_t=float(config.dit.diffusion.delta_t), step_control=s.step_control,
                               phase_mode=s.phase_mode, max_steps=int(s.max_steps))
    gen = ImageGenerator(TextureDecoder(vae, mean, std), settings=settings, seed=int(s.seed),
                         per_device_batch=int(s.per_device_batch))
    _, model = restore_dit(dit_result["weights"])
    guidance = None
    if mode == "autoguidance":
        guidance = AutoGuidance(restore_dit(dit_result["guide"])[1], float(config.demo.guidance_scale))
    num_classes = int(config.dit.data.num_classes)
    n = num_classes * int(config.demo.samples_per_class)
    indices = np.arange(n)
    labels = class_labels(indices, num_images=n, num_classes=num_classes)
    t0 = time.perf_counter()
    images, stats = gen(model, indices, labels, guidance=guidance)
    seconds = time.perf_counter() - t0
    path = os.path.join(workdir, "samples", f"{mode}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(f"{path[:-4]}.tmp.npz", images=images, labels=labels)
    os.replace(f"{path[:-4]}.tmp.npz", path)
    return {"path": path, "num_images": n, "seconds": seconds, "images_per_s": n / seconds,
            "nfe_per_batch": [st.nfe for st in stats],  # with AutoGuidance one NFE = main + guide forward
            "nfe_per_image": float(np.mean([st.nfe_per_image for st in stats])),
            "guidance": None if guidance is None else {"kind": "autoguidance", "scale": guidance.scale,
                                                       "guide_step": dit_result["guide_step"]},
            "solver": dataclasses.asdict(settings)}


def _reconstruct(vae_dir: str, images_u8: np.ndarray, batch: int = 250) -> np.ndarray:
    """uint8 texture-VAE reconstructions (decoded posterior mean): the best any sample can look after decoding."""
    from flax import nnx

    from sfd_jax.convert.texture_vae import load_texture_vae
    graphdef, state = nnx.split(load_texture_vae(vae_dir)[1])

    @jax.jit
    def rec(state, x):
        vae = nnx.merge(graphdef, state)
        return vae.to_uint8(vae.decode(vae.encode(x)[0]))

    out = []
    for i in range(0, len(images_u8), batch):
        x = images_u8[i:i + batch]
        pad = batch - len(x)
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        out.append(np.asarray(rec(state, unit_range(xp)))[:len(x)])
    return np.concatenate(out)


def _evaluate_stage(config, workdir: str, classifier_dir: str, vae_dir: str, samples: dict) -> dict:
    from sfd_jax.eval.classifier import apply_batched, load_classifier
    from sfd_jax.eval.metrics import frechet_distance, statistics
    judge = load_classifier(classifier_dir)
    test_x, _ = padded_split(config.demo.data_dir, "test")
    n_ref = min(int(config.demo.fid_test_images), len(test_x))
    ref = statistics(apply_batched(judge, UnitRangeImages(test_x[:n_ref]))[1])

    def score(images, labels) -> dict:
        logits, features = apply_batched(judge, UnitRangeImages(images))
        hit = logits.argmax(-1) == labels
        return {"class_consistency": float(hit.mean()),
                "fid_classifier": float(frechet_distance(*statistics(features), *ref)),
                "per_class_consistency": {FASHION_MNIST_CLASSES[k]: float(hit[labels == k].mean())
                                          for k in np.unique(labels)},
                "num_images": int(len(images))}

    out = {"fid_reference": f"SmallCNN features of the first {n_ref} test images"}
    for mode, result in samples.items():
        with np.load(result["path"]) as z:
            out[mode] = score(z["images"], z["labels"])
    # References scored the same way, with as many images as each sample set: real training images (what a perfect
    # generator would reach) and their texture-VAE reconstructions (what a perfect DiT would reach after decoding).
    n = int(next(iter(samples.values()))["num_images"])
    train_x, train_y = padded_split(config.demo.data_dir, "train")
    pick = np.sort(np.random.default_rng(int(config.seed)).choice(len(train_x), n, replace=False))
    out["real_train_images"] = score(train_x[pick], train_y[pick])
    out["vae_reconstructions"] = score(_reconstruct(vae_dir, train_x[pick]), train_y[pick])
    return out


# ================================================================================================================
# run
# ================================================================================================================
def run(config, workdir: str) -> dict:
    """All stages (cached), then report.json, samples.png and loss.png in `workdir`. Returns the report."""
    t_run = time.perf_counter()
    with _quiet_orbax():
        return _run(config, workdir, t_run)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every checkpoint step at INFO through absl; the demo's console keeps to the stages' progress."""
    def keep(record) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname

    absl = absl_logging.get_absl_logger()
    absl.addFilter(keep)
    try:
        yield
    finally:
        absl.removeFilter(keep)


def _run(config, workdir: str, t_run: float) -> dict:
    from sfd_jax import demo_outputs
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    check_data(config.demo.data_dir)
    _check_workdir_config(workdir, config)
    stages = Stages(workdir)
    dino_dir, random_vfm = _dinov2(config, workdir)
    if random_vfm:
        log.warning("\n%s\n[demo] %s\n%s", "!" * 100, RANDOM_VFM_WARNING, "!" * 100)
    grid = latent_grid(config)
    dino_size, width = _dino_geometry(dino_dir, grid)

    tv = stages.run("texture_vae", lambda: _texture_vae_stage(config, workdir))
    sv = stages.run("semvae", lambda: _semvae_stage(config, workdir, dino_dir, dino_size, width))
    ex = stages.run("extract", lambda: _extract_stage(config, workdir, tv["weights"], dino_dir, sv["weights"],
                                                      dino_size))
    dit = stages.run("dit", lambda: _dit_stage(config, workdir, grid, width))
    clf = stages.run("classifier", lambda: _classifier_stage(config, workdir))
    samples = {mode: stages.run(f"sample_{mode}", lambda m=mode: _sample_stage(config, workdir, m, tv["weights"],
                                                                             dit))
               for mode in ("unguided", "autoguidance")}
    ev = stages.run("evaluate", lambda: _evaluate_stage(config, workdir, clf["weights"], tv["weights"], samples))

    report = demo_outputs.write_report(config, workdir, stages.records, random_vfm=random_vfm,
                                       geometry={"latent": [grid, grid, 48], "tokens": grid * grid,
                                                 "dino_size": dino_size, "dino_width": width},
                                       run_wall_s=time.perf_counter() - t_run)
    demo_outputs.samples_png(workdir, samples, float(config.demo.guidance_scale), int(config.demo.grid_columns),
                             ev)
    demo_outputs.loss_png(workdir)
    demo_outputs.log_summary(report)
    if random_vfm:
        log.warning("[demo] %s", RANDOM_VFM_WARNING)
    del ex, sv
    return report
