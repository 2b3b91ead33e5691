"""The asynchronous schedule: τ → (t_tex, t_sem), training draws, phases and exact-grid phase decisions."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sfd_jax.diffusion import schedule


@pytest.fixture(scope="module")
def loss_npz(golden):
    return golden("loss.npz")


@pytest.fixture(scope="module")
def euler_npz(golden):
    return golden("euler.npz")


def test_times_from_tau_matches_reference(loss_npz):
    t_tex, t_sem = schedule.times_from_tau(loss_npz["tau"], 0.3)
    np.testing.assert_array_equal(np.asarray(t_tex), loss_npz["t_tex"])
    np.testing.assert_array_equal(np.asarray(t_sem), loss_npz["t_sem"])


def test_injected_float64_draw_reproduces_reference_t_exactly(loss_npz):
    # The reference draws n in float64 (scipy), takes the sigmoid in float64 and rounds to float32.
    t = schedule.sample_t(None, 4, "lognorm", n=loss_npz["n"])
    np.testing.assert_array_equal(np.asarray(t), loss_npz["t"])
    tau = schedule.sample_tau(None, 4, 0.3, "lognorm", n=loss_npz["n"])
    np.testing.assert_array_equal(np.asarray(tau), loss_npz["tau"])
    # A float32 (e.g. traced) draw goes through a float32 sigmoid: within one ulp.
    t32 = jax.jit(lambda n: schedule.sample_t(None, 4, "lognorm", n=n))(loss_npz["n"].astype(np.float32))
    np.testing.assert_allclose(np.asarray(t32), loss_npz["t"], rtol=0, atol=6e-8)


def test_euler_call_times_match_reference(euler_npz):
    grid = schedule.fixed_grid(12, 0.3)
    np.testing.assert_allclose(grid, euler_npz["grid"], rtol=0, atol=1.2e-7)  # ≤ 1 ulp from torch.linspace
    assert grid[-1] == np.float32(1.3)
    t_tex, t_sem = schedule.times_from_tau(jnp.asarray(grid[:-1]), 0.3)
    np.testing.assert_allclose(np.asarray(t_tex), euler_npz["eval_t_tex"], rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(np.asarray(t_sem), euler_npz["eval_t_sem"], rtol=0, atol=1.2e-7)


def test_grid_phase_masks_match_reference_steps(euler_npz):
    tex, sem = schedule.grid_phase_masks(12, 0.3)
    np.testing.assert_array_equal(np.stack([tex, sem], axis=1), euler_npz["step_moves_tex_sem"])


@pytest.mark.parametrize("num_points,tie_tex,tie_sem", [(14, 3, 10), (27, 6, 20)])
def test_grid_phase_decided_on_exact_grid_values(num_points, tie_tex, tie_sem):
    # On these grids τ_k = k·1.3/(N−1) hits 0.3 exactly at k = tie_tex and 1.0 exactly at k = tie_sem. The step
    # starting at 0.3 moves the texture (phase II); the one starting at 1.0 freezes the semantics (phase III).
    tex, sem = schedule.grid_phase_masks(num_points, 0.3)
    k = np.arange(num_points - 1)
    np.testing.assert_array_equal(tex, k >= tie_tex)
    np.testing.assert_array_equal(sem, k < tie_sem)


def test_grid_phase_decision_reads_delta_t_as_written():
    # 0.1 as a double is slightly above 1/10; τ_1 = 1.1/11 is exactly 0.1 and must count as phase II.
    tex, _ = schedule.grid_phase_masks(12, 0.1)
    assert tex[1] and not tex[0]


def test_phase_masks_at_switches_in_float32():
    dt = np.float32(0.3)
    just_below = np.nextafter(dt, np.float32(0))
    tau = jnp.asarray([0.0, just_below, dt, np.nextafter(np.float32(1), np.float32(0)), 1.0, 1.3], jnp.float32)
    tex, sem = schedule.phase_masks(tau, 0.3)
    np.testing.assert_array_equal(np.asarray(tex), [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(sem), [1, 1, 1, 1, 0, 0])


def test_phases_and_boundaries():
    ph = schedule.phases(0.3)
    assert [(p.start, p.end, p.tex_moves, p.sem_moves) for p in ph] == [
        (0.0, 0.3, False, True),
        (0.3, 1.0, True, True),
        (1.0, 1.3, True, False),
    ]
    assert schedule.phase_boundaries(0.3) == (0.3, 1.0)
    assert schedule.tau_end(0.3) == pytest.approx(1.3)


def test_delta_t_zero_is_synchronous():
    assert [(p.start, p.end, p.tex_moves, p.sem_moves) for p in schedule.phases(0.0)] == [(0.0, 1.0, True, True)]
    assert schedule.phase_boundaries(0.0) == ()
    tau = jnp.linspace(0.0, 1.0, 11)
    t_tex, t_sem = schedule.times_from_tau(tau, 0.0)
    np.testing.assert_array_equal(np.asarray(t_tex), np.asarray(tau))
    np.testing.assert_array_equal(np.asarray(t_sem), np.asarray(tau))
    tex, sem = schedule.phase_masks(tau, 0.0)
    assert np.all(np.asarray(tex) == 1) and np.all(np.asarray(sem) == 1)  # τ = 1 is the end, not phase III
    tex_g, sem_g = schedule.grid_phase_masks(11, 0.0)
    assert tex_g.all() and sem_g.all()


def test_training_draws():
    key = jax.random.key(0)
    n = 200_000
    tau = np.asarray(schedule.sample_tau(key, n, 0.3, "lognorm"))
    assert tau.dtype == np.float32 and tau.shape == (n,)
    assert tau.min() > 0 and tau.max() < 1.3
    logit = np.log(tau / 1.3) - np.log1p(-tau / 1.3)
    assert abs(logit.mean()) < 0.01 and abs(logit.std() - 1) < 0.01  # N(0, 1): standard errors 0.0022, 0.0016
    np.testing.assert_array_equal(tau, np.asarray(schedule.sample_tau(key, n, 0.3, "lognorm")))

    tau_u = np.asarray(schedule.sample_tau(jax.random.key(1), n, 0.3, "uniform"))
    assert tau_u.min() >= 0 and tau_u.max() < 1.3
    hist, _ = np.histogram(tau_u, bins=13, range=(0, 1.3))
    assert np.abs(hist / n - 1 / 13).max() < 0.003  # binomial standard error 0.0006
    np.testing.assert_array_equal(
        np.asarray(schedule.sample_tau(None, 3, 0.5, "uniform", n=np.array([0.0, 0.5, 0.9]))),
        np.float32([0.0, 0.5, 0.9]) * np.float32(1.5),
    )


def test_channel_mask_layout():
    m = schedule.channel_mask(jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 0.0]), 48, 16)
    assert m.shape == (2, 48)
    np.testing.assert_array_equal(np.asarray(m[0]), [0] * 32 + [1] * 16)
    np.testing.assert_array_equal(np.asarray(m[1]), [1] * 32 + [0] * 16)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_delta_t(bad):
    with pytest.raises(ValueError, match="delta_t"):
        schedule.times_from_tau(jnp.zeros(2), bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="time distribution"):
        schedule.sample_tau(jax.random.key(0), 4, 0.3, "beta")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        schedule.sample_tau(None, 4, 0.3, n=np.zeros(3))
    with pytest.raises(ValueError, match="grid points"):
        schedule.grid_phase_masks(1, 0.3)
    with pytest.raises(ValueError, match="semantic_chans"):
        schedule.channel_mask(1.0, 1.0, 16, 16)
