"""Command-line entry point: `python -m sfd_jax.main --config=configs/sfd.py:tiny --workdir=DIR --mode=train`.

Every job is a mode; each mode is `run(config, workdir)` in its own module, imported only when chosen, so a
sampling job never imports the trainer (and nothing imports torch).
"""

import difflib
import importlib
import importlib.util
import os
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

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file, `path.py:variant`.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_MODE = flags.DEFINE_string(
    "mode", None, f"One of: {', '.join(MODES)}. Defaults to the config's `mode` field, else 'train'."
)


def resolve_mode(name: str):
    if name not in MODES:
        raise app.UsageError(f"--mode={name!r} is not a mode; valid modes: {', '.join(MODES)}")
    module, fn = MODES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def _fail(message: str):
    """Ends the program with `message` as the last line of output (exit code 1), without a traceback."""
    sys.stderr.flush()
    sys.exit(f"error: {message}")


# ---------------------------------------------------------------------------------------------------------------
# Config overrides: ml_collections reports an unknown field as a bare AttributeError/KeyError; name it instead.
# ---------------------------------------------------------------------------------------------------------------
def _config_spec(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config=") :]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config_file(spec: str):
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_sfd_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _unknown_field(config, field_path: str) -> str | None:
    """A message naming the first component of `field_path` that `config` does not have, or None."""
    node, walked = config, []
    for part in field_path.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else None
        if keys is None:
            return f"config.{'.'.join(walked)} is a value ({type(node).__name__}), it has no field {part!r}"
        if part not in keys:
            where = f"config.{'.'.join(walked)}" if walked else "the config"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{where} has no field {part!r}{hint}; its fields: {', '.join(sorted(keys))}"
        node = node[part]
        walked.append(part)
    return None


def _explain_flag_error(argv, error: Exception) -> str:
    spec = _config_spec(argv)
    overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec and overrides:
        try:
            config = _load_config_file(spec)
        except Exception:  # noqa: BLE001 - the config file itself is broken: report the original error
            config = None
        if config is not None:
            for name in overrides:
                problem = _unknown_field(config, name[len("config.") :])
                if problem:
                    return f"--{name}: {spec}: {problem}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # absl's own messages name the flag (e.g. a value that is not an int)
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - ml_collections raises AttributeError/KeyError for unknown fields
        _fail(_explain_flag_error(argv, e))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/sfd.py:tiny")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    config_mode = config.get("mode")
    mode = _MODE.value or config_mode or "train"
    if mode not in MODES:
        _fail(f"--mode={mode!r} is not a mode; valid modes: {', '.join(MODES)}")
    if _MODE.value and config_mode and _MODE.value != config_mode:
        # Each config file is written for one mode; another mode would read fields the file does not have.
        _fail(
            f"--mode={_MODE.value} does not fit --config={_config_spec(sys.argv) or '?'}, which is a "
            f"{config_mode!r} config (config.mode={config_mode!r}); drop --mode, or pass a config for "
            f"{_MODE.value!r} (valid modes: {', '.join(MODES)})"
        )
    from sfd_jax.errors import InputError

    try:
        resolve_mode(mode)(config, os.fspath(_WORKDIR.value))
    except InputError as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
