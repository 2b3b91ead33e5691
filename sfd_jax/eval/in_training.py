"""In-training evaluation: a small FID-N from the current EMA weights, every `eval.every` training steps.

    python -m sfd_jax.main --config=configs/sfd.py:xl --workdir=runs/xl --mode=train \
        --config.eval.every=20000 --config.eval.fn=sfd_jax.eval.in_training:fid \
        --config.eval.num_images=5000 --config.eval.texture_vae=weights/texture_vae \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
        --config.eval.ref_batch=VIRTUAL_imagenet256_labeled.npz

`fid(ctx)` is the loop's eval hook (`sfd_jax.train.loop.EvalContext` → {name: float}, logged as eval/<name>). It
samples the same N images every time — indices 0..N−1, class-balanced labels (g·C)//N, noise from fold_in(seed, g)
— from `ctx.model(ema=True)` on the training mesh with the generator of `--mode=sample`, then scores them the way
`--mode=evaluate` does:
- with `inception_weights`: the FID Inception (`sfd_jax.eval.features.InceptionExtractor`) and
  `sfd_jax.eval.evaluate.compute_metrics` → fid, sfid, inception_score, precision, recall against `ref_batch`
  (its stored mu/sigma when present, else statistics of its images; its images for precision/recall);
- otherwise a user feature function, `feature_fn='module:function'` or `make_eval_fn(feature_fn=...)`, mapping
  uint8 images (n, H, W, 3) to (n, D) features → fid (and precision, recall) against the statistics of the same
  function on `ref_batch`'s images.
FID-N is biased upwards for small N (and, against ADM's 50K-image statistics, not comparable to FID-50K): use it
as a training curve. It also writes `<workdir>/eval_grids/step_XXXXXXX.png`.

Fields read from `config.eval`: `FIELDS`, every one of them, declared with its default by the config file
(configs/sfd.py `eval_block`). Empty or None values are derived: latent_stats from `<data.path>/stats.json`,
latent_multiplier from `data.latent_multiplier`, delta_t from `diffusion.delta_t`, num_classes (0) from
`data.num_classes`.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from typing import Callable

import jax
import numpy as np

from sfd_jax import paths
from sfd_jax.eval import metrics
from sfd_jax.eval.generator import ImageGenerator, TextureDecoder, class_labels
from sfd_jax.eval.sample import config_get, guidance_from_config, settings_from_config
from sfd_jax.eval.sample_files import grid_indices, make_grid, save_png

log = logging.getLogger(__name__)

FIELDS = (
    "num_images",
    "labels",
    "num_classes",
    "seed",
    "texture_vae",
    "vae_dtype",
    "latent_stats",
    "latent_multiplier",
    "solver",
    "num_steps",
    "rtol",
    "atol",
    "delta_t",
    "step_control",
    "phase_mode",
    "max_steps",
    "guidance",
    "scale",
    "scale_sem",
    "scale_tex",
    "interval_start",
    "guide",
    "guide_use_ema",
    "per_device_batch",
    "decode_batch",
    "inception_weights",
    "feature_fn",
    "ref_batch",
    "resize",
    "input_size",
    "feature_batch",
    "is_split_size",
    "grid_size",
)


def _checked(overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown in-training eval fields {unknown}; valid: {sorted(FIELDS)}")
    return dict(overrides)


def read_block(eval_block, overrides: dict | None = None) -> dict:
    """{field: value} for every name in FIELDS from `config.eval`, then `overrides`; a field the config does not
    declare is an error naming it (a config written for another hook, or an old one)."""
    overrides = _checked(overrides or {})
    declared = set(eval_block.keys()) | set(overrides)
    missing = [name for name in FIELDS if name not in declared]
    if missing:
        raise ValueError(
            f"config.eval lacks the in-training FID fields {missing}; declare them with their defaults as "
            "configs/sfd.py eval_block() does"
        )
    return {name: overrides[name] if name in overrides else eval_block[name] for name in FIELDS}


def _import(spec: str) -> Callable:
    if ":" not in spec:
        raise ValueError(f"eval.feature_fn={spec!r}: expected 'module:function'")
    module, name = spec.split(":", 1)
    return getattr(importlib.import_module(module), name)


class FunctionFeatures:
    """A user feature function with the call interface of `InceptionExtractor` (outputs: 'pool' only)."""

    resize, size = "feature_fn", 0

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], batch_size: int = 256):
        self.fn, self.batch_size = fn, int(batch_size)

    def __call__(self, source, *, limit=None, outputs=("pool",), what: str = "images") -> dict:
        n = source.num_images if limit is None else min(int(limit), source.num_images)
        feats = []
        for s in range(0, n, self.batch_size):
            images = source.read(s, min(s + self.batch_size, n))
            f = np.asarray(self.fn(images), np.float32)
            if f.ndim != 2 or f.shape[0] != len(images):
                raise ValueError(f"feature_fn returned {f.shape} for {len(images)} {what}; expected (n, D)")
            feats.append(f)
        return {"pool": np.concatenate(feats)}


class FidEvaluator:
    """Samples N fixed images from a model and scores them against a reference (see the module doc)."""

    def __init__(
        self,
        block,
        *,
        workdir: str,
        feature_fn: Callable | None = None,
        data_path: str = "",
        latent_multiplier: float = 1.0,
        delta_t: float = 0.3,
        num_classes: int = 1000,
    ):
        from sfd_jax.eval.evaluate import read_reference_statistics, reference_features
        from sfd_jax.eval.features import InceptionExtractor, open_images

        get = lambda name: config_get(block, name)  # noqa: E731
        self.block, self.workdir = block, workdir
        self.num_images = int(get("num_images"))
        if self.num_images < 2:
            raise ValueError(f"eval.num_images must be >= 2 for a covariance, got {self.num_images}")
        if not get("texture_vae"):
            raise ValueError(
                "eval.texture_vae is required for the in-training FID (images are decoded from the texture latents)"
            )
        stats = get("latent_stats") or (paths.join(data_path, "stats.json") if data_path else "")
        if not stats:
            raise ValueError(
                "eval.latent_stats is required (stats.json of the training latents; defaults to "
                "<data.path>/stats.json for data.source='arrayrecord')"
            )
        multiplier = get("latent_multiplier")
        self.decoder = TextureDecoder.from_files(
            str(get("texture_vae")),
            str(stats),
            dtype=str(get("vae_dtype")),
            latent_multiplier=float(latent_multiplier if multiplier is None else multiplier),
            decode_batch=int(get("decode_batch")) or None,
        )
        dt = get("delta_t")
        self.settings = settings_from_config(block, delta_t=float(delta_t if dt is None else dt))
        self.seed = int(get("seed"))
        self.per_device_batch = int(get("per_device_batch"))
        self.num_classes = int(get("num_classes")) or int(num_classes)
        self.label_mode = str(get("labels"))
        self.grid_size = int(get("grid_size"))
        self.split_size = int(get("is_split_size"))
        self._guidance = None
        self._generators: dict = {}

        ref_path = str(get("ref_batch"))
        if not ref_path:
            raise ValueError(
                "eval.ref_batch is required: an ADM-format reference npz (arr_0 images, optionally "
                "mu/sigma/mu_s/sigma_s), e.g. from configs/eval.py:build_reference"
            )
        if get("inception_weights"):
            from sfd_jax.convert.inception import load_inception

            self.extractor = InceptionExtractor(
                load_inception(str(get("inception_weights"))),
                batch_size=int(get("feature_batch")),
                resize=str(get("resize")),
                size=int(get("input_size")),
            )
            self.full = True
            ref = reference_features(
                ref_path,
                self.extractor,
                cache_dir=paths.join(workdir, "cache"),
                cache_key=[paths.absolute(str(get("inception_weights")))],
            )
            self.ref_stats = read_reference_statistics(ref_path)
            if self.ref_stats is None:
                self.ref_stats = dict(zip(("mu", "sigma"), metrics.statistics(ref["pool"])))
                self.ref_stats.update(zip(("mu_s", "sigma_s"), metrics.statistics(ref["spatial"])))
        else:
            fn = feature_fn or (_import(str(get("feature_fn"))) if get("feature_fn") else None)
            if fn is None:
                raise ValueError(
                    "set eval.inception_weights (FID Inception) or eval.feature_fn='module:function' "
                    "(or pass feature_fn=) for the in-training FID"
                )
            self.extractor = FunctionFeatures(fn, int(get("feature_batch")))
            self.full = False
            ref = self.extractor(open_images(ref_path), what="reference images")
            self.ref_stats = dict(zip(("mu", "sigma"), metrics.statistics(ref["pool"])))
        self.ref_pool = ref["pool"]
        self.indices = np.arange(self.num_images)
        self.labels = class_labels(
            self.indices, num_images=self.num_images, num_classes=self.num_classes, mode=self.label_mode, seed=self.seed
        )

    def guidance(self, dtype: str | None):
        if self._guidance is None:  # the guide is loaded once per run
            self._guidance = guidance_from_config(self.block, dtype=dtype)
        return self._guidance[0]

    def generator(self, mesh) -> ImageGenerator:
        if mesh not in self._generators:
            self._generators[mesh] = ImageGenerator(
                self.decoder, settings=self.settings, seed=self.seed, mesh=mesh, per_device_batch=self.per_device_batch
            )
        return self._generators[mesh]

    def __call__(self, model, *, mesh=None, step: int | None = None) -> dict[str, float]:
        from sfd_jax.eval.evaluate import compute_metrics
        from sfd_jax.eval.features import ArrayImages

        gen = self.generator(mesh)
        guidance = self.guidance(getattr(getattr(model, "cfg", None), "dtype", None))
        t0 = time.perf_counter()
        images, stats = gen(model, self.indices, self.labels, guidance=guidance)
        sample_seconds = time.perf_counter() - t0
        feats = self.extractor(ArrayImages(images, "samples"), what="in-training samples")
        if self.full:
            result = compute_metrics(feats, self.ref_stats, self.ref_pool, split_size=self.split_size)
        else:
            mu, sigma = metrics.statistics(feats["pool"])
            fid, eps_used = metrics.frechet_distance(
                mu, sigma, self.ref_stats["mu"], self.ref_stats["sigma"], return_eps_used=True
            )
            precision, recall = metrics.precision_recall(self.ref_pool, feats["pool"])
            result = {"fid": fid, "precision": precision, "recall": recall, "fid_eps_used": eps_used}
        result = {k: float(v) for k, v in result.items()}
        result.update(
            sample_seconds=sample_seconds,
            images_per_s=self.num_images / max(sample_seconds, 1e-9),
            nfe_per_image=float(np.mean([s.nfe_per_image for s in stats])),
            eval_seconds=time.perf_counter() - t0,
        )
        if self.grid_size > 0 and jax.process_index() == 0 and step is not None:
            out = paths.join(self.workdir, "eval_grids")
            paths.makedirs(out)
            save_png(
                paths.join(out, f"step_{int(step):07d}.png"),
                make_grid(images[grid_indices(self.num_images, self.grid_size)], 8),
            )
        return result


_EVALUATORS: dict = {}


def _evaluator(ctx, feature_fn: Callable | None, overrides: dict) -> FidEvaluator:
    config = ctx.config
    block = read_block(config.eval, overrides)
    data = config.get("data", {}) if hasattr(config, "get") else {}
    data_path = str(data.get("path", "")) if data.get("source", "") == "arrayrecord" else ""
    key = json.dumps([block, ctx.workdir, data_path, id(feature_fn)], sort_keys=True, default=str)
    if key not in _EVALUATORS:
        _EVALUATORS.clear()  # one training run per process at a time
        _EVALUATORS[key] = FidEvaluator(
            block,
            workdir=ctx.workdir,
            feature_fn=feature_fn,
            data_path=data_path,
            latent_multiplier=float(data.get("latent_multiplier", 1.0)),
            delta_t=float(config.diffusion.delta_t),
            num_classes=int(data.get("num_classes", 1000)),
        )
    return _EVALUATORS[key]


def fid(ctx) -> dict[str, float]:
    """The loop's eval hook: `config.eval.fn='sfd_jax.eval.in_training:fid'`."""
    evaluator = _evaluator(ctx, None, {})
    result = evaluator(ctx.model(ema=True), mesh=ctx.mesh, step=ctx.step)
    log.info(
        "in-training FID-%d at step %d: %s", evaluator.num_images, ctx.step, {k: round(v, 4) for k, v in result.items()}
    )
    return result


def make_eval_fn(feature_fn: Callable | None = None, **overrides) -> Callable:
    """An eval hook for `sfd_jax.train.loop.run(config, workdir, eval_fn=...)` with an in-memory feature function
    (uint8 (n, H, W, 3) → (n, D)) and/or `config.eval` fields overridden by keyword."""
    _checked(overrides)  # a misspelt field fails here, not at the first evaluation

    def eval_fn(ctx) -> dict[str, float]:
        evaluator = _evaluator(ctx, feature_fn, overrides)
        return evaluator(ctx.model(ema=True), mesh=ctx.mesh, step=ctx.step)

    return eval_fn
