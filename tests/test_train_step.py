"""What the train steps do with their configured numbers, each against an independent NumPy computation: the EMA
formula, warm-up and gradient clipping as applied by the optimizers, the label-dropout null id, the texture-only
ablation's step, and the SemVAE loss weights. Also how the trainers build their programs: the initialisers' compile
level keeps the usual bits, and a program is reused only for the settings it was built from."""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import sfd_jax  # noqa: F401
from conftest import REPO
from sfd_jax import parallel
from sfd_jax.diffusion import losses
from sfd_jax.models import semvae as sv
from sfd_jax.programs import ProgramCache
from sfd_jax.train import build as build_lib
from sfd_jax.train import semvae as semvae_trainer
from sfd_jax.train.state import TrainState, make_optimizer
from sfd_jax.train.step import _all_finite, guarded_update


def sfd_config(**diffusion):
    spec = importlib.util.spec_from_file_location("sfd_config", REPO / "configs" / "sfd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.train.batch_size = 8
    c.model.update(input_size=4, repa_dim=16)  # 16 tokens, small REPA target: a quick compile
    c.diffusion.update(diffusion)
    return c


def batch_for(run, seed=0):
    cfg, rng = run.model_cfg, np.random.default_rng(seed)
    b, s = int(run.config.train.batch_size), cfg.input_size
    return {
        "x1": rng.standard_normal((b, s, s, 48)).astype(np.float32),
        "y": rng.integers(0, cfg.num_classes, b).astype(np.int32),
        "dino": rng.standard_normal((b, s * s, cfg.repa_dim)).astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------------- EMA
def test_ema_formula_and_nonfinite_guard():
    p, e, g = np.array([1.0, -2.0, 3.0]), np.array([0.5, 0.5, 0.5]), np.array([0.2, -0.4, 1.0])
    state = TrainState(
        params={"w": jnp.asarray(p, jnp.float32)},
        ema_params={"w": jnp.asarray(e, jnp.float32)},
        opt_state=optax.sgd(0.5).init({"w": jnp.zeros(3)}),
        step=jnp.int32(4),
        rng=jnp.zeros(2),
    )
    new, info = guarded_update(state, optax.sgd(0.5), {"w": jnp.asarray(g, jnp.float32)}, jnp.float32(1.0), 0.9)
    p_new = p - 0.5 * g
    np.testing.assert_allclose(np.asarray(new.params["w"]), p_new, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.ema_params["w"]), 0.9 * e + 0.1 * p_new, rtol=1e-6)
    assert int(new.step) == 5 and bool(info["finite"])
    skipped, info = guarded_update(state, optax.sgd(0.5), {"w": jnp.asarray(g, jnp.float32)}, jnp.float32(np.nan), 0.9)
    np.testing.assert_array_equal(np.asarray(skipped.ema_params["w"]), np.float32(e))
    assert not bool(info["finite"]) and int(skipped.step) == 5


def _with_one_bad_element(state, bad, every_position=True):
    """(leaf index, position, `state` with that one element of that float leaf set to `bad`) for every float leaf
    and every position in it (or only its first)."""
    leaves, treedef = jax.tree.flatten(state)
    for i, x in enumerate(leaves):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            for position in range(x.size if every_position else min(x.size, 1)):
                broken = list(leaves)
                broken[i] = x.ravel().at[position].set(bad).reshape(x.shape)
                yield i, position, jax.tree.unflatten(treedef, broken)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_guard_sees_every_element_of_every_state_leaf(bad):
    """The guard's one reduction per parameter (parameter, EMA and Adam moments summed as x * 0) flags a single
    non-finite element in any float leaf: params, EMA, mu, nu, also a bfloat16 parameter, compiled by XLA."""
    params = {"a": jnp.ones((3, 2)), "b": {"c": jnp.full(4, 0.5, jnp.bfloat16), "d": jnp.zeros(())}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = (params, jax.tree.map(lambda x: x * 2, params), tx.init(params))
    check = jax.jit(_all_finite)
    assert bool(check(*state))
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    assert len(floats) == 12  # 3 parameters x (value, EMA, mu, nu)
    for i, position, broken in _with_one_bad_element(state, bad):
        assert not bool(check(*broken)), (i, position)


def test_nonfinite_guard_with_factored_moments():
    """Adafactor's moments have the parameters' tree but other shapes (rows, columns): checked, not broadcast."""
    params = {"a": jnp.ones((6, 4)), "b": jnp.ones((3,))}
    state = (params, params, optax.adafactor(1e-3, min_dim_size_to_factor=2).init(params))
    check = jax.jit(_all_finite)
    assert bool(check(*state))
    for i, _, broken in _with_one_bad_element(state, np.inf, every_position=False):
        assert not bool(check(*broken)), i


# ----------------------------------------------------------------------------------- warm-up and clipping
def numpy_adamw(grads, p, lrs, *, b1, b2, eps, wd, clip):
    """AdamW (decoupled weight decay, bias-corrected moments) after global-norm clipping, in float64."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        norm = np.linalg.norm(g)
        if clip > 0 and norm > clip:
            g = g * clip / norm
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p)
    return p


def adam_tol(lrs):
    """Each update moves a weight by at most ~lr; float32 bias corrections (1 − b2^t, b2 near 1) carry ~1e-4 relative
    error, so the float32 optimizer agrees with float64 to 1e-4 of the summed learning rates."""
    return 1e-4 * float(np.sum(lrs))


# Gradient norms on both sides of the clip, so clipping changes Adam's ratios (a constant rescale would not).
GRADS = [np.array([3.0, -1.0, 0.5, 2.0]) * s for s in (1.0, 0.05, 2.0, 0.1, 0.7, 0.3)]


def run_optimizer(tx, p0):
    params, opt_state = {"w": jnp.asarray(p0, jnp.float32)}, None
    opt_state = tx.init(params)
    for g in GRADS:
        updates, opt_state = tx.update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["w"], np.float64)


def test_dit_and_texture_vae_optimizer_applies_configured_warmup_and_clip():
    o = ml_collections.ConfigDict(
        dict(lr=0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, warmup_steps=4, grad_clip=0.8)
    )
    tx, schedule = make_optimizer(o, 100)
    lrs = [0.1 * min(t, 4) / 4 for t in range(len(GRADS))]  # linear from 0; update t uses lr(t)
    np.testing.assert_allclose([float(schedule(t)) for t in range(len(GRADS))], lrs, rtol=1e-6)
    p0 = np.array([0.3, -0.2, 1.0, 0.0])
    want = numpy_adamw(GRADS, p0, lrs, b1=0.9, b2=0.99, eps=1e-8, wd=0.01, clip=0.8)
    np.testing.assert_allclose(run_optimizer(tx, p0), want, rtol=0, atol=adam_tol(lrs))
    unclipped = numpy_adamw(GRADS, p0, lrs, b1=0.9, b2=0.99, eps=1e-8, wd=0.01, clip=0.0)
    assert np.abs(unclipped - want).max() > 10 * adam_tol(lrs)  # so the clip is visible at this tolerance


def test_semvae_optimizer_applies_configured_warmup_and_clip():
    o = ml_collections.ConfigDict(
        dict(
            lr=0.05,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            warmup_steps=3,
            warmup_init=0.1,
            decay_start=100,
            decay_end=200,
            final_scale=0.1,
            grad_clip=1.5,
        )
    )
    tx, _ = semvae_trainer.make_optimizer(o)
    lrs = [0.05 * (0.1 + 0.9 * min(t, 3) / 3) for t in range(len(GRADS))]
    p0 = np.array([0.3, -0.2, 1.0, 0.0])
    want = numpy_adamw(GRADS, p0, lrs, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, clip=1.5)
    np.testing.assert_allclose(run_optimizer(tx, p0), want, rtol=0, atol=adam_tol(lrs))
    unclipped = numpy_adamw(GRADS, p0, lrs, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, clip=0.0)
    assert np.abs(unclipped - want).max() > 10 * adam_tol(lrs)


# ------------------------------------------------------------------------------ label dropout, null id
def test_label_dropout_replaces_labels_by_the_null_class(monkeypatch):
    """The step replaces dropped labels by `null_class` and nothing else; the trainer passes the model's own
    num_classes (the label table's extra row) and the configured rate."""
    from flax import nnx
    from sfd_jax.train.state import TrainSetup
    from sfd_jax.train.step import make_train_step

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.ones((3,)))

    def recorder(model_fn, x1, y, dino, key, cfg):
        return jnp.zeros((), jnp.float32), {"y": y.astype(jnp.float32)}

    mesh = parallel.make_mesh((-1, 1, 1))
    setup = TrainSetup(Tiny, optax.sgd(0.1), mesh, {})
    state, aux = setup.init(0)
    y0 = np.arange(8, dtype=np.int32)
    batch = {"x1": np.zeros((8, 1, 1, 48), np.float32), "y": y0, "dino": np.zeros((8, 1, 1), np.float32)}
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, recorder, None, label_dropout=0.5, null_class=77))
    y = np.asarray(step(state, aux, batch)[1]["y"]).astype(np.int64)
    dropped = y != y0
    assert dropped.any() and not dropped.all(), y  # this seed drops some labels and keeps others
    np.testing.assert_array_equal(y[dropped], 77)

    seen = {}
    real = build_lib.make_train_step
    monkeypatch.setattr(build_lib, "make_train_step", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    monkeypatch.setattr(build_lib, "_BUILD_CACHE", ProgramCache(size=4))
    config = sfd_config()
    config.optim.label_dropout = 0.25
    run = build_lib.build(config)  # builds the recipe only: nothing is initialised or compiled
    assert seen["null_class"] == run.model_cfg.num_classes == 1000 and seen["label_dropout"] == 0.25


# ------------------------------------------------------------------------------- ablate_no_semantic
def test_ablate_no_semantic_step_trains_on_the_texture_channels(monkeypatch):
    """The texture-only ablation (semantic_chans 0, Δt 0): one real step's loss equals the SFD loss of the initial
    model on channels [0:32] of the batch, and the EMA moves by the configured decay."""
    monkeypatch.setattr(build_lib, "_BUILD_CACHE", ProgramCache(size=4))
    config = sfd_config(semantic_chans=0, delta_t=0.0)
    config.optim.label_dropout = 0.0
    run = build_lib.build(config)
    assert run.model_cfg.in_channels == 32 and run.loss_cfg.semantic_chans == 0
    state, aux = run.setup.init(0)
    batch = batch_for(run, seed=1)
    params0 = parallel.global_to_host(state.params)
    key = jax.random.fold_in(state.rng, state.step)
    _, loss_key = jax.random.split(key)
    model = run.setup.merge(params0, parallel.global_to_host(aux))
    model_fn = lambda x, t_tex, t_sem, y: model(x, t_tex, t_sem, y, train=True)  # noqa: E731
    want, _ = jax.jit(lambda x1, y, dino, k: losses.sfd_loss(model_fn, x1, y, dino, k, run.loss_cfg))(
        batch["x1"][..., :32], batch["y"], batch["dino"], loss_key
    )
    new, metrics = run.train_step(state, aux, parallel.host_to_global(batch, run.mesh))
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)
    decay = float(config.optim.ema_decay)
    new_params, new_ema = parallel.global_to_host(new.params), parallel.global_to_host(new.ema_params)
    for a, b, p in zip(jax.tree.leaves(new_ema), jax.tree.leaves(params0), jax.tree.leaves(new_params)):
        np.testing.assert_allclose(a, decay * b + (1 - decay) * p, rtol=0, atol=1e-6 * max(1.0, np.abs(b).max()))


