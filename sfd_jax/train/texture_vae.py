"""A small trainer for the texture VAE, for custom data and the demo (`--mode=train_texture_vae`).

Objective (per batch): reconstruction (L1 or L2, pixel mean) + kl_weight · KL / (pixels per image). Dividing the KL
by the pixel count keeps `kl_weight` meaning what it means in the LDM recipe, whose loss is the per-image pixel *sum*
of |x − x̂| plus kl_weight · KL (1e-6 there). No LPIPS and no discriminator: see docs/texture_vae.md.

The run reuses the training system: `sfd_jax.parallel` (mesh, logical-axis shardings, global batches),
`TrainSetup` (sharded init, AdamW), `jit_train_step` (compiled, donated step), `sfd_jax.checkpoint.Checkpoints`
(orbax, resumed automatically from the workdir) and `MetricsWriter` (metrics.jsonl + TensorBoard). Batches come
from any image source (`index -> (uint8 (H, W, 3), label)`) in an order that depends only on (seed, step), so a
resumed run sees exactly the images an uninterrupted one would and the data position needs no state of its own.
Every `eval.every` steps the first `eval.num_images` images of `eval.source` (default: the training source) are
reconstructed from the posterior mean into `recon_<step>.png` (originals above their reconstructions), with their
L1/MSE/PSNR in metrics.jsonl. The final weights go to
`<workdir>/texture_vae/` (config.json + model.safetensors in reference names), which `load_texture_vae` reads.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from PIL import Image

from sfd_jax import parallel
from sfd_jax.convert.texture_vae import save_texture_vae
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig
from sfd_jax.programs import ProgramCache, config_key
from sfd_jax.train import skeleton
from sfd_jax.train.config import ConfigError, require, require_finite_optim
from sfd_jax.train.state import TrainSetup, TrainState, make_optimizer
from sfd_jax.train.step import guarded_update, jit_train_step

log = logging.getLogger(__name__)

RECON_LOSSES = ("l1", "l2")


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
class SyntheticImageSource:
    """In-memory smooth colour images (sums of random low-frequency waves), for tests and smoke runs."""

    num_classes = 1

    def __init__(self, num_images: int = 256, size: int = 32, seed: int = 0, waves: int = 3):
        rng = np.random.default_rng(seed)
        yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
        freq = rng.uniform(0.5, 2.5, (num_images, waves, 2))
        phase = rng.uniform(0, 2 * np.pi, (num_images, waves, 1, 1))
        colour = rng.uniform(-1, 1, (num_images, waves, 1, 1, 3))
        arg = 2 * np.pi * (freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx) + phase
        x = (np.sin(arg)[..., None] * colour).sum(axis=1) / waves
        self.images = np.clip(np.round(127.5 * x + 127.5), 0, 255).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[int(index)], 0

    def describe(self) -> dict:
        return {"kind": "synthetic", "num_images": len(self)}


def make_image_source(cfg) -> Any:
    """`config.data.source`: kind 'synthetic' here, every other kind from `sfd_jax.data.sources.make_source`."""
    if cfg.get("kind") == "synthetic":
        return SyntheticImageSource(int(cfg.get("num_images", 256)), int(cfg.get("size", 32)), int(cfg.get("seed", 0)))
    from sfd_jax.data.sources import make_source

    return make_source(cfg)


def prepare_image(image, size: int) -> np.ndarray:
    """Source image → uint8 (size, size, 3): gray repeated to RGB, other sizes ADM-centre-cropped and resized."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image source returned {image.dtype} {image.shape}; expected uint8 (H, W, 3) or (H, W, 1)")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.shape[:2] != (size, size):
        from sfd_jax.data.preprocess import adm_center_crop

        image = adm_center_crop(image, size)
    return image


def batch_indices(step: int, batch_size: int, num_images: int, seed: int) -> np.ndarray:
    """Global batch `step`: consecutive slots of a per-epoch permutation seeded by (seed, epoch)."""
    slots = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(slots, num_images)
    out = np.empty_like(slots)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_images)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


def load_images(source, indices, size: int) -> np.ndarray:
    return np.stack([prepare_image(source[int(i)][0], size) for i in indices])


def image_grid(originals: np.ndarray, recons: np.ndarray, columns: int = 8) -> np.ndarray:
    """Rows of `columns` originals, each followed by the row of their reconstructions; uint8 (H, W, 3)."""
    n, h, w, c = originals.shape
    rows = -(-n // columns)
    grid = np.full((2 * rows * (h + 2), columns * (w + 2), c), 255, np.uint8)  # white borders
    for i in range(n):
        r, col = divmod(i, columns)
        for k, src in enumerate((originals, recons)):
            y, x = (2 * r + k) * (h + 2) + 1, col * (w + 2) + 1
            grid[y : y + h, x : x + w] = src[i]
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Loss and steps
# ----------------------------------------------------------------------------------------------------------------
def vae_loss(images, recon, mean, logvar, *, recon_loss: str = "l1", kl_weight: float = 1e-6):
    """(loss, terms) in float32; images and recon in [-1, 1], NHWC."""
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"loss.recon={recon_loss!r}; choose one of {RECON_LOSSES}")
    diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
    l1, mse = jnp.mean(jnp.abs(diff)), jnp.mean(jnp.square(diff))
    kl = jnp.mean(TextureVAE.kl(mean, logvar))
    pixels = float(np.prod(images.shape[1:]))
    loss = (l1 if recon_loss == "l1" else mse) + kl_weight * kl / pixels
    return loss, {"l1": l1, "mse": mse, "kl": kl}


