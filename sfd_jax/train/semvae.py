"""Semantic VAE training (`--mode=train_semvae`): the reference recipe (docs/semantic.md#training-the-semvae) on DINOv2
patch tokens.

    python -m sfd_jax.main --config=configs/semvae.py:demo --workdir=/tmp/semvae_demo --mode=train_semvae

Input (`config.data.kind`):
- 'images': an image source (`sfd_jax.data.sources`, or 'synthetic'), each image through the SemVAE-training
  transform (Resize(256, bicubic) → CenterCrop(224) → ImageNet normalisation), then a frozen DINOv2 inside the jitted
  step gives the layer-normed patch tokens. DINOv2 comes from `config.dino.checkpoint`; without one it is randomly
  initialised, which is only good for smoke tests, and the log says so.
- 'features': pre-extracted token arrays (N, L, C) in `.npy` files (memory-mapped).
Batches come from a Grain `MapDataset` whose order depends only on (seed, step): a resumed run reads exactly what an
uninterrupted one would, so the data position needs no checkpoint of its own.

Objective: 1.0·MSE + 0.0·L1 + 1.0·(1 − cos) + 1e-7·KL (weights in `config.loss`; `loss.cos_axis` 'feature' is the
paper's cosine, 'token' the reference training code's). AdamW lr 5e-5, wd 0.01; linear warmup from 0.01× over 500
steps, constant to 800K, cosine to 0.1× at 1M. Held-out evaluation (the reference's): reconstruction MSE and the
feature-axis cosine similarity of the reconstructions, from a posterior sample and from μ.

Reuses the training system: `sfd_jax.parallel` (mesh, logical-axis shardings, global batches), `TrainSetup` (sharded
init), `sfd_jax.checkpoint.Checkpoints` (orbax, auto-resume from the workdir), `MetricsWriter` (metrics.jsonl +
TensorBoard). The final weights are written to `<workdir>/semvae/` (config.json + model.safetensors), which
`load_semvae` and the extraction read.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sfd_jax import parallel
from sfd_jax.models import semvae as sv
from sfd_jax.models.dinov2 import Dinov2, Dinov2Config
from sfd_jax.programs import ProgramCache, config_key
from sfd_jax.train import skeleton
from sfd_jax.train.config import ConfigError, require, require_finite_optim
from sfd_jax.train.state import TrainSetup, TrainState
from sfd_jax.train.step import guarded_update

log = logging.getLogger(__name__)

DATA_KINDS = ("images", "features")
EXPORT_DIR = "semvae"


# ================================================================================================================
# Config checks and optimizer
# ================================================================================================================
def validate(config, mesh) -> None:
    t, d, o = config.train, config.data, config.optim
    require(d.kind in DATA_KINDS, "data.kind", f"{d.kind!r}; valid: {DATA_KINDS}")
    require(config.loss.cos_axis in sv.COS_AXES, "loss.cos_axis", f"{config.loss.cos_axis!r}; valid: {sv.COS_AXES}")
    dp, pc = parallel.data_parallel_size(mesh), jax.process_count()
    for field, value in (("train.batch_size", int(t.batch_size)), ("eval.batch_size", int(config.eval.batch_size))):
        require(
            value > 0 and value % dp == 0 and value % pc == 0,
            field,
            f"{value} must be a positive multiple of the data-parallel size {dp} (mesh {dict(mesh.shape)}) "
            f"and of the process count {pc}",
        )
    require(
        int(config.eval.num_images) % int(config.eval.batch_size) == 0,
        "eval.num_images",
        f"{config.eval.num_images} must be a multiple of eval.batch_size ({config.eval.batch_size})",
    )
    skeleton.validate_loop(config, ConfigError)
    require_finite_optim(o)
    require(
        0 <= int(o.warmup_steps) <= int(o.decay_start) <= int(o.decay_end),
        "optim",
        f"need 0 <= warmup_steps ({o.warmup_steps}) <= decay_start ({o.decay_start}) <= decay_end ({o.decay_end})",
    )
    require(0 <= float(o.ema_decay) < 1, "optim.ema_decay", f"{o.ema_decay} must lie in [0, 1)")
    if d.kind == "images":
        patch = int(config.dino.config.patch_size)
        require(int(d.crop) % patch == 0, "data.crop", f"{d.crop} is not a multiple of the DINOv2 patch size {patch}")
    else:
        require(bool(d.features), "data.features", "a .npy token file is required for data.kind='features'")


def make_optimizer(o) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with the reference schedule: warmup from warmup_init·lr, constant, cosine to final_scale·lr."""
    lr, warmup, start, end = float(o.lr), int(o.warmup_steps), int(o.decay_start), int(o.decay_end)
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(float(o.warmup_init) * lr, lr, max(warmup, 1)),
            optax.constant_schedule(lr),
            optax.cosine_decay_schedule(lr, max(end - start, 1), alpha=float(o.final_scale)),
        ],
        [warmup, start],
    )
    tx = optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), weight_decay=float(o.weight_decay))
    if float(o.grad_clip) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), tx)
    return tx, schedule


