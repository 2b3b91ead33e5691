"""`--mode=demo`: the whole SFD pipeline on Fashion-MNIST, end to end on a CPU (configs/demo.py, docs/demo.md).

    python -m sfd_jax.main --config=configs/demo.py --workdir=demo_workdir --mode=demo

Stages, each run by the module that owns it and cached in the workdir (`pipeline.py` drives them):

  texture_vae   sfd_jax.train.texture_vae on 32×32 Fashion-MNIST (28 → 32 padded, gray → RGB)
  semvae        a DINOv2-with-registers whose patch grid equals the texture latent grid (random, or
                demo.vfm_checkpoint), saved as a transformers directory, then sfd_jax.train.semvae on its tokens
  extract       sfd_jax.data.extract: texture + semantic posterior samples and DINOv2 tokens → ArrayRecord, stats.json
  dit           sfd_jax.train.loop with the SFD objective (Δt = 0.3, REPA); the loop's eval hook exports the EMA
                weights of step `guide.step` once: the weak model of AutoGuidance (the paper's guide is a smaller
                model trained for less time; here it is the same model, earlier)
  classifier    sfd_jax.eval.classifier: the SmallCNN judge, trained on the Fashion-MNIST train split
  sample_*      sfd_jax.eval.generator: class-balanced Dopri5 three-phase sampling, unguided and AutoGuidance
  evaluate      class consistency and a Fréchet distance in the judge's feature space against the test split

(train_stages.py holds the first four, eval_stages.py the rest, outputs.py report.json / samples.png / loss.png.)
A finished stage leaves `stages/<name>.json` (its result and wall time) and is skipped on a re-run. The trainers
resume from their own checkpoints, so a run killed inside a stage continues from the last checkpoint (the DiT
checkpoints every `dit.train.ckpt_every` steps together with its data-iterator position).
"""

from sfd_jax.demo.pipeline import Stages, run  # noqa: F401
from sfd_jax.demo.data import check_data, padded_split, UnitRangeImages, unit_range  # noqa: F401
