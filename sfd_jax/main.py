"""Command-line entry point: `python -m sfd_jax.main --config=configs/sfd.py:tiny --workdir=DIR --mode=train`.

Every job is a mode; each mode is `run(config, workdir)` in its own module, imported only when chosen, so a
sampling job never imports the trainer (and nothing imports torch).
"""
import importlib
import sys

from absl import app, flags
from ml_collections import config_flags

MODES = {
    "train": "sfd_jax.train.loop:run",
    "train_semvae": "sfd_jax.train.semvae:run",
    "train_texture_vae": "sfd_jax.train.texture_vae:run",
    "extract": "sfd_jax.data.extract:run",
    "sample": "sfd_jax.eval.sample:run",
    "evaluate": "sfd_jax.eval.evaluate:run",
    "demo": "sfd_jax.demo:run",
    "ablation": "sfd_jax.demo.ablation:run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file, `path.py:variant`.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_MODE = flags.DEFINE_string("mode", None, f"One of: {', '.join(MODES)}. Defaults to the config's `mode` field, "
                                          "else 'train'.")


def resolve_mode(name: str):
    if name not in MODES:
        raise app.UsageError(f"--mode={name!r} is not a mode; valid modes: {', '.join(MODES)}")
    module, fn = MODES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/sfd.py:tiny")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    mode = _MODE.value or config.get("mode", "train")
    resolve_mode(mode)(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
    sys.exit(0)
