"""ADM evaluator metrics vs numbers its own code produced (tests/golden/eval/adm_metrics.npz, see
tests/golden/README.md), and an end-to-end `--mode=evaluate` run (reference batch built by the same code, JSON
written)."""

import json

import numpy as np
import pytest

import jax

from conftest import EVAL, assert_close, load_golden

from sfd_jax.config_loader import load_config
from sfd_jax.eval import metrics
from sfd_jax.eval.features import FolderImages, NpzImages, open_images


@pytest.fixture(scope="module")
def adm():
    return load_golden("adm_metrics.npz", EVAL)


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


# ----------------------------------------------------------------------------------------------- FID and sFID
def assert_statistics_close(mu, sigma, mu_ref, sigma_ref, n):
    """mu: one float32 rounding of its largest element. sigma: the worst-case rounding of an n-term float64 dot
    product, n·eps64, relative to the largest |element| (other BLAS kernels and thread counts sum in other orders:
    an element near 1e-5 moves by ~1e-16, which an elementwise rtol cannot allow but this does)."""
    assert_close(mu, mu_ref, np.finfo(np.float32).eps, err_msg="mu")
    assert_close(sigma, sigma_ref, n * np.finfo(np.float64).eps, err_msg="sigma")


@pytest.mark.parametrize(
    "feats,mu,sigma",
    [
        ("pool_ref", "mu_ref", "sigma_ref"),
        ("pool_sample", "mu_sample", "sigma_sample"),
        ("sing_ref", "mu_sing_ref", "sigma_sing_ref"),
    ],
)
def test_statistics(adm, feats, mu, sigma):
    got_mu, got_sigma = metrics.statistics(adm[feats])
    assert got_mu.dtype == np.float32 and got_sigma.dtype == np.float64
    assert_statistics_close(got_mu, got_sigma, adm[mu], adm[sigma], len(adm[feats]))


def test_spatial_statistics_use_hwc_flattening(adm):
    n = adm["spatial_ref"].shape[0]
    mu_s, sigma_s = metrics.statistics(adm["spatial_ref"].reshape(n, -1))
    assert_statistics_close(mu_s, sigma_s, adm["mu_s_ref"], adm["sigma_s_ref"], n)


@pytest.mark.parametrize("sqrtm", ["eigh", "scipy"])
def test_fid_and_sfid(adm, sqrtm):
    fid, eps_used = metrics.frechet_distance(
        adm["mu_sample"], adm["sigma_sample"], adm["mu_ref"], adm["sigma_ref"], sqrtm=sqrtm, return_eps_used=True
    )
    assert not eps_used and rel(fid, adm["fid"]) <= 1e-5
    sfid = metrics.frechet_distance(
        adm["mu_s_sample"], adm["sigma_s_sample"], adm["mu_s_ref"], adm["sigma_s_ref"], sqrtm=sqrtm
    )
    assert rel(sfid, adm["sfid"]) <= 1e-5


def _singular(adm, **kw):
    return metrics.frechet_distance(
        adm["mu_sing_sample"],
        adm["sigma_sing_sample"],
        adm["mu_sing_ref"],
        adm["sigma_sing_ref"],
        return_eps_used=True,
        **kw,
    )


def test_fid_singular_eps_rules(adm):
    # Stable route: the first square root is finite, so ADM's rule adds no eps (= ADM under SciPy 1.17).
    fid, eps_used = _singular(adm, sqrtm="eigh")
    assert not eps_used and rel(fid, adm["fid_singular_noeps"]) <= 1e-5
    # 'always' = ADM under SciPy 1.11, whose first sqrtm was NaN: sqrtm((Σs + εI)(Σr + εI)).
    for sqrtm in ("eigh", "scipy"):
        fid, eps_used = _singular(adm, sqrtm=sqrtm, eps_rule="always")
        assert eps_used and rel(fid, adm["fid_singular"]) <= 1e-5
    # The two golden values differ by more than the tolerance, so the rule is really tested.
    assert rel(adm["fid_singular"], adm["fid_singular_noeps"]) > 1e-4


def test_fid_singular_scipy_follows_adm_rule(adm):
    # With the installed SciPy the ADM rule gives whichever value its first sqrtm leads to.
    fid, eps_used = _singular(adm, sqrtm="scipy")
    assert rel(fid, adm["fid_singular"] if eps_used else adm["fid_singular_noeps"]) <= 1e-5


def test_fid_eps_fallback_when_first_sqrtm_is_not_finite(adm, monkeypatch):
    """Emulate old SciPy (first sqrtm NaN): the ADM rule must retry with eps and reproduce `fid_singular`."""
    real, calls = metrics._sqrtm_scipy, []

    def first_nan(product):
        calls.append(1)
        return np.full_like(product, np.nan) if len(calls) == 1 else real(product)

    monkeypatch.setattr(metrics, "_sqrtm_scipy", first_nan)
    with pytest.warns(UserWarning, match="not finite"):
        fid, eps_used = _singular(adm, sqrtm="scipy")
    assert eps_used and len(calls) == 2 and rel(fid, adm["fid_singular"]) <= 1e-5


