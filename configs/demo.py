"""The whole SFD pipeline on Fashion-MNIST, end to end on a 2-core CPU (`make demo`, docs/demo.md).

    python -m sfd_jax.main --config=configs/demo.py --workdir=demo_workdir --mode=demo

Stages (each cached in the workdir; a re-run skips finished stages, a killed run resumes): a small
DINOv2-with-registers (patch 8: a 4×4 token grid, the same grid as the latent) pretrained self-supervised on the
training images, and its linear probe against the random initialisation → texture VAE (f8, 32×32 → 4×4×32) →
SemVAE on the DINOv2 tokens (→ 4×4×16; a second one on the random encoder's, for comparison) → latent extraction
(ArrayRecord + stats.json) → SFD DiT (Δt = 0.3, REPA on the DINOv2 tokens) with an early EMA snapshot as the
AutoGuidance guide → class-balanced Dopri5 sampling, unguided and guided → a SmallCNN judge: test accuracy, class
consistency, FID in its feature space. Expected: ≤ 10 minutes; report.json, samples.png and loss.png in the workdir
(numbers in docs/demo.md).

Variants:
- `default` the real demo.
- `tiny`    the same stages with seconds-long settings (tests/test_demo.py, inside `make test`).

Useful overrides: `--config.demo.data_dir=DIR` (IDX files), `--config.demo.vfm_checkpoint=DIR` (a transformers
Dinov2WithRegisters save_pretrained directory instead of pretraining one), `--config.dino.ssl.steps=0` (keep the
DINOv2 random), `--config.dit.train.num_steps=N`.
"""

import os

import ml_collections

from sfd_jax.config_loader import load_config