# ----------------------------------------------------------------------------------- SemVAE loss weights
def test_semvae_loss_weights_other_than_the_defaults():
    rng = np.random.default_rng(0)
    recon, tokens = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    mu, logvar = rng.standard_normal((2, 5, 3)), 0.5 * rng.standard_normal((2, 5, 3))
    w = sv.LossWeights(mse=0.7, l1=0.3, cos=0.5, kl=0.01)
    terms = sv.losses(*(jnp.asarray(a, jnp.float32) for a in (recon, tokens, mu, logvar)), weights=w)
    err = recon - tokens
    # the default cos_axis='token': cosine over the token axis of (B, L, C), as the released SemVAE was trained
    cos = np.sum(recon * tokens, 1) / (np.linalg.norm(recon, axis=1) * np.linalg.norm(tokens, axis=1))
    want = {
        "mse": np.mean(err**2),
        "l1": np.mean(np.abs(err)),
        "cos": 1 - np.mean(cos),
        "kl": np.mean(0.5 * np.sum(mu**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2))),
    }
    for k, v in want.items():
        assert float(terms[k]) == pytest.approx(v, rel=1e-5), k
    total = 0.7 * want["mse"] + 0.3 * want["l1"] + 0.5 * want["cos"] + 0.01 * want["kl"]
    assert float(terms["total"]) == pytest.approx(total, rel=1e-5)
    assert abs(0.01 * want["kl"]) > 1e-3 * total  # the KL term is visible at that tolerance


