"""`python -m sfd_jax.convert <model> ...`: reference checkpoints → sfd_jax weights directories.

    python -m sfd_jax.convert dit 0400000.pt weights/sfd_xl          # EMA weights (what sampling uses)
    python -m sfd_jax.convert dit 0400000.pt weights/sfd_xl_raw --raw

Each converter module `sfd_jax.convert.<name>` listed in CONVERTERS registers its own subcommand through
`add_cli(subparsers)`: it calls `subparsers.add_parser("<name>", ...)` with the positional `input`, `output_dir`
and a `--overwrite` flag, adds its own arguments and `set_defaults(func=handler)`; `handler(args)` returns an exit
code (0 or None on success). The refusal to write into a non-empty `output_dir` without `--overwrite` is here, once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → module providing add_cli(subparsers)
CONVERTERS = {
    "dit": "sfd_jax.convert.dit",
    "semvae": "sfd_jax.convert.semvae",
    "texture_vae": "sfd_jax.convert.texture_vae",
    "dinov2": "sfd_jax.convert.dinov2",
    "bundle": "sfd_jax.inference",
    "stats": "sfd_jax.data.reference_stats",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sfd_jax.convert", description="Convert reference (PyTorch) checkpoints into sfd_jax weights."
    )
    subparsers = parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    for module_name in CONVERTERS.values():
        importlib.import_module(module_name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    import sfd_jax  # noqa: F401  (switches off flax eager sharding before any model is built)

    args = build_parser().parse_args(argv)
    from sfd_jax import paths

    if paths.isdir(args.output_dir) and paths.listdir(args.output_dir) and not args.overwrite:
        raise SystemExit(f"error: {args.output_dir} exists and is not empty (pass --overwrite to replace it)")
    from sfd_jax.errors import InputError

    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as e:  # names the file and what is wrong: no traceback needed
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
