"""Reference LightningDiT checkpoints ↔ sfd_jax `LightningDiT`.

    cfg, model = load_dit("0400000.pt")                  # reference training checkpoint, EMA weights
    sd = export_dit(model)                               # {reference key: np.ndarray}, torch layouts
    save_dit("weights/xl", cfg, model); cfg, model = restore_dit("weights/xl")

`load_dit` infers the architecture from the tensor shapes (depth from the block keys, width from the patch embed,
head_dim from the RoPE buffer, label count from the table, REPA dims from the projector, and the timestep embedder
form: two D/2 `t_embedder_sem`/`t_embedder_tex`, or the one D-wide `t_embedder` the reference builds for Δt = 0 or
no semantic channels). Two-embedder weights load into a one-embedder config exactly (`join_timestep_embedders`:
the same t into both is one MLP with stacked first and block-diagonal second layer); the other way is not
representable and is refused. The REPA depth is not
visible in the weights: it comes from the checkpoint's config (`model.repa_feat_depth`) when present, else 2.
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
from etils import epath
from flax import nnx

from sfd_jax import paths
from sfd_jax.convert.common import (
    ConversionError,
    check_finite,
    check_state_dict,
    low_precision_dtypes,
    read_checkpoint,
    to_numpy,
)
from sfd_jax.models.lightningdit import DiTConfig, LightningDiT, abstract_model, count_params, fixed_tables

WHAT = "LightningDiT"
_BUFFERS = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")
# Keys whose shapes determine the architecture.
_SHAPE_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "feat_rope.freqs_cos",
    "y_embedder.embedding_table.weight",
    "blocks.0.mlp.w12.weight",
)
# nnx module name ↔ reference module name where they differ.
_MODULE_TO_REF = {
    "x_embedder": "x_embedder.proj",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "adaLN_modulation": "adaLN_modulation.1",
}
_REPA_TO_REF = {"fc1": "0", "fc2": "2", "fc3": "4"}


# ---------------------------------------------------------------------------------------------------------------
# Names and layouts


def _ref_key(path: tuple) -> str:
    """nnx Param path → reference state_dict key."""
    *modules, leaf = [str(p) for p in path]
    if modules[0] == "repa_projector":
        modules = ["repa_projector", _REPA_TO_REF[modules[1]]]
    else:
        modules = [_MODULE_TO_REF.get(m, m) for m in modules]
    if leaf == "kernel":
        leaf = "weight"
    elif leaf == "embedding_table":
        modules.append("embedding_table")
        leaf = "weight"
    return ".".join(modules + [leaf])


def _to_ref(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if path[0] == "x_embedder":  # 1×1 conv weight (D, C, 1, 1)
        return value.T[:, :, None, None]
    return value.T  # torch Linear weight is (out, in)


def _from_ref(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if path[0] == "x_embedder":
        return value.reshape(value.shape[0], value.shape[1]).T
    return value.T


def _ref_shape(path: tuple, shape: tuple) -> tuple:
    return tuple(_to_ref(path, np.empty(shape, np.uint8)).shape)


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple]:
    """{reference key: torch shape} for `cfg`, buffers included — computed without allocating parameters."""
    model = abstract_model(cfg)
    out = {
        _ref_key(path): _ref_shape(path, tuple(var.shape))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    out["pos_embed"] = (1, cfg.num_tokens, cfg.hidden_size)
    out["feat_rope.freqs_cos"] = out["feat_rope.freqs_sin"] = (cfg.num_tokens, cfg.head_dim)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class DiTSource:
    """What `read_dit_state_dict` found: the chosen state dict and where it came from."""

    state_dict: dict[str, np.ndarray]
    source: str  # file name or "<mapping>"
    weights: str  # "ema", "model" (raw training weights) or "state_dict" (a bare state dict: EMA unknown)
    step: int | None
    ckpt_config: dict | None  # the training checkpoint's config as plain containers
    stored_dtypes: tuple = ()  # 16-bit float dtypes the tensors were stored in (widened to float32 on reading)


def _plain_config(config: Any) -> dict | None:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    try:  # OmegaConf DictConfig, without importing omegaconf when absent
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    except Exception:
        return None


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and (hasattr(v, "shape") and hasattr(v, "dtype")) for k, v in obj.items())
    )


def read_dit_state_dict(path_or_state_dict, *, use_ema: bool = True) -> DiTSource:
    """Open a reference training checkpoint, a bare state dict file or an in-memory mapping."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = os.fspath(path_or_state_dict)
        raw = read_checkpoint(source)
        match = re.fullmatch(r"(\d+)\.(pt|pth|ckpt)", os.path.basename(source))
        step = int(match.group(1)) if match else None
    elif isinstance(path_or_state_dict, Mapping):
        source, raw, step = "<mapping>", path_or_state_dict, None
    else:
        raise TypeError(f"load_dit takes a checkpoint path or a mapping of arrays, got {type(path_or_state_dict)}")

    if not isinstance(raw, Mapping):
        raise ConversionError(WHAT, source, hint=f"the file holds a {type(raw).__name__}, not a state dict")
    ckpt_config = None
    if "ema" in raw or "model" in raw:
        which = "ema" if use_ema else "model"
        if which not in raw:
            raise ConversionError(
                WHAT,
                source,
                missing=[which],
                hint=(
                    f"training checkpoint has entries {sorted(map(str, raw))}; "
                    + ("pass use_ema=False for the raw 'model' weights" if use_ema else "")
                ),
            )
        ckpt_config = _plain_config(raw.get("config"))
        sd, weights = raw[which], which
    elif _is_tensor_mapping(raw):
        sd, weights = raw, "state_dict"
    else:
        wrappers = [k for k in ("state_dict", "model_state_dict") if k in raw]
        sd, weights = (raw[wrappers[0]] if wrappers else raw), "state_dict"
    if not isinstance(sd, Mapping):
        raise ConversionError(WHAT, source, hint=f"expected a state dict, found {type(sd).__name__}")
    stored = tuple(low_precision_dtypes(sd))
    sd = to_numpy(sd)
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return DiTSource(sd, source, weights, step, ckpt_config, stored)