# ------------------------------------------------------------------------------------------------ initialisers
def _setups():
    """The DiT's (FSDP over 8 devices), the SemVAE's and the texture VAE's TrainSetup, tiny configs."""
    from sfd_jax.config_loader import load_config
    from sfd_jax.models.lightningdit import LightningDiT
    from sfd_jax.train import texture_vae as texture_vae_trainer
    from sfd_jax.train.state import TrainSetup

    c = sfd_config()
    dit_cfg = build_lib.model_config(c)
    mesh = parallel.make_mesh((1, -1, 1))
    tx = make_optimizer(c.optim, 10)[0]
    yield TrainSetup(lambda rngs: LightningDiT(dit_cfg, rngs=rngs), tx, mesh, parallel.parse_rules(c.mesh.rules))
    s = load_config(str(REPO / "configs" / "semvae.py:tiny"))
    semvae_cfg = semvae_trainer.semvae_config(s)
    tx = semvae_trainer.make_optimizer(s.optim)[0]
    yield TrainSetup(lambda rngs: sv.SemVAE(semvae_cfg, rngs=rngs), tx, mesh, parallel.parse_rules(s.mesh.rules))
    t = load_config(str(REPO / "configs" / "texture_vae.py:tiny"))
    yield texture_vae_trainer._setup(t, texture_vae_trainer._mesh(t))


