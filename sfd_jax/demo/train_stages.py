"""Stages 1-4 of the demo: texture VAE, DINOv2 + SemVAE, latent extraction, the SFD DiT and its guide."""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from sfd_jax.demo.data import Subset, fashion_mnist

log = logging.getLogger("sfd_jax.demo")

RANDOM_VFM_WARNING = (
    "DINOv2 IS RANDOMLY INITIALISED (dino.ssl.steps = 0): random ViT features stand in for pretrained "
    "DINOv2 features. The pipeline is the real one, but the semantic latent and REPA targets carry no "
    "semantics; leave dino.ssl.steps at its default to pretrain the encoder here, or pass "
    "--config.demo.vfm_checkpoint=<a transformers Dinov2WithRegisters directory> for real features."
)


def _copy(block) -> ml_collections.ConfigDict:
    """An unlocked deep copy of a config block (the command-line config is locked)."""
    return ml_collections.ConfigDict(block.to_dict())


# ================================================================================================================
# Stages 1-3: texture VAE, DINOv2 + SemVAE, latent extraction
# ================================================================================================================
def texture_vae(config, workdir: str) -> dict:
    from sfd_jax.train.texture_vae import run as train_texture_vae

    tv = _copy(config.texture_vae)
    tv.data.source.path = config.demo.data_dir
    tv.eval.source.path = config.demo.data_dir
    metrics = train_texture_vae(tv, os.path.join(workdir, "texture_vae"))
    return {
        "weights": os.path.join(workdir, "texture_vae", "texture_vae"),
        "eval": metrics,
        "steps": int(tv.train.num_steps),
        "batch_size": int(tv.train.batch_size),
    }


def latent_grid(config) -> int:
    from sfd_jax.models.texture_vae import TextureVAEConfig

    factor = TextureVAEConfig.from_dict(config.texture_vae.model.to_dict()).downsample_factor
    return int(config.texture_vae.data.image_size) // factor


def dinov2(config, workdir: str) -> tuple[str, bool]:
    """(transformers directory of the DINOv2 used everywhere, is_random) when no pretraining stage runs: the given
    checkpoint, else the random one (created once and saved, so every stage and a re-run read the same weights)."""
    if config.demo.vfm_checkpoint:
        return config.demo.vfm_checkpoint, False
    return random_dinov2(config, os.path.join(workdir, "dinov2")), True


def pretrains_dinov2(config) -> bool:
    return not config.demo.vfm_checkpoint and int(config.dino.ssl.steps) > 0


def random_dinov2(config, path: str) -> str:
    """The randomly initialised DINOv2 of `config.dino` saved at `path` (once; later calls only return the path)."""
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        from flax import nnx

        from sfd_jax.convert.dinov2 import save_pretrained
        from sfd_jax.models.dinov2 import Dinov2, Dinov2Config

        d = config.dino
        cfg = Dinov2Config(
            hidden_size=d.hidden_size,
            num_hidden_layers=d.num_hidden_layers,
            num_attention_heads=d.num_attention_heads,
            patch_size=d.patch_size,
            image_size=d.image_size,
            num_register_tokens=d.num_register_tokens,
            mlp_ratio=d.mlp_ratio,
        )
        tmp = f"{path}.tmp-{os.getpid()}"
        # One compiled initialiser instead of an eager op (and a compilation) per parameter.
        model = nnx.jit(lambda: Dinov2(cfg, rngs=nnx.Rngs(int(d.seed))))()
        save_pretrained(model, tmp)
        os.replace(tmp, path)
    return path


def pretrain_dinov2(config, workdir: str) -> dict:
    """Self-supervised pretraining (sfd_jax.train.vfm_ssl) of the random DINOv2 on the train split's images (no
    labels), saved to `dinov2/`; then the linear probe of the random and the pretrained encoder."""
    from sfd_jax.convert.dinov2 import load_dinov2, save_pretrained
    from sfd_jax.train import vfm_ssl

    random_dir = random_dinov2(config, os.path.join(workdir, "dinov2_random"))
    train_x, train_y = gray_split(config.demo.data_dir, "train")
    test_x, test_y = gray_split(config.demo.data_dir, "test")
    ssl_cfg = vfm_ssl.SSLConfig(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.dino.ssl.to_dict().items()}
    )
    vit, info = vfm_ssl.train(load_dinov2(random_dir)[1], train_x, ssl_cfg, os.path.join(workdir, "dinov2_ssl"))
    path = os.path.join(workdir, "dinov2")
    tmp = f"{path}.tmp-{os.getpid()}"
    save_pretrained(vit, tmp)
    if os.path.exists(path):  # a run killed between this save and its stage record
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    probe = {}
    for name, model in (("random", load_dinov2(random_dir)[1]), ("pretrained", vit)):
        probe[name] = vfm_ssl.linear_probe(
            vfm_ssl.features(model, train_x), train_y, vfm_ssl.features(model, test_x), test_y
        )
        log.info(
            "[demo] linear probe, %s DINOv2: test accuracy %.1f%% (train %.1f%%)",
            name,
            100 * probe[name]["test_accuracy"],
            100 * probe[name]["train_accuracy"],
        )
    return {
        "directory": path,
        "random_directory": random_dir,
        "ssl": {**info, "config": ssl_cfg.__dict__},
        "probe": probe,
        "probe_note": "logistic regression on frozen mean-pooled patch tokens, fit on the "
        "60,000 training images, scored on the 10,000 test images",
    }


def gray_split(data_dir: str, split: str):
    """uint8 (N, 32, 32) gray images (28 × 28 padded) and labels of a whole split."""
    import numpy as np

    src = fashion_mnist(data_dir, split)
    return np.pad(src.images, ((0, 0), (2, 2), (2, 2))), np.asarray(src.labels)


