"""ADM-compatible evaluation (FID, sFID, Inception Score, precision, recall) of generated images.

    python -m sfd_jax.main --config=configs/eval.py --workdir=runs/eval --mode=evaluate \
        --config.eval.samples=runs/sample/samples.npz \
        --config.eval.ref_batch=VIRTUAL_imagenet256_labeled.npz \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

writes runs/eval/score.json with fid, sfid, inception_score, precision, recall. Expected for the released
SFD-XL 800-epoch checkpoint with AutoGuidance (50K class-balanced samples): FID ≈ 1.06 (docs/sampling.md#paper-results).

Variants:
- `score` (default): score `samples` (ADM npz `arr_0` N×256×256×3 uint8, or a folder of PNGs) against the ADM
  reference batch `ref_batch`.
- `build_reference`: write an ADM-format reference batch from your own images (`images`: npz/npy/PNG folder,
  already center-cropped, e.g. with `sfd_jax.data.preprocess.adm_center_crop`) with the same network:

    python -m sfd_jax.main --config=configs/eval.py:build_reference --workdir=runs/ref --mode=evaluate \
        --config.eval.images=my_images.npz --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

The Inception weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or an npz with its keys); the
file is not downloaded for you. See docs/evaluation.md.
"""

import ml_collections

VARIANTS = ("score", "build_reference")


def get_config(arg: str = "score") -> ml_collections.ConfigDict:
    arg = arg or "score"
    if arg not in VARIANTS:
        raise ValueError(f"configs/eval.py:{arg} is not a variant; choose one of {', '.join(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.mode = "evaluate"
    # jax.profiler trace of loop steps [start_step, start_step + num_steps) into dir (default <workdir>/profile);
    # start_step < 0: off. See docs/training.md ("Profiling").
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=3, dir=""))
    c.eval = ml_collections.ConfigDict(
        dict(
            task=arg,  # 'score' | 'build_reference'
            inception_weights="",  # pt_inception-2015-12-05-*.pth or an npz with the same keys
            samples="",  # score: npz (arr_0) or folder of PNG/JPEG
            ref_batch="",  # score: ADM reference batch npz (arr_0 [+ mu, sigma, mu_s, sigma_s])
            output="",  # JSON path; default WORKDIR/<task>.json
            max_samples=0,  # score only the first N samples (0 = all)
            batch_size=256,  # global Inception batch, rounded up to a multiple of the device count
            resize="tf1",  # 'tf1': ADM's graph (TF1 bilinear, (x-128)/128); 'torch': pytorch-fid
            input_size=299,  # network input size; 299 for numbers comparable with ADM / pytorch-fid
            dtype="float32",  # 'bfloat16' is faster but its features do not match ADM's
            precision="highest",  # conv/matmul precision; lower ones use TF32 (GPU) or bf16 (TPU) passes
            cache_reference=True,  # keep reference-batch features in WORKDIR/cache (keyed by file, weights)
            is_split_size=5000,  # Inception Score split size (ADM: 5000)
            fid_eps=1e-6,  # added to both covariances inside sqrtm when eps is used
            fid_eps_rule="if_not_finite",  # ADM: eps only when the first sqrtm is not finite; or 'always'
            fid_sqrtm="eigh",  # 'eigh' (stable, always finite) or 'scipy' (scipy.linalg.sqrtm, as ADM)
            pr_k=3,  # precision/recall neighbourhood size
            pr_row_block=10000,  # rows per distance block (memory: row_block × N float32)
            images="",  # build_reference: images whose statistics form the reference
            reference_out="",  # build_reference: output npz; default WORKDIR/reference_batch.npz
            reference_keep=10000,  # build_reference: images kept in arr_0 (0 = all)
            reference_seed=0,  # build_reference: which images are kept
        )
    )
    return c
