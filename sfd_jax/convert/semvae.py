"""Reference SemVAE checkpoint (`semantic_ae_final.pt`, {"model_state_dict": ...}) ↔ `sfd_jax.models.semvae`.

Reference layout: `encoder` / `decoder` are `nn.Sequential`s: index 0 the input Linear, 1..N TransformerBlocks
(`norm1`, `attn.in_proj_weight` [q; k; v], `attn.in_proj_bias`, `attn.out_proj`, `norm2`, `mlp.0`, `mlp.2`),
N+1 the LayerNorm, N+2 the output Linear. torch Linear weights are (out, in); flax kernels are (in, out).
The head count cannot be read from the weights, so `load_semvae` takes it (6 for the reference checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax import paths
from sfd_jax.convert.common import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ConversionError,
    assign_params,
    check_state_dict,
    read_checkpoint,
    to_numpy,
    write_weights_dir,
)
from sfd_jax.models.semvae import SemVAE, SemVAEConfig


# Prefixes that wrappers add in front of the module's own names (DistributedDataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _table(cfg: SemVAEConfig) -> list[tuple[str, tuple, str]]:
    """(torch key, nnx path, kind) for every tensor; kind 'linear' transposes a (out, in) weight."""
    rows = []
    n = cfg.num_blocks
    for tower in ("encoder", "decoder"):

        def lin(key, path):
            rows.append((f"{key}.weight", path + ("kernel",), "linear"))
            rows.append((f"{key}.bias", path + ("bias",), "copy"))

        def norm(key, path):
            rows.append((f"{key}.weight", path + ("scale",), "copy"))
            rows.append((f"{key}.bias", path + ("bias",), "copy"))

        lin(f"{tower}.0", (tower, "proj_in"))
        for i in range(n):
            k, p = f"{tower}.{i + 1}", (tower, "blocks", i)
            norm(f"{k}.norm1", p + ("norm1",))
            rows.append((f"{k}.attn.in_proj_weight", p + ("qkv", "kernel"), "linear"))
            rows.append((f"{k}.attn.in_proj_bias", p + ("qkv", "bias"), "copy"))
            lin(f"{k}.attn.out_proj", p + ("proj",))
            norm(f"{k}.norm2", p + ("norm2",))
            lin(f"{k}.mlp.0", p + ("fc1",))
            lin(f"{k}.mlp.2", p + ("fc2",))
        norm(f"{tower}.{n + 1}", (tower, "norm"))
        lin(f"{tower}.{n + 2}", (tower, "proj_out"))
    return rows


def _expected_shapes(cfg: SemVAEConfig) -> dict[str, tuple]:
    d, h = cfg.hidden_dim, cfg.mlp_hidden
    shapes = {}
    for tower, din, dout in (
        ("encoder", cfg.input_dim, 2 * cfg.bottleneck_dim),
        ("decoder", cfg.bottleneck_dim, cfg.input_dim),
    ):
        shapes[f"{tower}.0.weight"], shapes[f"{tower}.0.bias"] = (d, din), (d,)
        for i in range(1, cfg.num_blocks + 1):
            k = f"{tower}.{i}"
            shapes.update(
                {
                    f"{k}.norm1.weight": (d,),
                    f"{k}.norm1.bias": (d,),
                    f"{k}.attn.in_proj_weight": (3 * d, d),
                    f"{k}.attn.in_proj_bias": (3 * d,),
                    f"{k}.attn.out_proj.weight": (d, d),
                    f"{k}.attn.out_proj.bias": (d,),
                    f"{k}.norm2.weight": (d,),
                    f"{k}.norm2.bias": (d,),
                    f"{k}.mlp.0.weight": (h, d),
                    f"{k}.mlp.0.bias": (h,),
                    f"{k}.mlp.2.weight": (d, h),
                    f"{k}.mlp.2.bias": (d,),
                }
            )
        k = cfg.num_blocks + 1
        shapes[f"{tower}.{k}.weight"], shapes[f"{tower}.{k}.bias"] = (d,), (d,)
        shapes[f"{tower}.{k + 1}.weight"], shapes[f"{tower}.{k + 1}.bias"] = (dout, d), (dout,)
    return shapes


def _state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise ConversionError("SemVAE", source, hint=f"expected a mapping of tensors, got {type(obj).__name__}")
    if "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    sd = to_numpy(obj)
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    if "encoder.0.weight" not in sd or "decoder.0.weight" not in sd:
        raise ConversionError(
            "SemVAE",
            source,
            missing=[k for k in ("encoder.0.weight", "decoder.0.weight") if k not in sd],
            hint="not a SemVAE state dict (expected the reference `semantic_ae_final.pt`: "
            "{'model_state_dict': {'encoder.*', 'decoder.*'}}); "
            f"top-level keys found: {sorted(obj)[:8]}",
        )
    return sd


def infer_config(sd: Mapping[str, np.ndarray], num_heads: int = 6, **overrides) -> SemVAEConfig:
    """Sizes from the weight shapes; `num_heads` (not visible in the weights) from the caller."""
    blocks = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"encoder\.(\d+)\.norm1\.weight", k))}
    hidden, input_dim = np.shape(sd["encoder.0.weight"])
    bottleneck = np.shape(sd["decoder.0.weight"])[1]
    mlp_key = "encoder.1.mlp.0.weight"
    mlp_ratio = np.shape(sd[mlp_key])[0] / hidden if mlp_key in sd else 4.0
    return SemVAEConfig(
        input_dim=int(input_dim),
        hidden_dim=int(hidden),
        bottleneck_dim=int(bottleneck),
        num_heads=num_heads,
        num_blocks=len(blocks),
        mlp_ratio=mlp_ratio,
        **overrides,
    )


def load_semvae(
    path_or_state_dict, num_heads: int | None = None, *, dtype: str = "float32"
) -> tuple[SemVAEConfig, SemVAE]:
    """Load SemVAE weights; returns (cfg, model) with fp32 params and compute `dtype`.

    `path_or_state_dict`: the reference `semantic_ae_final.pt` (needs torch), a weights directory written by
    `save_semvae` (config.json + model.safetensors; no torch), an `.npz`/`.safetensors` file, or a mapping.
    `num_heads` is not stored in the weights: the reference checkpoint uses 6 (the default); a weights directory
    carries its own in config.json.
    """
    saved_cfg = None
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = paths.local_copy(os.fspath(path_or_state_dict))  # gs:// weights: a verified local copy
        if os.path.isdir(source):
            config_path = os.path.join(source, CONFIG_NAME)
            if not os.path.exists(config_path):
                raise FileNotFoundError(
                    f"{source} is not a SemVAE weights directory: no {CONFIG_NAME} "
                    "(write one with save_semvae or `python -m sfd_jax.convert semvae`)"
                )
            with open(config_path) as f:
                saved_cfg = SemVAEConfig.from_dict(json.load(f))
            source = os.path.join(source, WEIGHTS_NAME)
        obj = read_checkpoint(source)
    else:
        source, obj = "the given state dict", path_or_state_dict
    sd = _state_dict(obj, source)
    if saved_cfg is not None:
        if num_heads is not None and num_heads != saved_cfg.num_heads:
            raise ValueError(
                f"num_heads={num_heads} disagrees with num_heads={saved_cfg.num_heads} in the "
                f"weights directory's {CONFIG_NAME}"
            )
        cfg = dataclasses.replace(saved_cfg, dtype=dtype)
    else:
        cfg = infer_config(sd, num_heads=6 if num_heads is None else num_heads, dtype=dtype)
    check_state_dict(sd, _expected_shapes(cfg), what="SemVAE", source=source, hint=f"expected {cfg}")
    values = {}
    for key, path, kind in _table(cfg):
        value = np.asarray(sd[key], np.float32)
        values[path] = value.T if kind == "linear" else value
    model = nnx.eval_shape(lambda: SemVAE(cfg, rngs=nnx.Rngs(0)))
    assign_params(model, values, what="SemVAE")
    nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model, nnx.Param)))
    return cfg, model


def export_semvae(model: SemVAE) -> dict[str, np.ndarray]:
    """The reference `model_state_dict` ({torch key: float32 array}); `torch.save({'model_state_dict':
    {k: torch.from_numpy(v)}})` gives a file the reference code loads strict."""
    flat = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for key, path, kind in _table(model.cfg):
        value = np.asarray(flat[path], np.float32)
        out[key] = np.ascontiguousarray(value.T if kind == "linear" else value)
    return out


def save_semvae(directory: str | os.PathLike, model: SemVAE, *, meta: dict | None = None) -> str:
    """Weights directory: config.json (SemVAEConfig, including num_heads) + model.safetensors (reference key
    names, so the reference code can load it after `torch.from_numpy`) [+ meta.json]. `load_semvae` reads it."""
    return write_weights_dir(
        directory, dataclasses.replace(model.cfg, dtype="float32").to_dict(), export_semvae(model), meta=meta
    )


# CLI: python -m sfd_jax.convert semvae semantic_ae_final.pt OUT_DIR [--num-heads 6]
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "semvae",
        help="reference SemVAE checkpoint (semantic_ae_final.pt) → weights directory",
        description="Convert the reference Semantic VAE checkpoint into a torch-free weights "
        "directory (config.json + model.safetensors).",
    )
    p.add_argument(
        "input",
        help="semantic_ae_final.pt ({'model_state_dict': ...}), or a bare state dict (.pt/.pth/.safetensors/.npz)",
    )
    p.add_argument("output_dir")
    p.add_argument(
        "--num-heads",
        type=int,
        default=6,
        help="attention heads (not stored in the weights; the reference checkpoint uses 6)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights directory")
    p.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    cfg, model = load_semvae(args.input, num_heads=args.num_heads)
    n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"found: SemVAE {cfg.input_dim} → {cfg.bottleneck_dim} (hidden {cfg.hidden_dim}, {cfg.num_blocks} blocks, "
        f"{cfg.num_heads} heads), {n:,} params"
    )
    save_semvae(args.output_dir, model, meta={"source": os.path.abspath(args.input), "params": n})
    print(f"wrote {os.path.abspath(args.output_dir)}")
    return 0
