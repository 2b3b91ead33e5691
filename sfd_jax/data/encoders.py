"""The frozen encoders of the extraction and the jitted function that turns images into record fields.

`Encoders` bundles the texture VAE, DINOv2 and either the SemVAE or a PCA of the DINOv2 tokens (the paper's ReDi-style
comparison, Table 4). `make_encode_fn` compiles, once per batch shape, the whole per-batch computation for the images
and their horizontal flips:

  uint8 (B, S, S, 3) → x ∈ [-1, 1] (ToTensor, Normalize(0.5, 0.5))     x_flip = x[:, :, ::-1]
  texture  = μ + σ·ε,  (μ, log σ²) = texture_vae.encode(x)             ε from key(seed, index, flip, 0)
  tokens   = dinov2.patch_tokens(torch-bicubic(ImageNet-norm((x + 1) / 2), 224))      (REPA targets)
  semantic = μ + σ·ε,  (μ, log σ²) = semvae.encode(tokens)              ε from key(seed, index, flip, 1)
           | ((tokens − token_mean) / token_std) @ componentsᵀ           (PCA-k, deterministic)

The noise of every image depends only on (seed, source index, flip), never on the batch or device layout, so a
resumed or re-sharded extraction draws the same posterior samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import paths
from sfd_jax.data.preprocess import dino_from_unit_range

TEXTURE, SEMANTIC = 0, 1
SEMANTIC_KINDS = ("semvae", "pca")


@dataclasses.dataclass
class PCA:
    """Semantic latents from the DINOv2 tokens: standardise per feature, project on the top-k components."""

    token_mean: np.ndarray  # (D,)
    token_std: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), rows orthonormal, by decreasing explained variance
    explained_variance: np.ndarray  # (k,)

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def save(self, path: str) -> None:
        with paths.local_target(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                token_mean=self.token_mean,
                token_std=self.token_std,
                components=self.components,
                explained_variance=self.explained_variance,
            )

    @classmethod
    def load(cls, path: str) -> "PCA":
        with np.load(paths.local_copy(path), allow_pickle=False) as z:
            missing = {"token_mean", "token_std", "components", "explained_variance"} - set(z.files)
            if missing:
                raise ValueError(f"PCA file {path} lacks {sorted(missing)}")
            return cls(
                *(np.asarray(z[k], np.float32) for k in ("token_mean", "token_std", "components", "explained_variance"))
            )


class TokenCovariance:
    """Streaming float64 first and second moments of token vectors, for fitting the PCA without holding tokens."""

    def __init__(self, dim: int):
        self.n = 0
        self.total = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def add(self, tokens: np.ndarray) -> None:
        t = np.asarray(tokens, np.float64).reshape(-1, self.total.shape[0])
        self.n += len(t)
        self.total += t.sum(axis=0)
        self.outer += t.T @ t

    def fit(self, k: int) -> PCA:
        if self.n < 2:
            raise ValueError("fitting the PCA needs at least 2 token vectors")
        mean = self.total / self.n
        cov = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        std = np.sqrt(np.maximum(np.diag(cov), 1e-12))
        corr = cov / np.outer(std, std)
        values, vectors = np.linalg.eigh(corr)
        order = np.argsort(values)[::-1][:k]
        comps = vectors[:, order].T
        # Fix each component's sign (largest-magnitude entry positive) so refits give identical latents.
        comps *= np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
        return PCA(
            mean.astype(np.float32), std.astype(np.float32), comps.astype(np.float32), values[order].astype(np.float32)
        )


@dataclasses.dataclass
class Encoders:
    texture_vae: nnx.Module
    dinov2: nnx.Module
    semvae: nnx.Module | None = None
    pca: PCA | None = None
    # Where each model came from, for the dataset's provenance (checkpoint paths, or "in-memory").
    sources: dict = dataclasses.field(default_factory=dict)

    @property
    def semantic_kind(self) -> str:
        return "semvae" if self.semvae is not None else "pca"

    def modules(self) -> dict:
        out = {"texture_vae": self.texture_vae, "dinov2": self.dinov2}
        if self.semvae is not None:
            out["semvae"] = self.semvae
        return out

    def describe(self) -> dict:
        """Class, config and parameter fingerprint of every model (what made the dataset)."""
        out = {}
        for name, module in self.modules().items():
            cfg = getattr(module, "cfg", None)
            cfg_d = (
                cfg.to_dict()
                if hasattr(cfg, "to_dict")
                else (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg))
            )
            out[name] = {
                "class": type(module).__name__,
                "config": cfg_d,
                "params": param_count(module),
                "sha256": fingerprint(module),
                "source": self.sources.get(name, "in-memory"),
            }
        if self.pca is not None:
            h = hashlib.sha256()
            for a in (self.pca.token_mean, self.pca.token_std, self.pca.components):
                h.update(np.ascontiguousarray(a, np.float32).tobytes())
            out["pca"] = {"k": self.pca.k, "sha256": h.hexdigest(), "source": self.sources.get("pca", "fitted")}
        return out


def param_count(module: nnx.Module) -> int:
    return int(sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))))


def fingerprint(module: nnx.Module) -> str:
    """sha256 over parameter paths, shapes and float32 bytes: identifies the weights behind a dataset."""
    h = hashlib.sha256()
    for path, var in sorted(nnx.to_flat_state(nnx.state(module, nnx.Param)), key=lambda kv: str(kv[0])):
        value = np.asarray(jax.device_get(var[...]), np.float32)
        h.update(f"{'.'.join(map(str, path))}:{value.shape};".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def to_unit_range(images_u8: jax.Array) -> jax.Array:
    """uint8 → [-1, 1] exactly as the reference's ToTensor + Normalize(0.5, 0.5), in float32."""
    x = images_u8.astype(jnp.float32) / jnp.float32(255.0)
    return (x - 0.5) / 0.5


