"""FID Inception weights: pytorch-fid's `pt_inception-2015-12-05-*.pth` (or an npz with its keys) → InceptionV3.

The user provides the file (nothing is downloaded). Keys are the torchvision / pytorch-fid state-dict names, e.g.
`Mixed_6d.branch1x1.conv.weight`, `Mixed_6d.branch1x1.bn.running_var`, `fc.weight` (1008, 2048), `fc.bias`.
`num_batches_tracked` entries are ignored (unused in eval mode). The mapping is mechanical because the NNX modules
carry the torch names: `<m>.conv.weight` (out, in, kh, kw) → `<m>.conv.kernel` (kh, kw, in, out);
`<m>.bn.{weight, bias, running_mean, running_var}` → `<m>.bn.{scale, bias, mean, var}`;
`fc.weight` (out, in) → `fc.kernel` (in, out), `fc.bias` → `fc.bias`.

    python -m sfd_jax.convert.inception pt_inception-2015-12-05-6726825d.pth fid_inception.npz   # torch needed once
"""

from __future__ import annotations

import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax import paths
from sfd_jax.convert.common import ConversionError, check_state_dict, read_checkpoint, to_numpy
from sfd_jax.models.inception import InceptionV3

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIX = ".num_batches_tracked"


def _torch_key(path: tuple) -> tuple[str, str]:
    """nnx variable path → (torch key, transform) with transform in {'conv', 'linear', 'copy'}."""
    *prefix, leaf = (str(p) for p in path)
    if prefix and prefix[-1] == "bn":
        if leaf not in _BN_NAMES:
            raise KeyError(f"unexpected BatchNorm variable {'.'.join(map(str, path))}")
        return ".".join(prefix + [_BN_NAMES[leaf]]), "copy"
    if leaf == "kernel":
        return ".".join(prefix + ["weight"]), "conv" if prefix[-1] == "conv" else "linear"
    if leaf == "bias":
        return ".".join(prefix + ["bias"]), "copy"
    raise KeyError(f"no torch name for variable {'.'.join(map(str, path))}")


def _to_torch_shape(shape: tuple, transform: str) -> tuple:
    if transform == "conv":  # (kh, kw, in, out) → (out, in, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    if transform == "linear":
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch(value: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if transform == "linear":
        return np.transpose(value)
    return value


def load_into(
    module: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict", what: str = "FID Inception"
) -> nnx.Module:
    """Write a torch-named state dict into `module` (the full InceptionV3 or one of its blocks), in place.

    Every Param and BatchNorm statistic must be given exactly once with the right shape; all problems are
    reported together in one ConversionError."""
    state_dict = {k: v for k, v in to_numpy(state_dict).items() if not k.endswith(_IGNORED_SUFFIX)}
    flat = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    plan = {}
    for path, var in flat:
        key, transform = _torch_key(path)
        plan[key] = (path, var, transform)
    expected = {key: _to_torch_shape(tuple(var.shape), t) for key, (_, var, t) in plan.items()}
    check_state_dict(
        state_dict,
        expected,
        what=what,
        source=source,
        hint="expected the pytorch-fid FID Inception state dict (pt_inception-2015-12-05-*.pth)",
    )
    bad_dtype = sorted(k for k in plan if not np.issubdtype(state_dict[k].dtype, np.floating))
    if bad_dtype:
        raise ConversionError(what, source, hint=f"non-float tensors: {', '.join(bad_dtype[:8])}")
    new = [
        (path, var.replace(jnp.asarray(_from_torch(state_dict[key], t), dtype=var.dtype)))
        for key, (path, var, t) in plan.items()
    ]
    nnx.update(module, nnx.from_flat_state(new))
    return module


def load_inception(path_or_state_dict, *, dtype=jnp.float32, precision="highest") -> InceptionV3:
    """Build the FID InceptionV3 from a pytorch-fid `.pth` file, an `.npz` with the same keys, or a mapping."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = paths.local_copy(os.fspath(path_or_state_dict))  # gs:// weights: a verified local copy
        raw = read_checkpoint(source)
        if isinstance(raw, Mapping) and "state_dict" in raw and not any(k.endswith(".weight") for k in raw):
            raw = raw["state_dict"]
    else:
        source, raw = "in-memory state dict", path_or_state_dict
    if not isinstance(raw, Mapping):
        raise ConversionError("FID Inception", source, hint=f"expected a state dict, got {type(raw).__name__}")
    model = InceptionV3(dtype=dtype, precision=precision, rngs=nnx.Rngs(0))
    return load_into(model, raw, source=source)


def export_inception(model: InceptionV3) -> dict[str, np.ndarray]:
    """The inverse of `load_into`: torch-named numpy arrays (float32), e.g. to save converted weights as npz."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        key, transform = _torch_key(path)
        value = np.asarray(var[...], dtype=np.float32)
        if transform == "conv":
            value = np.transpose(value, (3, 2, 0, 1))
        elif transform == "linear":
            value = value.T
        out[key] = np.ascontiguousarray(value)
    return out


def main(argv=None) -> None:
    """`python -m sfd_jax.convert.inception IN.pth OUT.npz`: re-save the weights as npz so that evaluation
    hosts need no torch."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].endswith(".npz"):
        raise SystemExit("usage: python -m sfd_jax.convert.inception pt_inception-2015-12-05-6726825d.pth OUT.npz")
    np.savez(args[1], **export_inception(load_inception(args[0])))
    print(f"wrote {args[1]}")


if __name__ == "__main__":
    main()