def test_fid_rejects_mismatched_statistics(adm):
    with pytest.raises(ValueError, match="mean vectors differ"):
        metrics.frechet_distance(adm["mu_ref"], adm["sigma_ref"], adm["mu_s_ref"], adm["sigma_s_ref"])
    with pytest.raises(ValueError, match="eps_rule"):
        metrics.frechet_distance(adm["mu_ref"], adm["sigma_ref"], adm["mu_ref"], adm["sigma_ref"], eps_rule="x")


# ---------------------------------------------------------------------------------------------- Inception Score
def test_inception_score(adm):
    logits = adm["is_logits_a"] @ adm["is_logits_b"]  # exact in float32 (README)
    np.testing.assert_array_equal(logits[:16], adm["is_logits_head"])
    probs = metrics.softmax(logits)
    np.testing.assert_allclose(probs[:16], adm["is_probs_head"], rtol=1e-6, atol=0)
    splits = metrics.inception_split_scores(probs, split_size=5000)
    assert splits.shape == (2,)  # 6000 rows: 5000 + 1000
    np.testing.assert_allclose(splits, adm["is_split_scores"], rtol=1e-5)
    assert rel(metrics.inception_score(probs), adm["inception_score"]) <= 1e-5


# ------------------------------------------------------------------------------------------- precision / recall
@pytest.mark.parametrize("row_block", [10000, 384])  # one block as ADM at this size; several with padding
def test_precision_recall_lattice_is_exact(adm, row_block):
    np.testing.assert_array_equal(metrics.manifold_radii(adm["pool_ref"], row_block=row_block), adm["radii_ref"])
    np.testing.assert_array_equal(metrics.manifold_radii(adm["pool_sample"], row_block=row_block), adm["radii_sample"])
    precision, recall = metrics.precision_recall(adm["pool_ref"], adm["pool_sample"], row_block=row_block)
    assert (precision, recall) == (float(adm["precision"]), float(adm["recall"]))


def test_precision_recall_big_features_is_exact(adm):
    np.testing.assert_array_equal(metrics.manifold_radii(adm["big_ref"]), adm["radii_big_ref"])
    assert metrics.precision_recall(adm["big_ref"], adm["big_sample"]) == (
        float(adm["precision_big"]),
        float(adm["recall_big"]),
    )


def test_precision_recall_continuous_features(adm):
    # float32 distances vs ADM's exact-distance numbers: within the README's ±0.002 implementation band.
    radii = metrics.manifold_radii(adm["cont_ref"])
    assert np.max(np.abs(radii - adm["radii_cont_ref_exact"]) / adm["radii_cont_ref_exact"]) <= 1e-5
    precision, recall = metrics.precision_recall(adm["cont_ref"], adm["cont_sample"])
    assert abs(precision - adm["precision_cont_exact"]) <= 0.002
    assert abs(recall - adm["recall_cont_exact"]) <= 0.002


def test_precision_recall_needs_k_plus_one_points():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="at least 4"):
        metrics.precision_recall(x, np.ones((5, 4), np.float32))


# --------------------------------------------------------------------------------------- --mode=evaluate, e2e
def _load_eval_config(variant: str):
    return load_config(f"configs/eval.py:{variant}")


def _images(rng, n, size=32):
    # Smooth colour fields plus noise: gives the network varied, image-like input.
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * (
        0.5 + 0.5 * np.sin(2 * np.pi * (xx[None, ..., None] * rng.uniform(0.5, 3, (n, 1, 1, 3))))
    )
    return np.clip(base + rng.normal(0, 20, (n, size, size, 3)) + 40 * yy[None, ..., None], 0, 255).astype(np.uint8)


def _near_ties(points, manifold, k=3, rel=1e-3) -> int:
    """How many `points` lie within `rel` (relative, in squared distance) of the k-NN radius of some manifold point:
    the only points whose membership float rounding can change."""
    points, manifold = np.asarray(points, np.float64), np.asarray(manifold, np.float64)
    within = ((manifold[:, None] - manifold[None]) ** 2).sum(-1)
    radii = np.sort(within, axis=1)[:, k]  # column 0 is the point itself
    d2 = ((points[:, None] - manifold[None]) ** 2).sum(-1)
    return int(np.any(np.abs(d2 - radii) <= rel * radii, axis=1).sum())


