"""`--mode=evaluate`: ADM-compatible FID, sFID, Inception Score, precision and recall, written as JSON.

    python -m sfd_jax.main --config=configs/eval.py --workdir=runs/eval --mode=evaluate \
        --config.eval.samples=samples.npz \
        --config.eval.ref_batch=VIRTUAL_imagenet256_labeled.npz \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

What happens, step for step as ADM's `evaluations/evaluator.py` `main`:
1. reference: pool3 features of the reference batch's `arr_0` (for precision/recall); its stored `mu`, `sigma`,
   `mu_s`, `sigma_s` when present (ADM's batches hold statistics of the whole training set), else statistics of
   those features;
2. samples (`arr_0` of an npz, or a folder of PNGs): pool3, spatial and class probabilities;
3. IS on the sample probabilities; FID and sFID as `sample.frechet_distance(reference)`; precision/recall with
   the reference features first.
`configs/eval.py:build_reference` writes a reference batch in the same format from your own images with the same
network (`build_reference_batch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax import paths
from sfd_jax.convert.inception import load_inception
from sfd_jax.eval import metrics
from sfd_jax.eval.features import ImageSource, InceptionExtractor, open_images
from sfd_jax.preemption import Preempted, Preemption

log = logging.getLogger(__name__)

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
TASKS = ("score", "build_reference")


# ---------------------------------------------------------------------------------------------- reference batch
def read_reference_statistics(path: str) -> dict | None:
    """{mu, sigma, mu_s, sigma_s} stored in an ADM reference batch, or None when it stores none."""
    with np.load(paths.local_copy(path), allow_pickle=False) as z:
        present = [k for k in STAT_KEYS if k in z.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            raise ValueError(
                f"{path} holds {present} but not {sorted(set(STAT_KEYS) - set(present))}: an ADM "
                f"reference batch stores all of {STAT_KEYS} or none"
            )
        stats = {k: z[k] for k in STAT_KEYS}
    for name in ("", "_s"):
        mu, sigma = stats["mu" + name], stats["sigma" + name]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"{path}: mu{name} {mu.shape} and sigma{name} {sigma.shape} do not form a mean and covariance"
            )
    return stats


def build_reference_batch(
    source: ImageSource, out_path: str, extractor: InceptionExtractor, *, keep: int | None = 10000, seed: int = 0
) -> dict:
    """Write an ADM-format reference batch: statistics (mu, sigma, mu_s, sigma_s) of ALL images of `source`
    and `arr_0` = `keep` of them drawn without replacement with `seed` (ADM's batches keep 10,000 images for
    precision/recall), in source order. Returns a summary."""
    feats = extractor(source, outputs=("pool", "spatial"), what="reference images")
    mu, sigma = metrics.statistics(feats["pool"])
    mu_s, sigma_s = metrics.statistics(feats["spatial"])
    n = feats["pool"].shape[0]
    if keep is None or keep <= 0 or keep >= n:
        rows = np.arange(n)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=keep, replace=False))
    arr_0 = np.stack([source.read(int(i), int(i) + 1)[0] for i in rows])
    if jax.process_index() == 0:
        with paths.local_target(out_path, suffix=".npz") as tmp:
            np.savez(tmp, arr_0=arr_0, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    log.info("reference batch %s: statistics of %d images, %d images kept", out_path, n, len(rows))
    return {"reference_batch": os.fspath(out_path), "num_images": int(n), "num_kept": int(len(rows))}


# ----------------------------------------------------------------------------------------------------- scoring
def compute_metrics(
    sample: dict,
    ref_stats: dict,
    ref_pool: np.ndarray,
    *,
    split_size: int = 5000,
    fid_eps: float = 1e-6,
    fid_eps_rule: str = "if_not_finite",
    fid_sqrtm: str = "eigh",
    pr_k: int = 3,
    pr_row_block: int = 10000,
) -> dict:
    """The five ADM numbers from sample features {pool, spatial, probs} and reference statistics/features."""
    mu, sigma = metrics.statistics(sample["pool"])
    mu_s, sigma_s = metrics.statistics(sample["spatial"])
    for name, ours, theirs in (("mu", mu, ref_stats["mu"]), ("mu_s", mu_s, ref_stats["mu_s"])):
        if ours.shape != theirs.shape:
            raise ValueError(
                f"reference {name} has {theirs.shape[0]} dimensions but the sample features have "
                f"{ours.shape[0]}: the reference batch was made with another network or input size"
            )
    fid_kw = dict(eps=fid_eps, eps_rule=fid_eps_rule, sqrtm=fid_sqrtm, return_eps_used=True)
    fid, fid_eps_used = metrics.frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"], **fid_kw)
    sfid, sfid_eps_used = metrics.frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"], **fid_kw)
    precision, recall = metrics.precision_recall(ref_pool, sample["pool"], k=pr_k, row_block=pr_row_block)
    return {
        "fid": fid,
        "sfid": sfid,
        "inception_score": metrics.inception_score(sample["probs"], split_size),
        "precision": precision,
        "recall": recall,
        "fid_eps_used": fid_eps_used,
        "sfid_eps_used": sfid_eps_used,
    }


def _file_id(path: str) -> list:
    st = paths.path(path).stat()
    return [paths.absolute(path), st.length, int(st.mtime * 1e9)]


def reference_features(
    ref_path: str, extractor: InceptionExtractor, *, cache_dir: str | None = None, cache_key: list | None = None
) -> dict:
    """pool (and spatial) features of the reference batch's `arr_0`, cached in `cache_dir` when given."""
    cache = None
    if cache_dir:
        key = json.dumps([_file_id(ref_path), cache_key, extractor.resize, extractor.size])
        cache = paths.join(cache_dir, f"ref_features_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
        if paths.exists(cache):
            log.info("reference features from cache %s", cache)
            with np.load(paths.local_copy(cache)) as z:
                return {k: z[k] for k in z.files}
    feats = extractor(open_images(ref_path), outputs=("pool", "spatial"), what="reference images")
    if cache and jax.process_index() == 0:
        with paths.local_target(cache, suffix=".npz") as tmp:
            np.savez(tmp, **feats)
    return feats


def score(
    samples_path: str,
    ref_path: str,
    extractor: InceptionExtractor,
    *,
    max_samples: int | None = None,
    cache_dir: str | None = None,
    cache_key: list | None = None,
    preemption=None,
    **metric_kw,
) -> dict:
    """Score a sample npz / PNG folder against an ADM reference batch; returns the JSON-ready result."""
    t0 = time.time()
    ref = reference_features(ref_path, extractor, cache_dir=cache_dir, cache_key=cache_key)
    ref_stats = read_reference_statistics(ref_path)
    if ref_stats is None:
        log.info("%s stores no statistics; using those of its %d images", ref_path, ref["pool"].shape[0])
        ref_stats = dict(zip(("mu", "sigma"), metrics.statistics(ref["pool"])))
        ref_stats.update(zip(("mu_s", "sigma_s"), metrics.statistics(ref["spatial"])))
    source = open_images(samples_path)
    progress_dir = None
    if cache_dir:  # sample features saved as they are computed: a preempted evaluation resumes (see `run`)
        key = json.dumps(
            [_file_id(samples_path), cache_key, extractor.resize, extractor.size, extractor.batch_size, max_samples]
        )
        progress_dir = paths.join(cache_dir, f"sample_features_{hashlib.sha1(key.encode()).hexdigest()[:16]}")
    sample = extractor(
        source, limit=max_samples or None, what="samples", progress_dir=progress_dir, preemption=preemption
    )
    result = compute_metrics(sample, ref_stats, ref["pool"], **metric_kw)
    result.update(
        {
            "num_samples": int(sample["pool"].shape[0]),
            "num_reference_images": int(ref["pool"].shape[0]),
            "samples": paths.absolute(samples_path),
            "ref_batch": paths.absolute(ref_path),
            "resize": extractor.resize,
            "input_size": extractor.size,
            "seconds": round(time.time() - t0, 2),
        }
    )
    return result


# --------------------------------------------------------------------------------------------------------- run
def _require_file(cfg, field: str) -> str:
    path = cfg.get(field) or ""
    if not path:
        raise ValueError(f"config.eval.{field} is required (set --config.eval.{field}=PATH)")
    if not paths.exists(path):
        raise FileNotFoundError(f"config.eval.{field}: {path} does not exist")
    return path


def make_extractor(cfg) -> InceptionExtractor:
    """The FID Inception from `cfg.inception_weights`, wrapped for batched sharded extraction."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if cfg.dtype not in dtypes:
        raise ValueError(f"config.eval.dtype must be one of {sorted(dtypes)}, got {cfg.dtype!r}")
    if cfg.dtype != "float32":
        log.warning("config.eval.dtype=%s: features will not match ADM's float32 numbers", cfg.dtype)
    model = load_inception(_require_file(cfg, "inception_weights"), dtype=dtypes[cfg.dtype], precision=cfg.precision)
    return InceptionExtractor(model, batch_size=cfg.batch_size, resize=cfg.resize, size=cfg.input_size)


def run(config, workdir: str) -> dict:
    """Entry point of `--mode=evaluate` (see the module doc and docs/evaluation.md)."""
    cfg = config.eval
    if cfg.task not in TASKS:
        raise ValueError(f"config.eval.task must be one of {TASKS}, got {cfg.task!r}")
    paths.makedirs(workdir)
    extractor = make_extractor(cfg)
    if cfg.task == "build_reference":
        out = cfg.reference_out or paths.join(workdir, "reference_batch.npz")
        result = build_reference_batch(
            open_images(_require_file(cfg, "images")), out, extractor, keep=cfg.reference_keep, seed=cfg.reference_seed
        )
    else:
        # SIGTERM: the sample features computed so far are saved under WORKDIR/cache, the run returns
        # {'preempted': True} (exit 0) and the same command continues from them.
        try:
            with Preemption(sync=True) as preemption:
                result = score(
                    _require_file(cfg, "samples"),
                    _require_file(cfg, "ref_batch"),
                    extractor,
                    max_samples=cfg.max_samples,
                    cache_dir=paths.join(workdir, "cache") if cfg.cache_reference else None,
                    cache_key=_file_id(cfg.inception_weights) + [cfg.dtype, cfg.precision],
                    preemption=preemption,
                    split_size=cfg.is_split_size,
                    fid_eps=cfg.fid_eps,
                    fid_eps_rule=cfg.fid_eps_rule,
                    fid_sqrtm=cfg.fid_sqrtm,
                    pr_k=cfg.pr_k,
                    pr_row_block=cfg.pr_row_block,
                )
        except Preempted:
            return {"preempted": True}
        result["inception_weights"] = paths.absolute(cfg.inception_weights)
        log.info(
            "FID %.4f  sFID %.4f  IS %.3f  precision %.4f  recall %.4f",
            result["fid"],
            result["sfid"],
            result["inception_score"],
            result["precision"],
            result["recall"],
        )
    output = cfg.output or paths.join(workdir, f"{cfg.task}.json")
    if jax.process_index() == 0:
        paths.write_json_atomic(output, result, indent=2)
        log.info("wrote %s", output)
    return result
