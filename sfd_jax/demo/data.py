"""Fashion-MNIST as the demo's stages need it: a training subset, whole padded splits, the [-1, 1] view."""

from __future__ import annotations

import os

import numpy as np

from sfd_jax.data.sources import FashionMNISTSource


class Subset:
    """The first `n` images of a source (same interface: len, [i] -> (image, label), describe)."""

    def __init__(self, source, n: int):
        if not 0 < n <= len(source):
            raise ValueError(f"demo.num_train_images={n} must lie in [1, {len(source)}] (the train split's size)")
        self.source, self.n = source, int(n)
        self.num_classes = getattr(source, "num_classes", 10)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= int(index) < self.n:
            raise IndexError(f"Subset: index {index} out of range [0, {self.n})")
        return self.source[int(index)]

    def describe(self) -> dict:
        return {**self.source.describe(), "num_images": self.n, "subset": f"first {self.n}"}


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def check_data(data_dir: str) -> None:
    missing = [f for f in IDX_FILES if not any(os.path.exists(os.path.join(data_dir, f + ext)) for ext in ("", ".gz"))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {data_dir} (missing {', '.join(missing)}). Install the Debian package "
            "(sudo apt-get install dataset-fashion-mnist) or put the four IDX files ("
            + ", ".join(f + ".gz" for f in IDX_FILES)
            + ") in a directory and pass --config.demo.data_dir=DIR"
        )


def fashion_mnist(data_dir: str, split: str) -> FashionMNISTSource:
    return FashionMNISTSource(data_dir, split=split, pad_to=32)


class UnitRangeImages:
    """uint8 (N, H, W, C) seen as float32 in [-1, 1], converted per batch (the whole train split as float32 would be
    0.7 GB): what the classifier helpers index."""

    def __init__(self, images_u8: np.ndarray):
        self.u8 = images_u8
        self.shape, self.ndim = images_u8.shape, images_u8.ndim

    def __len__(self) -> int:
        return len(self.u8)

    def __getitem__(self, index):
        return unit_range(self.u8[index])


def unit_range(images_u8: np.ndarray) -> np.ndarray:
    return images_u8.astype(np.float32) / 127.5 - 1.0


def padded_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 32, 32, 3), int64 labels) of a whole split, padded and repeated to RGB in one vectorised step."""
    src = fashion_mnist(data_dir, split)
    images = np.pad(src.images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(images[..., None], 3, axis=-1), src.labels