def test_initialisers_compiled_for_one_run_give_the_usual_bits():
    """TrainSetup compiles its initialisers at a lower CPU optimisation level (compile time is all they cost). The
    weights, EMA copy, optimizer state and buffers must be the bits of the normally compiled program, or a run's
    initial weights would depend on how its initialiser was compiled. The usual program is compiled at XLA's default
    level (3) by name, since the suite itself compiles at level 1 (conftest)."""
    key = jax.random.PRNGKey(3)
    for setup in _setups():  # (state, aux): the buffers init_aux computes are checked here too
        init = setup._init_jit
        assert init.options == setup._init_aux_jit.options == {"xla_backend_optimization_level": 1}
        usual_program = init.jitted.lower(key).compile(compiler_options={"xla_backend_optimization_level": 3})
        fast, usual = jax.tree.leaves_with_path(init(key)), jax.tree.leaves(usual_program(key))
        assert len(fast) == len(usual)
        for (path, a), b in zip(fast, usual):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_texture_vae_and_semvae_reuse_programs_only_for_the_same_step_settings():
    """A second run in the process with the same step settings gets the same compiled programs (no new trace or
    compile); a run whose step reads another value (KL weight, EMA decay, the DINOv2's architecture) gets new ones,
    and one that differs only in host-side settings (steps, logging) shares them."""
    from sfd_jax.config_loader import load_config
    from sfd_jax.models.dinov2 import Dinov2, Dinov2Config
    from flax import nnx
    from sfd_jax.train import texture_vae as tv

    def texture(**changes):
        c = load_config(str(REPO / "configs" / "texture_vae.py:tiny"))
        for path, value in changes.items():
            block, field = path.split(".")
            c[block][field] = value
        return tv._setup_and_programs(c, tv._mesh(c))

    base = texture()
    assert texture() is base and texture(**{"train.num_steps": 3, "train.log_every": 1}) is base
    assert texture(**{"loss.kl_weight": 1e-3}) is not base and texture(**{"optim.ema_decay": 0.5}) is not base

    def semvae(layer_norm_eps=1e-6, **changes):
        c = load_config(str(REPO / "configs" / "semvae.py:tiny"))
        for path, value in changes.items():
            block, field = path.split(".")
            c[block][field] = value
        dc = Dinov2Config(**{**c.dino.config.to_dict(), "layer_norm_eps": layer_norm_eps})
        graphdef = nnx.split(nnx.eval_shape(lambda: Dinov2(dc, rngs=nnx.Rngs(0))), nnx.Param)[0]
        return semvae_trainer.setup_and_steps(c, parallel.make_mesh(tuple(c.mesh.ici)), graphdef, None)

    base = semvae()
    assert semvae() is base and semvae(**{"train.num_steps": 3}) is base
    assert semvae(**{"loss.kl": 0.5}) is not base and semvae(layer_norm_eps=1e-5) is not base


def test_runs_that_differ_only_in_their_seed_share_programs_not_weights():
    """The seed is an argument of the initialiser, not part of the setup: an ablation's seeds reuse one setup and one
    compiled step, and each seed still starts from its own weights and training key (the skeleton passes
    config.seed)."""
    first, second = sfd_config(), sfd_config()
    second.seed = 1
    a, b = build_lib.build(first), build_lib.build(second)
    assert b.setup is a.setup and b.train_step is a.train_step
    s0, s1 = (jax.device_get(a.setup.init(seed)[0]) for seed in (0, 1))
    assert not np.array_equal(s0.rng, s1.rng)
    random_leaves = [(x, y) for x, y in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)) if np.ptp(x) > 0]
    assert random_leaves and all(not np.array_equal(x, y) for x, y in random_leaves)  # constant-initialised stay
    again = jax.device_get(a.setup.init(1)[0])
    for x, y in zip(jax.tree.leaves(s1), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y)
