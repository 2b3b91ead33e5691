"""The stored semantic latents are the SemVAE posterior samples of the stored DINOv2 tokens, for both views.

The extraction samples z = μ + σ·ε, (μ, log σ²) = semvae.encode(tokens), with ε drawn from
key(seed, index, flip, SEMANTIC) (sfd_jax/data/encoders.py). Features are stored as float32 here, so the test feeds
the SemVAE the very tokens the extraction fed it; the results then differ only as two XLA programs of the same fp32
function do (a per-device batch of 1 inside the extraction's jit vs one eager batch here: other reduction orders
over the width-32 features and the 64 tokens of the attention), a few ulps of the latents' scale. With the default
float16 storage the tokens would be rounded by up to 2^-11 of their size before this comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import assert_close
from sfd_jax.data import records
from sfd_jax.data.encoders import SEMANTIC, Encoders
from sfd_jax.data.extract import ExtractOptions, extract
from sfd_jax.data.sources import ImageFolderSource
from sfd_jax.models.dinov2 import Dinov2
from sfd_jax.models.semvae import SemVAE
from sfd_jax.models.texture_vae import TextureVAE
from test_extract import DINO_CFG, OPTS, SEM_CFG, TEX_CFG, numpy_init

NUM_IMAGES = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for k in range(NUM_IMAGES):
        (root / f"c{k % 2}").mkdir(exist_ok=True)
        image = rng.integers(0, 256, (36 + k, 34, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / f"c{k % 2}" / f"{k}.png")
    encoders = Encoders(
        numpy_init(lambda: TextureVAE(TEX_CFG, rngs=nnx.Rngs(0)), 0),
        numpy_init(lambda: Dinov2(DINO_CFG, rngs=nnx.Rngs(0)), 1),
        numpy_init(lambda: SemVAE(SEM_CFG, rngs=nnx.Rngs(0)), 2),
    )
    options = ExtractOptions(**dict(OPTS, feature_dtype="float32", stats_images=4))
    out = str(tmp_path_factory.mktemp("latents"))
    extract(ImageFolderSource(str(root)), out, encoders, options, progress=False)
    return encoders, options, records.read_images(out)


def test_semantic_latent_is_the_semvae_sample_of_the_stored_tokens(run):
    encoders, options, (_, layout, recs) = run
    assert len(recs) == NUM_IMAGES and layout.feature_dtype == "float32"
    side = layout.semantic_shape[0]
    for flip, suffix in ((0, ""), (1, "_flip")):
        tokens = np.stack([r["dino" + suffix] for r in recs])
        stored = np.stack([r["semantic" + suffix] for r in recs])
        mu, logvar = encoders.semvae.encode(jnp.asarray(tokens, jnp.float32))
        eps = np.stack(
            [
                jax.random.normal(
                    jax.random.fold_in(
                        jax.random.fold_in(jax.random.fold_in(jax.random.key(options.seed), i), flip), SEMANTIC
                    ),
                    mu.shape[1:],
                    jnp.float32,
                )
                for i in (r["index"] for r in recs)
            ]
        )
        want = np.asarray(mu + jnp.exp(0.5 * logvar) * eps).reshape(len(recs), side, side, -1)
        err = assert_close(stored, want, 1e-5, err_msg=f"semantic{suffix}")
        print(f"semantic{suffix}: max |Δ| {err:.3g}, max |z| {np.max(np.abs(want)):.3g}")
