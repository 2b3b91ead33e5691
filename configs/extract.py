"""Latent extraction (`--mode=extract`): images → ArrayRecord latents + REPA targets + stats.json.

ImageNet (TFDS imagenet2012 prepared with `python -m sfd_jax.data.sources prepare-imagenet`), reference weights:

    python -m sfd_jax.main --config=configs/extract.py:imagenet --mode=extract --workdir=/data/sfd_latents \
        --config.extract.source.path=/data/tfds \
        --config.extract.texture_vae=/ckpt/ldm-imagenet256-f16d32-50ep.ckpt \
        --config.extract.dinov2=/ckpt/dinov2-with-registers-base \
        --config.extract.semvae=/ckpt/semantic_ae_final.pt

Variants: `imagenet` (TFDS, SemVAE), `folder` (one sub-folder per class: set extract.source.path), `pca`
(ImageNet with PCA-8 semantic latents instead of the SemVAE, the paper's Table 4 comparison). The output directory
is `extract.out_dir`, or the workdir when empty; rerunning the same command resumes. Expected result: one
`latents-SSSSS-of-NNNNN.array_record` (+ `.json`) per 1,000 images, `dataset.json`, `stats.json`; train with
`--config.data.path=<that directory>`.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "imagenet") -> ml_collections.ConfigDict:
    variant = arg or "imagenet"
    if variant not in ("imagenet", "folder", "pca"):
        raise ValueError(f"configs/extract.py: variant {variant!r}; choose imagenet, folder or pca")
    c = ml_collections.ConfigDict()
    c.mode = "extract"
    c.distributed = "auto"  # jax.distributed.initialize() when a multi-process environment is detected

    # jax.profiler trace of loop steps [start_step, start_step + num_steps) into dir (default <workdir>/profile);
    # start_step < 0: off. See docs/training.md ("Profiling").
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3, dir=""))
    e = c.extract = ml_collections.ConfigDict()
    e.source = ml_collections.ConfigDict()
    e.source.kind = "folder" if variant == "folder" else "tfds"
    e.source.path = ""  # folder root, or TFDS data_dir (empty: TFDS default)
    e.source.name = "imagenet2012"
    e.source.split = "train"
    e.source.pad_to = 0  # Fashion-MNIST only: pad 28 → pad_to (0: no padding)
    e.out_dir = ""  # empty: the workdir

    # Encoders (checkpoint paths; see docs/data.md for the accepted formats).
    e.texture_vae = ""  # reference .ckpt, or a directory written by sfd_jax.convert
    e.texture_vae_workdir = ""  # alternatively: a --mode=train_texture_vae workdir (latest checkpoint, EMA)
    e.dinov2 = ""  # transformers save_pretrained directory of dinov2-with-registers-base
    e.semvae = ""  # semantic_ae_final.pt or a SemVAE weights directory
    e.semvae_num_heads = 6  # not stored in the reference weights
    e.semantic = "pca" if variant == "pca" else "semvae"
    e.pca_path = ""  # optional fitted PCA (.npz from an earlier extraction); empty: fit on pca_fit_images
    e.pca_components = 8
    e.pca_fit_images = 1000
    e.dtype = "float32"  # encoder compute dtype ('bfloat16' on accelerators)

    e.image_size = 256
    e.dino_size = 224
    e.batch_size_per_device = 64
    e.shard_size = 1000
    e.seed = 0
    e.latent_dtype = "float32"
    e.feature_dtype = "float16"
    e.stats_images = 10000
    e.skip_bad_images = False
    e.prefix = "latents"
    e.num_workers = 16
    e.max_shards = config_dict.placeholder(int)  # stop after this many new shards (resume later)
    e.progress = True
    return c
