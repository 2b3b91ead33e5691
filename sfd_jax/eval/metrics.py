"""ADM-evaluator metrics: FID, sFID, Inception Score, precision and recall (k = 3 manifolds).

Each function reproduces `openai/guided-diffusion` `evaluations/evaluator.py` (commit 22e0df8) on the same
features; `tests/test_metrics.py` checks them against numbers that evaluator computed (`adm_metrics.npz`).

- `statistics`: mu = float32 mean of float32 features (numpy pairwise summation), sigma = np.cov (float64, N − 1).
- `frechet_distance`: ‖mu1 − mu2‖² (in the dtype of the means: float32 for ADM statistics) + tr Σ1 + tr Σ2
  − 2 tr sqrt(Σ1 Σ2) in float64. ADM calls it as `sample.frechet_distance(reference)`: pass the sample first.
  The trace of the matrix square root comes from a symmetric eigen-decomposition by default (`sqrtm='eigh'`:
  tr sqrt(Σ1Σ2) = Σ sqrt(λ(A Σ2 A)), A = Σ1^½, negative round-off eigenvalues clipped), which is always finite;
  `sqrtm='scipy'` runs `scipy.linalg.sqrtm(Σ1 Σ2)` exactly as ADM does. The eps rule (`eps_rule`):
  'if_not_finite' (ADM) retries with (Σ1 + eps·I)(Σ2 + eps·I) inside the square root only when the first result
  is not finite; 'always' uses the regularised product directly. With singular covariances ADM's own result
  depends on its SciPy version: SciPy ≤ 1.11 returns NaN from the first sqrtm and ADM reports the eps value
  (= `eps_rule='always'`), SciPy 1.17 succeeds and ADM reports the plain value (= the default here). They differ
  by ~1e-3 on the golden singular case; pick 'always' to reproduce numbers made with an old SciPy.
- `inception_score`: float32 softmax probabilities, consecutive splits of `split_size` (5000; the last split is
  what remains), exp(mean KL(p(y|x) ‖ p(y))) per split, mean over splits — all in float32 like ADM.
- `precision_recall`: squared Euclidean distances (no square root) in float32, k = 3 radius = the 4th smallest
  distance of a point to its own set (itself at 0 included), membership inclusive (d ≤ r). ADM computes distances
  in float16 with a float32 fallback; float32 is exact wherever ADM's float16 is (integer-lattice features) and
  closer to exact elsewhere. Distances run on the default JAX device in row blocks (ADM: 10000).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

EPS_RULES = ("if_not_finite", "always")
SQRTM_METHODS = ("eigh", "scipy")


# --------------------------------------------------------------------------------------------------- statistics
def _features_2d(features, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows for a covariance, got {features.shape[0]}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {features.dtype}")
    return features


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features as ADM's `compute_statistics`: float32 mean, float64 covariance (ddof 1)."""
    features = _features_2d(features, "features")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


# -------------------------------------------------------------------------------------------------------- FID
def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    a = _sqrt_psd(sigma1)
    m = a @ sigma2 @ a
    lam = np.linalg.eigvalsh((m + m.T) * 0.5)
    return float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))


