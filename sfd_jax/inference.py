"""Notebook-sized inference: one call loads a converted model bundle, one call turns class ids into images.

    pipe = SFDPipeline.from_pretrained("weights/sfd_xl_bundle")
    images = pipe([207, 360, 387, 974], guidance="autoguidance", scale=1.5, seed=0)   # uint8 (4, 256, 256, 3)

A bundle is a directory written by `python -m sfd_jax.convert bundle` (see `write_bundle`):

    bundle.json      {"format": "sfd_jax.bundle.v1", "dit": "dit", "guide": "guide" or null,
                      "texture_vae": "texture_vae", "stats": "stats.json", "defaults": {...}}
    dit/             DiT weights directory (`sfd_jax.convert.dit.save_dit`)
    guide/           optional AutoGuidance guide, same format
    texture_vae/     texture-VAE weights directory (`sfd_jax.convert.texture_vae.save_texture_vae`)
    stats.json       latent statistics (`sfd_jax.data.records` format; only the texture part is used to decode)

Sampling is `sfd_jax.eval.generator.ImageGenerator` (the code behind `--mode=sample`), on all devices present:
image i of a call uses the noise of index i under `seed`, so a given (seed, position, class id) gives the same image
whatever the batch or device count.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import numpy as np

BUNDLE_FORMAT = "sfd_jax.bundle.v1"
GUIDANCE_KINDS = ("none", "cfg", "autoguidance")
# The paper's sampler: Dopri5 at rtol 1e-3 / atol 1e-6 over the three phases with Δt = 0.3; AutoGuidance w = 1.5.
DEFAULTS = {"guidance": "autoguidance", "scale": 1.5, "solver": "dopri5", "rtol": 1e-3, "atol": 1e-6, "delta_t": 0.3}


class SFDPipeline:
    """A DiT (+ optional guide) and the texture decoder; `pipe(class_ids, ...)` → uint8 (N, H, W, 3)."""

    def __init__(self, model, decoder, guide=None, *, defaults: dict | None = None):
        self.model, self.decoder, self.guide = model, decoder, guide
        self.defaults = {**DEFAULTS, **(defaults or {})}
        if guide is None and self.defaults["guidance"] == "autoguidance":
            self.defaults["guidance"] = "cfg"  # no guide in the bundle: CFG is the guidance this model still has
        cfg = model.cfg
        if guide is not None:
            check_guide(cfg, guide.cfg)
        if cfg.in_channels - cfg.semantic_chans != decoder.channels:
            raise ValueError(
                f"the model has {cfg.in_channels - cfg.semantic_chans} texture channels, the texture VAE "
                f"decodes {decoder.channels}"
            )
        self._generators: dict = {}

    @property
    def num_classes(self) -> int:
        return int(self.model.cfg.num_classes)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: str | None = None) -> "SFDPipeline":
        """Load a bundle directory (see the module docstring). dtype: compute dtype override, e.g. 'bfloat16'."""
        from sfd_jax.convert.dit import restore_dit
        from sfd_jax.eval.decoding import TextureDecoder

        directory = os.fspath(directory)
        manifest = read_manifest(directory)
        _, model = restore_dit(os.path.join(directory, manifest["dit"]), dtype=dtype)
        guide = None
        if manifest.get("guide"):
            _, guide = restore_dit(os.path.join(directory, manifest["guide"]), dtype=dtype)
        decoder = TextureDecoder.from_files(
            os.path.join(directory, manifest["texture_vae"]), os.path.join(directory, manifest["stats"]), dtype=dtype
        )
        return cls(model, decoder, guide, defaults=manifest.get("defaults"))

    def __call__(
        self,
        class_ids: Sequence[int],
        *,
        guidance: str | None = None,
        scale: float | None = None,
        seed: int = 0,
        solver: str | None = None,
        num_steps: int | None = None,
        interval_start: float | None = None,
        per_device_batch: int | None = None,
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3) for `class_ids` (ints in [0, num_classes)).

        guidance: 'none' | 'cfg' | 'autoguidance' (default: the bundle's, AutoGuidance when it has a guide);
        scale: the guidance weight w. solver / num_steps: 'dopri5' (default) or 'euler' / 'heun' with num_steps.
        """
        from sfd_jax.diffusion.guidance import CFG, AutoGuidance
        from sfd_jax.eval.generator import ImageGenerator, SamplerSettings

        labels = np.asarray(class_ids)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"class_ids must be a non-empty 1-D sequence of ints, got {labels.dtype} {labels.shape}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise ValueError(
                f"class ids {sorted(set(bad.tolist()))[:8]} are out of range: this model has "
                f"{self.num_classes} classes, ids 0..{self.num_classes - 1}"
            )
        kind = self.defaults["guidance"] if guidance is None else guidance
        if kind not in GUIDANCE_KINDS:
            raise ValueError(f"guidance must be one of {GUIDANCE_KINDS}, got {kind!r}")
        w = float(self.defaults["scale"] if scale is None else scale)
        if kind == "autoguidance" and self.guide is None:
            raise ValueError("guidance='autoguidance' needs a guide model; this bundle has none (use 'cfg')")
        guide_obj = {
            "none": None,
            "cfg": CFG(w, interval_start=interval_start),
            "autoguidance": AutoGuidance(self.guide, w, interval_start=interval_start),
        }[kind]
        solver = solver or self.defaults["solver"]
        settings = SamplerSettings(
            solver=solver,
            num_steps=num_steps,
            rtol=float(self.defaults["rtol"]),
            atol=float(self.defaults["atol"]),
            delta_t=float(self.defaults["delta_t"]),
        )
        if per_device_batch is None:  # the whole call in one batch when it fits 16 images per device
            per_device_batch = min(16, math.ceil(labels.size / jax.device_count()))
        key = (settings, int(seed), int(per_device_batch))
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = ImageGenerator(
                self.decoder, settings=settings, seed=int(seed), per_device_batch=int(per_device_batch)
            )
        images, _ = gen(self.model, np.arange(labels.size), labels.astype(np.int32), guidance=guide_obj)
        return images


