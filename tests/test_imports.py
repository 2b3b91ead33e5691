"""Imports point one way: parallel/checkpoint <- models <- convert <- diffusion <- data <- train, eval <- demo, main.

Every `import` in sfd_jax (module-level and function-local alike: a lazy import is still a dependency) is read with
`ast` and its target's layer compared with the importer's. `convert/` (weights in and out of the reference formats)
sits just above `models/`: it only knows the models, and data/eval/train load weights through it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sfd_jax"

LAYERS = {
    "parallel": 0,
    "checkpoint": 0,
    "config_loader": 0,
    "errors": 0,
    "paths": 0,
    "preemption": 0,
    "profiling": 0,
    "programs": 0,
    "models": 1,
    "convert": 2,
    "diffusion": 3,
    "data": 4,
    "train": 5,
    "eval": 5,
    "demo": 6,
    "main": 6,
    "inference": 6,
    "__init__": 6,
    "__main__": 6,
}

# Upward imports not yet untangled; each entry is one (importer, imported) pair. Shrink this list, never grow it.
KNOWN: set[tuple[str, str]] = set()


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module}: its package {top!r} has no layer in tests/test_imports.py LAYERS")
    return LAYERS[top]


def _imports(path: pathlib.Path, module: str):
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("sfd_jax"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("sfd_jax"):
                # `from sfd_jax.train import loop` imports sfd_jax.train.loop
                names = [f"{target}.{a.name}" for a in node.names]
                yield from (n if _is_module(n) else target for n in names)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def upward_imports():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for target in _imports(path, module):
            if target.count(".") >= 1 and _layer(target) > _layer(module):
                found.add((module, target))
    return found


def test_no_module_imports_from_a_layer_above_it():
    found = upward_imports()
    new = sorted(found - KNOWN)
    assert not new, "upward imports (importer -> imported):\n" + "\n".join(f"  {a} -> {b}" for a, b in new)
    fixed = sorted(KNOWN - found)
    assert not fixed, f"no longer imported upward, remove from KNOWN: {fixed}"


def test_the_walker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a models module importing the trainer is reported."""
    fake = PACKAGE / "models" / "_upward_probe.py"
    assert not fake.exists()
    try:
        fake.write_text("def f():\n    from sfd_jax.train import loop\n    return loop\n")
        assert ("sfd_jax.models._upward_probe", "sfd_jax.train.loop") in upward_imports()
    finally:
        fake.unlink()


@pytest.mark.parametrize(
    "module, layer",
    [("sfd_jax.models.layers", 1), ("sfd_jax.convert.dit", 2), ("sfd_jax.train.skeleton", 5), ("sfd_jax.main", 6)],
)
def test_layers_of_some_modules(module, layer):
    assert _layer(module) == layer
