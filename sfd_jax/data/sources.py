"""Image sources for latent extraction: index → (uint8 (H, W, 3) RGB image, int label).

Three kinds behind one interface (`ImageSource`: `len()`, `source[i]`, `describe()`):
- `ImageFolderSource`: one sub-folder per class, classes in sorted order and files sorted within a class, the
  order torchvision's `ImageFolder` (used by the reference extraction) gives, so index i is the same image.
- `TFDSSource`: a TFDS dataset prepared with `file_format='array_record'` (ImageNet: `prepare_imagenet2012`), read
  through `tfds.data_source` without TensorFlow; JPEG bytes are decoded here with PIL.
- `FashionMNISTSource`: the IDX files of the Debian package `dataset-fashion-mnist`, optionally padded 28 → 32 and
  repeated to 3 channels (the demo's input).

Every decoder converts grayscale / palette / alpha / CMYK pictures to RGB with PIL's `convert('RGB')` (what
`ImageFolder`'s loader does). A file that cannot be read or decoded raises `BadImageError` naming it; the
extraction either stops on it or, with `skip_bad_images`, skips and lists it.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import sys
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class BadImageError(ValueError):
    """An image that cannot be read or decoded; `name` is the file (or record) it came from."""

    def __init__(self, name: str, reason: str):
        self.name = name
        super().__init__(f"cannot decode image {name}: {reason}")


class ImageSource(Protocol):
    num_classes: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...

    def describe(self) -> dict: ...


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes → uint8 (H, W, 3) RGB; BadImageError naming `name` when PIL cannot read them."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            rgb = pil.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadImageError(name, f"{type(e).__name__}: {e}") from e
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImageError(name, f"decoded to shape {arr.shape}, expected (H, W, 3)")
    return arr


def _check_index(index: int, length: int, what: str) -> int:
    index = int(index)
    if not 0 <= index < length:
        raise IndexError(f"{what}: index {index} out of range [0, {length})")
    return index


# ----------------------------------------------------------------------------------------------- image folders
class ImageFolderSource:
    """`root/<class name>/**/<image>`; labels are positions of the class names in sorted order."""

    def __init__(self, root: str, extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.class_names:
            raise ValueError(f"image folder {self.root} has no class sub-folders (expected root/<class>/<image>)")
        extensions = tuple(e.lower() for e in extensions)
        files, labels, empty = [], [], []
        for label, name in enumerate(self.class_names):
            before = len(files)
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, name), followlinks=True):
                dirnames.sort()  # walk sub-folders in sorted order, as ImageFolder's sorted(os.walk(...)) does
                for fname in sorted(filenames):
                    if fname.lower().endswith(extensions):
                        files.append(os.path.join(dirpath, fname))
                        labels.append(label)
            if len(files) == before:
                empty.append(name)
        if empty:
            raise ValueError(
                f"image folder {self.root}: class folders without images ({', '.join(empty[:10])}); "
                f"accepted extensions: {', '.join(extensions)}"
            )
        self.files = files
        self.labels = np.asarray(labels, np.int64)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = _check_index(index, len(self), f"ImageFolderSource({self.root})")
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadImageError(path, f"{type(e).__name__}: {e}") from e
        return decode_image(data, path), int(self.labels[index])

    def describe(self) -> dict:
        return {
            "kind": "folder",
            "root": os.path.abspath(self.root),
            "num_images": len(self),
            "num_classes": self.num_classes,
        }


# --------------------------------------------------------------------------------------------------------- TFDS
def _tfds():
    # tfds 4.9.10's DatasetBuilder.code_path touches `importlib_resources.abc`, a backport that is only a declared
    # dependency below Python 3.9; the standard library module has the same `abc.Traversable`.
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        import importlib.resources
        import importlib.resources.abc  # noqa: F401

        sys.modules.setdefault("importlib_resources", importlib.resources)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "TFDS sources need tensorflow-datasets: pip install 'sfd_jax[tfds]' "
            "(tensorflow-datasets==4.9.10; TensorFlow itself is not needed)"
        ) from e
    return tfds


class TFDSSource:
    """A TFDS image-classification dataset stored as ArrayRecord (random access, no TensorFlow).

    Images come back as encoded bytes (`SkipDecoding`) and are decoded by `decode_image`, so a corrupt record
    raises BadImageError with its `file_name` instead of failing inside TFDS.
    """

    def __init__(
        self,
        name: str = "imagenet2012",
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        tfds = _tfds()
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:
            raise FileNotFoundError(f"TFDS dataset {name!r} not found under data_dir={data_dir}: {e}") from e
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared under {builder.data_dir}; for ImageNet run "
                "`python -m sfd_jax.data.sources prepare-imagenet --manual_dir=... --data_dir=...`"
            )
        fmt = builder.info.file_format
        if fmt is None or "array_record" not in str(fmt).lower():
            raise ValueError(
                f"TFDS dataset {name!r} at {builder.data_dir} is stored as {fmt}; random access needs "
                "file_format='array_record' (re-prepare it, e.g. with prepare_imagenet2012)"
            )
        features = builder.info.features
        if image_key not in features or label_key not in features:
            raise ValueError(
                f"TFDS dataset {name!r} has features {list(features)}; expected {image_key!r} and {label_key!r}"
            )
        self._source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
        self.num_classes = int(features[label_key].num_classes)
        self._builder_dir = str(builder.data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = _check_index(index, len(self), f"TFDSSource({self.name}/{self.split})")
        record = self._source[index]
        fname = record.get("file_name", b"")
        fname = fname.decode() if isinstance(fname, bytes) else str(fname)
        where = f"{self.name}/{self.split}[{index}]" + (f" ({fname})" if fname else "")
        return decode_image(record[self.image_key], where), int(record[self.label_key])

    def describe(self) -> dict:
        return {
            "kind": "tfds",
            "name": self.name,
            "split": self.split,
            "data_dir": self._builder_dir,
            "num_images": len(self),
            "num_classes": self.num_classes,
        }


def prepare_imagenet2012(manual_dir: str, data_dir: str, splits: Sequence[str] = ("train", "validation")) -> str:
    """Prepare TFDS `imagenet2012` from the manual-download tars as ArrayRecord, without TensorFlow.

    TFDS's own builder checks files with `tf.io.gfile` and fixes the 22 CMYK JPEGs and one PNG with `tf.image`, so
    it needs TensorFlow. This subclass reads the tars with `tarfile` and does the two fixes with PIL; the features,
    label names, validation labels, version and on-disk layout are TFDS's, so `tfds.data_source('imagenet2012')`
    and `TFDSSource` read the result like one prepared by TFDS itself. Returns the dataset directory.
    """
    builder_cls = _imagenet_builder_class()
    builder = builder_cls(data_dir=data_dir, file_format="array_record", splits=tuple(splits))
    tfds = _tfds()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.data_dir)


def _imagenet_builder_class():
    import tarfile

    tfds = _tfds()
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet

    def reencode_jpeg(data: bytes, name: str) -> bytes:
        buf = io.BytesIO()
        # quality 100 as TFDS's own fix (tfds.core.utils.jpeg_cmyk_to_rgb / png_to_jpeg).
        Image.fromarray(decode_image(data, name)).save(buf, format="JPEG", quality=100)
        return buf.getvalue()

    class Imagenet2012NoTF(tfds_imagenet.Builder, skip_registration=True):
        name = "imagenet2012"

        def __init__(self, *, splits: tuple[str, ...] = ("train", "validation"), **kwargs):
            self._wanted = splits
            super().__init__(**kwargs)

        @classmethod
        def _get_pkg_dir_path(cls):  # metadata (citation, tags) lives beside TFDS's builder, not this module
            return tfds_imagenet.Builder._get_pkg_dir_path()

        def _split_generators(self, dl_manager):
            manual = os.fspath(dl_manager.manual_dir)
            paths = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
            unknown = sorted(set(self._wanted) - set(paths))
            if unknown:
                raise ValueError(f"prepare_imagenet2012: unknown splits {unknown}; choose from {sorted(paths)}")
            gens = []
            for split in self._wanted:
                path = os.path.join(manual, paths[split])
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        f"prepare_imagenet2012: {path} not found (manual_dir must hold "
                        f"{', '.join(paths[s] for s in self._wanted)})"
                    )
                gens.append(tfds.core.SplitGenerator(name=split, gen_kwargs={"path": path, "split": split}))
            return gens

        def _fix(self, fname: str, data: bytes) -> bytes:
            if fname in tfds_imagenet.CMYK_IMAGES or fname in tfds_imagenet.PNG_IMAGES:
                return reencode_jpeg(data, fname)
            return data

        def _generate_examples(self, path, split):
            if split == "validation":
                labels_path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
                labels = labels_path.read_text().strip().splitlines()
                with tarfile.open(path, "r:") as tar:
                    names = sorted(tar.getnames())
                by_name = dict(zip(names, labels))
                with tarfile.open(path, "r|") as tar:
                    for member in tar:
                        if member.isfile():
                            yield (
                                member.name,
                                {
                                    "file_name": member.name,
                                    "label": by_name[member.name],
                                    "image": tar.extractfile(member).read(),
                                },
                            )
                return
            with tarfile.open(path, "r|") as outer:
                for class_tar in outer:
                    if not class_tar.isfile():
                        continue
                    synset = os.path.basename(class_tar.name)[:-4]  # 'n01440764.tar'
                    inner_bytes = io.BytesIO(outer.extractfile(class_tar).read())
                    with tarfile.open(fileobj=inner_bytes, mode="r|") as inner:
                        for member in inner:
                            if member.isfile():
                                fname = os.path.basename(member.name)
                                data = self._fix(fname, inner.extractfile(member).read())
                                yield fname, {"file_name": fname, "label": synset, "image": data}

    return Imagenet2012NoTF


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {type(e).__name__}: {e}") from e
    if len(data) < 4:
        raise ValueError(f"IDX file {path} is truncated ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}, expected 0000 08 xx)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise ValueError(f"IDX file {path}: header says shape {shape} ({count} bytes), file holds {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find_idx(root: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root} (Debian: apt-get install dataset-fashion-mnist)"
    )


class FashionMNISTSource:
    """Fashion-MNIST from IDX files (gzipped or plain). `pad_to` centres the 28×28 image on a black square;
    `rgb` repeats the gray channel three times (otherwise images are (H, W, 1))."""

    def __init__(
        self, root: str = FASHION_MNIST_DIR, split: str = "train", pad_to: int | None = None, rgb: bool = True
    ):
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"FashionMNISTSource: split={split!r}; choose 'train' or 'test'")
        self.root, self.split, self.pad_to, self.rgb = os.fspath(root), split, pad_to, bool(rgb)
        images = _read_idx(_find_idx(self.root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(self.root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST in {self.root}: images {images.shape} and labels {labels.shape} do not "
                "pair up (expected (N, 28, 28) and (N,))"
            )
        if pad_to is not None and pad_to < max(images.shape[1:]):
            raise ValueError(f"FashionMNISTSource: pad_to={pad_to} is smaller than the images {images.shape[1:]}")
        self.images, self.labels = images, labels.astype(np.int64)
        self.num_classes = 10
        self.class_names = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = _check_index(index, len(self), f"FashionMNISTSource({self.split})")
        image = self.images[index]
        if self.pad_to is not None:
            h, w = image.shape
            top, left = (self.pad_to - h) // 2, (self.pad_to - w) // 2
            image = np.pad(image, ((top, self.pad_to - h - top), (left, self.pad_to - w - left)))
        image = np.repeat(image[..., None], 3 if self.rgb else 1, axis=-1)
        return image, int(self.labels[index])

    def describe(self) -> dict:
        return {
            "kind": "fashion_mnist",
            "root": os.path.abspath(self.root),
            "split": self.split,
            "pad_to": self.pad_to,
            "rgb": self.rgb,
            "num_images": len(self),
            "num_classes": self.num_classes,
        }


# ------------------------------------------------------------------------------------------------- from config
SOURCE_KINDS = ("folder", "tfds", "fashion_mnist")


def make_source(cfg) -> ImageSource:
    """Build a source from a config block with `kind` and the kind's fields (see docs/data.md)."""
    kind = cfg.get("kind")
    if kind == "folder":
        if not cfg.get("path"):
            raise ValueError("source.path is required for source.kind='folder'")
        return ImageFolderSource(cfg["path"])
    if kind == "tfds":
        return TFDSSource(
            cfg.get("name") or "imagenet2012", split=cfg.get("split") or "train", data_dir=cfg.get("path") or None
        )
    if kind == "fashion_mnist":
        return FashionMNISTSource(
            cfg.get("path") or FASHION_MNIST_DIR,
            split=cfg.get("split") or "train",
            pad_to=cfg.get("pad_to") or None,
            rgb=True,
        )
    raise ValueError(f"source.kind={kind!r} is not a source; valid kinds: {', '.join(SOURCE_KINDS)}")


def _main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sfd_jax.data.sources")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-imagenet", help="prepare TFDS imagenet2012 as ArrayRecord without TensorFlow")
    prep.add_argument("--manual_dir", required=True, help="folder with ILSVRC2012_img_train.tar / _val.tar")
    prep.add_argument("--data_dir", required=True, help="TFDS data_dir to write imagenet2012/5.1.0 into")
    prep.add_argument("--splits", default="train,validation")
    args = parser.parse_args(argv)
    out = prepare_imagenet2012(args.manual_dir, args.data_dir, [s for s in args.splits.split(",") if s])
    print(out)


if __name__ == "__main__":
    _main(sys.argv[1:])
