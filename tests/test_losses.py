"""SFD objective against the reference's loss.npz, plus REPA variants, Δt = 0, uniform t and edge cases."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import assert_close
from sfd_jax.convert.dit import load_dit
from sfd_jax.diffusion import losses

# Golden forwards are compared as max |Δ| ≤ REL · max |reference|: the reference itself moves by ≤ 5.7e-7 of that scale
# between thread counts and eager/compiled runs (tests/golden/README.md); we measure ≤ 4.7e-7.
REL = 2e-6


def nhwc(a):
    return np.moveaxis(a, -3, -1)


@pytest.fixture(scope="module")
def ref(golden):
    return golden("loss.npz")


@pytest.fixture(scope="module")
def model(golden):
    d = golden("dit.npz")
    _, m = load_dit({k[3:]: v for k, v in d.items() if k.startswith("sd/")})
    return m


@pytest.fixture(scope="module")
def batch(ref):
    dino = np.transpose(ref["dino_feats"].reshape(4, 768, 256), (0, 2, 1))  # b c h w -> b (h w) c, still fp16
    return dict(x1=nhwc(ref["x1"]), x0=nhwc(ref["x0"]), y=ref["y"], dino=dino)


@pytest.fixture(scope="module")
def model_fn(model):
    fwd = jax.jit(lambda x, t_tex, t_sem, y: model(x, t_tex, t_sem, y, train=True))
    return fwd


@pytest.fixture(scope="module")
def projector_out(model_fn, ref, batch):
    """The model's (prediction, REPA projection) at the reference's (x_t, t_tex, t_sem)."""
    pred, proj = model_fn(nhwc(ref["xt"]), ref["t_tex"], ref["t_sem"], ref["y"])
    return np.asarray(pred), np.asarray(proj, np.float64)


def test_pure_terms_from_reference_prediction(ref, batch):
    xt = losses.interpolate(batch["x0"], batch["x1"], ref["t_tex"], ref["t_sem"], 16)
    assert_close(np.asarray(xt), nhwc(ref["xt"]), REL)
    u = losses.velocity_target(batch["x0"], batch["x1"])
    pred = nhwc(ref["pred"])
    assert_close(np.asarray(losses.mse_loss(pred, u, 16, 2.0)), ref["loss_mse"], REL)
    assert_close(np.asarray(losses.cosine_loss(pred, u)), ref["loss_cos"], REL)


def test_sfd_loss_reproduces_reference(model_fn, ref, batch):
    cfg = losses.LossConfig()
    terms = losses.sfd_loss_per_sample(
        model_fn, batch["x1"], batch["y"], batch["dino"], cfg, x0=batch["x0"], tau=ref["tau"]
    )
    assert_close(np.asarray(terms["xt"]), nhwc(ref["xt"]), REL)
    assert_close(np.asarray(terms["pred"]), nhwc(ref["pred"]), REL)
    for k in ("loss_mse", "loss_cos", "loss_repa"):
        assert_close(np.asarray(terms[k]), ref[k], REL, err_msg=k)

    # The full objective, with both draws injected (x0, and n as the reference's float64 normal draw).
    loss, metrics = losses.sfd_loss(
        model_fn, batch["x1"], batch["y"], batch["dino"], None, cfg, x0=batch["x0"], n=ref["n"]
    )
    assert_close(loss, ref["total"], REL)
    for k in ("loss_mse", "loss_cos", "loss_repa"):
        assert_close(metrics[k], ref[k].mean(), REL, err_msg=k)
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def _numpy_repa(proj, dino, mode, weight):
    """float64 reference formulas (README: loss.npz, variants)."""
    dino = dino.astype(np.float64)
    cos = np.sum(proj * dino, -1) / (
        np.maximum(np.linalg.norm(proj, axis=-1), 1e-8) * np.maximum(np.linalg.norm(dino, axis=-1), 1e-8)
    )
    cos_term = np.mean(1 - cos, axis=-1)
    mse_term = np.mean((proj - dino) ** 2, axis=(1, 2))
    return weight * {"cos": cos_term, "mse": mse_term, "cos_mse": (cos_term + mse_term) / 2}[mode]


def test_numpy_repa_reference_agrees_with_golden(projector_out, ref, batch):
    assert_close(_numpy_repa(projector_out[1], batch["dino"], "cos", 1.0), ref["loss_repa"], REL)


@pytest.mark.parametrize("mode,weight", [("mse", 1.0), ("cos_mse", 0.5)])
def test_repa_variants_against_numpy(model_fn, projector_out, ref, batch, mode, weight):
    cfg = losses.LossConfig(repa_mode=mode, repa_weight=weight)
    terms = losses.sfd_loss_per_sample(
        model_fn, batch["x1"], batch["y"], batch["dino"], cfg, x0=batch["x0"], tau=ref["tau"]
    )
    expected = _numpy_repa(projector_out[1], batch["dino"], mode, weight)
    assert_close(terms["loss_repa"], expected, REL)
    loss, metrics = losses.sfd_loss(
        model_fn, batch["x1"], batch["y"], batch["dino"], None, cfg, x0=batch["x0"], n=ref["n"]
    )
    total = ref["loss_mse"].mean() + ref["loss_cos"].mean() + expected.mean()
    assert_close(loss, total, REL)
    assert_close(metrics["loss_repa"], expected.mean(), REL)


def test_cosine_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 7)).astype(np.float32)
    b = rng.normal(size=(5, 7)).astype(np.float32)
    a[1] = 0.0  # zero vector
    a[2] = [1e-5] + [0.0] * 6  # below-eps product of norms but each norm above eps
    b[2] = a[2]
    expected = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(losses.cosine_similarity(a, b)), expected, rtol=1e-6, atol=1e-7)


def test_gradient_finite_at_zero_prediction(batch):
    # A freshly initialised DiT predicts exactly 0 (zero final layer); the cosine loss must not give NaN there.
    cfg = losses.LossConfig(repa_weight=0.0)

    def loss_of(scale):
        fn = lambda x, t_tex, t_sem, y: scale * x
        return losses.sfd_loss(fn, batch["x1"], batch["y"], None, jax.random.key(0), cfg)[0]

    g = jax.jit(jax.grad(loss_of))(0.0)
    assert np.isfinite(float(g))


def test_weights_switches(batch, ref):
    """repa_weight 0 and use_cosine_loss False drop their terms from the total."""
    pred = jnp.asarray(nhwc(ref["pred"]))
    fn = lambda x, t_tex, t_sem, y: pred
    cfg = losses.LossConfig(repa_weight=0.0)
    loss, metrics = losses.sfd_loss(fn, batch["x1"], batch["y"], None, None, cfg, x0=batch["x0"], n=ref["n"])
    assert "loss_repa" not in metrics
    assert_close(loss, ref["loss_mse"].mean() + ref["loss_cos"].mean(), REL)
    cfg = losses.LossConfig(repa_weight=0.0, use_cosine_loss=False)
    loss, _ = losses.sfd_loss(fn, batch["x1"], batch["y"], None, None, cfg, x0=batch["x0"], n=ref["n"])
    assert_close(loss, ref["loss_mse"].mean(), REL)


def test_delta_t_zero_and_uniform_time(batch):
    seen = {}

    def fn(x, t_tex, t_sem, y):
        seen.update(t_tex=t_tex, t_sem=t_sem, x=x)
        return jnp.zeros_like(x)

    u = np.array([0.1, 0.4, 0.7, 0.95])
    cfg = losses.LossConfig(delta_t=0.0, time_dist="uniform", repa_weight=0.0)
    losses.sfd_loss(fn, batch["x1"], batch["y"], None, None, cfg, x0=batch["x0"], n=u)
    # Synchronous: both parts share t = τ = u, and x_t is the plain linear interpolant.
    np.testing.assert_array_equal(np.asarray(seen["t_tex"]), np.float32(u))
    np.testing.assert_array_equal(np.asarray(seen["t_sem"]), np.float32(u))
    t = np.float32(u)[:, None, None, None]
    assert_close(seen["x"], t * batch["x1"] + (1 - t) * batch["x0"], 2 * np.finfo(np.float32).eps)  # same formula

    cfg = losses.LossConfig(delta_t=0.3, time_dist="uniform", repa_weight=0.0)
    losses.sfd_loss(fn, batch["x1"], batch["y"], None, None, cfg, x0=batch["x0"], n=u)
    tau = np.float32(u) * np.float32(1.3)
    np.testing.assert_array_equal(np.asarray(seen["t_tex"]), np.maximum(tau - np.float32(0.3), 0))
    np.testing.assert_array_equal(np.asarray(seen["t_sem"]), np.minimum(tau, 1))


def test_random_draws_come_from_the_key(batch):
    cfg = losses.LossConfig(repa_weight=0.0)
    fn = lambda x, t_tex, t_sem, y: 0.5 * x
    f = jax.jit(lambda key: losses.sfd_loss(fn, batch["x1"], batch["y"], None, key, cfg)[0])
    a, b, c = f(jax.random.key(3)), f(jax.random.key(3)), f(jax.random.key(4))
    assert float(a) == float(b) and float(a) != float(c)


def test_bad_inputs(batch, ref):
    fn = lambda x, t_tex, t_sem, y: (x, jnp.zeros((4, 256, 768)))
    with pytest.raises(ValueError, match="repa_mode"):
        losses.LossConfig(repa_mode="l1")
    with pytest.raises(ValueError, match="time_dist"):
        losses.LossConfig(time_dist="beta")
    with pytest.raises(ValueError, match=r"\(4, 256, 768\).*\(4, 255, 768\)"):
        losses.sfd_loss(
            fn, batch["x1"], batch["y"], batch["dino"][:, :255], None, losses.LossConfig(), x0=batch["x0"], n=ref["n"]
        )
    with pytest.raises(ValueError, match="dino targets are required"):
        losses.sfd_loss(fn, batch["x1"], batch["y"], None, jax.random.key(0), losses.LossConfig())
    with pytest.raises(ValueError, match="channels-last"):
        losses.sfd_loss(fn, batch["x1"][0], batch["y"], batch["dino"], jax.random.key(0), losses.LossConfig())


def test_texture_only_latent(batch, ref):
    """semantic_chans = 0 (the no-semantic-latent baseline): plain MSE over all channels, no semantic metric."""
    x1, x0 = batch["x1"][..., :32], batch["x0"][..., :32]
    pred = jnp.asarray(nhwc(ref["pred"])[..., :32])
    cfg = losses.LossConfig(delta_t=0.0, semantic_chans=0, repa_weight=0.0)
    loss, metrics = losses.sfd_loss(lambda *a: pred, x1, batch["y"], None, None, cfg, x0=x0, n=ref["n"])
    assert "mse_sem" not in metrics
    np.testing.assert_allclose(float(metrics["loss_mse"]), np.mean((np.asarray(pred) - (x1 - x0)) ** 2), rtol=1e-6)
