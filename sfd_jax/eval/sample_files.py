"""Files of a sampling run: resumable chunk files, the reference's shuffle, a byte-stable ADM npz, PNG grids.

`--mode=sample` (`sfd_jax.eval.sample`) writes images in chunks `SSSSSSS-EEEEEEE.npy` (indices [S, E), index
order), each saved under a temporary name and renamed when complete, and finally packs them into one npz whose row
r is image perm[r] (`shuffle_order`). `write_npz` streams the rows into an uncompressed zip with fixed timestamps,
so the same images always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import zipfile
from typing import Iterable

import numpy as np

from sfd_jax import paths

_CHUNK_RE = re.compile(r"^(\d{7})-(\d{7})\.npy$")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def chunk_name(start: int, stop: int) -> str:
    return f"{start:07d}-{stop:07d}.npy"


def scan_chunks(directory: str, num_images: int) -> list[tuple[int, int, str]]:
    """Complete chunk files under `directory` as (start, stop, path), sorted; temporary files are ignored."""
    if not paths.isdir(directory):
        return []
    found = []
    for name in paths.listdir(directory):
        m = _CHUNK_RE.match(name)
        if m:
            start, stop = int(m.group(1)), int(m.group(2))
            if 0 <= start < stop <= num_images:
                found.append((start, stop, paths.join(directory, name)))
    return found


def coverage(chunks: Iterable[tuple[int, int, str]], num_images: int) -> np.ndarray:
    done = np.zeros(num_images, bool)
    for start, stop, _ in chunks:
        done[start:stop] = True
    return done


def write_chunk(directory: str, start: int, images: np.ndarray) -> str:
    path = paths.join(directory, chunk_name(start, start + len(images)))
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images))
    paths.write_atomic(path, buf.getvalue())
    return path


class ChunkReader:
    """Images by index from chunk files (memory-mapped); the first chunk (sorted by name) holding an index wins."""

    def __init__(self, chunks: list[tuple[int, int, str]], num_images: int, image_shape: tuple):
        self.arrays, self.starts = [], []
        self.owner = np.full(num_images, -1, np.int64)
        for k in reversed(range(len(chunks))):
            start, stop, _ = chunks[k]
            self.owner[start:stop] = k
        for start, stop, path in chunks:
            try:
                arr = np.load(paths.local_copy(path), mmap_mode="r")  # a gs:// chunk is staged first
            except (ValueError, OSError, EOFError) as e:  # a chunk cut short by a full disk or a copy
                from sfd_jax.errors import DataError

                raise DataError(
                    f"sample chunk {path} is unreadable ({type(e).__name__}: {e}); delete it and rerun "
                    "the same command to sample those images again"
                ) from None
            if arr.shape != (stop - start,) + tuple(image_shape) or arr.dtype != np.uint8:
                from sfd_jax.errors import DataError

                raise DataError(
                    f"{path} holds {arr.dtype} {arr.shape}, expected uint8 "
                    f"{(stop - start,) + tuple(image_shape)}; delete it to sample it again"
                )
            self.arrays.append(arr)
            self.starts.append(start)
        missing = np.flatnonzero(self.owner < 0)
        if missing.size:
            raise RuntimeError(f"{missing.size} images have no chunk (first: {int(missing[0])})")

    def read(self, indices) -> np.ndarray:
        rows = []
        for i in np.asarray(indices, np.int64).reshape(-1):
            k = int(self.owner[i])
            rows.append(self.arrays[k][int(i) - self.starts[k]])
        return np.stack(rows)


def shuffle_order(num_images: int, seed: int = 42) -> np.ndarray:
    """perm with npz row r = image perm[r]: Python's random.Random(seed).shuffle of list(range(num_images))."""
    order = list(range(num_images))
    random.Random(seed).shuffle(order)
    return np.asarray(order, np.int64)


def write_npz(path: str, arrays: dict[str, tuple[tuple, np.dtype, Iterable[np.ndarray]]]) -> str:
    """Streams arrays into an uncompressed npz with fixed zip timestamps (same data → same bytes).

    arrays: {name: (shape, dtype, blocks)} with blocks yielding consecutive C-order row blocks."""
    with (
        paths.local_target(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        for name, (shape, dtype, blocks) in arrays.items():
            dtype = np.dtype(dtype)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED
            expected = int(np.prod(shape)) * dtype.itemsize
            written = 0
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
                )
                for block in blocks:
                    data = np.ascontiguousarray(block, dtype=dtype).tobytes()
                    f.write(data)
                    written += len(data)
            if written != expected:
                raise RuntimeError(f"{path}:{name}: wrote {written} bytes, expected {expected} for {shape} {dtype}")
    return path


def grid_indices(num_images: int, count: int) -> np.ndarray:
    count = min(count, num_images)
    return (np.arange(count, dtype=np.int64) * num_images) // count


def make_grid(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """uint8 (n, H, W, 3) → one (rows·(H+pad)+pad, cols·(W+pad)+pad, 3) image on a white background."""
    n, h, w, c = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    with paths.local_target(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
