"""Self-supervised pretraining of a small DINOv2-with-registers on unlabeled images (the demo's semantic encoder).

Objective: SimCLR's NT-Xent. Two augmented views of every image in a batch of B go through the ViT; the layer-normed
patch tokens (`patch_tokens`, what the SemVAE and REPA consume) are mean-pooled, passed through a 2-layer MLP
projector and L2-normalised; each view must pick out its partner among the other 2B − 1 views at temperature τ.
The projector is thrown away afterwards; only the ViT is saved (a transformers directory, like any DINOv2).

Why contrastive rather than DINO/iBOT self-distillation at this scale: a few thousand CPU steps of a 2-layer ViT
leave no room for the teacher-temperature warm-up, centering momentum and EMA schedules that keep self-distillation
from collapsing, while NT-Xent has no collapsed solution (the negatives push apart) and one hyper-parameter (τ).

Augmentations for 28×28 gray garments padded to 32×32: random resized crop (area 30-100%, aspect 3/4-4/3),
horizontal flip, brightness/contrast jitter and a random erased square — no colour jitter, no blur (the images are
gray and already small). Everything runs inside the jitted step, so the host only gathers uint8 rows.

Resumable: `train` checkpoints (ViT + projector + AdamW state, atomically written npz) every `ckpt_every` steps and
continues from the newest one; batch indices and augmentation keys depend only on (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sfd_jax.data.preprocess import dino_from_unit_range
from sfd_jax.models.dinov2 import Dinov2
from sfd_jax.programs import ProgramCache

log = logging.getLogger("sfd_jax.vfm_ssl")

CHECKPOINT = "ssl_state.npz"


@dataclasses.dataclass(frozen=True)
class SSLConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    temperature: float = 0.2
    proj_hidden: int = 256
    proj_dim: int = 64
    crop_min_area: float = 0.3
    erase_prob: float = 0.5
    ckpt_every: int = 250
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"SSLConfig: steps ({self.steps}) must be >= 1 and batch_size ({self.batch_size}) >= 2 "
                "(NT-Xent needs negatives)"
            )
        if not 0 <= self.warmup_steps < self.steps:
            # The cosine decay after the warm-up needs at least one step (optax's error would not name the field).
            raise ValueError(
                f"SSLConfig.warmup_steps ({self.warmup_steps}) must be at least 0 and smaller than steps ({self.steps})"
            )
        if not 0 < self.crop_min_area <= 1:
            raise ValueError(f"SSLConfig.crop_min_area must lie in (0, 1], got {self.crop_min_area}")
        if self.temperature <= 0:
            raise ValueError(f"SSLConfig.temperature must be positive, got {self.temperature}")


class Projector(nnx.Module):
    def __init__(self, d: int, hidden: int, out: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class SSLModel(nnx.Module):
    def __init__(self, vit: Dinov2, cfg: SSLConfig, *, rngs: nnx.Rngs):
        self.vit = vit
        self.head = Projector(vit.cfg.hidden_size, cfg.proj_hidden, cfg.proj_dim, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# Augmentations: one (H, W) image in [0, 1] (background 0) → one view
# ---------------------------------------------------------------------------------------------------------------
def augment(key: jax.Array, x: jax.Array, cfg: SSLConfig) -> jax.Array:
    h, w = x.shape
    k = jax.random.split(key, 9)
    area = jax.random.uniform(k[0], (), minval=cfg.crop_min_area, maxval=1.0)
    log_ratio = jax.random.uniform(k[1], (), minval=np.log(3 / 4), maxval=np.log(4 / 3))
    ratio = jnp.exp(log_ratio)
    ch = jnp.minimum(h * jnp.sqrt(area / ratio), h)
    cw = jnp.minimum(w * jnp.sqrt(area * ratio), w)
    top = jax.random.uniform(k[2], ()) * (h - ch)
    left = jax.random.uniform(k[3], ()) * (w - cw)
    # Output pixel coordinate = input coordinate · scale + translation: the crop [top, top + ch) fills [0, h).
    scale = jnp.stack([h / ch, w / cw])
    y = jax.image.scale_and_translate(x, (h, w), (0, 1), scale, -jnp.stack([top, left]) * scale, "linear")
    y = jnp.where(jax.random.bernoulli(k[4]), y[:, ::-1], y)
    contrast = jax.random.uniform(k[5], (), minval=0.6, maxval=1.4)
    brightness = jax.random.uniform(k[6], (), minval=-0.2, maxval=0.2)
    m = y.mean()
    y = jnp.clip((y - m) * contrast + m + brightness * (y > 0.02), 0.0, 1.0)
    # Random erasing: a square of side 6-12 pixels set to the background.
    side = jax.random.randint(k[7], (), 6, 13)
    corner = jax.random.randint(k[8], (2,), 0, h - 6)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= corner[0]) & (rows < corner[0] + side) & (cols >= corner[1]) & (cols < corner[1] + side)
    erase = jax.random.bernoulli(jax.random.fold_in(k[8], 1), cfg.erase_prob)
    return jnp.where(erase & box, 0.0, y)


def dino_input(gray01: jax.Array, size: int) -> jax.Array:
    """(B, H, W) in [0, 1] → the DINOv2's NHWC ImageNet-normalised RGB input, as the extraction prepares it."""
    return dino_from_unit_range(jnp.repeat(gray01[..., None] * 2.0 - 1.0, 3, axis=-1), size)