VARIANTS = ("default", "tiny")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _sibling(name: str, variant: str) -> ml_collections.ConfigDict:
    """get_config(variant) of another file in configs/."""
    return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py:{variant}"))


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/demo.py:{variant} is not a variant; choose one of {', '.join(VARIANTS)}")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.mode = "demo"
    c.seed = 0
    c.variant = variant

    # ---- data and what is shown ----------------------------------------------------------------------------------
    c.demo = ml_collections.ConfigDict(
        dict(
            data_dir=FASHION_MNIST_DIR,
            num_train_images=16000,  # images of the train split used for the latents and the DiT (first N)
            vfm_checkpoint="",  # transformers Dinov2WithRegisters directory; '' = the small DINOv2 pretrained here
            samples_per_class=100,  # per guidance mode; rows of samples.png show the first `grid_columns` of each
            grid_columns=8,
            guidance_scale=5.0,  # AutoGuidance w (docs/demo.md has a sweep)
            fid_test_images=10000,  # real reference set for the classifier-feature FID
            semvae_random=True,  # also train the SemVAE on the random DINOv2 (report.json compares the two)
        )
    )

    # ---- 1. texture VAE: 32×32×3 → 4×4×32 (f8) -------------------------------------------------------------------
    # f8 rather than f4: 16 DiT tokens instead of 64 make a DiT step ~4.5× cheaper on the CPU, which buys the DiT the
    # training steps it needs inside the time budget. Width 8 at 32×32 (channels 8, 16, 32, 32): the full-resolution
    # decoder levels are most of the cost, and this VAE trains at ~1.8× the images/s of width 16 with (1, 2, 2, 2)
    # for nearly the same reconstructions, except sandals' thin straps (docs/demo.md, "Budgets").
    tv = _sibling("texture_vae", "demo")
    tv.model.update(ch=8, ch_mult=(1, 2, 4, 4))
    tv.optim.lr = 2e-3
    tv.train.update(num_steps=400, batch_size=64, log_every=50, ckpt_every=200)
    tv.eval.update(every=400)
    c.texture_vae = tv

    # ---- 2. DINOv2-with-registers (pretrained here unless demo.vfm_checkpoint) + SemVAE ----------------------------
    # Patch 8 on the 32×32 image gives the 4×4 grid of the texture latent; the DiT's REPA targets are these tokens.
    c.dino = ml_collections.ConfigDict(
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=8,
            image_size=32,
            num_register_tokens=4,
            mlp_ratio=4,
            seed=1,
        )
    )
    # Self-supervised pretraining of that DINOv2 on the train split's images, without labels (sfd_jax.train.vfm_ssl;
    # steps = 0 keeps it random). Starts from the random weights above, which the report's linear probe compares it
    # with. Mild crops and no erasing: at this budget stronger augmentation made the probe worse (docs/demo.md).
    c.dino.ssl = ml_collections.ConfigDict(
        dict(
            steps=400,
            batch_size=128,
            lr=2e-3,
            weight_decay=0.05,
            warmup_steps=50,
            temperature=0.2,
            proj_hidden=256,
            proj_dim=64,
            crop_min_area=0.7,
            erase_prob=0.0,
            ckpt_every=100,
            log_every=50,
            seed=0,
        )
    )
    sv = _sibling("semvae", "demo")
    sv.model.update(input_dim=64, hidden_dim=64, bottleneck_dim=16, num_heads=4, num_blocks=1)
    sv.optim.update(lr=2e-3, warmup_steps=20, decay_start=100, decay_end=200)
    sv.train.update(batch_size=64, num_steps=200, log_every=50, ckpt_every=100, async_checkpoint=False)
    sv.eval.update(every=200, num_images=512, batch_size=128)
    sv.data.update(resize=32, crop=32)
    c.semvae = sv

    # ---- 3. latent extraction -------------------------------------------------------------------------------------
    c.extract = ml_collections.ConfigDict(
        dict(
            batch_size_per_device=250,
            shard_size=5000,
            stats_images=10000,
            latent_dtype="float32",
            feature_dtype="float16",
            num_workers=2,
        )
    )

    # ---- 4. SFD DiT (Δt = 0.3) and the early-EMA AutoGuidance guide -----------------------------------------------
    dit = _sibling("sfd", "tiny")
    # A DiT between the table's sizes (sfd_jax.train.build.ARCHITECTURE_FIELDS); the demo sets input_size, repa_dim and
    # num_classes from the stages above (the latent grid, the DINOv2 width, Fashion-MNIST's 10 classes).
    dit.model.update(
        size="tiny", dtype="float32", depth=4, hidden_size=128, num_heads=4, repa_projector_dim=256, repa_depth=2
    )
    dit.diffusion.delta_t = 0.3
    # grad_clip: the zero-initialised output layer makes the velocity-cosine loss's first gradients ~1e6; unclipped
    # they would inflate Adam's second moment for thousands of steps. label_dropout 0: AutoGuidance needs no
    # unconditional model, so every example trains the class-conditional one. With lr 3e-3 as well, 1,400 steps beat
    # 2,000 of lr 2e-3 with dropout 0.1 on the same data: 81.2% against 77.5% with AutoGuidance (docs/demo.md).
    dit.optim.update(lr=3e-3, ema_decay=0.995, warmup_steps=100, grad_clip=1.0, label_dropout=0.0)
    dit.train.update(
        batch_size=128,
        num_steps=1400,
        log_every=50,
        ckpt_every=350,
        keep_last=2,
        keep_every=0,
        async_checkpoint=False,
        export_ema=True,
    )
    dit.data.update(source="arrayrecord", num_classes=10, read_threads=2, prefetch_batches=4)
    dit.mesh.ici = (-1, 1, 1)
    dit.eval.every = 0
    c.dit = dit
    c.guide = ml_collections.ConfigDict(dict(step=700))  # the EMA weights of this step guide the final model

    # ---- 5. sampling ----------------------------------------------------------------------------------------------
    c.sample = ml_collections.ConfigDict(
        dict(
            solver="dopri5",
            rtol=1e-2,
            atol=1e-3,
            step_control="per_sample",
            phase_mode="jump",
            max_steps=1024,
            per_device_batch=250,
            seed=0,
        )
    )

    # ---- 6. evaluation: the SmallCNN judge ------------------------------------------------------------------------
    c.classifier = ml_collections.ConfigDict(dict(steps=400, batch_size=128, lr=2e-3, width=16, feature_dim=128))

    if tiny:
        c.demo.update(num_train_images=512, samples_per_class=4, grid_columns=4, fid_test_images=256)
        # f2 and patch 2 (a 16×16 grid): two VAE levels instead of four compile in half the time.
        tv.model.update(ch=8, ch_mult=(1, 2))
        tv.train.update(num_steps=20, batch_size=16, log_every=10, ckpt_every=10)
        tv.eval.update(every=20, num_images=8)
        c.dino.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=2)
        c.demo.semvae_random = True  # the CI guard runs the optional stages too (pretraining, random-encoder SemVAE)
        c.dino.ssl.update(steps=4, batch_size=16, warmup_steps=1, proj_hidden=16, proj_dim=8, ckpt_every=2, log_every=2)
        sv.model.update(input_dim=32, hidden_dim=32, num_heads=2)
        sv.train.update(batch_size=16, num_steps=10, log_every=5, ckpt_every=10)
        sv.eval.update(every=10, num_images=32, batch_size=16)
        sv.data.workers = 0
        c.extract.update(batch_size_per_device=8, shard_size=256, stats_images=256)
        dit.model.update(depth=2, hidden_size=32, num_heads=2, repa_projector_dim=32, repa_depth=1)
        dit.optim.update(warmup_steps=0)
        dit.train.update(batch_size=16, num_steps=12, log_every=4, ckpt_every=4)
        c.guide.step = 4
        c.sample.update(max_steps=64, per_device_batch=1)
        c.classifier.update(steps=20, batch_size=32, width=8, feature_dim=16)
    return c
