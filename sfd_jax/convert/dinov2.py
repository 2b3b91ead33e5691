"""DINOv2-with-registers weights ↔ `sfd_jax.models.dinov2.Dinov2`, without torch.

Accepted sources:
- a transformers `save_pretrained` directory (config.json + model.safetensors, or a sharded
  model.safetensors.index.json), read with `safetensors.numpy`;
- a state dict (mapping of arrays or tensors) plus a transformers config dict; without a config the sizes are read
  from the shapes and the head count is taken as hidden_size / 64 (true for every released DINOv2);
- three key spellings: transformers 5 (`attention.{q,k,v,o}_proj`), the older hub files
  (`attention.attention.{query,key,value}`, `attention.output.dense`, SwiGLU `mlp.weights_in/out`), and the
  torch.hub / facebookresearch checkpoints (`blocks.N.attn.qkv`, `ls1.gamma`, `pos_embed`, ...) that the reference
  extraction loads.
Everything is first normalised to transformers-5 names, then mapped by one table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax import paths
from sfd_jax.convert.common import ConversionError, assign_params, check_state_dict, read_checkpoint, to_numpy
from sfd_jax.models.dinov2 import Dinov2, Dinov2Config

log = logging.getLogger(__name__)

# Classification / wrapper models nest the backbone under these names.
_BACKBONE_PREFIXES = ("dinov2_with_registers.", "dinov2.", "module.", "_orig_mod.")

_HF_LEGACY = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("mlp.weights_out.", "mlp.down_proj."),
)

_HUB_TOP = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HUB_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.down_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
}


def normalise_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any supported spelling → transformers-5 names (fused tensors are split the way transformers splits them)."""
    sd = dict(sd)
    for prefix in _BACKBONE_PREFIXES:
        inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if inside and any(k.startswith(("embeddings.", "encoder.", "blocks.")) for k in inside):
            sd = inside  # drops heads such as `classifier.*` that sit beside the backbone
    out = {}
    hub = "pos_embed" in sd
    for key, value in sd.items():
        if hub:
            if key in _HUB_TOP:
                out[_HUB_TOP[key]] = value
                continue
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
            if m is None:
                out[key] = value  # reported as unexpected by the shape check
                continue
            i, name, kind = m.groups()
            layer = f"encoder.layer.{i}."
            if name == "attn.qkv":
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                    out[f"{layer}attention.{part}.{kind}"] = chunk
            elif name == "mlp.w12":
                for part, chunk in zip(("gate_proj", "up_proj"), np.split(np.asarray(value), 2, axis=0)):
                    out[f"{layer}mlp.{part}.{kind}"] = chunk
            elif f"{name}.{kind}" in _HUB_BLOCK:  # ls1.gamma
                out[layer + _HUB_BLOCK[f"{name}.{kind}"]] = value
            elif name in _HUB_BLOCK:
                out[f"{layer}{_HUB_BLOCK[name]}.{kind}"] = value
            else:
                out[key] = value
            continue
        new = key
        for old, repl in _HF_LEGACY:
            new = new.replace(old, repl)
        m = re.fullmatch(r"(encoder\.layer\.\d+\.mlp\.)weights_in\.(weight|bias)", new)
        if m:
            for part, chunk in zip(("gate_proj", "up_proj"), np.split(np.asarray(value), 2, axis=0)):
                out[f"{m.group(1)}{part}.{m.group(2)}"] = chunk
            continue
        out[new] = value
    return out


