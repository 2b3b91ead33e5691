"""The train state: a plain pytree, created already sharded.

`TrainState(params, ema_params, opt_state, step, rng)`:
- params / ema_params: pure dicts (`nnx.to_pure_dict`) of the model's `nnx.Param` leaves, float32;
- opt_state: the optax state for params;
- step: int32 scalar, the number of updates applied so far -- the next batch is batch number `step`;
- rng: uint32[2] base key; the step's randomness is `fold_in(rng, step)`, so it depends on (seed, step) only.

Anything that is not an `nnx.Param` (fixed buffers a model may keep) lives in `aux`, a separate pure dict
recomputed from the config at start-up and never checkpointed.

`TrainSetup` builds the optimizer, the shardings of every leaf (from the logical names the model's Params carry
and `mesh.rules`) and the abstract state; `init` runs the model's initialisers inside
`jax.jit(..., out_shardings=...)`, so each device materialises only its own shard and no host ever holds the
full state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sfd_jax import parallel


class TrainState(NamedTuple):
    params: Any
    ema_params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def make_optimizer(optim, num_steps: int) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """AdamW from `config.optim`; returns (tx, lr schedule).

    Defaults follow the reference: lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, no warmup, no clipping.
    `warmup_steps > 0` ramps the lr linearly from 0; `grad_clip > 0` clips the global gradient norm first.
    """
    lr = float(optim.lr)
    warmup = int(optim.get("warmup_steps", 0))
    if warmup > 0:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    else:
        schedule = optax.constant_schedule(lr)
    tx = optax.adamw(
        schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps), weight_decay=float(optim.weight_decay)
    )
    clip = float(optim.get("grad_clip", 0.0))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    del num_steps  # the constant/warmup schedules do not depend on it; kept for schedules that decay
    return tx, schedule


def _split(model: nnx.Module):
    graphdef, params, aux = nnx.split(model, nnx.Param, ...)
    return graphdef, params, aux


class _Initialiser:
    """A jitted initialiser, compiled at LLVM optimisation level 1 on the CPU.

    It runs once per process, so compile time is all that XLA's default level (3) could cost or save here: the
    texture VAE's on 8 devices compiled in 2.9 s at level 1 and 7.6 s at the default. Level 1 gave the default's bits
    for the DiT, the SemVAE and the texture VAE (tests/test_train_step.py compares the two programs on every run of
    the suite); level 0 did not (it moved some DiT weights by 2 ULP). Other platforms compile as usual.
    """

    CPU_OPTIONS = {"xla_backend_optimization_level": 1}

    def __init__(self, jitted, platform: str):
        self.jitted = jitted
        self.options = self.CPU_OPTIONS if platform == "cpu" else None
        self._compiled = None

    def __call__(self, key):
        if self._compiled is None:
            self._compiled = self.jitted.lower(key).compile(compiler_options=self.options)
        return self._compiled(key)


@dataclasses.dataclass
class TrainSetup:
    """Everything static about one training run on one mesh.

    model_factory(rngs) -> nnx.Module builds the model (called abstractly for shapes and names, and inside jit
    for the real initialisation).
    """

    model_factory: Callable[[nnx.Rngs], nnx.Module]
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    rules: dict

    def __post_init__(self):
        abstract_model = nnx.eval_shape(lambda: self.model_factory(nnx.Rngs(0)))
        self.graphdef, abs_params, abs_aux = _split(abstract_model)
        self.param_shardings = parallel.state_shardings(abs_params, self.mesh, self.rules)
        self.aux_shardings = parallel.state_shardings(abs_aux, self.mesh, self.rules)
        abstract_state, abstract_aux = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        rep = parallel.replicated(self.mesh)
        self.state_shardings = TrainState(
            params=self.param_shardings,
            ema_params=self.param_shardings,
            opt_state=parallel.shardings_like(
                abstract_state.opt_state, abstract_state.params, self.param_shardings, self.mesh
            ),
            step=rep,
            rng=rep,
        )
        attach = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
        self.abstract_state = jax.tree.map(attach, abstract_state, self.state_shardings)
        self.abstract_aux = jax.tree.map(attach, abstract_aux, self.aux_shardings)
        self.num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
        # Compiled once, on first use, so that repeated init/restore calls in one process reuse the program.
        platform = self.mesh.devices.flat[0].platform
        init = jax.jit(self._init, out_shardings=(self.state_shardings, self.aux_shardings))
        init_aux = jax.jit(lambda k: self._init(k)[1], out_shardings=self.aux_shardings)
        self._init_jit, self._init_aux_jit = _Initialiser(init, platform), _Initialiser(init_aux, platform)

    def _init(self, key):
        init_key, train_key = jax.random.split(key)
        _, params, aux = _split(self.model_factory(nnx.Rngs(init_key)))
        params = nnx.to_pure_dict(params)
        # EMA starts as an exact copy of the initial weights, as in the reference (update_ema with decay 0).
        ema = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        state = TrainState(
            params=params, ema_params=ema, opt_state=self.tx.init(params), step=jnp.zeros((), jnp.int32), rng=train_key
        )
        return state, nnx.to_pure_dict(aux)

    # The seed is an argument, not part of the setup: runs that differ only in their seed (an ablation's seeds, a
    # test's runs) share one setup and its compiled programs.
    def init(self, seed: int) -> tuple[TrainState, dict]:
        """Fresh (state, aux) of run seed `seed`, created shard by shard on the devices."""
        return self._init_jit(jax.random.PRNGKey(seed))

    def init_aux(self, seed: int) -> dict:
        """Only the non-Param buffers (for a restore); XLA drops the unused weight initialisers. A model without
        buffers (the texture VAE) gets its empty tree without compiling an initialiser just to drop its output."""
        if not jax.tree.leaves(self.abstract_aux):
            return self.abstract_aux
        return self._init_aux_jit(jax.random.PRNGKey(seed))

    def merge(self, params, aux) -> nnx.Module:
        """A model holding `params` (e.g. the EMA weights) for evaluation or export."""
        return nnx.merge(self.graphdef, params, aux)