# ================================================================================================================
# Input
# ================================================================================================================
class _Rows:
    """Random-access view `items[i] = base[rows[i]]` with a per-item function (image loading / row reading)."""

    def __init__(self, base, rows, fn):
        self.base, self.rows, self.fn = base, np.asarray(rows, np.int64), fn

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.fn(self.base, int(self.rows[i]))


def _image_item(crop: int, resize: int):
    from sfd_jax.data.preprocess import semvae_train_transform

    def load(source, index):
        image = np.asarray(source[index][0])
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
        return semvae_train_transform(image, resize=resize, crop=crop)

    return load


def _feature_item(array, index):
    return np.asarray(array[index], np.float32)


def build_inputs(config, source=None) -> tuple[_Rows, _Rows, dict]:
    """(train items, held-out items, description). Held out: `data.eval_source` / `data.eval_features` when set,
    else the last `eval.num_images` items of the training data (excluded from training)."""
    d, n_eval = config.data, int(config.eval.num_images)
    if d.kind == "images":
        from sfd_jax.train.texture_vae import make_image_source

        source = make_image_source(d.source) if source is None else source
        held = make_image_source(d.eval_source) if d.eval_source.get("kind") else None
        fn = _image_item(int(d.crop), int(d.resize))
    else:
        source = np.load(d.features, mmap_mode="r")
        held = np.load(d.eval_features, mmap_mode="r") if d.get("eval_features") else None
        require(
            source.ndim == 3 and source.shape[-1] == int(config.model.input_dim),
            "data.features",
            f"{d.features} holds {source.shape}; expected (N, L, {config.model.input_dim}) tokens",
        )
        fn = _feature_item
    if held is None:
        require(
            0 < n_eval < len(source),
            "eval.num_images",
            f"{n_eval}: holding out from the {len(source)} training items needs 0 < num_images < {len(source)}",
        )
        train, held = (
            _Rows(source, range(len(source) - n_eval), fn),
            _Rows(source, range(len(source) - n_eval, len(source)), fn),
        )
    else:
        require(0 < n_eval <= len(held), "eval.num_images", f"{n_eval}: the held-out set has {len(held)} items")
        train, held = _Rows(source, range(len(source)), fn), _Rows(held, range(n_eval), fn)
    describe = getattr(source, "describe", None)
    info = describe() if callable(describe) else {"kind": d.kind, "items": len(source)}
    return train, held, {"source": info, "train_items": len(train), "eval_items": len(held)}


def train_batches(items: _Rows, config, local_batch: int, start_step: int):
    """This process's rows of global batches start_step, start_step + 1, ...: an endless per-epoch reshuffle."""
    ds = grain.MapDataset.source(items).seed(int(config.seed)).shuffle().repeat(None)
    ds = ds[jax.process_index() :: jax.process_count()].batch(local_batch, drop_remainder=True)
    workers = int(config.data.workers)
    return iter(
        ds[start_step:].to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(2, workers)))
    )


def eval_batches(items: _Rows, config, local_batch: int):
    ds = grain.MapDataset.source(items)[jax.process_index() :: jax.process_count()]
    return ds.batch(local_batch, drop_remainder=True)


# ================================================================================================================
# Models and steps
# ================================================================================================================
def semvae_config(config) -> sv.SemVAEConfig:
    return sv.SemVAEConfig.from_dict(config.model.to_dict())


def load_frozen_dino(config, mesh, rules):
    """(graphdef, sharded params) of the frozen DINOv2, or (None, None) for data.kind='features'."""
    if config.data.kind != "images":
        return None, None
    dc = config.dino
    if dc.checkpoint:
        from sfd_jax.convert.dinov2 import load_dinov2

        cfg, model = load_dinov2(dc.checkpoint, dtype=dc.dtype)
        log.info("DINOv2 loaded from %s (D=%d, %d layers)", dc.checkpoint, cfg.hidden_size, cfg.num_hidden_layers)
    else:
        cfg = Dinov2Config(**{**dc.config.to_dict(), "dtype": dc.dtype})
        model = None
        log.warning(
            "\n" + "!" * 100 + "\n!! DINOv2 IS RANDOMLY INITIALISED (config.dino.checkpoint is empty): "
            "its tokens are NOT DINOv2 features.\n!! Fine for smoke tests; for SFD set "
            "--config.dino.checkpoint=<save_pretrained directory>.\n" + "!" * 100
        )
    require(
        cfg.hidden_size == int(config.model.input_dim),
        "model.input_dim",
        f"{config.model.input_dim} != DINOv2 hidden_size {cfg.hidden_size}",
    )
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = parallel.state_shardings(abstract, mesh, rules)
    if model is not None:
        return graphdef, jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)
    # One compiled initialiser, each device materialising only its shard.
    init = jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(Dinov2(cfg, rngs=nnx.Rngs(int(config.seed) + 1)), nnx.Param)),
        out_shardings=shardings,
    )
    return graphdef, init()


