"""Checkpoints: restore onto other meshes and device counts, corrupt-latest fallback, retention, EMA export."""

import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.checkpoint import CORRUPT_DIR, Checkpoints, NoReadableCheckpoint, read_config_json, restore_weights
from sfd_jax.train.export import export_ema
from sfd_jax.train.state import TrainState


def toy_state(mesh, seed=0):
    """A TrainState-shaped pytree whose matrices are sharded over fsdp (and tensor when present)."""
    rng = np.random.default_rng(seed)
    w = NamedSharding(mesh, P("fsdp", "tensor"))
    rep = NamedSharding(mesh, P())
    params = {
        "blocks": {
            0: {"kernel": rng.standard_normal((8, 16), np.float32)},
            1: {"kernel": rng.standard_normal((8, 16), np.float32)},
        },
        "bias": rng.standard_normal((5,), np.float32),
    }
    shard = {"blocks": {0: {"kernel": w}, 1: {"kernel": w}}, "bias": rep}
    put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, s), t, shard)  # noqa: E731
    state = TrainState(
        params=put(params),
        ema_params=put(jax.tree.map(lambda x: 0.5 * x, params)),
        opt_state=(jax.device_put(jnp.int32(3), rep), put(jax.tree.map(np.square, params))),
        step=jax.device_put(jnp.int32(7), rep),
        rng=jax.device_put(jax.random.PRNGKey(seed), rep),
    )
    return state


