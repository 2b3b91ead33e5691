"""sfd_jax: Semantic-First Diffusion (SFD) in JAX/Flax.

Importing the package switches off flax's eager variable sharding: parameters carry *logical* axis names
(`out_sharding` metadata such as ('embed', 'mlp')) and `sfd_jax.parallel` maps them onto a device mesh when the
state is created under `jax.jit(..., out_shardings=...)`. Without this, creating an annotated module outside a mesh
context raises.
"""

from flax import nnx as _nnx

_nnx.use_eager_sharding(False)

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import sfd_jax` stays cheap; `sfd_jax.SFDPipeline` loads the inference module on first use.
    if name == "SFDPipeline":
        from sfd_jax.inference import SFDPipeline

        return SFDPipeline
    raise AttributeError(f"module 'sfd_jax' has no attribute {name!r}")
