"""Image sources: folders, Fashion-MNIST IDX files, TFDS imagenet2012 as ArrayRecord (prepared without TF)."""

import gzip
import io
import os
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from sfd_jax.data import sources as S


def _save(path, array, mode=None, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path, format=fmt)
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    # Class names deliberately unsorted on creation; labels must follow sorted order.
    _save(f"{root}/zebra/b.png", rgb)
    _save(f"{root}/zebra/a.png", rng.integers(0, 256, (17, 9), dtype=np.uint8))  # grayscale
    _save(f"{root}/zebra/sub/c.png", np.dstack([rgb, np.full((20, 30), 7, np.uint8)]))  # RGBA
    _save(f"{root}/apple/x.jpg", rgb, mode="CMYK", fmt="JPEG")
    (root / "apple" / "notes.txt").write_text("not an image")
    return root, rgb


def test_folder_order_labels_and_rgb(folder):
    root, rgb = folder
    src = S.ImageFolderSource(str(root))
    assert src.class_names == ["apple", "zebra"] and src.num_classes == 2
    names = [os.path.relpath(f, root) for f in src.files]
    assert names == ["apple/x.jpg", "zebra/a.png", "zebra/b.png", "zebra/sub/c.png"]
    assert [src[i][1] for i in range(len(src))] == [0, 1, 1, 1]
    for i in range(len(src)):
        image, _ = src[i]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    gray, _ = src[1]
    assert gray.shape == (17, 9, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(src[2][0], rgb)
    np.testing.assert_array_equal(src[3][0], rgb)  # alpha dropped, colour kept
    assert src.describe()["num_images"] == 4


def test_folder_bad_image_names_file(folder, tmp_path):
    root = tmp_path / "bad"
    _save(f"{root}/cls/good.png", np.zeros((4, 4, 3), np.uint8))
    (root / "cls" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    src = S.ImageFolderSource(str(root))
    with pytest.raises(S.BadImageError, match="broken.jpg"):
        src[0]
    assert src[1][0].shape == (4, 4, 3)
    with pytest.raises(IndexError, match="out of range"):
        src[2]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        S.ImageFolderSource(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        S.ImageFolderSource(str(tmp_path / "flat"))
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        S.ImageFolderSource(str(tmp_path / "flat"))


def _idx(array, path, gz):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    _idx(images, tmp_path / "t10k-images-idx3-ubyte", gz)
    _idx(labels, tmp_path / "t10k-labels-idx1-ubyte", gz)
    src = S.FashionMNISTSource(str(tmp_path), split="test", pad_to=32)
    assert len(src) == 5 and src.num_classes == 10
    image, label = src[2]
    assert image.shape == (32, 32, 3) and label == 4
    np.testing.assert_array_equal(image[2:30, 2:30, 1], images[2])
    assert image[:2].max() == 0 and image[:, 30:].max() == 0
    gray = S.FashionMNISTSource(str(tmp_path), split="test", rgb=False)[0][0]
    assert gray.shape == (28, 28, 1)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        S.FashionMNISTSource(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*not an unsigned-byte IDX"):
        S.FashionMNISTSource(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">HBB3I", 0, 8, 3, 2, 28, 28) + b"\x00" * 10)
    with pytest.raises(ValueError, match="header says shape"):
        S.FashionMNISTSource(str(tmp_path))
    with pytest.raises(ValueError, match="split="):
        S.FashionMNISTSource(str(tmp_path), split="val")


def test_fashion_mnist_debian_package():
    """The real files (`make test` installs the Debian package dataset-fashion-mnist, or reads FASHION_MNIST=DIR)."""
    src = S.FashionMNISTSource(os.environ.get("FASHION_MNIST", S.FASHION_MNIST_DIR), split="test", pad_to=32)
    assert len(src) == 10000
    image, label = src[0]
    assert image.shape == (32, 32, 3) and 0 <= label < 10


# ------------------------------------------------------------------------------------------------ TFDS imagenet
def _jpeg(array, mode="RGB"):
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    manual = root / "manual"
    manual.mkdir()
    rng = np.random.default_rng(2)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        classes = {
            "n01440764": [("n01440764_1.JPEG", _jpeg(rng.integers(0, 256, (20, 24, 3), np.uint8)))],
            # A CMYK file of TFDS's fix list, and a corrupt JPEG.
            "n01739381": [
                ("n01739381_1309.JPEG", _jpeg(rng.integers(0, 256, (16, 16, 3), np.uint8), "CMYK")),
                ("n01739381_7.JPEG", b"\xff\xd8\xff not really a jpeg"),
            ],
        }
        for synset, files in classes.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name, data in files:
                    _add(inner, name, data)
            _add(outer, f"{synset}.tar", buf.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for k in (1, 2):
            _add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", _jpeg(rng.integers(0, 256, (12, 10, 3), np.uint8)))
    S.prepare_imagenet2012(str(manual), str(root / "data"))
    return root / "data"


def test_tfds_imagenet_without_tensorflow(imagenet):
    import sys

    assert "tensorflow" not in sys.modules
    tfds = S._tfds()
    names = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    val_synsets = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
    train = S.TFDSSource("imagenet2012", "train", str(imagenet))
    assert len(train) == 3 and train.num_classes == 1000
    good, bad = {}, []
    for i in range(3):
        try:
            image, label = train[i]
            good[names[label]] = image
        except S.BadImageError as e:
            bad.append(str(e))
    assert sorted(good) == ["n01440764", "n01739381"]
    assert all(img.ndim == 3 and img.shape[-1] == 3 for img in good.values())
    assert len(bad) == 1 and "n01739381_7.JPEG" in bad[0]
    val = S.TFDSSource("imagenet2012", "validation", str(imagenet))
    labels = sorted(names[val[i][1]] for i in range(len(val)))
    assert labels == sorted(val_synsets[:2])
    assert "tensorflow" not in sys.modules


def test_tfds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        S.TFDSSource("imagenet2012", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_val.tar"):
        S.prepare_imagenet2012(str(tmp_path), str(tmp_path / "out"), splits=("validation",))


def test_make_source(folder, tmp_path):
    root, _ = folder
    assert len(S.make_source({"kind": "folder", "path": str(root)})) == 4
    with pytest.raises(ValueError, match="valid kinds: folder, tfds, fashion_mnist"):
        S.make_source({"kind": "webdataset"})
    with pytest.raises(ValueError, match="source.path"):
        S.make_source({"kind": "folder"})