def check_guide(cfg, guide_cfg) -> None:
    """AutoGuidance calls the guide on the model's latents and labels: both must take the same ones."""
    fields = ("input_size", "in_channels", "semantic_chans", "num_classes")
    diff = [
        f"{f} {getattr(cfg, f)} (model) vs {getattr(guide_cfg, f)} (guide)"
        for f in fields
        if getattr(cfg, f) != getattr(guide_cfg, f)
    ]
    if diff:
        raise ValueError("the guide does not match the model: " + ", ".join(diff))


# ---------------------------------------------------------------------------------------------------------------
# The bundle on disk
# ---------------------------------------------------------------------------------------------------------------
def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, "bundle.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory} is not an SFD bundle (no bundle.json); write one with "
            "`python -m sfd_jax.convert bundle --dit DIT.pt --texture-vae VAE.ckpt ...`"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    for field in ("dit", "texture_vae", "stats"):
        if not manifest.get(field) or not os.path.exists(os.path.join(directory, manifest[field])):
            raise FileNotFoundError(f"{path}: field {field!r} = {manifest.get(field)!r} names nothing in {directory}")
    return manifest


def write_bundle(
    output_dir: str,
    *,
    dit: str,
    texture_vae: str,
    stats: str,
    guide: str | None = None,
    semantic_stats: str | None = None,
    defaults: dict | None = None,
) -> dict:
    """Convert reference files into a bundle. dit / guide: reference DiT checkpoints (.pt, EMA weights) or DiT
    weights directories; texture_vae: the LDM .ckpt or a weights directory; stats: an sfd_jax stats.json or the
    reference latents_stats.pt (then `semantic_stats` may name latents_sv_stats.pt)."""
    import shutil

    from sfd_jax.convert.dit import _build, read_dit_state_dict, restore_dit, save_dit
    from sfd_jax.convert.texture_vae import load_texture_vae, save_texture_vae
    from sfd_jax.data.reference_stats import convert_reference_stats
    from sfd_jax.eval.decoding import read_latent_stats

    def dit_model(src):
        if os.path.isdir(src):
            return restore_dit(src)
        return _build(read_dit_state_dict(src, use_ema=True), config=None, dtype="float32")

    final, output_dir = output_dir, os.path.abspath(output_dir).rstrip(os.sep) + ".partial"
    shutil.rmtree(output_dir, ignore_errors=True)  # a previous, killed conversion
    os.makedirs(output_dir)
    cfg, model = dit_model(dit)
    save_dit(os.path.join(output_dir, "dit"), cfg, model, meta={"source": os.path.abspath(dit)})
    if guide:
        gcfg, gmodel = dit_model(guide)
        check_guide(cfg, gcfg)
        save_dit(os.path.join(output_dir, "guide"), gcfg, gmodel, meta={"source": os.path.abspath(guide)})
    _, vae = load_texture_vae(texture_vae)
    save_texture_vae(os.path.join(output_dir, "texture_vae"), vae, meta={"source": os.path.abspath(texture_vae)})
    stats_path = os.path.join(output_dir, "stats.json")
    if stats.endswith(".json"):
        shutil.copyfile(stats, stats_path)
    else:
        convert_reference_stats(stats, semantic_stats, out=stats_path)
    read_latent_stats(stats_path, vae.cfg.embed_dim)  # refuse a bundle whose statistics do not fit the VAE
    manifest = {
        "format": BUNDLE_FORMAT,
        "dit": "dit",
        "guide": "guide" if guide else None,
        "texture_vae": "texture_vae",
        "stats": "stats.json",
        "defaults": {**DEFAULTS, **(defaults or {})},
    }
    with open(os.path.join(output_dir, "bundle.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    # Built beside the target and renamed into place: a killed conversion never leaves a half bundle under `final`.
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(output_dir, final)
    return manifest


__all__ = ["SFDPipeline", "write_bundle", "read_manifest", "check_guide", "BUNDLE_FORMAT", "DEFAULTS"]


# CLI: python -m sfd_jax.convert bundle OUT_DIR --dit DIT.pt --texture-vae VAE.ckpt --stats latents_stats.pt [...]
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bundle",
        help="reference DiT (+ guide), texture VAE and latent stats → one bundle "
        "directory for SFDPipeline.from_pretrained",
        description="Write a model bundle (dit/, guide/, texture_vae/, stats.json, bundle.json) "
        "from the reference files in one step.",
    )
    p.add_argument("output_dir")
    p.add_argument("--dit", required=True, help="reference DiT checkpoint (.pt; EMA weights) or DiT weights dir")
    p.add_argument("--guide", default=None, help="optional AutoGuidance guide checkpoint (.pt) or weights dir")
    p.add_argument("--texture-vae", required=True, help="ldm f16d32 .ckpt or texture-VAE weights dir")
    p.add_argument("--stats", required=True, help="reference latents_stats.pt, or an sfd_jax stats.json")
    p.add_argument("--semantic-stats", default=None, help="reference latents_sv_stats.pt (optional)")
    p.add_argument("--scale", type=float, default=DEFAULTS["scale"], help="default guidance weight w")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=_cli_main)


def _cli_main(args) -> int:
    manifest = write_bundle(
        args.output_dir,
        dit=args.dit,
        texture_vae=args.texture_vae,
        stats=args.stats,
        guide=args.guide,
        semantic_stats=args.semantic_stats,
        defaults={"scale": args.scale},
    )
    print(
        f"wrote {os.path.abspath(args.output_dir)}: dit/, {'guide/, ' if manifest['guide'] else ''}texture_vae/, "
        f"stats.json, bundle.json (defaults: {manifest['defaults']})"
    )
    return 0
