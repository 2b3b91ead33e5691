"""SFD (Semantic-First Diffusion) DiT training, one variant per paper row.

    python -m sfd_jax.main --config=configs/sfd.py:tiny --workdir=/tmp/sfd_tiny --config.train.num_steps=20

Each paper row is a training variant here plus a sampling variant of configs/sample.py; docs/training.md has the
table (row -> training variant -> sampling variant -> expected FID -> reference config).
- `xl`        SFD-XL/1: lr 1e-4, betas (0.9, 0.999), REPA 'cos' λ=1, batch 256, 4M steps. Its 4M checkpoint is the
              800-epoch row (FID 2.54 unguided, 1.06 with sample.py:xl_autoguidance); its 400K checkpoint (kept) is
              the 80-epoch row (3.43 unguided, 1.30 with sample.py:xl_400k_autoguidance).
- `xl_80ep`   the later lr 2e-4 recipe: beta2 0.95, REPA 'cos_mse' λ=0.5, 400K steps (3.23 unguided, 1.38 with
              sample.py:xl_80ep_autoguidance: w = 1.5 and the retrained B/1 guide at 60K).
- `xxl`       SFD-XXL/1 ("1p0B"), the `xl` recipe: 4M = 800 epochs (2.38 / 1.04), 400K = 80 epochs (2.84 / 1.19).
- `guide_b`   B/1 AutoGuidance guide, same objective; keeps every guide step a sampling row uses (60K, 70K, 120K)
              besides every 20K.
- `ablate_baseline`    LightningDiT-XL alone: no semantic latent, no REPA (FID 8.17 at 400K).
- `ablate_no_semantic` + REPA, still no semantic latent (7.08): texture channels [0:32] only
                       (diffusion.semantic_chans=0, so the model has 32 in/out channels), Δt = 0. The data keep
                       their format; the train step feeds the model x1[..., :32].
- `ablate_sync`        + SemVAE latent, Δt = 0: synchronous joint denoising (5.24).
- `ablate_pca`         semantic-first with 8 PCA channels of the DINOv2 tokens instead of the SemVAE latent (4.06);
                       needs latents extracted with `--config.extract.semantic=pca` (40 channels).
- `ablate_no_repa`     SFD without REPA (λ = 0; the projector is not built).
- `tiny`      CPU smoke test: the 2-block width-64 DiT on learnable synthetic latents, fp32.
Ablations run 400K steps (the full semantic-first row is the `xl` run's 400K checkpoint).

Override any field: `--config.optim.lr=2e-4 --config.mesh.ici="(1,-1,1)" --config.data.source=arrayrecord
--config.data.path=/data/imagenet_latents`. Real training needs `data.source=arrayrecord` (latents extracted
with `--mode=extract`); 'synthetic' is for smoke tests and throughput measurements.
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = (
    "xl",
    "xl_80ep",
    "xxl",
    "guide_b",
    "ablate_baseline",
    "ablate_no_semantic",
    "ablate_sync",
    "ablate_pca",
    "ablate_no_repa",
    "tiny",
)
# The B/1 guide steps the sampling rows use (configs/sample.py); a guide run must keep each of them.
GUIDE_STEPS = (60_000, 70_000, 120_000)


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "train"
    c.seed = 0
    c.distributed = "auto"  # 'auto': jax.distributed.initialize() when the environment shows several processes

    c.model = ml_collections.ConfigDict(
        dict(
            size="xl",  # tiny | b | l | xl | xxl
            dtype="bfloat16",  # compute dtype; params, norms, softmax and losses stay float32
            remat=False,  # rematerialise blocks in the backward pass (memory for compute)
            remat_policy="full",  # with remat: 'full' (keep block inputs, ~1/3 more compute) | 'dots_no_batch' (keep
            # the linear layers' outputs, recompute norms/RoPE/attention core) | 'dots'
            attention_impl="",  # '' lets XLA pick; 'cudnn' for flash attention on GPUs
            repa_depth=2,  # REPA projector after this block
        )
    )
    c.diffusion = ml_collections.ConfigDict(
        dict(
            delta_t=0.3,  # Δt: semantic channels lead the texture by this much time
            semantic_weight=2.0,  # β on the semantic channels of the MSE
            semantic_chans=16,  # 16 = SemVAE latent; 1..16 = PCA-k of the DINOv2 tokens; 0 = texture-only ablation
            use_cosine_loss=True,
            time_dist="lognorm",  # lognorm | uniform
        )
    )
    c.repa = ml_collections.ConfigDict(dict(weight=1.0, mode="cos"))  # mode: cos | mse | cos_mse
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=0,  # linear warm-up from 0 (off in the reference)
            grad_clip=0.0,  # global-norm clipping (0 = off, as the reference)
            ema_decay=0.9999,
            label_dropout=0.1,  # y -> null class (1000) with this probability, for classifier-free guidance
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=256,  # global batch
            num_steps=4_000_000,
            log_every=100,
            ckpt_every=10_000,
            keep_last=3,  # newest checkpoints kept ...
            keep_every=100_000,  # ... plus every step divisible by this (FID curves); 0 = off
            keep_steps=(),  # ... plus these steps (saved even off the ckpt_every grid)
            async_checkpoint=True,
            nonfinite="stop",  # NaN/Inf loss or gradient: 'stop' (raise with the step) | 'skip' (drop the update)
            peak_flops_per_device=config_dict.placeholder(float),  # for MFU; None = look up the device kind
            export_ema=True,  # at the end, write <workdir>/ema (sfd_jax.convert.dit weights directory)
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",  # synthetic | arrayrecord
            path="",  # arrayrecord: directory written by --mode=extract
            num_classes=1000,
            latent_multiplier=1.0,
            random_flip=True,
            read_threads=8,
            prefetch_batches=8,  # arrayrecord
            noise_scale=0.5,
            dino_dtype="float32",  # synthetic
        )
    )
    c.mesh = ml_collections.ConfigDict(
        dict(
            ici=(1, -1, 1),  # (data, fsdp, tensor) inside a slice/node; one entry may be -1 ("the rest")
            dcn=(1, 1, 1),  # across slices/nodes
            # logical weight axis -> mesh axes ('' = replicated, 'data+fsdp' = both)
            rules=dict(embed="fsdp", mlp="tensor", heads="tensor", vocab="", conv_in="", conv_out="fsdp"),
        )
    )
    # jax.profiler trace of loop steps [start_step, start_step + num_steps) into dir (default <workdir>/profile);
    # start_step < 0: off. See docs/training.md ("Profiling").
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3, dir=""))
    c.eval = eval_block()
    return c


def eval_block() -> ml_collections.ConfigDict:
    """`every` and `fn` drive the loop's eval hook; the other fields are the settings of the default hook, the
    in-training FID of sfd_jax.eval.in_training, which reads exactly these (its FIELDS). They are declared here, with
    their defaults, so that the command line can set them. None: derived from the rest of the config."""
    derived = config_dict.placeholder(float)
    return ml_collections.ConfigDict(
        dict(
            every=0,  # run the hook every this many steps and after the last (0 = off)
            fn="sfd_jax.eval.in_training:fid",  # 'module:function', fn(EvalContext) -> {name: float}
            # the images: indices 0..num_images-1, their labels, their noise
            num_images=5000,
            labels="balanced",  # balanced | random | unconditional
            num_classes=0,  # 0 = data.num_classes
            seed=0,
            # decoding
            texture_vae="",  # weights directory or reference .ckpt (required)
            vae_dtype="float32",
            latent_stats="",  # '' = <data.path>/stats.json
            latent_multiplier=derived,  # None = data.latent_multiplier
            # the ODE solve, as --mode=sample
            solver="dopri5",
            num_steps=0,  # fixed-grid solvers only
            rtol=1e-3,
            atol=1e-6,
            delta_t=derived,  # None = diffusion.delta_t
            step_control="per_sample",
            phase_mode="split",
            max_steps=4096,
            # guidance, as --mode=sample
            guidance="none",
            scale=1.5,
            scale_sem=derived,
            scale_tex=derived,
            interval_start=derived,
            guide="",
            guide_use_ema=True,
            per_device_batch=32,
            decode_batch=8,
            # the scorer: the FID Inception (inception_weights) or a feature function, against ref_batch
            inception_weights="",
            feature_fn="",
            ref_batch="",
            resize="tf1",
            input_size=299,
            feature_batch=256,
            is_split_size=5000,
            grid_size=16,  # the side of <workdir>/eval_grids/step_XXXXXXX.png, in images
        )
    )


def get_config(arg: str = "xl") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/sfd.py:{arg} is not a variant; choose one of {', '.join(VARIANTS)}")
    c = base()
    if arg == "xl_80ep":
        c.optim.update(lr=2e-4, b2=0.95)
        c.repa.update(weight=0.5, mode="cos_mse")
        c.train.update(num_steps=400_000, keep_every=50_000)
    elif arg == "xxl":
        c.model.size = "xxl"
    elif arg == "guide_b":
        c.model.size = "b"
        c.train.update(num_steps=max(GUIDE_STEPS), keep_every=20_000, keep_steps=GUIDE_STEPS)
    elif arg.startswith("ablate_"):
        c.train.update(num_steps=400_000, keep_every=50_000)
        if arg == "ablate_sync":
            c.diffusion.delta_t = 0.0
        elif arg == "ablate_no_repa":
            c.repa.weight = 0.0
        elif arg == "ablate_pca":
            c.diffusion.semantic_chans = 8  # extract.pca_components' default, the ReDi baseline's k
        else:
            c.diffusion.update(semantic_chans=0, delta_t=0.0)
            if arg == "ablate_baseline":
                c.repa.weight = 0.0
    elif arg == "tiny":
        c.model.update(size="tiny", dtype="float32")
        c.optim.update(lr=1e-3, ema_decay=0.99)
        c.train.update(batch_size=16, num_steps=200, log_every=5, ckpt_every=50, keep_last=2, keep_every=0)
        c.data.update(num_classes=10)
    return c