def test_evaluate_mode_end_to_end(tmp_path, inception_net_weights):
    from sfd_jax.convert.inception import load_inception
    from sfd_jax.main import resolve_mode
    from sfd_jax.models.inception import features_from_uint8

    rng = np.random.default_rng(7)
    weights = tmp_path / "pt_inception_random.npz"  # the "user-provided" weights file
    np.savez(weights, **inception_net_weights)
    ref_images, sample_images = _images(rng, 12), _images(rng, 10)
    np.savez(tmp_path / "ref_images.npz", arr_0=ref_images)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images)
    run = resolve_mode("evaluate")
    # input_size 75 (the smallest the network takes) keeps this CPU run small; the 299 path is tested against
    # the golden vectors in test_inception.py. Batch 8 over 8 devices: both sets need a padded last batch.
    common = dict(inception_weights=str(weights), batch_size=8, input_size=75)

    cfg = _load_eval_config("build_reference")
    cfg.eval.update(images=str(tmp_path / "ref_images.npz"), reference_keep=10, **common)
    built = run(cfg, str(tmp_path / "ref"))
    ref_path = tmp_path / "ref" / "reference_batch.npz"
    assert built["num_images"] == 12 and built["num_kept"] == 10 and ref_path.exists()

    cfg = _load_eval_config("score")
    cfg.eval.update(samples=str(tmp_path / "samples.npz"), ref_batch=str(ref_path), **common)
    result = run(cfg, str(tmp_path / "eval"))
    with open(tmp_path / "eval" / "score.json") as f:
        written = json.load(f)
    assert written == pytest.approx(result)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(written[key]), key
    assert written["num_samples"] == 10 and written["num_reference_images"] == 10

    # Independent recomputation: the unsharded, unpadded network on the raw arrays, then the metrics.
    model = load_inception(weights)
    forward = jax.jit(lambda x: features_from_uint8(model, x, resize="tf1", size=75))
    both = jax.device_get(forward(np.concatenate([ref_images, sample_images])))  # one program for both sets
    ref_direct = {k: v[: len(ref_images)] for k, v in both.items()}
    sample_direct = {k: v[len(ref_images) :] for k, v in both.items()}
    with np.load(ref_path) as z:
        ref = {k: z[k] for k in z.files}
    kept = np.sort(np.random.default_rng(0).choice(12, size=10, replace=False))
    np.testing.assert_array_equal(ref["arr_0"], ref_images[kept])
    for name, feats in (("", ref_direct["pool3"]), ("_s", ref_direct["spatial"])):
        mu, sigma = metrics.statistics(feats)
        np.testing.assert_allclose(ref["mu" + name], mu, rtol=1e-5, atol=1e-5 * np.abs(mu).max())
        np.testing.assert_allclose(ref["sigma" + name], sigma, rtol=1e-4, atol=1e-5 * np.abs(sigma).max())
    mu, sigma = metrics.statistics(sample_direct["pool3"])
    assert rel(written["fid"], metrics.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])) <= 1e-4
    mu_s, sigma_s = metrics.statistics(sample_direct["spatial"])
    assert rel(written["sfid"], metrics.frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"])) <= 1e-4
    probs = metrics.softmax(sample_direct["logits_nobias"])
    assert rel(written["inception_score"], metrics.inception_score(probs)) <= 1e-5
    # Two programs (sharded + padded vs plain) give features that differ by float rounding, so a point lying on a
    # k-NN radius can change sides. Each such near-tie (found in float64 here) may move the score by 1/n, no more.
    ref_kept = ref_direct["pool3"][kept]
    precision, recall = metrics.precision_recall(ref_kept, sample_direct["pool3"])
    fake_ties, real_ties = _near_ties(sample_direct["pool3"], ref_kept), _near_ties(ref_kept, sample_direct["pool3"])
    print(
        f"\nprecision {written['precision']} vs {precision} ({fake_ties} near-ties), "
        f"recall {written['recall']} vs {recall} ({real_ties} near-ties)"
    )
    assert abs(written["precision"] - precision) <= fake_ties / len(sample_images) + 1e-12
    assert abs(written["recall"] - recall) <= real_ties / len(ref_kept) + 1e-12
    assert not written["fid_eps_used"]


def test_image_sources_agree(tmp_path):
    from PIL import Image

    images = np.random.default_rng(1).integers(0, 256, (5, 9, 7, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "x.npz", arr_0=images)
    folder = tmp_path / "png"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    npz, pngs = open_images(str(tmp_path / "x.npz")), open_images(str(folder))
    assert isinstance(npz, NpzImages) and isinstance(pngs, FolderImages)
    assert npz.num_images == pngs.num_images == 5 and npz.image_shape == pngs.image_shape == (9, 7, 3)
    # Out-of-order reads re-open the compressed member; forward reads continue the stream.
    for lo, hi in ((2, 4), (0, 1), (1, 5), (4, 9)):
        np.testing.assert_array_equal(npz.read(lo, hi), images[lo:hi])
        np.testing.assert_array_equal(pngs.read(lo, hi), images[lo:hi])
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_images(str(tmp_path / "bad.npz"))
    with pytest.raises(KeyError, match="arr_0"):
        open_images(str(tmp_path / "bad.npz"), key="arr_0x")


def test_evaluate_mode_names_missing_inputs(tmp_path):
    from sfd_jax.eval.evaluate import run

    cfg = _load_eval_config("score")
    with pytest.raises(ValueError, match="config.eval.inception_weights is required"):
        run(cfg, str(tmp_path))
    cfg.eval.inception_weights = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="config.eval.inception_weights"):
        run(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="not a variant"):
        _load_eval_config("fid50k")
