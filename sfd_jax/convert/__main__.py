"""`python -m sfd_jax.convert <model> ...`: reference checkpoints → sfd_jax weights directories.

    python -m sfd_jax.convert dit 0400000.pt weights/sfd_xl          # EMA weights (what sampling uses)
    python -m sfd_jax.convert dit 0400000.pt weights/sfd_xl_raw --raw

Each converter module `sfd_jax.convert.<name>` listed in CONVERTERS registers its own subcommand through
`add_cli(subparsers)`: it calls `subparsers.add_parser("<name>", ...)`, adds its arguments and
`set_defaults(func=handler)`; `handler(args)` returns an exit code (0 or None on success). A module that does not
exist yet is skipped, and one without `add_cli` gets a subcommand that says so, so the table can name converters
before their command lines are written.
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sfd_jax.convert",
                                     description="Convert reference (PyTorch) checkpoints into sfd_jax weights.")
    subparsers = parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    for name, module_name in CONVERTERS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # converter not written yet; a missing dependency inside it still raises
                continue
            raise
        if hasattr(module, "add_cli"):
            module.add_cli(subparsers)
        else:  # the module's Python API exists but its subcommand does not: say so instead of a bare argparse error
            sub = subparsers.add_parser(name, help=f"(no command-line converter yet: {module_name} has no add_cli)")
            sub.set_defaults(func=lambda args, m=module_name: _no_cli(m))
    return parser


def _no_cli(module_name: str) -> int:
    raise SystemExit(f"error: {module_name} defines no add_cli(subparsers) yet; use its load_* function from Python")


def main(argv: list[str] | None = None) -> int:
    import sfd_jax  # noqa: F401  (switches off flax eager sharding before any model is built)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
