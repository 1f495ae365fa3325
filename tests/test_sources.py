import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synermix.config import SourceSpec
from synermix.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    list_elpv,
    list_fashion_mnist,
    list_folder,
    list_source,
)
from synermix.errors import UserError


def test_elpv_lists_the_real_dataset():
    listing = list_elpv()
    assert len(listing.items) == 2624
    counts = Counter(item.label for item in listing.items)
    assert counts == {
        "functional": 1508,
        "possibly_defective": 295,
        "likely_defective": 106,
        "defective": 715,
    }
    assert {item.extra["cell_type"] for item in listing.items} == {"mono", "poly"}
    first = listing.items[0]
    assert first.source_path == "cell0001.png" and first.extra["defect_probability"] == 1.0
    image = Image.open(__import__("io").BytesIO(first.read()))
    assert image.size == (300, 300) and image.mode == "L"


def test_folder_lists_class_folders_recursively_and_skips_other_files(make_dataset):
    root = make_dataset({"a": 2, "b": 1})
    (root / "a" / "sub").mkdir()
    Image.new("L", (20, 20)).save(root / "a" / "sub" / "deep.JPG")
    (root / "a" / "notes.txt").write_text("inspection notes")
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    (root / ".hidden").mkdir()
    (root / "README.md").write_text("not an image: ignored at the top level")
    listing = list_folder(root)
    assert sorted(i.source_path for i in listing.items) == [
        "a/img000.png",
        "a/img001.png",
        "a/sub/deep.JPG",
        "b/img000.png",
    ]
    assert listing.skipped == ("a/notes.txt",)
    assert listing.classes == ("a", "b")


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match=r"folder '.*missing' does not exist; point data.source"):
        list_source(SourceSpec("folder", tmp_path / "missing"))


def test_folder_that_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="is a file, not a folder"):
        list_folder(tmp_path / "x.png")


def test_images_without_class_folders(tmp_path):
    Image.new("L", (20, 20)).save(tmp_path / "loose.png")
    with pytest.raises(UserError, match=r"1 image\(s\) directly inside it \(loose.png\).*<class>/"):
        list_folder(tmp_path)


def test_folder_without_any_class_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="has no class folders"):
        list_folder(tmp_path)


def test_empty_class_folder_is_named(make_dataset):
    root = make_dataset({"a": 2})
    (root / "empty_class").mkdir()
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("x")
    with pytest.raises(
        UserError, match=r"class folder\(s\) with no images in .*: empty_class, texts; add images"
    ):
        list_folder(root)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    listing = list_source(SourceSpec.parse(f"fashion-mnist:{tmp_path}"))
    assert len(listing.items) == 10
    assert listing.items[1].label == FASHION_MNIST_CLASSES[1]
    assert listing.items[7].source_path == "test/00001" and listing.items[7].extra["source_set"] == "test"
    image = Image.open(__import__("io").BytesIO(listing.items[0].read()))
    assert image.size == (28, 28) and image.mode == "L"


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        list_fashion_mnist(tmp_path / "none")
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        list_fashion_mnist(tmp_path)


def test_fashion_mnist_truncated_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), compress=False)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-10])
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2), compress=False)
    with pytest.raises(UserError, match="is truncated"):
        list_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_debian_package():
    listing = list_source(SourceSpec("fashion-mnist"))
    assert len(listing.items) == 70_000
    assert Counter(i.label for i in listing.items) == dict.fromkeys(FASHION_MNIST_CLASSES, 7000)


def test_fashion_mnist_short_header_and_corrupt_gzip(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(UserError, match="header is incomplete"):
        list_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(UserError, match=r"cannot read .*reinstall dataset-fashion-mnist"):
        list_fashion_mnist(tmp_path)


def test_class_folder_named_with_underscores_is_kept_and_macos_debris_ignored(make_dataset):
    root = make_dataset({"__other": 2, "ok": 2})
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._img.png").write_bytes(b"\0")
    assert list_folder(root).classes == ("__other", "ok")
