"""Image sources and the batched, device-sharded FID Inception feature extractor.

Used by `--mode=evaluate` (`sfd_jax.eval.evaluate`) and meant for the in-training FID too, so that both run the
same code. Images are uint8 (N, H, W, 3), read in order from
- an ADM sample/reference npz (`arr_0`), streamed from the zip member without loading the whole array
  (50K×256×256×3 is 9.8 GB),
- a `.npy` file (memory-mapped),
- a folder of PNG/JPEG files (sorted by name, all the same size),
- an in-memory array (`ArrayImages`).

`InceptionExtractor` jit-compiles one step for a fixed global batch (rounded up to a multiple of the device count;
the last batch is zero-padded and the padding dropped), shards the batch over every device of the mesh (params
replicated), and overlaps reading the next batch with the device work. Under several processes each process
reads only its slice of every global batch.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import zipfile
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.models.inception import INPUT_SIZE, RESIZE_MODES, InceptionV3, preprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageSource(Protocol):
    num_images: int
    image_shape: tuple  # (H, W, 3)

    def read(self, start: int, stop: int) -> np.ndarray: ...


def _check_images(shape, dtype, where: str):
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{where}: expected uint8 images (N, H, W, 3), got shape {tuple(shape)}")
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8 (values 0..255), got {np.dtype(dtype)}")


class ArrayImages:
    """An in-memory uint8 (N, H, W, 3) array."""

    def __init__(self, images: np.ndarray, name: str = "array"):
        images = np.asarray(images)
        _check_images(images.shape, images.dtype, name)
        self.images, self.name = images, name
        self.num_images, self.image_shape = images.shape[0], tuple(images.shape[1:])

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.images[start:stop]


class NpzImages:
    """`arr_0` (or `key`) of an npz, read by rows straight from the zip member."""

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = os.fspath(path), key
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{self.path} is not a readable npz file: {e}") from e
        self._member = key + ".npy"
        if self._member not in self._zip.namelist():
            found = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
            raise KeyError(f"{self.path} has no array {key!r} (arrays: {', '.join(found) or 'none'})")
        with self._zip.open(self._member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{self.path}:{key}: unsupported .npy format version {version}")
            self._offset = f.tell()
        _check_images(shape, dtype, f"{self.path}:{key}")
        if fortran:
            raise ValueError(f"{self.path}:{key} is stored in Fortran order; save it C-contiguous")
        self.num_images, self.image_shape = shape[0], tuple(shape[1:])
        self._row_bytes = int(np.prod(self.image_shape))
        self._fh, self._pos = None, None

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.num_images)
        if stop <= start:
            return np.zeros((0,) + self.image_shape, np.uint8)
        if self._fh is None or start < self._pos:
            if self._fh is not None:
                self._fh.close()
            self._fh = self._zip.open(self._member)
            self._pos = 0
        if start != self._pos:  # a forward seek reads (and for compressed npz decompresses) what it skips
            self._fh.seek(self._offset + start * self._row_bytes)
        elif self._fh.tell() < self._offset:
            self._fh.seek(self._offset)
        data = self._fh.read((stop - start) * self._row_bytes)
        if len(data) != (stop - start) * self._row_bytes:
            raise ValueError(f"{self.path}:{self.key} is truncated: rows {start}..{stop} missing")
        self._pos = stop
        return np.frombuffer(data, np.uint8).reshape((stop - start,) + self.image_shape)


class NpyImages(ArrayImages):
    def __init__(self, path: str):
        super().__init__(np.load(path, mmap_mode="r"), name=os.fspath(path))

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.images[start:stop])


class FolderImages:
    """PNG/JPEG files of one folder, sorted by file name, converted to RGB; all must share one size."""

    def __init__(self, path: str):
        from PIL import Image

        self._Image = Image
        self.path = os.fspath(path)
        self.files = sorted(
            os.path.join(self.path, f) for f in os.listdir(self.path) if f.lower().endswith(IMAGE_SUFFIXES)
        )
        if not self.files:
            raise ValueError(f"{self.path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        self.num_images = len(self.files)
        self.image_shape = self._load(self.files[0]).shape

    def _load(self, file: str) -> np.ndarray:
        with self._Image.open(file) as im:
            return np.asarray(im.convert("RGB"))

    def read(self, start: int, stop: int) -> np.ndarray:
        out = []
        for file in self.files[start:stop]:
            image = self._load(file)
            if image.shape != self.image_shape:
                raise ValueError(
                    f"{file} is {image.shape[1]}×{image.shape[0]}, but {self.files[0]} is "
                    f"{self.image_shape[1]}×{self.image_shape[0]}: all images must have one size"
                )
            out.append(image)
        return np.stack(out) if out else np.zeros((0,) + self.image_shape, np.uint8)


def open_images(path: str, key: str = "arr_0") -> ImageSource:
    """An image source for an npz (`key`, default `arr_0`), a `.npy` file or a folder of PNG/JPEG files."""
    from sfd_jax import paths

    path = os.fspath(path)
    if not paths.exists(path):
        raise FileNotFoundError(f"images not found: {path}")
    path = paths.local_copy(path)  # gs://: a verified local copy (memory-mapped / zip-read below)
    if os.path.isdir(path):
        return FolderImages(path)
    if path.endswith(".npy"):
        return NpyImages(path)
    return NpzImages(path, key)


@functools.lru_cache(maxsize=8)
def _step_fn(graphdef, mesh: Mesh, resize: str, size: int, dtype):
    # Cached so that repeated extractors (one per evaluation, e.g. during training) reuse one compilation.
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh.axis_names))

    def step(state, images):
        out = nnx.merge(graphdef, state)(preprocess(images, resize=resize, size=size).astype(dtype))
        return {
            "pool": out["pool3"],
            "spatial": out["spatial"],
            "probs": jax.nn.softmax(out["logits_nobias"].astype(jnp.float32), axis=-1),
        }

    return jax.jit(step, in_shardings=(replicated, data), out_shardings=data)


class InceptionExtractor:
    """pool3 (2048), sFID spatial (2023 at 299×299) and class probabilities (1008, float32 softmax of the no-bias
    logits) of uint8 images, computed in fixed-size global batches sharded over `mesh` (all devices by default)."""

    OUTPUTS = ("pool", "spatial", "probs")

    def __init__(
        self,
        model: InceptionV3,
        *,
        batch_size: int = 256,
        resize: str = "tf1",
        size: int = INPUT_SIZE,
        mesh: Mesh | None = None,
    ):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))
        n_dev = self.mesh.devices.size
        self.batch_size = -(-int(batch_size) // n_dev) * n_dev
        if self.batch_size % jax.process_count():
            raise ValueError(f"batch_size {self.batch_size} is not divisible by {jax.process_count()} processes")
        self.resize, self.size = resize, size
        self._data = NamedSharding(self.mesh, P(self.mesh.axis_names))  # batch over every mesh axis
        graphdef, state = nnx.split(model)
        self._state = parallel.put_global(state, NamedSharding(self.mesh, P()))
        self._step = _step_fn(graphdef, self.mesh, resize, size, model.dtype)

    def _local_rows(self, source: ImageSource, start: int, n: int) -> np.ndarray:
        local = self.batch_size // jax.process_count()
        lo = min(start + jax.process_index() * local, n)
        hi = min(lo + local, n)
        images = source.read(lo, hi)
        if images.shape[0] < local:  # zero padding; the padded rows are dropped after the step
            pad = np.zeros((local - images.shape[0],) + tuple(source.image_shape), np.uint8)
            images = np.concatenate([images, pad])
        return images

    def _fetch(self, out) -> dict:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    def __call__(
        self,
        source: ImageSource,
        *,
        limit: int | None = None,
        outputs: Sequence[str] = OUTPUTS,
        what: str = "images",
        log_every_s: float = 30.0,
        progress_dir: str | None = None,
        preemption=None,
        save_every: int = 50,
    ) -> dict[str, np.ndarray]:
        """progress_dir: features are saved there every `save_every` batches and when `preemption.reached(batch)`
        (then `Preempted` is raised); a later call with the same directory starts after the saved ones. The
        directory must be specific to (source, weights, settings, batch size): the caller keys it."""
        from sfd_jax import paths
        from sfd_jax.preemption import Preempted

        n = source.num_images if limit is None else min(int(limit), source.num_images)
        if n < 1:
            raise ValueError(f"{what}: no images to score")
        shape = (self.batch_size,) + tuple(source.image_shape)
        chunks = {k: [] for k in outputs}
        begin = 0
        for name in paths.listdir(progress_dir) if progress_dir and paths.isdir(progress_dir) else []:
            lo, hi = (int(x) for x in name[: -len(".npz")].split("-")) if name.endswith(".npz") else (-1, -1)
            if lo == begin:  # a contiguous prefix of saved blocks
                with np.load(paths.local_copy(paths.join(progress_dir, name))) as z:
                    for k in outputs:
                        chunks[k].append(z[k])
                begin = hi
        if begin:
            log.info("%s: features of %d images restored from %s", what, begin, progress_dir)
        saved = begin
        pending, t0, last_log = None, time.time(), time.time()

        def collect(item):
            out, valid = item
            for k, v in self._fetch(out).items():
                if k in chunks:
                    chunks[k].append(v[:valid])

        def save(upto: int):
            nonlocal saved
            if upto > saved and jax.process_index() == 0:
                block = {k: np.concatenate(v)[saved - begin : upto - begin] for k, v in chunks.items()}
                with paths.local_target(paths.join(progress_dir, f"{saved:09d}-{upto:09d}.npz"), ".npz") as tmp:
                    np.savez(tmp, **block)
            saved = upto

        for b, start in enumerate(range(begin, n, self.batch_size)):
            stop = bool(progress_dir) and b > 0 and preemption is not None and preemption.reached(b)
            if progress_dir and b and (b % save_every == 0 or stop):
                collect(pending)
                pending = None
                save(start)
                if stop:
                    log.warning("%s: preempted after %d of %d images; rerun to continue", what, start, n)
                    raise Preempted(what)
            images = self._local_rows(source, start, n)
            batch = jax.make_array_from_process_local_data(self._data, images, shape)
            out = self._step(self._state, batch)  # dispatched asynchronously: read the next batch meanwhile
            if pending is not None:
                collect(pending)
            pending = (out, min(self.batch_size, n - start))
            if time.time() - last_log > log_every_s:
                done = start + pending[1]
                rate = done / (time.time() - t0)
                log.info("%s: %d/%d images, %.1f img/s, ETA %.0f s", what, done, n, rate, (n - done) / rate)
                last_log = time.time()
        if pending is not None:
            collect(pending)
        seconds = time.time() - t0
        log.info("%s: %d images in %.1f s (%.1f img/s)", what, n, seconds, n / seconds)
        return {k: np.concatenate(v) for k, v in chunks.items()}
