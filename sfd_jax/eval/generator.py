"""Image indices → uint8 images: the in-memory core of `--mode=sample`, the demo and the in-training FID.

    decoder = TextureDecoder(vae, texture_mean, texture_std)             # or TextureDecoder.from_files(...)
    gen = ImageGenerator(decoder, settings=SamplerSettings(solver="euler", num_steps=99), seed=0)
    images, stats = gen(model, indices, class_labels(indices, num_images=50_000, num_classes=1000))

For every image index g the program draws x(0) = N(0, I) from `fold_in(key(seed), g)`, integrates the three-phase
ODE (`sfd_jax.diffusion.sampler.sample`, docs/diffusion.md#sampling), keeps the texture channels, denormalises them
with the dataset statistics (x·std/multiplier + mean), decodes them with the texture VAE and rounds to uint8
(docs/texture_vae.md#forward-order). Batches are sharded over the ('data', 'fsdp') axes of the mesh (all devices, all
processes), a fixed `per_device_batch` rows per device.

Why images do not depend on the device count: the noise and the label depend only on the index, the sampler's
default `step_control='per_sample'` gives each image its own adaptive solve, and every device runs the same
program on the same per-device shape whatever the number of devices — so the same index gives the same bits (checked
on 1 vs 8 CPU devices). A different `per_device_batch` changes matmul shapes and moves latents by float rounding
(~5e-7 on CPU), which can flip an occasional uint8 level.

One compilation per (model graph, guide graph, VAE graph, settings, guidance, mesh, per-device batch); guidance
scales are part of that key.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.diffusion import sampler
from sfd_jax.diffusion.guidance import CFG, AutoGuidance
from sfd_jax.eval.decoding import TextureDecoder, read_latent_stats  # noqa: F401 (part of this module's API)
from sfd_jax.programs import ProgramCache

LABEL_MODES = ("balanced", "random", "unconditional")

_PROGRAMS = ProgramCache(size=8)


def trace_count(reset: bool = False) -> int:
    """How many times a generation program was traced (each trace = one compilation)."""
    return _PROGRAMS.trace_count(reset)


def clear_programs() -> None:
    """Forget every cached generation program, so the next call of each ImageGenerator compiles anew.

    The cache is per process and keyed by (model graph, settings, mesh, ...), so two generators with equal keys
    share one program; clearing frees the compiled programs' memory in a long-lived session."""
    _PROGRAMS.clear()