def _dino_config(dino_dir: str) -> dict:
    from sfd_jax.models.dinov2 import Dinov2Config

    with open(os.path.join(dino_dir, "config.json")) as f:
        return {k: v for k, v in Dinov2Config.from_hf(json.load(f)).to_hf().items() if k != "model_type"}


def dino_geometry(dino_dir: str, grid: int) -> tuple[int, int]:
    """(input size that gives a `grid`×`grid` patch grid, token width) of the DINOv2 in `dino_dir`."""
    hf = _dino_config(dino_dir)
    return grid * int(hf["patch_size"]), int(hf["hidden_size"])


def semvae(config, workdir: str, dino_dir: str, dino_size: int, width: int, name: str = "semvae") -> dict:
    from sfd_jax.train.semvae import run as train_semvae

    sv = _copy(config.semvae)
    sv.dino.update(checkpoint=dino_dir, dtype="float32", config=_dino_config(dino_dir))
    sv.model.input_dim = width
    sv.data.update(resize=dino_size, crop=dino_size)
    sv.data.source.path = config.demo.data_dir
    sv.data.eval_source.path = config.demo.data_dir
    out = train_semvae(sv, os.path.join(workdir, name))
    return {
        "weights": out["export"],
        "dinov2": dino_dir,
        "dino_size": dino_size,
        "eval": out["eval"],
        "first_eval": out["first_eval"],
        "steps": out["step"],
    }


def extract(
    config, workdir: str, tv_dir: str, dino_dir: str, sv_dir: str, dino_size: int, out: str = "latents"
) -> dict:
    from sfd_jax.convert.dinov2 import load_dinov2
    from sfd_jax.convert.semvae import load_semvae
    from sfd_jax.convert.texture_vae import load_texture_vae
    from sfd_jax.data.encoders import Encoders
    from sfd_jax.data.extract import ExtractOptions, extract as extract_latents

    e = config.extract
    encoders = Encoders(
        load_texture_vae(tv_dir)[1],
        load_dinov2(dino_dir)[1],
        load_semvae(sv_dir)[1],
        sources={"texture_vae": tv_dir, "dinov2": dino_dir, "semvae": sv_dir},
    )
    source = Subset(fashion_mnist(config.demo.data_dir, "train"), int(config.demo.num_train_images))
    per_device = max(1, int(e.batch_size_per_device) // jax.local_device_count())
    options = ExtractOptions(
        image_size=int(config.texture_vae.data.image_size),
        dino_size=dino_size,
        batch_size_per_device=per_device,
        shard_size=int(e.shard_size),
        seed=int(config.seed),
        latent_dtype=e.latent_dtype,
        feature_dtype=e.feature_dtype,
        stats_images=int(e.stats_images),
        num_workers=int(e.num_workers),
    )
    summary = extract_latents(source, os.path.join(workdir, out), encoders, options, progress=False)
    if not summary["complete"]:
        raise RuntimeError(f"latent extraction stopped before the last shard: {summary}")
    return {k: v for k, v in summary.items() if k != "stats"}


# ================================================================================================================
# Stage 4: the DiT and its early-EMA guide
# ================================================================================================================
def dit_config(config, workdir: str, grid: int, width: int) -> ml_collections.ConfigDict:
    """The trainer's config: configs/demo.py's `dit` block with the data path and the geometry of the stages above."""
    cfg = _copy(config.dit)
    cfg.seed = int(config.seed)
    cfg.data.path = os.path.join(workdir, "latents")
    cfg.model.update(input_size=grid, repa_dim=width, num_classes=int(cfg.data.num_classes))
    return cfg


def dit(config, workdir: str, grid: int, width: int) -> dict:
    from sfd_jax.checkpoint import Checkpoints
    from sfd_jax.convert.dit import save_dit
    from sfd_jax.train import loop

    cfg = dit_config(config, workdir, grid, width)
    dit_dir = os.path.join(workdir, "dit")
    guide_dir, guide_step = os.path.join(dit_dir, "guide"), int(config.guide.step)

    def export_guide(ctx) -> dict:
        # The first evaluation at or after guide.step writes the guide (normally exactly at guide.step; later only
        # if a run died between that step's checkpoint and this export).
        if ctx.step >= guide_step and not os.path.exists(guide_dir):
            tmp = f"{guide_dir}.tmp-{os.getpid()}"
            save_dit(
                tmp,
                ctx.model_cfg,
                ctx.model(ema=True),
                meta={"step": ctx.step, "weights": "ema", "role": "AutoGuidance guide"},
            )
            os.replace(tmp, guide_dir)
            log.info("[demo] AutoGuidance guide: EMA weights of step %d -> %s", ctx.step, guide_dir)
        return {}

    cfg.eval.every = guide_step
    ckpt = Checkpoints(dit_dir, keep_last=10**9)  # only read here; the loop manages its own
    start = ckpt.latest_step() or 0
    ckpt.close()
    if start:
        log.info("[demo] DiT: resuming from the checkpoint of step %d (not from scratch)", start)
    out = loop.run(cfg, dit_dir, eval_fn=export_guide)
    if out["preempted"]:
        raise SystemExit(
            f"[demo] DiT training stopped by a signal at step {out['step']}; its checkpoint is in "
            f"{dit_dir}. Re-run the same command to resume."
        )
    with open(os.path.join(guide_dir, "meta.json")) as f:
        guide_meta = json.load(f)
    return {
        "weights": os.path.join(dit_dir, "ema"),
        "guide": guide_dir,
        "guide_step": guide_meta["step"],
        "steps": out["step"],
        "resumed_from_step": start,
        "last_metrics": out["last_metrics"],
    }
