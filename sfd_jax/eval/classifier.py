"""A small CNN classifier used as a judge for small-image datasets (the Fashion-MNIST demo).

ImageNet runs are scored with the ADM Inception network (`sfd_jax.eval.metrics`); at 32×32 with ten classes that
network says little, so the demo trains this classifier on the real training split and reports
- its test accuracy (is the judge any good?),
- class consistency: its accuracy on generated samples against the labels they were conditioned on,
- a Fréchet distance between generated and real test images in its penultimate feature space.

Images are NHWC float32 in [-1, 1] (what the texture VAE decodes to).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfd_jax.programs import ProgramCache


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    image_size: int = 32
    channels: int = 3


class SmallCNN(nnx.Module):
    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        w = cfg.width
        self.conv1 = nnx.Conv(cfg.channels, w, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(w, 2 * w, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(2 * w, 4 * w, (3, 3), rngs=rngs)
        flat = 4 * w * (cfg.image_size // 8) ** 2
        self.fc = nnx.Linear(flat, cfg.feature_dim, rngs=rngs)
        self.head = nnx.Linear(cfg.feature_dim, cfg.num_classes, rngs=rngs)

    def features(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), (2, 2))
        return nnx.relu(self.fc(x.reshape(x.shape[0], -1)))

    def __call__(self, x):
        return self.head(self.features(x))


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    cfg: ClassifierConfig = ClassifierConfig(),
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 100,
) -> SmallCNN:
    """Adam on random mini-batches; light random horizontal flips and shifts keep it from memorising."""
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
        raise ValueError(
            f"classifier images must be (N, {cfg.image_size}, {cfg.image_size}, {cfg.channels}), got {images.shape}"
        )
    # One compiled initialiser: created eagerly, each weight's random draw was a program of its own to compile.
    model = nnx.jit(lambda: SmallCNN(cfg, rngs=nnx.Rngs(seed)))()
    graphdef, params = nnx.split(model)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    t0 = time.time()
    for i in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        x = _augment(images[idx], rng)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jnp.asarray(labels[idx], jnp.int32))
        if log_every and (i + 1) % log_every == 0:
            print(f"[classifier] step {i + 1}/{steps} loss {float(loss):.4f} ({time.time() - t0:.1f}s)", flush=True)
    return nnx.merge(graphdef, params)


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flip = rng.random(len(x)) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    dy, dx = rng.integers(-2, 3, 2)
    return np.roll(x, (int(dy), int(dx)), axis=(1, 2))


# One compiled forward per judge architecture in a process: the ablation scores dozens of checkpoints with one judge.
_FORWARD = ProgramCache(size=4)


def _forward(graphdef):
    def build():
        @jax.jit
        def run(p, x):
            _FORWARD.note_trace()
            m = nnx.merge(graphdef, p)
            f = m.features(x)
            return m.head(f), f

        return run

    return _FORWARD.get(graphdef, build)


def apply_batched(model: SmallCNN, images: np.ndarray, *, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) for all images, in fixed-size jitted batches (the last one padded)."""
    graphdef, params = nnx.split(model)
    run = _forward(graphdef)
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        pad = batch_size - len(x)
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        lo, fe = run(params, jnp.asarray(xp, jnp.float32))
        logits.append(np.asarray(lo)[: len(x)])
        feats.append(np.asarray(fe)[: len(x)])
    return np.concatenate(logits), np.concatenate(feats)


def accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray) -> float:
    logits, _ = apply_batched(model, images)
    return float((logits.argmax(-1) == labels).mean())


def save_classifier(model: SmallCNN, cfg: ClassifierConfig, directory: str) -> None:
    """npz of the flat parameter state + config JSON; written to a temp name, then renamed (never half-written)."""
    os.makedirs(directory, exist_ok=True)
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tmp = os.path.join(directory, "params.tmp.npz")
    np.savez(tmp, **flat)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    os.replace(tmp, os.path.join(directory, "params.npz"))


def load_classifier(directory: str) -> SmallCNN:
    with open(os.path.join(directory, "config.json")) as f:
        cfg = ClassifierConfig(**json.load(f))
    model = nnx.eval_shape(lambda: SmallCNN(cfg, rngs=nnx.Rngs(0)))  # shapes only: every weight is replaced below
    with np.load(os.path.join(directory, "params.npz")) as d:
        values = {k: d[k] for k in d.files}
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    missing = [".".join(map(str, p)) for p, _ in flat if ".".join(map(str, p)) not in values]
    if missing:
        raise ValueError(f"{directory}/params.npz lacks classifier parameters: {missing}")
    nnx.update(model, nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))])) for p, v in flat]))
    return model
