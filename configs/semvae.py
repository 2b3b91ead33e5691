"""Semantic VAE training (docs/semantic.md#training-the-semvae), `--mode=train_semvae`.

    python -m sfd_jax.main --config=configs/semvae.py:demo --workdir=/tmp/semvae_demo --mode=train_semvae

Variants:
- `imagenet` the reference recipe: ImageNet train (TFDS), DINOv2-B/14-reg tokens of Resize(256) → CenterCrop(224)
             images computed on the fly, the 57.9M SemVAE (768 → 16, 4 blocks, 6 heads), AdamW 5e-5 / wd 0.01,
             warmup 500 steps from 0.01×, constant to 800K, cosine to 0.1× at 1M, batch 64, bf16 compute.
             Needs `--config.dino.checkpoint=<DINOv2 directory>` (see docs/semantic.md) and the TFDS dataset.
             Held out: 1,000 ImageNet validation images.
- `features` the same model and recipe on pre-extracted DINOv2 tokens: `--config.data.features=train.npy`
             (N, 256, 768) and optionally `--config.data.eval_features=val.npy`.
- `demo`     Fashion-MNIST through a small randomly initialised DINOv2 (16 tokens of 96 features per image) and a
             small SemVAE; a few minutes on a 2-core CPU. Random DINOv2 features only show that the machinery
             trains: held-out MSE falls and cosine similarity rises (docs/semantic.md).
- `tiny`     synthetic images, a 1-layer width-32 DINOv2 and a width-32 SemVAE, for tests.

The cosine term is taken over the token axis, as the reference training code that made the released SemVAE does
(`loss.cos_axis='token'`; 'feature' is the paper's per-token cosine). Override anything, e.g.
`--config.loss.cos_axis=feature`,
`--config.model.dtype=float32`, `--config.train.batch_size=256`.
"""

import ml_collections

from sfd_jax.models.dinov2 import Dinov2Config
from sfd_jax.models.semvae import SemVAEConfig

VARIANTS = ("imagenet", "features", "demo", "tiny")


def _source(kind="", **fields) -> dict:
    base = dict(kind=kind, path="", name="", split="", pad_to=0, num_images=0, size=0, seed=0)
    base.update(fields)
    return base


def _dino(cfg: Dinov2Config) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: v for k, v in cfg.to_hf().items() if k != "model_type"})


def get_config(arg: str = "imagenet") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/semvae.py:{arg} is not a variant; choose one of {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.mode = "train_semvae"
    c.seed = 0
    c.distributed = "auto"
    # Pure data parallelism by default (58M params); 'embed' over 'fsdp' shards weights and optimizer state.
    c.mesh = ml_collections.ConfigDict(
        dict(
            ici=(-1, 1, 1),
            dcn=(1, 1, 1),
            rules=dict(embed="fsdp", mlp="tensor", heads="tensor", vocab="", conv_in="", conv_out="fsdp"),
        )
    )
    c.model = ml_collections.ConfigDict(SemVAEConfig(dtype="bfloat16").to_dict())
    c.dino = ml_collections.ConfigDict(
        dict(
            checkpoint="",  # save_pretrained directory / torch.hub .pth; empty = random init (smoke tests only)
            dtype="bfloat16",
            config=_dino(Dinov2Config()),  # architecture used when no checkpoint is given (ViT-B/14-reg)
        )
    )
    c.loss = ml_collections.ConfigDict(dict(mse=1.0, l1=0.0, cos=1.0, kl=1e-7, cos_axis="token"))
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=5e-5,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            warmup_steps=500,
            warmup_init=0.01,
            decay_start=800_000,
            decay_end=1_000_000,
            final_scale=0.1,
            grad_clip=0.0,
            ema_decay=0.0,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=64,
            num_steps=1_000_000,
            log_every=100,
            ckpt_every=5000,
            keep_last=3,
            keep_every=0,
            async_checkpoint=True,
            nonfinite="stop",
        )
    )
    c.eval = ml_collections.ConfigDict(dict(every=10_000, num_images=1000, batch_size=200))
    c.data = ml_collections.ConfigDict(
        dict(
            kind="images",
            resize=256,
            crop=224,
            workers=16,
            features="",
            eval_features="",
            source=_source("tfds", name="imagenet2012", split="train"),
            eval_source=_source("tfds", name="imagenet2012", split="validation"),
        )
    )

    if arg == "features":
        c.data.update(kind="features", workers=4)
    elif arg == "demo":
        dino = Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56)
        c.dino.update(dtype="float32", config=_dino(dino))
        c.model = ml_collections.ConfigDict(
            SemVAEConfig(input_dim=96, hidden_dim=128, bottleneck_dim=16, num_heads=4, num_blocks=2).to_dict()
        )
        c.optim.update(lr=1e-3, warmup_steps=50, decay_start=400, decay_end=600, grad_clip=1.0)
        c.loss.cos_axis = "feature"  # the demo's documented results (docs/demo.md) were measured with it
        c.train.update(batch_size=32, num_steps=600, log_every=50, ckpt_every=300)
        c.eval.update(every=200, num_images=256, batch_size=128)
        c.data.update(
            resize=64,
            crop=56,
            workers=2,
            source=_source("fashion_mnist", path="/usr/share/datasets/fashion-mnist", split="train", pad_to=32),
            eval_source=_source("fashion_mnist", path="/usr/share/datasets/fashion-mnist", split="test", pad_to=32),
        )
    elif arg == "tiny":
        dino = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=42)
        c.dino.update(dtype="float32", config=_dino(dino))
        c.model = ml_collections.ConfigDict(
            SemVAEConfig(input_dim=32, hidden_dim=32, bottleneck_dim=8, num_heads=2, num_blocks=1).to_dict()
        )
        c.optim.update(lr=3e-3, warmup_steps=2, decay_start=1000, decay_end=2000, ema_decay=0.0)
        c.train.update(batch_size=16, num_steps=40, log_every=10, ckpt_every=20, async_checkpoint=False)
        c.eval.update(every=40, num_images=32, batch_size=16)
        c.data.update(
            resize=48, crop=42, workers=0, source=_source("synthetic", num_images=96, size=48), eval_source=_source()
        )
    return c