def to_float(images_u8):
    return images_u8.astype(jnp.float32) / 127.5 - 1.0


def make_vae_train_step(
    graphdef, tx: optax.GradientTransformation, *, recon_loss: str, kl_weight: float, ema_decay: float
):
    """train_step(state, aux, batch={'images': uint8 NHWC}) -> (state, metrics); drops non-finite updates."""

    def train_step(state: TrainState, aux, batch):
        key = jax.random.fold_in(state.rng, state.step)
        images = to_float(batch["images"])

        def objective(params):
            model = nnx.merge(graphdef, params, aux)
            mean, logvar = model.encode(images)
            recon = model.decode(model.sample_posterior(mean, logvar, key))
            return vae_loss(images, recon, mean, logvar, recon_loss=recon_loss, kl_weight=kl_weight)

        (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        new_state, guard = guarded_update(state, tx, grads, loss, ema_decay)
        return new_state, {**guard, **terms}

    return train_step


def make_reconstruct(graphdef, setup: TrainSetup, mesh):
    """jit(params, aux, uint8 images) -> (uint8 reconstructions from the posterior mean, {l1, mse, psnr})."""
    rep = parallel.replicated(mesh)

    def reconstruct(params, aux, images_u8):
        model = nnx.merge(graphdef, params, aux)
        images = to_float(images_u8)
        mean, _ = model.encode(images)
        recon = model.decode(mean)
        diff = jnp.clip(recon, -1, 1) - images
        mse = jnp.mean(jnp.square(diff))
        # PSNR of [-1, 1] images: peak-to-peak range 2.
        metrics = {
            "l1": jnp.mean(jnp.abs(recon - images)),
            "mse": jnp.mean(jnp.square(recon - images)),
            "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12)),
        }
        return model.to_uint8(recon), metrics

    return jax.jit(
        reconstruct, in_shardings=(setup.param_shardings, setup.aux_shardings, rep), out_shardings=(rep, rep)
    )


# ----------------------------------------------------------------------------------------------------------------
# Setup shared by training and loading
# ----------------------------------------------------------------------------------------------------------------
def _model_config(config) -> TextureVAEConfig:
    return TextureVAEConfig.from_dict(config.model.to_dict())


def _setup_schedule(config):
    return make_optimizer(config.optim, config.train.num_steps)[1]


def _setup(config, mesh) -> TrainSetup:
    cfg = _model_config(config)
    tx, _ = make_optimizer(config.optim, config.train.num_steps)
    rules = parallel.parse_rules(config.mesh.rules)
    return TrainSetup(lambda rngs: TextureVAE(cfg, rngs=rngs), tx, mesh, rules)


def _mesh(config):
    return parallel.make_mesh(tuple(config.mesh.ici), tuple(config.mesh.get("dcn", (1, 1, 1))))


# ----------------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------------
def _validate(config, mesh) -> None:
    t = config.train
    dp = parallel.data_parallel_size(mesh)
    require(
        t.batch_size > 0 and t.batch_size % dp == 0 and t.batch_size % jax.process_count() == 0,
        "train.batch_size",
        f"batch_size={t.batch_size} must be divisible by the data-parallel size {dp} "
        f"(mesh {dict(mesh.shape)}) and the process count {jax.process_count()}",
    )
    require(config.loss.recon in RECON_LOSSES, "loss.recon", f"{config.loss.recon!r}; choose one of {RECON_LOSSES}")
    skeleton.validate_loop(config, ConfigError)
    require_finite_optim(config.optim)
    cfg = _model_config(config)
    require(
        config.data.image_size % cfg.downsample_factor == 0,
        "data.image_size",
        f"{config.data.image_size} is not divisible by the model's downsample factor {cfg.downsample_factor} "
        f"(ch_mult={cfg.ch_mult})",
    )


def _line(values: dict) -> str:
    return f"loss {values['loss']:.4g} l1 {values['l1']:.4g} mse {values['mse']:.4g} kl {values['kl']:.4g}"


def make_evaluate(config, workdir: str, reconstruct, mesh, aux, eval_source):
    """evaluate(step, state, write=True) -> {'eval/l1', 'eval/mse', 'eval/psnr'}; with `write`, also the grid
    `recon_<step>.png` of originals above their reconstructions from the posterior mean. `reconstruct`: the jitted
    program of make_reconstruct."""
    size = config.data.image_size
    eval_images = load_images(eval_source, range(min(config.eval.num_images, len(eval_source))), size)
    eval_global = jax.make_array_from_process_local_data(parallel.replicated(mesh), eval_images)

    def evaluate(at: int, state, write: bool = True) -> dict:
        recon, values = reconstruct(state.ema_params, aux, eval_global)
        values = {f"eval/{k}": float(v) for k, v in parallel.global_to_host(values).items()}
        if write and jax.process_index() == 0:
            grid = image_grid(eval_images, np.asarray(recon), config.eval.grid_columns)
            Image.fromarray(grid).save(os.path.join(workdir, f"recon_{at:06d}.png"))
        return values

    return evaluate


# Runs in one process whose programs read the same settings (the tests, a sweep) share the sharded-state recipe, the
# jitted step and the jitted reconstruction; new jitted functions for each run would trace and compile them again.
_PROGRAM_FIELDS = ("model", "optim", "loss", "mesh")
_PROGRAMS = ProgramCache(size=4)


def _setup_and_programs(config, mesh) -> tuple[TrainSetup, Any, Any]:
    """(TrainSetup, the jitted VAE train step, the jitted evaluation reconstruction)."""

    def build():
        setup = _setup(config, mesh)
        step = make_vae_train_step(
            setup.graphdef,
            setup.tx,
            recon_loss=config.loss.recon,
            kl_weight=config.loss.kl_weight,
            ema_decay=config.optim.ema_decay,
        )
        return setup, jit_train_step(step, setup, mesh), make_reconstruct(setup.graphdef, setup, mesh)

    return _PROGRAMS.get(config_key(config, _PROGRAM_FIELDS, mesh=mesh), build)


def _step_fn(train_step, mesh, aux):
    """The skeleton's step: the compiled VAE step on this process's images made global."""

    def step(state, images):
        return train_step(state, aux, parallel.host_to_global({"images": images}, mesh))

    return step


def _data_fn(config, source):
    """The skeleton's make_data: this process's rows of each step's batch, a function of (seed, step) only."""
    t, size = config.train, config.data.image_size
    local = t.batch_size // jax.process_count()
    lo = jax.process_index() * local

    def batches(start_step: int):
        for step in itertools.count(start_step):
            idx = batch_indices(step, t.batch_size, len(source), config.seed)[lo : lo + local]
            yield load_images(source, idx, size)

    return lambda start, _: skeleton.StepIndexed(batches(start), start)


def _export_final_ema(workdir: str, setup: TrainSetup, state, aux, step: int) -> None:
    out = save_texture_vae(
        os.path.join(workdir, "texture_vae"),
        setup.merge(state.ema_params, aux),
        meta={"workdir": workdir, "step": step, "weights": "ema"},
    )
    log.info("wrote the trained texture VAE to %s", out)


def run(config: ml_collections.ConfigDict, workdir: str, source=None) -> dict:
    """Train (or resume) a texture VAE in `workdir`; returns the last evaluation's metrics.

    `source` overrides `config.data.source` (any object with len() and [i] -> (uint8 image, label)).
    """
    parallel.maybe_initialize_distributed(config.distributed)
    workdir = os.path.abspath(workdir)
    mesh = _mesh(config)
    _validate(config, mesh)
    source = make_image_source(config.data.source) if source is None else source
    if len(source) < 1:
        raise ValueError("the image source is empty")
    t = config.train
    model_cfg = _model_config(config)
    setup, train_step, reconstruct = _setup_and_programs(config, mesh)
    aux = setup.init_aux(int(config.seed))
    saved_config = {
        "config": config.to_dict(),
        "model": model_cfg.to_dict(),
        "mesh": dict(mesh.shape),
        "num_params": int(setup.num_params),
    }
    describe = getattr(source, "describe", None)
    log.info(
        "texture VAE f%dd%d: %d parameters, mesh %s, source %s",
        model_cfg.downsample_factor,
        model_cfg.embed_dim,
        setup.num_params,
        dict(mesh.shape),
        describe() if describe else type(source),
    )

    step = _step_fn(train_step, mesh, aux)
    eval_cfg = config.eval.get("source")
    eval_source = make_image_source(eval_cfg) if eval_cfg is not None and eval_cfg.get("kind") else source
    evaluate = make_evaluate(config, workdir, reconstruct, mesh, aux, eval_source)
    task = skeleton.Task(
        name="texture VAE",
        setup=setup,
        seed=int(config.seed),
        step=step,
        make_data=_data_fn(config, source),
        saved_config=saved_config,
        global_batch=t.batch_size,
        lr=_setup_schedule(config),
        line=_line,
        evaluate=evaluate,
        eval_at_start=True,
        device_count=mesh.size,
    )
    result = skeleton.run(task, config, workdir)
    last_eval = result.last_eval
    if result.start_step >= t.num_steps:  # a finished workdir: re-evaluated only (its metrics and grid hold it)
        last_eval = evaluate(result.step, result.state, write=False)
    if not result.preempted and jax.process_index() == 0:
        _export_final_ema(workdir, setup, result.state, aux, result.step)
    return last_eval