def _noise(seed: int, index: jax.Array, flip: int, part: int, shape: tuple) -> jax.Array:
    def one(i):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), flip), part)
        return jax.random.normal(key, shape, jnp.float32)

    return jax.vmap(one)(index)


@functools.partial(jax.jit, static_argnames=("graphdef", "seed", "dino_size", "feature_dtype", "semantic_kind"))
def _encode(state, pca_arrays, images, index, *, graphdef, seed, dino_size, feature_dtype, semantic_kind):
    # Module-level and keyed on static arguments, so repeated extractions with the same models and settings (a
    # resume, the demo) reuse one compilation.
    models = nnx.merge(graphdef, state)
    x = to_unit_range(images)
    out = {}
    for flip, suffix in ((0, ""), (1, "_flip")):
        xi = x[:, :, ::-1] if flip else x
        mean, logvar = models["texture_vae"].encode(xi)
        out["texture" + suffix] = mean + jnp.exp(0.5 * logvar) * _noise(seed, index, flip, TEXTURE, mean.shape[1:])
        tokens = models["dinov2"].patch_tokens(dino_from_unit_range(xi, dino_size)).astype(jnp.float32)
        b, t, _ = tokens.shape
        side = math.isqrt(t)
        if semantic_kind == "semvae":
            mu, lv = models["semvae"].encode(tokens)
            sem = mu + jnp.exp(0.5 * lv) * _noise(seed, index, flip, SEMANTIC, mu.shape[1:])
        else:
            t_mean, t_std, comps = pca_arrays
            sem = jnp.einsum("btd,kd->btk", (tokens - t_mean) / t_std, comps, precision=jax.lax.Precision.HIGHEST)
        # Tokens are row-major over the patch grid: token h·W + w is latent position (h, w).
        out["semantic" + suffix] = sem.reshape(b, side, side, sem.shape[-1])
        out["dino" + suffix] = tokens.astype(feature_dtype)
    return out


