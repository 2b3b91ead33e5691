"""Preprocessing parity with the reference (tests/golden/eval/preprocess.npz, see tests/golden/README.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EVAL, assert_close, load_golden
from sfd_jax.data import preprocess as P

# max |Δ| ≤ REL · max |reference|. DINOv2 / SemVAE inputs (ImageNet-normalised, max ≈ 2.6-3): we measure ≤ 8.9e-7 of
# that scale; torch's own float32 resize rounds its source coordinates, which float64 coordinates miss by 6e-5.
REL = 4e-6
# torch's plain bicubic on a [-1, 1) image (outputs up to 1.3): measured ≤ 1.2e-6 of scale.
REL_BICUBIC = 5e-6


@pytest.fixture(scope="module")
def golden():
    return load_golden("preprocess.npz", EVAL)


def chw_to_hwc(x):
    return np.transpose(x, (1, 2, 0))


@pytest.mark.parametrize("i", range(4))
def test_adm_center_crop_is_bit_exact(golden, i):
    out = P.adm_center_crop(golden[f"in_{i}"], 256)
    assert out.dtype == np.uint8 and out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out, golden[f"adm_{i}"])


@pytest.mark.parametrize("i", range(4))
def test_dino_transform_matches_torch(golden, i):
    out = P.dino_transform(golden[f"adm_{i}"], 224)
    assert out.dtype == np.float32 and out.shape == (224, 224, 3)
    assert_close(out, chw_to_hwc(golden[f"dino_{i}"]), REL)


def test_batched_jax_dino_path_matches_torch(golden):
    batch = np.stack([P.to_unit_range(golden[f"adm_{i}"]) for i in range(4)])
    out = np.asarray(jax.jit(P.dino_from_unit_range)(jnp.asarray(batch)))
    want = np.stack([chw_to_hwc(golden[f"dino_{i}"]) for i in range(4)])
    assert_close(out, want, REL)


@pytest.mark.parametrize("i", range(4))
def test_semvae_train_transform(golden, i):
    out = P.semvae_train_transform(golden[f"in_{i}"])
    assert out.shape == (224, 224, 3)
    assert_close(out, chw_to_hwc(golden[f"semvae_{i}"]), REL)


@pytest.mark.parametrize("key,size", [("bicubic_up", 56), ("bicubic_down", 20)])
def test_torch_bicubic_numpy_and_jax(golden, key, size):
    x = chw_to_hwc(golden["bicubic_in"])
    want = chw_to_hwc(golden[key])
    assert_close(P.torch_bicubic_resize_np(x, (size, size)), want, REL_BICUBIC)
    got = jax.jit(P.torch_bicubic_resize, static_argnums=1)(jnp.asarray(x)[None], (size, size))[0]
    assert_close(got, want, REL_BICUBIC)


def test_bicubic_matrix_properties():
    m = P.torch_bicubic_matrix(256, 224)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)  # the cubic weights are a partition of unity
    # Same size: torch's plain bicubic is the identity (t = 0 gives weights (0, 1, 0, 0)).
    np.testing.assert_array_equal(P.torch_bicubic_matrix(7, 7), np.eye(7))


def test_float64_coordinates_would_fail_the_golden(golden):
    # Guards the float32-coordinate detail the README calls out: with float64 source coordinates the 256 -> 224
    # resize differs by ~6e-5 from torch, so a tolerance of 1e-5 does detect the difference.
    x = P.imagenet_normalize((P.to_unit_range(golden["adm_0"]) + 1) / 2).astype(np.float64)
    scale = 256 / 224
    src = scale * (np.arange(224) + 0.5) - 0.5
    base = np.floor(src)
    t = src - base
    a = -0.75
    w = np.stack(
        [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) ** 2 + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ],
        -1,
    )
    taps = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0, 255)
    m = np.zeros((224, 256))
    np.add.at(m, (np.repeat(np.arange(224), 4), taps.ravel()), w.ravel())
    out64 = np.einsum("pw,owc->opc", m, np.einsum("oh,hwc->owc", m, x))
    assert np.abs(out64 - chw_to_hwc(golden["dino_0"])).max() > 1e-5


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="uint8"):
        P.adm_center_crop(np.zeros((300, 300, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        P.dino_transform(np.zeros((256, 256), np.uint8))
    with pytest.raises(ValueError, match="smaller than the crop"):
        P.semvae_train_transform(np.zeros((100, 100, 3), np.uint8), resize=200, crop=224)