def _table(cfg: Dinov2Config) -> list[tuple[str, tuple, str, tuple]]:
    """(transformers key, nnx path, kind, torch shape) for every tensor.

    kinds: copy; linear (transpose); conv (OIHW → HWIO); qkv_q / qkv_k / qkv_v (one third of the fused qkv).
    """
    d, h, p, c = cfg.hidden_size, cfg.mlp_hidden, cfg.patch_size, cfg.num_channels
    rows = [
        ("embeddings.cls_token", ("cls_token",), "copy", (1, 1, d)),
        ("embeddings.mask_token", ("mask_token",), "copy", (1, d)),
        ("embeddings.register_tokens", ("register_tokens",), "copy", (1, cfg.num_register_tokens, d)),
        ("embeddings.position_embeddings", ("position_embeddings",), "copy", (1, 1 + cfg.grid_size**2, d)),
        ("embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"), "conv", (d, c, p, p)),
        ("embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias"), "copy", (d,)),
        ("layernorm.weight", ("norm", "scale"), "copy", (d,)),
        ("layernorm.bias", ("norm", "bias"), "copy", (d,)),
    ]
    mlp = (
        [("gate_proj", d, h), ("up_proj", d, h), ("down_proj", h, d)]
        if cfg.use_swiglu_ffn
        else [("fc1", d, h), ("fc2", h, d)]
    )
    for i in range(cfg.num_hidden_layers):
        k, at = f"encoder.layer.{i}.", ("blocks", i)
        for norm in ("norm1", "norm2"):
            rows += [
                (f"{k}{norm}.weight", at + (norm, "scale"), "copy", (d,)),
                (f"{k}{norm}.bias", at + (norm, "bias"), "copy", (d,)),
            ]
        for part in "qkv":
            rows.append((f"{k}attention.{part}_proj.weight", at + ("attn", "qkv", "kernel"), f"qkv_{part}", (d, d)))
            if cfg.qkv_bias:
                rows.append((f"{k}attention.{part}_proj.bias", at + ("attn", "qkv", "bias"), f"qkv_{part}", (d,)))
        rows += [
            (f"{k}attention.o_proj.weight", at + ("attn", "proj", "kernel"), "linear", (d, d)),
            (f"{k}attention.o_proj.bias", at + ("attn", "proj", "bias"), "copy", (d,)),
            (f"{k}layer_scale1.lambda1", at + ("ls1", "lambda1"), "copy", (d,)),
            (f"{k}layer_scale2.lambda1", at + ("ls2", "lambda1"), "copy", (d,)),
        ]
        for name, din, dout in mlp:
            rows += [
                (f"{k}mlp.{name}.weight", at + ("mlp", name, "kernel"), "linear", (dout, din)),
                (f"{k}mlp.{name}.bias", at + ("mlp", name, "bias"), "copy", (dout,)),
            ]
    return rows


def infer_config(sd: Mapping[str, np.ndarray], **overrides) -> Dinov2Config:
    """Sizes from transformers-5-named weights. The head count is not in the weights: hidden_size / 64."""
    try:
        d = int(np.shape(sd["embeddings.cls_token"])[-1])
        dout, c, p, _ = np.shape(sd["embeddings.patch_embeddings.projection.weight"])
        num_pos = int(np.shape(sd["embeddings.position_embeddings"])[1]) - 1
        registers = int(np.shape(sd["embeddings.register_tokens"])[1])
    except KeyError as e:
        raise ConversionError(
            "DINOv2-with-registers",
            "the given weights",
            missing=[e.args[0]],
            hint="not a DINOv2-with-registers state dict",
        ) from None
    grid = int(round(num_pos**0.5))
    if grid * grid != num_pos:
        raise ConversionError(
            "DINOv2-with-registers",
            "the given weights",
            hint=f"position_embeddings hold {num_pos} patch positions, not a square grid",
        )
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    swiglu = "encoder.layer.0.mlp.gate_proj.weight" in sd
    hidden = int(np.shape(sd["encoder.layer.0.mlp." + ("gate_proj" if swiglu else "fc1") + ".weight"])[0])
    mlp_ratio = hidden / d
    if swiglu:  # invert transformers' rounding for the usual ratio 4
        mlp_ratio = 4 if (int(4 * d * 2 / 3) + 7) // 8 * 8 == hidden else hidden * 1.5 / d
    kwargs = dict(
        hidden_size=d,
        num_hidden_layers=len(layers),
        num_attention_heads=max(d // 64, 1),
        mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio,
        patch_size=int(p),
        image_size=grid * int(p),
        num_channels=int(c),
        num_register_tokens=registers,
        qkv_bias="encoder.layer.0.attention.q_proj.bias" in sd,
        use_swiglu_ffn=swiglu,
    )
    kwargs.update(overrides)
    if "num_attention_heads" not in overrides:
        log.warning(
            "DINOv2: no config given; assuming num_attention_heads = hidden_size / 64 = %d",
            kwargs["num_attention_heads"],
        )
    return Dinov2Config(**kwargs)


def _read_directory(path: str) -> tuple[dict, dict | None]:
    config = None
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        from safetensors.numpy import load_file

        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(load_file(os.path.join(path, shard)))
        return sd, config
    return read_checkpoint(path), config


def load_dinov2(
    path_or_state_dict, config: Mapping[str, Any] | Dinov2Config | None = None, *, dtype: str = "float32"
) -> tuple[Dinov2Config, Dinov2]:
    """Load DINOv2-with-registers weights; returns (cfg, model) with fp32 params and compute `dtype`.

    `path_or_state_dict`: a `save_pretrained` directory, a weights file (.safetensors, .npz, .pt/.pth), or a
    mapping. `config`: a transformers config dict or a `Dinov2Config`; a directory's config.json is used otherwise.
    """
    file_config = None
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = paths.local_copy(os.fspath(path_or_state_dict))  # gs:// weights: a verified local copy
        if os.path.isdir(source):
            obj, file_config = _read_directory(source)
        else:
            obj = read_checkpoint(source)
    else:
        source, obj = "the given state dict", path_or_state_dict
    if not isinstance(obj, Mapping):
        raise ConversionError(
            "DINOv2-with-registers", source, hint=f"expected a mapping of tensors, got {type(obj).__name__}"
        )
    for wrapper in ("state_dict", "model"):  # torch checkpoints that nest the weights
        if wrapper in obj and isinstance(obj[wrapper], Mapping) and len(obj) < 8:
            obj = obj[wrapper]
    sd = normalise_keys(to_numpy(obj))
    config = config if config is not None else file_config
    if isinstance(config, Dinov2Config):
        cfg = dataclasses.replace(config, dtype=dtype)
    elif config is not None:
        cfg = Dinov2Config.from_hf(config, dtype=dtype)
    else:
        cfg = infer_config(sd, dtype=dtype)
    check_state_dict(
        sd, {row[0]: row[3] for row in _table(cfg)}, what="DINOv2-with-registers", source=source, hint=f"config: {cfg}"
    )
    values: dict[tuple, np.ndarray] = {}
    qkv: dict[tuple, dict[str, np.ndarray]] = {}
    for key, path, kind, _ in _table(cfg):
        value = np.asarray(sd[key], np.float32)
        if kind == "linear":
            values[path] = value.T
        elif kind == "conv":
            values[path] = value.transpose(2, 3, 1, 0)
        elif kind.startswith("qkv_"):
            qkv.setdefault(path, {})[kind[-1]] = value.T if value.ndim == 2 else value
        else:
            values[path] = value
    for path, parts in qkv.items():
        values[path] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=-1)
    model = nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))
    assign_params(model, values, what="DINOv2-with-registers")
    nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model, nnx.Param)))
    return cfg, model