def make_encode_fn(
    encoders: Encoders, *, seed: int, dino_size: int, feature_dtype, mesh: Mesh | None = None
) -> Callable[[np.ndarray, np.ndarray], dict[str, jax.Array]]:
    """`(images uint8 (B, S, S, 3), indices (B,)) -> record fields` (device arrays), jitted.

    With `mesh` (1-D axis 'data'), the batch is split over its devices and the weights are replicated; B must then
    be a multiple of the mesh size.
    """
    graphdef, state = nnx.split(encoders.modules())
    pca = encoders.pca
    pca_arrays = (
        None
        if pca is None
        else tuple(jnp.asarray(a, jnp.float32) for a in (pca.token_mean, pca.token_std, pca.components))
    )
    static = dict(
        graphdef=graphdef,
        seed=int(seed),
        dino_size=int(dino_size),
        feature_dtype=jnp.dtype(feature_dtype),
        semantic_kind=encoders.semantic_kind,
    )
    data = None
    if mesh is not None:
        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        state, pca_arrays = jax.device_put((state, pca_arrays), rep)

    def run(images, index):
        index = index.astype(np.int32)
        if data is not None:
            images, index = jax.device_put((images, index), data)
        return _encode(state, pca_arrays, images, index, **static)

    return run


def make_token_fn(encoders: Encoders, *, dino_size: int) -> Callable[[np.ndarray], jax.Array]:
    """Jitted DINOv2 tokens of non-flipped uint8 images (for fitting the PCA)."""
    graphdef, state = nnx.split(encoders.dinov2)

    @jax.jit
    def tokens(state, images):
        model = nnx.merge(graphdef, state)
        return model.patch_tokens(dino_from_unit_range(to_unit_range(images), dino_size)).astype(jnp.float32)

    return lambda images: tokens(state, images)


def load_encoders(cfg) -> Encoders:
    """Encoders from checkpoint paths in the `extract` config block (see docs/data.md)."""
    from sfd_jax.convert.dinov2 import load_dinov2
    from sfd_jax.convert.semvae import load_semvae
    from sfd_jax.convert.texture_vae import load_texture_vae, load_texture_vae_from_workdir

    dtype = cfg.get("dtype") or "float32"
    sources = {}
    if cfg.get("texture_vae_workdir"):
        _, texture_vae = load_texture_vae_from_workdir(cfg.texture_vae_workdir)
        sources["texture_vae"] = f"workdir:{paths.absolute(cfg.texture_vae_workdir)}"
    elif cfg.get("texture_vae"):
        _, texture_vae = load_texture_vae(cfg.texture_vae, dtype=dtype)
        sources["texture_vae"] = paths.absolute(cfg.texture_vae)
    else:
        raise ValueError("extract.texture_vae (reference .ckpt) or extract.texture_vae_workdir is required")
    if not cfg.get("dinov2"):
        raise ValueError("extract.dinov2 (a save_pretrained directory or weights file) is required")
    _, dinov2 = load_dinov2(cfg.dinov2, dtype=dtype)
    sources["dinov2"] = paths.absolute(cfg.dinov2)
    semantic = cfg.get("semantic") or "semvae"
    if semantic not in SEMANTIC_KINDS:
        raise ValueError(f"extract.semantic={semantic!r}; choose one of {', '.join(SEMANTIC_KINDS)}")
    semvae = pca = None
    if semantic == "semvae":
        if not cfg.get("semvae"):
            raise ValueError(
                "extract.semvae (semantic_ae_final.pt or a SemVAE weights directory) is required "
                "with extract.semantic='semvae'"
            )
        _, semvae = load_semvae(cfg.semvae, num_heads=cfg.get("semvae_num_heads") or None, dtype=dtype)
        sources["semvae"] = paths.absolute(cfg.semvae)
    elif cfg.get("pca_path"):
        pca = PCA.load(cfg.pca_path)
        sources["pca"] = paths.absolute(cfg.pca_path)
    return Encoders(texture_vae, dinov2, semvae, pca, sources)


def describe_source(source) -> dict[str, Any]:
    describe = getattr(source, "describe", None)
    return describe() if callable(describe) else {"kind": type(source).__name__, "num_images": len(source)}
