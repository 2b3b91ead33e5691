"""Texture VAE (LDM KL autoencoder) training on custom data.

    python -m sfd_jax.main --config=configs/texture_vae.py:demo --workdir=/tmp/texture_vae_demo \
        --mode=train_texture_vae

Variants:
- `demo`: Fashion-MNIST padded to 32×32, repeated to RGB; a 0.2M-parameter VAE (ch 16, ch_mult (1, 2)) whose
  latent is 16×16×32, the texture-latent layout the rest of sfd_jax expects. 400 steps of batch 16, a couple of
  minutes on a 2-core CPU (docs/texture_vae.md gives the measured time and PSNR).
- `tiny`: synthetic 16×16 images and a one-level (f1) VAE, for tests.
- `f16d32`: the reference SD-VAE f16d32 architecture at 256×256 (image folder or TFDS source; accelerators).

Any field can be overridden, e.g. `--config.model.ch_mult="(1,2,2)"` for 8×8 latents,
`--config.data.source.kind=folder --config.data.source.path=/data/my_images`.
"""

import ml_collections

from sfd_jax.models.texture_vae import TextureVAEConfig

VARIANTS = ("demo", "tiny", "f16d32")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/texture_vae.py:{arg} is not a variant; choose one of {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.mode = "train_texture_vae"
    c.seed = 0
    c.distributed = "auto"

    # Batch over 'data' (plain data parallelism); conv output channels may additionally be split over 'fsdp'.
    c.mesh = ml_collections.ConfigDict(dict(ici=(-1, 1, 1), dcn=(1, 1, 1), rules={"conv_in": "", "conv_out": "fsdp"}))
    c.loss = ml_collections.ConfigDict(dict(recon="l1", kl_weight=1e-6))
    c.optim = ml_collections.ConfigDict(
        dict(lr=1e-3, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0, warmup_steps=50, grad_clip=1.0, ema_decay=0.0)
    )
    # The loop's settings carry the same names in every trainer's config (sfd_jax.train.skeleton).
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=16,
            num_steps=400,
            log_every=50,
            ckpt_every=200,
            keep_last=2,
            keep_every=0,
            async_checkpoint=True,
            nonfinite="stop",
        )
    )
    fashion_mnist = dict(
        kind="fashion_mnist",
        path="/usr/share/datasets/fashion-mnist",
        split="train",
        pad_to=32,
        name="",
        num_images=0,
        size=0,
        seed=0,
    )
    # eval.source.kind '' = evaluate on the first images of the training source.
    c.eval = ml_collections.ConfigDict(
        dict(every=200, num_images=16, grid_columns=8, source={**fashion_mnist, "split": "test"})
    )
    c.data = ml_collections.ConfigDict(dict(image_size=32, source=fashion_mnist))

    if arg == "demo":
        model = TextureVAEConfig(
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(),
            resolution=32,
            z_channels=32,
            embed_dim=32,
            num_groups=8,
        )
    elif arg == "tiny":
        # One level, no down/up-sampling: XLA's CPU compile time grows with the parameters and kernels, and the second
        # level cost ~40% of each program (train step 5.3 → 3.4 s, initialiser 3.1 → 2.0 s, 8 devices). The
        # down/up-sampling layers are trained in the demo's test and checked against the reference by the golden
        # forward in tests/test_texture_vae.py.
        model = TextureVAEConfig(
            ch=16,
            ch_mult=(1,),
            num_res_blocks=1,
            attn_resolutions=(),
            resolution=16,
            z_channels=4,
            embed_dim=4,
            num_groups=8,
        )
        c.data.image_size = 16
        c.data.source = dict(kind="synthetic", num_images=64, size=16, seed=0, path="", split="", pad_to=0, name="")
        c.eval.source.kind = ""
        c.optim.update(lr=2e-3, warmup_steps=0)
        c.train.update(batch_size=16, num_steps=30, log_every=10, ckpt_every=30)
        c.eval.update(every=30, num_images=8)
    else:  # f16d32: the reference architecture; Adam betas (0.5, 0.9) as in the LDM autoencoder recipe
        model = TextureVAEConfig()
        c.data.image_size = 256
        c.data.source = dict(kind="folder", path="", split="train", pad_to=0, name="", num_images=0, size=0, seed=0)
        c.eval.source = dict(c.data.source, kind="")
        c.optim.update(lr=1e-4, warmup_steps=1000, grad_clip=1.0)
        c.train.update(batch_size=64, num_steps=200_000, log_every=100, ckpt_every=5000, keep_last=3)
        c.eval.update(every=5000, num_images=16)
    c.model = ml_collections.ConfigDict(model.to_dict())
    return c
