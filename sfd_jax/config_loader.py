"""`load_config("configs/sfd.py:tiny", {"train.num_steps": 3})`: a config file's `get_config(variant)`, overridden.

The one loader for everything that reads a config file outside the command line (tests, benchmarks, the demo
config's siblings); the command line uses ml_collections' `--config=path.py:variant` flag, which does the same.
A relative path is looked up from the working directory, then from the repository root.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]


def _resolve(path: str) -> pathlib.Path:
    p = pathlib.Path(path)
    for candidate in (p,) if p.is_absolute() else (p, REPO / p):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config file {path!r} not found (looked in {pathlib.Path.cwd()} and {REPO})")


def load_config(spec: str, overrides: dict | list | tuple = ()) -> ml_collections.ConfigDict:
    """`path.py[:variant]` -> the file's get_config(variant) (its default without one), then `overrides`:
    {dotted field: value} or ["field.path=value", ...], the strings parsed like the command line's
    `--config.a.b=value` (Python literals where they parse, else strings). An unknown field raises KeyError naming
    it; a list given for a tuple field becomes a tuple, an int for a float field a float."""
    path, _, variant = spec.partition(":")
    file = _resolve(path)
    module_spec = importlib.util.spec_from_file_location(f"_sfd_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    items = overrides.items() if isinstance(overrides, dict) else map(_parse, overrides)
    for key, value in items:
        _set(config, key, value, spec)
    return config


def _parse(item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r}: expected field.path=value")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def _set(config, key: str, value, spec: str) -> None:
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents + [leaf]):
        if name not in node:
            raise KeyError(f"{spec}: override {key!r}: the config has no field {'.'.join(parents[:i] + [name])!r}")
        if i < len(parents):
            node = node[name]
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    node[leaf] = value
