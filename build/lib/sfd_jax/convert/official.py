"""Public entry points for reference checkpoints, one `load_*` / `export_*` pair per model.

Each model's conversion lives in its own module (dit.py, semvae.py, texture_vae.py, dinov2.py); this module only
re-exports them, lazily, so that importing one converter never pulls in the others' dependencies.
"""
import importlib

_EXPORTS = {
    "load_dit": "dit", "export_dit": "dit",
    "load_semvae": "semvae", "export_semvae": "semvae",
    "load_texture_vae": "texture_vae", "export_texture_vae": "texture_vae",
    "load_dinov2": "dinov2", "export_dinov2": "dinov2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"sfd_jax.convert.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'sfd_jax.convert.official' has no attribute {name!r}")