def infer_config(
    state_dict: Mapping[str, np.ndarray],
    *,
    source: str = "<mapping>",
    ckpt_config: Mapping | None = None,
    dtype: str = "float32",
) -> DiTConfig:
    """The DiTConfig whose shapes the state dict has (heads = D / head_dim with head_dim from the RoPE table)."""
    absent = [k for k in _SHAPE_KEYS if k not in state_dict]
    if absent:
        foreign = sorted(k for k in state_dict if not _looks_like_dit_key(k))
        hint = "this does not look like a LightningDiT state dict"
        tops = sorted({k.split(".")[0] for k in foreign})
        if tops:
            hint += f" (top-level modules found: {', '.join(tops[:8])})"
        raise ConversionError(WHAT, source, missing=absent, unexpected=foreign, hint=hint)
    try:
        d, in_channels = state_dict["x_embedder.proj.weight"].shape[:2]
        tokens = state_dict["pos_embed"].shape[1]
        head_dim = state_dict["feat_rope.freqs_cos"].shape[1]
        input_size = int(round(np.sqrt(tokens)))
        depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
        mlp_hidden = state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2
        num_classes = state_dict["y_embedder.embedding_table.weight"].shape[0] - 1
    except (ValueError, IndexError) as e:
        raise ConversionError(WHAT, source, hint=f"cannot read the architecture from the shapes: {e}") from e
    if head_dim <= 0 or d % head_dim or input_size * input_size != tokens:
        raise ConversionError(
            WHAT,
            source,
            mismatched=[
                ("feat_rope.freqs_cos", state_dict["feat_rope.freqs_cos"].shape, (tokens, f"divisor of {d}")),
                ("pos_embed", state_dict["pos_embed"].shape, (1, "square number", d)),
            ],
        )
    model_cfg = (ckpt_config or {}).get("model", {}) if isinstance(ckpt_config, Mapping) else {}
    use_repa = "repa_projector.0.weight" in state_dict
    kwargs = dict(
        depth=depth,
        hidden_size=int(d),
        num_heads=int(d // head_dim),
        input_size=input_size,
        in_channels=int(in_channels),
        num_classes=int(num_classes),
        use_repa=use_repa,
        dtype=dtype,
        mlp_ratio=_mlp_ratio(int(d), int(mlp_hidden)),
        dual_timestep="t_embedder.mlp.0.weight" not in state_dict,
    )
    if "semantic_chans" in model_cfg:
        kwargs["semantic_chans"] = int(model_cfg["semantic_chans"])
    if use_repa:
        kwargs["repa_projector_dim"] = int(state_dict["repa_projector.0.weight"].shape[0])
        if "repa_projector.4.weight" in state_dict:
            kwargs["repa_dim"] = int(state_dict["repa_projector.4.weight"].shape[0])
        kwargs["repa_depth"] = int(model_cfg.get("repa_feat_depth", 2))
    if "num_heads" in model_cfg and int(model_cfg["num_heads"]) != kwargs["num_heads"]:
        raise ConversionError(
            WHAT,
            source,
            hint=(
                f"the checkpoint config says num_heads={model_cfg['num_heads']} but its RoPE table has head_dim "
                f"{head_dim}, i.e. {kwargs['num_heads']} heads"
            ),
        )
    try:
        return DiTConfig(**kwargs)
    except ValueError as e:
        raise ConversionError(WHAT, source, hint=str(e)) from e


_JOINT_PREFIX = "t_embedder.mlp."
_SPLIT_PREFIXES = ("t_embedder_sem.mlp.", "t_embedder_tex.mlp.")


def join_timestep_embedders(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two D/2 timestep embedders (reference keys) → the one D-wide embedder computing the same for t_sem = t_tex.

    The model concatenates [sem | tex]: the joint first layer stacks both first layers' outputs, the second layer is
    block-diagonal, so the two halves never mix and the function is unchanged.
    """
    sem, tex = _SPLIT_PREFIXES
    out = {k: v for k, v in state_dict.items() if not k.startswith(_SPLIT_PREFIXES)}
    f = lambda key: np.asarray(state_dict[key], np.float32)  # noqa: E731
    out[_JOINT_PREFIX + "0.weight"] = np.concatenate([f(sem + "0.weight"), f(tex + "0.weight")], axis=0)
    out[_JOINT_PREFIX + "0.bias"] = np.concatenate([f(sem + "0.bias"), f(tex + "0.bias")])
    w_sem, w_tex = f(sem + "2.weight"), f(tex + "2.weight")
    w = np.zeros((w_sem.shape[0] + w_tex.shape[0], w_sem.shape[1] + w_tex.shape[1]), np.float32)
    w[: w_sem.shape[0], : w_sem.shape[1]] = w_sem
    w[w_sem.shape[0] :, w_sem.shape[1] :] = w_tex
    out[_JOINT_PREFIX + "2.weight"] = w
    out[_JOINT_PREFIX + "2.bias"] = np.concatenate([f(sem + "2.bias"), f(tex + "2.bias")])
    return out


def _mlp_ratio(d: int, hidden: int) -> float:
    """An mlp_ratio whose int(2/3·ratio·D) is `hidden` (4.0 for every reference size)."""
    if int(2 / 3 * 4.0 * d) == hidden:
        return 4.0
    return (hidden + 0.5) * 3 / (2 * d)  # half a unit above `hidden`: int() lands on it despite rounding


def _looks_like_dit_key(key: str) -> bool:
    return key.split(".")[0] in {
        "x_embedder",
        "pos_embed",
        "t_embedder_sem",
        "t_embedder_tex",
        "t_embedder",
        "y_embedder",
        "feat_rope",
        "blocks",
        "final_layer",
        "repa_projector",
    }


def _check_buffers(
    state_dict: Mapping[str, np.ndarray], cfg: DiTConfig, source: str, stored_dtypes: tuple = ()
) -> None:
    # Tables stored in 16 bits were rounded: allow the rounding of their format (bf16 keeps 8 significant bits,
    # fp16 11) relative to each value; another layout differs by O(1).
    rel = 2.0**-8 if any("bfloat16" in d for d in stored_dtypes) else 2.0**-11 if stored_dtypes else 0.0
    pos_embed, (rope_cos, rope_sin) = fixed_tables(cfg)
    computed = {"pos_embed": pos_embed[None], "feat_rope.freqs_cos": rope_cos, "feat_rope.freqs_sin": rope_sin}
    wrong = []
    for key, value in computed.items():
        diff = np.abs(np.asarray(state_dict[key], np.float32) - value)
        err = float(np.max(diff))
        # the tables are fixed functions of (D, head_dim, grid); a mismatch is another layout
        if not np.all(diff <= 1e-5 + rel * np.abs(value)):
            wrong.append(f"{key} (max abs difference {err:.3g})")
    if wrong:
        raise ConversionError(
            WHAT,
            source,
            hint=(
                "fixed tables differ from the ones computed for "
                + _describe(cfg)
                + ": "
                + ", ".join(wrong)
                + " — a different architecture (position-embedding or RoPE layout)"
            ),
        )


# ---------------------------------------------------------------------------------------------------------------
# Public API


def load_dit(
    path_or_state_dict, *, use_ema: bool = True, config: DiTConfig | None = None, dtype: str | None = "float32"
) -> tuple[DiTConfig, LightningDiT]:
    """Build a LightningDiT holding the weights of a reference checkpoint / state dict / mapping.

    `use_ema` picks "ema" (default, what sampling uses) or "model" from a training checkpoint. `config` skips shape
    inference (its shapes are still checked). `dtype` sets the compute dtype (None keeps config's); params are float32.
    """
    found = read_dit_state_dict(path_or_state_dict, use_ema=use_ema)
    return _build(found, config=config, dtype=dtype)


def _build(
    found: DiTSource, *, config: DiTConfig | None, dtype: str | None, allow_nonfinite: bool = False
) -> tuple[DiTConfig, LightningDiT]:
    sd, source = found.state_dict, found.source
    if config is None:
        cfg = infer_config(sd, source=source, ckpt_config=found.ckpt_config)
    else:
        cfg = config
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if not cfg.dual_timestep and _JOINT_PREFIX + "0.weight" not in sd and _SPLIT_PREFIXES[0] + "0.weight" in sd:
        sd = join_timestep_embedders(sd)
    hint = f"expected the keys and shapes of {_describe(cfg)}"
    if cfg.dual_timestep and _JOINT_PREFIX + "0.weight" in sd:
        hint += (
            " -- these weights have the one D-wide timestep embedder of a Δt = 0 / no-semantic model, which two "
            "D/2 embedders cannot represent; build the model with dual_timestep=False"
        )
    check_state_dict(sd, expected_shapes(cfg), what=WHAT, source=source, hint=hint)
    _check_buffers(sd, cfg, source, found.stored_dtypes)
    check_finite(sd, what=WHAT, source=source, allow=allow_nonfinite)
    model = abstract_model(cfg)
    params = {
        path: _from_ref(path, np.asarray(sd[_ref_key(path)], np.float32))
        for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    return cfg, _materialise(model, params)


def _materialise(model: LightningDiT, params: Mapping[tuple, np.ndarray]) -> LightningDiT:
    """Fill an abstract model: Params from `params`, fixed tables recomputed from the config."""
    pos_embed, (rope_cos, rope_sin) = fixed_tables(model.cfg)
    buffers = {("pos_embed",): pos_embed, ("rope_cos",): rope_cos, ("rope_sin",): rope_sin}
    graphdef, state = nnx.split(model)
    flat = []
    for path, var in nnx.to_flat_state(state):
        value = params[path] if path in params else buffers[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ConversionError(
                WHAT,
                "converted parameters (converter bug)",
                mismatched=[(".".join(map(str, path)), value.shape, var.shape)],
            )
        flat.append((path, var.replace(jnp.asarray(value, dtype=jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_dit(model: LightningDiT) -> dict[str, np.ndarray]:
    """{reference key: np.ndarray} in torch layouts, with the `pos_embed` and `feat_rope` buffers."""
    out = {
        _ref_key(path): np.asarray(_to_ref(path, np.asarray(var[...], np.float32)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    out["pos_embed"] = np.asarray(model.pos_embed[...], np.float32)[None]
    out["feat_rope.freqs_cos"] = np.asarray(model.rope_cos[...], np.float32)
    out["feat_rope.freqs_sin"] = np.asarray(model.rope_sin[...], np.float32)
    return out


def _describe(cfg: DiTConfig) -> str:
    name = cfg.size_name()
    dims = f"depth {cfg.depth}, D {cfg.hidden_size}, {cfg.num_heads} heads (head_dim {cfg.head_dim})"
    return f"LightningDiT-{name.upper()} ({dims})" if name else f"custom LightningDiT ({dims})"


# ---------------------------------------------------------------------------------------------------------------
# Weights directory: orbax params + config.json (+ meta.json)


def save_dit(directory, cfg: DiTConfig, model: LightningDiT, *, meta: dict | None = None) -> epath.Path:
    """Write `params/` (orbax, Params only: the fixed tables are recomputed on restore), config.json, meta.json.
    `directory`: a local path or a gs:// URL."""
    import orbax.checkpoint as ocp

    directory = paths.path(paths.absolute(directory))
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", _str_keys(params), force=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if meta is not None:
        (directory / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return directory


def restore_dit(directory, *, dtype: str | None = None) -> tuple[DiTConfig, LightningDiT]:
    """Read a weights directory written by `save_dit` (or `python -m sfd_jax.convert dit`), local or gs://."""
    import orbax.checkpoint as ocp

    directory = paths.path(paths.absolute(directory))
    config_path = directory / "config.json"
    if not config_path.exists() or not (directory / "params").exists():
        raise FileNotFoundError(
            f"{directory} is not a DiT weights directory (needs config.json and params/; "
            "make one with `python -m sfd_jax.convert dit IN.pt OUT_DIR`)"
        )
    cfg = DiTConfig.from_dict(json.loads(config_path.read_text()))
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    model = abstract_model(cfg)
    # This process's own first device: with several processes jax.devices()[0] belongs to process 0, and restoring
    # onto it from another process makes orbax wait for a cross-process transfer that never comes.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
        _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
    )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(directory / "params", target)
        except Exception as e:
            raise ValueError(
                f"{directory / 'params'} does not hold the parameters of {_describe(cfg)} "
                f"described by {config_path}: {type(e).__name__}: {e}"
            ) from e
    params = {tuple(_int_keys(p)): np.asarray(v) for p, v in _flatten(restored)}
    return cfg, _materialise(model, params)


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def _int_keys(path):
    return [int(p) if p.isdigit() else p for p in path]


# ---------------------------------------------------------------------------------------------------------------
# CLI: python -m sfd_jax.convert dit IN.pt OUT_DIR [--raw]


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "dit",
        help="reference LightningDiT checkpoint (.pt/.safetensors) → weights directory",
        description="Convert a reference SFD LightningDiT checkpoint into an sfd_jax weights "
        "directory (orbax params + config.json + meta.json).",
    )
    p.add_argument(
        "input", help="reference {step:07d}.pt training checkpoint, or a bare state dict (.pt/.pth/.safetensors/.npz)"
    )
    p.add_argument("output_dir", help="directory to write (params/, config.json, meta.json)")
    p.add_argument("--raw", action="store_true", help="take the raw training weights ('model') instead of 'ema'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights directory")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert even if tensors hold NaN/Inf (refused by default; their names are printed)",
    )
    p.set_defaults(func=_cli_main)


def _cli_main(args: argparse.Namespace) -> int:
    out = paths.absolute(args.output_dir)
    found = read_dit_state_dict(args.input, use_ema=not args.raw)
    cfg, model = _build(found, config=None, dtype="float32", allow_nonfinite=args.allow_nonfinite)
    if found.stored_dtypes:
        print(
            f"note: {args.input} stores {', '.join(found.stored_dtypes)} tensors; converted to float32 "
            "(exact: every 16-bit value is a float32 value)"
        )
    bad = check_finite(found.state_dict, what=WHAT, source=found.source, allow=True)
    if bad:
        print(f"WARNING: converted with --allow-nonfinite; {len(bad)} tensor(s) hold NaN/Inf: {', '.join(bad[:12])}")
    n_params = count_params(cfg)
    n_repa = count_params(cfg, include_repa=True) - n_params
    weights = {
        "ema": "EMA",
        "model": "raw (non-EMA training weights)",
        "state_dict": "bare state dict (EMA or raw unknown)",
    }[found.weights]
    print(f"found: {_describe(cfg)}")
    print(f"  step: {found.step if found.step is not None else 'unknown'}")
    print(f"  weights: {weights}")
    print(f"  params: {n_params:,} ({n_params / 1e6:.2f}M; + REPA projector {n_repa:,})")
    meta = {
        "source": paths.absolute(args.input),
        "step": found.step,
        "weights": found.weights,
        "size": cfg.size_name(),
        "params": n_params,
        "repa_projector_params": n_repa,
    }
    save_dit(out, cfg, model, meta=meta)
    print(f"wrote {out}")
    return 0