def pooled(vit: Dinov2, pixels: jax.Array) -> jax.Array:
    """Mean of the layer-normed patch tokens: the representation trained here and linearly probed."""
    return vit.patch_tokens(pixels).astype(jnp.float32).mean(axis=1)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(loss, top-1 accuracy of finding the partner view) of the symmetric NT-Xent over 2B normalised views."""
    z = jnp.concatenate([z1, z2])
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)
    n = z1.shape[0]
    sim = (z @ z.T) / temperature
    sim = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)
    partner = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
    logp = jax.nn.log_softmax(sim, axis=-1)
    loss = -jnp.take_along_axis(logp, partner[:, None], axis=-1).mean()
    return loss, (sim.argmax(-1) == partner).mean()


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def make_optimizer(cfg: SSLConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(1, cfg.warmup_steps), max(cfg.steps, 2), end_value=cfg.lr * 0.01
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    return np.random.default_rng([seed, step]).choice(n, batch, replace=False)


def _save(path: str, params, opt_state, step: int) -> None:
    leaves = jax.tree.leaves((params, opt_state))
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, step=np.int64(step), **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)


def _restore(path: str, params, opt_state):
    treedef = jax.tree.structure((params, opt_state))
    template = jax.tree.leaves((params, opt_state))
    with np.load(path) as z:
        leaves = [z[f"leaf_{i}"] for i in range(len(template)) if f"leaf_{i}" in z.files]
        step = int(z["step"])
    if len(leaves) != len(template) or any(a.shape != np.shape(b) for a, b in zip(leaves, template)):
        raise ValueError(
            f"{path} does not hold this SSL model's state (other model or optimizer settings); delete it to start over"
        )
    params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves])
    return params, opt_state, step


def train(
    vit: Dinov2, images_u8: np.ndarray, cfg: SSLConfig, workdir: str, *, stop_after: int | None = None
) -> tuple[Dinov2, dict]:
    """Pretrains `vit` (updated in place and returned) on uint8 (N, H, W) gray images; resumes from `workdir`.
    `stop_after`: return after this step, as a run killed there would (tests).

    Returns (vit, {'steps', 'resumed_from_step', 'last': {loss, partner_accuracy}, 'seconds'}); the loss curve goes
    to `workdir/metrics.jsonl`.
    """
    if images_u8.ndim != 3 or images_u8.dtype != np.uint8:
        raise ValueError(f"SSL pretraining takes uint8 (N, H, W) gray images, got {images_u8.dtype} {images_u8.shape}")
    if len(images_u8) < cfg.batch_size:
        raise ValueError(f"SSL pretraining: {len(images_u8)} images < batch_size {cfg.batch_size}")
    os.makedirs(workdir, exist_ok=True)
    size = images_u8.shape[1]
    model = SSLModel(vit, cfg, rngs=nnx.Rngs(cfg.seed + 1))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    ckpt, start = os.path.join(workdir, CHECKPOINT), 0
    if os.path.exists(ckpt):
        params, opt_state, start = _restore(ckpt, params, opt_state)
        log.info("SSL pretraining: resuming from the checkpoint of step %d", start)

    @jax.jit
    def step_fn(params, opt_state, batch_u8, key):
        x = batch_u8.astype(jnp.float32) / 255.0
        k1, k2 = jax.random.split(key)
        views = [jax.vmap(lambda kk, im: augment(kk, im, cfg))(jax.random.split(k, len(x)), x) for k in (k1, k2)]

        def objective(p):
            m = nnx.merge(graphdef, p)
            z = [m.head(pooled(m.vit, dino_input(v, size))) for v in views]
            return nt_xent(z[0], z[1], cfg.temperature)

        (loss, acc), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "partner_accuracy": acc}

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    base_key, last, t0 = jax.random.key(cfg.seed), {}, time.perf_counter()
    for step in range(start, cfg.steps):
        batch = images_u8[np.sort(_batch_indices(cfg.seed, step, len(images_u8), cfg.batch_size))]
        params, opt_state, m = step_fn(params, opt_state, batch, jax.random.fold_in(base_key, step))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = {k: float(v) for k, v in m.items()}
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(f"SSL pretraining: loss {last['loss']} at step {done}; lower ssl.lr")
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": done, **last}) + "\n")
            log.info(
                "SSL step %d/%d: NT-Xent %.4f, partner accuracy %.3f (%.1fs)",
                done,
                cfg.steps,
                last["loss"],
                last["partner_accuracy"],
                time.perf_counter() - t0,
            )
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save(ckpt, params, opt_state, done)
        if stop_after is not None and done >= stop_after:
            break
    nnx.update(model, params)
    return model.vit, {
        "steps": cfg.steps,
        "resumed_from_step": start,
        "last": last,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------------------------
# Frozen features and the linear probe
# ---------------------------------------------------------------------------------------------------------------
# One compiled feature program per ViT architecture and image size in a process: the demo probes the pretrained and
# the random encoder (one architecture) on the training and the test split.
_FEATURES = ProgramCache(size=4)


def _features_program(graphdef, size: int):
    def build():
        @jax.jit
        def fn(state, x):
            _FEATURES.note_trace()
            return pooled(nnx.merge(graphdef, state), dino_input(x.astype(jnp.float32) / 255.0, size))

        return fn

    return _FEATURES.get((graphdef, size), build)


def features(vit: Dinov2, images_u8: np.ndarray, batch: int = 1000) -> np.ndarray:
    """float32 (N, D) mean-pooled patch tokens of uint8 (N, H, W) gray images (no augmentation)."""
    graphdef, state = nnx.split(vit)
    fn = _features_program(graphdef, images_u8.shape[1])
    batch = min(batch, len(images_u8))  # a small set is one call, not one padded to `batch` images
    out = []
    for i in range(0, len(images_u8), batch):
        x = images_u8[i : i + batch]
        pad = batch - len(x)
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        out.append(np.asarray(fn(state, xp))[: len(x)])
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=5)
def _fit_probe(params, x, y, lr, l2, steps: int):
    """`steps` full-batch Adam steps of the L2-regularised softmax regression; one compiled program for every probe
    of the same shapes (the demo probes two encoders)."""
    tx = optax.adam(lr)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(p["w"] ** 2)

    def body(carry, _):
        p, s = carry
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), value

    (p, _), values = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return p, values[-1]


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int = 10,
    steps: int = 500,
    lr: float = 0.05,
    l2: float = 1e-4,
) -> dict:
    """Multinomial logistic regression on standardised features, full-batch Adam (a convex problem: the optimiser
    only decides how close to the optimum `steps` get). Returns train and test accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = jnp.asarray((train_x - mean) / std, jnp.float32)
    xte = jnp.asarray((test_x - mean) / std, jnp.float32)
    ytr = jnp.asarray(train_y, jnp.int32)
    params = {"w": jnp.zeros((xtr.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    params, final_loss = _fit_probe(params, xtr, ytr, jnp.float32(lr), jnp.float32(l2), steps)
    acc = lambda x, y: float(np.mean(np.asarray((x @ params["w"] + params["b"]).argmax(-1)) == y))
    return {
        "train_accuracy": acc(xtr, np.asarray(train_y)),
        "test_accuracy": acc(xte, np.asarray(test_y)),
        "train_loss": float(final_loss),
        "features": int(train_x.shape[1]),
        "steps": steps,
        "l2": l2,
    }