# ---------------------------------------------------------------------------------------------------------------
# Labels and noise: functions of the image index only
# ---------------------------------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def class_labels(
    indices, *, num_images: int, num_classes: int, mode: str = "balanced", seed: int = 0, null_label: int | None = None
) -> np.ndarray:
    """int32 labels of image `indices` out of `num_images`.

    'balanced': image g gets (g · num_classes) // num_images — g // 50 for 50,000 images and 1000 classes (as the
    reference), and exactly balanced (±1) when num_images is not a multiple of num_classes.
    'random': uniform in [0, num_classes) from a counter-based hash of (seed, g): the label of g does not depend on
    num_images or on which other indices are drawn.
    'unconditional': every image gets `null_label` (default num_classes, the null class).
    """
    indices = np.asarray(indices, np.int64)
    if mode not in LABEL_MODES:
        raise ValueError(f"labels mode must be one of {LABEL_MODES}, got {mode!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_images):
        raise ValueError(f"image indices must lie in [0, {num_images}), got [{indices.min()}, {indices.max()}]")
    if mode == "balanced":
        return ((indices * num_classes) // num_images).astype(np.int32)
    if mode == "random":
        with np.errstate(over="ignore"):
            h = _splitmix64(_splitmix64(np.uint64(seed) + np.uint64(0x5FD1AB)) ^ indices.astype(np.uint64))
        return (h % np.uint64(num_classes)).astype(np.int32)
    return np.full(indices.shape, num_classes if null_label is None else null_label, np.int32)


def initial_noise(key: jax.Array, indices: jax.Array, shape: Sequence[int]) -> jax.Array:
    """x(0) of each image: N(0, I) of `shape` drawn from fold_in(key, index)."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape), jnp.float32))(indices)


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Everything about the ODE solve that changes the images (passed on to `sampler.sample`)."""

    solver: str = "dopri5"
    num_steps: int | None = None  # fixed-grid steps for euler / heun (grid points − 1)
    rtol: float = 1e-3
    atol: float = 1e-6
    delta_t: float = 0.3
    step_control: str = "per_sample"
    phase_mode: str = "split"
    max_steps: int = 4096

    def __post_init__(self):
        # Checked here so that a bad setting is named before any weights are loaded; the sampler checks again.
        if self.solver not in sampler.SOLVERS:
            raise ValueError(f"solver must be one of {sampler.SOLVERS}, got {self.solver!r}")
        if self.step_control not in sampler.STEP_CONTROLS:
            raise ValueError(f"step_control must be one of {sampler.STEP_CONTROLS}, got {self.step_control!r}")
        if self.phase_mode not in sampler.PHASE_MODES:
            raise ValueError(f"phase_mode must be one of {sampler.PHASE_MODES}, got {self.phase_mode!r}")
        if self.solver == "dopri5":
            if self.num_steps is not None:
                raise ValueError("num_steps is for the fixed-grid solvers (euler, heun); dopri5 uses rtol/atol")
            if not (self.rtol > 0 and self.atol > 0):
                raise ValueError(f"dopri5 needs rtol > 0 and atol > 0, got rtol={self.rtol}, atol={self.atol}")
        elif not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"solver {self.solver!r} needs num_steps >= 1 (grid points − 1), got {self.num_steps!r}")
        if not 0.0 <= self.delta_t < 1.0:
            raise ValueError(f"delta_t must lie in [0, 1), got {self.delta_t}")

    def kwargs(self) -> dict:
        return dict(
            solver=self.solver,
            num_steps=self.num_steps,
            rtol=self.rtol,
            atol=self.atol,
            delta_t=self.delta_t,
            step_control=self.step_control,
            phase_mode=self.phase_mode,
            max_steps=self.max_steps,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def guidance_key(guidance) -> tuple:
    """The part of a guidance object that changes the images, hashable (the guide model by its graph)."""
    if guidance is None:
        return ("none",)
    if isinstance(guidance, CFG):
        return ("cfg", float(guidance.scale), guidance.interval_start, int(guidance.null_label))
    if isinstance(guidance, AutoGuidance):
        w_tex, w_sem = guidance.scales()
        return ("autoguidance", w_tex, w_sem, guidance.interval_start)
    raise TypeError(f"guidance must be None, CFG(...) or AutoGuidance(...), got {type(guidance).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------------
def _mesh_devices(mesh: Mesh) -> set:
    return set(mesh.devices.flat)


def place_on_mesh(module: nnx.Module, mesh: Mesh, rules: dict | None = None) -> tuple[Any, Any]:
    """(graphdef, state) with every array on `mesh`: arrays already spread over exactly the mesh's devices (the
    trainer's sharded EMA weights) stay as they are; others are placed by their logical names and `rules`
    (replicated when rules is None)."""
    graphdef, state = nnx.split(module)
    devices = _mesh_devices(mesh)
    if all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in jax.tree.leaves(state)):
        return graphdef, state
    pure = nnx.to_pure_dict(state)
    if rules is None:
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), pure)
    else:
        shardings = parallel.state_shardings(state, mesh, rules)
    nnx.replace_by_pure_dict(state, parallel.put_global(pure, shardings))
    return graphdef, state


@dataclasses.dataclass
class BatchStats:
    nfe: int  # batched model evaluations (CFG: one doubled-batch forward; AG: main + guide)
    nfe_per_image: float  # mean of each image's own solve
    seconds: float  # wall time since the previous batch was fetched (device throughput)


