"""Preparing a dataset (synermix.data.prepare): the manifest, images and splits, undecodable
files, copies of one picture, the per-class cap, the real ELPV subset, and what it refuses to
overwrite. The prepare stage: tests/stages/test_prepare.py."""

import hashlib

import pandas as pd
import pytest
from PIL import Image

from synermix.config import SourceSpec
from synermix.data.manifest import BASE_COLUMNS, read_manifest
from synermix.data.prepare import MARKER_NAME, cap_per_class, prepare_dataset
from synermix.data.sources import list_elpv
from synermix.errors import UserError

from .helpers import noise_image

SPLIT = {"train": 0.7, "val": 0.15, "test": 0.15}


def test_manifest_columns_images_and_splits(tmp_path, make_dataset):
    root = make_dataset({"a": 20, "b": 10})
    result = prepare_dataset(SourceSpec("folder", root), tmp_path / "out", seed=1, split=SPLIT, image_size=16)
    manifest = read_manifest(tmp_path / "out" / "manifest.csv")
    assert list(manifest.columns) == list(BASE_COLUMNS)
    pd.testing.assert_frame_equal(manifest, result.manifest.astype(manifest.dtypes.to_dict()))
    assert manifest["decodable"].all()
    assert manifest.groupby("label")["split"].value_counts().to_dict() == {
        ("a", "train"): 14,
        ("a", "val"): 3,
        ("a", "test"): 3,
        ("b", "train"): 7,
        ("b", "val"): 2,
        ("b", "test"): 1,
    }
    for row in manifest.itertuples():
        image = Image.open(tmp_path / "out" / row.path)
        assert image.size == (16, 16) and image.mode == "L"
        assert (row.width, row.height, row.mode, row.format) == (32, 32, "L", "PNG")
        assert row.sha256 == hashlib.sha256((root / row.source_path).read_bytes()).hexdigest()
        assert row.bytes == (root / row.source_path).stat().st_size
    assert result.summary["per_class"]["b"] == {"train": 7, "val": 2, "test": 1}


def test_undecodable_image_is_recorded_not_written(tmp_path, make_dataset):
    root = make_dataset({"a": 5})
    (root / "a" / "broken.jpg").write_text("not a jpeg")
    result = prepare_dataset(SourceSpec("folder", root), tmp_path / "out", seed=1, split=SPLIT)
    row = result.manifest.set_index("source_path").loc["a/broken.jpg"]
    assert not row["decodable"] and row["path"] == "" and row["split"] == ""
    assert "not an image file" in row["error"]
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 5


def test_copies_of_one_picture_share_a_split(tmp_path, make_dataset):
    root = make_dataset({"a": 30})
    for i in range(6):  # the same picture re-encoded under other names
        noise_image(1).save(root / "a" / f"copy{i}.bmp")
    manifest = prepare_dataset(SourceSpec("folder", root), tmp_path / "out", seed=9, split=SPLIT).manifest
    copies = manifest[
        manifest["content_sha256"] == manifest.set_index("source_path").loc["a/img000.png", "content_sha256"]
    ]
    assert len(copies) == 7 and copies["split"].nunique() == 1


def test_per_class_cap_is_seeded_and_deterministic():
    items = list_elpv().items
    capped = cap_per_class(items, 10, seed=123)
    assert len(capped) == 40
    assert [i.source_path for i in capped] == [i.source_path for i in cap_per_class(items, 10, seed=123)]
    assert [i.source_path for i in capped] != [i.source_path for i in cap_per_class(items, 10, seed=124)]


def test_real_elpv_subset(tmp_path):
    result = prepare_dataset(
        SourceSpec("elpv"), tmp_path / "out", seed=123, split=SPLIT, max_per_class=12, image_size=64
    )
    manifest = result.manifest
    assert len(manifest) == 48 and manifest["decodable"].all()
    assert set(manifest["cell_type"]) == {"mono", "poly"}
    assert manifest.groupby("label").size().to_dict() == dict.fromkeys(
        ["defective", "functional", "likely_defective", "possibly_defective"], 12
    )
    assert Image.open(tmp_path / "out" / manifest["path"][0]).size == (64, 64)


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path, make_dataset):
    root = make_dataset({"a": 3})
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.docx").write_text("user data")
    with pytest.raises(UserError, match="prepare never overwrites user data"):
        prepare_dataset(SourceSpec("folder", root), out, seed=1, split=SPLIT)
    assert (out / "thesis.docx").read_text() == "user data"


def test_replaces_its_own_output(tmp_path, make_dataset):
    root = make_dataset({"a": 3})
    out = tmp_path / "out"
    prepare_dataset(SourceSpec("folder", root), out, seed=1, split=SPLIT)
    (out / "images" / "stale.png").write_bytes(b"old")
    prepare_dataset(SourceSpec("folder", root), out, seed=1, split=SPLIT)
    assert (out / MARKER_NAME).is_file() and not (out / "images" / "stale.png").exists()


def test_refuses_overlapping_source_and_output(tmp_path, make_dataset):
    root = make_dataset({"a": 3})
    with pytest.raises(UserError, match="overlap"):
        prepare_dataset(SourceSpec("folder", root), root / "prepared", seed=1, split=SPLIT)
    with pytest.raises(UserError, match="overlap"):
        prepare_dataset(SourceSpec("folder", root / "a"), root, seed=1, split=SPLIT)
    assert len(list((root / "a").iterdir())) == 3
