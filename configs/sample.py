"""Sampling for FID: N class-balanced images → one ADM-format npz (resumable), then `--mode=evaluate`.

    python -m sfd_jax.main --config=configs/sample.py:xl_autoguidance --workdir=runs/sample_xl --mode=sample \
        --config.sample.model=weights/sfd_xl_800ep --config.sample.guide=weights/guide_b_70k \
        --config.sample.texture_vae=weights/texture_vae \
        --config.sample.latent_stats=/data/imagenet_latents/stats.json

writes runs/sample_xl/samples_50000x256x256x3.npz (+ grid.png, sample.json). Scored with configs/eval.py against
ADM's VIRTUAL_imagenet256_labeled.npz, the released SFD-XL 800-epoch weights with AutoGuidance (B/1 guide at 70K
steps, w = 1.5, Dopri5 rtol 1e-3 / atol 1e-6) should give FID ≈ 1.06 (docs/sampling.md#paper-results); unguided ≈ 2.54.

Weights: `model` / `guide` are DiT weights directories (`python -m sfd_jax.convert dit 0400000.pt OUT`, or the
trainer's `<workdir>/ema` export) or reference `.pt` checkpoints (their EMA weights unless use_ema=False);
`texture_vae` is a directory from `python -m sfd_jax.convert texture_vae ldm-imagenet256-f16d32-50ep.ckpt OUT`
(or the .ckpt itself); `latent_stats` is the stats.json written by `--mode=extract` (texture mean/std).

Variants: each paper row's sampling setting, to use with the weights of the training variant named (configs/sfd.py;
the table with the expected FIDs is in docs/training.md). AutoGuidance uses the B/1 guide (`sfd.py:guide_b`) at the
step `guide_step` names; a guide weights directory recording another step is refused.
- `xl_autoguidance`       `sfd.py:xl` at 4M (800 ep), guide 70K, w = 1.5 -- FID 1.06 (default)
- `xl_400k_autoguidance`  `sfd.py:xl` at 400K (80 ep), guide 70K, w = 1.6 -- FID 1.30
- `xl_80ep_autoguidance`  `sfd.py:xl_80ep` (lr 2e-4) at 400K, the retrained guide at 60K, w = 1.5 -- FID 1.38
- `xxl_autoguidance`      `sfd.py:xxl` at 4M, guide 120K, w = 1.5 -- FID 1.04
- `xxl_400k_autoguidance` `sfd.py:xxl` at 400K, guide 60K, w = 1.5 -- FID 1.19
- `unguided`              no guidance, Δt = 0.3 -- FID 2.54 / 3.43 (xl 4M / 400K), 3.23 (xl_80ep), 2.38 / 2.84 (xxl),
                          and the Δt = 0.3 ablations at 400K (ablate_pca 4.06)
- `unguided_sync`         no guidance, Δt = 0: the synchronous ablations (ablate_baseline, ablate_no_semantic,
                          ablate_sync)
- `cfg`                   classifier-free guidance with the null label (set scale / interval_start)
- `euler`                 unguided, Euler with the reference's 100 grid points (99 steps)
- `tiny`                  CPU smoke run: 64 images, Euler 8 steps, small batches
Resume: rerun the same command; finished chunks are kept. Override anything, e.g. `--config.sample.num_images=10000
--config.sample.save_png=True --config.sample.solver=euler --config.sample.num_steps=99`.
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = (
    "xl_autoguidance",
    "xl_400k_autoguidance",
    "xl_80ep_autoguidance",
    "xxl_autoguidance",
    "xxl_400k_autoguidance",
    "unguided",
    "unguided_sync",
    "cfg",
    "euler",
    "tiny",
)


def get_config(arg: str = "xl_autoguidance") -> ml_collections.ConfigDict:
    arg = arg or "xl_autoguidance"
    if arg not in VARIANTS:
        raise ValueError(f"configs/sample.py:{arg} is not a variant; choose one of {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.mode = "sample"
    c.seed = 0  # noise of image g = N(0, I) from fold_in(PRNGKey(seed), g)
    c.distributed = "auto"  # jax.distributed.initialize() when the environment shows several processes
    c.sample = ml_collections.ConfigDict(
        dict(
            model="",  # DiT weights directory or reference .pt checkpoint
            use_ema=True,  # reference .pt: its 'ema' weights (False: 'model')
            dtype="float32",  # DiT compute dtype ('bfloat16' is faster; params stay float32)
            texture_vae="",  # texture VAE weights directory or reference .ckpt
            vae_dtype="float32",
            latent_stats="",  # stats.json from --mode=extract (or the dataset directory holding it)
            latent_multiplier=1.0,  # the training data's latent_multiplier (denormalise: x·std/multiplier + mean)
            num_images=50_000,
            labels="balanced",  # balanced: image g gets (g·num_classes)//num_images | random | unconditional
            num_classes=0,  # 0: the model's label count (1000)
            label_seed=0,  # labels='random' only
            # solver (docs/diffusion.md#adaptive-solver)
            solver="dopri5",  # dopri5 | euler | heun
            num_steps=0,  # euler/heun steps (the reference's N grid points = N − 1 steps); 0 for dopri5
            rtol=1e-3,
            atol=1e-6,
            delta_t=0.3,  # the Δt the model was trained with
            step_control="per_sample",  # per_sample: each image its own adaptive steps (device-count independent)
            phase_mode="split",  # split | jump | none (see sfd_jax.diffusion.sampler)
            max_steps=4096,
            # guidance
            guidance="autoguidance",  # none | cfg | autoguidance
            scale=1.5,
            scale_sem=config_dict.placeholder(float),  # AutoGuidance: separate semantic / texture weights
            scale_tex=config_dict.placeholder(float),
            interval_start=config_dict.placeholder(float),  # a part stays unguided while its own time is below this
            guide="",  # AutoGuidance: the weaker model (B/1), weights directory or .pt
            guide_step=70_000,  # the guide training step the recipe uses (0 = unchecked)
            guide_use_ema=True,
            # execution (does not change the images for a fixed per_device_batch / decode_batch)
            per_device_batch=32,  # global batch = per_device_batch × ('data' × 'fsdp') devices
            decode_batch=8,  # images per device decoded at once (0 = the whole per-device batch)
            chunk_size=1000,  # images per resumable chunk file
            # outputs
            save_npz=True,
            npz_name="",  # default samples_{N}x{H}x{W}x3.npz
            shuffle_seed=42,  # npz row order: random.Random(42).shuffle(list(range(N))), as the reference
            npz_sha256=False,  # record the npz's SHA-256 in sample.json
            save_png=False,  # images/{index:06d}.png, unshuffled
            grid_size=64,
            grid_cols=8,
            overwrite=False,  # True: delete chunks made with other settings instead of refusing
            log_every_s=30.0,
        )
    )
    # jax.profiler trace of loop steps [start_step, start_step + num_steps) into dir (default <workdir>/profile);
    # start_step < 0: off. See docs/training.md ("Profiling").
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3, dir=""))
    c.mesh = ml_collections.ConfigDict(
        dict(
            ici=(-1, 1, 1),  # (data, fsdp, tensor): pure data parallelism, weights replicated
            dcn=(1, 1, 1),
            rules=dict(embed="fsdp", mlp="tensor", heads="tensor", vocab="", conv_in="", conv_out="fsdp"),
        )
    )
    s = c.sample
    if arg == "xl_400k_autoguidance":
        s.scale = 1.6
    elif arg == "xl_80ep_autoguidance":
        s.guide_step = 60_000
    elif arg in ("xxl_autoguidance", "xxl_400k_autoguidance"):
        s.update(per_device_batch=16, guide_step=120_000 if arg == "xxl_autoguidance" else 60_000)
    elif arg in ("unguided", "unguided_sync"):
        s.guidance = "none"
        if arg == "unguided_sync":
            s.delta_t = 0.0
    elif arg == "cfg":
        s.guidance = "cfg"
    elif arg == "euler":
        s.update(guidance="none", solver="euler", num_steps=99)
    elif arg == "tiny":
        s.update(
            guidance="none",
            solver="euler",
            num_steps=8,
            num_images=64,
            per_device_batch=4,
            decode_batch=0,
            chunk_size=16,
            grid_size=16,
            grid_cols=4,
            log_every_s=0.0,
        )
    return c
