"""The SemVAE trainer optimises the configured weighted sum of its loss terms (config.loss.mse/l1/cos/kl)."""

import jax
import numpy as np
import pytest

from configs.semvae import get_config
from sfd_jax import parallel
from sfd_jax.train import semvae as trainer

# Far from the defaults (1, 0, 1, 1e-7), so a trainer that ignored any one of them would log another total.
WEIGHTS = dict(mse=0.7, l1=0.3, cos=1.9, kl=0.05)


def _one_step(workdir, **weights):
    config = get_config("tiny")
    config.loss.update(weights)
    config.train.update(num_steps=1, log_every=1, ckpt_every=1000)
    config.eval.every = 0
    out = trainer.run(config, str(workdir))
    return out["train"], parallel.global_to_host(out["state"].params)


@pytest.fixture(scope="module")
def weighted(tmp_path_factory):
    return _one_step(tmp_path_factory.mktemp("weighted"), **WEIGHTS)


def test_total_is_the_configured_weighted_sum(weighted):
    metrics, _ = weighted
    terms = {k: float(metrics[k]) for k in WEIGHTS}
    assert all(v > 0 for v in terms.values()), terms  # every term contributes, KL included
    want = sum(WEIGHTS[k] * terms[k] for k in WEIGHTS)
    # fp32 sum of four products: a few ulps of the total
    assert float(metrics["total"]) == pytest.approx(want, rel=1e-6), (metrics, want)


def test_kl_weight_changes_the_update(weighted, tmp_path):
    metrics, params = weighted
    other_metrics, other_params = _one_step(tmp_path, **dict(WEIGHTS, kl=0.0))
    # the same first batch, so every term but the total is the same before the update
    for k in WEIGHTS:
        assert float(other_metrics[k]) == pytest.approx(float(metrics[k]), rel=1e-6), k
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(other_params), jax.tree.leaves(params)))
    # Adam's first step moves every parameter by ±lr (m/√v is the gradient's sign), so a parameter whose gradient
    # the KL term flips moves 2·lr apart (measured: 6.0e-5 at lr 3e-5); equal updates would differ by ~1e-9
    assert diff > float(metrics["lr"]), (diff, metrics["lr"])