def abstract_like(state, mesh):
    """The same tree with every sharding re-made on `mesh` (same specs)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec)), state
    )


def test_restore_onto_other_mesh_shapes_and_device_counts(tmp_path):
    source = toy_state(parallel.make_mesh((2, 4, 1)))
    ckpt = Checkpoints(tmp_path, keep_last=2)
    ckpt.save(7, source, {"source": "synthetic", "step": 7}, {"config": {"seed": 0}}, wait=True)
    expected = jax.device_get(source)
    for ici, devices in (((1, 2, 4), jax.devices()), ((1, 4, 1), jax.devices()[:4]), ((1, 1, 1), jax.devices()[:1])):
        mesh = parallel.make_mesh(ici, devices=devices)
        step, state, data_state, config = ckpt.restore_latest(abstract_like(source, mesh))
        assert step == 7 and data_state == {"source": "synthetic", "step": 7} and config == {"config": {"seed": 0}}
        chex.assert_trees_all_equal(jax.device_get(state), expected)
        kernel = state.params["blocks"][0]["kernel"]
        assert kernel.sharding.mesh.devices.size == len(devices)
        assert kernel.addressable_shards[0].data.shape == (8 // mesh.shape["fsdp"], 16 // mesh.shape["tensor"])
    ckpt.close()
    assert read_config_json(tmp_path) == {"config": {"seed": 0}}


def _corrupt(step_dir):
    """Cuts every file of the saved train state to half its length (a partial copy / disk fault)."""
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def _checkpoints_1_and_2(tmp_path, mesh):
    """Steps 1 and 2 of toy_state (seed = step), data state {'step': step}, saved and closed."""
    ckpt = Checkpoints(tmp_path, keep_last=3)
    for step in (1, 2):
        ckpt.save(step, toy_state(mesh, seed=step), {"step": step}, {}, wait=True)
    ckpt.close()


def test_corrupt_latest_falls_back_to_previous_with_a_warning(tmp_path, caplog):
    mesh = parallel.make_mesh((1, 8, 1))
    _checkpoints_1_and_2(tmp_path, mesh)
    _corrupt(tmp_path / "checkpoints" / "2")

    ckpt = Checkpoints(tmp_path, keep_last=3)
    with caplog.at_level(logging.WARNING, logger="sfd_jax.checkpoint"):
        step, state, data_state, _ = ckpt.restore_latest(abstract_like(toy_state(mesh), mesh))
    assert step == 1 and data_state == {"step": 1}
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(toy_state(mesh, seed=1)))
    bad = str(tmp_path / "checkpoints" / "2")
    assert any(bad in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    # moved aside, so training can write step 2 again
    assert ckpt.all_steps() == [1]
    assert len(os.listdir(tmp_path / CORRUPT_DIR)) == 1
    ckpt.save(2, toy_state(mesh, seed=3), {"step": 2}, {}, wait=True)
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_no_readable_checkpoint_raises_instead_of_restarting(tmp_path):
    mesh = parallel.make_mesh((1, 8, 1))
    ckpt = Checkpoints(tmp_path, keep_last=3)
    ckpt.save(1, toy_state(mesh), {}, {}, wait=True)
    ckpt.close()
    _corrupt(tmp_path / "checkpoints" / "1")
    ckpt = Checkpoints(tmp_path, keep_last=3)
    with pytest.raises(RuntimeError, match=r"no readable checkpoint .* newest \(1\) failed"):
        ckpt.restore_latest(abstract_like(toy_state(mesh), mesh))
    assert ckpt.all_steps() == [1]  # nothing is moved when nothing could be read
    ckpt.close()


def test_restore_weights_reads_one_part_onto_a_mesh_and_leaves_unreadable_ones_in_place(tmp_path, caplog):
    """What a loader of a run's model uses: one field of the state, without the optimizer's tree to restore into."""
    mesh = parallel.make_mesh((1, 8, 1))
    _checkpoints_1_and_2(tmp_path, mesh)
    other = parallel.make_mesh((1, 2, 4))
    expected = jax.device_get(toy_state(mesh, seed=2))
    step, ema = restore_weights(tmp_path, abstract_like(toy_state(mesh).ema_params, other))
    assert step == 2
    chex.assert_trees_all_equal(jax.device_get(ema), expected.ema_params)
    assert ema["blocks"][0]["kernel"].sharding.mesh.shape == other.shape
    step, params = restore_weights(tmp_path, abstract_like(toy_state(mesh).params, other), step=1, part="params")
    assert step == 1
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(toy_state(mesh, seed=1)).params)

    _corrupt(tmp_path / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="sfd_jax.checkpoint"):
        step, ema = restore_weights(tmp_path, abstract_like(toy_state(mesh).ema_params, mesh))
    assert step == 1 and any("unreadable" in r.getMessage() for r in caplog.records)
    chex.assert_trees_all_equal(jax.device_get(ema), jax.device_get(toy_state(mesh, seed=1)).ema_params)
    assert Checkpoints(tmp_path).all_steps() == [1, 2] and not (tmp_path / CORRUPT_DIR).exists()
    with pytest.raises(ValueError):  # the step asked for is unreadable (its metadata is cut): no fallback to another
        restore_weights(tmp_path, abstract_like(toy_state(mesh).ema_params, mesh), step=2)
    _corrupt(tmp_path / "checkpoints" / "1")
    with pytest.raises(NoReadableCheckpoint, match=r"tried steps \[2, 1\]"):
        restore_weights(tmp_path, abstract_like(toy_state(mesh).ema_params, mesh))
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5"):
        restore_weights(tmp_path, abstract_like(toy_state(mesh).ema_params, mesh), step=5)


def test_keeps_last_n_plus_every_kth(tmp_path):
    mesh = parallel.make_mesh((1, 8, 1))
    state = toy_state(mesh)
    ckpt = Checkpoints(tmp_path, keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 11):
        ckpt.save(step, state, {}, {})
    ckpt.close()
    assert Checkpoints(tmp_path).all_steps() == [4, 8, 9, 10]
    assert Checkpoints(tmp_path).latest_step() == 10


def test_empty_workdir_restores_nothing(tmp_path):
    mesh = parallel.make_mesh((1, 8, 1))
    ckpt = Checkpoints(tmp_path)
    assert ckpt.restore_latest(abstract_like(toy_state(mesh), mesh)) is None
    ckpt.close()


def test_ema_export_round_trips_through_restore_dit(tmp_path):
    from sfd_jax.convert.dit import restore_dit
    from sfd_jax.models.lightningdit import DiTConfig, LightningDiT

    cfg = DiTConfig.from_size("tiny")
    model = LightningDiT(cfg, rngs=nnx.Rngs(3))
    export_ema(tmp_path / "ema", cfg, model, meta={"step": 5})
    cfg2, restored = restore_dit(tmp_path / "ema")
    assert cfg2 == cfg
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(restored, nnx.Param))
    )
