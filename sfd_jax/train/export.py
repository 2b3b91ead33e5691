"""The EMA weights of a DiT training run, written alone in the weights-directory format used for sampling.

`python -m sfd_jax.train.export --workdir=DIR --out=DIR [--step=N] [--overwrite]` exports checkpoint N (default: the
newest readable) of a run, e.g. an intermediate step or an interrupted run; a finished run exports its last step to
`<workdir>/ema` by itself (`train.export_ema`). A non-empty --out needs --overwrite.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
from ml_collections import ConfigDict

from sfd_jax.checkpoint import Checkpoints, read_config_json
from sfd_jax.convert.dit import save_dit
from sfd_jax.errors import InputError
from sfd_jax.train.build import build

log = logging.getLogger(__name__)


def export_ema(directory: str, model_cfg: Any, model: Any, meta: dict | None = None) -> None:
    """Writes one model (built from the EMA weights) in the weights-directory format used for sampling."""
    save_dit(directory, model_cfg, model, meta=meta)


def export_ema_from_workdir(workdir: str, out: str, step: int | None = None, *, overwrite: bool = False) -> str:
    """Restores checkpoint `step` (default: newest readable) of a run on this host's devices and exports its EMA
    weights to `out`, which must be absent or empty unless `overwrite`. Returns `out`."""
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InputError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{out} exists and is not a directory")
    saved = read_config_json(workdir, step)
    config = ConfigDict(saved["config"])
    # Rebuilt on this host alone, whatever mesh the run trained on: the restore reshards onto it.
    config.mesh.ici = (1, -1, 1)
    config.mesh.dcn = (1, 1, 1)
    run = build(config, process_count=1, devices=jax.local_devices())
    ckpt = Checkpoints(workdir, keep_last=10**9)
    try:
        if step is None:
            restored = ckpt.restore_latest(run.setup.abstract_state)
            if restored is None:
                raise FileNotFoundError(f"no checkpoints under {ckpt.directory}")
            step, state = restored[0], restored[1]
        else:
            state, _, _ = ckpt.restore(step, run.setup.abstract_state)
    finally:
        ckpt.close()
    aux = run.setup.init_aux(int(config.seed))
    export_ema(
        out,
        run.model_cfg,
        run.setup.merge(state.ema_params, aux),
        meta={"source": workdir if "://" in workdir else os.path.abspath(workdir), "step": int(step), "weights": "ema"},
    )
    log.info("exported EMA weights of step %d to %s", step, out)
    return out


def _main(argv):
    from absl import app, flags

    if argv[1:]:
        raise app.UsageError(
            f"unexpected arguments {argv[1:]}; usage: python -m sfd_jax.train.export --workdir=DIR --out=DIR "
            "[--step=N] [--overwrite]"
        )
    try:
        export_ema_from_workdir(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step, overwrite=flags.FLAGS.overwrite)
    except (InputError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
    flags.DEFINE_string("out", None, "Directory to write the EMA weights to.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: newest readable).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")
    app.run(_main)
