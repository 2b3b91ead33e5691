"""Shared machinery for the reference-checkpoint converters.

- `read_checkpoint` opens whatever the reference code writes (.pt / .pth / .ckpt via torch, .safetensors, .npz,
  a transformers directory) and reports unreadable or truncated files with the file name.
- `to_numpy` turns a torch/numpy mapping into `{key: np.ndarray}`.
- `check_state_dict` compares a state dict with the keys and shapes a model needs and raises ONE
  `ConversionError` listing every missing key, unexpected key and shape mismatch.
- `assign_params` writes `{nnx path: array}` into a model, refusing partial or mis-shaped assignments.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from sfd_jax.errors import InputError


class ConversionError(InputError):
    """A checkpoint does not fit the model it is being loaded into."""

    def __init__(self, what: str, source: str, missing=(), unexpected=(), mismatched=(), hint: str = ""):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)  # (key, got_shape, expected_shape)
        lines = [f"cannot load {what} from {source}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + _clip(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + _clip(self.unexpected))
        if self.mismatched:
            lines.append(
                f"  shape mismatches ({len(self.mismatched)}): "
                + _clip([f"{k}: got {tuple(g)}, expected {tuple(e)}" for k, g, e in self.mismatched])
            )
        if hint:
            lines.append("  " + hint)
        super().__init__("\n".join(lines))


def _clip(items: list, limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _torch_load(path: str):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path} needs PyTorch: pip install 'sfd_jax[torch]' (or -r requirements-torch.txt: "
            "torch==2.13.0 exactly, plus omegaconf for training checkpoints)"
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ImportError(
            f"{path} pickles objects from module {e.name!r}; install it (the 'sfd_jax[torch]' extra "
            "and requirements-torch.txt have omegaconf for reference training checkpoints)"
        ) from e
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load the raw object stored at `path` (a dict for every format the reference uses)."""
    from sfd_jax import paths

    path = os.fspath(path)
    if paths.is_remote(path):
        if not paths.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        path = paths.local_copy(path)  # torch/safetensors read local files only
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return read_checkpoint(candidate)
        raise FileNotFoundError(f"{path} is a directory without model.safetensors or pytorch_model.bin")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {type(e).__name__}: {e}") from e
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as d:
                return {k: d[k] for k in d.files}
        except Exception as e:
            raise ValueError(f"{path} is not a readable npz file: {type(e).__name__}: {e}") from e
    return _torch_load(path)


def to_numpy(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """`{key: tensor or array}` → `{key without prefix: np.ndarray}`; keys outside `prefix` are dropped.

    bfloat16 torch tensors are widened to float32 (numpy has no bfloat16).
    """
    out = {}
    for key, value in mapping.items():
        if not key.startswith(prefix):
            continue
        if hasattr(value, "detach"):  # torch.Tensor, without importing torch
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()
            value = value.numpy()
        out[key[len(prefix) :]] = np.asarray(value)
    return out


LOW_PRECISION = ("torch.bfloat16", "torch.float16", "bfloat16", "float16")


def low_precision_dtypes(mapping: Mapping[str, Any]) -> list[str]:
    """The 16-bit float dtypes among `mapping`'s tensors (before `to_numpy` widens them)."""
    return sorted({str(v.dtype) for v in mapping.values() if hasattr(v, "dtype") and str(v.dtype) in LOW_PRECISION})


def check_finite(state_dict: Mapping[str, np.ndarray], *, what: str, source: str, allow: bool = False) -> list[str]:
    """Names of the tensors holding NaN/Inf; raises a ConversionError naming them unless `allow`. Weights that
    are not finite give NaN images with exit code 0, so a conversion never passes them on silently."""
    bad = [
        k
        for k, v in state_dict.items()
        if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v))
    ]
    if bad and not allow:
        counts = [
            f"{k} ({int(np.size(state_dict[k]) - np.isfinite(state_dict[k]).sum())} non-finite)" for k in sorted(bad)
        ]
        raise ConversionError(
            what,
            source,
            hint=(
                f"{len(bad)} tensor(s) hold NaN/Inf, e.g. {_clip(counts, 6)}; the checkpoint is damaged or was saved "
                "after training diverged (pass --allow-nonfinite to convert it anyway)"
            ),
        )
    return sorted(bad)


def check_state_dict(
    state_dict: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple],
    *,
    what: str,
    source: str,
    ignore_prefixes: Iterable[str] = (),
    hint: str = "",
) -> None:
    """Raise one ConversionError naming every missing / unexpected / mis-shaped key."""
    ignore_prefixes = tuple(ignore_prefixes)
    present = {k for k in state_dict if not k.startswith(ignore_prefixes)} if ignore_prefixes else set(state_dict)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    mismatched = sorted(
        (k, tuple(np.shape(state_dict[k])), tuple(expected[k]))
        for k in set(expected) & present
        if tuple(np.shape(state_dict[k])) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        raise ConversionError(what, source, missing, unexpected, mismatched, hint)


def assign_params(model: nnx.Module, values: Mapping[tuple, np.ndarray], *, what: str = "model") -> None:
    """Write `{nnx path: array}` into `model`'s Params; every Param must be given exactly once, shape-exact."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    shapes = {path: tuple(var.shape) for path, var in flat}
    missing = sorted(map(_fmt_path, set(shapes) - set(values)))
    unexpected = sorted(map(_fmt_path, set(values) - set(shapes)))
    mismatched = sorted(
        (_fmt_path(p), tuple(np.shape(values[p])), shapes[p])
        for p in set(shapes) & set(values)
        if tuple(np.shape(values[p])) != shapes[p]
    )
    if missing or unexpected or mismatched:
        raise ConversionError(what, "converted parameters (converter bug)", missing, unexpected, mismatched)
    new = [(path, var.replace(np.asarray(values[path], dtype=var.dtype))) for path, var in flat]
    nnx.update(model, nnx.from_flat_state(new))


def _fmt_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# A safetensors weights directory (SemVAE, texture VAE): config.json + model.safetensors [+ meta.json].
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def write_weights_dir(
    directory: str | os.PathLike, config: dict, arrays: Mapping[str, np.ndarray], *, meta: dict | None = None
) -> str:
    """Writes `config` as config.json, `arrays` (reference names and layouts) as model.safetensors and `meta` as
    meta.json; returns the directory."""
    from safetensors.numpy import save
    from sfd_jax import paths

    directory = os.fspath(directory)  # a local path or a gs:// URL
    paths.makedirs(directory)
    paths.write_atomic(paths.join(directory, CONFIG_NAME), json.dumps(config, indent=2))
    paths.write_atomic(paths.join(directory, WEIGHTS_NAME), save(dict(arrays)))
    if meta is not None:
        paths.write_atomic(paths.join(directory, "meta.json"), json.dumps(meta, indent=2, default=str))
    return directory