def _sqrtm_scipy(product: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # ADM passes disp=False (newer SciPy deprecates it); the plain call returns the same matrix.
        warnings.simplefilter("ignore")
        out = scipy.linalg.sqrtm(product)
    return out[0] if isinstance(out, tuple) else out


def _trace_sqrt_scipy(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    covmean = _sqrtm_scipy(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        return float("nan")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(Σ1 Σ2) has imaginary diagonal components up to "
                f"{np.max(np.abs(covmean.imag)):.3g} (ADM raises here too)"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def trace_sqrt_product(
    sigma1, sigma2, *, eps: float = 1e-6, eps_rule: str = "if_not_finite", sqrtm: str = "eigh"
) -> tuple[float, bool]:
    """(tr sqrt(Σ1 Σ2), whether eps·I was added to both covariances). See the module doc for the options."""
    if eps_rule not in EPS_RULES:
        raise ValueError(f"eps_rule must be one of {EPS_RULES}, got {eps_rule!r}")
    if sqrtm not in SQRTM_METHODS:
        raise ValueError(f"sqrtm must be one of {SQRTM_METHODS}, got {sqrtm!r}")
    trace_fn = _trace_sqrt_eigh if sqrtm == "eigh" else _trace_sqrt_scipy
    if eps_rule == "if_not_finite":
        value = trace_fn(sigma1, sigma2)
        if np.isfinite(value):
            return value, False
        warnings.warn(
            f"FID: sqrt(Σ1 Σ2) is not finite; adding {eps:g}·I to both covariances (as ADM does)", stacklevel=2
        )
    offset = np.eye(sigma1.shape[0], dtype=np.float64) * eps
    return trace_fn(sigma1 + offset, sigma2 + offset), True


def frechet_distance(
    mu1,
    sigma1,
    mu2,
    sigma2,
    *,
    eps: float = 1e-6,
    eps_rule: str = "if_not_finite",
    sqrtm: str = "eigh",
    return_eps_used: bool = False,
):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), ADM's formula; sample statistics first."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != mu1.shape:
        raise ValueError(
            f"mean vectors differ: mu1 {mu1.shape}, mu2 {mu2.shape} (features of different layers or resolutions?)"
        )
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} has shape {s.shape}, expected ({d}, {d}) to match the means")
    diff = mu1 - mu2
    tr_covmean, eps_used = trace_sqrt_product(sigma1, sigma2, eps=eps, eps_rule=eps_rule, sqrtm=sqrtm)
    fid = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return (fid, eps_used) if return_eps_used else fid


# ------------------------------------------------------------------------------------------- Inception Score
def softmax(logits) -> np.ndarray:
    """float32 softmax over the last axis (the probabilities ADM's graph computes from the no-bias logits)."""
    logits = np.asarray(logits, dtype=np.float32)
    e = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def inception_split_scores(probs, split_size: int = 5000) -> np.ndarray:
    """exp(mean_x KL(p(y|x) ‖ p(y))) for each consecutive split of `split_size` rows, float32 as ADM."""
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, classes), got shape {probs.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be ≥ 1, got {split_size}")
    if probs.dtype != np.float32:
        probs = probs.astype(np.float32)
    scores = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(0, len(probs), split_size):
            part = probs[i : i + split_size]
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
            scores.append(np.exp(np.mean(np.sum(kl, 1))))
    scores = np.asarray(scores)
    if not np.all(np.isfinite(scores)):
        warnings.warn(
            "Inception Score is not finite: some probability underflowed to 0 (0·log 0); ADM's "
            "float32 computation gives the same NaN",
            stacklevel=2,
        )
    return scores


def inception_score(probs, split_size: int = 5000) -> float:
    """ADM's Inception Score of float32 class probabilities (N, 1008), mean over splits of `split_size`."""
    return float(np.mean(inception_split_scores(probs, split_size)))


# ------------------------------------------------------------------------------------------ precision/recall
def _sq_distances(u, v):
    # ADM's DistanceBlock formula and order: max((‖u‖² − 2 u·v) + ‖v‖², 0).
    nu = jnp.sum(jnp.square(u), axis=1)[:, None]
    nv = jnp.sum(jnp.square(v), axis=1)[None, :]
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(nu - 2.0 * uv + nv, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_smallest_block(rows, features, k):
    neg_top, _ = jax.lax.top_k(-_sq_distances(rows, features), k + 1)
    return -neg_top[:, k]


@jax.jit
def _membership_block(rows, row_radii, cols, col_radii):
    d = _sq_distances(rows, cols)
    cols_in = jnp.any(d <= row_radii[:, None], axis=0)  # col j within some row's radius
    rows_in = jnp.any(d <= col_radii[None, :], axis=1)  # row i within some col's radius
    return rows_in, cols_in


def _row_blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(start + block, n)


def _pad_rows(x: np.ndarray, rows: int, value=0.0) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0],) + x.shape[1:], value, dtype=x.dtype)
    return np.concatenate([x, pad])


def manifold_radii(features, *, k: int = 3, row_block: int = 10000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point (ADM `ManifoldEstimator.manifold_radii`)."""
    features = np.asarray(_features_2d(features, "features"), dtype=np.float32)
    n = features.shape[0]
    if n < k + 1:
        raise ValueError(f"k = {k} manifold radii need at least {k + 1} feature rows, got {n}")
    block = min(row_block, n)
    all_dev = jnp.asarray(features)
    radii = np.empty(n, np.float32)
    for start, stop in _row_blocks(n, block):
        # Fixed block shape (last block padded) so the distance kernel compiles once per set size.
        rows = _pad_rows(features[start:stop], block)
        radii[start:stop] = np.asarray(_kth_smallest_block(jnp.asarray(rows), all_dev, k))[: stop - start]
    return radii


def manifold_membership(features_a, radii_a, features_b, radii_b, *, row_block: int = 10000):
    """(a_in_b, b_in_a): whether each point of a lies in some b-hypersphere, and vice versa (inclusive ≤)."""
    features_a = np.asarray(features_a, dtype=np.float32)
    features_b = jnp.asarray(np.asarray(features_b, dtype=np.float32))
    radii_a = np.asarray(radii_a, dtype=np.float32)
    radii_b = jnp.asarray(np.asarray(radii_b, dtype=np.float32))
    n = features_a.shape[0]
    block = min(row_block, n)
    a_in_b = np.zeros(n, bool)
    b_in_a = np.zeros(features_b.shape[0], bool)
    for start, stop in _row_blocks(n, block):
        rows = _pad_rows(features_a[start:stop], block)
        # Padded rows get radius −1 so they contain nothing (distances are ≥ 0).
        row_radii = _pad_rows(radii_a[start:stop], block, value=-1.0)
        rows_in, cols_in = _membership_block(jnp.asarray(rows), jnp.asarray(row_radii), features_b, radii_b)
        a_in_b[start:stop] = np.asarray(rows_in)[: stop - start]
        b_in_a |= np.asarray(cols_in)
    return a_in_b, b_in_a


def precision_recall(real_features, fake_features, *, k: int = 3, row_block: int = 10000) -> tuple[float, float]:
    """ADM's improved precision/recall: precision = fraction of fake points inside the real manifold, recall =
    fraction of real points inside the fake manifold; manifolds are unions of k-NN hyperspheres."""
    real = np.asarray(_features_2d(real_features, "real_features"), dtype=np.float32)
    fake = np.asarray(_features_2d(fake_features, "fake_features"), dtype=np.float32)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    radii_real = manifold_radii(real, k=k, row_block=row_block)
    radii_fake = manifold_radii(fake, k=k, row_block=row_block)
    real_in_fake, fake_in_real = manifold_membership(real, radii_real, fake, radii_fake, row_block=row_block)
    return float(np.mean(fake_in_real.astype(np.float64))), float(np.mean(real_in_fake.astype(np.float64)))
