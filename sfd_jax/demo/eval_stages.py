"""Stages 5-6 of the demo: the judge, class-balanced sampling (unguided and AutoGuidance), evaluation."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from sfd_jax.data.sources import FASHION_MNIST_CLASSES
from sfd_jax.demo.data import UnitRangeImages, padded_split, unit_range

MODES = ("unguided", "autoguidance")


# ================================================================================================================
# Stages 5-6: classifier, sampling, evaluation
# ================================================================================================================
def classifier(config, workdir: str) -> dict:
    from sfd_jax.eval.classifier import ClassifierConfig, accuracy, save_classifier, train_classifier

    c = config.classifier
    train_x, train_y = padded_split(config.demo.data_dir, "train")
    test_x, test_y = padded_split(config.demo.data_dir, "test")
    cfg = ClassifierConfig(width=int(c.width), feature_dim=int(c.feature_dim))
    model = train_classifier(
        UnitRangeImages(train_x),
        train_y,
        cfg=cfg,
        steps=int(c.steps),
        batch_size=int(c.batch_size),
        lr=float(c.lr),
        seed=int(config.seed),
        log_every=max(1, int(c.steps) // 4),
    )
    path = os.path.join(workdir, "classifier")
    save_classifier(model, cfg, path)
    return {
        "weights": path,
        "test_accuracy": accuracy(model, UnitRangeImages(test_x), test_y),
        "train_images": len(train_x),
        "steps": int(c.steps),
    }


def sample(config, workdir: str, mode: str, tv_dir: str, dit_result: dict) -> dict:
    from sfd_jax.convert.dit import restore_dit
    from sfd_jax.convert.texture_vae import load_texture_vae
    from sfd_jax.diffusion.guidance import AutoGuidance
    from sfd_jax.eval.generator import ImageGenerator, SamplerSettings, TextureDecoder, class_labels, read_latent_stats

    s = config.sample
    _, vae = load_texture_vae(tv_dir)
    mean, std = read_latent_stats(os.path.join(workdir, "latents", "stats.json"), vae.cfg.embed_dim)
    settings = SamplerSettings(
        solver=s.solver,
        rtol=float(s.rtol),
        atol=float(s.atol),
        delta_t=float(config.dit.diffusion.delta_t),
        step_control=s.step_control,
        phase_mode=s.phase_mode,
        max_steps=int(s.max_steps),
    )
    gen = ImageGenerator(
        TextureDecoder(vae, mean, std), settings=settings, seed=int(s.seed), per_device_batch=int(s.per_device_batch)
    )
    _, model = restore_dit(dit_result["weights"])
    guidance = None
    if mode == "autoguidance":
        guidance = AutoGuidance(restore_dit(dit_result["guide"])[1], float(config.demo.guidance_scale))
    num_classes = int(config.dit.data.num_classes)
    n = num_classes * int(config.demo.samples_per_class)
    indices = np.arange(n)
    labels = class_labels(indices, num_images=n, num_classes=num_classes)
    t0 = time.perf_counter()
    images, stats = gen(model, indices, labels, guidance=guidance)
    seconds = time.perf_counter() - t0
    path = os.path.join(workdir, "samples", f"{mode}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(f"{path[:-4]}.tmp.npz", images=images, labels=labels)
    os.replace(f"{path[:-4]}.tmp.npz", path)
    return {
        "path": path,
        "num_images": n,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "nfe_per_batch": [st.nfe for st in stats],  # with AutoGuidance one NFE = main + guide forward
        "nfe_per_image": float(np.mean([st.nfe_per_image for st in stats])),
        "guidance": None
        if guidance is None
        else {"kind": "autoguidance", "scale": guidance.scale, "guide_step": dit_result["guide_step"]},
        "solver": dataclasses.asdict(settings),
    }


def _reconstruct(vae_dir: str, images_u8: np.ndarray, batch: int = 250) -> np.ndarray:
    """uint8 texture-VAE reconstructions (decoded posterior mean): the best any sample can look after decoding."""
    from flax import nnx

    from sfd_jax.convert.texture_vae import load_texture_vae

    graphdef, state = nnx.split(load_texture_vae(vae_dir)[1])

    @jax.jit
    def rec(state, x):
        vae = nnx.merge(graphdef, state)
        return vae.to_uint8(vae.decode(vae.encode(x)[0]))

    out = []
    for i in range(0, len(images_u8), batch):
        x = images_u8[i : i + batch]
        pad = batch - len(x)
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        out.append(np.asarray(rec(state, unit_range(xp)))[: len(x)])
    return np.concatenate(out)


def evaluate(config, workdir: str, classifier_dir: str, vae_dir: str, samples: dict) -> dict:
    from sfd_jax.eval.classifier import apply_batched, load_classifier
    from sfd_jax.eval.metrics import frechet_distance, statistics

    judge = load_classifier(classifier_dir)
    test_x, _ = padded_split(config.demo.data_dir, "test")
    n_ref = min(int(config.demo.fid_test_images), len(test_x))
    ref = statistics(apply_batched(judge, UnitRangeImages(test_x[:n_ref]))[1])

    def score(images, labels) -> dict:
        logits, features = apply_batched(judge, UnitRangeImages(images))
        hit = logits.argmax(-1) == labels
        return {
            "class_consistency": float(hit.mean()),
            "fid_classifier": float(frechet_distance(*statistics(features), *ref)),
            "per_class_consistency": {
                FASHION_MNIST_CLASSES[k]: float(hit[labels == k].mean()) for k in np.unique(labels)
            },
            "num_images": int(len(images)),
        }

    out = {"fid_reference": f"SmallCNN features of the first {n_ref} test images"}
    for mode, result in samples.items():
        with np.load(result["path"]) as z:
            out[mode] = score(z["images"], z["labels"])
    # References scored the same way, with as many images as each sample set: real training images (what a perfect
    # generator would reach) and their texture-VAE reconstructions (what a perfect DiT would reach after decoding).
    n = int(next(iter(samples.values()))["num_images"])
    train_x, train_y = padded_split(config.demo.data_dir, "train")
    pick = np.sort(np.random.default_rng(int(config.seed)).choice(len(train_x), n, replace=False))
    out["real_train_images"] = score(train_x[pick], train_y[pick])
    out["vae_reconstructions"] = score(_reconstruct(vae_dir, train_x[pick]), train_y[pick])
    return out