class ImageGenerator:
    """(model, indices, labels) → uint8 images (n, H, W, 3) on every process, all at once (`__call__`) or batch by
    batch (`batches`).

    mesh: defaults to all devices on the data axis. rules: logical-axis rules used to place model weights that are
    not already on the mesh (None: replicate). per_device_batch: rows per device per step; the global batch is
    per_device_batch × the ('data', 'fsdp') size and the last batch is padded by repeating its last index.
    """

    def __init__(
        self,
        decoder: TextureDecoder,
        *,
        settings: SamplerSettings = SamplerSettings(),
        seed: int = 0,
        mesh: Mesh | None = None,
        rules: dict | None = None,
        per_device_batch: int = 16,
    ):
        if per_device_batch < 1:
            raise ValueError(f"per_device_batch must be positive, got {per_device_batch}")
        self.decoder = decoder
        self.settings = settings
        self.seed = int(seed)
        self.mesh = mesh if mesh is not None else parallel.make_mesh((-1, 1, 1))
        self.rules = rules
        self.per_device_batch = int(per_device_batch)
        self.global_batch = self.per_device_batch * parallel.data_parallel_size(self.mesh)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self._placed: dict = {}
        self._vae = place_on_mesh(decoder.vae, self.mesh, None)

    # ---- program
    def _program(self, model_graph, guide_graph, guidance_spec: tuple, latent_shape: tuple):
        key = (
            model_graph,
            guide_graph,
            self.decoder.key(),
            self.settings,
            guidance_spec,
            latent_shape,
            self.mesh,
            self.per_device_batch,
        )
        return _PROGRAMS.get(key, lambda: self._build_program(model_graph, guide_graph, guidance_spec, latent_shape))

    def _build_program(self, model_graph, guide_graph, guidance_spec: tuple, latent_shape: tuple):
        settings, decoder, mesh = self.settings, self.decoder, self.mesh
        vae_graph = self._vae[0]
        semantic_chans = latent_shape[-1] - decoder.channels
        batch_spec = P(parallel.BATCH_AXES)
        decode = jax.shard_map(
            lambda vae_state, mean, std, z: decoder.local_decode(vae_graph, vae_state, mean, std, z),
            mesh=mesh,
            in_specs=(P(), P(), P(), batch_spec),
            out_specs=batch_spec,
        )

        def program(model_state, guide_state, vae_state, mean, std, noise_key, indices, labels):
            _PROGRAMS.note_trace()
            model = nnx.merge(model_graph, model_state)
            guidance = _rebuild_guidance(guidance_spec, guide_graph, guide_state)
            z0 = initial_noise(noise_key, indices, latent_shape)
            z0 = jax.lax.with_sharding_constraint(z0, self.batch_sharding)
            x, stats = sampler.sample(
                model, z0, labels, guidance=guidance, semantic_chans=semantic_chans, **settings.kwargs()
            )
            images = decode(vae_state, mean, std, x[..., : decoder.channels])
            return images, {
                "nfe": stats["nfe"],
                "nfe_sum": jnp.sum(stats["nfe_per_sample"]),
                "max_steps_reached": jnp.any(stats["max_steps_reached"]),
            }

        rep = NamedSharding(mesh, P())
        return jax.jit(
            program, out_shardings=(self.batch_sharding, {"nfe": rep, "nfe_sum": rep, "max_steps_reached": rep})
        )

    # ---- call
    def __call__(self, model, indices, labels, **kwargs) -> tuple[np.ndarray, list]:
        """All images of `indices` at once (see `batches` for the arguments): (uint8 (n, H, W, 3), [BatchStats])."""
        images, stats = [], []
        for _, batch_images, batch_stats in self.batches(model, indices, labels, **kwargs):
            images.append(batch_images)
            stats.append(batch_stats)
        return np.concatenate(images), stats

    def batches(
        self,
        model,
        indices,
        labels,
        *,
        guidance=None,
        latent_shape: Sequence[int] | None = None,
        null_label: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray, BatchStats]]:
        """Yields (offset into `indices`, uint8 images of the next global batch, BatchStats), every process alike.

        model: an nnx module called as model(x, t_tex, t_sem, y) — a LightningDiT, whose cfg gives latent_shape
        and the null label, or another module with both given. indices: any image indices (any order, any count);
        labels: their int labels. guidance: None, CFG(...) or AutoGuidance(...) with an nnx guide model.
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        labels = np.asarray(labels, np.int32).reshape(-1)
        if labels.shape != indices.shape:
            raise ValueError(f"labels {labels.shape} and indices {indices.shape} must have the same length")
        if indices.size == 0:
            raise ValueError("no image indices to generate")
        if indices.min() < 0 or indices.max() >= 2**31:
            raise ValueError("image indices must lie in [0, 2**31)")
        cfg = getattr(model, "cfg", None)
        if latent_shape is None:
            if cfg is None:
                raise ValueError("latent_shape is required for a model without a DiTConfig `cfg`")
            latent_shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
        latent_shape = tuple(int(s) for s in latent_shape)
        if null_label is None:
            if cfg is None:
                raise ValueError("null_label is required for a model without a DiTConfig `cfg`")
            null_label = cfg.num_classes
        null_label = int(null_label)
        texture_only = cfg is not None and cfg.semantic_chans == 0  # the no-semantic-latent baseline
        if latent_shape[-1] < self.decoder.channels or (latent_shape[-1] == self.decoder.channels and not texture_only):
            raise ValueError(
                f"the model's latent has {latent_shape[-1]} channels; the texture VAE takes the first "
                f"{self.decoder.channels}, so no semantic channels would remain"
            )
        if cfg is not None and cfg.in_channels - cfg.semantic_chans != self.decoder.channels:
            raise ValueError(
                f"the model has {cfg.in_channels - cfg.semantic_chans} texture channels "
                f"(in_channels {cfg.in_channels} − semantic_chans {cfg.semantic_chans}) but the texture "
                f"VAE decodes {self.decoder.channels}"
            )
        if isinstance(guidance, CFG) and guidance.null_label != null_label:
            guidance = dataclasses.replace(guidance, null_label=null_label)

        model_graph, model_state = self._place(model, "model")
        guide_graph, guide_state = (
            self._place(guidance.guide_model, "guide") if isinstance(guidance, AutoGuidance) else (None, None)
        )
        fn = self._program(model_graph, guide_graph, guidance_key(guidance), latent_shape)
        rep = NamedSharding(self.mesh, P())
        mean, std = parallel.put_global((self.decoder.mean, self.decoder.std), rep)
        noise_key = parallel.put_global(jax.random.key(self.seed), rep)

        gb, n = self.global_batch, indices.size
        pending, last = None, time.perf_counter()
        for start in range(0, n, gb):
            idx = indices[start : start + gb]
            lab = labels[start : start + gb]
            valid = idx.size
            if valid < gb:  # repeat the last row: real work whose result is dropped, no other image changes
                idx = np.concatenate([idx, np.full(gb - valid, idx[-1])])
                lab = np.concatenate([lab, np.full(gb - valid, lab[-1])])
            out = fn(
                model_state,
                guide_state,
                self._vae[1],
                mean,
                std,
                noise_key,
                self._global(idx.astype(np.int32)),
                self._global(lab),
            )
            # Dispatch is asynchronous: fetch the previous batch while the devices work on this one.
            if pending is not None:
                yield self._collect(*pending, since=last)
                last = time.perf_counter()
            pending = (start, valid, idx, out)
        yield self._collect(*pending, since=last)

    def _collect(self, start: int, valid: int, idx: np.ndarray, out, *, since: float):
        images, st = out
        images = _to_host(images)[:valid]
        st = jax.device_get(st)
        if bool(st["max_steps_reached"]):
            raise RuntimeError(
                f"dopri5 hit max_steps={self.settings.max_steps} in the batch of images "
                f"{int(idx[0])}..{int(idx[valid - 1])}; raise max_steps or loosen rtol/atol"
            )
        return (
            start,
            images,
            BatchStats(
                nfe=int(st["nfe"]), nfe_per_image=float(st["nfe_sum"]) / len(idx), seconds=time.perf_counter() - since
            ),
        )

    def _place(self, module, role: str):
        """(graphdef, state) on this generator's mesh. The placed copy of the last model (and guide) is kept and
        reused while the same arrays are passed, so repeated calls do not copy the weights again."""
        if not isinstance(module, nnx.Module):
            raise TypeError(f"the {role} must be an nnx.Module (e.g. a LightningDiT), got {type(module).__name__}")
        graphdef, state = nnx.split(module)
        key = (graphdef, tuple(id(x) for x in jax.tree.leaves(state)))
        cached = self._placed.get(role)
        if cached is None or cached[0] != key:
            cached = (key, place_on_mesh(module, self.mesh, self.rules), jax.tree.leaves(state))
            self._placed[role] = cached  # the leaves are held so that their ids stay unique while cached
        return cached[1]

    def _global(self, host: np.ndarray) -> jax.Array:
        """A global array sharded over the batch axes from the full host array (identical on every process)."""
        return jax.make_array_from_callback(host.shape, self.batch_sharding, lambda index: host[index])

    def image_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        return self.decoder.image_shape((int(latent_shape[0]), int(latent_shape[1])))


def _rebuild_guidance(spec: tuple, guide_graph, guide_state):
    kind = spec[0]
    if kind == "none":
        return None
    if kind == "cfg":
        _, scale, start, null_label = spec
        return CFG(scale=scale, interval_start=start, null_label=null_label)
    _, w_tex, w_sem, start = spec
    return AutoGuidance(
        guide_model=nnx.merge(guide_graph, guide_state),
        scale=w_tex,
        scale_tex=w_tex,
        scale_sem=w_sem,
        interval_start=start,
    )


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