# Runs in one process whose steps read the same settings (the tests, the demo's two SemVAEs) share the sharded-state
# recipe and the jitted steps; new jitted functions for each run would trace and compile them again. The frozen
# DINOv2 enters through its graph (architecture), not its weights, which are an argument of the steps.
_PROGRAM_FIELDS = ("model", "optim", "loss", "mesh", "data")
_PROGRAMS = ProgramCache(size=4)


def setup_and_steps(config, mesh, dino_graphdef, dino_params) -> tuple[TrainSetup, Any, Any]:
    """(TrainSetup, jitted train step, jitted eval step), reused for the same settings, mesh and DINOv2 graph."""
    dino_shardings = jax.tree.map(lambda x: x.sharding, dino_params) if dino_params is not None else None

    def build():
        cfg, tx = semvae_config(config), make_optimizer(config.optim)[0]
        rules = parallel.parse_rules(config.mesh.rules)
        setup = TrainSetup(lambda rngs: sv.SemVAE(cfg, rngs=rngs), tx, mesh, rules)
        return (setup, *make_steps(config, setup, dino_graphdef, mesh, dino_shardings))

    return _PROGRAMS.get(config_key(config, _PROGRAM_FIELDS, mesh=mesh, dino=str(dino_graphdef)), build)


def make_steps(config, setup: TrainSetup, dino_graphdef, mesh, dino_shardings):
    weights = sv.LossWeights(**{k: float(config.loss[k]) for k in ("mse", "l1", "cos", "kl")})
    cos_axis, decay = str(config.loss.cos_axis), float(config.optim.ema_decay)
    eval_key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x5E7A)

    def tokens_of(dino_params, batch):
        if dino_graphdef is None:
            return batch.astype(jnp.float32)
        dino = nnx.merge(dino_graphdef, dino_params)
        return jax.lax.stop_gradient(dino.patch_tokens(batch))

    def train_step(state: TrainState, dino_params, batch):
        tokens = tokens_of(dino_params, batch)
        key = jax.random.fold_in(state.rng, state.step)

        def objective(params):
            out = nnx.merge(setup.graphdef, params)(tokens, key)
            terms = sv.losses(out["recon"], tokens, out["mu"], out["logvar"], weights=weights, cos_axis=cos_axis)
            return terms["total"], terms

        (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        new_state, guard = guarded_update(state, setup.tx, grads, loss, decay)
        return new_state, {**terms, "grad_norm": guard["grad_norm"], "finite": guard["finite"]}

    def eval_step(params, dino_params, batch, index):
        """Sums over this batch of per-token squared error / cosine similarity, from a sample and from μ."""
        tokens = tokens_of(dino_params, batch)
        model = nnx.merge(setup.graphdef, params)
        mu, logvar = model.encode(tokens)
        z = sv.sample(mu, logvar, jax.random.fold_in(eval_key, index))
        out = {}
        for name, latent in (("", z), ("_mu", mu)):
            recon = model.decode(latent)
            out["mse" + name] = jnp.sum(jnp.mean((recon - tokens) ** 2, axis=-1))
            out["cos_sim" + name] = jnp.sum(sv.cosine_similarity(recon, tokens, axis=-1))
        return out, jnp.asarray(tokens.shape[0] * tokens.shape[1], jnp.float32)

    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    train = jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, dino_shardings, data),
        out_shardings=(setup.state_shardings, rep),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(eval_step, in_shardings=(setup.param_shardings, dino_shardings, data, rep), out_shardings=rep)
    return train, evaluate


# ================================================================================================================
# The run
# ================================================================================================================
def _line(values: dict) -> str:
    return (
        f"loss {values['total']:.5g} mse {values['mse']:.5g} cos {values['cos']:.5g} kl {values['kl']:.4g} | "
        f"lr {values['lr']:.3g}"
    )


