"""Reference LDM KL autoencoder checkpoints ↔ `sfd_jax.models.texture_vae.TextureVAE`.

The reference (SFD/VA-VAE `tokenizer/autoencoder.py`) saves a Lightning checkpoint whose `state_dict` holds
`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` plus training-only modules (`loss.*`: LPIPS and the
discriminator). The sfd_jax module tree mirrors the reference names, so a key is the nnx path joined by dots with the
leaf renamed (kernel/scale → weight); conv kernels go from torch OIHW to HWIO.

Unlike the reference loader (`load_state_dict(strict=False)`, which silently accepts any file), loading here is
strict: every model key must be present with the right shape, and any key that is neither a model key nor a known
training-only module is reported, all in one ConversionError.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax import parallel, paths
from sfd_jax.checkpoint import read_config_json, restore_weights
from sfd_jax.convert.common import (
    CONFIG_NAME,
    ConversionError,
    check_state_dict,
    read_checkpoint,
    to_numpy,
    write_weights_dir,
)
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig

# Training-only modules found in VA-VAE / LDM Lightning checkpoints: the LPIPS + discriminator loss, and VA-VAE's
# vision-foundation alignment (frozen DINOv2 and its projection). None of them is part of the autoencoder.
TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")

# Latents of 16×16 are what SFD uses; a checkpoint does not store its training resolution, and the model is fully
# convolutional, so the resolution only names the levels with attention (resolution // 2**level).
INFERRED_LATENT_RESOLUTION = 16

_WHAT = "texture VAE (LDM AutoencoderKL)"
_LEAF_TO_REF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def reference_key(path: tuple) -> str:
    *modules, leaf = (str(p) for p in path)
    return ".".join(modules + [_LEAF_TO_REF[leaf]])


def _to_reference(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if value.ndim == 4 else value


def _from_reference(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if value.ndim == 4 else value


def _param_items(model: nnx.Module):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def abstract_model(cfg: TextureVAEConfig) -> TextureVAE:
    """The model with ShapeDtypeStruct leaves (nnx.eval_shape): no parameter is allocated or initialised."""
    return nnx.eval_shape(lambda: TextureVAE(cfg, rngs=nnx.Rngs(0)))


def expected_shapes(cfg: TextureVAEConfig, abstract: TextureVAE | None = None) -> dict[str, tuple]:
    """Reference key → torch shape for the architecture `cfg`."""
    abstract = abstract_model(cfg) if abstract is None else abstract
    out = {}
    for path, var in _param_items(abstract):
        shape = tuple(var.shape)
        out[reference_key(path)] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    return out


def infer_config(state_dict: Mapping[str, np.ndarray], *, resolution: int | None = None) -> TextureVAEConfig | None:
    """Read the architecture from key names and shapes; None when the anchor keys are absent (not this model).

    `resolution` (not stored in the weights) defaults to INFERRED_LATENT_RESOLUTION × the downsample factor.
    """
    anchors = (
        "encoder.conv_in.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.conv_out.weight",
        "post_quant_conv.weight",
    )
    if any(k not in state_dict for k in anchors):
        return None
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        return None
    ch_out, in_channels = np.shape(state_dict["encoder.conv_in.weight"])[:2]
    ch_mult = []
    for i in levels:
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if key not in state_dict or np.shape(state_dict[key])[0] % ch_out:
            return None
        ch_mult.append(np.shape(state_dict[key])[0] // ch_out)
    num_res_blocks = len({m.group(1) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    attn_levels = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state_dict]
    if resolution is None:
        resolution = INFERRED_LATENT_RESOLUTION * 2 ** (len(levels) - 1)
    return TextureVAEConfig(
        ch=int(ch_out),
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2**i for i in attn_levels),
        resolution=resolution,
        in_channels=int(in_channels),
        out_ch=int(np.shape(state_dict["decoder.conv_out.weight"])[0]),
        z_channels=int(np.shape(state_dict["decoder.conv_in.weight"])[1]),
        embed_dim=int(np.shape(state_dict["post_quant_conv.weight"])[1]),
    )


def _as_state_dict(path_or_mapping: Any) -> tuple[dict[str, np.ndarray], str, TextureVAEConfig | None]:
    """(state dict without training-only keys, source name, config stored beside the weights or None)."""
    stored_cfg = None
    if isinstance(path_or_mapping, (str, os.PathLike)):
        source = paths.local_copy(os.fspath(path_or_mapping))  # gs:// weights: a verified local copy
        config_path = os.path.join(source, CONFIG_NAME)
        if os.path.isdir(source) and os.path.exists(config_path):  # a weights directory from save_texture_vae
            with open(config_path) as f:
                stored_cfg = TextureVAEConfig.from_dict(json.load(f))
        raw = read_checkpoint(source)
    elif isinstance(path_or_mapping, Mapping):
        raw, source = path_or_mapping, "the given mapping"
    else:
        raise TypeError(
            f"load_texture_vae expects a checkpoint path or a mapping of arrays, got {type(path_or_mapping).__name__}"
        )
    if not isinstance(raw, Mapping):
        raise ConversionError(_WHAT, source, hint=f"the file holds a {type(raw).__name__}, not a state dict")
    if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):  # Lightning checkpoint
        raw = raw["state_dict"]
    sd = to_numpy({k: v for k, v in raw.items() if not k.startswith(TRAINING_ONLY_PREFIXES)})
    return sd, source, stored_cfg


def load_texture_vae(
    path_or_mapping: Any, cfg: TextureVAEConfig | None = None, *, dtype: str | None = None
) -> tuple[TextureVAEConfig, TextureVAE]:
    """Load a reference LDM autoencoder → (cfg, model).

    Accepts a Lightning `.ckpt` (its `state_dict`; `loss.*` dropped), a bare state dict file (.pt/.pth/
    .safetensors/.npz), a weights directory written by `save_texture_vae` (its config.json is used), or a mapping
    of arrays. With no config given or stored, the architecture is read from the keys and shapes (GroupNorm groups
    stay 32, the resolution is 16 × the downsample factor). `dtype` overrides the compute dtype.
    """
    sd, source, stored_cfg = _as_state_dict(path_or_mapping)
    cfg = cfg if cfg is not None else stored_cfg
    if cfg is None:
        cfg = infer_config(sd)
        if cfg is None:  # not an LDM autoencoder: compare with the default to list what is wrong
            cfg = TextureVAEConfig()
    if dtype is not None:
        cfg = TextureVAEConfig.from_dict({**cfg.to_dict(), "dtype": dtype})
    model = abstract_model(cfg)
    check_state_dict(
        sd,
        expected_shapes(cfg, model),
        what=_WHAT,
        source=source,
        hint="expected a reference AutoencoderKL state_dict (encoder.*, decoder.*, quant_conv.*, "
        "post_quant_conv.*); training-only keys " + ", ".join(TRAINING_ONLY_PREFIXES) + "* are ignored",
    )
    # Fill the abstract model directly: running the random initialisers first would cost more than the load.
    graphdef, state = nnx.split(model)
    flat = [
        (path, var.replace(jnp.asarray(_from_reference(sd[reference_key(path)]), dtype=jnp.float32)))
        for path, var in nnx.to_flat_state(state)
    ]
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_texture_vae_from_workdir(
    workdir: str, *, step: int | None = None, use_ema: bool = True
) -> tuple[TextureVAEConfig, TextureVAE]:
    """(cfg, model) from a checkpoint of a `--mode=train_texture_vae` run (newest readable unless `step`), e.g. of an
    interrupted run; a finished run's weights are also in `<workdir>/texture_vae/` for `load_texture_vae`.

    Only the weights are read (the EMA, kept in float32 by the trainer, unless `use_ema=False`), laid out over this
    host's devices by the run's sharding rules.
    """
    config = read_config_json(workdir, step)["config"]
    cfg = TextureVAEConfig.from_dict(config["model"])
    graphdef, params, aux = nnx.split(abstract_model(cfg), nnx.Param, ...)
    if jax.tree.leaves(aux):
        # Such state would have to be initialised, not restored; the trainer does not checkpoint it either.
        raise NotImplementedError("TextureVAE has non-parameter state now; restore it along with the weights")
    mesh = parallel.make_mesh((1, -1, 1), devices=jax.local_devices())
    shardings = parallel.state_shardings(params, mesh, parallel.parse_rules(config["mesh"]["rules"]))
    abstract = jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, jnp.float32 if use_ema else x.dtype, sharding=sharding),
        nnx.to_pure_dict(params),
        shardings,
    )
    _, weights = restore_weights(workdir, abstract, step=step, part="ema_params" if use_ema else "params")
    return cfg, nnx.merge(graphdef, weights, aux)


def export_texture_vae(model: TextureVAE) -> dict[str, np.ndarray]:
    """Model parameters → {reference key: np.ndarray} in torch layouts, loadable strict by the reference."""
    return {reference_key(path): _to_reference(np.asarray(var[...])) for path, var in _param_items(model)}


def save_texture_vae(directory: str | os.PathLike, model: TextureVAE, *, meta: dict | None = None) -> str:
    """Weights directory: config.json (TextureVAEConfig, float32 compute) + model.safetensors in reference names and
    layouts [+ meta.json]. `load_texture_vae(directory)` reads it back; no torch needed either way."""
    return write_weights_dir(
        directory, {**model.cfg.to_dict(), "dtype": "float32"}, export_texture_vae(model), meta=meta
    )


# CLI: python -m sfd_jax.convert texture_vae ldm-imagenet256-f16d32-50ep.ckpt OUT_DIR
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "texture_vae",
        help="reference LDM KL autoencoder (.ckpt) → weights directory",
        description="Convert the reference texture VAE (SD-VAE f16d32 Lightning checkpoint) "
        "into a torch-free weights directory (config.json + model.safetensors).",
    )
    p.add_argument(
        "input",
        help="ldm-imagenet256-f16d32-50ep.ckpt ({'state_dict': ...}), or a bare state dict "
        "(.pt/.pth/.safetensors/.npz)",
    )
    p.add_argument("output_dir")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training image size (not stored in the weights; default 16 × the downsample factor, "
        "256 for f16); only names the levels with attention",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights directory")
    p.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    cfg = None
    if args.resolution is not None:
        sd, _, _ = _as_state_dict(args.input)
        cfg = infer_config(sd, resolution=args.resolution)  # None: load_texture_vae reports what is wrong
    cfg, model = load_texture_vae(args.input, cfg)
    n_enc = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model.encoder, nnx.Param)))
    n_dec = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model.decoder, nnx.Param)))
    print(
        f"found: LDM KL autoencoder f{cfg.downsample_factor}d{cfg.embed_dim}, ch {cfg.ch}, ch_mult {cfg.ch_mult}, "
        f"{cfg.num_res_blocks} res blocks, attention at {cfg.attn_resolutions or 'mid block only'}"
    )
    print(f"  params: encoder {n_enc:,}, decoder {n_dec:,}")
    save_texture_vae(
        args.output_dir,
        model,
        meta={"source": os.path.abspath(args.input), "encoder_params": n_enc, "decoder_params": n_dec},
    )
    print(f"wrote {os.path.abspath(args.output_dir)}")
    return 0