def export_dinov2(model: Dinov2) -> dict[str, np.ndarray]:
    """transformers-5 state dict ({key: float32 array}) that `Dinov2WithRegistersModel` loads strict."""
    cfg = model.cfg
    flat = {path: np.asarray(var[...], np.float32) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    d = cfg.hidden_size
    out = {}
    for key, path, kind, _ in _table(cfg):
        value = flat[path]
        if kind == "linear":
            value = value.T
        elif kind == "conv":
            value = value.transpose(3, 2, 0, 1)
        elif kind.startswith("qkv_"):
            i = "qkv".index(kind[-1])
            value = value[..., i * d : (i + 1) * d]
            value = value.T if value.ndim == 2 else value
        out[key] = np.ascontiguousarray(value)
    return out


def save_pretrained(model: Dinov2, directory: str | os.PathLike) -> None:
    """Write config.json + model.safetensors that `Dinov2WithRegistersModel.from_pretrained` and `load_dinov2`
    both read."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.cfg.to_hf(), f, indent=2)
    save_file(export_dinov2(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


# CLI: python -m sfd_jax.convert dinov2 IN OUT_DIR [--config config.json]
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "dinov2",
        help="DINOv2-with-registers weights → transformers-style directory",
        description="Convert DINOv2-with-registers weights (a transformers directory, or a "
        "torch.hub checkpoint such as dinov2_vitb14_reg4_pretrain.pth) into a "
        "torch-free directory (config.json + model.safetensors, transformers-5 "
        "names) that load_dinov2 and transformers both read.",
    )
    p.add_argument("input", help="save_pretrained directory, .safetensors, .pth/.pt or .npz")
    p.add_argument("output_dir")
    p.add_argument(
        "--config",
        help="transformers config.json (default: the input directory's, else inferred "
        "from the shapes with hidden_size / 64 heads)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_cli_main)


def _cli_main(args) -> int:
    config = None
    if args.config:
        with open(args.config) as f:
            config = json.load(f)
    cfg, model = load_dinov2(args.input, config)
    n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"found: DINOv2 D={cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"patch {cfg.patch_size}, {cfg.grid_size}x{cfg.grid_size} position grid, {cfg.num_register_tokens} "
        f"registers; {n:,} params"
    )
    save_pretrained(model, args.output_dir)
    print(f"wrote {os.path.abspath(args.output_dir)}")
    return 0