def make_evaluate(config, mesh, eval_step, eval_items, dino_params):
    """evaluate(step, state) -> {'eval/mse', 'eval/cos_sim', ...}: per-token means over the held-out items."""
    eval_data = eval_batches(eval_items, config, config.eval.batch_size // jax.process_count())

    def evaluate(at: int, state) -> dict:
        totals, count = None, 0.0
        for i in range(len(eval_data)):
            batch = parallel.host_to_global({"x": eval_data[i]}, mesh)["x"]
            sums, n = eval_step(state.ema_params, dino_params, batch, i)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            count += float(n)
        return {f"eval/{k}": float(v) / count for k, v in parallel.global_to_host(totals).items()}

    return evaluate


def _save_config(config, workdir: str, cfg, data_info: dict, mesh, setup: TrainSetup) -> dict:
    """The run's description, written to `workdir/config.json` (by process 0) and saved with the checkpoints."""
    saved_config = {
        "config": json.loads(config.to_json_best_effort()),
        "model": cfg.to_dict(),
        "data": data_info,
        "mesh": dict(mesh.shape),
        "params": int(setup.num_params),
    }
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(saved_config, f, indent=2, default=str)
    return saved_config


def _data_fn(config, train_items):
    """The skeleton's make_data: this process's rows of each step's batch."""
    local_batch = config.train.batch_size // jax.process_count()

    def make_data(start_step: int, data_state: dict | None):
        del data_state  # the order depends on (seed, step) only
        return skeleton.StepIndexed(train_batches(train_items, config, local_batch, start_step), start_step)

    return make_data


def run(config: ml_collections.ConfigDict, workdir: str, source=None) -> dict:
    """Train (or resume) a SemVAE in `workdir`; returns {'step', 'start_step', 'train', 'eval', 'first_eval',
    'export', 'state', 'preempted'}: the final and the starting step (0, or the restored checkpoint's), the last
    logged train metrics, the last and the step-0 held-out metrics, the exported weights directory (None when
    preempted), the final state.

    `source` overrides `config.data.source` for data.kind='images' (len() and [i] -> (uint8 image, label)).
    """
    parallel.maybe_initialize_distributed(config.distributed)
    workdir = os.path.abspath(workdir)
    mesh = parallel.make_mesh(tuple(config.mesh.ici), tuple(config.mesh.dcn))
    validate(config, mesh)
    rules = parallel.parse_rules(config.mesh.rules)
    t = config.train
    train_items, eval_items, data_info = build_inputs(config, source)
    cfg = semvae_config(config)
    schedule = make_optimizer(config.optim)[1]
    dino_graphdef, dino_params = load_frozen_dino(config, mesh, rules)
    setup, train_step, eval_step = setup_and_steps(config, mesh, dino_graphdef, dino_params)
    saved_config = _save_config(config, workdir, cfg, data_info, mesh, setup)
    log.info(
        "SemVAE %.2fM params | mesh %s | batch %d | data %s",
        setup.num_params / 1e6,
        dict(mesh.shape),
        t.batch_size,
        data_info,
    )

    task = skeleton.Task(
        name="SemVAE",
        setup=setup,
        seed=int(config.seed),
        step=lambda state, batch: train_step(state, dino_params, parallel.host_to_global({"x": batch}, mesh)["x"]),
        make_data=_data_fn(config, train_items),
        saved_config=saved_config,
        global_batch=t.batch_size,
        lr=schedule,
        line=_line,
        evaluate=make_evaluate(config, mesh, eval_step, eval_items, dino_params),
        eval_at_start=True,
        device_count=mesh.size,
    )
    result = skeleton.run(task, config, workdir)
    export = None
    if not result.preempted:
        export = export_weights(
            setup, result.state, os.path.join(workdir, EXPORT_DIR), mesh, meta={"step": result.step}
        )
    return {
        "step": result.step,
        "start_step": result.start_step,
        "train": result.last_metrics,
        "eval": result.last_eval or result.first_eval,
        "first_eval": result.first_eval,
        "export": export,
        "state": result.state,
        "preempted": result.preempted,
    }


def export_weights(setup: TrainSetup, state: TrainState, directory: str, mesh, meta: dict) -> str:
    """The EMA weights (= the raw weights when ema_decay is 0) as a SemVAE weights directory."""
    from sfd_jax.convert.semvae import save_semvae

    gathered = jax.jit(lambda p: p, out_shardings=parallel.replicated(mesh))(state.ema_params)
    if jax.process_index() == 0:
        save_semvae(directory, setup.merge(parallel.global_to_host(gathered), {}), meta=meta)
        log.info("SemVAE weights written to %s (load with sfd_jax.convert.semvae.load_semvae)", directory)
    return directory
